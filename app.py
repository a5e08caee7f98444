"""python app.py: the fluxdemo studio in a browser, on 127.0.0.1:7860.

Builds the page from the library (fluxdemo.studio) over one model manager and launches it; the model loads on the
first run, so the page is up in seconds. On a Space the same flags come from the environment (see --help); HF_TOKEN
comes from the Space's secrets, and the model's files start downloading at launch (--download-at-start), the page
saying how far they are. The README's "Deploying on Hugging Face Spaces" has the commands.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import textwrap
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

from starlette.middleware import Middleware

from fluxdemo.errors import FluxdemoError
from fluxdemo.flags import add_model_flags, manager_from_args, quiet_libraries
from fluxdemo.lora import HubLoras
from fluxdemo.lora.compile_options import COMPILE_CHOICES, DEFAULT_RANK, DEFAULT_SLOTS
from fluxdemo.lora.hub import HUB_LORA_QUOTA_BYTES
from fluxdemo.model.manager import STRATEGIES
from fluxdemo.model.prefetch import Prefetch
from fluxdemo.model.presets import DEFAULT_PRESET, PRESETS, Preset
from fluxdemo.model.weights import WEIGHT_FORMATS
from fluxdemo.pipeline import DEFAULT_CACHE_IMAGES, MAX_BATCH, PUBLIC_STRENGTH_RANGE, STRENGTH_RANGE
from fluxdemo.pipeline.limits import DEFAULT_MAX_JOBS_PER_CLIENT, DEFAULT_MAX_PROMPT_CHARS, DEFAULT_MAX_WORK, Limits
from fluxdemo.pipeline.previews import preview_drawer

# Before anything that may touch CUDA: on ZeroGPU the `spaces` package must patch torch first.
from fluxdemo.studio import DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_QUEUE_SIZE, STUDIO_CSS, build_studio, zero_gpu
from fluxdemo.studio.forms import default_options
from fluxdemo.studio.launch_check import be_patient
from fluxdemo.studio.upload_quota import UploadQuota

logger = logging.getLogger("fluxdemo")

MB = 2**20
GB = 2**30
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
RAY_HERE = "here"  # --ray without an address


class Flag(NamedTuple):
    """One server flag and the variable a Space sets it by; the default is a string, as a variable would spell it,
    so it goes through `type` like a flag's value: a bad variable is an argparse sentence and exit 2."""

    flag: str
    env: str | None
    default: str | None
    help: str
    type: Callable[[str], object] | None = None
    options: dict | None = None  # choices, metavar, action
    example: str = ""  # shown after the variable's name in --help


SERVER_FLAGS = (
    Flag("--host", "GRADIO_SERVER_NAME", "127.0.0.1", "default: %(default)s"),
    Flag("--port", "GRADIO_SERVER_PORT", "7860", "default: %(default)s", int),
    Flag(
        "--share", None, None, "also serve on a public *.gradio.live link (use --auth)", None, {"action": "store_true"}
    ),
    Flag(
        "--auth",
        "FLUXDEMO_AUTH",
        None,
        "require this login (strongly suggested with --share)",
        options={"metavar": "USER:PASS"},
        example="=user:pass",
    ),
    Flag(
        "--queue-size",
        "FLUXDEMO_QUEUE_SIZE",
        str(DEFAULT_QUEUE_SIZE),
        "jobs that may wait for the GPU; more are turned away (default: %(default)s)",
        int,
    ),
    Flag(
        "--max-upload-mb",
        "FLUXDEMO_MAX_UPLOAD_MB",
        str(DEFAULT_MAX_UPLOAD_BYTES // MB),
        "largest LoRA, uploaded or from the Hub, in MiB (default: %(default)s)",
        int,
    ),
    Flag(
        "--hub-loras",
        "FLUXDEMO_HUB_LORAS",
        "on",
        "whether visitors may name LoRAs on the Hugging Face Hub; off leaves the model's own download alone, "
        "unlike HF_HUB_OFFLINE=1 (default: %(default)s)",
        options={"choices": ("on", "off")},
    ),
    Flag(
        "--download-at-start",
        "FLUXDEMO_DOWNLOAD_AT_START",
        "auto",
        "fetch the model's files in the background at launch, the page saying how far it is, so that the first "
        "run does not download them; auto: on a Hugging Face Space (SPACE_ID set) (default: %(default)s)",
        options={"choices": ("auto", "on", "off")},
    ),
    Flag(
        "--ray",
        None,
        None,
        "make the model's images on Ray Serve replicas (pip install \"fluxdemo[ray]\"): at ADDRESS, a cluster's "
        "(`ray start --head` prints it); without one, RAY_ADDRESS or a cluster started on this machine, else a new "
        "one here",
        options={"nargs": "?", "const": RAY_HERE, "metavar": "ADDRESS"},
    ),
    Flag(
        "--replicas",
        None,
        None,
        "with --ray: model replicas, one device each (default: the running `fluxdemo serve`'s, else one per GPU, "
        "else 2 on the CPU)",
        int,
    ),
    Flag(
        "--hub-lora-quota-gb",
        "FLUXDEMO_HUB_LORA_QUOTA_GB",
        str(HUB_LORA_QUOTA_BYTES / GB),
        "the Hub LoRA cache's total; the least recently used files go first (default: %(default)s)",
        float,
    ),
)
LIMIT_FLAGS = (
    Flag(
        "--max-prompt-chars",
        "FLUXDEMO_MAX_PROMPT_CHARS",
        str(DEFAULT_MAX_PROMPT_CHARS),
        "longest prompt, in characters (default: %(default)s)",
        int,
    ),
    Flag(
        "--max-work",
        "FLUXDEMO_MAX_WORK",
        str(DEFAULT_MAX_WORK),
        "most work per request, in megapixels of tokens through one step (the prompt's tokens and the decode "
        "included); a 28-step 1024x1024 compare is 71 (default: %(default)s)",
        float,
    ),
    Flag(
        "--max-jobs-per-client",
        "FLUXDEMO_MAX_JOBS_PER_CLIENT",
        str(DEFAULT_MAX_JOBS_PER_CLIENT),
        "model jobs one client may have queued or running (default: %(default)s)",
        int,
    ),
    Flag(
        "--cache-images",
        "FLUXDEMO_CACHE_IMAGES",
        str(DEFAULT_CACHE_IMAGES),
        "images the results cache keeps in RAM so that a run reuses what an earlier one made, e.g. the baseline "
        "of a compare that changed only the strength; 0 turns it off (default: %(default)s)",
        int,
    ),
    Flag(
        "--batch",
        "FLUXDEMO_BATCH",
        "1",
        f"images denoised together in compares, sweeps and grids, 1 to {MAX_BATCH}: faster on a CPU "
        "(bench/RESULTS.md), within 1/255 of one at a time, more activation memory (default: %(default)s, exact)",
        int,
    ),
    Flag(
        "--fast",
        "FLUXDEMO_FAST",
        "off",
        "start the page's Fast box ticked (--fast alone: on): a step-skipping cache on one schedule shared by every "
        "image of a run, labelled on each result; a visitor may untick it for their own requests (default: "
        "%(default)s)",
        options={"nargs": "?", "const": "on", "choices": ("on", "off")},
    ),
    Flag(
        "--preview-decoder",
        "FLUXDEMO_PREVIEW_DECODER",
        None,
        "how live previews are drawn: a folder with TAEF1 (full-size pictures), or off (the latent projection, "
        "1/8 size); default: TAEF1 from the Hugging Face cache if `hf download madebyollin/taef1` put it there, else "
        "the projection (a tiny model always uses the projection)",
        options={"metavar": "FOLDER|off"},
    ),
)
# The model flags a Space may set by variable (add_model_flags declares them); the strategy is the operator's only.
MODEL_VARIABLES = {
    "--model": "FLUXDEMO_MODEL",
    "--lora-dir": "FLUXDEMO_LORA_DIR",
    "--strategy": "FLUXDEMO_STRATEGY",
    "--weights": "FLUXDEMO_WEIGHTS",
    "--compile": "FLUXDEMO_COMPILE",
    "--compile-rank": "FLUXDEMO_COMPILE_RANK",
    "--compile-slots": "FLUXDEMO_COMPILE_SLOTS",
}
VARIABLES = {**MODEL_VARIABLES, **{f.flag: f.env for f in (*SERVER_FLAGS, *LIMIT_FLAGS) if f.env}}
EXAMPLES = {f.env: f.example for f in (*SERVER_FLAGS, *LIMIT_FLAGS) if f.example}
EPILOG = (
    textwrap.fill(
        f"environment (flags win): {', '.join(env + EXAMPLES.get(env, '') for env in VARIABLES.values())}; HF_TOKEN "
        "for the gated FLUX.1-dev files (never sent for a visitor's LoRA); FLUXDEMO_HUB_LORA_TOKEN, a separate token "
        "for Hub LoRAs only (a secret: any visitor can use what it can read).",
        width=116,
    )
    + "\n--model tiny runs fully offline on random weights built locally.\n"
)


def named(flag: str) -> str:
    """How an error names a setting: the flag and its variable."""
    return f"{flag} (or {VARIABLES[flag]})"


def _add_flags(group: argparse._ArgumentGroup, flags: tuple[Flag, ...], env: dict[str, str]) -> None:
    for f in flags:
        options = dict(f.options or {}, help=f.help)
        if f.env:
            options["default"] = env.get(f.env, f.default)
        if f.type:
            options["type"] = f.type
        group.add_argument(f.flag, **options)


def build_parser(env: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The app's flags; their defaults come from the environment (a Space sets them there) or the built-ins."""
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="python app.py",
        description="The fluxdemo studio: FLUX.1-dev with and without a LoRA, from one seed, in a browser.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every move and library detail")
    add_model_flags(parser)
    _add_flags(parser.add_argument_group("server"), SERVER_FLAGS, env)
    _add_flags(
        parser.add_argument_group("limits per request (fluxdemo/pipeline/limits.py; SECURITY.md)"), LIMIT_FLAGS, env
    )
    # Parser-level defaults override add_model_flags' own.
    parser.set_defaults(
        model=env.get("FLUXDEMO_MODEL", DEFAULT_PRESET),
        strategy=env.get("FLUXDEMO_STRATEGY", "auto"),
        weights=env.get("FLUXDEMO_WEIGHTS", "auto"),
        compile=env.get("FLUXDEMO_COMPILE", "off"),
        compile_rank=env.get("FLUXDEMO_COMPILE_RANK", str(DEFAULT_RANK)),  # a string default goes through `type`
        compile_slots=env.get("FLUXDEMO_COMPILE_SLOTS", str(DEFAULT_SLOTS)),
        lora=None,
    )
    if env.get("FLUXDEMO_LORA_DIR"):
        parser.set_defaults(lora_dir=Path(env["FLUXDEMO_LORA_DIR"]))
    return parser


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if not value:
        return None
    user, colon, password = value.partition(":")
    if not (user.strip() and colon and password.strip()):
        raise FluxdemoError(f"{named('--auth')} must be USER:PASS, both parts non-empty, e.g. me:s3cret.")
    return user, password


def check_flags(args: argparse.Namespace) -> Limits:
    """The server flags that argparse's types cannot judge -> the request limits; else a sentence (exit 2)."""
    if args.queue_size < 1:
        raise FluxdemoError(f"{named('--queue-size')} must be at least 1, but is {args.queue_size}.")
    if args.max_upload_mb < 1:
        raise FluxdemoError(f"{named('--max-upload-mb')} must be at least 1, but is {args.max_upload_mb}.")
    if args.strategy not in ("auto", *STRATEGIES):
        choices = ", ".join(("auto", *STRATEGIES))
        raise FluxdemoError(f"{named('--strategy')} must be one of {choices}, but is {args.strategy!r}.")
    if args.weights not in WEIGHT_FORMATS:
        choices = ", ".join(WEIGHT_FORMATS)
        raise FluxdemoError(f"{named('--weights')} must be one of {choices}, but is {args.weights!r}.")
    if args.compile not in COMPILE_CHOICES:
        raise FluxdemoError(f"{named('--compile')} must be on, off or aot, but is {args.compile!r}.")
    if args.cache_images < 0:
        raise FluxdemoError(f"{named('--cache-images')} must be 0 or more, but is {args.cache_images}.")
    if not 1 <= args.batch <= MAX_BATCH:
        raise FluxdemoError(f"{named('--batch')} must be from 1 to {MAX_BATCH}, but is {args.batch}.")
    if args.replicas is not None and args.ray is None:
        raise FluxdemoError("--replicas needs --ray: replicas are Ray Serve's.")
    for f in (*SERVER_FLAGS, *LIMIT_FLAGS):  # argparse checks a flag's choices, not a variable's
        choices, value = (f.options or {}).get("choices"), getattr(args, f.flag[2:].replace("-", "_"))
        if choices and value not in choices:
            one_of = f"{', '.join(choices[:-1])} or {choices[-1]}"
            raise FluxdemoError(f"{named(f.flag)} must be {one_of}, but is {value!r}.")
    if not 0 < args.hub_lora_quota_gb < float("inf"):
        quota = args.hub_lora_quota_gb
        raise FluxdemoError(f"{named('--hub-lora-quota-gb')} must be a number above 0, but is {quota}.")
    low, high = PUBLIC_STRENGTH_RANGE if is_public(args) else STRENGTH_RANGE  # the CLI's range, unless public
    return Limits(
        max_prompt_chars=args.max_prompt_chars,
        max_work=args.max_work,
        max_jobs_per_client=args.max_jobs_per_client,
        strength_min=low,
        strength_max=high,
    )


def hub_loras(args: argparse.Namespace) -> HubLoras:
    """Visitors' Hub LoRAs as the operator set them: never HF_TOKEN, the app's size limit, a cache quota."""
    return HubLoras(
        enabled=args.hub_loras == "on",
        max_bytes=args.max_upload_mb * MB,
        quota_bytes=int(args.hub_lora_quota_gb * GB),
        token=os.environ.get("FLUXDEMO_HUB_LORA_TOKEN") or None,
    )


def start_download(args: argparse.Namespace, preset: Preset, env: Mapping[str, str]) -> Prefetch | None:
    """The start-up download (--download-at-start), started; None when it is off or there is nothing to fetch.
    ZeroGPU needs none: it loads everything before the launch (zero_gpu.preload_for_zero_gpu)."""
    wanted = args.download_at_start == "on" or (args.download_at_start == "auto" and bool(env.get("SPACE_ID")))
    prefetch = Prefetch(preset)
    if not (wanted and prefetch.needed):
        return None
    logger.info("Downloading the files of %s in the background; the page says how far it is.", preset.name)
    return prefetch.start()


def is_public(args: argparse.Namespace) -> bool:
    return args.share or args.host not in LOCAL_HOSTS


def launch_options(args: argparse.Namespace, auth: tuple[str, str] | None) -> dict:
    """demo.launch's arguments. A share link or a host other than loopback is public (SECURITY.md): it warns
    without --auth, and turns off gradio's monitoring endpoints (usage analytics) and its server-error details."""
    public = is_public(args)
    if public and auth is None:
        where = "--share" if args.share else f"--host {args.host}"
        logger.warning(
            "%s without --auth: anyone who reaches it can run jobs on this machine. Add --auth USER:PASS.", where
        )
    options = dict(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=auth,
        max_file_size=args.max_upload_mb * MB,
        footer_links=["api", "gradio"],
        css=STUDIO_CSS,  # the page's layout on a phone (gradio 6 takes a page's CSS at launch)
        app_kwargs={"middleware": [Middleware(UploadQuota)]},  # gradio bounds each file's size, not their count
    )
    if public:
        options.update(enable_monitoring=False, show_error=False)
    return options


def scale_out(manager, args: argparse.Namespace) -> None:
    """The model's images made on Ray Serve replicas; Ray is imported here only, so without --ray it never is."""
    if zero_gpu.on_zero_gpu():
        raise FluxdemoError("--ray and ZeroGPU do not mix: on a ZeroGPU Space, Hugging Face's pool already scales.")
    try:
        from fluxdemo.serve import ServeSettings, serve_model
    except ImportError as e:
        raise FluxdemoError(f'--ray needs Ray Serve ({e.name} is missing): pip install "fluxdemo[ray]".') from e
    address = None if args.ray == RAY_HERE else args.ray
    serve_model(manager, ServeSettings(address=address, replicas=args.replicas))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(name)s: %(message)s"
    )
    if not args.verbose:
        quiet_libraries()
    try:
        auth = parse_auth(args.auth)
        limits = check_flags(args)
        on_zero_gpu = zero_gpu.on_zero_gpu()
        if on_zero_gpu and args.compile == "on":
            args.compile = "aot"  # torch.compile does not run on ZeroGPU, ahead-of-time programs do
        if on_zero_gpu:  # ZeroGPU's placement: everything on cuda from start-up, nothing moved in a task (zero_gpu.py)
            args.device, args.strategy = zero_gpu.ZERO_GPU_DEVICE, zero_gpu.ZERO_GPU_STRATEGY
        # a tiny model's steps take milliseconds: TAEF1's picture would cost more than the whole step
        draw = preview_drawer(args.preview_decoder or ("off" if PRESETS[args.model].transformer.kit else None))
        # the one model manager of the app; it loads the model on the first run
        manager, _ = manager_from_args(args, hub_loras(args))
        if on_zero_gpu:
            zero_gpu.preload_for_zero_gpu(manager, draw)
            zero_gpu.compile_ahead(manager, default_options(manager.preset))
        download = None if on_zero_gpu or args.ray is not None else start_download(args, manager.preset, os.environ)
        if args.ray is not None:
            scale_out(manager, args)
    except FluxdemoError as e:
        logger.error("%s", e)
        return 2
    demo = build_studio(
        manager,
        max_upload_bytes=args.max_upload_mb * MB,
        queue_size=args.queue_size,
        limits=limits,
        public=is_public(args),
        cache_images=args.cache_images,
        batch=args.batch,
        draw_preview=draw,
        download=download.state if download else None,
        fast=args.fast == "on",
    )
    # How Spaces and container hosts stop an app: exit as on Ctrl+C, so the atexit clean-ups (run folders) run
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        be_patient()  # gradio's own page check gives up after 3 s, which a busy machine can take
        demo.launch(**launch_options(args, auth))
    except KeyboardInterrupt:  # a stop while the server was still starting: a stop all the same
        logger.info("Stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
