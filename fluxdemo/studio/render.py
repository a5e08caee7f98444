"""The library's reports as the page shows them: the LoRA card, the run summary, the stage chart, the history strip."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
from PIL import Image

from fluxdemo.lora import LoraReport
from fluxdemo.model.presets import PRESETS
from fluxdemo.pipeline import RunReport, difference, params_from_report
from fluxdemo.pipeline.model import Model
from fluxdemo.studio.guard import for_people
from fluxdemo.studio.history import describe_loras, find, slider_label
from fluxdemo.untrusted import MAX_LIST_ITEMS, MAX_SENTENCE_CHARS, markdown_text

STAGE_LABELS = {"baseline": "baseline", "lora": "LoRA"}  # the pipeline's image labels as the page writes them


def insert_trigger_words(prompt: str | None, report: dict | None) -> str:
    """The prompt with the LoRA's trigger words in front (those not already in it)."""
    prompt = (prompt or "").strip()
    words = [w for w in (report or {}).get("trigger_words", []) if w.lower() not in prompt.lower()]
    return ", ".join([*words, prompt] if prompt else words)


def lora_card(report: LoraReport | None) -> str:
    """The LoRA report as a few lines of Markdown: what it is, what it adapts, its trigger words, what is wrong.
    Everything a file chose (names, metadata, trigger words) is escaped: it shows as text, never as a tag or link."""
    if report is None:
        return "No LoRA selected: pick one from the folder, or upload a `.safetensors` file."
    text = markdown_text
    modules = ", ".join(f"{text(group)} {n}" for group, n in report.modules.items())
    verdict = "fits the loaded model" if report.compatible else "**does not fit** the loaded model"
    words = ", ".join(text(w) for w in report.trigger_words[:MAX_LIST_ITEMS])
    lines = [
        f"### {text(report.name)}",
        f"**{text(report.format)}** LoRA, {verdict} · rank {text(report.rank)} · "
        f"{_alpha(report.alpha)} · {_size(report.size)}",
        f"Adapts {text(report.targets)} modules ({modules or 'none'}); CLIP text encoder: "
        f"{'yes' if report.text_encoder else 'no'}",
        f"Base model: {text(report.base_model_hint or 'unknown')}",
        "Trigger words: " + (words or "none listed"),
    ]
    lines += [f"- **Problem:** {text(p, MAX_SENTENCE_CHARS)}" for p in report.problems[:MAX_LIST_ITEMS]]
    lines += [f"- Warning: {text(w, MAX_SENTENCE_CHARS)}" for w in report.warnings[:MAX_LIST_ITEMS]]
    return "\n\n".join(lines)


def _alpha(alpha: object) -> str:
    return "no alpha stored (scale 1)" if alpha is None else f"alpha {markdown_text(alpha)}"


def _size(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{max(size / 1e3, 1):.0f} kB"


def stage_seconds(report: RunReport):
    """Seconds per stage (loads, encoders, each image's denoising loop, decode) as a table; single steps left out."""
    import pandas as pd

    rows = [(s.name, round(s.seconds, 3)) for s in report.timeline if " step " not in s.name]
    return pd.DataFrame(rows, columns=["stage", "seconds"])


def run_summary(report: RunReport) -> str:
    """What ran, with which seed, how fast, with which memory strategy and how much memory."""
    o, model, memory = report.options, report.model, report.memory
    per_step: dict[str, list[float]] = {}
    for stage in report.timeline:
        label, _, _ = stage.name.rpartition(" step ")
        if label:
            per_step.setdefault(label, []).append(stage.seconds)
    speeds = ", ".join(f"{STAGE_LABELS.get(k, k)} {sum(v) / len(v):.3f} s/step" for k, v in per_step.items())
    peaks = [f"peak GPU memory {b / 2**30:.2f} GiB" for b in [memory.peak_device_bytes] if b is not None]
    peaks += [f"peak RAM {b / 2**30:.2f} GiB" for b in [memory.peak_rss_bytes] if b is not None]
    images = len(report.images)
    loras = {describe_loras(params_from_report(report, label)) for label in report.images}
    reused = f" · reused: {', '.join(report.reused)}" if report.reused else ""
    lines = [
        f"**Seed {o.seed}** · {o.steps} steps · guidance {o.guidance:g} · {o.width}×{o.height} · "
        f"{images} image{'s' * (images > 1)} in {report.seconds:.2f} s{reused}",
        "LoRAs: " + " | ".join(sorted(loras)),
        f"Memory strategy **{report.strategy}** on {model.device} ({model.dtype}) · " + " · ".join(peaks),
        f"Denoising: {speeds}",
    ]
    if report.model.weights_reason:  # which weight format ran, and why (fluxdemo.model.weights)
        lines.append(report.model.weights_reason)
    if report.model.compile_setup:  # --compile (fluxdemo.lora.hotswap)
        lines.append(report.model.compile_setup)
    lines += fast_lines(report)
    lines += [f"Note: {event}" for event in report.events]  # e.g. an out-of-memory fallback
    return "\n\n".join(lines)


def fast_lines(report: RunReport) -> list[str]:
    """--fast's label: the steps each image skipped, as observed; one line when they all skipped the same."""
    skipped = {label: image.skipped_steps for label, image in report.images.items() if image.options.fast}
    if not skipped:
        return []
    kinds = {tuple(steps) for steps in skipped.values()}
    steps = next(iter(skipped.values()))
    if len(kinds) == 1:
        return [
            f"**Fast** (TaylorSeer cache): every image predicted steps {_steps(steps)} instead of running them "
            f"({len(steps)} of {report.options.steps}); not the exact pictures."
        ]
    each = "; ".join(f"{STAGE_LABELS.get(k, k)}: {_steps(v)}" for k, v in skipped.items())
    return [f"**Fast** (TaylorSeer cache), predicted steps: {markdown_text(each, MAX_SENTENCE_CHARS)}."]


def _steps(steps: list[int]) -> str:
    return ", ".join(map(str, steps)) or "none"


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


def show_run(run: dict, history: list) -> tuple:
    """After a run (its typed report in run["report"]): the PNGs to download, the stage chart, the summary, the tab
    that shows the images, the history strip and the A/B pickers (a compare puts its own pair there)."""
    titles = [e.title for e in history]
    picks = [
        gr.Dropdown(choices=titles, value=run[side]) if side in run else gr.Dropdown(choices=titles)
        for side in ("a", "b")
    ]
    tab = gr.Tabs(selected=run["tab"])
    report = run["report"]
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


def trigger_button(report: dict | None) -> gr.Button:
    """The trigger-word button, only when the first LoRA has trigger words."""
    return gr.Button(visible=bool(report and report["trigger_words"]))


@for_people
def show_pair(a_title: str | None, b_title: str | None, show_difference: bool, history: list | None) -> tuple:
    """The slider over any two results of the session, captioned with what differs; their difference; and the note.
    A pair that cannot be shown leaves the slider as it is and says why in the note (an unqueued event's error would
    reach the page only as a mark on the slider)."""
    a, b = find(history or [], a_title), find(history or [], b_title)
    if a is None or b is None:
        return gr.skip(), gr.Image(visible=False), gr.skip(), gr.skip()
    expired = [entry for entry in (a, b) if not Path(entry.path).is_file()]
    if expired:
        return _kept(f"Result #{expired[0].number} has expired from the server's disk; run it again.")
    caption = markdown_text(slider_label(a, b), MAX_SENTENCE_CHARS)
    slider = gr.ImageSlider(value=(a.path, b.path))
    if not show_difference:
        return slider, gr.Image(visible=False), caption, ""
    left, right = Image.open(a.path), Image.open(b.path)
    if left.size != right.size:
        return _kept(f"#{a.number} and #{b.number} differ in size; a difference needs two of one size.")
    shown = difference(left, right)
    return (
        slider,
        gr.Image(value=shown, visible=True, label=f"Where #{a.number} and #{b.number} differ (brighter: more)"),
        caption,
        "",
    )


def _kept(sentence: str) -> tuple:
    return gr.skip(), gr.Image(visible=False), gr.skip(), f"**Not shown:** {sentence} The slider stays as it was."
