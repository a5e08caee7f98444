"""GPU memory benchmark: full-size FLUX.1-dev with random weights; peak VRAM and speed per memory strategy.

    python bench/gpu_memory.py --quant Q8_0 Q4_0 --size 1024

Needs a CUDA GPU (resident Q8_0 at 1024x1024 wants about 20 GiB), about 40 GB of RAM and 30 GB of free disk. It builds
once, under --work (default bench/out/gpu), for each --quant: the FLUX.1-dev transformer (19 double + 38 single
blocks, width 3072) and the T5-XXL encoder as GGUF files with seeded random weights in city96's layout (weights inside
the blocks quantized, the rest F32), written tensor by tensor so RAM holds one tensor at a time; and, shared, CLIP-L
and the VAE as bf16 safetensors. The tokenizers are the tiny kit's (their token ids are valid for the real
vocabularies). All four stages run, T5 included. The writer runs on a CPU too (bench/fullsize.py builds the same
files with it: 11 minutes for Q8_0 on two cores).

Then, per quant and strategy, a fresh process (so that peaks are its own) generates two images: the first reads the
files and places the weights, the second (a new prompt, so the encoders run again) is measured: CUDA's peak allocated
bytes per stage against the planner's prediction, seconds per denoising step against the 0.16 s floor of DESIGN.md,
and seconds per image against resident's. Prints a table and writes JSON (--json).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing fluxdemo

from fluxdemo.errors import OutOfMemoryError  # noqa: E402
from fluxdemo.model.loading import read_config  # noqa: E402
from fluxdemo.model.manager import STRATEGIES  # noqa: E402
from fluxdemo.model.presets import PACKAGE_CONFIGS, Preset, get_preset  # noqa: E402
from fluxdemo.model.tiny import _new_writer, ensure_kit, to_bfl_state_dict  # noqa: E402
from fluxdemo.pipeline import (  # noqa: E402
    GenerateOptions,
    Model,  # noqa: E402
    generate,
)

QTYPES = {"Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q4_0": gguf.GGMLQuantizationType.Q4_0}
FLOOR_S_PER_STEP = 0.16  # DESIGN.md: ~125 TFLOP per step at 1024x1024 on an H100/H200-class GPU
PROMPTS = ("a lighthouse on a cliff at dusk", "a red fox in the snow")


# -- quantizing and writing, one tensor at a time ------------------------------------------------------------------
def quantize(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> torch.Tensor:
    """Q8_0 / Q4_0 blocks of the last dimension as uint8 rows: gguf.quants.quantize's arithmetic, bit for bit, in
    torch (gguf-py's numpy takes minutes for 12 billion weights; this runs on the GPU)."""
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    blocks = tensor.to(torch.float32).reshape(-1, block)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        d = blocks.abs().amax(dim=1, keepdim=True) / 127
        x = blocks * torch.where(d == 0, 0, 1 / d)
        a = x.abs()
        q = torch.sign(x) * (a.floor() + torch.floor(2 * (a - a.floor())))  # round half away from zero (np_roundf)
        qs = q.to(torch.int8).view(torch.uint8)
    elif qtype == gguf.GGMLQuantizationType.Q4_0:
        d = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True)) / -8
        q = torch.trunc(blocks * torch.where(d == 0, 0, 1 / d) + 8.5).to(torch.uint8).clamp(0, 15)
        q = q.reshape(-1, 2, block // 2)
        qs = q[:, 0] | (q[:, 1] << 4)
    else:
        raise ValueError(f"quantize() writes Q8_0 and Q4_0, not {qtype.name}")
    scale = d.to(torch.float16).view(torch.uint8)
    return torch.cat([scale, qs], dim=1).reshape(*tensor.shape[:-1], -1)


class RandomWeights(Mapping):
    """A state dict whose tensors are drawn when asked for, each from a seed of its own name: a 12-billion-parameter
    model never exists at once. Scaled like an initialised network (1/sqrt(fan_in); norms near 1) so the activations of
    57 blocks stay finite."""

    def __init__(self, shapes: Mapping[str, torch.Size], seed: int, device: torch.device) -> None:
        self.shapes, self.seed, self.device = dict(shapes), seed, device

    def __getitem__(self, name: str) -> torch.Tensor:
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        shape = self.shapes[name]
        values = torch.randn(shape, generator=generator, device=self.device)
        if len(shape) >= 2:
            return values / shape[-1] ** 0.5
        return 1 + 0.02 * values if "norm" in name or name.endswith("scale") else 0.02 * values

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def write_gguf(path: Path, arch: str, qtype: gguf.GGMLQuantizationType,
               tensors: Callable[..., Iterator[tuple[str, torch.Tensor, bool]]]) -> None:  # fmt: skip
    """Stream a GGUF file: tensors(real) yields (name, tensor, quantize?) and is called twice: with real=False
    (meta tensors) for the header, then for the data, which is quantized and written one tensor at a time."""
    writer = _new_writer(arch, qtype)
    for name, tensor, quantized in tensors(real=False):
        if quantized:
            rows = gguf.quant_shape_to_byte_shape(tuple(tensor.shape), qtype)
            writer.add_tensor_info(name, rows, np.dtype(np.uint8), int(np.prod(rows)), raw_dtype=qtype)
        else:
            writer.add_tensor_info(name, tensor.shape, np.dtype(np.float32), tensor.numel() * 4)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tensor, quantized in tensors(real=True):
        data = quantize(tensor, qtype) if quantized else tensor.to(torch.float32)
        writer.write_tensor_data(data.cpu().numpy())
    writer.close()


def write_transformer(path: Path, config: Mapping, qtype: gguf.GGMLQuantizationType, seed: int,
                      device: torch.device) -> None:  # fmt: skip
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in FluxTransformer2DModel(**config).state_dict().items()}

    def tensors(real: bool) -> Iterator[tuple[str, torch.Tensor, bool]]:
        meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        weights = RandomWeights(shapes, seed, device) if real else meta
        for name, tensor in to_bfl_state_dict(weights, config):  # city96: only 2-D weights inside blocks quantized
            in_block = name.startswith(("double_blocks.", "single_blocks."))
            yield name, tensor, in_block and name.endswith(".weight") and tensor.ndim == 2

    write_gguf(path, "flux", qtype, tensors)


def write_t5(path: Path, config: Mapping, qtype: gguf.GGMLQuantizationType, seed: int, device: torch.device) -> None:
    from transformers import T5Config, T5EncoderModel

    t5 = T5Config(**config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in T5EncoderModel(t5).state_dict().items() if k != "encoder.embed_tokens.weight"}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, t5.num_layers)  # llama.cpp's names, as city96's

    def tensors(real: bool) -> Iterator[tuple[str, torch.Tensor, bool]]:
        weights = RandomWeights(shapes, seed, device)
        for hf_name, shape in shapes.items():
            module, suffix = hf_name.rsplit(".", 1)
            name = f"{names.get_name(module)}.{suffix}"
            tensor = weights[hf_name] if real else torch.empty(shape, device="meta")
            yield name, tensor, name.startswith("enc.blk.") and len(shape) == 2 and ".attn_rel_b." not in name

    write_gguf(path, "t5encoder", qtype, tensors)


def write_dense(path: Path, module: torch.nn.Module) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in module.state_dict().items()}, path)


def build_files(work: Path, config_dir: Path, quant: str, seed: int = 0) -> dict[str, Path]:
    """The four weight files for the configs in config_dir (built once; kept under work) plus config_dir itself."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # drawing 12 B values: seconds on a GPU
    files = {"transformer": work / f"flux-random-{quant}.gguf", "text_encoder_2": work / f"t5-random-{quant}.gguf",
             "text_encoder": work / "clip-random.safetensors", "vae": work / "vae-random.safetensors"}  # fmt: skip
    writers = {
        "transformer": lambda p: write_transformer(p, _config(config_dir, "transformer"), QTYPES[quant], seed, device),
        "text_encoder_2": lambda p: write_t5(p, _config(config_dir, "text_encoder_2"), QTYPES[quant], seed, device),
        "text_encoder": lambda p: write_dense(p, CLIPTextModel(CLIPTextConfig(**_config(config_dir, "text_encoder")))),
        "vae": lambda p: write_dense(p, AutoencoderKL.from_config(_config(config_dir, "vae"))),
    }
    for component, path in files.items():
        if not path.exists():
            start = time.perf_counter()
            torch.manual_seed(seed)
            partial = path.with_suffix(".partial")
            writers[component](partial)
            partial.rename(path)  # a file is complete or absent, even if the build is killed
            print(f"built {path.name}: {path.stat().st_size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s")
    return {**files, "config_dir": config_dir}


def _config(config_dir: Path, component: str) -> dict:
    return {k: v for k, v in read_config(config_dir, component).items() if not k.startswith("_")}


def bench_preset(files: Mapping[str, Path], kit: Path, quant: str) -> Preset:
    """dev-q8's layout over local files: the built weights, the kit's tokenizers; sizes from the files."""
    base = get_preset("dev-q8", use_env=False)
    paths = {**files, "tokenizer": kit / "tokenizer", "tokenizer_2": kit / "tokenizer_2"}
    sources = {
        c: dataclasses.replace(getattr(base, c), local=Path(p), approx_bytes=p.stat().st_size if p.is_file() else 0)
        for c, p in paths.items()
    }
    return dataclasses.replace(base, name=f"random-{quant}", transformer_quant=quant, t5_quant=quant, **sources)


# -- one strategy, in its own process -------------------------------------------------------------------------------
def measure(files: Mapping[str, Path], kit: Path, quant: str, strategy: str, size: int, steps: int) -> dict:
    manager = Model(bench_preset(files, kit, quant), device=torch.device("cuda"), strategy=strategy)
    runs = []
    try:
        for seed, prompt in enumerate(PROMPTS):
            moves = len(manager.moves)
            result = generate(manager, GenerateOptions(prompt, seed=seed, steps=steps, width=size, height=size))
            runs.append((result.report, sum(m.seconds for m in manager.moves[moves:])))
    except OutOfMemoryError as e:
        return {"quant": quant, "strategy": strategy, "error": str(e)}
    (first, _), (warm, move_seconds) = runs
    step_seconds = [s.seconds for s in warm.timeline if " step " in s.name]
    memory = warm.memory
    return {
        "quant": quant, "strategy": warm.strategy, "size": size, "steps": steps, "plan": memory.plan,
        "events": first.events + warm.events,
        "peak_bytes": memory.peak_device_bytes, "predicted_peak_bytes": memory.predicted_peak_bytes,
        "stage_peak_bytes": memory.stage_peak_bytes, "predicted_stage_bytes": memory.predicted_stage_bytes,
        "s_per_step": statistics.mean(step_seconds), "image_s": warm.seconds, "move_s": move_seconds,
        "first_image_s": first.seconds, "peak_rss_bytes": memory.peak_rss_bytes,
    }  # fmt: skip


def _child(args: argparse.Namespace) -> None:
    files = {k: Path(v) for k, v in json.loads(args.child).items()}
    print(json.dumps(measure(files, Path(args.kit), args.quant[0], args.strategies[0], args.size, args.steps)))


# -- the table ------------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    head = (f"{'quant':6} {'strategy':14} {'peak VRAM':>10} {'predicted':>10} {'error':>7} {'s/step':>7} "
            f"{'x floor':>7} {'image s':>8} {'vs resident':>11} {'moves s':>8} {'1st image s':>11}")  # fmt: skip
    lines = [head, "-" * len(head)]
    resident = {r["quant"]: r["image_s"] for r in rows if r.get("strategy") == "resident" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"{r['quant']:6} {r['strategy']:14} error: {r['error']}")
            continue
        error = r["predicted_peak_bytes"] / r["peak_bytes"] - 1
        ratio = f"{r['image_s'] / resident[r['quant']]:.3f}" if r["quant"] in resident else "-"
        peak, predicted = r["peak_bytes"] / 1e9, r["predicted_peak_bytes"] / 1e9
        lines.append(
            f"{r['quant']:6} {r['strategy']:14} {peak:8.2f}GB {predicted:8.2f}GB "
            f"{error:+7.1%} {r['s_per_step']:7.3f} {r['s_per_step'] / FLOOR_S_PER_STEP:7.2f} {r['image_s']:8.2f} "
            f"{ratio:>11} {r['move_s']:8.2f} {r['first_image_s']:11.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quant", nargs="+", default=["Q8_0", "Q4_0"], choices=sorted(QTYPES))
    parser.add_argument("--size", type=int, default=1024, help="image width and height (default 1024)")
    parser.add_argument("--steps", type=int, default=8, help="denoising steps per image (default 8)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--work", type=Path, default=Path("bench/out/gpu"), help="where the weight files are built")
    parser.add_argument("--json", type=Path, default=Path("bench/out/gpu_memory.json"))
    parser.add_argument("--kit", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # JSON {component: path}: one measurement
    args = parser.parse_args()
    if args.child:
        return _child(args)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu_memory.py needs a CUDA GPU; bench/memory.py measures the CPU.")
    kit = ensure_kit("tiny")  # only its tokenizers are used
    rows = []
    for quant in args.quant:
        files = build_files(args.work, PACKAGE_CONFIGS, quant)
        for strategy in args.strategies:
            command = [sys.executable, __file__, "--child", json.dumps({k: str(v) for k, v in files.items()}),
                       "--kit", str(kit), "--quant", quant, "--strategies", strategy, "--size", str(args.size),
                       "--steps", str(args.steps)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                rows.append({"quant": quant, "strategy": strategy, "error": done.stderr.strip().splitlines()[-1]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\n{args.size}x{args.size}, {args.steps} steps, {torch.cuda.get_device_name()}\n{table(rows)}")
    machine = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
               "date": datetime.date.today().isoformat()}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
