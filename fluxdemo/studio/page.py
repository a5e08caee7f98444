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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from fluxdemo.errors import CancelledError, FluxdemoError, OptionsError
from fluxdemo.lora.library import LoraLibrary, save_upload
from fluxdemo.model.manager import MODEL_COMPONENTS, STRATEGIES
from fluxdemo.model.presets import PRESETS, Preset
from fluxdemo.pipeline.api import (
    MAX_GRID_CELLS,
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
    grid,
    grid_pictures,
    stack_label,
    sweep,
)
from fluxdemo.pipeline.experiments import (
    DEFAULT_CACHE_IMAGES,
    MAX_LORAS_PER_RUN,
    MAX_STACK,
    LoraChoice,
    ResultsCache,
    Stack,
    as_stack,
)
from fluxdemo.pipeline.images import (
    GUIDANCE_MAX,
    ImageParams,
    difference,
    params_from_report,
    save_png,
    settings_from_png,
    side_by_side,
)
from fluxdemo.pipeline.limits import DEFAULT_LIMITS, Limits, check_prompt, check_request, for_visitor
from fluxdemo.pipeline.model import Model
from fluxdemo.pipeline.previews import DrawPreview, latent_preview
from fluxdemo.studio.admission import CHEAP_QUEUE_SIZE, Admission
from fluxdemo.studio.history import add, describe_loras, find, slider_label, stale_note
from fluxdemo.studio.zero_gpu import run_on_gpu
from fluxdemo.untrusted import MAX_LIST_ITEMS, MAX_SENTENCE_CHARS, markdown_text, names_list

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 512 * 2**20
DEFAULT_QUEUE_SIZE = 16
STRENGTH_MIN, STRENGTH_MAX = 0.0, 2.0
DEFAULT_SWEEP = "0, 0.25, 0.5, 0.75, 1, 1.25"
MAX_SWEEP_IMAGES = 8  # each image is one more denoising loop on the one shared GPU
DEFAULT_GRID_STRENGTHS = "0, 0.5, 1"
MAX_GRID_SEEDS = 4
EXTRA_ROWS = (2, 3, 4)  # the LoRA rows below the first: a stack holds up to four LoRAs
HUB_DOWNLOADS = 2  # Hub LoRA downloads at once, for every visitor together
PREVIEW_EVERY = 2  # steps between live previews; bench/speed.py measures what they cost
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


def parse_seeds(text: str | None) -> list[int]:
    """A grid's seeds from text such as "1, 2": whole numbers, each once."""
    try:
        seeds = list(dict.fromkeys(int(part) for part in (text or "").replace(";", ",").split(",") if part.strip()))
    except ValueError:
        raise OptionsError(f"Seeds are whole numbers between commas, like '1, 2'; got {text!r}.") from None
    if not 1 <= len(seeds) <= MAX_GRID_SEEDS:
        raise OptionsError(f"A grid takes 1 to {MAX_GRID_SEEDS} seeds, but got {len(seeds)}.")
    return seeds


def ui_stack(lora: str | None, strength: float, *rows) -> list[LoraChoice]:
    """The page's LoRA rows as one stack: the first row, then (name, strength) pairs of the rows below it that name a
    LoRA. An API caller may write the whole stack in the first row, as `a:0.8+b:0.5`."""
    stack = list(as_stack(lora, strength)) if lora else []
    for name, value in zip(rows[::2], rows[1::2], strict=True):
        if name:
            stack.extend(as_stack(name, value))
    return stack


@dataclass(frozen=True)
class Ask:
    """One model request as read from the page's values, checked whole before it is queued and again before it runs."""

    kind: str  # compare | generate | sweep | grid
    options: GenerateOptions  # a grid's first prompt and seed
    stacks: tuple[Stack, ...]  # one for compare, generate and sweep; a grid's rows
    columns: tuple[float, ...] = ()  # a sweep's or a grid's strengths
    prompts: tuple[str, ...] = ()  # a grid's prompts
    seeds: tuple[int, ...] = ()  # a grid's seeds

    @property
    def images(self) -> int:
        if self.kind == "grid":
            return len(self.prompts) * len(self.seeds) * len(self.stacks) * len(self.columns)
        return {"compare": 2, "generate": 1}.get(self.kind, len(self.columns))

    @property
    def lora_names(self) -> list[str]:
        """Every LoRA the request names, each once, in order."""
        return list(dict.fromkeys(choice.name for stack in self.stacks for choice in stack))


def read_request(kind: str, values: Sequence, limits: Limits = DEFAULT_LIMITS) -> Ask:
    """A model request from its handler's values, in the handler's order, with every check that needs no file and
    no network: numbers, strengths, the counts of LoRAs and images, the work budget. The admission runs it before a
    request is queued (nothing is downloaded for a request it refuses), and the handler again before the model."""
    if kind == "grid":
        prompt, prompts, rows, strengths, seeds, steps, guidance, width, height, first, strength, *pickers = values
        prompt_list = tuple(line for line in (prompts or "").splitlines() if line.strip()) or (prompt or "",)
        stacks = tuple(as_stack(line) for line in (rows or "").splitlines() if line.strip())
        stacks = stacks or (tuple(ui_stack(first, strength, *pickers)),)
        if not stacks[0]:
            raise OptionsError("A grid needs a LoRA row (one stack per line, e.g. style:0.8+detail:0.5), or a LoRA "
                               "picked above.")  # fmt: skip
        seed_list = tuple(parse_seeds(seeds))
        options = to_options(prompt_list[0], seed_list[0], steps, guidance, width, height)
        ask = Ask(kind, options, stacks, tuple(parse_strengths(strengths)), prompt_list, seed_list)
        for text in prompt_list[1:]:
            check_prompt(text, limits)
    else:
        prompt, first, strength, seed, steps, guidance, width, height, *pickers = values
        stack = tuple(ui_stack(first, 1.0 if kind == "sweep" else strength, *pickers))
        if kind != "generate" and not stack:
            goal = "sweep its strength" if kind == "sweep" else "compare with the base model"
            raise OptionsError(f"Pick a LoRA to {goal}, or upload one.")
        columns = tuple(parse_strengths(strength)) if kind == "sweep" else ()
        ask = Ask(kind, to_options(prompt, seed, steps, guidance, width, height), (stack,), columns)
    _check_counts(ask)
    strengths = [choice.strength for stack in ask.stacks for choice in stack]
    check_request(ask.options, ask.images, [*strengths, *ask.columns], limits)
    return ask


def _check_counts(ask: Ask) -> None:
    """At most MAX_STACK LoRAs a stack, MAX_LORAS_PER_RUN in all, MAX_GRID_CELLS images: counted from the names."""
    longest = max(len(stack) for stack in ask.stacks)
    if longest > MAX_STACK:
        raise OptionsError(f"A stack holds at most {MAX_STACK} LoRAs, but one here has {longest}.")
    names = ask.lora_names
    if len(names) > MAX_LORAS_PER_RUN:
        raise OptionsError(f"One run can use at most {MAX_LORAS_PER_RUN} different LoRAs, but this one names "
                           f"{len(names)}: split it into smaller runs.")  # fmt: skip
    if ask.kind == "grid" and ask.images > MAX_GRID_CELLS:
        raise OptionsError(
            f"A grid of {len(ask.prompts)} prompts x {len(ask.seeds)} seeds x {len(ask.stacks)} rows x "
            f"{len(ask.columns)} strengths is {ask.images} images; at most {MAX_GRID_CELLS} fit in one grid."
        )


def unfetched_hub_loras(library: LoraLibrary, ask: Ask, scan: bool = True) -> list[str]:
    """The request's Hub LoRAs not downloaded yet: a model job never downloads, so these must be fetched first.
    scan=False reads the LoRA folder as last scanned (the admission runs in the server's event loop)."""
    return [name for name in ask.lora_names if library.is_hub_name(name, scan) and not library.fetched(name)]


def controls_params(manager: Model, prompt, lora, strength, seed, steps, guidance, width, height,
                    *rows) -> ImageParams | None:  # fmt: skip
    """What the controls would make, as ImageParams (to compare with the result on screen); None while a control
    holds no valid value."""
    try:
        o = to_options(prompt, seed, steps, guidance, width, height)
        stack = ui_stack(lora, strength, *rows)
    except (OptionsError, TypeError, ValueError):
        return None
    return ImageParams(
        o.prompt,
        o.seed,
        o.steps,
        o.guidance,
        o.width,
        o.height,
        manager.preset.name,
        manager.preset.transformer_quant,
        loras=tuple((c.name, None, c.strength) for c in stack),
    )


def insert_trigger_words(prompt: str | None, report: dict | None) -> str:
    """The prompt with the LoRA's trigger words in front (those not already in it)."""
    prompt = (prompt or "").strip()
    words = [w for w in (report or {}).get("trigger_words", []) if w.lower() not in prompt.lower()]
    return ", ".join([*words, prompt] if prompt else words)


def lora_card(report: dict | None) -> str:
    """The LoRA report as a few lines of Markdown: what it is, what it adapts, its trigger words, what is wrong.
    Everything a file chose (names, metadata, trigger words) is escaped: it shows as text, never as a tag or link."""
    if not report:
        return "No LoRA selected: pick one from the folder, or upload a `.safetensors` file."
    text = markdown_text
    modules = ", ".join(f"{text(group)} {n}" for group, n in report["modules"].items())
    verdict = "fits the loaded model" if report["compatible"] else "**does not fit** the loaded model"
    words = ", ".join(text(w) for w in report["trigger_words"][:MAX_LIST_ITEMS])
    lines = [
        f"### {text(report['name'])}",
        f"**{text(report['format'])}** LoRA, {verdict} · rank {text(report['rank'])} · "
        f"alpha {text(report['alpha'])} · {report['size'] / 1e6:.1f} MB",
        f"Adapts {text(report['targets'])} modules ({modules or 'none'}); CLIP text encoder: "
        f"{'yes' if report['text_encoder'] else 'no'}",
        f"Base model: {text(report['base_model_hint'] or 'unknown')}",
        "Trigger words: " + (words or "none listed"),
    ]
    lines += [f"- **Problem:** {text(p, MAX_SENTENCE_CHARS)}" for p in report["problems"][:MAX_LIST_ITEMS]]
    lines += [f"- Warning: {text(w, MAX_SENTENCE_CHARS)}" for w in report["warnings"][:MAX_LIST_ITEMS]]
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
    loras = {describe_loras(ImageParams(**_params_fields(o), model="", quant="",
                                        loras=tuple((x["name"], x["sha256"], x["strength"]) for x in image["loras"])))
             for image in report["images"].values()}  # fmt: skip
    reused = f" · reused: {', '.join(report['reused'])}" if report.get("reused") else ""
    lines = [
        f"**Seed {o['seed']}** · {o['steps']} steps · guidance {o['guidance']:g} · {o['width']}×{o['height']} · "
        f"{images} image{'s' * (images > 1)} in {report['seconds']:.2f} s{reused}",
        "LoRAs: " + " | ".join(sorted(loras)),
        f"Memory strategy **{report['strategy']}** on {model['device']} ({model['dtype']}) · " + " · ".join(peaks),
        f"Denoising: {speeds}",
    ]
    lines += [f"Note: {event}" for event in report.get("events", [])]  # e.g. an out-of-memory fallback
    return "\n\n".join(lines)


def _params_fields(options: dict) -> dict:
    return {k: options[k] for k in ("prompt", "seed", "steps", "guidance", "width", "height")}


def model_summary(manager: Model, host_facts: bool = True) -> str:
    """The preset, the device and (unless the page is public: it tells free RAM and VRAM) the memory plan."""
    preset = manager.preset
    others = ", ".join(f"`{name}`" for name in PRESETS if name != preset.name)
    plan = f"Memory plan: {manager.plan.reason}" if host_facts else f"Memory strategy: {manager.requested_strategy}."
    return (
        f"Model preset **{preset.name}**: {preset.description}. One model per app: start it with `--model NAME` "
        f"for another ({others}).\n\nRunning on **{manager.device}** ({str(manager.dtype).removeprefix('torch.')}). "
        + plan
    )


def show_run(report: dict, run: dict, history: list) -> tuple:
    """After a run: the PNGs to download, the stage chart, the summary, the tab that shows the images, the history
    strip and the A/B pickers (a compare puts its own pair there)."""
    titles = [e.title for e in history]
    picks = [gr.Dropdown(choices=titles, value=run[side]) if side in run else gr.Dropdown(choices=titles)
             for side in ("a", "b")]  # fmt: skip
    tab = gr.Tabs(selected=run["tab"])
    return run["files"], stage_seconds(report), run_summary(report), tab, history_strip(history), *picks


def history_strip(history: list) -> list[tuple[str, str]]:
    """The session's results, newest first, as gallery items (PNG, title); files expired from disk are left out."""
    return [(e.path, e.title) for e in reversed(history) if Path(e.path).is_file()]


def pick_from_strip(history: list, evt: gr.SelectData) -> str | None:
    """A click on the history strip puts that result on the slider's right side (B)."""
    shown = [e for e in reversed(history) if Path(e.path).is_file()]
    return shown[evt.index].title if 0 <= evt.index < len(shown) else gr.skip()


def swap(a: str | None, b: str | None) -> tuple:
    return b, a


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
    """threading.Events per browser session: Cancel sets them, the session's running work polls them (after each
    step, between a download's chunks).

    gradio's own `cancels=` stops the page waiting, but not the worker thread; this stops the work itself.
    """

    def __init__(self) -> None:
        self._events: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()

    def begin(self, session: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._events.setdefault(session, set()).add(event)
        return event

    def end(self, session: str, event: threading.Event) -> None:
        with self._lock:
            mine = self._events.get(session, set())
            mine.discard(event)
            if not mine:
                self._events.pop(session, None)

    def cancel(self, session: str) -> bool:
        """Ask the session's running work to stop; False when it has none."""
        with self._lock:
            events = list(self._events.get(session, ()))
        for event in events:
            event.set()
        return bool(events)


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
        manager: Model,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        limits: Limits = DEFAULT_LIMITS,
        public: bool = False,
        cache_images: int = DEFAULT_CACHE_IMAGES,
        batch: int = 1,
        draw_preview: DrawPreview = latent_preview,
    ) -> None:
        self.manager = manager
        self.library = manager.adapters.library
        self.max_upload_bytes = max_upload_bytes
        self.limits = limits
        self.public = public  # a public app's reports carry no facts about the host
        self.admission: Admission | None = None  # set by build_studio once the queue exists
        self.cancel_flags = CancelFlags()
        self.runs = RunFolders()
        self.cache = ResultsCache(cache_images)  # shared by every session: the same request is the same picture
        self.batch = batch  # images per transformer pass (experiments.run): the operator's, like the strategy
        self.draw_preview = draw_preview  # fluxdemo.pipeline.previews: the latent projection or TAEF1
        self.previews: dict[str, tuple[str, Image.Image]] = {}  # session -> newest live preview of its job

    # -- model work -----------------------------------------------------------------------------------------------
    @for_people
    def compare(
        self, prompt: str, lora: str | None, strength: float, seed: float, steps: float, guidance: float,
        width: float, height: float, lora_2: str | None, strength_2: float, lora_3: str | None, strength_3: float,
        lora_4: str | None, strength_4: float, history: list | None, request: gr.Request,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:  # fmt: skip
        """Baseline and the LoRA stack's image from one seed -> ((baseline.png, lora.png), report)."""
        values = (prompt, lora, strength, seed, steps, guidance, width, height, lora_2, strength_2, lora_3,
                  strength_3, lora_4, strength_4)  # fmt: skip
        ask = self.read("compare", values)
        (stack,) = ask.stacks
        result = self._run(
            lambda m, c: compare(m, ask.options, stack, controls=c, cache=self.cache, batch=self.batch), ask,
            request, progress,
        )  # fmt: skip
        folder = self.runs.new()
        base, adapted = result.images["baseline"], result.images["lora"]
        both = side_by_side(base, adapted, ("base model", stack_label(stack)))
        files = [self._png(folder / "baseline.png", base, result, "baseline"),
                 self._png(folder / "lora.png", adapted, result, "lora"),
                 self._png(folder / "side_by_side.png", both, result, "lora", "side_by_side")]  # fmt: skip
        history = self._remember(history, "compare", result, {"baseline": files[0], "lora": files[1]})
        a, b = history[-2], history[-1]
        shown = controls_params(self.manager, *values)
        run = {
            "tab": "compare",
            "files": files,
            "a": a.title,
            "b": b.title,
            "shown": shown,
            "label": slider_label(a, b),
        }
        return (files[0], files[1]), result.report, run, history

    @for_people
    def generate(
        self, prompt: str, lora: str | None, strength: float, seed: float, steps: float, guidance: float,
        width: float, height: float, lora_2: str | None, strength_2: float, lora_3: str | None, strength_3: float,
        lora_4: str | None, strength_4: float, history: list | None, request: gr.Request,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:  # fmt: skip
        """One image, with the LoRA stack (none: the base model) -> (image.png, report)."""
        values = (prompt, lora, strength, seed, steps, guidance, width, height, lora_2, strength_2, lora_3,
                  strength_3, lora_4, strength_4)  # fmt: skip
        ask = self.read("generate", values)
        (stack,) = ask.stacks
        result = self._run(
            lambda m, c: generate(m, ask.options, stack, controls=c, cache=self.cache), ask, request, progress
        )
        ((label, image),) = result.images.items()
        path = self._png(self.runs.new() / f"{label}.png", image, result, label)
        history = self._remember(history, "generate", result, {label: path})
        shown = controls_params(self.manager, *values)
        return path, result.report, {"tab": "single", "files": [path], "shown": shown}, history

    @for_people
    def sweep(
        self, prompt: str, lora: str | None, strengths: str, seed: float, steps: float, guidance: float,
        width: float, height: float, lora_2: str | None, strength_2: float, lora_3: str | None, strength_3: float,
        lora_4: str | None, strength_4: float, history: list | None, request: gr.Request,
        progress: gr.Progress = gr.Progress(),
    ) -> tuple:  # fmt: skip
        """One image per strength (multiplying each LoRA's own), same seed -> ([(png, "strength 0.5"), ...],
        report)."""
        ask = self.read("sweep", (prompt, lora, strengths, seed, steps, guidance, width, height, lora_2, strength_2,
                                  lora_3, strength_3, lora_4, strength_4))  # fmt: skip
        (stack,) = ask.stacks
        result = self._run(
            lambda m, c: sweep(m, ask.options, stack, ask.columns, controls=c, cache=self.cache, batch=self.batch),
            ask, request, progress,
        )  # fmt: skip
        folder = self.runs.new()
        files = {label: self._png(folder / f"{label.replace(' ', '-')}.png", image, result, label)
                 for label, image in result.images.items()}  # fmt: skip
        history = self._remember(history, "sweep", result, files)
        gallery = [(path, label) for label, path in files.items()]
        return gallery, result.report, {"tab": "sweep", "files": list(files.values())}, history

    @for_people
    def grid(
        self, prompt: str, prompts: str, rows: str, strengths: str, seeds: str, steps: float, guidance: float,
        width: float, height: float, lora: str | None, strength: float, lora_2: str | None, strength_2: float,
        lora_3: str | None, strength_3: float, lora_4: str | None, strength_4: float, history: list | None,
        request: gr.Request, progress: gr.Progress = gr.Progress(),
    ) -> tuple:  # fmt: skip
        """LoRA rows (one stack per line; none: the stack of the LoRA pickers) x strength columns, for each prompt
        (one per line; none: `prompt`) and seed -> (grid pictures, cells, report)."""
        ask = self.read("grid", (prompt, prompts, rows, strengths, seeds, steps, guidance, width, height, lora,
                                 strength, lora_2, strength_2, lora_3, strength_3, lora_4, strength_4))  # fmt: skip
        result = self._run(
            lambda m, c: grid(m, ask.options, ask.prompts, ask.seeds, ask.stacks, ask.columns, controls=c,
                              cache=self.cache, batch=self.batch),
            ask, request, progress,
        )  # fmt: skip
        folder = self.runs.new()
        files = {}
        for n, cell in enumerate(result.report["cells"]):
            files[cell["label"]] = self._png(folder / f"cell-{n + 1:03d}.png", result.images[cell["label"]], result,
                                             cell["label"])  # fmt: skip
        pictures = []
        for p, (prompt, seed, picture) in enumerate(grid_pictures(result)):
            path = folder / f"grid-p{p + 1}-seed{seed}.png"
            picture.save(path)  # a picture of pictures: each cell's PNG carries its parameters
            pictures.append((str(path), f"seed {seed} · {prompt[:60]}"))
        history = self._remember(history, "grid", result, files)
        cell_gallery = [(files[c["label"]], c["label"]) for c in result.report["cells"]]
        run = {"tab": "grid", "files": [path for path, _ in pictures] + list(files.values())}
        return pictures, cell_gallery, result.report, run, history

    def read(self, kind: str, values: Sequence, scan: bool = True) -> Ask:
        """The request checked whole (read_request), and its Hub LoRAs already fetched."""
        ask = read_request(kind, values, self.limits)
        missing = unfetched_hub_loras(self.library, ask, scan)
        if missing:
            raise OptionsError(
                f"The Hub LoRA {names_list(missing)} is not downloaded yet: a model job never downloads. Use "
                '"Use a LoRA from the Hub" (the /hub_lora endpoint) with each name first, then run again.'
            )
        return ask

    def admit(self, kind: str) -> Callable[[list], None]:
        """The admission's rule for a model event: the request read and checked before it is queued."""
        return lambda data: self.read(kind, data[:-1], scan=False)  # the last value is the session's history

    def fetcher(self, kind: str) -> Callable:
        """fetch_loras for one kind of request, as an event handler (gradio hands `request` in by its annotation)."""

        def fetch(request: gr.Request, *values) -> None:
            self.fetch_loras(kind, values, request)

        return fetch

    @for_people
    def fetch_loras(self, kind: str, values: Sequence, request: gr.Request) -> None:
        """A model request's Hub LoRAs downloaded before it joins the GPU queue, in the Hub's own queue group;
        Cancel stops a download between its chunks."""
        ask = read_request(kind, values, self.limits)
        names = unfetched_hub_loras(self.library, ask)
        if not names:
            return
        session = request.session_hash or "no-session"
        cancelled = self.cancel_flags.begin(session)
        try:
            self.library.prefetch(names, cancelled.is_set)
        finally:
            self.cancel_flags.end(session, cancelled)

    def _run(
        self,
        task: Callable[[Model, Controls], Result],
        ask: Ask,
        request: gr.Request,
        progress: gr.Progress,
    ) -> Result:
        """A library task on the GPU, with progress (image i of n, step x of y), previews, Cancel and the budget."""
        session = request.session_hash or "no-session"
        cancelled = self.cancel_flags.begin(session)
        at = {"image": (1, 1)}

        def on_image(i: int, n: int, label: str) -> None:
            at["image"] = (i, n)

        def on_step(stage: str, done: int, total: int) -> None:
            i, n = at["image"]
            progress(((i - 1) * total + done, n * total),
                     desc=f"image {i} of {n} · {STAGE_LABELS.get(stage, stage)} · step {done}/{total}")  # fmt: skip

        def on_preview(stage: str, step: int, image: Image.Image) -> None:
            self.previews[session] = (f"{STAGE_LABELS.get(stage, stage)} · step {step}", image)

        def stop() -> bool:  # Cancel pressed, or the client gone: nobody would see the rest
            return cancelled.is_set() or bool(self.admission and self.admission.client_gone(session))

        if not set(MODEL_COMPONENTS) <= set(self.manager.loaded()):
            progress(0, desc="Loading the model")
        # A public app's caches are each visitor's own: what another visitor made must not show as "reused"
        scope = session if self.public else ""
        controls = Controls(progress=on_step, cancelled=stop, preview=on_preview, preview_every=PREVIEW_EVERY,
                            draw=self.draw_preview, on_image=on_image, cache_scope=scope)  # fmt: skip
        try:
            result = run_on_gpu(task, self.manager, ask.options, ask.images, controls)
        finally:
            self.cancel_flags.end(session, cancelled)
            self.previews.pop(session, None)
        if self.public:
            result.report = for_visitor(result.report)
        return result

    def _remember(self, history: list | None, kind: str, result: Result, files: dict[str, str]) -> list:
        """The session's history with this run's images added (each with the parameters its PNG carries)."""
        return add(history or [], kind, [(label, path, params_from_report(result.report, label))
                                         for label, path in files.items()])  # fmt: skip

    def _png(self, path: Path, image: Image.Image, result: Result, label: str, role: str | None = None) -> str:
        """The image as a PNG carrying its parameters, so a download keeps them."""
        try:
            return str(save_png(image, params_from_report(result.report, label, role), path))
        except FluxdemoError as e:  # save_png's sentence names the server's path and the CLI's --out
            if getattr(e.__cause__, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise FluxdemoError("The server's disk is full: the image was not saved (earlier ones are intact).") from e

    # -- previews, history and A/B: instant, no model work ------------------------------------------------------------
    def latest_preview(self, request: gr.Request):
        """The newest live preview of this session's running job (the page polls it while a job runs)."""
        latest = self.previews.get(request.session_hash or "no-session")
        if latest is None:
            return gr.skip()
        caption, image = latest
        return gr.Image(value=image, label=f"Live preview · {caption}")

    @for_people
    def show_pair(self, a_title: str | None, b_title: str | None, show_difference: bool, history: list | None):
        """The slider over any two results of the session, labelled with what differs; and their difference."""
        a, b = find(history or [], a_title), find(history or [], b_title)
        if a is None or b is None:
            return gr.skip(), gr.Image(visible=False)
        for entry in (a, b):
            if not Path(entry.path).is_file():
                raise FluxdemoError(f"Result #{entry.number} has expired from the server's disk; run it again.")
        slider = gr.ImageSlider(value=(a.path, b.path), label=slider_label(a, b))
        if not show_difference:
            return slider, gr.Image(visible=False)
        left, right = Image.open(a.path), Image.open(b.path)
        if left.size != right.size:
            raise FluxdemoError(f"#{a.number} and #{b.number} differ in size; a difference needs two of one size.")
        return slider, gr.Image(value=difference(left, right), visible=True,
                                label=f"Where #{a.number} and #{b.number} differ (brighter: more)")  # fmt: skip

    @for_people
    def settings_from_png(self, file: str | None) -> tuple:
        """The controls set from a PNG's parameters (fluxdemo's own, or A1111/Forge infotext), each value checked
        like the controls' own; what was changed, and LoRAs this app lacks, are said beside the confirmation."""
        if not file:
            return (gr.skip(),) * (8 + 2 * len(EXTRA_ROWS))
        settings = settings_from_png(Path(file), self.limits)
        params = settings.params
        if len(params.loras) > 1 + len(EXTRA_ROWS):
            raise FluxdemoError(f"The PNG names {len(params.loras)} LoRAs; the studio stacks at most "
                                f"{1 + len(EXTRA_ROWS)}.")  # fmt: skip
        loras = list(params.loras) + [("", None, 1.0)] * (1 + len(EXTRA_ROWS) - len(params.loras))
        missing = [name for name, _, _ in params.loras if not self._listed(name) and not self.library.fetched(name)]
        for note in settings.notes:
            gr.Warning(note)
        if missing:
            gr.Warning(f"Not in the LoRA folder: {names_list(missing)}. Upload them (or fetch them from the Hub) to "
                       "reproduce the picture.")  # fmt: skip
        stack = stack_label(tuple(LoraChoice(name, s) for name, _, s in params.loras))
        gr.Info(f"Set from the PNG: seed {params.seed}, {params.steps} steps, guidance {params.guidance:g}, "
                f"{params.width}x{params.height}, LoRAs {stack}.")  # fmt: skip
        rows = [value for name, _, s in loras[1:] for value in (name, s)]
        return (params.prompt, params.seed, params.steps, params.guidance, params.width, params.height,
                loras[0][0], loras[0][2], *rows)  # fmt: skip

    def _listed(self, name: str) -> bool:
        return any(entry.name == name and entry.usable for entry in self.library.entries)

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

    def refresh_pickers(self, first: str | None, *others: str | None) -> list:
        """Every LoRA picker of the stack after a look at the folder; the rows below the first keep an empty
        choice."""
        names = self.lora_choices()["choices"]
        return [self.refresh_loras(first)] + [gr.Dropdown(choices=names, value=v if v in names else "")
                                              for v in others]  # fmt: skip

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
    def hub_lora(self, ref: str | None, request: gr.Request) -> str:
        """A LoRA from the Hugging Face Hub (user/repo, user/repo/file.safetensors, @revision, or its URL): found,
        size-checked, downloaded into the app's Hub LoRA cache and inspected -> the name that picks it. Cancel stops
        the download."""
        ref = (ref or "").strip()
        if not ref:
            raise gr.Error("Type a Hub repo id such as user/repo (or user/repo/file.safetensors), or its URL.",
                           print_exception=False)  # fmt: skip
        session = request.session_hash or "no-session"
        cancelled = self.cancel_flags.begin(session)
        try:
            (entry,) = self.library.prefetch([ref], cancelled.is_set)
        finally:
            self.cancel_flags.end(session, cancelled)
        gr.Info(f"{ref}: a {entry.report.format} LoRA, ready to pick.")
        return ref

    def pick(self, name: str, first: str | None, *others: str | None) -> list:
        """The pickers after an upload or a Hub download: the folder listed again, the new LoRA in the first one."""
        pickers = self.refresh_pickers(first, *others)
        names = self.lora_choices()["choices"]
        pickers[0] = gr.Dropdown(choices=names if name in names else [*names, name], value=name)
        return pickers

    @for_people
    def inspect_lora(self, lora: str | None) -> dict:
        """The LoRA report (format, rank, alpha, targets, trigger words, problems, ...) of a name in the folder."""
        if not lora:
            return {}
        if self.library.is_hub_name(lora) and not self.library.fetched(lora):  # inspecting never downloads
            raise OptionsError(f'{lora} is a Hub LoRA not downloaded yet: press "Use a LoRA from the Hub" first.')
        return self.library.get(lora).report.to_dict()

    def cancel(self, request: gr.Request) -> None:
        if self.cancel_flags.cancel(request.session_hash or "no-session"):
            gr.Info("Cancelling after the current step.")


# --- the page ----------------------------------------------------------------------------------------------------


def build_studio(
    manager: Model,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    queue_size: int = DEFAULT_QUEUE_SIZE,
    defaults: GenerateOptions | None = None,
    limits: Limits = DEFAULT_LIMITS,
    public: bool = False,
    cache_images: int = DEFAULT_CACHE_IMAGES,
    batch: int = 1,
    draw_preview: DrawPreview = latent_preview,
) -> gr.Blocks:
    """The whole app over one model manager; the model loads on the first run, so building and launching are quick.

    `limits` bound each request (pipeline.limits); a `public` app shows no facts about its host; `cache_images` bounds
    the results cache that lets a run reuse what an earlier one made; `batch` is how many images may share a
    transformer pass; `draw_preview` draws the live previews."""
    studio = Studio(manager, max_upload_bytes, limits, public, cache_images, batch, draw_preview)
    d = defaults or default_options(manager.preset)
    manager.adapters.library.refresh()
    side = dict(minimum=MIN_SIDE, maximum=MAX_SIDE, step=SIDE_MULTIPLE)
    gpu_event = dict(concurrency_limit=1, concurrency_id="gpu")  # one model job at a time, across all events
    # Hub downloads: a group of their own, apart from the model's and the uploads'
    hub_event = dict(concurrency_limit=HUB_DOWNLOADS, concurrency_id="hub", api_visibility="private")
    # Cheap events skip the queue from a page, and join it from gradio_client under a bound of their own
    # (fluxdemo.studio.admission): a full model queue never turns away a Cancel, an inspect, a refresh or an upload.
    cheap = dict(queue=False, api_visibility="private")
    choices = studio.lora_choices()

    # gradio's cache of uploads and results: files older than a day go, checked every hour
    with gr.Blocks(title="fluxdemo studio", delete_cache=(3600, 86400)) as demo:
        gr.Markdown(
            "# fluxdemo studio\nThe base model and a LoRA stack, from the same seed, one slider apart. "
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
                # the buttons right under the prompt: the results column's top stays in view while a job runs
                with gr.Row():
                    compare_button = gr.Button("Compare", variant="primary", scale=2)
                    cancel = gr.Button("Cancel", variant="stop", scale=1)
                with gr.Row():
                    generate_button = gr.Button("Generate one image", size="sm")
                    sweep_button = gr.Button("Sweep strengths", size="sm")
                    grid_button = gr.Button("Grid", size="sm")
                # allow_custom_value: API callers may name a LoRA added since; the library checks every name
                with gr.Row(equal_height=True):
                    lora = gr.Dropdown(label="LoRA", allow_custom_value=True, scale=3, **choices)
                    strength = gr.Slider(STRENGTH_MIN, STRENGTH_MAX, value=1.0, step=0.05, label="LoRA strength",
                                         scale=2)  # fmt: skip
                rows, extra, removers = [], [], []
                for n in EXTRA_ROWS:  # the stack's further LoRAs, shown one by one
                    with gr.Row(visible=False, equal_height=True) as row:
                        name = gr.Dropdown(label=f"LoRA {n}", allow_custom_value=True, scale=3,
                                           choices=choices["choices"], value="")  # fmt: skip
                        value = gr.Slider(STRENGTH_MIN, STRENGTH_MAX, value=1.0, step=0.05, label=f"strength {n}",
                                          scale=2)  # fmt: skip
                        removers.append(gr.Button("✕", size="sm", scale=0, min_width=40))
                    rows.append(row)
                    extra += [name, value]
                with gr.Row():
                    add_lora = gr.Button("+ Stack another LoRA", size="sm")
                    refresh = gr.Button("Refresh the LoRA folder", size="sm")
                    upload = gr.UploadButton("Upload a .safetensors LoRA", file_types=[".safetensors"], size="sm")
                with gr.Row(equal_height=True):
                    hub_ref = gr.Textbox(placeholder="user/repo, user/repo/file.safetensors@revision, or its URL",
                                         show_label=False, scale=3, max_lines=1)  # fmt: skip
                    hub_button = gr.Button("Use a LoRA from the Hub", size="sm", scale=2)
                picked = gr.Textbox(visible=False)  # an upload's or download's result; its errors show as toasts
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
                with gr.Accordion("Sweep and grid axes", open=False):
                    strengths = gr.Textbox(
                        DEFAULT_SWEEP, label="Sweep strengths", info=f"up to {MAX_SWEEP_IMAGES}, between 0 and 2"
                    )
                    grid_rows = gr.Textbox(
                        label="Grid rows",
                        lines=2,
                        placeholder="one LoRA or stack per line, e.g. style:0.8+detail:0.5",
                        info="empty: the LoRA stack above",
                    )
                    with gr.Row():
                        grid_strengths = gr.Textbox(DEFAULT_GRID_STRENGTHS, label="Grid columns (strengths)",
                                                    info="each multiplies every LoRA's strength")  # fmt: skip
                        grid_seeds = gr.Textbox("0, 1", label="Grid seeds", info=f"up to {MAX_GRID_SEEDS}")
                    grid_prompts = gr.Textbox(label="Grid prompts", lines=2, info="one per line; empty: the prompt")
                gr.Examples(examples=[[p] for p in EXAMPLES], inputs=[prompt], label="Examples")
                png_drop = gr.File(label="Settings from a PNG (fluxdemo's, or one with A1111 parameters)",
                                   file_types=[".png"], height=90)  # fmt: skip
                with gr.Accordion("Advanced", open=False):
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
                note = gr.Markdown("")
                preview = gr.Image(label="Live preview", visible=False, height=160, interactive=False)
                with gr.Tabs() as tabs:
                    with gr.Tab("Compare", id="compare"):
                        slider = gr.ImageSlider(
                            label="left: baseline · right: LoRA",
                            elem_id="slider",  # the page's tests find its two images apart from the history's
                            type="filepath",
                            format="png",
                            buttons=["download", "fullscreen"],
                            max_height=768,
                        )
                        with gr.Row(equal_height=True):
                            pick_a = gr.Dropdown(label="Left (A)", choices=[], scale=3)
                            pick_b = gr.Dropdown(label="Right (B)", choices=[], scale=3)
                            swap_button = gr.Button("Swap A/B", size="sm", scale=1)
                            show_diff = gr.Checkbox(label="Show where they differ", scale=1)
                        diff_image = gr.Image(visible=False, type="pil", format="png", interactive=False)
                    with gr.Tab("Strength sweep", id="sweep"):
                        gallery = gr.Gallery(
                            label="Same seed, rising strength", format="png", columns=3, object_fit="contain"
                        )
                    with gr.Tab("Grid", id="grid"):
                        grid_pics = gr.Gallery(label="Grids: LoRA rows x strength columns, per prompt and seed",
                                               format="png", columns=1, object_fit="contain")  # fmt: skip
                        grid_cells = gr.Gallery(label="Cells (each PNG carries its parameters)", format="png",
                                                columns=6, object_fit="contain")  # fmt: skip
                    with gr.Tab("Single image", id="single"):
                        single = gr.Image(label="Image", type="filepath", format="png")
                strip = gr.Gallery(label="History: every result of this session (click one to put it on the right)",
                                   columns=8, height=150, allow_preview=False, format="png")  # fmt: skip
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
        last_run, history, shown, row_shown = gr.State(), gr.State([]), gr.State(), gr.State([False] * len(rows))
        timer = gr.Timer(0.5, active=False)

        # -- events: the model jobs share one concurrency group; everything else is instant ---------------------
        params = [seed, steps, guidance, width, height]
        buttons = [compare_button, generate_button, sweep_button, grid_button]

        def busy(tab: str | None):
            """While a job runs: its tab in front, the live preview shown and polled, the job buttons off."""
            on = tab is not None
            return ([gr.Tabs(selected=tab) if on else gr.skip(), gr.Image(visible=on, value=None),
                     gr.Timer(active=on)] + [gr.Button(interactive=not on) for _ in buttons])  # fmt: skip

        busy_outputs = [tabs, preview, timer, *buttons]
        specs = [
            ([compare_button.click, prompt.submit], studio.compare, [prompt, lora, strength, *params, *extra],
             [slider], "compare"),
            ([generate_button.click], studio.generate, [prompt, lora, strength, *params, *extra], [single],
             "generate"),
            ([sweep_button.click], studio.sweep, [prompt, lora, strengths, *params, *extra], [gallery], "sweep"),
            ([grid_button.click], studio.grid, [prompt, grid_prompts, grid_rows, grid_strengths, grid_seeds, steps,
                                                guidance, width, height, lora, strength, *extra],
             [grid_pics, grid_cells], "grid"),
        ]  # fmt: skip
        jobs, checked = [], []
        for triggers, fn, inputs, outputs, name in specs:
            # busy first, then the job: in parallel, a job refused at once could finish before busy() and leave
            # the buttons off
            started = gr.on(triggers, lambda tab=("single" if name == "generate" else name): busy(tab), None,
                            busy_outputs, **cheap)  # fmt: skip
            # Hub LoRAs are downloaded in the Hub's queue group, so the job that follows never downloads in the slot
            fetched = started.then(studio.fetcher(name), inputs, None, **hub_event)
            job = fetched.success(fn, [*inputs, history], [*outputs, info, last_run, history], api_name=name,
                                  **gpu_event)  # fmt: skip
            fetched.failure(lambda: busy(None), None, busy_outputs, **cheap)
            job.then(lambda: busy(None), None, busy_outputs, **cheap)
            job.failure(lambda: busy(None), None, busy_outputs, **cheap)  # gradio 6.31's page skips .then on errors
            job.success(show_run, [info, last_run, history], [downloads, chart, run_md, tabs, strip, pick_a, pick_b],
                        api_visibility="private").then(
                lambda run: (run.get("shown"), ""), last_run, [shown, note], **cheap)  # fmt: skip
            if name == "compare":  # the slider names its two sides (its API value stays the plain pair)
                job.success(lambda run: gr.ImageSlider(label=run["label"]), last_run, slider, **cheap)
            jobs += [fetched, job]
            checked += [(fetched, lambda data, kind=name: read_request(kind, data, limits)), (job, studio.admit(name))]
        cancel.click(studio.cancel, None, None, api_name="cancel", cancels=jobs, concurrency_limit=None, queue=False)
        cancel.click(lambda: busy(None), None, busy_outputs, **cheap)
        timer.tick(studio.latest_preview, None, preview, **cheap)

        # -- the result on screen: any two of the session's, and whether the controls still describe it ------------
        pair = dict(fn=studio.show_pair, inputs=[pick_a, pick_b, show_diff, history], outputs=[slider, diff_image])
        gr.on([pick_a.input, pick_b.input, show_diff.input], **pair, **cheap)
        swap_button.click(swap, [pick_a, pick_b], [pick_a, pick_b], **cheap).then(**pair, **cheap)
        strip.select(pick_from_strip, history, pick_b, **cheap).then(**pair, **cheap)
        controls = [prompt, lora, strength, *params, *extra]
        gr.on([c.change for c in controls], lambda was, *values: stale_note(was, controls_params(manager, *values)),
              [shown, *controls], note, trigger_mode="always_last", **cheap)  # fmt: skip

        # -- the LoRA stack's rows ----------------------------------------------------------------------------------
        def show_rows(flags: list[bool]) -> list:
            return [flags, *(gr.Row(visible=f) for f in flags)]

        def add_row(flags: list[bool]) -> list:
            if all(flags):
                raise gr.Error(f"A stack holds at most {1 + len(rows)} LoRAs.", print_exception=False)
            flags = list(flags)
            flags[flags.index(False)] = True
            return show_rows(flags)

        add_lora.click(add_row, row_shown, [row_shown, *rows], **cheap)
        for i, remove in enumerate(removers):
            remove.click(lambda flags, i=i: [*show_rows([f and j != i for j, f in enumerate(flags)]), ""],
                         row_shown, [row_shown, *rows, extra[2 * i]], **cheap)  # fmt: skip
        # Queued in a group of its own: reading a PNG is bounded, but many at once must wait their turn
        loaded = png_drop.upload(studio.settings_from_png, png_drop, [prompt, *params, lora, strength, *extra],
                                 concurrency_limit=2, concurrency_id="png", api_visibility="private")  # fmt: skip
        loaded.success(lambda *names: show_rows([bool(n) for n in names]), extra[::2], [row_shown, *rows], **cheap)

        # -- the LoRA folder and card -------------------------------------------------------------------------------
        inspect = dict(fn=studio.inspect_lora, inputs=lora, outputs=report_json)
        shown_card = [lora.change(**inspect, api_name="inspect_lora", concurrency_limit=4, concurrency_id="files"),
                      demo.load(**inspect, **cheap)]  # fmt: skip
        for event in shown_card:
            event.success(show_card, report_json, [card, trigger], api_visibility="private")
        pickers = [lora, *extra[::2]]
        refresh.click(studio.refresh_pickers, pickers, pickers, **cheap)
        # The list is current on every page load; an upload or a Hub download that fails leaves the pickers alone.
        demo.load(studio.refresh_pickers, pickers, pickers, **cheap)
        # Queued (in a group of its own, which the admission bounds apart from the model's): gradio's page shows the
        # errors of queued events only, and an upload's sentence must reach the person who sent the file.
        uploaded = upload.upload(studio.upload_lora, upload, picked, api_name="upload_lora", concurrency_limit=4,
                                 concurrency_id="files")  # fmt: skip
        fetched = gr.on(
            [hub_button.click, hub_ref.submit],
            studio.hub_lora,
            hub_ref,
            picked,
            api_name="hub_lora",
            concurrency_limit=HUB_DOWNLOADS,
            concurrency_id="hub",
        )  # a download: queued, but never behind the GPU
        for event in (uploaded, fetched):
            event.success(studio.pick, [picked, *pickers], pickers, **cheap)
        trigger.click(insert_trigger_words, [prompt, report_json], prompt, api_visibility="private")
        dice.click(random_seed, None, seed, api_visibility="private")
        size_preset.input(size_of, size_preset, [width, height], api_visibility="private")
        gr.on([width.input, height.input], preset_of, [width, height], size_preset, api_visibility="private",
              trigger_mode="always_last")  # fmt: skip

    # The bounds are the admission's (per concurrency group); gradio's own, over all events, sits above them all.
    # api_open=False: model jobs only through the queue, never by a direct POST that would skip its bounds.
    demo.queue(max_size=queue_size + CHEAP_QUEUE_SIZE * len(demo.fns), api_open=False)
    studio.admission = Admission(demo, limits, queue_size)
    for event, rule in checked:
        studio.admission.check(event, rule)
    return demo
