"""Experiments: LoRA stacks equal the hand merge of their LoRAs, reuse is exact and bounded, grids equal their cells
made one by one, and every stage is seen (progress, previews, the timeline)."""

from __future__ import annotations

import json
import os
import shutil

import lora_factory as lf
import numpy as np
import pytest
import torch
from helpers import tiny_model
from lora_factory import TINY
from PIL import Image

from fluxdemo.cli import main as cli_main
from fluxdemo.errors import LoraError, OptionsError
from fluxdemo.model.manager import STRATEGIES
from fluxdemo.model.tiny_loras import canonical_pairs, write_lora
from fluxdemo.pipeline import (
    Controls,
    GenerateOptions,
    LoraChoice,
    LoraUse,
    Model,
    ResultsCache,
    RunReport,
    compare,
    generate,
    grid,
    grid_pictures,
    parse_lora,
    parse_stack,
    sweep,
)
from fluxdemo.pipeline.png_settings import read_params

OPTS = GenerateOptions("a lighthouse at dusk", seed=5, steps=3, width=32, height=32)


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def fresh(folder, strategy: str = "resident") -> Model:
    return tiny_model(folder, strategy=strategy)


def names(report: RunReport) -> list[str]:
    return [s.name for s in report.timeline]


# --- parsing --------------------------------------------------------------------------------------------------------


def test_stacks_parse_like_a1111_and_keep_colons_in_names():
    assert parse_lora("style.safetensors:0.8") == LoraChoice("style.safetensors", 0.8)
    assert parse_lora("style", 0.6) == LoraChoice("style", 0.6)
    assert parse_lora("https://hf.co/a/b") == LoraChoice("https://hf.co/a/b", 1.0)
    assert parse_stack("a:0.8+b", 0.5) == (LoraChoice("a", 0.8), LoraChoice("b", 0.5))
    with pytest.raises(OptionsError, match=r"names no LoRA: write NAME, NAME:STRENGTH"):
        parse_stack(" + ")


# --- stacks ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack_folder(tmp_path_factory):
    """Two transformer-only LoRAs in the PEFT layout, strong enough to move a 32x32 picture, and their pairs."""
    folder = tmp_path_factory.mktemp("stack-loras")
    pairs = {}
    for name, seed in (("a", 1), ("b", 2)):
        pairs[name] = canonical_pairs(TINY, rank=2, seed=seed, magnitude=6.0, alphas=(None, 1.0))
        write_lora(folder / f"{name}.safetensors", "peft", pairs[name], TINY)
    return folder, pairs


def deltas(pairs, strength: float) -> dict[str, torch.Tensor]:
    out = {}
    for module, p in pairs.items():
        scale = 1.0 if p.alpha is None else p.alpha / p.down.shape[0]
        out[module] = strength * scale * (p.up @ p.down)
    return out


def test_a_stack_of_two_is_the_hand_merge_of_both(stack_folder):
    folder, pairs = stack_folder
    manager = fresh(folder)
    both = pixels(generate(manager, OPTS, "a.safetensors:0.8+b.safetensors:0.5").images["lora"])
    only_a = pixels(generate(manager, OPTS, "a.safetensors", 0.8).images["lora"])
    only_b = pixels(generate(manager, OPTS, "b.safetensors", 0.5).images["lora"])
    baseline = pixels(generate(manager, OPTS).images["baseline"])
    a, b = deltas(pairs["a"], 0.8), deltas(pairs["b"], 0.5)
    merged = {m: (a.get(m, 0) + b.get(m, 0), None) for m in a.keys() | b.keys()}
    reference = fresh(folder)
    generate(reference, OPTS)  # loads the transformer
    with lf.HandMerge(reference.get("transformer"), merged, 1.0):
        hand = pixels(generate(reference, OPTS).images["baseline"])
    assert np.abs(hand - baseline).mean() > 1.0  # the stack moves the picture, so the equality below means something
    assert int(np.abs(both - hand).max()) <= 1
    assert np.abs(both - only_a).mean() > 0.5 and np.abs(both - only_b).mean() > 0.5


def test_a_second_lora_at_strength_zero_is_the_first_alone(stack_folder):
    folder, _ = stack_folder
    manager = fresh(folder)
    alone = generate(manager, OPTS, "a.safetensors", 0.8)
    with_zero = generate(manager, OPTS, [("a.safetensors", 0.8), ("b.safetensors", 0.0)])
    assert np.array_equal(pixels(alone.images["lora"]), pixels(with_zero.images["lora"]))
    assert with_zero.report.images["lora"].loras == [
        LoraUse("a.safetensors", alone.report.loras[0].sha256, 0.8),
        LoraUse("b.safetensors", with_zero.report.loras[1].sha256, 0.0),
    ]


def test_a_stack_is_checked_whole_before_anything_is_applied(stack_folder):
    folder, _ = stack_folder
    manager = fresh(folder)
    with pytest.raises(OptionsError, match=r"The stack names the same LoRA twice \(a.safetensors\): give it once"):
        generate(manager, OPTS, "a.safetensors:0.5+a.safetensors:1")
    with pytest.raises(LoraError, match=r"The stack a:1 \+ missing:1 was not applied: No LoRA named 'missing'"):
        generate(manager, OPTS, "a.safetensors+missing")
    with pytest.raises(OptionsError, match=r"A LoRA strength must be a finite number between -4 and 4, but is nan"):
        generate(manager, OPTS, [("a.safetensors", float("nan"))])
    assert manager.adapters.loaded() == []  # nothing half-applied
    assert "transformer" not in manager.loaded()  # nor even the model loaded for a request that was refused


def test_png_parameters_name_every_lora_of_the_stack(stack_folder, tmp_path):
    folder, _ = stack_folder
    out = tmp_path / "out"
    code = cli_main(["compare", "--model", "tiny", "--lora-dir", str(folder), "--prompt", "a cat", "--lora", "a:0.8",
                     "--lora", "b", "--strength", "0.5", "--steps", "2", "--width", "32", "--height", "32",
                     "--out", str(out)])  # fmt: skip
    assert code == 0
    text = Image.open(out / "lora.png").text["parameters"]
    report = json.loads((out / "report.json").read_text())
    sha = {x["name"]: x["sha256"] for x in report["loras"]}
    assert text.splitlines()[0] == "a cat <lora:a:0.8> <lora:b:0.5>"
    assert f'Lora hashes: "a: {sha["a.safetensors"][:10]}, b: {sha["b.safetensors"][:10]}"' in text
    params = read_params(out / "lora.png")
    assert params.loras == (("a.safetensors", sha["a.safetensors"], 0.8), ("b.safetensors", sha["b.safetensors"], 0.5))
    assert read_params(out / "baseline.png").loras == ()


# --- reuse ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_new_strength_reuses_the_baseline_bit_for_bit(tiny_kit, strategy):
    manager = fresh(tiny_kit / "loras", strategy)
    cache = ResultsCache()
    first = compare(manager, OPTS, "peft.safetensors", 1.0, cache=cache)
    second = compare(manager, OPTS, "peft.safetensors", 0.5, cache=cache)
    assert second.report.reused == ["encode", "baseline"]
    assert "baseline (cached)" in names(second.report)
    assert not any(n.startswith("baseline step") for n in names(second.report))
    assert names(second.report).count("encode (cached)") == 1
    assert np.array_equal(pixels(first.images["baseline"]), pixels(second.images["baseline"]))
    alone = fresh(tiny_kit / "loras", strategy)  # a fresh run makes the same pixels the cache returned
    assert np.array_equal(pixels(generate(alone, OPTS, "peft.safetensors", 0.5).images["lora"]),
                          pixels(second.images["lora"]))  # fmt: skip
    again = compare(manager, OPTS, "peft.safetensors", 0.5, cache=cache)
    assert again.report.reused == ["baseline", "lora"] and not any(" step " in n for n in names(again.report))
    mixed = compare(manager, OPTS, "peft.safetensors", 0.5, batch=2)  # one pass, an adapter per sample
    assert mixed.report.batches == [["baseline", "lora"]]
    for label in ("baseline", "lora"):
        assert np.abs(pixels(mixed.images[label]) - pixels(second.images[label])).max() <= 1, label
    # The cache holds PIL images in RAM; the components are where the strategy keeps them between requests.
    kept = {"resident": {"text_encoder", "text_encoder_2", "transformer", "vae"}}.get(strategy, set())
    assert set(manager.on_device_now()) == kept
    assert all(isinstance(image, Image.Image) for image in cache._items.values())


def test_the_cache_is_bounded_and_forgets_a_lora_changed_on_disk(tiny_kit, tmp_path):
    folder = tmp_path / "loras"
    shutil.copytree(tiny_kit / "loras", folder)
    manager = fresh(folder)
    cache = ResultsCache(max_images=3)
    compare(manager, OPTS, "peft.safetensors", 1.0, cache=cache)
    compare(manager, OPTS, "peft.safetensors", 0.5, cache=cache)
    assert len(cache) == 3
    generate(manager, OPTS, "xlabs.safetensors", 1.0, cache=cache)
    assert len(cache) == 3  # least recently used out: the strength-1 image
    assert compare(manager, OPTS, "peft.safetensors", 1.0, cache=cache).report.reused == ["encode", "baseline"]
    # Same name, other bytes: what the old file made is forgotten, and the new file is what runs.
    shutil.copy(folder / "comfy.safetensors", folder / "peft.safetensors")
    os.utime(folder / "peft.safetensors", ns=(1, 1))
    changed = generate(manager, OPTS, "peft.safetensors", 0.5, cache=cache)
    assert changed.report.reused == ["encode"]
    comfy = generate(fresh(tiny_kit / "loras"), OPTS, "comfy.safetensors", 0.5)
    assert np.array_equal(pixels(changed.images["lora"]), pixels(comfy.images["lora"]))


def test_a_clip_lora_encodes_clip_again_but_not_t5(manager):
    options = GenerateOptions("a clip-only change", seed=2, steps=2, width=32, height=32)
    result = compare(manager, options, "kohya.safetensors")
    assert result.report.text_encoder_lora is True
    assert names(result.report).count("encode clip") == 2 and names(result.report).count("encode t5") == 1


# --- grids ----------------------------------------------------------------------------------------------------------


def test_a_grid_of_two_loras_three_strengths_two_seeds_equals_its_cells(manager, tmp_path):
    options = GenerateOptions("grid", steps=2, width=32, height=32)
    seen = []
    result = grid(manager, options, ["a fox"], [1, 2], ["peft.safetensors", "xlabs.safetensors:0.5"], [0, 0.5, 1],
                  Controls(on_image=lambda i, n, label: seen.append((i, n))))  # fmt: skip
    cells = result.report.cells
    assert len(cells) == len(result.images) == 12
    assert seen == [(i, 10) for i in range(1, 11)]  # 12 cells, the two strength-0 columns of a seed one baseline
    for cell in cells:
        stack = [(x.name, x.strength) for x in cell.loras]
        one = generate(manager, GenerateOptions(cell.prompt, seed=cell.seed, steps=2, width=32, height=32),
                       stack)  # fmt: skip
        assert np.array_equal(pixels(result.images[cell.label]), pixels(next(iter(one.images.values()))))
        if cell.strength == 0:  # the strength-0 cells are the base model's picture
            base = generate(manager, GenerateOptions(cell.prompt, seed=cell.seed, steps=2, width=32, height=32))
            assert np.array_equal(pixels(result.images[cell.label]), pixels(base.images["baseline"]))
    assert cells[4].loras == [LoraChoice("xlabs.safetensors", 0.25)] and cells[4].strength == 0.5
    pictures = grid_pictures(result)
    assert [(p, s) for p, s, _ in pictures] == [("a fox", 1), ("a fox", 2)]
    # 3 columns and 2 rows of 32-pixel cells with 4-pixel gaps, under the title, the columns' title and their labels
    width, height = pictures[0][2].size
    assert width > 3 * 36 and height == 3 * 24 + 2 * 36


def test_the_grid_cli_writes_labelled_grids_cells_and_a_report(tiny_kit, tmp_path):
    out = tmp_path / "grid"
    code = cli_main(["grid", "--model", "tiny", "--prompt", "a cat", "--seeds", "1,2", "--lora", "peft",
                     "--lora", "kohya:0.8+comfy:0.5", "--strengths", "0,1", "--steps", "2", "--width", "32",
                     "--height", "32", "--out", str(out)])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-p1-seed1.png", "grid-p1-seed2.png"]
    assert len(report["cells"]) == 8 and len(list(out.glob("cell-*.png"))) == 8
    cell = next(c for c in report["cells"] if c["row"] == 1 and c["strength"] == 1 and c["seed"] == 2)
    assert cell["loras"] == [{"name": "kohya.safetensors", "strength": 0.8},
                             {"name": "comfy.safetensors", "strength": 0.5}]  # fmt: skip
    assert cell["file"] == "cell-p1-seed2-row2-x1.png"
    assert Image.open(out / cell["file"]).text["parameters"].startswith("a cat <lora:kohya:0.8> <lora:comfy:0.5>")
    assert 'Grid rows: "peft:1 | kohya:0.8 + comfy:0.5"' in Image.open(out / "grid-p1-seed1.png").text["parameters"]


# --- seeing the work ------------------------------------------------------------------------------------------------


def test_previews_come_every_few_steps_at_an_eighth_of_the_size(manager):
    options = GenerateOptions("previews", seed=1, steps=4, width=64, height=48)
    previews = []
    controls = Controls(preview=lambda label, step, image: previews.append((label, step, image.size)),
                        preview_every=2)  # fmt: skip
    sweep(manager, options, "peft.safetensors", [0.5, 1.0], controls)
    assert previews == [(f"strength {s}", step, (8, 6)) for s in ("0.5", "1") for step in (2, 4)]


def test_a_batched_grid_is_within_one_level_of_one_cell_at_a_time(manager):
    """Seeds of one row and column share a transformer pass; each cell stays within 1/255 of its own generate, the
    report says so in the timeline, and the strength-0 column is the baseline within the same bound."""
    options = GenerateOptions("batched", steps=2, width=32, height=32)
    seen = []
    result = grid(manager, options, ["a fox", "a hen"], [1, 2], ["peft.safetensors"], [0, 1],
                  Controls(on_image=lambda i, n, label: seen.append((i, n))), batch=4)  # fmt: skip
    assert seen == [(1, 8), (5, 8)]  # two passes of four: the strength-0 cells, then the strength-1 cells
    assert sum(n.startswith("denoise ") for n in names(result.report)) == 2
    for cell in result.report.cells:
        one = generate(manager, GenerateOptions(cell.prompt, seed=cell.seed, steps=2, width=32, height=32),
                       [(x.name, x.strength) for x in cell.loras])  # fmt: skip
        worst = np.abs(pixels(result.images[cell.label]) - pixels(next(iter(one.images.values())))).max()
        assert worst <= 1, (cell.label, worst)
    with pytest.raises(OptionsError, match=r"`batch` must be a whole number from 1 to 8, but is 9"):
        grid(manager, options, ["a fox"], [1], ["peft.safetensors"], [1], batch=9)


def test_a_grid_column_shares_a_pass_with_one_adapter_per_sample(manager):
    """PEFT's mixed batches: the baseline and one LoRA per sample in one transformer pass, each LoRA at one strength
    a pass (kohya's CLIP part through its own prompt embedding); a stack of two runs only with its own stack. Every
    cell stays within 1/255 of its own generate, and the LoRA cells differ from the baseline, so each sample really
    ran its own adapter."""
    options = GenerateOptions("a fox", seed=3, steps=2, width=32, height=32)
    result = grid(manager, options, ["a fox"], [3], ["peft.safetensors", "kohya.safetensors"], [0, 0.5, 1], batch=4)
    assert result.report.batches == [["p1 seed 3 row 1 x0", "p1 seed 3 row 1 x0.5", "p1 seed 3 row 2 x0.5"],
                                        ["p1 seed 3 row 1 x1", "p1 seed 3 row 2 x1"]]  # fmt: skip
    alone = {}
    for cell in result.report.cells:
        one = generate(manager, options, [(x.name, x.strength) for x in cell.loras])
        alone[cell.label] = pixels(next(iter(one.images.values())))
        image = pixels(result.images[cell.label])
        assert np.abs(image - alone[cell.label]).max() <= 1, cell.label
        assert cell.strength == 0 or np.abs(image - alone["p1 seed 3 row 1 x0"]).mean() > 1.0, cell.label
    stacked = grid(manager, options, ["a fox"], [3], ["peft.safetensors+kohya.safetensors", "comfy.safetensors"],
                   [0, 1], batch=4)  # fmt: skip
    assert stacked.report.batches == [["p1 seed 3 row 1 x0", "p1 seed 3 row 2 x1"], ["p1 seed 3 row 1 x1"]]
    pair = compare(manager, options, "peft.safetensors", 0.5, batch=2)
    assert pair.report.batches == [["baseline", "lora"]]
    for label, cell in (("baseline", "p1 seed 3 row 1 x0"), ("lora", "p1 seed 3 row 1 x0.5")):
        assert np.abs(pixels(pair.images[label]) - alone[cell]).max() <= 1, label
