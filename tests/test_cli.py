"""The CLI as a user runs it: separate processes, so seeds must reproduce across processes, not just calls."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fluxdemo.images import read_params

ARGS = ["--model", "tiny", "--prompt", "a cat", "--seed", "42", "--steps", "3", "--width", "64", "--height", "64"]


def run(*args: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLUXDEMO_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "fluxdemo", *args], capture_output=True, text=True, env=env,
                          timeout=240)  # fmt: skip


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, fluxdemo_cache, tiny_kit, kit_lora) -> tuple[Path, Path]:
    first, second = tmp_path_factory.mktemp("a") / "out", tmp_path_factory.mktemp("b") / "out"
    for out in (first, second):
        done = run("compare", *ARGS, "--lora", kit_lora, "--strength", "1", "--out", str(out), cache=fluxdemo_cache)
        assert done.returncode == 0, done.stderr
    return first, second


def test_compare_writes_the_four_files(compared):
    out, _ = compared
    assert sorted(p.name for p in out.iterdir()) == ["baseline.png", "lora.png", "report.json", "side_by_side.png"]
    assert Image.open(out / "baseline.png").size == (64, 64)
    assert np.abs(pixels(out / "baseline.png") - pixels(out / "lora.png")).mean() > 0.5


def test_compare_is_identical_across_processes(compared):
    first, second = compared
    for name in ("baseline.png", "lora.png", "side_by_side.png"):
        assert np.array_equal(pixels(first / name), pixels(second / name)), name


def test_baseline_equals_generate_without_lora(compared, tmp_path, fluxdemo_cache):
    out = tmp_path / "single.png"
    done = run("generate", *ARGS, "--out", str(out), cache=fluxdemo_cache)
    assert done.returncode == 0, done.stderr
    assert np.array_equal(pixels(out), pixels(compared[0] / "baseline.png"))


def test_report_and_png_parameters(compared, kit_lora):
    out, _ = compared
    report = json.loads((out / "report.json").read_text())
    steps = [s["name"] for s in report["timeline"] if " step " in s["name"]]
    assert steps == [f"{role} step {i}/3" for role in ("baseline", "lora") for i in (1, 2, 3)]
    assert report["lora"]["name"] == kit_lora and report["strategy"] == "resident"
    assert report["options"]["seed"] == 42
    params = read_params(out / "lora.png")
    assert (params.prompt, params.seed, params.steps, params.model) == ("a cat", 42, 3, "tiny")
    assert params.lora_name == kit_lora and params.strength == 1.0
    assert params.lora_sha256 == report["lora"]["sha256"]
    assert read_params(out / "baseline.png").lora_name is None


def test_existing_output_is_not_overwritten(compared, fluxdemo_cache, kit_lora):
    out, _ = compared
    before = (out / "lora.png").read_bytes()
    done = run("compare", *ARGS, "--lora", kit_lora, "--out", str(out), cache=fluxdemo_cache)
    assert done.returncode == 2
    files = "baseline.png, lora.png, side_by_side.png, report.json"
    assert done.stderr.strip().endswith(f"already holds {files}; choose another --out or pass --overwrite.")
    assert (out / "lora.png").read_bytes() == before


def test_bad_option_is_one_line_and_exit_2(tmp_path, fluxdemo_cache):
    done = run("generate", *ARGS, "--width", "50", "--out", str(tmp_path / "x.png"), cache=fluxdemo_cache)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: `width` must be a multiple of 16 between 16 and 2048, but is 50."
    )
    assert not (tmp_path / "x.png").exists()


def test_inspect_lora_json_schema_and_exit_codes(tmp_path, fluxdemo_cache, tiny_kit):
    lora = tiny_kit / "loras" / "kohya.safetensors"
    fits = run("inspect-lora", str(lora), "--json", "--model", "tiny", cache=fluxdemo_cache)
    assert fits.returncode == 0, fits.stderr
    report = json.loads(fits.stdout)
    schema = {"format", "rank", "alpha", "targets", "matched", "unmatched", "text_encoder", "base_model_hint",
              "compatible", "problems"}  # fmt: skip
    assert schema <= set(report)
    assert (report["format"], report["compatible"], report["unmatched"], report["text_encoder"]) == (
        "kohya", True, [], True,
    )  # fmt: skip
    wrong_model = run("inspect-lora", str(lora), "--json", cache=fluxdemo_cache)  # judged against FLUX.1-dev
    assert wrong_model.returncode == 2
    assert json.loads(wrong_model.stdout)["problems"][0].startswith("made for a model of width 32")
    pickle = tmp_path / "style.safetensors"
    pickle.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    unreadable = run("inspect-lora", str(pickle), cache=fluxdemo_cache)
    assert unreadable.returncode == 1
    assert "pickle" in unreadable.stderr and "not opened" in unreadable.stderr
