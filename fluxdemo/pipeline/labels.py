"""Text in pictures: the labels of grids and side-by-side pairs, in any script the shipped fonts cover.

A label holds what visitors typed (a prompt, a LoRA's file name), so it may mix Latin, Greek, Cyrillic, Chinese,
Japanese and Korean. Pillow draws a character its font lacks as the font's .notdef box and has no font fallback
(python-pillow/Pillow#6926 was never merged), so a label is split into runs, each drawn in the first shipped font
that has its characters (fonts/README.md says what each covers). Every step is linear in the label's length.
"""

from __future__ import annotations

import functools
import itertools
import logging
from pathlib import Path

from fontTools.ttLib import TTFont
from PIL import ImageDraw, ImageFont

logger = logging.getLogger(__name__)

LABEL_FONT_SIZE = 14
FONTS = Path(__file__).with_name("fonts")
# Noto Sans hinted for Latin (crisp at 14 px), Noto Sans for Greek, Cyrillic and more Latin, Noto Sans CJK
FONT_FILES = tuple(FONTS / name for name in (
    "NotoSans-Regular-Latin.ttf", "NotoSans-Regular-Extended.ttf", "NotoSansCJK-Regular-Subset.otf"))  # fmt: skip
ELLIPSIS = "…"
MAX_LOGGED = 8  # characters without a glyph logged per label: a visitor's prompt must not flood the log


@functools.cache
def _coverage(path: Path) -> frozenset[int]:
    """The codepoints the font maps to a glyph (its cmap), read once per process."""
    with TTFont(path, lazy=True) as font:
        return frozenset(font.getBestCmap())


def label_fonts(size: int = LABEL_FONT_SIZE) -> tuple[ImageFont.FreeTypeFont, ...]:
    """The shipped fonts at `size`, in the order a character is looked up: the same objects at each call."""
    return _fonts_at(size)


@functools.cache  # one set per size, shared by threads: the GIL serialises each FreeType face's use
def _fonts_at(size: int) -> tuple[ImageFont.FreeTypeFont, ...]:
    return tuple(ImageFont.truetype(path, size) for path in FONT_FILES)


def runs(text: str, size: int = LABEL_FONT_SIZE) -> list[tuple[str, ImageFont.FreeTypeFont]]:
    """The text cut into runs of one font each: every character goes to the first font that has it.

    A character no font has stays in the first font: it draws as that font's box (draw_label logs it).
    """
    fonts = label_fonts(size)
    return [("".join(c for c, _ in group), fonts[i]) for i, group in itertools.groupby(
        ((c, _font_of(c)) for c in text), key=lambda pair: pair[1] or 0)]  # fmt: skip


def _font_of(character: str) -> int | None:
    """The index in FONT_FILES of the first font that has the character, None when none has it."""
    return next((i for i, path in enumerate(FONT_FILES) if ord(character) in _coverage(path)), None)


def text_length(text: str, size: int = LABEL_FONT_SIZE) -> float:
    """The label's width in pixels, as draw_label draws it."""
    return sum(font.getlength(run) for run, font in runs(text, size))


def draw_label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill, anchor: str = "lm",
               size: int = LABEL_FONT_SIZE) -> None:  # fmt: skip
    """Draw `text` with its left ("lm") or centre ("mm") at x, its middle at y, each run in its own font.

    The runs share one baseline, placed where the first font puts it for a middle anchor, so a label of one run is
    drawn exactly as draw.text(..., anchor=anchor) draws it.
    """
    if anchor not in ("lm", "mm"):
        raise ValueError(f"draw_label takes the anchors 'lm' and 'mm', not {anchor!r}")
    missing = sorted({c for c in text if _font_of(c) is None})
    for character in missing[:MAX_LOGGED]:
        _warn_missing(character)
    parts, first = runs(text, size), label_fonts(size)[0]
    if all(font is first for _, font in parts):
        draw.text(xy, text, fill=fill, font=first, anchor=anchor)
        return
    x, y = xy
    if anchor == "mm":
        x -= sum(font.getlength(run) for run, font in parts) / 2
    ascent, descent = first.getmetrics()
    baseline = y + (ascent - descent) / 2  # Pillow's "m": halfway between ascender and descender
    for run, font in parts:
        draw.text((x, baseline), run, fill=fill, font=font, anchor="ls")
        x += font.getlength(run)


def fit(text: str, width: float, size: int = LABEL_FONT_SIZE) -> str:
    """The text, or its longest start that fits `width` pixels with an ellipsis after it.

    Widths grow with the length of the start, so a binary search finds the cut in O(n log n), where cutting one
    character at a time measured the label n times (quadratic in a long prompt).
    """
    if text_length(text, size) <= width:
        return text
    low, high = 0, len(text)  # text[:low] + "…" fits (or low is 0); text[:high] + "…" does not
    while high - low > 1:
        middle = (low + high) // 2
        if text_length(text[:middle] + ELLIPSIS, size) <= width:
            low = middle
        else:
            high = middle
    return text[:low] + ELLIPSIS


@functools.lru_cache(maxsize=256)  # bounded: labels come from visitors
def _warn_missing(character: str) -> None:
    logger.warning(
        "The label fonts have no glyph for %r (U+%04X); it is drawn as a box. fluxdemo/pipeline/fonts/README.md "
        "says which scripts the shipped fonts cover.",
        character,
        ord(character),
    )
