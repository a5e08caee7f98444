"""A session's history: what tells two results apart, the cap, and when the screen no longer matches the controls."""

from dataclasses import replace

from fluxdemo.pipeline.png_settings import ImageParams
from fluxdemo.studio.history import MAX_HISTORY, add, entry_of, find, slider_label, stale_note

BASE = ImageParams("a cat", 1, 12, 3.5, 256, 256, "tiny", "Q8_0")
STYLE = ImageParams("a cat", 1, 12, 3.5, 256, 256, "tiny", "Q8_0", loras=(("style.safetensors", "ab" * 32, 0.8),))


def test_differences_name_what_changed_and_only_that():
    history = add([], "compare", [("baseline", "/x/b.png", BASE), ("lora", "/x/l.png", STYLE)])
    other = ImageParams("a dog", 2, 12, 3.5, 256, 384, "tiny", "Q8_0", loras=(("style.safetensors", None, 0.5),))
    history = add(history, "generate", [("lora", "/y/l.png", other)])
    a, b = history[1], history[2]
    assert (a.number, a.run, b.number, b.run) == (2, 1, 3, 2)
    assert a.title == "#2 · run 1 · style:0.8 · seed 1"
    assert find(history, a.title) is a and find(history, "#9") is None
    assert slider_label(a, b) == (
        "left #2: style:0.8 · right #3: style:0.5 — LoRAs: style:0.8 → style:0.5; seed: 1 → 2; "
        "size: 256×256 → 256×384; prompt: 'a cat' → 'a dog'"
    )
    assert slider_label(history[0], history[0]).endswith("— nothing: the same settings")


def test_the_history_keeps_the_newest_and_numbers_on():
    history = []
    for run in range(MAX_HISTORY):
        base, style = replace(BASE, seed=run), replace(STYLE, seed=run)
        history = add(history, "compare", [("baseline", f"/r{run}/b.png", base), ("lora", f"/r{run}/l.png", style)])
    assert len(history) == MAX_HISTORY
    assert history[0].number == MAX_HISTORY + 1 and history[-1].number == 2 * MAX_HISTORY


def test_an_image_made_alike_is_kept_once():
    """A compare's baseline again, and a grid's strength-0 cells of two rows: the first entry stands for them."""
    history = add([], "compare", [("baseline", "/a/b.png", BASE), ("lora", "/a/l.png", STYLE)])
    history = add(history, "compare", [("baseline", "/b/b.png", BASE), ("lora", "/b/l.png", replace(STYLE, seed=2))])
    zero = [("other.safetensors", None, 0.0)]
    cells = [("p1 seed 1 row 1 x0", "/c/1.png", replace(STYLE, loras=(("style.safetensors", None, 0.0),))),
             ("p1 seed 1 row 2 x0", "/c/2.png", replace(BASE, loras=tuple(zero)))]  # fmt: skip
    history = add(history, "grid", cells)
    assert [(e.number, e.run, e.path) for e in history] == [(1, 1, "/a/b.png"), (2, 1, "/a/l.png"), (3, 2, "/b/l.png")]
    assert entry_of(history, BASE).path == "/a/b.png" and entry_of(history, replace(BASE, seed=9)) is None


def test_a_result_is_stale_once_the_controls_describe_another():
    assert stale_note(STYLE, STYLE) == "" and stale_note(None, STYLE) == ""
    note = stale_note(STYLE, BASE)
    assert note.startswith("**The result on screen belongs to other settings** (LoRAs: style:0.8 → base model)")
