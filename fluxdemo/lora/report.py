"""What a LoRA file is, as a bounded report: format, rank, alpha, targets, trigger words, problems."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from fluxdemo.model.names import FluxDims
from fluxdemo.model.presets import PACKAGE_CONFIGS
from fluxdemo.untrusted import MAX_COUNTED_TAGS, MAX_TAG_FREQUENCY_CHARS, names_list

logger = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def flux_dev_dims() -> FluxDims:
    """The real FLUX.1-dev transformer's sizes, from the config shipped in the package."""
    return FluxDims.from_config(json.loads((PACKAGE_CONFIGS / "transformer" / "config.json").read_text()))


@lru_cache(maxsize=1)
def _flux_dev_clip() -> dict:
    return json.loads((PACKAGE_CONFIGS / "text_encoder" / "config.json").read_text())


# --- the report ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraReport:
    """What a LoRA file is, what it adapts, and whether (and why not) it fits the model. JSON-able via to_dict()."""

    name: str
    format: str  # peft | kohya | comfyui | bfl | fal-kontext | xlabs | lycoris-lokr | lycoris-loha | dora | ...
    naming: str  # the key spelling (the format, unless the format is an adapter kind such as LoKr)
    rank: int | dict[str, int] | None  # one rank, or {rank: number of modules}
    alpha: float | dict[str, int] | None  # None: no alpha stored (scale 1)
    scale: float | dict[str, int] | None  # alpha / rank as applied, folded into lora_B by to_diffusers
    targets: int  # base-model modules adapted (diffusers modules: a fused qkv counts 3)
    modules: dict[str, int]  # double_blocks / single_blocks / embedders / final_layer / clip / t5 -> count
    text_encoder: bool  # adapts CLIP-L
    t5: bool  # has T5 keys (applied never; refused unless all zero)
    base_model_hint: str
    compatible: bool
    problems: list[str]
    warnings: list[str]
    trigger_words: list[str]
    metadata: dict[str, str]
    matched: list[str]
    unmatched: list[str]
    sha256: str
    size: int

    def to_dict(self) -> dict:
        """The report as JSON-able data, every list and string capped (bounded): what any client is shown."""
        return bounded(dataclasses.asdict(self))


# What a report shows at most: a file can hold millions of keys or a megabyte-long trigger phrase, and every client
# (the studio, its API, report.json) gets the report; capped, a report stays well under 100 kB whatever the file.
REPORT_MAX_ITEMS = 50
REPORT_MAX_CHARS = 300
TRIGGER_MAX_WORDS = 12  # trigger words go into prompts, so they are cut at parse time, with no "and N more" marker
TRIGGER_MAX_CHARS = 80


def bounded(value, max_items: int = REPORT_MAX_ITEMS, max_chars: int = REPORT_MAX_CHARS):
    """`value` (JSON-like: dicts, lists, strings, numbers) with every list and dict cut to max_items entries (a last
    entry says "and 2,131 more") and every string to max_chars characters; for anything a LoRA file controls."""
    if isinstance(value, str):
        return (
            value
            if len(value) <= max_chars
            else f"{value[:max_chars]}... ({len(value) - max_chars:,} more characters)"
        )
    if isinstance(value, dict):
        items = list(value.items())
        out = {bounded(k, max_items, max_chars): bounded(v, max_items, max_chars) for k, v in items[:max_items]}
        if len(items) > max_items:
            out["..."] = f"and {len(items) - max_items:,} more"
        return out
    if isinstance(value, (list, tuple)):
        out = [bounded(v, max_items, max_chars) for v in value[:max_items]]
        return out + [f"and {len(value) - max_items:,} more"] if len(value) > max_items else out
    return value


# An absolute or home-relative path inside free text (kohya writes the trainer's own paths into ss_sd_model_name,
# ss_output_name and comments): at least two separators, not inside a word, a number such as 1024/768 or a URL.
_PATH = re.compile(r"(?<![\w.:/])(?:[A-Za-z]:|~|\.{1,2})?(?:[\\/][^\\/\s\"'<>|,;]+){2,}[\\/]?")


def paths_to_file_names(text: str) -> str:
    """Every path in `text` reduced to its file name ("/home/me/models/x.safetensors" -> "x.safetensors");
    URLs stay: they name a public page, not the trainer's disk."""
    return _PATH.sub(lambda m: re.split(r"[\\/]", m[0].rstrip("\\/"))[-1], text)


def format_report(r: LoraReport) -> str:
    """The report as a few lines for a terminal."""
    verdict = "compatible" if r.compatible else "NOT compatible"
    lines = [
        f"{r.name}: {r.format} ({r.naming} naming), {verdict}",
        f"  rank {r.rank}, alpha {r.alpha}, scale {r.scale}",
    ]
    lines.append(f"  adapts {r.targets} modules: " + ", ".join(f"{k} {v}" for k, v in r.modules.items()))
    lines.append(f"  base model: {r.base_model_hint or 'unknown'}; trigger words: {', '.join(r.trigger_words) or '-'}")
    lines.append(
        f"  keys: {len(r.matched)} matched, {len(r.unmatched)} unmatched"
        + (f" (e.g. {names_list(r.unmatched, 3)})" if r.unmatched else "")
    )
    lines += [f"  problem: {p}" for p in r.problems] + [f"  warning: {w}" for w in r.warnings]
    return "\n".join(lines)


def _summary(values: list) -> int | float | dict[str, int] | None:
    counts = Counter(values)
    if not counts or set(counts) == {None}:
        return None
    return values[0] if len(counts) == 1 else {str(v): n for v, n in counts.most_common()}


def _trigger_words(meta: Mapping[str, str]) -> list[str]:
    """At most TRIGGER_MAX_WORDS words of at most TRIGGER_MAX_CHARS each; only the phrase's start is parsed."""
    words = _parse_trigger_words(meta)
    return [w[:TRIGGER_MAX_CHARS] for w in words[:TRIGGER_MAX_WORDS]]


def _parse_trigger_words(meta: Mapping[str, str]) -> list[str]:
    if meta.get("modelspec.trigger_phrase"):
        phrase = meta["modelspec.trigger_phrase"][: TRIGGER_MAX_WORDS * (TRIGGER_MAX_CHARS + 2)]
        return [w.strip() for w in phrase.split(",") if w.strip()]
    text = meta.get("ss_tag_frequency") or "{}"
    if len(text) > MAX_TAG_FREQUENCY_CHARS:  # far past any real one: no trigger words rather than a long parse
        return []
    counts: Counter[str] = Counter()  # one Counter updated in place: summing Counters copied one per folder
    try:  # kohya: {dataset folder: {caption tag: count}}; the most frequent tags carry the trigger
        pairs = (pair for tags in json.loads(text).values() for pair in tags.items())
        for tag, n in itertools.islice(pairs, MAX_COUNTED_TAGS):
            counts[str(tag)] += int(n)
    except (ValueError, TypeError, AttributeError, RecursionError, OverflowError):  # OverflowError: int(1e400)
        return []
    return [tag.strip() for tag, n in counts.most_common(5) if n > 0]  # as Counter sums kept them: positive only


def _model_label(dims: FluxDims) -> str:
    return "FLUX.1-dev" if dims == flux_dev_dims() else f"this model (width {dims.inner})"


# (sha256, name, dims, CLIP config) -> (report, plan): a file is inspected by the library, then converted when picked;
# the verdict depends only on its bytes and the model, so the second pass reuses the first.
