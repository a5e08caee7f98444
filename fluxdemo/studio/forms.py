"""The page's values in, the library's values out: options, strengths, seeds, LoRA stacks, one checked request."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from fluxdemo.errors import OptionsError
from fluxdemo.lora import LoraLibrary
from fluxdemo.model.presets import Preset
from fluxdemo.pipeline import (
    MAX_LORAS_PER_RUN,
    MAX_STACK,
    PUBLIC_STRENGTH_RANGE,
    STRENGTH_RANGE,
    ImageParams,
    LoraChoice,
    Stack,
    as_stack,
)
from fluxdemo.pipeline.api import MAX_GRID_CELLS, MAX_SEED, GenerateOptions
from fluxdemo.pipeline.limits import DEFAULT_LIMITS, Limits, check_prompt, check_request
from fluxdemo.pipeline.model import Model

DEFAULT_SWEEP = "0, 0.25, 0.5, 0.75, 1, 1.25"
MAX_SWEEP_IMAGES = 8  # each image is one more denoising loop on the one shared GPU
DEFAULT_GRID_STRENGTHS = "0, 0.5, 1"
MAX_GRID_SEEDS = 4
EXTRA_ROWS = (2, 3, 4)  # the LoRA rows below the first: a stack holds up to four LoRAs
_ROWS = tuple(f"{key}_{n}" for n in EXTRA_ROWS for key in ("lora", "strength"))
# Each model job's parameters in gradio's API order: gradio_client callers pass them by position (a sweep's first
# LoRA strength, then `fast`, come last, so that callers who leave them out keep the order they had)
FIELDS = {
    "compare": ("prompt", "lora", "strength", "seed", "steps", "guidance", "width", "height", *_ROWS, "fast"),
    "generate": ("prompt", "lora", "strength", "seed", "steps", "guidance", "width", "height", *_ROWS, "fast"),
    "sweep": (
        "prompt", "lora", "strengths", "seed", "steps", "guidance", "width", "height", *_ROWS, "strength", "fast",
    ),
    "grid": (
        "prompt", "prompts", "rows", "strengths", "seeds", "steps", "guidance", "width", "height", "lora", "strength",
        *_ROWS, "fast",
    ),
}  # fmt: skip
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
    fast: bool | None = False,
) -> GenerateOptions:
    """The page's values as the library's options; GenerateOptions.validate() then checks their ranges (and that
    `fast`, the per-request step-skipping choice, is true or false; an API caller who leaves it out gets false)."""
    whole = {"seed": seed, "steps": steps, "width": width, "height": height}
    for name, value in {**whole, "guidance": guidance}.items():
        if value is None:
            raise OptionsError(f"`{name}` is empty: enter a number.")
    for name, value in whole.items():
        if float(value) != int(value):
            raise OptionsError(f"`{name}` must be a whole number, but is {value}.")
    whole = {name: int(value) for name, value in whole.items()}
    return GenerateOptions(prompt or "", guidance=float(guidance), fast=False if fast is None else fast, **whole)


def parse_strengths(text: str | None, limits: Limits = DEFAULT_LIMITS) -> list[float]:
    """A sweep's strengths from text such as "0, 0.5, 1": in the order given, each once, within the limits' range."""
    try:
        strengths = [float(part) for part in (text or "").replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise OptionsError(f"Strengths are numbers between commas, like {DEFAULT_SWEEP!r}; got {text!r}.") from None
    strengths = list(dict.fromkeys(strengths))  # the pipeline labels images by strength, so a repeat would collide
    if not 1 <= len(strengths) <= MAX_SWEEP_IMAGES:
        raise OptionsError(f"A sweep takes 1 to {MAX_SWEEP_IMAGES} strengths, but got {len(strengths)}.")
    low, high = limits.strength_min, limits.strength_max
    bad = [s for s in strengths if not low <= s <= high]
    if bad:
        raise OptionsError(f"Strengths must be between {low:g} and {high:g}, but {bad[0]:g} is not.")
    return strengths


def strength_range(limits: Limits) -> tuple[float, float, str | None]:
    """The sliders' range: the one the app enforces (app.py: STRENGTH_RANGE, or PUBLIC_STRENGTH_RANGE on a public
    link), and a line that says why when it is the narrower public one."""
    low, high = limits.strength_min, limits.strength_max
    narrower = (low, high) != STRENGTH_RANGE and (low, high) == PUBLIC_STRENGTH_RANGE
    return low, high, f"{low:g} to {high:g} on a public link, the range LoRAs are made for" if narrower else None


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
    request is queued (nothing is downloaded for a request it refuses), and the handler again before the model.
    Values from before `fast` (one fewer) read as exact, as they always ran."""
    if len(values) == len(FIELDS[kind]) - 1:
        values = [*values, False]
    if kind == "grid":
        prompt, prompts, rows, strengths, seeds, steps, guidance, width, height, first, strength, *pickers, fast = (
            values
        )
        prompt_list = tuple(line for line in (prompts or "").splitlines() if line.strip()) or (prompt or "",)
        stacks = tuple(as_stack(line) for line in (rows or "").splitlines() if line.strip())
        stacks = stacks or (tuple(ui_stack(first, strength, *pickers)),)
        if not stacks[0]:
            raise OptionsError(
                "A grid needs a LoRA row (one stack per line, e.g. style:0.8+detail:0.5), or a LoRA picked above."
            )
        seed_list = tuple(parse_seeds(seeds))
        options = to_options(prompt_list[0], seed_list[0], steps, guidance, width, height, fast)
        ask = Ask(kind, options, stacks, tuple(parse_strengths(strengths, limits)), prompt_list, seed_list)
        for text in prompt_list[1:]:
            check_prompt(text, limits)
    else:
        strength = values[2]  # a sweep's is its strengths' text; each multiplies the LoRAs' own
        options, stack = read_controls(
            [*values[:2], values[-2], *values[3:-2], values[-1]] if kind == "sweep" else values
        )
        if kind != "generate" and not stack:
            goal = "sweep its strength" if kind == "sweep" else "compare with the base model"
            raise OptionsError(f"Pick a LoRA to {goal}, or upload one.")
        columns = tuple(parse_strengths(strength, limits)) if kind == "sweep" else ()
        ask = Ask(kind, options, (stack,), columns)
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
        raise OptionsError(
            f"One run can use at most {MAX_LORAS_PER_RUN} different LoRAs, but this one names "
            f"{len(names)}: split it into smaller runs."
        )
    if ask.kind == "grid" and ask.images > MAX_GRID_CELLS:
        raise OptionsError(
            f"A grid of {len(ask.prompts)} prompts x {len(ask.seeds)} seeds x {len(ask.stacks)} rows x "
            f"{len(ask.columns)} strengths is {ask.images} images; at most {MAX_GRID_CELLS} fit in one grid."
        )


def unfetched_hub_loras(library: LoraLibrary, ask: Ask, scan: bool = True) -> list[str]:
    """The request's Hub LoRAs not downloaded yet: a model job never downloads, so these must be fetched first.
    scan=False reads the LoRA folder as last scanned (the admission runs in the server's event loop)."""
    return [name for name in ask.lora_names if library.is_hub_name(name, scan) and not library.fetched(name)]


def read_controls(values: Sequence) -> tuple[GenerateOptions, Stack]:
    """The controls in compare's order (prompt, LoRA, strength, seed, steps, guidance, width, height, the further
    rows' name and strength, fast) as options and a stack: the one reading of compare, generate and sweep."""
    prompt, lora, strength, seed, steps, guidance, width, height, *rows, fast = values
    stack = tuple(ui_stack(lora, strength, *rows))
    return to_options(prompt, seed, steps, guidance, width, height, fast), stack


def shown_params(manager: Model, options: GenerateOptions, stack: Stack) -> ImageParams:
    """What a run of these options and stack makes, as ImageParams (to compare with the controls later)."""
    o = options
    loras = tuple((c.name, None, c.strength) for c in stack)
    preset = manager.preset
    return ImageParams(
        o.prompt, o.seed, o.steps, o.guidance, o.width, o.height, preset.name, preset.transformer_quant, loras=loras,
        fast=o.fast,
    )  # fmt: skip


def controls_params(manager: Model, *values) -> ImageParams | None:
    """What the controls (compare's order) would make; None while a control holds no valid value."""
    try:
        options, stack = read_controls(values)
    except (OptionsError, TypeError, ValueError):
        return None
    return shown_params(manager, options, stack)


def random_seed() -> int:
    return random.randint(0, MAX_SEED)


def size_of(preset: str) -> tuple[int, int]:
    return SIZE_PRESETS[preset]


def preset_of(width: float, height: float) -> str | None:
    """The size preset for a width and height; None (no preset shown) for any other size."""
    return next((name for name, size in SIZE_PRESETS.items() if size == (width, height)), None)
