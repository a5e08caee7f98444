"""Reliability of the library: hostile LoRA and GGUF files, names that lead out of the LoRA folder, uploads, and
faults (out of memory, a load that fails halfway, a cancel) injected into a run.

After every failure the model must be as it was: the next image equals the reference bit for bit, no adapter is
half-loaded (the adapter cache, peft_config and the LoRA layers agree), every component is where the strategy keeps
it at rest, and the memory the model holds is what it held before.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import re
import resource
import shutil
import struct
import sys
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import hostile
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from helpers import tiny_model

from fluxdemo.errors import CancelledError, LoraError, ModelFileError
from fluxdemo.errors import OutOfMemoryError as FluxdemoOOM
from fluxdemo.lora import MAX_HEADER_BYTES, LoraLibrary, inspect_lora, save_upload, to_diffusers
from fluxdemo.model import loading
from fluxdemo.model.names import FluxDims
from fluxdemo.model.presets import PACKAGE_CONFIGS
from fluxdemo.pipeline import Controls, GenerateOptions, Model, compare, generate

OPTS = GenerateOptions("a red fox in the snow", seed=7, steps=2, width=16, height=16)
STRENGTH = 0.8
FUZZ_SEED = 1234
# Random mutations beside about 110 named attacks (where the known dangers are). 150 keep every kind of mutation in
# its share (about 60 bit flips, 30 splats, 30 edge numbers, ...) and reach every outcome (seed 1234: 39 of 256 files
# load, 217 are refused); 400 cost 9 s more per run for the same outcomes. bench/hostile_files.py runs 400.
FUZZ_RANDOM_CASES = 150
RSS_GROWTH_BOUND = 200 * 2**20
PYTHON_ALLOC_BOUND = 64 * 2**20  # per file, what tracemalloc sees (Python objects and numpy arrays)
OOM = "CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test)"


def pixels(images: dict) -> dict[str, np.ndarray]:
    return {role: np.asarray(image) for role, image in images.items()}


def assert_same_images(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for role in want:
        assert np.array_equal(got[role], want[role]), f"{role} image differs from the reference"


@pytest.fixture(scope="module")
def tiny_sizes(tiny_kit: Path) -> tuple[FluxDims, dict]:
    """The tiny transformer's sizes and CLIP config: what the kit's LoRAs are checked against."""
    config = json.loads((tiny_kit / "transformer" / "config.json").read_text())
    return FluxDims.from_config(config), json.loads((tiny_kit / "text_encoder" / "config.json").read_text())


@pytest.fixture
def faulty(lora_dir: Path) -> Model:
    """A fresh manager per test to inject faults into: after an out-of-memory error a manager stays on the lighter
    strategy, which would make each test start where the last one left it."""
    return tiny_model(lora_dir)


def reference(clean: Model, options: GenerateOptions, lora: str | None) -> dict[str, np.ndarray]:
    return pixels((compare(clean, options, lora, STRENGTH) if lora else generate(clean, options)).images)


def request(manager: Model, options: GenerateOptions, lora: str | None, controls: Controls = Controls()):
    if lora:
        return pixels(compare(manager, options, lora, STRENGTH, controls).images)
    return pixels(generate(manager, options, controls=controls).images)


def without_placement(state: dict) -> dict:
    return {k: v for k, v in state.items() if k != "on_device"}  # placement is checked against the strategy


# --- hostile LoRA files -------------------------------------------------------------------------------------------


@contextmanager
def no_unpickling() -> Iterator[list[str]]:
    """Every way into an unpickler raises, and is recorded (a broad except could otherwise hide the call)."""
    calls: list[str] = []

    def refuse(name: str) -> Callable:
        def guard(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called on a LoRA file")

        return guard

    class Unpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs) -> None:
            refuse("pickle.Unpickler")()

    with pytest.MonkeyPatch.context() as mp:
        for target, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads")):
            mp.setattr(target, name, refuse(f"{target.__name__}.{name}"))
        mp.setattr(pickle, "Unpickler", Unpickler)
        yield calls


def attempt(case: str, fn: Callable, *args, **kwargs) -> object:
    """fn's result, or its LoraError: a clean refusal. Any other exception is a crash, reported with its case."""
    try:
        return fn(*args, **kwargs)
    except LoraError as e:
        return e
    except Exception as e:
        raise AssertionError(f"{case}: {type(e).__name__} instead of a LoraError: {e}") from e


def test_fuzz_lora_files(tiny_kit: Path, tiny_sizes: tuple, tmp_path: Path) -> None:
    """Hundreds of mutated safetensors files through the inspector, the converter and the live loader: each gets a
    result or a LoraError in bounded memory, nothing is unpickled, and the model is unharmed. The time each file
    takes, against a good LoRA's, is bench/hostile_files.py's to measure."""
    folder = tmp_path / "loras"
    folder.mkdir()
    manager = tiny_model(folder)
    dims, clip = tiny_sizes
    peft, kohya = ((tiny_kit / "loras" / f"{n}.safetensors").read_bytes() for n in ("peft", "kohya"))
    canary = tmp_path / "unpickled"
    cases = hostile.structured_cases(peft, kohya, MAX_HEADER_BYTES, canary)
    cases += hostile.random_cases([peft, kohya], random.Random(FUZZ_SEED), FUZZ_RANDOM_CASES)
    before = pixels(generate(manager, OPTS).images)
    base_hash = hostile.base_weights_hash(manager.get("transformer"))

    outcomes = {"refused": 0, "inspected": 0, "loaded": 0}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with no_unpickling() as unpickled:
        for i, case in enumerate(cases):
            path = case.write(folder / f"case-{i:04d}.safetensors")
            # tracemalloc sees what the parsers allocate (Python objects, numpy); it would triple the cost of the
            # live load, whose tensors it cannot see anyway: those count in the peak RSS below.
            with traced() as peak:
                report = attempt(case.name, inspect_lora, path, dims, clip_config=clip)
                converted = attempt(case.name, to_diffusers, path, dims, clip)
                parsed_peak = peak()
            with manager.session():
                loaded = attempt(case.name, manager.adapters.load, path.name)
            assert parsed_peak < PYTHON_ALLOC_BOUND, f"{case.name}: {parsed_peak / 2**20:.0f} MiB allocated"
            if not isinstance(converted, LoraError):
                tensors = [*converted.transformer.values(), *converted.text_encoder.values()]
                assert hostile.finite(tensors), f"{case.name}: converted to non-finite weights"
            assert isinstance(converted, LoraError) == isinstance(loaded, LoraError), case.name
            hostile.check_consistent(manager)
            outcomes["loaded" if not isinstance(loaded, LoraError) else "refused"] += 1
            outcomes["inspected"] += not isinstance(report, LoraError)
            path.unlink()
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before

    assert unpickled == [] and not canary.exists()
    # Peak RSS is a high-water mark: within a whole suite it catches only a new peak; run alone, any growth.
    assert rss_growth < RSS_GROWTH_BOUND, f"peak RSS grew {rss_growth / 2**20:.0f} MiB"
    # Mutations must reach every outcome, or the fuzz is not exercising the loader.
    assert outcomes["loaded"] >= 20 and outcomes["refused"] >= len(cases) // 2, outcomes
    with manager.session():
        manager.adapters.deactivate()
    assert hostile.base_weights_hash(manager.get("transformer")) == base_hash
    assert_same_images(pixels(generate(manager, OPTS).images), before)


@contextmanager
def traced() -> Iterator[Callable[[], int]]:
    """tracemalloc on for the block; the function gives the most allocated at once, beyond what was held, since it
    was last called (or since the start)."""
    tracemalloc.start()
    held = [0]

    def peak() -> int:
        current, top = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        value, held[0] = top - held[0], current
        return value

    try:
        yield peak
    finally:
        tracemalloc.stop()


def test_header_limits_are_enforced_before_reading(tmp_path: Path) -> None:
    """A header length over the limit, on a file really that large (sparse), is refused without reading it."""
    case = hostile.Case("over", struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{", size=MAX_HEADER_BYTES + 64)
    path = case.write(tmp_path / "big.safetensors")
    with traced() as peak:
        with pytest.raises(LoraError, match=rf"header is {MAX_HEADER_BYTES + 1} bytes, over the {MAX_HEADER_BYTES}"):
            inspect_lora(path)
        assert peak() < 2**20


def test_hostile_gguf_files_are_refused_before_allocation(tiny_kit: Path, tmp_path: Path) -> None:
    """GGUF headers with huge counts, dims, string lengths, unknown types and far offsets: a ModelFileError (or, for
    a flip the format cannot detect, a model) in bounded memory, never another exception."""
    loaders = {
        "flux1-tiny-Q8_0.gguf": loading.load_transformer,
        "t5-v1_1-tiny-encoder-Q8_0.gguf": loading.load_t5,
    }
    rng = random.Random(FUZZ_SEED)
    for filename, load in loaders.items():
        load(tiny_kit / "gguf" / filename, tiny_kit, torch.float32)  # warm: imports and caches are not the file's
        refused = 0
        with traced() as peak:
            for i, case in enumerate(hostile.gguf_cases(tiny_kit / "gguf" / filename, rng, flips=15)):
                path = case.write(tmp_path / f"{i:03d}-{filename}")
                peak()
                try:
                    load(path, tiny_kit, torch.float32)
                except ModelFileError as e:
                    assert str(e).startswith(path.name), str(e)
                    refused += 1
                growth = peak()
                assert growth < 32 * 2**20, f"{filename} {case.name}: {growth / 2**20:.0f} MiB before refusing"
        assert refused >= 20, f"{filename}: only {refused} refused"


# --- names and paths ----------------------------------------------------------------------------------------------


@contextmanager
def opened_files() -> Iterator[list[str]]:
    """Every file the process opens meanwhile (Python's audit events; hooks cannot be removed, so it goes quiet)."""
    seen: list[str] = []
    active = [True]

    def hook(event: str, args: tuple) -> None:
        if active[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            seen.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)
    try:
        yield seen
    finally:
        active[0] = False


@pytest.fixture
def escape_folder(tmp_path: Path, tiny_kit: Path) -> Path:
    """A LoRA folder with links leading out of it (to a valid LoRA and to a pickle) and a pickle inside."""
    folder, outside = tmp_path / "loras", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    shutil.copy(tiny_kit / "loras" / "peft.safetensors", folder / "peft.safetensors")
    shutil.copy(tiny_kit / "loras" / "peft.safetensors", outside / "secret.safetensors")
    (outside / "evil.ckpt").write_bytes(hostile.malicious_pickle(tmp_path / "unpickled"))
    (folder / "evil.ckpt").write_bytes(hostile.malicious_pickle(tmp_path / "unpickled"))
    (folder / "link.safetensors").symlink_to(outside / "secret.safetensors")
    (folder / "passwd.safetensors").symlink_to("/etc/passwd")
    (folder / "evil-link.ckpt").symlink_to(outside / "evil.ckpt")
    (folder / "linked-dir").symlink_to(outside, target_is_directory=True)
    return folder


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "../outside/secret.safetensors",
        "/etc/passwd",
        "{outside}/secret.safetensors",
        "hf://XLabs-AI/flux-RealismLora/lora.safetensors",  # (repo ids and Hub URLs are Hub names: test_lora_hub.py)
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "..\\..\\etc\\passwd",
        "peft.safetensors\x00.txt",
        "~/secret.safetensors",
        "linked-dir/secret.safetensors",
        "link.safetensors",
        "passwd.safetensors",
        "evil.ckpt",
        "evil-link.ckpt",
        "",
    ],
)
def test_lora_names_outside_the_folder_are_refused_unopened(escape_folder: Path, tiny_sizes: tuple, name: str) -> None:
    outside = escape_folder.parent / "outside"
    name = name.replace("{outside}", str(outside))
    library = LoraLibrary(escape_folder, *tiny_sizes)
    with opened_files() as opened:
        library.refresh()
        with pytest.raises(LoraError):
            library.get(name)
    allowed = (escape_folder.resolve(), PACKAGE_CONFIGS.resolve())  # the folder's plain files, FLUX.1-dev's sizes
    # never what a link points at, never a pickle
    strays = [
        p for p in opened if not any(Path(p).resolve().is_relative_to(a) for a in allowed) or p.endswith(".ckpt")
    ]
    assert strays == []
    assert not (escape_folder.parent / "unpickled").exists()
    assert [e.name for e in library.entries if e.usable] == ["peft.safetensors"]


def test_generate_refuses_a_name_outside_and_stays_clean(faulty: Model, clean: Model) -> None:
    request(faulty, OPTS, None)
    before = hostile.rest_state(faulty)
    for name in ("../../etc/passwd", "/etc/passwd", "black-forest-labs/FLUX.1-dev"):
        with pytest.raises(LoraError):
            generate(faulty, OPTS, name, 1.0)
    assert hostile.rest_state(faulty) == before
    assert_same_images(request(faulty, OPTS, None), reference(clean, OPTS, None))
    hostile.check_consistent(faulty)


@pytest.mark.parametrize(
    "original",
    [
        "../../evil.safetensors",
        "/etc/passwd",
        "a/b\\c.safetensors",
        ".hidden.safetensors",
        "x" * 500 + ".safetensors",
        "ｆｏｏ ｂａｒ.safetensors",
        "nul\x00byte.safetensors",
        "..",
        "",
        "CON.safetensors",
        "-rf.safetensors",
    ],
)
def test_upload_names_are_sanitised_and_never_used_as_paths(tmp_path: Path, tiny_kit: Path, original: str) -> None:
    src = tmp_path / "gradio-upload" / "tmp123.safetensors"
    src.parent.mkdir()
    shutil.copy(tiny_kit / "loras" / "peft.safetensors", src)
    folder = tmp_path / "loras"
    with opened_files() as opened:
        stored = save_upload(src, folder, original)
    assert stored.parent == folder and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*\.safetensors", stored.name)
    assert len(stored.name) <= 100
    assert stored.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted([src.name, stored.name])
    allowed = {src.resolve(), folder.resolve()}
    # /proc/self/status: the umask, read without changing it (fluxdemo.files), so the file gets the user's mode
    assert all(Path(p).resolve() in allowed or Path(p).resolve().parent == folder.resolve()
               for p in opened if p != "/proc/self/status"), opened  # fmt: skip


def test_upload_refuses_big_files_and_pickles_without_storing_anything(tmp_path: Path, tiny_kit: Path) -> None:
    folder = tmp_path / "loras"
    src = tmp_path / "up.safetensors"
    shutil.copy(tiny_kit / "loras" / "peft.safetensors", src)
    with pytest.raises(LoraError, match=r"uploads are limited to"):
        save_upload(src, folder, "big.safetensors", max_bytes=src.stat().st_size - 1)
    canary = tmp_path / "unpickled"
    for data in (hostile.malicious_pickle(canary), hostile.torch_zip(), b"GGUF" + b"\0" * 32):
        src.write_bytes(data)
        with pytest.raises(LoraError):
            save_upload(src, folder, "lora.safetensors")
    assert not canary.exists()
    assert not folder.exists() or list(folder.iterdir()) == []  # no temp file left behind either


# --- faults --------------------------------------------------------------------------------------------------------


def failing(original: Callable, error: Exception, *, after: int = 0, times: int | None = 1) -> Callable:
    """`original`, except that calls after the first `after` raise `error`, `times` times (None: always)."""
    calls = {"n": 0, "raised": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after and (times is None or calls["raised"] < times):
            calls["raised"] += 1
            raise error
        return original(*args, **kwargs)

    wrapper.calls = calls
    return wrapper


def attach_then_fail(original: Callable, error: Exception) -> Callable:
    """Attach the adapter for real, then fail: a load that breaks halfway."""

    def wrapper(*args, **kwargs):
        original(*args, **kwargs)
        raise error

    return wrapper


# where -> (component, its attribute that fails, the LoRA of the request, `failing` arguments)
FAULTS = {
    "encode t5": ("text_encoder_2", "forward", "peft.safetensors", {}),
    "encode clip": ("text_encoder", "forward", "kohya.safetensors", {}),
    "denoise (step 2)": ("transformer", "forward", "peft.safetensors", {"after": 1}),
    "decode": ("vae", "decode", "peft.safetensors", {}),
}


@pytest.mark.parametrize("times", [1, None], ids=["once", "always"])
@pytest.mark.parametrize("where", list(FAULTS))
def test_out_of_memory_in_a_stage(faulty, clean, monkeypatch, where, times) -> None:
    component, attribute, lora, how = FAULTS[where]
    options = dataclasses.replace(OPTS, prompt=f"{OPTS.prompt}, {where} {times}")
    want = reference(clean, options, lora)
    request(faulty, OPTS, lora)  # warm: the LoRA is loaded, the components are in place
    before = hostile.rest_state(faulty)
    module = faulty.get(component)
    fault = failing(getattr(module, attribute), torch.OutOfMemoryError(OOM), times=times, **how)
    monkeypatch.setattr(module, attribute, fault)
    if times == 1:
        # the manager frees the device and runs the stage again on a lighter strategy: the same image
        assert_same_images(request(faulty, options, lora), want)
    else:
        with pytest.raises(FluxdemoOOM, match=f"in the {where.split()[0]} stage"):  # a sentence naming the stage
            request(faulty, options, lora)
    monkeypatch.undo()
    assert fault.calls["raised"] == (1 if times == 1 else 2), "one retry, no more"
    assert without_placement(hostile.rest_state(faulty)) == without_placement(before)
    hostile.check_consistent(faulty)
    assert_same_images(request(faulty, options, lora), want)
    hostile.check_consistent(faulty)


@pytest.mark.parametrize(
    ("lora", "where"), [("comfy.safetensors", "transformer"), ("kohya.safetensors", "text encoder")]
)
def test_lora_load_failing_halfway_leaves_nothing(faulty, clean, monkeypatch, lora, where) -> None:
    """The transformer's adapter is attached, then the load fails (out of memory there, or in the CLIP part)."""
    want = reference(clean, OPTS, lora)
    request(faulty, OPTS, None)
    before = hostile.rest_state(faulty)
    if where == "transformer":  # out of memory every time: the retry on a lighter strategy fails too
        transformer = faulty.get("transformer")
        oom = attach_then_fail(transformer.load_lora_adapter, torch.OutOfMemoryError(OOM))
        monkeypatch.setattr(transformer, "load_lora_adapter", oom)
        expected: type[Exception] = FluxdemoOOM
    else:
        clip_fails = failing(lambda **kw: None, RuntimeError("CLIP adapter failed (injected by the test)"))
        monkeypatch.setattr(FluxPipeline, "load_lora_into_text_encoder", clip_fails)
        expected = RuntimeError
    with pytest.raises(expected):
        compare(faulty, OPTS, lora, STRENGTH)
    monkeypatch.undo()
    assert without_placement(hostile.rest_state(faulty)) == without_placement(before)
    hostile.check_consistent(faulty)
    assert_same_images(request(faulty, OPTS, lora), want)
    hostile.check_consistent(faulty)


@pytest.mark.parametrize(("lora", "stage"), [(None, "baseline"), ("kohya.safetensors", "lora")])
def test_cancel_mid_run(faulty, clean, lora, stage) -> None:
    """Cancelled after the first step of an image (for a compare, of the LoRA image, with the LoRA active)."""
    want = reference(clean, OPTS, lora)
    request(faulty, OPTS, lora)
    before = hostile.rest_state(faulty)
    seen: list[tuple[str, int]] = []
    controls = Controls(
        progress=lambda label, done, total: seen.append((label, done)), cancelled=lambda: (stage, 1) in seen
    )
    with pytest.raises(CancelledError, match=rf"Cancelled during the {stage} image, after step 1 of 2"):
        request(faulty, OPTS, lora, controls)
    assert hostile.rest_state(faulty) == before
    hostile.check_consistent(faulty)
    assert_same_images(request(faulty, OPTS, lora), want)
    assert_same_images(request(faulty, OPTS, None), reference(clean, OPTS, None))  # the LoRA is off again
