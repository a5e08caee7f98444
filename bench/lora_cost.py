"""What each kind of LoRA file costs at FLUX.1's real width: memory held and time per denoising step (issue 11).

    python bench/lora_cost.py [--size 128] [--steps 2] [--threads 1]

On the real-width kit (tiny-wide: one double and one single block, 3072 wide, Q8_0 GGUF), six block linears (both
attention qkv and proj of the double block, the single block's linear1 and linear2) are adapted by files of each kind,
seeded random weights in kohya's / ComfyUI's key layouts:

- lora-r16: a plain rank-16 LoRA, for scale;
- lokr: a LoKr with full w1 (16x16) and w2 (SimpleTuner's factor 16), applied in factored form (fluxdemo.lora.lycoris);
- lokr-dense: the same LoKr's deltas kron(w1, w2) written as ComfyUI .diff full deltas (float32, so the two files
  hold the same numbers), applied as an extra delta module against an identity: how a LoKr was applied before issue
  11 and how a .diff is applied on packed GGUF weights now;
- loha-r16: a rank-16 LoHa, in factored form.

Each runs in a fresh process: the kit loaded and a base image made first, then /proc/self/clear_refs resets the peak,
and the LoRA image is made. Printed per kind: the file's size, the RSS the LoRA still holds after its image ("held"),
the peak above the loaded model during its load and image ("peak"), the median denoising step against the base
model's, and for lokr-dense the largest pixel difference from lokr (the two must agree within 1/255). Linux only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, without installing fluxdemo
from fluxdemo.model.loading import model_dims  # noqa: E402
from fluxdemo.model.names import FluxDims, bfl_linear_shapes  # noqa: E402
from fluxdemo.model.presets import get_preset  # noqa: E402
from fluxdemo.model.tiny import ensure_kit  # noqa: E402
from fluxdemo.pipeline import (  # noqa: E402
    GenerateOptions,
    Model,  # noqa: E402
    generate,
)

KINDS = ("lora-r16", "lokr", "lokr-dense", "loha-r16")
MODULES = ("double_blocks.0.img_attn.qkv", "double_blocks.0.img_attn.proj", "double_blocks.0.txt_attn.qkv",
           "double_blocks.0.txt_attn.proj", "single_blocks.0.linear1", "single_blocks.0.linear2")  # fmt: skip
FACTOR, RANK = 16, 16
MiB = 2**20


def write_files(folder: Path, dims: FluxDims) -> dict[str, Path]:
    """One file per kind, seeded; lokr-dense holds exactly lokr's deltas (bf16 factors, their kron in float32)."""
    g = torch.Generator().manual_seed(0)
    shapes = bfl_linear_shapes(dims)
    files: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}
    for bfl in MODULES:
        out, inp = shapes[bfl]
        kohya = f"lora_unet_{bfl.replace('.', '_')}"
        files["lora-r16"] |= {
            f"{kohya}.lora_down.weight": (torch.randn(RANK, inp, generator=g) / inp**0.5).bfloat16(),
            f"{kohya}.lora_up.weight": (torch.randn(out, RANK, generator=g) / RANK**0.5).bfloat16(),
            f"{kohya}.alpha": torch.tensor(float(RANK)),
        }
        w1 = torch.randn(FACTOR, FACTOR, generator=g).bfloat16()
        c, d = out // FACTOR, inp // FACTOR
        w2 = (torch.randn(c, d, generator=g) / (c * d) ** 0.25).bfloat16()
        files["lokr"] |= {f"{kohya}.lokr_w1": w1, f"{kohya}.lokr_w2": w2}
        files["lokr-dense"][f"diffusion_model.{bfl}.diff"] = torch.kron(w1.float(), w2.float())  # exact in float32
        files["loha-r16"] |= {
            f"{kohya}.hada_w1_a": (torch.randn(out, RANK, generator=g) / RANK**0.5).bfloat16(),
            f"{kohya}.hada_w1_b": (torch.randn(RANK, inp, generator=g) / inp**0.5).bfloat16(),
            f"{kohya}.hada_w2_a": torch.randn(out, RANK, generator=g).bfloat16(),
            f"{kohya}.hada_w2_b": torch.randn(RANK, inp, generator=g).bfloat16(),
            f"{kohya}.alpha": torch.tensor(float(RANK)),
        }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for kind, tensors in files.items():
        paths[kind] = folder / f"{kind}.safetensors"
        if not paths[kind].exists():
            save_file(tensors, paths[kind])
    return paths


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def measure(kind: str, folder: Path, size: int, steps: int) -> dict:
    """In a fresh process: the base image, then the LoRA's, with its memory above the loaded model and its steps."""
    manager = Model(get_preset("tiny-wide", use_env=False), device="cpu", strategy="resident", lora_dir=folder)
    options = GenerateOptions("a lighthouse at dusk", seed=5, steps=steps, width=size, height=size,
                              max_sequence_length=32)  # fmt: skip
    base = generate(manager, options)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM back to the current RSS
    before = _status("VmRSS")
    adapted = generate(manager, options, f"{kind}.safetensors", 1.0)
    step_s = lambda result: [s.seconds for s in result.report.timeline if " step " in s.name]  # noqa: E731
    out = folder / f"{kind}.png"
    adapted.images["lora"].save(out)
    return {"held": _status("VmRSS") - before, "peak": _status("VmHWM") - before, "png": str(out),
            "base_step_s": statistics.median(step_s(base)), "step_s": statistics.median(step_s(adapted))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="image width and height (default 128)")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--work", type=Path, default=Path("bench/out/lora_cost"), help="where the files are written")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # one kind, printed as JSON
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kit = ensure_kit("tiny-wide")
    if args.child:
        print(json.dumps(measure(args.child, args.work, args.size, args.steps)))
        return
    dims = model_dims(kit)[0]
    paths = write_files(args.work, dims)
    rows = {}
    for kind in KINDS:
        command = [sys.executable, __file__, "--child", kind, "--size", str(args.size), "--steps", str(args.steps),
                   "--work", str(args.work)] + (["--threads", str(args.threads)] if args.threads else [])  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{kind} failed:\n{done.stderr[-3000:]}")
        rows[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    pngs = {k: Image.open(rows[k]["png"]).convert("RGB") for k in ("lokr", "lokr-dense")}
    pixels = {k: np.asarray(image).astype(np.int16) for k, image in pngs.items()}
    print(f"tiny-wide (real width {dims.inner}), {args.size}x{args.size}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads; adapted: {', '.join(MODULES)}")  # fmt: skip
    print(f"{'kind':12} {'file':>9} {'held':>9} {'peak':>9} {'step s':>8} {'base s':>8} {'step/base':>9}")
    for kind, row in rows.items():
        print(f"{kind:12} {paths[kind].stat().st_size / MiB:8.1f}M {row['held'] / MiB:8.1f}M "
              f"{row['peak'] / MiB:8.1f}M {row['step_s']:8.2f} {row['base_step_s']:8.2f} "
              f"{row['step_s'] / row['base_step_s']:9.3f}")  # fmt: skip
    worst = int(np.abs(pixels["lokr"] - pixels["lokr-dense"]).max())
    print(f"lokr (factored) against lokr-dense (the same deltas, dense): largest pixel difference {worst}/255")


if __name__ == "__main__":
    main()
