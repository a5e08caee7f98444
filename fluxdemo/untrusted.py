"""The one layer for text and bytes that a visitor or a file controls: LoRA metadata, model cards, Hub listings, PNG
text, names.

Each reader here caps its input before it parses anything, and parses in one pass with string methods (no
regular expression that can backtrack), so no file or request can hold the GIL for longer than reading its bytes
takes. What reaches a page goes through `markdown_text`, so a LoRA's metadata cannot put tags or links there.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from fluxdemo.errors import FluxdemoError

MAX_CARD_BYTES = 256 * 2**10  # a model card's README.md: real ones are a few kB; the front matter is at its top
MAX_FIELD_CHARS = 200  # one trigger word, one example prompt, one name shown on a page
MAX_LIST_ITEMS = 12  # trigger words, example prompts, files named in one sentence
MAX_SENTENCE_CHARS = 600  # a list of names inside an error sentence
MAX_PNG_BYTES = 64 * 2**20  # a 2048x2048 RGB PNG is at most 12 MiB, so a larger file is not an image to read
MAX_PNG_CHUNKS = 2**14  # chunks walked before giving up: 64 MiB of IDAT in 4 kB chunks, far more than any encoder
MAX_PNG_TEXT_BYTES = 256 * 2**10  # one PNG text chunk, inflated: fluxdemo's own are under 4 kB
MAX_PARAMETERS_CHARS = 16 * 2**10  # A1111 infotext: a 2,000-character prompt, its negative and 40 settings fit
MAX_TAG_FREQUENCY_CHARS = 256 * 2**10  # kohya's ss_tag_frequency: real ones are a few kB to 100 kB
MAX_COUNTED_TAGS = 10_000  # caption tags counted from it; the trigger words are the few most frequent

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT_KINDS = (b"tEXt", b"zTXt", b"iTXt")


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
            words += [w for w in (_unquote(part) for part in _unquote(value).split(",")) if w]  # "a, b" too
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


def png_text(source: Path | str | bytes, keywords: Collection[str]) -> dict[str, str | None]:
    """The text chunks (tEXt, zTXt, iTXt) named `keywords` of a PNG file or its bytes, read without decoding a pixel:
    the walk reads chunk headers and skips every other chunk up to IEND. A text over MAX_PNG_TEXT_BYTES, compressed
    or inflated, comes back as None (never inflated whole); the last chunk of a keyword wins, as in Pillow."""
    what = "These PNG bytes" if isinstance(source, bytes) else Path(source).name
    size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
    if size > MAX_PNG_BYTES:
        raise FluxdemoError(
            f"{what} is {size:,} bytes; a PNG to read settings from may be at most {MAX_PNG_BYTES:,} bytes. "
            "Choose the PNG fluxdemo or your tool saved, not a larger file."
        )
    found: dict[str, str | None] = {}
    with io.BytesIO(source) if isinstance(source, bytes) else Path(source).open("rb") as f:
        if f.read(8) != PNG_SIGNATURE:
            raise FluxdemoError(f"{what} is not a PNG file; choose a PNG that fluxdemo or A1111/Forge saved.")
        for _ in range(MAX_PNG_CHUNKS):
            head = f.read(8)
            if len(head) < 8 or head[4:] == b"IEND":
                break
            length, kind = struct.unpack(">I4s", head)
            body = f.read(min(length, MAX_PNG_TEXT_BYTES + 1)) if kind in _PNG_TEXT_KINDS else b""
            f.seek(length - len(body) + 4, io.SEEK_CUR)  # the rest of the chunk, then its CRC
            keyword = body[:80].partition(b"\0")[0].decode("latin-1")  # PNG keywords are 1-79 Latin-1 bytes
            if keyword in keywords:
                found[keyword] = None if length > MAX_PNG_TEXT_BYTES else _chunk_text(kind, body, what)
    return found


def _chunk_text(kind: bytes, body: bytes, what: str) -> str | None:
    """One text chunk's text; None when it inflates past MAX_PNG_TEXT_BYTES."""
    rest = body.partition(b"\0")[2]
    if kind == b"tEXt":
        return rest.decode("latin-1")
    if kind == b"zTXt":
        data = _inflate(rest[1:], what)  # rest[0] is the compression method, always zlib
        return None if data is None else data.decode("latin-1")
    compressed, rest = rest[:1] == b"\1", rest[2:]  # iTXt: flag, method, language, translated keyword, text
    data = rest.split(b"\0", 2)[-1] if rest.count(b"\0") >= 2 else b""
    if compressed:
        data = _inflate(data, what)
    return None if data is None else data.decode("utf-8", errors="replace")


def _inflate(data: bytes, what: str) -> bytes | None:
    """zlib data inflated to at most MAX_PNG_TEXT_BYTES; None beyond (a small chunk can hold a huge text)."""
    try:
        out = zlib.decompressobj().decompress(data, MAX_PNG_TEXT_BYTES + 1)
    except zlib.error:
        raise FluxdemoError(
            f"{what} has a damaged compressed text chunk; save the image again from the tool that made it."
        ) from None
    return None if len(out) > MAX_PNG_TEXT_BYTES else out
