"""The one layer for text and bytes that a visitor or a file controls: LoRA metadata, model cards, Hub listings, PNG
text, names.

Each reader here caps its input before it parses anything, and parses in one pass with string methods (no
regular expression that can backtrack), so no file or request can hold the GIL for longer than reading its bytes
takes. What reaches a page goes through `markdown_text`, so a LoRA's metadata cannot put tags or links there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MAX_CARD_BYTES = 256 * 2**10  # a model card's README.md: real ones are a few kB; the front matter is at its top
MAX_FIELD_CHARS = 200  # one trigger word, one example prompt, one name shown on a page
MAX_LIST_ITEMS = 12  # trigger words, example prompts, files named in one sentence
MAX_SENTENCE_CHARS = 600  # a list of names inside an error sentence


@dataclass(frozen=True)
class ModelCard:
    """What a Hub model card's front matter says about a LoRA: its trigger words and example prompts."""

    trigger_words: tuple[str, ...] = ()
    example_prompts: tuple[str, ...] = ()


def capped(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, with an ellipsis when it was longer."""
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def read_capped(path: Path, max_bytes: int) -> str | None:
    """A text file's first `max_bytes` bytes as text, or None when the file is larger (never read whole)."""
    with Path(path).open("rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        return None
    return data.decode("utf-8", errors="replace")


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    return value.strip()


def model_card(text: str) -> ModelCard:
    """Trigger words (`instance_prompt:`) and example prompts (`text:` lines of `widget:`) from a card's YAML front
    matter, in one pass over its lines; the text is cut to MAX_CARD_BYTES first."""
    text = text[:MAX_CARD_BYTES]
    if not text.startswith("---"):
        return ModelCard()
    end = text.find("\n---", 3)
    front = text[3 : end if end >= 0 else len(text)]
    words: list[str] = []
    prompts: list[str] = []
    for line in front.splitlines():
        key, sep, value = line.strip().removeprefix("-").strip().partition(":")
        if not sep:
            continue
        if key == "instance_prompt" and not line[:1].isspace():
            words += [w for w in (_unquote(part) for part in value.split(",")) if w]
        elif key == "text":
            prompt = _unquote(value)
            if prompt:
                prompts.append(prompt)
    return ModelCard(
        tuple(capped(w, MAX_FIELD_CHARS) for w in words[:MAX_LIST_ITEMS]),
        tuple(capped(p, MAX_FIELD_CHARS) for p in prompts[:MAX_LIST_ITEMS]),
    )


def names_list(names: list[str] | tuple[str, ...], limit: int = MAX_LIST_ITEMS) -> str:
    """Names for a sentence: at most `limit` of them, each cut, then "and N more"; "none" for none."""
    if not names:
        return "none"
    shown = ", ".join(capped(n, MAX_FIELD_CHARS) for n in names[:limit])
    more = f" and {len(names) - limit:,} more" if len(names) > limit else ""
    return capped(shown, MAX_SENTENCE_CHARS) + more


_HTML = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}
_MARKDOWN_SPECIAL = set("\\`*_{}[]()#+-.!|~")


def markdown_text(text: object, limit: int = MAX_FIELD_CHARS) -> str:
    """File-derived text as literal Markdown: cut to `limit`, one line, every Markdown and HTML character escaped,
    so metadata shows as the words it is and never as a tag, a link or a heading."""
    flat = " ".join(capped(str(text), limit).split())
    return "".join(_HTML.get(c) or ("\\" + c if c in _MARKDOWN_SPECIAL else c) for c in flat)
