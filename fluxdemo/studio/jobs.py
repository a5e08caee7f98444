"""The model jobs' events. Each request is checked first (its LoRAs found, fetched and fitting the model) by a step
with no outputs; the job then writes into hidden outputs of its own, and only a finished result is copied to what
the page shows. An error or a Cancel thus never marks or empties the result on screen: a note beside it says what
happened."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import gradio as gr

from fluxdemo.studio.forms import FIELDS, read_request
from fluxdemo.studio.render import show_run

HUB_DOWNLOADS = 2  # Hub LoRA downloads at once, for every visitor together
GPU_EVENT = dict(concurrency_limit=1, concurrency_id="gpu")  # one model job at a time, across all events (or replica)
HUB_EVENT = dict(concurrency_limit=HUB_DOWNLOADS, concurrency_id="hub", api_visibility="private")
# Cheap events skip the queue from a page, and join it from gradio_client under a bound of their own (admission):
# a full model queue never turns away a Cancel, an inspect, a refresh or an upload.
CHEAP = dict(queue=False, api_visibility="private")
TABS = {"compare": "compare", "generate": "single", "sweep": "sweep", "grid": "grid"}  # each job's tab
# On a narrow page the results column sits below the controls, and a page scrolled down hides its top: a job
# started then brings the top (what happened, the progress) into view.
SCROLL_TO_RESULTS = """() => {
    const results = document.getElementById("results");
    const top = results ? results.getBoundingClientRect().top : 0;
    if (top < 0 || top > window.innerHeight / 2) {
        results.scrollIntoView({block: "start"});
    }
}"""


def hidden_outputs(p: SimpleNamespace) -> None:
    """Each job's own outputs, never shown (the API returns them): a failed or cancelled job marks only these."""
    image = dict(visible=False, format="png")
    p.made = {
        "compare": [gr.ImageSlider(type="filepath", **image)],
        "generate": [gr.Image(type="filepath", **image)],
        "sweep": [gr.Gallery(**image)],
        "grid": [gr.Gallery(**image), gr.Gallery(**image)],
    }
    p.made_report = gr.JSON(visible=False)


def inputs_of(p: SimpleNamespace, kind: str) -> list:
    """A model job's components in its API order (forms.FIELDS)."""
    named = {
        "prompt": p.prompt, "lora": p.lora, "strength": p.strength, "strengths": p.strengths, "seed": p.seed,
        "steps": p.steps, "guidance": p.guidance, "width": p.width, "height": p.height, "prompts": p.prompts,
        "rows": p.rows_text, "seeds": p.seeds, "fast": p.fast,
    }  # fmt: skip
    extra = dict(zip(FIELDS["compare"][-len(p.extra) - 1 : -1], p.extra, strict=True))
    if kind == "grid":
        named["strengths"] = p.grid_strengths
    return [{**named, **extra}[name] for name in FIELDS[kind]]


def _busy(p: SimpleNamespace, tab: str | None) -> list:
    """While a job runs: its tab in front, the progress line and the live preview (empty, no earlier caption) shown
    and polled, the job buttons off."""
    on = tab is not None
    shown = [
        gr.Tabs(selected=tab) if on else gr.skip(),
        gr.Image(visible=on, value=None, label="Live preview: after the first steps"),
        gr.Markdown(visible=on, value="Starting…"),
        gr.Timer(active=on),
    ]
    return shown + [gr.Button(interactive=not on) for _ in p.buttons]


def _shown(p: SimpleNamespace, kind: str) -> tuple[list, Callable]:
    """The visible outputs a finished job is copied to, and the copy (a compare also captions its slider)."""
    if kind == "compare":
        return [p.slider, p.info, p.caption], lambda pair, report, run: (pair, report, run["caption"])
    visible = {"generate": [p.single], "sweep": [p.gallery], "grid": [p.grid_pics, p.grid_cells]}[kind]
    return [*visible, p.info], lambda *values: values[:-1]


def job_events(p: SimpleNamespace) -> list:
    """Each model job's chain: busy, the check, the job, the result shown; -> (event, admission rule)s."""
    busy_outputs = [p.tabs, p.preview, p.progress, p.timer, *p.buttons]
    idle = dict(fn=lambda: _busy(p, None), inputs=None, outputs=busy_outputs, **CHEAP)
    said = dict(fn=p.studio.refusal, inputs=None, outputs=p.note, **CHEAP)
    triggers = {"compare": [p.compare_button.click, p.prompt.submit], "generate": [p.generate_button.click]}
    triggers |= {"sweep": [p.sweep_button.click], "grid": [p.grid_button.click]}
    jobs, checked = [], []
    for kind, tab in TABS.items():
        inputs = inputs_of(p, kind)
        # busy first, then the job: in parallel, a job refused at once could finish before busy() and leave the
        # buttons off
        started = gr.on(triggers[kind], lambda tab=tab: _busy(p, tab), None, busy_outputs, **CHEAP)
        gr.on(triggers[kind], None, js=SCROLL_TO_RESULTS)
        # The check downloads Hub LoRAs in the Hub's queue group, so the job that follows never downloads in the slot
        check = started.then(p.studio.checker(kind), inputs, None, show_progress_on=p.progress, **HUB_EVENT)
        job = check.success(
            getattr(p.studio, kind),
            [*inputs, p.history],
            [*p.made[kind], p.made_report, p.last_run, p.history],
            api_name=kind,
            show_progress_on=p.progress,
            **GPU_EVENT | ({"concurrency_limit": p.manager.runner.jobs} if p.manager.runner else {}),  # one a replica
        )
        for failed in (check, job):  # gradio 6.31's page skips .then on errors
            failed.failure(**idle)
            failed.failure(**said)
        job.then(**idle)
        visible, copy = _shown(p, kind)
        job.success(copy, [*p.made[kind], p.made_report, p.last_run], visible, **CHEAP)
        shown = [p.downloads, p.chart, p.run_md, p.tabs, p.strip, p.pick_a, p.pick_b]
        job.success(show_run, [p.last_run, p.history], shown, api_visibility="private").then(
            lambda run: (run.get("shown"), ""), p.last_run, [p.shown, p.note], **CHEAP
        )
        jobs += [check, job]
        checked += [(check, lambda data, kind=kind: read_request(kind, data, p.limits)), (job, p.studio.admit(kind))]
    p.cancel.click(p.studio.cancel, None, p.note, api_name="cancel", cancels=jobs, concurrency_limit=None, queue=False)
    p.cancel.click(**idle)
    p.timer.tick(p.studio.latest_preview, None, p.preview, show_progress="hidden", **CHEAP)
    return checked
