"""The studio: one gr.Blocks over the model manager. Type a prompt, pick a LoRA and a strength, press Compare, and
drag a slider across the base model's image and the LoRA's, both from the same seed; sweep the strength, read the
LoRA's card, and see where the seconds went.

UI values become a GenerateOptions at the edge (forms); below it everything is the library. Errors a person can act
on reach the page as gr.Error carrying the library's sentence; anything else is logged (guard).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import gradio as gr

from fluxdemo.model.files import offline_mode
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
    MAX_GRID_SEEDS,
    MAX_SWEEP_IMAGES,
    SIZE_PRESETS,
    controls_params,
    default_options,
    preset_of,
    random_seed,
    size_of,
    strength_range,
)
from fluxdemo.studio.handlers import DEFAULT_MAX_UPLOAD_BYTES, Studio
from fluxdemo.studio.history import stale_note
from fluxdemo.studio.jobs import CHEAP, HUB_DOWNLOADS, hidden_outputs, inputs_of, job_events
from fluxdemo.studio.lora_files import LoraFiles
from fluxdemo.studio.model_download import DownloadState, download_line
from fluxdemo.studio.render import (
    insert_trigger_words,
    lora_card,
    model_summary,
    pick_from_strip,
    show_pair,
    swap,
    trigger_button,
)

DEFAULT_QUEUE_SIZE = 16
EXAMPLES = [
    "a photo of a cat sitting on a wooden table, soft window light",
    "a watercolor painting of a lighthouse on a rocky island at sunset",
    "portrait of an astronaut in a field of flowers, cinematic lighting",
    "a tiny robot reading a book in a cozy library, detailed illustration",
]
# The live preview sits over the result's right side (below its buttons) while a job runs: it never moves the result.
STUDIO_CSS = """
#result-area { position: relative; }
#preview { position: absolute; top: 84px; right: 8px; width: 232px; z-index: 20; box-shadow: 0 2px 12px #0006; }
@media (max-width: 640px) { #preview { width: 168px; } }
"""
FAST_INFO = (
    "a step-skipping cache (TaylorSeer) on one fixed schedule, so a compare's two images skip the same steps; "
    "faster, not the exact picture; the run panel and the PNGs say so"
)
STRATEGY_HELP = (
    "auto: planned from free memory for each image size. resident: all on the GPU; model-offload: one large part "
    "at a time; group-offload: the transformer a few blocks at a time; disk: the least RAM"
)


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
    download: DownloadState | None = None,
    fast: bool = False,
) -> gr.Blocks:
    """The whole app over one model manager; the model loads on the first run, so building and launching are quick.

    `limits` bound each request (pipeline.limits); a `public` app shows no facts about its host; `cache_images` bounds
    the results cache that lets a run reuse what an earlier one made; `batch` is how many images may share a
    transformer pass; `draw_preview` draws the live previews; `download` tells how far the start-up download is;
    `fast` is where the Fast box starts (app.py --fast): each request still says for itself whether it skips steps."""
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
        download_line(demo, download)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=320):
                _controls_column(page, replace(defaults or default_options(manager.preset), fast=fast), public)
            with gr.Column(scale=3, min_width=320, elem_id="results"):
                _results_column(page)
        page.last_run, page.history, page.shown = gr.State(), gr.State([]), gr.State()
        page.row_shown = gr.State([False] * len(page.rows))
        page.timer = gr.Timer(0.5, active=False)
        checked = job_events(page)
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
        label="Settings from a PNG (fluxdemo's, or one with A1111 parameters)", file_types=[".png"], height=120
    )
    p.png_note = gr.Markdown("")  # what the PNG set, and what this app lacks to reproduce it
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
    low, high, why = strength_range(p.limits)
    # allow_custom_value: API callers may name a LoRA added since; the library checks every name
    with gr.Row(equal_height=True):
        # min widths: on a phone the two take a line each, and a LoRA's name is not cut
        p.lora = gr.Dropdown(label="LoRA", allow_custom_value=True, scale=3, min_width=220, **choices)
        p.strength = gr.Slider(
            low, high, value=1.0, step=0.05, label="LoRA strength", info=why, scale=2, min_width=160
        )
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
    # the box on a line of its own, the forms it takes in its (wrapping) info: nothing is cut on a phone
    p.hub_ref = gr.Textbox(
        label="A LoRA from the Hugging Face Hub",
        placeholder="user/repo",
        info="user/repo, user/repo/file.safetensors@revision, or its URL",
        max_lines=1,
    )
    p.hub_button = gr.Button("Use a LoRA from the Hub", size="sm")
    if offline_mode() and p.files.library.hub:
        gr.Markdown(
            "This app runs offline (`HF_HUB_OFFLINE=1`): only Hub LoRAs downloaded before are found. To fetch others, "
            "restart it online (`HF_HUB_OFFLINE=0 python app.py`), or put the file in the LoRA folder from a machine "
            "that reaches the Hub: `hf download user/repo file.safetensors --local-dir LORA_FOLDER`."
        )
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
    p.fast = gr.Checkbox(d.fast, label="Fast (skips steps, same steps for every image)", info=FAST_INFO)


def _axes(p: SimpleNamespace) -> None:
    low, high, _ = strength_range(p.limits)
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
    # what happened to the last request, and the running job's progress: above the result, never in its place
    p.note = gr.Markdown("")
    p.progress = gr.Markdown("", visible=False, elem_id="progress", min_height=56)
    hidden_outputs(p)
    with gr.Column(elem_id="result-area"):
        # over the result's corner (STUDIO_CSS), so it never pushes the result down
        p.preview = gr.Image(label="Live preview", visible=False, height=224, interactive=False, elem_id="preview")
        _tabs(p)


def _tabs(p: SimpleNamespace) -> None:
    # short tab names: all four fit a phone's width, none behind a "..." menu
    with gr.Tabs() as p.tabs:
        with gr.Tab("Compare", id="compare"):
            p.slider = gr.ImageSlider(
                label="A (left) · B (right)",
                elem_id="slider",  # the page's tests find its two images apart from the history's
                type="filepath",
                format="png",
                buttons=["download", "fullscreen"],
                max_height=560,  # the caption and the A/B pickers stay in view on a laptop
            )
            p.caption = gr.Markdown("", elem_id="slider-caption")  # below the slider: never under its buttons
            with gr.Row(equal_height=True):
                p.pick_a = gr.Dropdown(label="Left (A)", choices=[], scale=3, min_width=240)  # a title uncut
                p.pick_b = gr.Dropdown(label="Right (B)", choices=[], scale=3, min_width=240)
                p.swap_button = gr.Button("Swap A/B", size="sm", scale=1)
                p.show_diff = gr.Checkbox(label="Show where they differ", scale=1)
            p.diff_image = gr.Image(visible=False, type="pil", format="png", interactive=False, elem_id="difference")
        with gr.Tab("Sweep", id="sweep"):
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
        with gr.Tab("Single", id="single"):
            p.single = gr.Image(label="Image", type="filepath", format="png")
    p.strip = gr.Gallery(
        label="History: this session's results, each once (a reload starts afresh); click one to put it on the right",
        columns=6,
        height=190,
        object_fit="contain",  # whole thumbnails, each under its title
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


def _result_events(p: SimpleNamespace) -> None:
    """The result on screen: any two of the session's, and whether the controls still describe it."""
    pair = dict(
        fn=show_pair,
        inputs=[p.pick_a, p.pick_b, p.show_diff, p.history],
        outputs=[p.slider, p.diff_image, p.caption, p.note],
    )
    # always_last: a pick made while the last one is still on its way (a slow server) runs after it, not dropped
    gr.on([p.pick_a.input, p.pick_b.input, p.show_diff.input], **pair, **CHEAP, trigger_mode="always_last")
    p.swap_button.click(swap, [p.pick_a, p.pick_b], [p.pick_a, p.pick_b], **CHEAP).then(**pair, **CHEAP)
    p.strip.select(pick_from_strip, p.history, p.pick_b, **CHEAP, trigger_mode="always_last").then(**pair, **CHEAP)
    controls = inputs_of(p, "generate")
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
        [p.prompt, *numbers, p.lora, p.strength, *p.extra, p.fast, p.png_note],
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
        event.success(trigger_button, p.report_json, p.trigger, api_visibility="private")
    pickers = [p.lora, *p.extra[::2]]
    gr.on([p.demo.load] + [picker.change for picker in pickers], files.stack_card, pickers, p.card, **CHEAP)
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
