"""The studio: one gr.Blocks over the model manager. Type a prompt, pick a LoRA and a strength, press Compare, and
drag a slider across the base model's image and the LoRA's, both from the same seed; sweep the strength, read the
LoRA's card, and see where the seconds went.

UI values become a GenerateOptions here, at the edge; below this module everything is the library. Errors a person
can act on (FluxdemoError) reach the page as gr.Error carrying the library's sentence; anything else is logged with
its traceback and shown as a short sentence that points at the server log.
"""

from __future__ import annotations

import atexit
import errno
import functools
import logging
import random
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import gradio as gr
from PIL import Image

from fluxdemo.admission import CHEAP_QUEUE_SIZE, Admission
from fluxdemo.config import PRESETS, Preset
from fluxdemo.errors import CancelledError, FluxdemoError, OptionsError
from fluxdemo.images import params_from_report, save_png, side_by_side
from fluxdemo.limits import DEFAULT_LIMITS, Limits, check_request, for_visitor
from fluxdemo.lora import save_upload
from fluxdemo.manager import MODEL_COMPONENTS, STRATEGIES, ModelManager
from fluxdemo.pipeline import (
    MAX_SEED,
    MAX_SIDE,
    MAX_STEPS,
    MIN_SIDE,
    SIDE_MULTIPLE,
    Controls,
    GenerateOptions,
    Result,
    compare,
    generate,
    sweep,
)
from fluxdemo.spaces_gpu import run_on_gpu

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 512 * 2**20
DEFAULT_QUEUE_SIZE = 16
STRENGTH_MIN, STRENGTH_MAX = 0.0, 2.0
GUIDANCE_MAX = 10.0  # FLUX.1-dev's distilled guidance: 3.5 by default, rarely useful past 10
DEFAULT_SWEEP = "0, 0.25, 0.5, 0.75, 1, 1.25"
MAX_SWEEP_IMAGES = 8  # each image is one more denoising loop on the one shared GPU
KEEP_RUNS = 16  # run folders kept on disk; gradio serves its own copies of what it has shown
SIZE_PRESETS = {
    "1:1 · 1024×1024": (1024, 1024),
    "4:3 · 1152×896": (1152, 896),
    "3:4 · 896×1152": (896, 1152),
    "3:2 · 1216×832": (1216, 832),
    "16:9 · 1344×768": (1344, 768),
    "9:16 · 768×1344": (768, 1344),
    "1:1 · 512×512": (512, 512),
    "1:1 · 256×256": (256, 256),
}
EXAMPLES = [
    "a photo of a cat sitting on a wooden table, soft window light",
    "a watercolor painting of a lighthouse on a rocky island at sunset",
    "portrait of an astronaut in a field of flowers, cinematic lighting",
    "a tiny robot reading a book in a cozy library, detailed illustration",
]
STRATEGY_HELP = (
    "auto: planned from free memory for each image size. resident: all on the GPU; model-offload: one large part "
    "at a time; group-offload: the transformer a few blocks at a time; disk: the least RAM"
)
STAGE_LABELS = {"baseline": "baseline", "lora": "LoRA"}  # the pipeline's image labels as the page writes them


# --- plain functions: UI values in, library values out, and back -------------------------------------------------


def default_options(preset: Preset) -> GenerateOptions:
    """FLUX.1-dev's defaults; a tiny kit's random weights show no more at 1024 px, so it starts small and quick."""
    if preset.transformer.kit:
        return GenerateOptions("", steps=12, width=256, height=256)
    return GenerateOptions("")


def to_options(
    prompt: str | None,
    seed: float | None,
    steps: float | None,
    guidance: float | None,
    width: float | None,
    height: float | None,
) -> GenerateOptions:
    """The page's values as the library's options; GenerateOptions.validate() then checks their ranges."""
    whole = {"seed": seed, "steps": steps, "width": width, "height": height}
    for name, value in {**whole, "guidance": guidance}.items():
        if value is None:
            raise OptionsError(f"`{name}` is empty: enter a number.")
    for name, value in whole.items():
        if float(value) != int(value):
            raise OptionsError(f"`{name}` must be a whole number, but is {value}.")
    return GenerateOptions(
        prompt or "", seed=int(seed), steps=int(steps), guidance=float(guidance), width=int(width), height=int(height)
    )


def parse_strengths(text: str | None) -> list[float]:
    """A sweep's strengths from text such as "0, 0.5, 1": in the order given, each once."""
    try:
        strengths = [float(part) for part in (text or "").replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise OptionsError(f"Strengths are numbers between commas, like {DEFAULT_SWEEP!r}; got {text!r}.") from None
    strengths = list(dict.fromkeys(strengths))  # the pipeline labels images by strength, so a repeat would collide
    if not 1 <= len(strengths) <= MAX_SWEEP_IMAGES:
        raise OptionsError(f"A sweep takes 1 to {MAX_SWEEP_IMAGES} strengths, but got {len(strengths)}.")
    bad = [s for s in strengths if not STRENGTH_MIN <= s <= STRENGTH_MAX]
    if bad:
        raise OptionsError(f"Strengths must be between {STRENGTH_MIN:g} and {STRENGTH_MAX:g}, but {bad[0]:g} is not.")
    return strengths


def insert_trigger_words(prompt: str | None, report: dict | None) -> str:
    """The prompt with the LoRA's trigger words in front (those not already in it)."""
    prompt = (prompt or "").strip()
    words = [w for w in (report or {}).get("trigger_words", []) if w.lower() not in prompt.lower()]
    return ", ".join([*words, prompt] if prompt else words)


def lora_card(report: dict | None) -> str:
    """The LoRA report as a few lines of Markdown: what it is, what it adapts, its trigger words, what is wrong."""
    if not report:
        return "No LoRA selected: pick one from the folder, or upload a `.safetensors` file."
    modules = ", ".join(f"{group} {n}" for group, n in report["modules"].items())
    verdict = "fits the loaded model" if report["compatible"] else "**does not fit** the loaded model"
    lines = [
        f"### {report['name']}",
        f"**{report['format']}** LoRA, {verdict} · rank {report['rank']} · alpha {report['alpha']} · "
        f"{report['size'] / 1e6:.1f} MB",
        f"Adapts {report['targets']} modules ({modules or 'none'}); CLIP text encoder: "
        f"{'yes' if report['text_encoder'] else 'no'}",
        f"Base model: {report['base_model_hint'] or 'unknown'}",
        "Trigger words: " + (", ".join(f"`{w}`" for w in report["trigger_words"]) or "none listed"),
    ]
    lines += [f"- **Problem:** {p}" for p in report["problems"]] + [f"- Warning: {w}" for w in report["warnings"]]
    return "\n\n".join(lines)


def stage_seconds(report: dict):
    """Seconds per stage (loads, encoders, each image's denoising loop, decode) as a table; single steps left out."""
    import pandas as pd

    rows = [(s["name"], round(s["seconds"], 3)) for s in report["timeline"] if " step " not in s["name"]]
    return pd.DataFrame(rows, columns=["stage", "seconds"])


def run_summary(report: dict) -> str:
    """What ran, with which seed, how fast, with which memory strategy and how much memory."""
    o, model, memory = report["options"], report["model"], report.get("memory", {})
    per_step: dict[str, list[float]] = {}
    for stage in report["timeline"]:
        label, _, _ = stage["name"].rpartition(" step ")
        if label:
            per_step.setdefault(label, []).append(stage["seconds"])
    speeds = ", ".join(f"{STAGE_LABELS.get(k, k)} {sum(v) / len(v):.3f} s/step" for k, v in per_step.items())
    peaks = [f"peak GPU memory {memory['peak_device_bytes'] / 2**30:.2f} GiB"] if "peak_device_bytes" in memory else []
    peaks += [f"peak RAM {memory['peak_rss_bytes'] / 2**30:.2f} GiB"] if "peak_rss_bytes" in memory else []
    images = len(report["strengths"])
    lines = [
        f"**Seed {o['seed']}** · {o['steps']} steps · guidance {o['guidance']:g} · {o['width']}×{o['height']} · "
        f"{images} image{'s' * (images > 1)} in {report['seconds']:.2f} s",
        f"Memory strategy **{report['strategy']}** on {model['device']} ({model['dtype']}) · " + " · ".join(peaks),
        f"Denoising: {speeds}",
    ]
    lines += [f"Note: {event}" for event in report.get("events", [])]  # e.g. an out-of-memory fallback
    return "\n\n".join(lines)


def model_summary(manager: ModelManager, host_facts: bool = True) -> str:
    """The preset, the device and (unless the page is public: it tells free RAM and VRAM) the memory plan."""
    preset = manager.preset
    others = ", ".join(f"`{name}`" for name in PRESETS if name != preset.name)
    plan = f"Memory plan: {manager.plan.reason}" if host_facts else f"Memory strategy: {manager.requested_strategy}."
    return (
        f"Model preset **{preset.name}**: {preset.description}. One model per app: start it with `--model NAME` "
        f"for another ({others}).\n\nRunning on **{manager.device}** ({str(manager.dtype).removeprefix('torch.')}). "
        + plan
    )


def show_run(report: dict, run: dict) -> tuple:
    """After a run: the PNGs to download, the stage chart, the summary, and the tab that shows the images."""
    return run["files"], stage_seconds(report), run_summary(report), gr.Tabs(selected=run["tab"])


def show_card(report: dict | None) -> tuple:
    """The LoRA card, and the trigger-word button only when there are trigger words."""
    return lora_card(report), gr.Button(visible=bool(report and report["trigger_words"]))


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


def size_of(preset: str) -> tuple[int, int]:
    return SIZE_PRESETS[preset]


def preset_of(width: float, height: float) -> str | None:
    """The size preset for a width and height; None (no preset shown) for any other size."""
    return next((name for name, size in SIZE_PRESETS.items() if size == (width, height)), None)


# An absolute path of two or more parts, e.g. /root/.cache/huggingface/hub (quotes and brackets end it).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:[^\s/'\"`()]+/)+[^\s/'\"`()]*")


def without_paths(message: str) -> str:
    """The library's sentence with the machine's absolute paths cut to their last part: a page may be public, and
    where the server keeps its files is none of a visitor's business (the server log keeps the full message)."""
    return _ABSOLUTE_PATH.sub(lambda m: ".../" + m.group(0).rstrip("/").rsplit("/", 1)[-1], message)


def for_people(fn: Callable) -> Callable:
    """Turn a handler's errors into what a person can read: the library's sentence for errors they can act on, and
    for anything else a short note while the traceback goes to the server log."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except CancelledError as e:
            logger.info("%s", e)
            raise gr.Error(without_paths(str(e)), title="Cancelled", print_exception=False) from None
        except FluxdemoError as e:
            logger.warning("%s: %s", fn.__name__, e)
            raise gr.Error(without_paths(str(e)), print_exception=False) from None
        except Exception as e:
            logger.exception("%s failed", fn.__name__)
            # Only the kind of error: its text can hold paths and internals, which a public page must not show.
            raise gr.Error(
                f"Something went wrong on the server ({type(e).__name__}); the details are in the server log.",
                print_exception=False,
            ) from None

    return wrapper


class CancelFlags:
    """One threading.Event per browser session: Cancel sets it, the session's running job polls it after each step.

    gradio's own `cancels=` stops the page waiting, but not the worker thread; this stops the work itself.
    """

    def __init__(self) -> None:
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def begin(self, session: str) -> threading.Event:
        with self._lock:
            event = self._events[session] = threading.Event()
            return event

    def end(self, session: str) -> None:
        with self._lock:
            self._events.pop(session, None)

    def cancel(self, session: str) -> bool:
        """Ask the session's running job to stop; False when it has none."""
        with self._lock:
            event = self._events.get(session)
        if event is not None:
            event.set()
        return event is not None


class RunFolders:
    """A fresh folder per run for the PNGs the page shows and offers; older ones go once KEEP_RUNS are newer, since
    gradio has copied what it showed into its own cache by then."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fluxdemo-studio-"))
        atexit.register(shutil.rmtree, self.root, True)
        self._count = 0
        self._lock = threading.Lock()

    def new(self) -> Path:
        with self._lock:
            self._count += 1
            folder = self.root / f"run-{self._count:06d}"
            folder.mkdir(parents=True)
            for old in sorted(self.root.glob("run-*"))[:-KEEP_RUNS]:
                shutil.rmtree(old, ignore_errors=True)
            return folder


# --- the handlers: one Studio per app, over its one model manager --------------------------------------------------


class Studio:
    """The event handlers. Model work goes through spaces_gpu.run_on_gpu, one job at a time (the queue's "gpu"
    concurrency group, and the manager's lock behind it)."""

    def __init__(
        self,
        manager: ModelManager,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        limits: Limits = DEFAULT_LIMITS,
        public: bool = False,
    ) -> None:
        self.manager = manager
        self.library = manager.adapters.library
        self.max_upload_bytes = max_upload_bytes
        self.limits = limits
        self.public = public  # a public app's reports carry no facts about the host
        self.admission: Admission | None = None  # set by build_studio once the queue exists
        self.cancel_flags = CancelFlags()
        self.runs = RunFolders()

    # -- model work -----------------------------------------------------------------------------------------------
    @for_people
    def compare(
        self,
        prompt: str,
        lora: str | None,
        strength: float,
        seed: float,
        steps: float,
        guidance: float,
        width: float,
        height: float,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:
        """Baseline and LoRA image from one seed -> ((baseline.png, lora.png), report)."""
        if not lora:
            raise gr.Error("Pick a LoRA to compare with the base model, or upload one.", print_exception=False)
        result = self._run(
            compare, to_options(prompt, seed, steps, guidance, width, height), lora, strength, request, progress
        )
        folder = self.runs.new()
        base, adapted = result.images["baseline"], result.images["lora"]
        pictures = (("baseline", base), ("lora", adapted), ("side_by_side", side_by_side(base, adapted)))
        files = [self._png(folder / f"{role}.png", image, result, "baseline" if role == "baseline" else "lora", role)
                 for role, image in pictures]  # fmt: skip
        return (files[0], files[1]), result.report, {"tab": "compare", "files": files}

    @for_people
    def generate(
        self,
        prompt: str,
        lora: str | None,
        strength: float,
        seed: float,
        steps: float,
        guidance: float,
        width: float,
        height: float,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:
        """One image, with the LoRA (none: the base model) -> (image.png, report)."""
        result = self._run(
            generate,
            to_options(prompt, seed, steps, guidance, width, height),
            lora or None,
            strength,
            request,
            progress,
        )
        ((label, image),) = result.images.items()
        path = self._png(self.runs.new() / f"{label}.png", image, result, label)
        return path, result.report, {"tab": "single", "files": [path]}

    @for_people
    def sweep(
        self,
        prompt: str,
        lora: str | None,
        strengths: str,
        seed: float,
        steps: float,
        guidance: float,
        width: float,
        height: float,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:
        """One image per strength, same seed -> ([(png, "strength 0.5"), ...], report)."""
        if not lora:
            raise gr.Error("Pick a LoRA to sweep its strength.", print_exception=False)
        result = self._run(
            sweep,
            to_options(prompt, seed, steps, guidance, width, height),
            lora,
            parse_strengths(strengths),
            request,
            progress,
        )
        folder = self.runs.new()
        gallery = []
        for label, image in result.images.items():
            path = self._png(folder / f"{label.replace(' ', '-')}.png", image, result, label, "lora")
            gallery.append((path, label))
        return gallery, result.report, {"tab": "sweep", "files": [path for path, _ in gallery]}

    def _run(
        self,
        task: Callable[..., Result],
        options: GenerateOptions,
        lora: str | None,
        strength: float | list[float],
        request: gr.Request,
        progress: gr.Progress,
    ) -> Result:
        strengths = strength if isinstance(strength, list) else [strength]
        check_request(options, len(strengths) + (task is compare), strengths, self.limits)  # before any model work
        session = request.session_hash or "no-session"
        cancelled = self.cancel_flags.begin(session)

        def on_step(stage: str, done: int, total: int) -> None:
            progress((done, total), desc=f"{STAGE_LABELS.get(stage, stage)} {done}/{total}")

        def stop() -> bool:  # Cancel pressed, or the client gone: nobody would see the rest
            return cancelled.is_set() or bool(self.admission and self.admission.client_gone(session))

        if not set(MODEL_COMPONENTS) <= set(self.manager.loaded()):
            progress(0, desc="Loading the model")
        try:
            result = run_on_gpu(task, self.manager, options, lora, strength, Controls(on_step, stop))
        finally:
            self.cancel_flags.end(session)
        if self.public:
            result.report = for_visitor(result.report)
        return result

    def _png(self, path: Path, image: Image.Image, result: Result, label: str, role: str | None = None) -> str:
        """The image as a PNG carrying its parameters, so a download keeps them."""
        try:
            return str(save_png(image, params_from_report(result.report, label, role), path))
        except FluxdemoError as e:  # save_png's sentence names the server's path and the CLI's --out
            if getattr(e.__cause__, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise FluxdemoError("The server's disk is full: the image was not saved (earlier ones are intact).") from e

    # -- LoRA files -------------------------------------------------------------------------------------------------
    def lora_choices(self, value: str | None = None) -> dict:
        """The LoRA folder as dropdown settings: choices (library names), and `value` kept when it is still there."""
        entries = self.library.entries
        names = [e.name for e in entries if e.refused is None]
        refused = [e for e in entries if e.refused is not None]
        info = f"{len(names)} in {self.library.folder.name}/"  # never the absolute path: the page is public
        if refused:
            info += f"; not listed: {', '.join(e.name for e in refused[:3])} (see the server log)"
        if value not in names:
            value = next((e.name for e in entries if e.usable), names[0] if names else None)
        return dict(choices=names, value=value, info=info)

    @for_people
    def refresh_loras(self, current: str | None) -> gr.Dropdown:
        """The dropdown after a look at the LoRA folder (files added, changed or removed since)."""
        for entry in self.library.refresh():
            if entry.refused:
                logger.warning("LoRA folder: %s not listed: %s", entry.name, entry.refused)
        return gr.Dropdown(**self.lora_choices(current))

    @for_people
    def upload_lora(self, file: str | None) -> str:
        """Store an uploaded .safetensors LoRA in the LoRA folder -> its name there (a known file keeps its name)."""
        if not file:
            raise gr.Error("Choose a .safetensors LoRA file to upload.", print_exception=False)
        src = Path(file)
        path = save_upload(src, self.library.folder, src.name, self.max_upload_bytes)
        gr.Info(f"Saved {src.name} as {path.name}.")
        return path.name

    @for_people
    def inspect_lora(self, lora: str | None) -> dict:
        """The LoRA report (format, rank, alpha, targets, trigger words, problems, ...) of a name in the folder."""
        if not lora:
            return {}
        return self.library.get(lora).report.to_dict()

    def cancel(self, request: gr.Request) -> None:
        if self.cancel_flags.cancel(request.session_hash or "no-session"):
            gr.Info("Cancelling after the current step.")


# --- the page ----------------------------------------------------------------------------------------------------


def build_studio(
    manager: ModelManager,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    defaults: GenerateOptions | None = None,
    limits: Limits = DEFAULT_LIMITS,
    public: bool = False,
) -> gr.Blocks:
    """The whole app over one model manager; the model loads on the first run, so building and launching are quick.

    `limits` bound each request (fluxdemo.limits); a `public` app shows no facts about its host."""
    studio = Studio(manager, max_upload_bytes, limits, public)
    d = defaults or default_options(manager.preset)
    manager.adapters.library.refresh()
    side = dict(minimum=MIN_SIDE, maximum=MAX_SIDE, step=SIDE_MULTIPLE)
    gpu_event = dict(concurrency_limit=1, concurrency_id="gpu")  # one model job at a time, across all events

    # gradio's cache of uploads and results: files older than a day go, checked every hour
    with gr.Blocks(title="fluxdemo studio", delete_cache=(3600, 86400)) as demo:
        gr.Markdown(
            "# fluxdemo studio\nThe base model and a LoRA, from the same seed, one slider apart. "
            f"Model: **{manager.preset.name}**; it loads on the first run."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=1,
                    max_lines=6,
                    autofocus=True,
                    placeholder="Describe the image. Enter runs Compare.",
                )
                gr.Examples(examples=[[p] for p in EXAMPLES], inputs=[prompt], label="Examples")
                # allow_custom_value: API callers may name a LoRA added since; the library checks every name
                lora = gr.Dropdown(label="LoRA", allow_custom_value=True, **studio.lora_choices())
                with gr.Row():
                    refresh = gr.Button("Refresh the LoRA folder", size="sm")
                    upload = gr.UploadButton("Upload a .safetensors LoRA", file_types=[".safetensors"], size="sm")
                strength = gr.Slider(STRENGTH_MIN, STRENGTH_MAX, value=1.0, step=0.05, label="LoRA strength")
                with gr.Row(equal_height=False):
                    seed = gr.Number(d.seed, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, scale=3)
                    dice = gr.Button("Random seed", scale=1, size="sm")
                with gr.Row():
                    steps = gr.Slider(1, MAX_STEPS, value=d.steps, step=1, label="Steps")
                    guidance = gr.Slider(0, GUIDANCE_MAX, value=d.guidance, step=0.1, label="Guidance")
                size_preset = gr.Dropdown(list(SIZE_PRESETS), value=preset_of(d.width, d.height), label="Size preset")
                with gr.Row():
                    width = gr.Slider(value=d.width, label="Width", **side)
                    height = gr.Slider(value=d.height, label="Height", **side)
                with gr.Row():
                    compare_button = gr.Button("Compare", variant="primary", scale=2)
                    cancel = gr.Button("Cancel", variant="stop", scale=1)
                with gr.Row():
                    generate_button = gr.Button("Generate one image", size="sm")
                    sweep_button = gr.Button("Sweep strengths", size="sm")
                with gr.Accordion("Advanced", open=False):
                    strengths = gr.Textbox(
                        DEFAULT_SWEEP, label="Sweep strengths", info=f"up to {MAX_SWEEP_IMAGES}, between 0 and 2"
                    )
                    # Shown, not set: the strategy is global, so only the operator sets it (--strategy)
                    gr.Dropdown(
                        ["auto", *STRATEGIES],
                        value=manager.requested_strategy,
                        label="Memory strategy (set with --strategy or FLUXDEMO_STRATEGY)",
                        info=STRATEGY_HELP,
                        interactive=False,
                    )
                    gr.Markdown(model_summary(manager, host_facts=not public))
                with gr.Group():
                    card = gr.Markdown(lora_card(None), padding=True)
                    trigger = gr.Button("Insert trigger words into the prompt", size="sm", visible=False)
                with gr.Accordion("LoRA report (JSON)", open=False):
                    report_json = gr.JSON(label="LoRA report")
            with gr.Column(scale=3, min_width=320):
                with gr.Tabs() as tabs:
                    with gr.Tab("Compare", id="compare"):
                        slider = gr.ImageSlider(
                            label="left: baseline · right: LoRA",
                            type="filepath",
                            format="png",
                            buttons=["download", "fullscreen"],
                            max_height=768,
                        )
                    with gr.Tab("Strength sweep", id="sweep"):
                        gallery = gr.Gallery(
                            label="Same seed, rising strength", format="png", columns=3, object_fit="contain"
                        )
                    with gr.Tab("Single image", id="single"):
                        single = gr.Image(label="Image", type="filepath", format="png")
                downloads = gr.File(label="Download PNGs (they carry their parameters)", file_count="multiple")
                with gr.Accordion("Run", open=True):
                    run_md = gr.Markdown("Nothing run yet.")
                    chart = gr.BarPlot(
                        x="stage",
                        y="seconds",
                        sort="-y",
                        y_lim=[0, None],
                        x_label_angle=-30,
                        height=300,
                        label="Where the seconds went, by stage",
                    )
                with gr.Accordion("Run report (JSON)", open=False):
                    info = gr.JSON(label="Run report")
        last_run = gr.State()

        # -- events: the model jobs share one concurrency group; everything else is instant ---------------------
        params = [seed, steps, guidance, width, height]
        jobs = [
            gr.on(
                [compare_button.click, prompt.submit],
                studio.compare,
                [prompt, lora, strength, *params],
                [slider, info, last_run],
                api_name="compare",
                **gpu_event,
            ),
            generate_button.click(
                studio.generate,
                [prompt, lora, strength, *params],
                [single, info, last_run],
                api_name="generate",
                **gpu_event,
            ),
            sweep_button.click(
                studio.sweep,
                [prompt, lora, strengths, *params],
                [gallery, info, last_run],
                api_name="sweep",
                **gpu_event,
            ),
        ]
        for job in jobs:
            job.success(show_run, [info, last_run], [downloads, chart, run_md, tabs], api_visibility="private")
        # Cheap events skip the queue from a page, and join it from gradio_client under a bound of their own
        # (fluxdemo.admission): a full model queue never turns away a Cancel, an inspect, a refresh or an upload.
        cheap = dict(queue=False)
        cancel.click(studio.cancel, None, None, api_name="cancel", cancels=jobs, concurrency_limit=None, **cheap)

        inspect = dict(fn=studio.inspect_lora, inputs=lora, outputs=report_json)
        shown = [lora.change(**inspect, api_name="inspect_lora", **cheap),
                 demo.load(**inspect, api_visibility="private", **cheap)]  # fmt: skip
        for event in shown:
            event.success(show_card, report_json, [card, trigger], api_visibility="private")
        refresh.click(studio.refresh_loras, lora, lora, api_visibility="private", **cheap)
        uploaded = upload.upload(studio.upload_lora, upload, lora, api_name="upload_lora", **cheap)
        uploaded.success(studio.refresh_loras, lora, lora, api_visibility="private", **cheap)
        trigger.click(insert_trigger_words, [prompt, report_json], prompt, api_visibility="private")
        dice.click(random_seed, None, seed, api_visibility="private")
        size_preset.input(size_of, size_preset, [width, height], api_visibility="private")
        gr.on([width.input, height.input], preset_of, [width, height], size_preset, api_visibility="private",
              trigger_mode="always_last")  # fmt: skip

    # The bounds are the admission's (per concurrency group); gradio's own, over all events, sits above them all.
    # api_open=False: model jobs only through the queue, never by a direct POST that would skip its bounds.
    demo.queue(max_size=queue_size + CHEAP_QUEUE_SIZE * len(demo.fns), api_open=False)
    studio.admission = Admission(demo, limits, queue_size)
    return demo
