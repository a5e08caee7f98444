"""A session's results, kept so that any two can be compared: every image with the settings that made it, and what
tells two of them apart (the slider's labels), and whether the controls still describe what is on screen.

Plain data and functions: the studio keeps a list of Entry in each browser session's state.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxdemo.pipeline import ImageParams

MAX_HISTORY = 48  # images per browser session; the oldest go first


@dataclass(frozen=True)
class Entry:
    """One image of the session: its number (1, 2, ...), the run that made it, and its PNG and parameters."""

    number: int
    run: int
    kind: str  # compare | generate | sweep | grid
    label: str  # the image's label in its run: "baseline", "lora", "strength 0.5", a grid cell
    path: str
    params: ImageParams

    @property
    def title(self) -> str:
        """How the history strip and the A/B pickers name it: "#4 · run 2 · peft:0.8 · seed 5" (then " · fast")."""
        fast = " · fast" if self.params.fast else ""
        return f"#{self.number} · run {self.run} · {describe_loras(self.params)} · seed {self.params.seed}{fast}"


def describe_loras(params: ImageParams) -> str:
    """`base model`, or the stack as `name:strength + ...`."""
    return " + ".join(f"{_stem(name)}:{strength:g}" for name, _, strength in params.loras) or "base model"


def add(history: list[Entry], kind: str, images: list[tuple[str, str, ImageParams]]) -> list[Entry]:
    """The history with a run's images (label, PNG path, parameters) appended, at most MAX_HISTORY kept. An image
    made alike before (a compare's baseline again, a grid's strength-0 cells) is not added twice: entry_of finds
    the earlier one."""
    number = history[-1].number if history else 0
    run = history[-1].run + 1 if history else 1
    seen = {_image_key(e.params) for e in history}
    new = []
    for label, path, params in images:
        if _image_key(params) not in seen:
            seen.add(_image_key(params))
            new.append(Entry(number + len(new) + 1, run, kind, label, path, params))
    return (history + new)[-MAX_HISTORY:]


def entry_of(history: list[Entry], params: ImageParams) -> Entry | None:
    """The newest entry for an image made alike."""
    return next((e for e in reversed(history) if _image_key(e.params) == _image_key(params)), None)


def _image_key(p: ImageParams) -> tuple:
    """What decides the pixels: a LoRA at strength 0 adds nothing (a grid's strength-0 cells are the base image)."""
    loras = tuple((name, strength) for name, _, strength in p.loras if strength != 0)
    return (p.prompt, p.seed, p.steps, p.guidance, p.width, p.height, p.model, p.quant, loras, p.fast)


def find(history: list[Entry], title: str | None) -> Entry | None:
    return next((e for e in history if e.title == title), None)


def differences(a: ImageParams, b: ImageParams) -> list[str]:
    """What tells two images apart, each as `what: a → b`; empty when they were made alike."""
    out = []
    if describe_loras(a) != describe_loras(b):
        out.append(f"LoRAs: {describe_loras(a)} → {describe_loras(b)}")
    for name in ("seed", "steps", "guidance"):
        if getattr(a, name) != getattr(b, name):
            out.append(f"{name}: {getattr(a, name)} → {getattr(b, name)}")
    if (a.width, a.height) != (b.width, b.height):
        out.append(f"size: {a.width}×{a.height} → {b.width}×{b.height}")
    if a.prompt != b.prompt:
        out.append(f"prompt: {_short(a.prompt)} → {_short(b.prompt)}")
    if (a.model, a.quant) != (b.model, b.quant):
        out.append(f"model: {a.model} {a.quant} → {b.model} {b.quant}")
    if a.fast != b.fast:  # --fast predicts steps: part of such a difference is the cache's
        out.append(f"steps: {_mode(a)} → {_mode(b)}")
    return out


def _mode(params: ImageParams) -> str:
    return "fast (some predicted)" if params.fast else "all run"


def slider_label(a: Entry, b: Entry) -> str:
    """The A/B slider's label: which result is on each side, and what differs between them."""
    differ = "; ".join(differences(a.params, b.params)) or "nothing: the same settings"
    return f"left #{a.number}: {describe_loras(a.params)} · right #{b.number}: {describe_loras(b.params)} — {differ}"


def stale_note(shown: ImageParams | None, current: ImageParams | None) -> str:
    """A line for the result on screen: empty while the controls still describe it, else what it was made with."""
    if shown is None or current is None:
        return ""
    changed = differences(shown, current)
    if not changed:
        return ""
    return (
        "**The result on screen belongs to other settings** (" + "; ".join(changed) + "): it stays as it was "
        "made; run again for the current ones."
    )


def _stem(name: str) -> str:
    return name.rsplit("/", 1)[-1].removesuffix(".safetensors")


def _short(text: str, limit: int = 40) -> str:
    return repr(text if len(text) <= limit else text[: limit - 1] + "…")
