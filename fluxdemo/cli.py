"""python -m fluxdemo generate | compare | grid | inspect-lora | download | tiny | serve

Every verb is a thin shell over a library call; errors a user can fix print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from fluxdemo.errors import FluxdemoError, HubError, LoraError, OptionsError
from fluxdemo.flags import (
    FAST_HELP,
    add_model_flags,
    check_lora_name,
    cli_hub_loras,
    lora_folder,
    lora_stacks,
    manager_from_args,
    quiet_libraries,
)
from fluxdemo.model.kits import kit_usage
from fluxdemo.model.presets import CLI_FLAGS, DEFAULT_PRESET, PRESETS, get_preset
from fluxdemo.pipeline.options import MAX_BATCH, STRENGTH_RANGE, GenerateOptions, check_lora_strength

logger = logging.getLogger("fluxdemo")

EPILOG = """\
Where the model comes from:
  --model dev-q8 (default) downloads FLUX.1-dev's Q8_0 GGUF transformer (12.7 GB, city96/FLUX.1-dev-gguf), a Q8_0
  T5-XXL encoder (5.1 GB) and CLIP-L + VAE from black-forest-labs/FLUX.1-dev, a gated repo: accept its licence on
  the Hub and set HF_TOKEN. --model tiny uses random weights built locally: no network, 256x256 at 12 steps by
  default, about a second per image on a CPU.
  Override any file with a local path: --transformer, --t5, --clip, --vae (or FLUXDEMO_TRANSFORMER, ...).
"""

COMPARE_FILES = ("baseline.png", "lora.png", "side_by_side.png", "report.json")
# Defaults for --steps, --width, --height: FLUX.1-dev's own; a tiny model (noise at any size) the studio's small ones.
IMAGE_DEFAULTS = {"steps": 28, "width": 1024, "height": 1024}
TINY_IMAGE_DEFAULTS = {"steps": 12, "width": 256, "height": 256}
VERBOSE_HELP = "log every move and library detail, and show the traceback of an error (anywhere on the line)"
BATCH_HELP = (
    "images denoised together, up to this many: one stack's seeds and prompts, or the base model beside "
    "single LoRAs; 1.3-2.6x faster on a CPU, within 1/255 of one at a time (default 1: exact)"
)
NAME_HELP = (
    "a .safetensors file, a name in the LoRA folder (with or without .safetensors), or a Hub LoRA: user/repo, "
    "user/repo/file.safetensors, either with @revision, or its huggingface.co URL"
)
LORA_HELP = NAME_HELP + "; optionally NAME:STRENGTH; repeat it for a stack"
STRENGTH_HELP = f"from {STRENGTH_RANGE[0]:g} to {STRENGTH_RANGE[1]:g}"


def _add_image_flags(p: argparse.ArgumentParser, *, lora_required: bool, grid: bool = False) -> None:
    g = p.add_argument_group("image")
    prompt_help = "what to draw; T5 reads up to 512 tokens, CLIP the first 77"
    if grid:
        g.add_argument("--prompt", required=True, action="append", help=prompt_help + "; repeat it for more grids")
        g.add_argument(
            "--lora",
            required=True,
            action="append",
            metavar="STACK",
            help="one grid row: a LoRA (" + NAME_HELP + "), NAME:STRENGTH, or a stack such as a:0.8+b:0.5; "
            "repeat it for more rows",
        )
        g.add_argument("--seeds", type=_numbers(int), default=[0], help="comma-separated seeds, one grid each")
        g.add_argument(
            "--strengths",
            type=_numbers(float),
            default=[0.0, 0.5, 1.0],
            help="comma-separated columns; each multiplies every LoRA's strength (default 0,0.5,1)",
        )
    else:
        g.add_argument("--prompt", required=True, help=prompt_help)
        g.add_argument("--lora", required=lora_required, action="append", metavar="NAME[:STRENGTH]", help=LORA_HELP)
        g.add_argument("--seed", type=int, default=0, help="same seed + same settings = the same pixels, on any run")
    if grid or lora_required:
        g.add_argument("--batch", type=int, default=1, help=BATCH_HELP)
    g.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help=f"strength of a LoRA named without one, {STRENGTH_HELP} (default 1)",
    )
    g.add_argument(
        "--steps",
        type=int,
        default=None,
        help="denoising steps (default 28, what FLUX.1-dev is tuned for; 12 with a tiny --model)",
    )
    g.add_argument("--guidance", type=float, default=3.5, help="FLUX.1-dev's distilled guidance (default 3.5)")
    g.add_argument(
        "--width",
        type=int,
        default=None,
        help="a multiple of 16 (VAE x8, then 2x2 latent patches); default 1024, 256 with a tiny --model",
    )
    g.add_argument("--height", type=int, default=None, help="a multiple of 16; default 1024, 256 with a tiny --model")
    g.add_argument("--fast", action="store_true", help=FAST_HELP)
    g.add_argument("--overwrite", action="store_true", help="replace existing output files")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr and exit 2 (without the usage block)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see `{self.prog} --help`.\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fluxdemo" if Path(sys.argv[0]).name == "fluxdemo" else "python -m fluxdemo",
        description="FLUX.1-dev on an ordinary GPU with quantized components, and what a LoRA does to an image.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("generate", help="one image (with or without a LoRA) -> a PNG carrying its parameters")
    add_model_flags(p)
    _add_image_flags(p, lora_required=False)
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")

    outputs = ", ".join(COMPARE_FILES)
    p = verbs.add_parser("compare", help=f"base model vs LoRA from one seed -> {outputs}")
    add_model_flags(p)
    _add_image_flags(p, lora_required=True)
    p.add_argument("--out", type=Path, required=True, help="the folder to write into")

    p = verbs.add_parser(
        "grid",
        help="LoRA rows x strength columns per prompt and seed -> labelled grid PNGs, one PNG per cell, report.json",
    )
    add_model_flags(p)
    _add_image_flags(p, lora_required=True, grid=True)
    p.add_argument("--out", type=Path, required=True, help="the folder to write into")

    p = verbs.add_parser("inspect-lora", help="what a LoRA file is, what it adapts, and whether it fits FLUX.1-dev")
    p.add_argument("name", metavar="LORA", help=NAME_HELP)
    p.add_argument("--model", default=DEFAULT_PRESET, choices=sorted(PRESETS), help="judge it against this preset")
    p.add_argument("--lora-dir", type=Path, default=None, help="LoRA folder (default: loras/, or the tiny kit's)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")

    p = verbs.add_parser("download", help="fetch and verify every file of a preset into the Hugging Face cache")
    p.add_argument("--model", default=DEFAULT_PRESET, choices=sorted(PRESETS))

    p = verbs.add_parser("tiny", help="build a tiny random-weight model kit in the real file formats")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kind", default="tiny", choices=("tiny", "tiny-wide"))
    p.add_argument("--seed", type=int, default=0)
    p = verbs.add_parser(
        "serve", help='keep model replicas up on a Ray cluster for `python app.py --ray` (pip install "fluxdemo[ray]")'
    )
    add_model_flags(p)
    p.add_argument(
        "--ray", metavar="ADDRESS", help="the cluster (default: RAY_ADDRESS, or one `ray start` began here)"
    )
    p.add_argument("--replicas", type=int, help="one device each (default: one per GPU of the cluster, else 2)")
    p.add_argument("--replica-threads", type=int, help="torch threads per CPU replica (default: the CPUs shared out)")
    p.set_defaults(lora=None, strength=1.0)
    # -v after the verb too: SUPPRESS leaves the main parser's value alone unless the verb's -v is given.
    for p in verbs.choices.values():
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
    return parser


def _numbers(kind: type) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None

    return parse


def _options(args) -> GenerateOptions:
    prompt = args.prompt[0] if isinstance(args.prompt, list) else args.prompt
    return GenerateOptions(
        prompt,
        seed=getattr(args, "seed", 0),
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        fast=args.fast,
    )


def _stack(stacks: list) -> tuple:
    """All --lora values of generate or compare as one stack."""
    return tuple(choice for stack in stacks for choice in stack)


def cmd_generate(args) -> int:
    from fluxdemo.pipeline.api import generate
    from fluxdemo.pipeline.images import params_from_report, save_png

    manager, stacks = manager_from_args(args)
    result = generate(manager, _options(args), _stack(stacks))
    ((label, image),) = result.images.items()
    path = save_png(image, params_from_report(result.report, label), args.out, overwrite=args.overwrite)
    print(path)
    return 0


def cmd_compare(args) -> int:
    from fluxdemo.pipeline.api import compare, stack_label
    from fluxdemo.pipeline.images import params_from_report, save_png, side_by_side

    manager, stacks = manager_from_args(args)
    stack = _stack(stacks)
    result = compare(manager, _options(args), stack, batch=args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    base, adapted = result.images["baseline"], result.images["lora"]
    both = side_by_side(base, adapted, ("base model", stack_label(stack)))
    for label, role, image in (
        ("baseline", "baseline", base),
        ("lora", "lora", adapted),
        ("lora", "side_by_side", both),
    ):
        save_png(image, params_from_report(result.report, label, role), args.out / f"{role}.png", overwrite=True)
    _write_json(args.out / "report.json", result.report.to_dict())
    print(args.out)
    return 0


def cmd_grid(args) -> int:
    from fluxdemo.pipeline.api import grid, grid_pictures
    from fluxdemo.pipeline.images import params_from_report, save_png

    manager, stacks = manager_from_args(args)
    result = grid(manager, _options(args), args.prompt, args.seeds, stacks, args.strengths, batch=args.batch)
    args.out.mkdir(parents=True, exist_ok=True)
    report = result.report
    prompts, cells = report.grid.prompts, []
    for cell in report.cells:
        p = prompts.index(cell.prompt) + 1
        name = f"cell-p{p}-seed{cell.seed}-row{cell.row + 1}-x{cell.strength:g}.png"
        save_png(result.images[cell.label], params_from_report(report, cell.label), args.out / name, overwrite=True)
        cells.append(replace(cell, file=name))
    for prompt, seed, picture in grid_pictures(result):
        p = prompts.index(prompt) + 1
        label = next(c.label for c in cells if c.prompt == prompt and c.seed == seed)
        params = replace(
            params_from_report(report, label),
            role="grid",
            loras=(),
            lora_name=None,
            lora_sha256=None,
            strength=None,
            extra={
                "Grid rows": " | ".join(report.grid.rows),
                "Grid strengths": ",".join(f"{s:g}" for s in report.grid.strengths),
            },
        )
        save_png(picture, params, args.out / f"grid-p{p}-seed{seed}.png", overwrite=True)
    _write_json(args.out / "report.json", replace(report, cells=cells).to_dict())
    print(args.out)
    return 0


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def cmd_inspect_lora(args) -> int:
    from fluxdemo.lora import LoraLibrary, format_report, inspect_lora
    from fluxdemo.model.files import resolve
    from fluxdemo.model.loading import model_dims

    preset = get_preset(args.model)
    try:
        dims, clip_config = model_dims(resolve(preset.config_dir, component="config_dir", preset=preset.name))
        if Path(args.name).is_file():
            report = inspect_lora(Path(args.name), dims, clip_config=clip_config)
        else:  # a name in the LoRA folder or a Hub LoRA, as --lora takes it
            folder = lora_folder(args, preset, build=True)
            library = LoraLibrary(folder, dims, clip_config, **cli_hub_loras().library_args())
            report = library.get(args.name).report
    except LoraError as e:  # a missing, unreadable or unreachable LoRA: the user's to fix, as everywhere else
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0 if report.compatible else 2


def cmd_download(args) -> int:
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from fluxdemo.model.files import download_preset

    # The library's advice for a missing file is "run download where there is network": not for download itself.
    elsewhere = "or run download on a machine with network and copy its Hugging Face cache (HF_HOME) here"
    if constants.HF_HUB_OFFLINE:
        raise OptionsError(
            f"download fetches from the Hugging Face Hub, but offline mode is on (HF_HUB_OFFLINE=1): "
            f"unset it, {elsewhere}."
        )
    try:
        report = download_preset(get_preset(args.model))
    except HubError as e:
        if isinstance(e.__cause__, (LocalEntryNotFoundError, httpx2.TransportError)):
            raise OptionsError(
                f"download could not reach the Hugging Face Hub: check this machine's network (and "
                f"HTTPS_PROXY if it needs one), {elsewhere}."
            ) from e
        raise
    print(report.describe())
    return 0


def cmd_tiny(args) -> int:
    from fluxdemo.model.tiny import build_kit

    kit = build_kit(args.out, kind=args.kind, seed=args.seed)
    print(kit_usage(kit, args.kind))
    return 0


def cmd_serve(args) -> int:
    try:  # Ray is imported for this verb only: the extra `fluxdemo[ray]`
        from fluxdemo.serve import ServeSettings, serve_forever
    except ImportError as e:
        raise OptionsError(
            f'fluxdemo serve needs Ray Serve ({e.name} is missing): pip install "fluxdemo[ray]".'
        ) from e
    settings = ServeSettings(address=args.ray, replicas=args.replicas, threads=args.replica_threads)
    manager, _ = manager_from_args(args)
    serve_forever(manager, settings)
    return 0


VERBS = {"generate": cmd_generate, "compare": cmd_compare, "grid": cmd_grid, "inspect-lora": cmd_inspect_lora,
         "download": cmd_download, "tiny": cmd_tiny, "serve": cmd_serve}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """The CLI: 0 on success, 2 on an error the user can fix (one line on stderr), 1 on anything else."""
    args = build_parser().parse_args(argv)
    _fill_image_defaults(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(relativeCreated)7.0f ms  %(message)s"
    )
    if not args.verbose:
        quiet_libraries()
    try:
        check_args(args)  # before torch is imported: a mistake is answered at once
        return VERBS[args.verb](args)
    except (FluxdemoError, OSError) as e:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {_sentence(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.verbose:
            raise
        print(
            f"error: {type(e).__name__}: {e} (not a usage error: run again with -v for the traceback and report it)",
            file=sys.stderr,
        )
        return 1


def check_args(args: argparse.Namespace) -> None:
    """Every check that needs no model and no network, before anything imports torch: --out, the numbers, the
    strengths (each LoRA's, and times each grid column) and the LoRA names."""
    if getattr(args, "out", None) is not None:
        _check_out(args)
    if hasattr(args, "steps"):
        for seed in getattr(args, "seeds", None) or [args.seed]:
            replace(_options(args), seed=seed).validate()
        check_lora_strength(args.strength)
        if not 1 <= getattr(args, "batch", 1) <= MAX_BATCH:
            raise OptionsError(f"--batch must be from 1 to {MAX_BATCH}, but is {args.batch}.")
        folder = lora_folder(args, get_preset(args.model, {c: getattr(args, c) for c in CLI_FLAGS}))
        for stack in lora_stacks(args):
            for choice in stack:
                check_lora_name(choice.name, folder)
                check_lora_strength(choice.strength)
                for column in getattr(args, "strengths", None) or []:
                    if not STRENGTH_RANGE[0] <= choice.strength * column <= STRENGTH_RANGE[1]:
                        raise OptionsError(
                            f"The grid column x{column:g} takes {choice.label()} to strength "
                            f"{choice.strength * column:g}, outside {STRENGTH_HELP}; choose smaller strengths."
                        )
    elif args.verb == "inspect-lora" and not Path(args.name).is_file():
        check_lora_name(args.name, lora_folder(args, get_preset(args.model)))


def _check_out(args: argparse.Namespace) -> None:
    """--out: a file for generate, a folder for the rest; not in the way of what is there, and writable."""
    out, folder = args.out, args.verb != "generate"
    if out.exists() and out.is_dir() != folder:
        kind, wanted = ("a file", "the folder to write into") if folder else ("a folder", "the PNG file to write")
        raise OptionsError(f"{out} is {kind}; --out names {wanted}.")
    if args.verb == "tiny" and out.exists() and any(out.iterdir()):
        raise OptionsError(f"{out} is not an empty folder; choose a new or empty --out for the kit.")
    if not getattr(args, "overwrite", True):
        if out.is_file():
            raise OptionsError(f"{out} exists; choose another --out or pass --overwrite.")
        existing = [f for f in COMPARE_FILES if (out / f).exists()] if args.verb == "compare" else []
        if existing:
            raise OptionsError(f"{out} already holds {', '.join(existing)}; choose another --out or pass --overwrite.")
        if args.verb == "grid" and out.is_dir() and any(out.iterdir()):
            raise OptionsError(f"{out} is not empty; choose another --out or pass --overwrite.")
    start = out.absolute() if folder else out.absolute().parent  # a PNG replaces its file by a rename in its folder
    nearest = next(p for p in (start, *start.parents) if p.exists())  # what will hold the new files
    if not nearest.is_dir() or not os.access(nearest, os.W_OK | os.X_OK):
        why = "is a file" if not nearest.is_dir() else "is not writable"
        raise OptionsError(f"{out} cannot be written: {nearest} {why}; choose another --out.")


def _fill_image_defaults(args: argparse.Namespace) -> None:
    """--steps, --width and --height left out: FLUX.1-dev's defaults, or the small ones for a tiny model."""
    if not hasattr(args, "steps"):
        return
    defaults = TINY_IMAGE_DEFAULTS if PRESETS[args.model].transformer.kit else IMAGE_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _sentence(e: Exception) -> str:
    """An error as the one line the user reads: ours are sentences already; an OSError names its path."""
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.strerror or e}: {e.filename}; check the path and its permissions."
    return str(e)
