"""The event handlers: one Studio per app, over its one model manager; model work one job at a time on the GPU."""

from __future__ import annotations

import atexit
import errno
import inspect
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
from PIL import Image

from fluxdemo.errors import FluxdemoError, LoraError, OptionsError
from fluxdemo.lru import LRU
from fluxdemo.model.manager import MODEL_COMPONENTS
from fluxdemo.pipeline import (
    DEFAULT_CACHE_IMAGES,
    LoraChoice,
    ResultsCache,
    params_from_report,
    save_png,
    settings_from_png,
    side_by_side,
)
from fluxdemo.pipeline.api import (
    Controls,
    Result,
    grid_cells,
    grid_pictures,
    scaled_label,
    stack_label,
    sweep_label,
)
from fluxdemo.pipeline.limits import DEFAULT_LIMITS, Limits, for_visitor
from fluxdemo.pipeline.model import Model
from fluxdemo.pipeline.previews import DrawPreview, latent_preview
from fluxdemo.studio.admission import Admission
from fluxdemo.studio.forms import EXTRA_ROWS, FIELDS, Ask, read_request, shown_params, unfetched_hub_loras
from fluxdemo.studio.guard import for_people
from fluxdemo.studio.history import add, entry_of, slider_label
from fluxdemo.studio.render import STAGE_LABELS
from fluxdemo.studio.work import StepProgress
from fluxdemo.studio.zero_gpu import hold, run_measured
from fluxdemo.untrusted import MAX_SENTENCE_CHARS, markdown_text, names_list

DEFAULT_MAX_UPLOAD_BYTES = 512 * 2**20
PREVIEW_EVERY = 2  # steps between live previews; bench/speed.py measures what they cost
PREVIEW_SIDE = 224  # px: the live preview's longer side on the page
MAX_NOTES = 4096  # sessions whose last failure is kept for its note
KEEP_RUNS = 16  # run folders kept on disk; gradio serves its own copies of what it has shown


def session_of(request: gr.Request) -> str:
    return request.session_hash or "no-session"


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

    @contextmanager
    def watch(self, request: gr.Request) -> Iterator[threading.Event]:
        """The request's session's flag while the work runs: set by Cancel."""
        session = session_of(request)
        event = self.begin(session)
        try:
            yield event
        finally:
            self.end(session, event)

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


def model_job(kind: str) -> Callable:
    """A model job as gradio calls it: FIELDS[kind] by position, then the session's history, the request and the
    progress; the method receives the request read and checked (Studio.read) in place of the fields."""
    fields = FIELDS[kind]
    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature(
        [inspect.Parameter(name, positional) for name in ("self", *fields, "history")]
        + [
            inspect.Parameter("request", positional, annotation=gr.Request),
            inspect.Parameter("progress", positional, default=gr.Progress(), annotation=gr.Progress),
        ]
    )

    def decorate(method: Callable) -> Callable:
        def job(values: dict) -> tuple:
            studio, ask = values["self"], values["self"].read(kind, [values[name] for name in fields])
            return method(studio, ask, values["history"], values["request"], values["progress"])

        job.__name__ = method.__name__  # for_people logs it
        guarded = for_people(job)

        def handler(*args, **kwargs) -> tuple:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            with bound.arguments["self"].noting(bound.arguments["request"]):
                return guarded(bound.arguments)

        handler.__name__, handler.__qualname__, handler.__doc__ = method.__name__, method.__qualname__, method.__doc__
        handler.__signature__ = signature  # gradio reads the API's parameters, and where to hand `request` in, here
        handler.__annotations__ = {"request": gr.Request, "progress": gr.Progress, "return": tuple}
        return handler

    return decorate


class Studio:
    """The model jobs and the instant handlers beside them. Model work goes through zero_gpu.run_measured, one job at a
    time (the queue's "gpu" concurrency group, and the manager's lock behind it)."""

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
        self.refusals = LRU(MAX_NOTES)  # session -> (title, sentence) of its last failed request, for the note
        self.key = hold(self)  # how a ZeroGPU worker finds this studio (zero_gpu.run_measured)

    # -- model work: gradio_client calls these by position, so their parameters keep their order and names ----------
    @model_job("compare")
    def compare(self, ask: Ask, history: list | None, request: gr.Request, progress: gr.Progress) -> tuple:
        """Baseline and the LoRA stack's image from one seed -> ((baseline.png, lora.png), report)."""
        (stack,) = ask.stacks
        result = self._run(ask, request, progress)
        folder = self.runs.new()
        base, adapted = result.images["baseline"], result.images["lora"]
        both = side_by_side(base, adapted, ("base model", stack_label(stack)))
        files = [
            self._png(folder / "baseline.png", base, result, "baseline"),
            self._png(folder / "lora.png", adapted, result, "lora"),
            self._png(folder / "side_by_side.png", both, result, "lora", "side_by_side"),
        ]
        history = self._remember(history, "compare", result, {"baseline": files[0], "lora": files[1]})
        a, b = (entry_of(history, params_from_report(result.report, label)) for label in ("baseline", "lora"))
        shown = shown_params(self.manager, ask.options, stack)
        run = {"tab": "compare", "files": files, "a": a.title, "b": b.title, "shown": shown, "report": result.report}
        run["caption"] = markdown_text(slider_label(a, b), MAX_SENTENCE_CHARS)
        return (files[0], files[1]), result.report.to_dict(), run, history

    @model_job("generate")
    def generate(self, ask: Ask, history: list | None, request: gr.Request, progress: gr.Progress) -> tuple:
        """One image, with the LoRA stack (none: the base model) -> (image.png, report)."""
        (stack,) = ask.stacks
        result = self._run(ask, request, progress)
        ((label, image),) = result.images.items()
        path = self._png(self.runs.new() / f"{label}.png", image, result, label)
        history = self._remember(history, "generate", result, {label: path})
        shown = shown_params(self.manager, ask.options, stack)
        run = {"tab": "single", "files": [path], "shown": shown, "report": result.report}
        return path, result.report.to_dict(), run, history

    @model_job("sweep")
    def sweep(self, ask: Ask, history: list | None, request: gr.Request, progress: gr.Progress) -> tuple:
        """One image per strength (multiplying each LoRA's own), same seed -> ([(png, "a:0.4 + b:0.25 (× 0.5)"), ...],
        report)."""
        (stack,) = ask.stacks
        result = self._run(ask, request, progress)
        folder = self.runs.new()
        files = {
            label: self._png(folder / f"{label.replace(' ', '-')}.png", image, result, label)
            for label, image in result.images.items()
        }
        history = self._remember(history, "sweep", result, files)
        gallery = [(files[sweep_label(s)], scaled_label(stack, s)) for s in ask.columns]
        run = {"tab": "sweep", "files": list(files.values()), "report": result.report}
        return gallery, result.report.to_dict(), run, history

    @model_job("grid")
    def grid(self, ask: Ask, history: list | None, request: gr.Request, progress: gr.Progress) -> tuple:
        """LoRA rows (one stack per line; none: the stack of the LoRA pickers) x strength columns, for each prompt
        (one per line; none: `prompt`) and seed -> (grid pictures, cells, report)."""
        result = self._run(ask, request, progress)
        folder = self.runs.new()
        cells = grid_cells(result.report)  # the base model's cell once per prompt and seed, as the pictures draw it
        files = {
            label: self._png(folder / f"cell-{n + 1:03d}.png", result.images[label], result, label)
            for n, (label, _) in enumerate(cells)
        }
        pictures = []
        for p, (prompt, seed, picture) in enumerate(grid_pictures(result)):
            path = folder / f"grid-p{p + 1}-seed{seed}.png"
            picture.save(path)  # a picture of pictures: each cell's PNG carries its parameters
            pictures.append((str(path), f"seed {seed} · {prompt[:60]}"))
        history = self._remember(history, "grid", result, files)
        cell_gallery = [(files[label], caption) for label, caption in cells]
        run = {"tab": "grid", "files": [path for path, _ in pictures] + list(files.values()), "report": result.report}
        return pictures, cell_gallery, result.report.to_dict(), run, history

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

    def checker(self, kind: str) -> Callable:
        """check_loras for one kind of request, as an event handler (gradio hands `request` in by its annotation)."""

        def check(request: gr.Request, *values) -> None:
            with self.noting(request):
                self.check_loras(kind, values, request)

        return check

    @for_people
    def check_loras(self, kind: str, values: Sequence, request: gr.Request) -> None:
        """A model request's LoRAs, before it joins the GPU queue: Hub ones downloaded (in the Hub's own queue group;
        Cancel stops a download between its chunks), and every one found and fitting the model, so a request that
        would fail is refused before its job is handed anything."""
        ask = read_request(kind, values, self.limits)
        names = unfetched_hub_loras(self.library, ask)
        if names:
            with self.cancel_flags.watch(request) as cancelled:
                self.library.prefetch(names, cancelled.is_set)
        for name in ask.lora_names:
            report = self.library.get(name).report
            if report is not None and not report.compatible:
                raise LoraError(f"{name} cannot be applied to this model: " + "; ".join(report.problems))

    @contextmanager
    def noting(self, request: gr.Request) -> Iterator[None]:
        """A request's sentence, when it fails, kept for the note beside the result (refusal)."""
        try:
            yield
        except gr.Error as e:
            self.refusals.put(session_of(request), (e.title, str(e.message)))
            raise

    def refusal(self, request: gr.Request) -> str:
        """The note after a failed request: what happened, and that the result on screen stays."""
        session = session_of(request)
        said = self.refusals.get(session)
        self.refusals.put(session, None)
        title, message = said or ("", "It was refused or cancelled before it started.")
        head = "" if title == "Cancelled" else "**Not run:** "  # a Cancel's sentence starts with "Cancelled"
        return f"{head}{markdown_text(message, MAX_SENTENCE_CHARS)} The result on screen stays as it was."

    def _run(self, ask: Ask, request: gr.Request, progress) -> Result:
        """A library task on the GPU, with progress (image i of n, step x of y), previews, Cancel and the budget."""
        session = session_of(request)
        with self.cancel_flags.watch(request) as cancelled:
            controls = self._controls(session, cancelled, progress)
            if self.manager.runner is None and not set(MODEL_COMPONENTS) <= set(self.manager.loaded()):
                progress(0, desc="Loading the model")
            try:
                result = run_measured(self, self.key, ask, controls, progress)
            finally:
                self.previews.pop(session, None)
        if self.public:
            result.report = for_visitor(result.report)
        return result

    def _controls(self, session: str, cancelled: threading.Event, progress) -> Controls:
        """The run's hooks: progress, live previews, and a stop on Cancel or when the client has gone."""
        steps = StepProgress(progress)

        def on_preview(stage: str, step: int, image: Image.Image) -> None:
            self.previews[session] = (f"{STAGE_LABELS.get(stage, stage)} · step {step}", image)

        def stop() -> bool:  # nobody would see the rest
            return cancelled.is_set() or bool(self.admission and self.admission.client_gone(session))

        scope = session if self.public else ""  # a public app's caches are each visitor's own
        return Controls(
            progress=steps.on_step,
            cancelled=stop,
            preview=on_preview,
            preview_every=PREVIEW_EVERY,
            draw=self.draw_preview,
            on_image=steps.on_image,
            cache_scope=scope,
        )

    def _remember(self, history: list | None, kind: str, result: Result, files: dict[str, str]) -> list:
        """The session's history with this run's images added (each with the parameters its PNG carries)."""
        images = [(label, path, params_from_report(result.report, label)) for label, path in files.items()]
        return add(history or [], kind, images)

    def _png(self, path: Path, image: Image.Image, result: Result, label: str, role: str | None = None) -> str:
        """The image as a PNG carrying its parameters, so a download keeps them."""
        try:
            return str(save_png(image, params_from_report(result.report, label, role), path))
        except FluxdemoError as e:  # save_png's sentence names the server's path and the CLI's --out
            if getattr(e.__cause__, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise FluxdemoError("The server's disk is full: the image was not saved (earlier ones are intact).") from e

    # -- instant: no model work -------------------------------------------------------------------------------------
    def latest_preview(self, request: gr.Request):
        """The newest live preview of this session's running job (the page polls it while a job runs)."""
        latest = self.previews.get(session_of(request))
        if latest is None:
            return gr.skip()
        caption, image = latest
        scale = PREVIEW_SIDE / max(image.size)  # a latent preview is 1/8 of the image's side: shown at a readable size
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
        return gr.Image(value=image, label=f"Live preview · {caption}")

    @for_people
    def settings_from_png(self, file: str | None) -> tuple:
        """The controls set from a PNG's parameters (fluxdemo's own, or A1111/Forge infotext), each value checked
        like the controls' own; then a note of what was set, of what was changed, and of LoRAs this app lacks."""
        if not file:
            return (gr.skip(),) * (10 + 2 * len(EXTRA_ROWS))
        settings = settings_from_png(Path(file), self.limits)
        p = settings.params
        most = 1 + len(EXTRA_ROWS)
        if len(p.loras) > most:
            raise FluxdemoError(f"The PNG names {len(p.loras)} LoRAs; the studio stacks at most {most}.")
        missing = [name for name, _, _ in p.loras if not self._listed(name) and not self.library.fetched(name)]
        # a LoRA the app lacks stays out of the pickers (the note warns of it), so no picker holds an unknown name
        loras = [lora for lora in p.loras if lora[0] not in missing]
        loras += [("", None, 1.0)] * (most - len(loras))
        stack = stack_label(tuple(LoraChoice(name, s) for name, _, s in p.loras))
        for note in settings.notes:  # what was changed: a toast as well, since it changes what will be made
            gr.Warning(note)
        said = [
            f"**Set from the PNG:** seed {p.seed}, {p.steps} steps, guidance {p.guidance:g}, {p.width}×{p.height}, "
            f"LoRAs {markdown_text(stack, MAX_SENTENCE_CHARS)}, {'fast' if p.fast else 'exact'}, and its prompt.",
            *(f"Note: {markdown_text(note, MAX_SENTENCE_CHARS)}" for note in settings.notes),
        ]
        if missing:
            said.append(
                f"**Warning:** not in the LoRA folder: {markdown_text(names_list(missing), MAX_SENTENCE_CHARS)}. "
                "They are left out of the stack: upload them (or fetch them from the Hub), then pick them to "
                "reproduce the picture."
            )
        first = [p.prompt, p.seed, p.steps, p.guidance, p.width, p.height, loras[0][0], loras[0][2]]
        return (*first, *[value for name, _, s in loras[1:] for value in (name, s)], p.fast, "\n\n".join(said))

    def _listed(self, name: str) -> bool:
        return any(entry.name == name and entry.usable for entry in self.library.entries)

    def cancel(self, request: gr.Request) -> str:
        """Stop the session's running work; the note says so (an unqueued event's gr.Info never reaches the page)."""
        session = session_of(request)
        if self.cancel_flags.cancel(session):
            # the page stops waiting at once, so the job's own sentence may come too late for the note
            self.refusals.put(session, ("Cancelled", "Cancelled after the current step."))
            return "**Cancelling** after the current step; the result on screen stays as it was."
        return "**Cancelled;** the result on screen stays as it was."
