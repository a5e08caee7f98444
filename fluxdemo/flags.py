"""The model flags and the model they describe, shared by the CLI and app.py; and the quiet default log.

torch and the pipeline are imported inside the functions that use them, so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import warnings
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

from fluxdemo.errors import OptionsError
from fluxdemo.lora.compile_options import BACKENDS, COMPILE_CHOICES, DEFAULT_RANK, DEFAULT_SLOTS, CompileSettings
from fluxdemo.lora.names import LORA_SUFFIX, MAX_NAME_CHARS, parse_hub_lora
from fluxdemo.model.kits import kit_cache_dir, kit_folder
from fluxdemo.model.presets import CLI_FLAGS, DEFAULT_PRESET, ENV_OVERRIDES, PRESETS, Preset, get_preset
from fluxdemo.pipeline.options import Stack, parse_stack
from fluxdemo.untrusted import MAX_FIELD_CHARS, capped, names_list

if TYPE_CHECKING:
    from fluxdemo.lora import HubLoras

logger = logging.getLogger(__name__)

MAX_LIST_FILES = 1000  # files of a LoRA folder named in an error: a --lora-dir may point anywhere
STRATEGY_HELP = (
    "where components wait between stages: auto (planned from free VRAM), resident, model-offload, group-offload, disk"
)

WEIGHTS_HELP = (
    "the transformer's weight format: auto (bf16 where it fits, fp8 on GPUs with fp8 units, else GGUF; GGUF on the "
    "CPU), gguf, bf16, fp8 (needs torchao)"
)

COMPILE_HELP = (
    "compile the transformer's repeated blocks once (on: torch.compile; aot: ahead of time, torch.export + "
    "AOTInductor, as on ZeroGPU; minutes at start-up, then faster steps on a GPU), LoRAs hot-swapped so that no LoRA "
    "or strength change recompiles; needs dense weights (default: off)"
)
FAST_HELP = (
    "skip steps: diffusers' TaylorSeer cache on one static schedule that every image of a run shares (at 28 steps "
    "13 run, 15 are predicted), so a baseline and its LoRA image skip the same steps; faster, not the exact pixels, "
    "and labelled so in reports and PNGs (default: off, exact)"
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
    g.add_argument("--compile", nargs="?", const="on", default="off", choices=COMPILE_CHOICES, help=COMPILE_HELP)
    g.add_argument(
        "--compile-rank",
        type=int,
        default=DEFAULT_RANK,
        metavar="N",
        help="with --compile: the highest LoRA rank (default: %(default)s)",
    )
    g.add_argument(
        "--compile-slots",
        type=int,
        metavar="N",
        default=DEFAULT_SLOTS,
        help="with --compile: the most LoRAs in one stack; each costs time at every step (default: %(default)s)",
    )
    g.add_argument("--lora-dir", type=Path, default=None, help="LoRA folder (default: loras/, or the tiny kit's)")


def manager_from_args(args: argparse.Namespace, hub_loras: HubLoras | None = None):
    """The Model the model flags describe, and each --lora value as a stack of names in its LoRA folder
    (one stack for generate and compare; one per grid row). `hub_loras`: the app's policy for Hub LoRAs; the CLI's
    user is the operator, so theirs may use their own token (FLUXDEMO_HUB_LORA_TOKEN, else HF_TOKEN)."""
    import torch

    from fluxdemo.model.manager import default_device
    from fluxdemo.pipeline import open_model

    overrides = {c: getattr(args, c) for c in CLI_FLAGS}
    preset = get_preset(args.model, overrides)
    lora_dir = lora_folder(args, preset, build=True)
    stacks = [tuple(replace(c, name=file_name(c.name, lora_dir)) for c in stack) for stack in lora_stacks(args)]
    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cpu" and not preset.transformer.kit:
        _warn_real_model_on_cpu(preset)
    if hub_loras is None:
        hub_loras = cli_hub_loras()
    manager = open_model(
        preset,
        device=device,
        strategy=args.strategy,
        weights=args.weights,
        lora_dir=lora_dir,
        hub_loras=hub_loras,
        compile=compile_settings(args),
    )
    return manager, stacks


def compile_settings(args: argparse.Namespace) -> CompileSettings | None:
    """--compile's settings from the flags, None when it is off."""
    if args.compile not in COMPILE_CHOICES:  # a variable's value (app.py), which argparse's choices do not check
        raise OptionsError(f"--compile must be on, off or aot, but is {args.compile!r}.")
    if args.compile == "off":
        return None
    return CompileSettings(args.compile_slots, args.compile_rank, BACKENDS[args.compile])


def cli_hub_loras() -> HubLoras:
    """The CLI's Hub LoRAs: its user is the operator, so they may use their own token (FLUXDEMO_HUB_LORA_TOKEN, else
    HF_TOKEN or the login file)."""
    from huggingface_hub import get_token

    from fluxdemo.lora import HubLoras

    return HubLoras(token=os.environ.get("FLUXDEMO_HUB_LORA_TOKEN") or get_token())


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


def lora_folder(args: argparse.Namespace, preset: Preset, build: bool = False) -> Path:
    """Where --lora names are looked up: the folder of LoRA files given by path (one folder for all of them),
    --lora-dir, the tiny kit's loras (built first when `build`), else loras/."""
    files = {Path(c.name).resolve() for stack in lora_stacks(args) for c in stack if Path(c.name).is_file()}
    if len({f.parent for f in files}) > 1:
        raise OptionsError("LoRA files given by path must share one folder; copy them into one, or use --lora-dir.")
    if files:
        return next(iter(files)).parent
    if args.lora_dir is not None:
        return args.lora_dir.absolute()
    if preset.transformer.kit and preset.transformer.local is None:
        if not build:
            return kit_folder(preset.transformer.kit) / "loras"
        from fluxdemo.model.tiny import ensure_kit  # building a kit needs torch; finding its folder does not

        return ensure_kit(preset.transformer.kit) / "loras"
    return Path("loras").absolute()


def lora_stacks(args: argparse.Namespace) -> list[Stack]:
    """Each --lora value as a stack (one for generate and compare; one per grid row); a LoRA file given by path is
    named by its file name, as its folder is the LoRA folder."""
    stacks = [parse_stack(text, args.strength) for text in getattr(args, "lora", None) or []]
    return [tuple(replace(c, name=Path(c.name).name) if Path(c.name).is_file() else c for c in s) for s in stacks]


def file_name(name: str, folder: Path) -> str:
    """A folder name as its file is called (`peft` -> `peft.safetensors`), so reports and PNGs name the file; any
    other name (a Hub LoRA, one not found) as given, for the library to judge."""
    if name.lower().endswith(LORA_SUFFIX) or len(name) > MAX_NAME_CHARS or (folder / name).is_file():
        return name
    return name + LORA_SUFFIX if (folder / (name + LORA_SUFFIX)).is_file() else name


def check_lora_name(name: str, folder: Path) -> None:
    """A LoRA name the library will find, judged from names alone (no file opened, no network): a file in `folder`
    (its .safetensors may be left out) or a Hub reference; else one sentence naming the folder."""
    if not name.strip():
        raise OptionsError("A --lora value names no LoRA: give a file, a name in the LoRA folder, or user/repo.")
    local = [name, name + LORA_SUFFIX] if not name.lower().endswith(LORA_SUFFIX) else [name]
    if any((folder / n).is_file() for n in local if len(n) <= MAX_NAME_CHARS) or parse_hub_lora(name) is not None:
        return
    if not folder.is_dir():
        if folder.name == "loras" and folder.parent.parent == kit_cache_dir():
            return  # the kit is built on first use, with its sample LoRAs: the library judges the name then
        raise OptionsError(
            f"No LoRA named {capped(name, MAX_FIELD_CHARS)!r}: the LoRA folder {folder} does not exist. Give the "
            "path of a .safetensors file, --lora-dir FOLDER, or a Hub name such as user/repo."
        )
    if "/" in name or "\\" in name or name.lower().endswith(LORA_SUFFIX):
        raise OptionsError(
            f"There is no LoRA file {capped(name, MAX_FIELD_CHARS)} (nor one of that name in the LoRA folder "
            f"{folder}); check the path, or name a Hub LoRA as user/repo or user/repo/file.safetensors."
        )
    found = islice((p for p in folder.rglob("*" + LORA_SUFFIX) if p.is_file()), MAX_LIST_FILES)
    shown = sorted(p.relative_to(folder).as_posix() for p in found)
    raise OptionsError(
        f"No LoRA named {capped(name, MAX_FIELD_CHARS)!r} in the LoRA folder {folder}; available: {names_list(shown)}."
    )


def quiet_libraries() -> None:
    """The default log: our stages only. Third-party lines (gguf's per file written, transformers' and diffusers'
    notices, PEFT's warning for each adapter beside another, which is how stacks work) show with -v only."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers' own handler reads it at import
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # so does huggingface_hub's (else its retries print twice)
    for noisy in ("diffusers", "transformers", "httpx", "huggingface_hub", "gguf", "peft"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute", category=UserWarning)
    treespec = r"`isinstance\(treespec, LeafSpec\)` is deprecated"  # torch.export's own, per --compile aot program
    warnings.filterwarnings("ignore", message=treespec, category=FutureWarning)
