"""The model flags and the model they describe, shared by the CLI and app.py; and the quiet default log.

torch and the pipeline are imported inside the functions that use them, so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fluxdemo.errors import OptionsError
from fluxdemo.model.presets import CLI_FLAGS, DEFAULT_PRESET, ENV_OVERRIDES, PRESETS, Preset, get_preset

if TYPE_CHECKING:
    from fluxdemo.lora import HubLoras

logger = logging.getLogger(__name__)

STRATEGY_HELP = (
    "where components wait between stages: auto (planned from free VRAM), resident, model-offload, group-offload, disk"
)

WEIGHTS_HELP = (
    "the transformer's weight format: auto (bf16 where it fits, fp8 on GPUs with fp8 units, else GGUF; GGUF on the "
    "CPU), gguf, bf16, fp8 (needs torchao)"
)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """--model, the local-file overrides, --device, --strategy, --lora-dir: shared by the CLI and app.py."""
    g = p.add_argument_group("model")
    g.add_argument(
        "--model", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="model preset (default: %(default)s)"
    )
    for component, flag in CLI_FLAGS.items():
        env = next(v for v, c in ENV_OVERRIDES.items() if c == component)
        help_text = f"local file for the {component} (or {env})"
        g.add_argument(flag, type=Path, metavar="PATH", dest=component, help=help_text)
    g.add_argument("--device", default=None, help="execution device: cuda, cuda:1, mps, cpu (default: best found)")
    g.add_argument("--strategy", default="auto", help=STRATEGY_HELP)
    g.add_argument("--weights", default="auto", help=WEIGHTS_HELP)
    g.add_argument("--lora-dir", type=Path, default=None, help="LoRA folder (default: loras/, or the tiny kit's)")


def manager_from_args(args: argparse.Namespace, hub_loras: HubLoras | None = None):
    """The Model the model flags describe, and each --lora value as a stack of names in its LoRA folder
    (one stack for generate and compare; one per grid row). `hub_loras`: the app's policy for Hub LoRAs; the CLI's
    user is the operator, so theirs may use their own token (FLUXDEMO_HUB_LORA_TOKEN, else HF_TOKEN)."""
    import torch
    from huggingface_hub import get_token

    from fluxdemo.lora import HubLoras
    from fluxdemo.model.manager import default_device
    from fluxdemo.pipeline import open_model

    overrides = {c: getattr(args, c) for c in CLI_FLAGS}
    preset = get_preset(args.model, overrides)
    lora_dir, stacks = _lora_location(args, preset)
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cpu" and not preset.transformer.kit:
        _warn_real_model_on_cpu(preset)
    if hub_loras is None:
        hub_loras = HubLoras(token=os.environ.get("FLUXDEMO_HUB_LORA_TOKEN") or get_token())
    manager = open_model(
        preset, device=device, strategy=args.strategy, weights=args.weights, lora_dir=lora_dir, hub_loras=hub_loras
    )
    return manager, stacks


def _warn_real_model_on_cpu(preset: Preset) -> None:
    """The real model on a CPU works, slowly: say so before a long silent load, with the RAM it wants."""
    from fluxdemo.model.memory import ram_available

    weights = sum(source.approx_bytes for source in preset.sources().values())
    available = ram_available(free_pages=True)
    fits = "" if available is None or available > weights else "; more than this machine's RAM, so it may not run"
    here = "RAM unknown" if available is None else f"{available / 1e9:.1f} GB available here"
    logger.warning(
        "warning: %s runs on the CPU (no GPU found, or --device cpu): expect minutes per step at 1024x1024 and "
        "hours for 28 steps, with %.1f GB of weights in RAM (%s%s). Try --model tiny first, or use a GPU.",
        preset.name,
        weights / 1e9,
        here,
        fits,
    )


def _lora_location(args: argparse.Namespace, preset: Preset) -> tuple[Path, list]:
    """The LoRA folder and the --lora stacks named in it: files given on the command line are read from their own
    folder (one folder for all of them)."""
    from fluxdemo.pipeline import parse_stack

    stacks = [parse_stack(text, args.strength) for text in args.lora or []]
    files = {Path(c.name).resolve() for stack in stacks for c in stack if Path(c.name).is_file()}
    if len({f.parent for f in files}) > 1:
        raise OptionsError("LoRA files given by path must share one folder; copy them into one, or use --lora-dir.")
    if files:
        folder = next(iter(files)).parent
    elif args.lora_dir is not None:
        folder = args.lora_dir
    elif preset.transformer.kit and preset.transformer.local is None:
        from fluxdemo.model.tiny import ensure_kit

        folder = ensure_kit(preset.transformer.kit) / "loras"
    else:
        folder = Path("loras")

    def in_folder(name: str) -> str:
        if Path(name).resolve() in files:
            return Path(name).name
        if not name.endswith(".safetensors") and not (folder / name).exists():
            return name + ".safetensors"
        return name

    return folder, [tuple(replace(c, name=in_folder(c.name)) for c in stack) for stack in stacks]


def quiet_libraries() -> None:
    """The default log: our stages only. Third-party lines (gguf's per file written, transformers' and diffusers'
    notices, PEFT's warning for each adapter beside another, which is how stacks work) show with -v only."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers' own handler reads it at import
    for noisy in ("diffusers", "transformers", "httpx", "huggingface_hub", "gguf", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
