"""The CLI as a user runs it: its main(argv) in this process (what it prints, its exit code), and a separate
process where the process itself is the point: the entry point, an exit code, seeds that reproduce across processes,
the terminal's log."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import START_S, Done, library_log_levels_kept
from huggingface_hub import constants
from PIL import Image

from fluxdemo.cli import COMPARE_FILES, main
from fluxdemo.pipeline.png_settings import read_params

ARGS = ["--model", "tiny", "--prompt", "a cat", "--seed", "42", "--steps", "3", "--width", "64", "--height", "64"]


def run(*args: str, cache: Path) -> subprocess.CompletedProcess:
    """`python -m fluxdemo ...` in a process of its own, offline."""
    env = {**os.environ, "FLUXDEMO_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "fluxdemo", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=START_S)  # timeout: a hang guard


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.fixture(scope="module")
def compared(tmp_path_factory, fluxdemo_cache, tiny_kit, kit_lora) -> tuple[Path, Path]:
    """The same compare twice: in a process of its own, and in this one (after other work here, as a server's is)."""
    first, second = tmp_path_factory.mktemp("a") / "out", tmp_path_factory.mktemp("b") / "out"
    done = run("compare", *ARGS, "--lora", kit_lora, "--strength", "1", "--out", str(first), cache=fluxdemo_cache)
    assert done.returncode == 0, done.stderr
    with pytest.MonkeyPatch.context() as mp, library_log_levels_kept():
        mp.setenv("HF_HUB_OFFLINE", "1")
        assert main(["compare", *ARGS, "--lora", kit_lora, "--strength", "1", "--out", str(second)]) == 0
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


def test_baseline_equals_generate_without_lora(compared, tmp_path, cli):
    out = tmp_path / "single.png"
    done = cli("generate", *ARGS, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert np.array_equal(pixels(out), pixels(compared[0] / "baseline.png"))


def test_the_report_lists_each_step_the_lora_and_the_seed(compared, kit_lora):
    out, _ = compared
    report = json.loads((out / "report.json").read_text())
    steps = [s["name"] for s in report["timeline"] if " step " in s["name"]]
    assert steps == [f"{role} step {i}/3" for role in ("baseline", "lora") for i in (1, 2, 3)]
    assert report["lora"]["name"] == kit_lora and report["strategy"] == "resident"
    assert report["options"]["seed"] == 42


def test_the_pngs_carry_their_settings_and_the_loras_hash(compared, kit_lora):
    out, _ = compared
    report = json.loads((out / "report.json").read_text())
    params = read_params(out / "lora.png")
    assert (params.prompt, params.seed, params.steps, params.model) == ("a cat", 42, 3, "tiny")
    assert params.lora_name == kit_lora and params.strength == 1.0
    assert params.lora_sha256 == report["lora"]["sha256"]
    assert read_params(out / "baseline.png").lora_name is None


def test_a_batched_compare_makes_both_images_in_one_pass(compared, tmp_path, cli, kit_lora):
    """--batch 2: baseline and LoRA image share the transformer's passes, each within 1/255 of the exact run."""
    out = tmp_path / "out"
    done = cli("compare", *ARGS, "--lora", kit_lora, "--batch", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["batches"] == [["baseline", "lora"]]
    assert [s["name"] for s in report["timeline"] if " step " in s["name"]] == [
        f"baseline (+1) step {i}/3" for i in (1, 2, 3)
    ]
    for name in ("baseline.png", "lora.png"):
        assert np.abs(pixels(out / name) - pixels(compared[0] / name)).max() <= 1, name


def test_existing_output_is_not_overwritten(compared, cli, kit_lora):
    out, _ = compared
    before = (out / "lora.png").read_bytes()
    done = cli("compare", *ARGS, "--lora", kit_lora, "--out", str(out))
    assert done.returncode == 2
    files = "baseline.png, lora.png, side_by_side.png, report.json"
    assert done.stderr.strip().endswith(f"already holds {files}; choose another --out or pass --overwrite.")
    assert (out / "lora.png").read_bytes() == before


def test_bad_option_is_one_line_and_exit_2_from_the_process(tmp_path, fluxdemo_cache):
    done = run("generate", *ARGS, "--width", "50", "--out", str(tmp_path / "x.png"), cache=fluxdemo_cache)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: `width` must be a multiple of 16 between 16 and 2048, but is 50."
    )
    assert not (tmp_path / "x.png").exists()


def test_inspect_lora_json_of_a_fitting_lora_has_the_schema_and_exit_0(cli, tiny_kit):
    fits = cli("inspect-lora", str(tiny_kit / "loras" / "kohya.safetensors"), "--json", "--model", "tiny")
    assert fits.returncode == 0, fits.stderr
    report = json.loads(fits.stdout)
    schema = {"format", "rank", "alpha", "targets", "matched", "unmatched", "text_encoder", "base_model_hint",
              "compatible", "problems"}  # fmt: skip
    assert schema <= set(report)
    assert (report["format"], report["compatible"], report["unmatched"], report["text_encoder"]) == (
        "kohya", True, [], True,
    )  # fmt: skip


def test_inspect_lora_against_a_model_it_does_not_fit_names_the_width_and_exits_2(cli, tiny_kit):
    wrong_model = cli("inspect-lora", str(tiny_kit / "loras" / "kohya.safetensors"), "--json")  # against FLUX.1-dev
    assert wrong_model.returncode == 2
    assert json.loads(wrong_model.stdout)["problems"][0].startswith("made for a model of width 32")


def test_inspect_lora_on_a_pickle_does_not_open_it_and_exits_2(tmp_path, cli):
    pickle = tmp_path / "style.safetensors"
    pickle.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    unreadable = cli("inspect-lora", str(pickle))
    assert unreadable.returncode == 2  # a file the user can replace: exit 2, as every user error
    assert "pickle" in unreadable.stderr and "not opened" in unreadable.stderr


# -- user errors: one sentence on stderr, exit 2, no traceback (-v anywhere on the line shows it) -------------------


def user_error(done: Done | subprocess.CompletedProcess) -> str:
    """The one error line of a run that failed with a user error."""
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and done.stderr.strip().splitlines()[-1] == errors[0], done.stderr
    return errors[0]


def test_inspect_lora_on_a_missing_file(tmp_path, cli):
    missing = tmp_path / "nope.safetensors"
    done = cli("inspect-lora", str(missing))
    assert user_error(done) == (
        f"error: There is no LoRA file {missing} (nor one of that name in the LoRA folder {Path('loras').absolute()}"
        "); check the path, or name a Hub LoRA as user/repo or user/repo/file.safetensors."
    )


def test_tiny_into_a_non_empty_folder(tmp_path, cli):
    (tmp_path / "notes.txt").write_text("mine")
    done = cli("tiny", "--out", str(tmp_path))
    assert user_error(done) == f"error: {tmp_path} is not an empty folder; choose a new or empty --out for the kit."
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_unknown_lora_name(tmp_path, cli, tiny_kit):
    done = cli("compare", *ARGS, "--lora", "nosuch", "--out", str(tmp_path / "out"))
    assert user_error(done) == (
        f"error: No LoRA named 'nosuch' in the LoRA folder {tiny_kit / 'loras'}; available: comfy.safetensors, "
        "kohya.safetensors, peft.safetensors, xlabs.safetensors."
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "sentence"),
    [
        (["--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
        (["--strength", "strong"], "argument --strength: invalid float value: 'strong'"),
        (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    ],
)
def test_bad_value_on_the_command_line(args, sentence, tmp_path, cli):
    done = cli("compare", "--prompt", "a cat", "--lora", "peft", *args, "--out", str(tmp_path))
    assert user_error(done) == f"error: {sentence}; see `python -m fluxdemo compare --help`."
    assert "usage:" not in done.stderr


@pytest.mark.parametrize("before", [False, True], ids=["-v after the verb", "-v before the verb"])
def test_verbose_shows_the_traceback_then_the_sentence(before, tmp_path, cli):
    (tmp_path / "notes.txt").write_text("mine")
    line = ["tiny", "--out", str(tmp_path)]
    done = cli(*(["-v", *line] if before else [*line, "-v"]))
    assert done.returncode == 2
    assert "Traceback" in done.stderr and "OptionsError" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path} is not an empty folder")


def test_download_offline_says_how_to_get_the_files(cli, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as huggingface_hub reads HF_HUB_OFFLINE=1 at import
    done = cli("download", "--model", "dev-q4")
    assert user_error(done) == (
        "error: download fetches from the Hugging Face Hub, but offline mode is on (HF_HUB_OFFLINE=1): unset it, or "
        "run download on a machine with network and copy its Hugging Face cache (HF_HOME) here."
    )


def test_download_without_network_says_how_to_get_the_files(tmp_path, fluxdemo_cache):
    # Port 9 (discard): nothing listens there, so the "Hub" refuses the connection as an unplugged network would.
    env = {**os.environ, "FLUXDEMO_CACHE": str(fluxdemo_cache), "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path),
           "HF_ENDPOINT": "http://127.0.0.1:9"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "fluxdemo", "download", "--model", "dev-q4"], capture_output=True,
                          text=True, env=env, timeout=START_S)  # fmt: skip
    assert user_error(done) == (
        "error: download could not reach the Hugging Face Hub: check this machine's network (and HTTPS_PROXY if it "
        "needs one), or run download on a machine with network and copy its Hugging Face cache (HF_HOME) here."
    )


# -- defaults and files -----------------------------------------------------------------------------------------------


def test_tiny_model_defaults_are_small(tmp_path, cli):
    out = tmp_path / "cat.png"
    done = cli("generate", "--model", "tiny", "--prompt", "a cat", "--out", str(out))
    assert done.returncode == 0, done.stderr
    params = read_params(out)
    assert (Image.open(out).size, params.steps) == ((256, 256), 12)


def test_generate_help_gives_the_tiny_models_default_steps(cli):
    help_text = cli("generate", "--help").stdout
    assert "default 28, what FLUX.1-dev is tuned for; 12 with a tiny --model" in " ".join(help_text.split())


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)], ids=["umask 022", "umask 027"])
def test_pngs_follow_the_umask(umask, mode, tmp_path, cli, kit_lora):
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        done = cli("compare", *ARGS, "--lora", kit_lora, "--out", str(out))
    finally:
        os.umask(previous)
    assert done.returncode == 0, done.stderr
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(COMPARE_FILES, mode)


def test_uploaded_lora_follows_the_umask(tmp_path, tiny_kit):
    from fluxdemo.lora import save_upload

    previous = os.umask(0o022)
    try:
        saved = save_upload(tiny_kit / "loras" / "peft.safetensors", tmp_path / "loras", "my style.safetensors")
    finally:
        os.umask(previous)
    assert saved.stat().st_mode & 0o777 == 0o644


def test_default_log_is_quiet(tmp_path):
    """What the terminal shows: our stages only, whatever the libraries log or warn. A first run (an empty cache)
    builds the kit in the same process, so gguf's writer runs under the same terminal."""
    stacked = run("compare", *ARGS, "--lora", "peft:0.8", "--lora", "comfy:0.5", "--out", str(tmp_path / "stack"),
                  cache=tmp_path / "cache")  # fmt: skip
    assert stacked.returncode == 0, stacked.stderr
    assert "tiny kit 'tiny': built" in stacked.stderr  # the kit was built here, not taken from the session's cache
    # gguf's writer logs two lines for every file it writes ("gguf: This GGUF file is for Little Endian only", then
    # "<file>: n_tensors = ..."); our own lines name .gguf files too, so its lines are looked for, not the word.
    assert "Little Endian" not in stacked.stderr and "n_tensors" not in stacked.stderr
    assert "reusing" not in stacked.stderr  # the kit is looked up once per component: -v only
    assert "Warning" not in stacked.stderr  # PEFT warns for each adapter beside another, which is what a stack is
