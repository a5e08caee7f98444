"""The studio: one gr.Blocks over the model manager. Type a prompt, pick a LoRA and a strength, press Compare, and
drag a slider across the base model's image and the LoRA's, both from the same seed; sweep the strength, read the
LoRA's card, and see where the seconds went.

UI values become a GenerateOptions at the edge (forms); below it everything is the library. Errors a person can act
on reach the page as gr.Error carrying the library's sentence; anything else is logged (guard).
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from fluxdemo.model.manager import STRATEGIES
from fluxdemo.pipeline import DEFAULT_CACHE_IMAGES, GUIDANCE_MAX
from fluxdemo.pipeline.api import MAX_SEED, MAX_SIDE, MAX_STEPS, MIN_SIDE, SIDE_MULTIPLE, GenerateOptions
from fluxdemo.pipeline.limits import DEFAULT_LIMITS, Limits
from fluxdemo.pipeline.model import Model
from fluxdemo.pipeline.previews import DrawPreview, latent_preview
from fluxdemo.studio.admission import CHEAP_QUEUE_SIZE, Admission
from fluxdemo.studio.forms import (
    DEFAULT_GRID_STRENGTHS,
    DEFAULT_SWEEP,
    EXTRA_ROWS,
    FIELDS,
    MAX_GRID_SEEDS,
    MAX_SWEEP_IMAGES,
    SIZE_PRESETS,
    STRENGTH_RANGE,
    controls_params,
    default_options,
    preset_of,
    random_seed,
    read_request,
    size_of,
)
from fluxdemo.studio.handlers import DEFAULT_MAX_UPLOAD_BYTES, Studio
from fluxdemo.studio.history import stale_note
from fluxdemo.studio.lora_files import LoraFiles
from fluxdemo.studio.render import (
    insert_trigger_words,
    lora_card,
    model_summary,
    pick_from_strip,
    show_card,
    show_pair,
    show_run,
    swap,
)

DEFAULT_QUEUE_SIZE = 16
HUB_DOWNLOADS = 2  # Hub LoRA downloads at once, for every visitor together
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
GPU_EVENT = dict(concurrency_limit=1, concurrency_id="gpu")  # one model job at a time, across all events (or replica)
HUB_EVENT = dict(concurrency_limit=HUB_DOWNLOADS, concurrency_id="hub", api_visibility="private")
# Cheap events skip the queue from a page, and join it from gradio_client under a bound of their own (admission):
# a full model queue never turns away a Cancel, an inspect, a refresh or an upload.
CHEAP = dict(queue=False, api_visibility="private")
TABS = {"compare": "compare", "generate": "single", "sweep": "sweep", "grid": "grid"}  # each job's tab


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
    files = LoraFiles(studio.library, max_upload_bytes, studio.cancel_flags)
    manager.adapters.library.refresh()
    page = SimpleNamespace(studio=studio, files=files, manager=manager, limits=limits)
    # gradio's cache of uploads and results: files older than a day go, checked every hour
    with gr.Blocks(title="fluxdemo studio", delete_cache=(3600, 86400)) as demo:
        page.demo = demo
        gr.Markdown(
            "# fluxdemo studio\nThe base model and a LoRA stack, from the same seed, one slider apart. "
            f"Model: **{manager.preset.name}**; it loads on the first run."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                _controls_column(page, defaults or default_options(manager.preset), public)
            with gr.Column(scale=3, min_width=320):
                _results_column(page)
        page.last_run, page.history, page.shown = gr.State(), gr.State([]), gr.State()
        page.row_shown = gr.State([False] * len(page.rows))
        page.timer = gr.Timer(0.5, active=False)
        checked = _job_events(page)
        _result_events(page)
        _stack_events(page)
        _lora_events(page)
        _small_events(page)
    # The bounds are the admission's (per concurrency group); gradio's own, over all events, sits above them all.
    # api_open=False: model jobs only through the queue, never by a direct POST that would skip its bounds.
    demo.queue(max_size=queue_size + CHEAP_QUEUE_SIZE * len(demo.fns), api_open=False)
    studio.admission = Admission(demo, limits, queue_size)
    for event, rule in checked:
        studio.admission.check(event, rule)
    return demo


# --- the layout --------------------------------------------------------------------------------------------------


def _controls_column(p: SimpleNamespace, d: GenerateOptions, public: bool) -> None:
    p.prompt = gr.Textbox(
        label="Prompt", lines=1, max_lines=6, autofocus=True, placeholder="Describe the image. Enter runs Compare."
    )
    # the buttons right under the prompt: the results column's top stays in view while a job runs
    with gr.Row():
        p.compare_button = gr.Button("Compare", variant="primary", scale=2)
        p.cancel = gr.Button("Cancel", variant="stop", scale=1)
    with gr.Row():
        p.generate_button = gr.Button("Generate one image", size="sm")
        p.sweep_button = gr.Button("Sweep strengths", size="sm")
        p.grid_button = gr.Button("Grid", size="sm")
    p.buttons = [p.compare_button, p.generate_button, p.sweep_button, p.grid_button]
    _lora_rows(p)
    _numbers(p, d)
    _axes(p)
    gr.Examples(examples=[[prompt] for prompt in EXAMPLES], inputs=[p.prompt], label="Examples")
    p.png_drop = gr.File(
        label="Settings from a PNG (fluxdemo's, or one with A1111 parameters)", file_types=[".png"], height=90
    )
    with gr.Accordion("Advanced", open=False):
        # Shown, not set: the strategy is global, so only the operator sets it (--strategy)
        gr.Dropdown(
            ["auto", *STRATEGIES],
            value=p.manager.requested_strategy,
            label="Memory strategy (set with --strategy or FLUXDEMO_STRATEGY)",
            info=STRATEGY_HELP,
            interactive=False,
        )
        gr.Markdown(model_summary(p.manager, host_facts=not public))
    with gr.Group():
        p.card = gr.Markdown(lora_card(None), padding=True)
        p.trigger = gr.Button("Insert trigger words into the prompt", size="sm", visible=False)
    with gr.Accordion("LoRA report (JSON)", open=False):
        p.report_json = gr.JSON(label="LoRA report")


def _lora_rows(p: SimpleNamespace) -> None:
    """The LoRA stack: the first row, the further rows (shown one by one), the folder's and the Hub's buttons."""
    choices = p.files.lora_choices()
    low, high = STRENGTH_RANGE
    # allow_custom_value: API callers may name a LoRA added since; the library checks every name
    with gr.Row(equal_height=True):
        p.lora = gr.Dropdown(label="LoRA", allow_custom_value=True, scale=3, **choices)
        p.strength = gr.Slider(low, high, value=1.0, step=0.05, label="LoRA strength", scale=2)
    p.rows, p.extra, p.removers = [], [], []
    for n in EXTRA_ROWS:
        with gr.Row(visible=False, equal_height=True) as row:
            name = gr.Dropdown(
                label=f"LoRA {n}", allow_custom_value=True, scale=3, choices=choices["choices"], value=""
            )
            value = gr.Slider(low, high, value=1.0, step=0.05, label=f"strength {n}", scale=2)
            p.removers.append(gr.Button("✕", size="sm", scale=0, min_width=40))
        p.rows.append(row)
        p.extra += [name, value]
    with gr.Row():
        p.add_lora = gr.Button("+ Stack another LoRA", size="sm")
        p.refresh = gr.Button("Refresh the LoRA folder", size="sm")
        p.upload = gr.UploadButton("Upload a .safetensors LoRA", file_types=[".safetensors"], size="sm")
    with gr.Row(equal_height=True):
        p.hub_ref = gr.Textbox(
            placeholder="user/repo, user/repo/file.safetensors@revision, or its URL",
            show_label=False,
            scale=3,
            max_lines=1,
        )
        p.hub_button = gr.Button("Use a LoRA from the Hub", size="sm", scale=2)
    p.picked = gr.Textbox(visible=False)  # an upload's or download's result; its errors show as toasts


def _numbers(p: SimpleNamespace, d: GenerateOptions) -> None:
    side = dict(minimum=MIN_SIDE, maximum=MAX_SIDE, step=SIDE_MULTIPLE)
    with gr.Row(equal_height=False):
        p.seed = gr.Number(d.seed, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, scale=3)
        p.dice = gr.Button("Random seed", scale=1, size="sm")
    with gr.Row():
        p.steps = gr.Slider(1, MAX_STEPS, value=d.steps, step=1, label="Steps")
        p.guidance = gr.Slider(0, GUIDANCE_MAX, value=d.guidance, step=0.1, label="Guidance")
    p.size_preset = gr.Dropdown(list(SIZE_PRESETS), value=preset_of(d.width, d.height), label="Size preset")
    with gr.Row():
        p.width = gr.Slider(value=d.width, label="Width", **side)
        p.height = gr.Slider(value=d.height, label="Height", **side)


def _axes(p: SimpleNamespace) -> None:
    low, high = STRENGTH_RANGE
    with gr.Accordion("Sweep and grid axes", open=False):
        p.strengths = gr.Textbox(
            DEFAULT_SWEEP, label="Sweep strengths", info=f"up to {MAX_SWEEP_IMAGES}, between {low:g} and {high:g}"
        )
        p.rows_text = gr.Textbox(
            label="Grid rows",
            lines=2,
            placeholder="one LoRA or stack per line, e.g. style:0.8+detail:0.5",
            info="empty: the LoRA stack above",
        )
        with gr.Row():
            p.grid_strengths = gr.Textbox(
                DEFAULT_GRID_STRENGTHS, label="Grid columns (strengths)", info="each multiplies every LoRA's strength"
            )
            p.seeds = gr.Textbox("0, 1", label="Grid seeds", info=f"up to {MAX_GRID_SEEDS}")
        p.prompts = gr.Textbox(label="Grid prompts", lines=2, info="one per line; empty: the prompt")


def _results_column(p: SimpleNamespace) -> None:
    p.note = gr.Markdown("")
    p.preview = gr.Image(label="Live preview", visible=False, height=160, interactive=False)
    with gr.Tabs() as p.tabs:
        with gr.Tab("Compare", id="compare"):
            p.slider = gr.ImageSlider(
                label="left: baseline · right: LoRA",
                elem_id="slider",  # the page's tests find its two images apart from the history's
                type="filepath",
                format="png",
                buttons=["download", "fullscreen"],
                max_height=768,
            )
            with gr.Row(equal_height=True):
                p.pick_a = gr.Dropdown(label="Left (A)", choices=[], scale=3)
                p.pick_b = gr.Dropdown(label="Right (B)", choices=[], scale=3)
                p.swap_button = gr.Button("Swap A/B", size="sm", scale=1)
                p.show_diff = gr.Checkbox(label="Show where they differ", scale=1)
            p.diff_image = gr.Image(visible=False, type="pil", format="png", interactive=False)
        with gr.Tab("Strength sweep", id="sweep"):
            p.gallery = gr.Gallery(label="Same seed, rising strength", format="png", columns=3, object_fit="contain")
        with gr.Tab("Grid", id="grid"):
            p.grid_pics = gr.Gallery(
                label="Grids: LoRA rows x strength columns, per prompt and seed",
                format="png",
                columns=1,
                object_fit="contain",
            )
            p.grid_cells = gr.Gallery(
                label="Cells (each PNG carries its parameters)", format="png", columns=6, object_fit="contain"
            )
        with gr.Tab("Single image", id="single"):
            p.single = gr.Image(label="Image", type="filepath", format="png")
    p.strip = gr.Gallery(
        label="History: every result of this session (click one to put it on the right)",
        columns=8,
        height=150,
        allow_preview=False,
        format="png",
    )
    p.downloads = gr.File(label="Download PNGs (they carry their parameters)", file_count="multiple")
    with gr.Accordion("Run", open=True):
        p.run_md = gr.Markdown("Nothing run yet.")
        p.chart = gr.BarPlot(
            x="stage",
            y="seconds",
            sort="-y",
            y_lim=[0, None],
            x_label_angle=-30,
            height=300,
            label="Where the seconds went, by stage",
        )
    with gr.Accordion("Run report (JSON)", open=False):
        p.info = gr.JSON(label="Run report")


# --- the events: the model jobs share one concurrency group; everything else is instant ----------------------------


def _inputs(p: SimpleNamespace, kind: str) -> list:
    """A model job's components in its API order (forms.FIELDS)."""
    named = {
        "prompt": p.prompt, "lora": p.lora, "strength": p.strength, "strengths": p.strengths, "seed": p.seed,
        "steps": p.steps, "guidance": p.guidance, "width": p.width, "height": p.height, "prompts": p.prompts,
        "rows": p.rows_text, "seeds": p.seeds,
    }  # fmt: skip
    extra = dict(zip(FIELDS["compare"][-len(p.extra) :], p.extra, strict=True))
    if kind == "grid":
        named["strengths"] = p.grid_strengths
    return [{**named, **extra}[name] for name in FIELDS[kind]]


def _busy(p: SimpleNamespace, tab: str | None) -> list:
    """While a job runs: its tab in front, the live preview shown and polled, the job buttons off."""
    on = tab is not None
    shown = [gr.Tabs(selected=tab) if on else gr.skip(), gr.Image(visible=on, value=None), gr.Timer(active=on)]
    return shown + [gr.Button(interactive=not on) for _ in p.buttons]


def _job_events(p: SimpleNamespace) -> list:
    """Each model job's chain: busy, its Hub LoRAs fetched, the job, the result shown; -> (event, admission rule)s."""
    busy_outputs = [p.tabs, p.preview, p.timer, *p.buttons]
    idle = dict(fn=lambda: _busy(p, None), inputs=None, outputs=busy_outputs, **CHEAP)
    outputs = {
        "compare": [p.slider],
        "generate": [p.single],
        "sweep": [p.gallery],
        "grid": [p.grid_pics, p.grid_cells],
    }
    triggers = {"compare": [p.compare_button.click, p.prompt.submit], "generate": [p.generate_button.click]}
    triggers |= {"sweep": [p.sweep_button.click], "grid": [p.grid_button.click]}
    jobs, checked = [], []
    for kind, tab in TABS.items():
        inputs = _inputs(p, kind)
        # busy first, then the job: in parallel, a job refused at once could finish before busy() and leave the
        # buttons off
        started = gr.on(triggers[kind], lambda tab=tab: _busy(p, tab), None, busy_outputs, **CHEAP)
        # Hub LoRAs are downloaded in the Hub's queue group, so the job that follows never downloads in the slot
        fetched = started.then(p.studio.fetcher(kind), inputs, None, **HUB_EVENT)
        job = fetched.success(
            getattr(p.studio, kind),
            [*inputs, p.history],
            [*outputs[kind], p.info, p.last_run, p.history],
            api_name=kind,
            **GPU_EVENT | ({"concurrency_limit": p.manager.runner.jobs} if p.manager.runner else {}),  # one a replica
        )
        fetched.failure(**idle)
        job.then(**idle)
        job.failure(**idle)  # gradio 6.31's page skips .then on errors
        shown = [p.downloads, p.chart, p.run_md, p.tabs, p.strip, p.pick_a, p.pick_b]
        job.success(show_run, [p.info, p.last_run, p.history], shown, api_visibility="private").then(
            lambda run: (run.get("shown"), ""), p.last_run, [p.shown, p.note], **CHEAP
        )
        if kind == "compare":  # the slider names its two sides (its API value stays the plain pair)
            job.success(lambda run: gr.ImageSlider(label=run["label"]), p.last_run, p.slider, **CHEAP)
        jobs += [fetched, job]
        checked += [(fetched, lambda data, kind=kind: read_request(kind, data, p.limits)), (job, p.studio.admit(kind))]
    p.cancel.click(p.studio.cancel, None, None, api_name="cancel", cancels=jobs, concurrency_limit=None, queue=False)
    p.cancel.click(**idle)
    p.timer.tick(p.studio.latest_preview, None, p.preview, **CHEAP)
    return checked


def _result_events(p: SimpleNamespace) -> None:
    """The result on screen: any two of the session's, and whether the controls still describe it."""
    pair = dict(fn=show_pair, inputs=[p.pick_a, p.pick_b, p.show_diff, p.history], outputs=[p.slider, p.diff_image])
    gr.on([p.pick_a.input, p.pick_b.input, p.show_diff.input], **pair, **CHEAP)
    p.swap_button.click(swap, [p.pick_a, p.pick_b], [p.pick_a, p.pick_b], **CHEAP).then(**pair, **CHEAP)
    p.strip.select(pick_from_strip, p.history, p.pick_b, **CHEAP).then(**pair, **CHEAP)
    controls = _inputs(p, "generate")
    gr.on(
        [c.change for c in controls],
        lambda was, *values: stale_note(was, controls_params(p.manager, *values)),
        [p.shown, *controls],
        p.note,
        trigger_mode="always_last",
        **CHEAP,
    )


def _stack_events(p: SimpleNamespace) -> None:
    """The LoRA stack's rows: added, removed, and shown as a PNG's settings need them."""

    def show_rows(flags: list[bool]) -> list:
        return [flags, *(gr.Row(visible=f) for f in flags)]

    def add_row(flags: list[bool]) -> list:
        if all(flags):
            raise gr.Error(f"A stack holds at most {1 + len(p.rows)} LoRAs.", print_exception=False)
        flags = list(flags)
        flags[flags.index(False)] = True
        return show_rows(flags)

    p.add_lora.click(add_row, p.row_shown, [p.row_shown, *p.rows], **CHEAP)
    for i, remove in enumerate(p.removers):
        remove.click(
            lambda flags, i=i: [*show_rows([f and j != i for j, f in enumerate(flags)]), ""],
            p.row_shown,
            [p.row_shown, *p.rows, p.extra[2 * i]],
            **CHEAP,
        )
    # Queued in a group of its own: reading a PNG is bounded, but many at once must wait their turn
    numbers = [p.seed, p.steps, p.guidance, p.width, p.height]
    loaded = p.png_drop.upload(
        p.studio.settings_from_png,
        p.png_drop,
        [p.prompt, *numbers, p.lora, p.strength, *p.extra],
        concurrency_limit=2,
        concurrency_id="png",
        api_visibility="private",
    )
    loaded.success(lambda *names: show_rows([bool(n) for n in names]), p.extra[::2], [p.row_shown, *p.rows], **CHEAP)


def _lora_events(p: SimpleNamespace) -> None:
    """The LoRA folder and card: inspect, refresh, upload, a Hub download."""
    files = p.files
    inspect = dict(fn=files.inspect_lora, inputs=p.lora, outputs=p.report_json)
    shown_card = [
        p.lora.change(**inspect, api_name="inspect_lora", concurrency_limit=4, concurrency_id="files"),
        p.demo.load(**inspect, **CHEAP),
    ]
    for event in shown_card:
        event.success(show_card, p.report_json, [p.card, p.trigger], api_visibility="private")
    pickers = [p.lora, *p.extra[::2]]
    p.refresh.click(files.refresh_pickers, pickers, pickers, **CHEAP)
    # The list is current on every page load; an upload or a Hub download that fails leaves the pickers alone.
    p.demo.load(files.refresh_pickers, pickers, pickers, **CHEAP)
    # Queued in a group the admission bounds apart from the model's: gradio's page shows only queued events' errors,
    # and an upload's sentence must reach the person who sent the file.
    uploaded = p.upload.upload(
        files.upload_lora, p.upload, p.picked, api_name="upload_lora", concurrency_limit=4, concurrency_id="files"
    )
    fetched = gr.on(
        [p.hub_button.click, p.hub_ref.submit],
        files.hub_lora,
        p.hub_ref,
        p.picked,
        api_name="hub_lora",
        concurrency_limit=HUB_DOWNLOADS,
        concurrency_id="hub",
    )  # a download: queued, but never behind the GPU
    for event in (uploaded, fetched):
        event.success(files.pick, [p.picked, *pickers], pickers, **CHEAP)


def _small_events(p: SimpleNamespace) -> None:
    p.trigger.click(insert_trigger_words, [p.prompt, p.report_json], p.prompt, api_visibility="private")
    p.dice.click(random_seed, None, p.seed, api_visibility="private")
    p.size_preset.input(size_of, p.size_preset, [p.width, p.height], api_visibility="private")
    gr.on(
        [p.width.input, p.height.input],
        preset_of,
        [p.width, p.height],
        p.size_preset,
        api_visibility="private",
        trigger_mode="always_last",
    )
