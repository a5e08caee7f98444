"""The model manager on the tiny kit: moves per strategy, identical images, the planner, out-of-memory, cancel.

The execution device is a parameter: the CPU always, CUDA and MPS where present. Faults are injected into real
modules (a forward that raises torch.OutOfMemoryError once); nothing of the model stack is mocked.
"""

from __future__ import annotations

import importlib.util
import json
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_model
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from fluxdemo.errors import CancelledError, OutOfMemoryError
from fluxdemo.model import planner
from fluxdemo.model.manager import LARGE_COMPONENTS, STRATEGIES
from fluxdemo.model.presets import PACKAGE_CONFIGS, PRESETS
from fluxdemo.pipeline import Controls, GenerateOptions, Model, compare, generate

DEVICES = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
# 16 T5 tokens instead of 512: the tiny transformer's cost is in its text tokens, and these tests are about placement.
OPTS = GenerateOptions("a red fox in the snow", seed=3, steps=2, width=32, height=32, max_sequence_length=16)
GiB = 2**30


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: handing work to a second thread costs more than it saves, and far more on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


def fresh(kit: Path, device: torch.device, strategy: str) -> Model:
    return tiny_model(kit / "loras", device=device, strategy=strategy)


_REFERENCES: dict[tuple[str, str], dict] = {}


def reference(kit: Path, device: torch.device, lora: str) -> dict[str, np.ndarray]:
    """compare()'s images from a resident manager on the device: what every strategy must reproduce exactly."""
    key = (str(device), lora)
    if key not in _REFERENCES:
        result = compare(fresh(kit, device, "resident"), OPTS, lora)
        _REFERENCES[key] = {label: pixels(image) for label, image in result.images.items()}
    return _REFERENCES[key]


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def actions(manager: Model, since: int = 0) -> list[str]:
    return [f"{m.action} {m.component}" for m in manager.moves[since:]]


# -- moves ----------------------------------------------------------------------------------------------------------
STAGES = ("text_encoder", "text_encoder_2", "transformer", "vae")
FIRST = {  # a fresh manager's first generate(): each component is read from its file on first use
    "resident": [a for c in STAGES for a in (f"load {c}", f"on {c}")],
    "model-offload": [a for c in STAGES for a in (f"load {c}", f"on {c}", f"off {c}")],
    "group-offload": [a for c in STAGES for a in (f"load {c}", f"on {c}", f"off {c}")],
    "disk": [a for c in STAGES for a in (f"load {c}", f"on {c}", ("drop " if c in LARGE_COMPONENTS else "off ") + c)],
}
FIRST["group-offload"][6:9] = ["load transformer", "stream on transformer", "stream off transformer"]
AGAIN = {  # the next generate() with a new prompt: nothing is read again, except what disk dropped
    "resident": [],
    "model-offload": FIRST["model-offload"][1:3] + FIRST["model-offload"][4:6] + ["on transformer", "off transformer",
                                                                                  "on vae", "off vae"],
    "group-offload": ["on text_encoder", "off text_encoder", "on text_encoder_2", "off text_encoder_2",
                      "stream on transformer", "stream off transformer", "on vae", "off vae"],
    "disk": ["on text_encoder", "off text_encoder"] + FIRST["disk"][3:9] + ["on vae", "off vae"],
}  # fmt: skip


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_move_log_has_the_exact_order_of_moves(tiny_kit, device, strategy):
    manager = fresh(tiny_kit, device, strategy)
    generate(manager, OPTS)
    assert actions(manager) == FIRST[strategy]
    before = len(manager.moves)
    result = generate(manager, GenerateOptions("a blue bird on a tree", steps=1, width=32, height=32,
                                               max_sequence_length=16))  # fmt: skip
    assert actions(manager, before) == AGAIN[strategy]
    assert all(m.bytes > 0 and m.seconds >= 0 for m in manager.moves)
    assert result.report.strategy == strategy and "set by flag" in result.report.memory.plan
    kept = {"resident": set(STAGES), "disk": {"text_encoder", "vae"}}.get(strategy, set(STAGES))
    assert set(manager.loaded()) == kept
    assert set(manager.on_device_now()) == (set() if strategy != "resident" else set(STAGES))


def test_model_offload_holds_at_most_one_large_component(tiny_kit, device, kit_lora):
    manager = fresh(tiny_kit, device, "model-offload")
    seen = []
    for name in LARGE_COMPONENTS:  # observed from inside each large component's own forward
        manager.get(name).register_forward_pre_hook(lambda *_: seen.append(set(manager.on_device_now())))
    compare(manager, OPTS, kit_lora)
    assert seen and all(len(on & LARGE_COMPONENTS) == 1 and len(on) == 1 for on in seen)
    on: set[str] = set()  # and at every point of the move log
    for move in manager.moves:
        if move.action in ("on", "off"):
            (on.add if move.onload else on.discard)(move.component)
            assert len(on & LARGE_COMPONENTS) <= 1


# -- images ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_images_are_identical_across_strategies(tiny_kit, device, strategy):
    lora = "kohya.safetensors"  # adapts CLIP-L too: every component carries an adapter
    manager = fresh(tiny_kit, device, strategy)
    want = reference(tiny_kit, device, lora)
    for _ in range(2):  # the second run takes the kept RAM copies, or (disk) reads and re-attaches the LoRA again
        result = compare(manager, OPTS, lora)
        assert {k: pixels(v).tobytes() for k, v in result.images.items()} == {k: v.tobytes() for k, v in want.items()}
    baseline = generate(manager, OPTS).images["baseline"]
    assert np.array_equal(pixels(baseline), want["baseline"])


# -- faults ---------------------------------------------------------------------------------------------------------
def fail(module: torch.nn.Module, method: str, monkeypatch: pytest.MonkeyPatch, times: int = 1) -> list[int]:
    """Make a real module's method raise a device out-of-memory the first `times` calls."""
    real, calls = getattr(module, method), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) <= times:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, method, failing)
    return calls


@pytest.mark.parametrize(("component", "method", "stage"), [("transformer", "forward", "denoise"),
                                                           ("vae", "decode", "decode")])  # fmt: skip
def test_out_of_memory_falls_back_and_the_retry_equals_the_reference(
    tiny_kit, device, kit_lora, monkeypatch, component, method, stage
):
    manager = fresh(tiny_kit, device, "resident")
    calls = fail(manager.get(component), method, monkeypatch)
    result = compare(manager, OPTS, kit_lora)
    assert len(calls) > 1  # failed, then ran again
    assert manager.strategy == result.report.strategy == "model-offload"
    (event,) = result.report.events
    assert event.startswith(f"Out of memory in {stage} with resident (CUDA out of memory.")
    assert event.endswith("retrying with model-offload.") and result.report.memory.events == [event]
    want = reference(tiny_kit, device, kit_lora)
    assert all(np.array_equal(pixels(result.images[k]), want[k]) for k in want)
    assert manager.on_device_now() == []
    monkeypatch.undo()
    again = compare(manager, OPTS, kit_lora)  # a later request plans no heavier than what worked
    assert again.report.strategy == "model-offload" and again.report.events == []
    assert "ran out of memory earlier" in again.report.memory.plan


def test_second_out_of_memory_is_a_clear_error_and_the_manager_stays_usable(tiny_kit, device, kit_lora, monkeypatch):
    manager = fresh(tiny_kit, device, "model-offload")
    fail(manager.get("vae"), "decode", monkeypatch, times=2)
    with pytest.raises(OutOfMemoryError) as error:
        compare(manager, OPTS, kit_lora)
    message = str(error.value)
    assert "in the decode stage at 32x32, with model-offload and again with group-offload" in message
    assert "it needs about" in message and ("GiB is free" in message or "free memory is unknown" in message)
    assert manager.on_device_now() == [] and manager.adapters.active("text_encoder") == ()
    monkeypatch.undo()
    result = compare(manager, OPTS, kit_lora)
    want = reference(tiny_kit, device, kit_lora)
    assert all(np.array_equal(pixels(result.images[k]), want[k]) for k in want)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_after_a_cancelled_run_the_next_run_equals_the_reference(tiny_kit, device, strategy):
    manager = fresh(tiny_kit, device, strategy)
    now = {}
    controls = Controls(progress=lambda label, done, total: now.update(label=label),
                        cancelled=lambda: now.get("label") == "lora")  # fmt: skip
    with pytest.raises(CancelledError):  # after the first step of the LoRA image, its adapter active
        compare(manager, OPTS, "kohya.safetensors", controls=controls)
    assert set(manager.on_device_now()) == (set() if strategy != "resident" else set(STAGES) - {"vae"})
    assert manager.adapters.active("text_encoder") == ()
    result = compare(manager, OPTS, "kohya.safetensors")  # its baseline would show a LoRA left half-applied
    want = reference(tiny_kit, device, "kohya.safetensors")
    assert all(np.array_equal(pixels(result.images[k]), want[k]) for k in want)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weights_stay_file_backed_through_every_move_on_the_cpu(tiny_kit, strategy):
    from diffusers.quantizers.gguf.utils import GGUFParameter

    from fluxdemo.model.loading import file_backed

    manager = fresh(tiny_kit, torch.device("cpu"), strategy)
    result = generate(manager, OPTS)
    want = reference(tiny_kit, torch.device("cpu"), "peft.safetensors")["baseline"]  # same seed and options
    assert np.array_equal(pixels(result.images["baseline"]), want)
    for name in ("transformer", "text_encoder_2"):
        if name not in manager.loaded():  # dropped by disk after its stage
            continue
        module = manager.get(name)
        packed = {n for n, p in module.named_parameters() if isinstance(p, GGUFParameter)}
        assert packed and packed <= set(file_backed(module.named_parameters())), f"{name} was copied into RAM"
    memory = result.report.memory
    assert memory.ram == "file-backed" and "weights in RAM file-backed" in memory.plan
    assert 0 < memory.peak_anon_rss_bytes <= memory.peak_rss_bytes
    assert 0 < memory.peak_file_rss_bytes <= memory.peak_rss_bytes


# -- the planner ----------------------------------------------------------------------------------------------------
def preset_sizes(name: str) -> dict[str, int]:
    return {c: getattr(PRESETS[name], c).approx_bytes for c in planner.STAGES}


@pytest.mark.parametrize(
    ("preset", "free_gib", "strategy"),
    [("dev-q8", 16, "model-offload"), ("dev-q8", 12, "group-offload"), ("dev-q8", 8, "group-offload"),
     ("dev-q4", 16, "resident"), ("dev-q4", 12, "model-offload"), ("dev-q4", 8, "model-offload")],
)  # fmt: skip
def test_planner_picks_the_heaviest_strategy_that_fits(preset, free_gib, strategy):
    chosen = planner.plan(free_gib * GiB, preset_sizes(preset), 1024, 1024, torch.bfloat16)
    assert chosen.strategy == strategy
    assert chosen.predicted_peak * (1 + planner.HEADROOM) <= free_gib * GiB
    assert f"{free_gib:.1f} GiB free" in chosen.reason and f"-> {strategy}" in chosen.reason
    assert chosen.predicted_peak == max(chosen.stages.values())


def test_planner_targets_for_flux_dev_at_1024():
    q8 = {s: planner.plan(100 * GiB, preset_sizes("dev-q8"), 1024, 1024, torch.bfloat16, strategy=s).predicted_peak
          for s in STRATEGIES}  # fmt: skip
    assert q8["model-offload"] <= 14e9 and q8["group-offload"] < 8e9  # the targets, as predicted
    assert q8["resident"] > q8["model-offload"] == q8["disk"] > q8["group-offload"]
    assert planner.plan(2 * GiB, preset_sizes("dev-q8"), 1024, 1024, torch.bfloat16).strategy == "group-offload"


def test_planner_on_cpu_and_short_ram():
    sizes = preset_sizes("dev-q8")
    assert planner.plan(None, sizes, 1024, 1024, torch.float32).strategy == "resident"
    assert planner.plan(None, sizes, 1024, 1024, torch.float32, ram_free=64 * GiB).strategy == "resident"
    # The GGUF weights are file-backed: 16 GB of RAM runs dev-q8 resident on the CPU, computing from the mapped files.
    short = planner.plan(None, sizes, 1024, 1024, torch.float32, ram_free=16 * GiB)
    assert (short.strategy, short.ram) == ("resident", "file-backed")
    assert short.ram_need == sizes["text_encoder"] + sizes["vae"]
    # Only when the weights that cannot be mapped (a safetensors T5, quantized with quanto) do not fit: disk.
    unmapped = planner.plan(None, sizes, 1024, 1024, torch.float32, ram_free=4 * GiB, mapped=["transformer"])
    assert unmapped.strategy == "disk" and "RAM is short" in unmapped.reason
    on_gpu = planner.plan(16 * GiB, sizes, 1024, 1024, torch.bfloat16, ram_free=12 * GiB, mapped=())
    assert on_gpu.strategy == "disk" and on_gpu.predicted_peak == on_gpu.peaks["model-offload"]
    capped = planner.plan(80 * GiB, sizes, 1024, 1024, torch.bfloat16, ceiling="model-offload")
    assert capped.strategy == "model-offload" and "resident ran out of memory earlier" in capped.reason


@pytest.mark.parametrize(
    ("free_gib", "ram_gib", "can_pin", "strategy", "ram"),
    [(16, 20, True, "model-offload", "pinned"),  # 16.9 GiB of pinned copies, 19.5 GiB with the headroom: they fit
     (16, 19, True, "model-offload", "file-backed"),  # in 19 GiB they do not
     (16, 16, True, "model-offload", "file-backed"),  # the machine: 16 GB of RAM ...
     (12, 16, True, "group-offload", "file-backed"),  # ... and a 12 GB GPU
     (12, 64, True, "group-offload", "pinned"),
     (16, 64, False, "model-offload", "file-backed"),  # a device that reads pinned RAM no faster (MPS)
     (100, 64, True, "resident", "file-backed"),  # read once from the files onto the device
     (None, 64, True, "resident", "file-backed")],  # the CPU computes from the mapped files
)  # fmt: skip
def test_planner_weighs_ram_pinned_or_file_backed(free_gib, ram_gib, can_pin, strategy, ram):
    sizes = preset_sizes("dev-q8")
    free = None if free_gib is None else free_gib * GiB
    chosen = planner.plan(free, sizes, 1024, 1024, torch.bfloat16, ram_free=ram_gib * GiB, can_pin=can_pin)
    assert (chosen.strategy, chosen.ram) == (strategy, ram)
    assert f"weights in RAM {ram}" in chosen.reason
    if ram == "pinned":  # every component copied into page-locked RAM, and that fits with the headroom
        assert chosen.ram_need == sum(sizes.values())
        assert chosen.ram_need * (1 + planner.HEADROOM) <= ram_gib * GiB
    else:  # only CLIP and the VAE (dense, from safetensors) fill anonymous RAM; under resident one at a time
        dense = (sizes["text_encoder"], sizes["vae"])
        assert chosen.ram_need == (max(dense) if strategy == "resident" and free else sum(dense))


class _FlashAttention(TorchFunctionMode):
    """scaled_dot_product_attention as a flash kernel allocates it: only the output (the CUDA path for FLUX)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            query, _, value = (list(args) + [kwargs.get(k) for k in ("query", "key", "value")][len(args) :])[:3]
            return torch.empty((*query.shape[:-1], value.shape[-1]), dtype=query.dtype, device=query.device)
        return func(*args, **kwargs)


class _PeakBytes(TorchDispatchMode):
    """Live bytes of every storage an op creates, freed when its last tensor dies: an allocator's peak, on meta."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[int]] = {}  # storage -> [bytes, tensors alive]
        self.now = self.peak = 0

    def _free(self, key: int) -> None:
        self.live[key][1] -= 1
        if self.live[key][1] == 0:
            self.now -= self.live.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage()._cdata
                if key not in self.live:
                    self.live[key] = [t.untyped_storage().nbytes(), 0]
                    self.now += self.live[key][0]
                    self.peak = max(self.peak, self.now)
                self.live[key][1] += 1
                weakref.finalize(t, self._free, key)
        return out


def traced_peak(run) -> int:
    with torch.inference_mode(), _FlashAttention(), _PeakBytes() as trace:
        run()
    return trace.peak


@pytest.mark.parametrize("side", [512, 1024])
def test_activation_formulas_match_traced_allocations(side):
    """The planner's formulas against an allocation trace of the real modules at FLUX.1-dev's width, on meta."""
    import gguf
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    from fluxdemo.model.loading import read_config

    dtype, arch = torch.bfloat16, planner.FLUX_DEV
    predicted = planner.activations(arch, side, side, dtype)
    config = {k: v for k, v in read_config(PACKAGE_CONFIGS, "transformer").items() if not k.startswith("_")}
    with torch.device("meta"):  # one block of each kind: blocks run one after another, so more add no peak
        model = FluxTransformer2DModel(**{**config, "num_layers": 1, "num_single_layers": 1}).to(dtype)
        vae = AutoencoderKL.from_config(read_config(PACKAGE_CONFIGS, "vae")).to(dtype)
    q8 = gguf.GGMLQuantizationType.Q8_0
    block, size = gguf.GGML_QUANT_SIZES[q8]
    for parent in [m for m in model.modules() if m.__class__.__name__.endswith("TransformerBlock")]:
        for name, linear in [(n, m) for n, m in parent.named_modules() if type(m) is torch.nn.Linear]:
            packed = GGUFLinear(linear.in_features, linear.out_features, True, compute_dtype=dtype, device="meta")
            packed.weight = GGUFParameter(torch.empty(linear.out_features, linear.in_features // block * size,
                                                      dtype=torch.uint8, device="meta"), quant_type=q8)  # fmt: skip
            packed.bias = linear.bias
            owner, _, attr = name.rpartition(".")
            setattr(parent.get_submodule(owner) if owner else parent, attr, packed)
    tokens = (side // 16) ** 2
    inputs = {k: torch.empty(*shape, dtype=dtype, device="meta") for k, shape in (
        ("hidden_states", (1, tokens, 64)), ("encoder_hidden_states", (1, planner.T5_TOKENS, 4096)),
        ("pooled_projections", (1, 768)), ("timestep", (1,)), ("guidance", (1,)), ("img_ids", (tokens, 3)),
        ("txt_ids", (planner.T5_TOKENS, 3)))}  # fmt: skip
    traced = traced_peak(lambda: model(**inputs, return_dict=False))
    assert abs(predicted["transformer"] / traced - 1) <= 0.15
    latents = torch.empty(1, 16, side // 8, side // 8, dtype=dtype, device="meta")
    traced = traced_peak(lambda: vae.decode(latents, return_dict=False))
    assert abs(predicted["vae"] / traced - 1) <= 0.15


# -- the GPU benchmark's building blocks, on a tiny config ---------------------------------------------------------
def test_gpu_benchmark_builds_loadable_random_weight_files(tiny_kit, tmp_path):
    import gguf

    spec = importlib.util.spec_from_file_location("gpu_memory", Path(__file__).parents[1] / "bench" / "gpu_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):  # bit-exact with gguf-py's own
        assert np.array_equal(bench.quantize(data, qtype).numpy(), gguf.quants.quantize(data.numpy(), qtype))
    files = bench.build_files(tmp_path, tiny_kit, "Q4_0")
    manager = tiny_model(preset=bench.bench_preset(files, tiny_kit, "Q4_0"), strategy="model-offload")
    result = generate(manager, GenerateOptions("a cat", steps=1, width=32, height=32))
    assert result.images["baseline"].size == (32, 32)
    quants = {s.component: s.quant for s in manager.loaded().values()}
    assert "Q4_0" in quants["transformer"] and "Q4_0" in quants["text_encoder_2"]
    assert json.loads(json.dumps(result.report.to_dict()["memory"]))["strategy"] == "model-offload"
