"""fluxdemo.untrusted and the readers built on it: every input a visitor or a file controls is bounded and read in
one pass (issue 16)."""

from __future__ import annotations

import io
import json
import tracemalloc
import zlib

import pytest
from PIL import Image, PngImagePlugin

from fluxdemo import untrusted
from fluxdemo.errors import FluxdemoError
from fluxdemo.lora.report import _parse_trigger_words
from fluxdemo.untrusted import MAX_PNG_TEXT_BYTES, ModelCard, markdown_text, model_card, png_text


def _png(info: PngImagePlugin.PngInfo) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (4, 4)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_png_text_reads_every_kind_of_text_chunk():
    info = PngImagePlugin.PngInfo()
    info.add_text("plain", "Latin-1 «text»")
    info.add_text("squeezed", "z" * 1000, zip=True)
    info.add_itxt("international", "雪 and snow", zip=True)
    info.add_text("other", "not asked for")
    found = png_text(_png(info), ("plain", "squeezed", "international", "absent"))
    assert found == {"plain": "Latin-1 «text»", "squeezed": "z" * 1000, "international": "雪 and snow"}


def test_png_text_never_inflates_a_text_bomb():
    """A zTXt chunk of about 100 kB that inflates to 100 MB comes back as None, with memory to spare."""
    bomb = zlib.compress(b"a" * 100 * 2**20, 9)
    chunk = b"parameters\0\0" + bomb
    png = _png(PngImagePlugin.PngInfo())
    at = png.index(b"IEND") - 4
    png = (
        png[:at]
        + len(chunk).to_bytes(4, "big")
        + b"zTXt"
        + chunk
        + zlib.crc32(b"zTXt" + chunk).to_bytes(4, "big")
        + png[at:]
    )
    tracemalloc.start()
    try:
        found = png_text(png, ("parameters",))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert found == {"parameters": None}
    assert peak < 4 * MAX_PNG_TEXT_BYTES + 2 * len(png)


def test_png_over_the_size_limit_is_refused_unread(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(_png(PngImagePlugin.PngInfo()))
    monkeypatch.setattr(untrusted, "MAX_PNG_BYTES", 10)
    with pytest.raises(FluxdemoError, match=r"^big.png is \d+ bytes; a PNG to read settings from may be at most 10 "):
        png_text(path, ("parameters",))


def test_model_card_reads_trigger_words_and_prompts():
    card = model_card('---\ninstance_prompt: "zkz, red fox"\nwidget:\n  - text: "a zkz fox"\n---\n# Title')
    assert card == ModelCard(("zkz", "red fox"), ("a zkz fox",))


def test_model_card_with_3000_newlines_of_front_matter():
    assert model_card("---" + "\n" * 3000 + "instance_prompt: zkz\n---\n") == ModelCard(("zkz",), ())


def test_model_card_without_front_matter_is_empty():
    assert model_card("instance_prompt: zkz") == ModelCard()


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ('<img src=x onerror="alert(1)">', '&lt;img src=x onerror="alert\\(1\\)"&gt;'),
        ('<a href="https://x.example">go</a>', '&lt;a href="https://x\\.example"&gt;go&lt;/a&gt;'),
        ("[x](y)", "\\[x\\]\\(y\\)"),
        ("# Heading\n## two", "\\# Heading \\#\\# two"),
        ("a & b", "a &amp; b"),
    ],
)
def test_markdown_text_escapes_tags_links_and_headings(text, shown):
    assert markdown_text(text) == shown


def test_markdown_text_is_cut_to_its_limit():
    assert markdown_text("a" * 500, limit=10) == "a" * 9 + "…"


def _tag_frequency(folders: int) -> str:
    """kohya's {folder: {tag: count}}, one tag of its own per folder plus the trigger in each."""
    return json.dumps({f"{i}_set": {"zkz": 3, f"tag{i}": 1} for i in range(folders)})


def test_tag_frequency_of_many_folders_gives_the_most_frequent_tags():
    """5,000 folders (about 200 kB): the old sum of Counters copied a growing Counter per folder."""
    text = _tag_frequency(5000)
    assert len(text) < untrusted.MAX_TAG_FREQUENCY_CHARS
    words = _parse_trigger_words({"ss_tag_frequency": text})
    assert words[0] == "zkz" and len(words) == 5


def test_tag_frequency_past_the_cap_gives_no_words():
    """A 1 MB ss_tag_frequency is not parsed at all (the old code spent about a minute on it)."""
    text = _tag_frequency(25_000)
    assert len(text) > 2**20 - 100_000
    assert _parse_trigger_words({"ss_tag_frequency": text}) == []


def test_tag_frequency_counts_at_most_max_counted_tags(monkeypatch):
    monkeypatch.setattr("fluxdemo.lora.report.MAX_COUNTED_TAGS", 3)
    text = json.dumps({"a": {"x": 1, "y": 1}, "b": {"z": 1, "late": 100}})
    assert _parse_trigger_words({"ss_tag_frequency": text}) == ["x", "y", "z"]
