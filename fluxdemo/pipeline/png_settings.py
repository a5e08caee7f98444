"""What an image was made with (ImageParams), and reading it back from a PNG's text as checked settings.

Every fluxdemo PNG holds two text chunks: "parameters", the AUTOMATIC1111/Forge infotext, and "fluxdemo", a JSON copy
of every ImageParams field. settings_from_png() reads either (never the pixels) and brings every value within the
controls' ranges, with a note for each value it changed.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxdemo.errors import FluxdemoError, OptionsError
from fluxdemo.pipeline.limits import DEFAULT_LIMITS, Limits
from fluxdemo.pipeline.options import (
    GUIDANCE_MAX,
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    SIDE_MULTIPLE,
    GenerateOptions,
)
from fluxdemo.untrusted import (
    MAX_FIELD_CHARS,
    MAX_LIST_ITEMS,
    MAX_PARAMETERS_CHARS,
    MAX_PNG_TEXT_BYTES,
    capped,
    png_text,
)

ROLES = ("baseline", "lora", "side_by_side", "grid")
PARAMS_CHUNK = "fluxdemo"


@dataclass(frozen=True)
class ImageParams:
    """What one image was made with; `extra` holds any further JSON scalars as sorted (key, value) pairs."""

    prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    model: str
    quant: str
    lora_name: str | None = None  # the first LoRA of `loras` (kept for readers of single-LoRA images)
    lora_sha256: str | None = None
    strength: float | None = None
    role: str = "baseline"  # baseline | lora | side_by_side | grid
    extra: tuple[tuple[str, Any], ...] = ()
    loras: tuple[tuple[str, str | None, float], ...] = ()  # the stack: (name, sha256, strength) per LoRA
    fast: bool = False  # made with --fast (GenerateOptions.fast): steps predicted, not the exact pixels

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise OptionsError(f"`role` must be one of {', '.join(ROLES)} but is {self.role!r}")
        loras = tuple(tuple(lora) for lora in self.loras)  # JSON gives lists back
        if not loras and self.lora_name is not None:  # a PNG from before stacks
            loras = ((self.lora_name, self.lora_sha256, 1.0 if self.strength is None else self.strength),)
        object.__setattr__(self, "loras", loras)
        if loras:
            object.__setattr__(self, "lora_name", loras[0][0])
            object.__setattr__(self, "lora_sha256", loras[0][1])
            object.__setattr__(self, "strength", loras[0][2])
        pairs = self.extra.items() if isinstance(self.extra, dict) else self.extra
        # A frozen dataclass must stay hashable, and the JSON chunk must give back exactly what went in: so extra
        # becomes sorted pairs of JSON scalars (a dict is accepted for convenience).
        extra = tuple(sorted((str(k), v) for k, v in pairs))
        bad = [k for k, v in extra if not isinstance(v, (str, int, float, bool, type(None)))]
        if bad:
            raise OptionsError(f"`extra` values must be str, int, float, bool or None; {', '.join(bad)} are not")
        object.__setattr__(self, "extra", extra)


@dataclass(frozen=True)
class PngSettings:
    """A PNG's settings checked like any input: `params` within the studio's controls, and one sentence in `notes`
    for each value that was changed to get there (the studio shows them)."""

    params: ImageParams
    notes: tuple[str, ...] = ()


def settings_from_png(source: str | Path | bytes, limits: Limits = DEFAULT_LIMITS) -> PngSettings:
    """The settings a PNG (a path or its bytes) was made with: fluxdemo's JSON chunk, else the A1111/Forge
    `parameters` text; every value clamped to the controls' ranges or set to its default, and the prompt cut to
    `limits`. Reads only the text chunks, never the pixels."""
    chunks = png_text(source, (PARAMS_CHUNK, "parameters"))
    what = "The PNG" if isinstance(source, bytes) else Path(source).name
    for key in (PARAMS_CHUNK, "parameters"):
        if key in chunks and chunks[key] is None:
            raise FluxdemoError(
                f"{what}'s {key!r} text is over {MAX_PNG_TEXT_BYTES:,} bytes, far more than any settings need; "
                "it was not read. Choose the PNG as fluxdemo or your tool saved it."
            )
    if PARAMS_CHUNK in chunks:
        return _checked(_fluxdemo_fields(chunks[PARAMS_CHUNK], what), [], limits)
    if "parameters" in chunks:
        return _checked(*_a1111_fields(chunks["parameters"]), limits)
    raise FluxdemoError(
        f"{what} carries no fluxdemo parameters (no {PARAMS_CHUNK!r} PNG text chunk) and no A1111 `parameters`: "
        "it was not made by fluxdemo or a tool that records its settings, or its metadata was stripped on the way."
    )


def read_params(source: str | Path | bytes) -> ImageParams:
    """The ImageParams a fluxdemo PNG was made with (a path or the PNG's bytes); for a PNG of another tool, what its
    A1111/Forge `parameters` text says. Checked as settings_from_png checks them."""
    return settings_from_png(source).params


def _fluxdemo_fields(text: str, what: str) -> dict[str, Any]:
    """The raw fields of fluxdemo's JSON chunk (unchecked)."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: a nesting bomb
        data = None
    if not isinstance(data, dict):
        raise FluxdemoError(
            f"{what}'s {PARAMS_CHUNK!r} text is not the JSON object fluxdemo writes; it was damaged or made by hand. "
            "Set the controls by hand, or choose the PNG as fluxdemo saved it."
        )
    return data


def parse_a1111(text: str, limits: Limits = DEFAULT_LIMITS) -> ImageParams:
    """ImageParams from AUTOMATIC1111/Forge infotext: the prompt (its `<lora:name:weight>` tags become the stack),
    then "Steps: 28, Seed: 1, Size: 1024x1024, Distilled CFG Scale: 3.5, ..."; what it lacks keeps FLUX.1-dev's
    defaults, and every value is checked as settings_from_png checks it."""
    return _checked(*_a1111_fields(text), limits).params


def _a1111_fields(text: str) -> tuple[dict[str, Any], list[str]]:
    """The raw fields of A1111 infotext (unchecked) and a note when the text was cut; linear in its length."""
    notes = []
    if len(text) > MAX_PARAMETERS_CHARS:
        notes.append(
            f"The A1111 parameters are {len(text):,} characters; only the first {MAX_PARAMETERS_CHARS:,} were read."
        )
        text = text[:MAX_PARAMETERS_CHARS]
    lines = text.strip().splitlines()
    last = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("Steps:")), len(lines))
    # As A1111 reads it: every line from "Negative prompt:" up to the settings line belongs to the negative prompt.
    prompt_lines = itertools.takewhile(lambda line: not line.startswith("Negative prompt:"), lines[:last])
    prompt, tags = _lora_tags("\n".join(prompt_lines))
    items = _infotext_items(lines[last]) if last < len(lines) else {}
    width, _, height = items.get("Size", "1024x1024").partition("x")
    loras = [
        (name if name.endswith(".safetensors") else f"{name}.safetensors", None, weight or 1.0)
        for name, weight in tags
    ]
    guidance = items.get("Distilled CFG Scale", items.get("Guidance", _DEFAULTS.guidance))
    fields = dict(
        prompt=prompt,
        seed=items.get("Seed", _DEFAULTS.seed),
        steps=items.get("Steps", _DEFAULTS.steps),
        guidance=guidance,
        width=width,
        height=height or width,
        model=items.get("Model", "unknown"),
        quant=items.get("Quant", ""),
        loras=loras,
        fast="Fast" in items,  # written only for a fast image (images.a1111_parameters)
    )
    return fields, notes


def _lora_tags(prompt: str) -> tuple[str, list[tuple[str, str]]]:
    """The prompt without its `<lora:name:weight>` tags, and (name, weight text) of each, in one pass with
    str.find: a tag runs from "<lora:" to the next ">", its name up to the first ":" (as A1111's pattern reads it)."""
    kept, tags, i, close = [], [], 0, -1
    while (start := prompt.find("<lora:", i)) >= 0:
        if close < start:
            close = prompt.find(">", start)  # kept while it lies ahead, so no stretch is searched twice
        if close < 0:
            break
        if prompt[start + 6] in ":>":  # no name: not a tag
            kept.append(prompt[i : start + 1])
            i = start + 1
            continue
        name, _, rest = prompt[start + 6 : close].partition(":")
        tags.append((name, rest[: len(rest) - len(rest.lstrip("-+0123456789.eE"))]))
        kept.append(prompt[i:start])
        i = close + 1
    kept.append(prompt[i:])
    return "".join(kept).strip(), tags


def _infotext_items(line: str) -> dict[str, str]:
    """A1111's settings line, "Key: value, Key: "a, quoted" ...", in one left-to-right pass: a value in double quotes
    is a JSON string and may hold commas; a part without a key is skipped; a later key wins."""
    items: dict[str, str] = {}
    n, i, colon, comma, unclosed = len(line), 0, -1, -1, False
    while i < n:
        if colon < i:  # each separator is searched for only once it lies behind, so the pass stays linear
            colon = _find(line, ":", i)
        if comma < i:
            comma = _find(line, ",", i)
        if colon >= comma:  # a part without a key (both at the end: the line is done)
            i = comma + 1
            continue
        key, j = line[i:colon].strip(), colon + 1
        while j < n and line[j].isspace():
            j += 1
        value = None
        if j < n and line[j] == '"' and not unclosed:
            end = _quoted_end(line, j)
            unclosed = end < 0  # no quote after this one closes either: never scan for one again
            after = end
            while 0 <= after < n and line[after] == " ":
                after += 1
            if end >= 0 and (after == n or line[after] == ","):
                value, i = _json_string(line[j:end]), after + 1
        if value is None:
            value, i = line[j:comma].strip(), comma + 1
        if key:
            items[key] = value
    return items


def _find(text: str, sub: str, start: int) -> int:
    found = text.find(sub, start)
    return len(text) if found < 0 else found


def _quoted_end(line: str, start: int) -> int:
    """The index after the double quote that closes the one at `start` (a backslash escapes); -1 when none does."""
    k = start + 1
    while k < len(line):
        if line[k] == '"':
            return k + 1
        k += 2 if line[k] == "\\" else 1
    return -1


def _json_string(quoted: str) -> str:
    try:
        return json.loads(quoted)
    except ValueError:  # an escape JSON does not know: the text between the quotes as it stands
        return quoted[1:-1]


def _checked(fields: dict[str, Any], notes: list[str], limits: Limits) -> PngSettings:
    """ImageParams from raw fields, each value within the controls' ranges; a note for each one changed."""
    prompt = fields.get("prompt")
    if not isinstance(prompt, str):
        prompt = ""
        notes.append("prompt: not text; left empty.")
    elif len(prompt) > limits.max_prompt_chars:
        notes.append(
            f"prompt: {len(prompt):,} characters, over the limit of {limits.max_prompt_chars:,}; cut to its start."
        )
        prompt = prompt[: limits.max_prompt_chars]
    numbers = {name: _number(name, fields.get(name), _RANGES[name], notes) for name in _RANGES}
    loras = _checked_loras(fields, notes, limits)
    role = fields.get("role") if fields.get("role") in ROLES else ("lora" if loras else "baseline")
    extra = fields.get("extra") if isinstance(fields.get("extra"), list) else []
    pairs = [
        tuple(p)
        for p in extra
        if isinstance(p, list)
        and len(p) == 2
        and isinstance(p[0], str)
        and isinstance(p[1], (str, int, float, bool, type(None)))
    ]
    params = ImageParams(
        prompt=prompt,
        **numbers,
        model=_text(fields.get("model"), "unknown"),
        quant=_text(fields.get("quant"), ""),
        role=role,
        extra=tuple(pairs),
        loras=loras,
        fast=fields.get("fast") is True,
    )
    return PngSettings(params, tuple(notes))


def _checked_loras(fields: dict[str, Any], notes: list[str], limits: Limits) -> tuple:
    """(name, sha256, strength) per LoRA: names cut, strengths within the limits; at most MAX_LIST_ITEMS of them."""
    loras = fields.get("loras")
    if not loras and isinstance(fields.get("lora_name"), str):  # a PNG from before stacks
        strength = fields.get("strength")
        loras = [[fields["lora_name"], fields.get("lora_sha256"), 1.0 if strength is None else strength]]
    loras = loras if isinstance(loras, list) else []
    if len(loras) > MAX_LIST_ITEMS:
        notes.append(f"LoRAs: {len(loras):,} named; kept the first {MAX_LIST_ITEMS}.")
        loras = loras[:MAX_LIST_ITEMS]
    kept = []
    for lora in loras:
        if not (isinstance(lora, (list, tuple)) and len(lora) == 3 and isinstance(lora[0], str) and lora[0]):
            notes.append("LoRAs: an entry that is not a (name, sha256, strength) triple was left out.")
            continue
        name, sha256, strength = lora
        kept.append(
            (
                capped(name, MAX_FIELD_CHARS),
                sha256 if isinstance(sha256, str) and len(sha256) <= 64 else None,
                _number("strength", strength, (limits.strength_min, limits.strength_max), notes),
            )
        )
    return tuple(kept)


# The controls' ranges, so a PNG sets nothing the studio's own sliders could not.
_RANGES = {"seed": (0, MAX_SEED), "steps": (1, MAX_STEPS), "guidance": (0.0, GUIDANCE_MAX),
           "width": (MIN_SIDE, MAX_SIDE), "height": (MIN_SIDE, MAX_SIDE)}  # fmt: skip
_DEFAULTS = GenerateOptions(prompt="")
_WHOLE = ("seed", "steps", "width", "height")


def _number(name: str, value: object, bounds: tuple[float, float], notes: list[str]) -> int | float:
    """`value` (a number or its text) within `bounds`, whole for the whole-number fields and a multiple of
    SIDE_MULTIPLE for a side; the default (1 for a strength) when it is no finite number."""
    default = getattr(_DEFAULTS, name, 1.0)
    number = _as_number(value)
    if number is None:
        notes.append(f"{name}: not a finite number; set to the default {default:g}.")
        return default
    low, high = bounds
    checked = min(max(number, low), high)  # before rounding: a huge int cannot become a float
    if name in _WHOLE:
        step = SIDE_MULTIPLE if name in ("width", "height") else 1
        checked = round(checked / step) * step if step > 1 else round(checked)
        rule = f"a multiple of {step} " if step > 1 else "a whole number "
    else:
        checked, rule = float(checked), ""
    if checked != number:
        notes.append(
            f"{name}: {_shown(number)} is not {rule}between {_shown(low)} and {_shown(high)}; set to "
            f"{_shown(checked)}."
        )
    return checked


def _as_number(value: object) -> int | float | None:
    """A finite int or float from a JSON number or infotext's text; None for anything else (NaN, inf, yes/no)."""
    if isinstance(value, str):
        text = value.strip()[:40]  # the longest number the ranges can use is a few digits
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if isinstance(value, int) or math.isfinite(value) else None


def _shown(number: int | float) -> str:
    return f"{number:,g}" if isinstance(number, float) else f"{number:,}" if abs(number) < 10**18 else "over 10^18"


def _text(value: object, default: str) -> str:
    return capped(value, MAX_FIELD_CHARS) if isinstance(value, str) else default
