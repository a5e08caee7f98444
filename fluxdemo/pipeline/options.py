"""What one request may ask for: an image's options, the LoRA stack, and every bound on them, in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fluxdemo.errors import OptionsError

MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 16, 2048, 16  # 16 = VAE factor 8 x FLUX's 2x2 latent packing
MAX_STEPS = 100
MAX_GUIDANCE = 30.0
GUIDANCE_MAX = 10.0  # the controls' guidance: FLUX.1-dev's distilled guidance is 3.5, rarely useful past 10
MAX_SEED = 2**32 - 1
MAX_T5_TOKENS = 512

# The strength range, here only: the library, the CLI and a studio on this machine take STRENGTH_RANGE (past it a
# LoRA's delta swamps the model); a studio on a public link keeps to PUBLIC_STRENGTH_RANGE inside it, the range LoRAs
# are made for (Limits' default; app.py picks one, the sliders show it and say why).
STRENGTH_RANGE = (-4.0, 4.0)
PUBLIC_STRENGTH_RANGE = (0.0, 2.0)
STRENGTH_MIN, STRENGTH_MAX = STRENGTH_RANGE
MAX_STACK = 4  # LoRAs active at once in one image
MAX_LORAS_PER_RUN = 8  # distinct LoRAs one experiment may load (each stays attached for the whole run)
MAX_BATCH = 8  # images in one transformer pass: activations grow with it
# --fast: the step-skipping schedule's shape as fractions of the step count, so it scales with it. At 50 steps they
# give the research figure for TaylorSeer on FLUX (10 full steps first, then one full step in 5: 2.5x,
# ../shared/research/gpu-speed.md section 2); at FLUX's 28 steps, 6 first and one in 3 (13 of 28 run).
FAST_WARMUP_FRACTION = 0.2  # the first steps always run in full: the composition is decided there
FAST_INTERVAL_FRACTION = 0.1  # then a full step every this fraction of the steps, at least every other step


@dataclass(frozen=True)
class GenerateOptions:
    """One image's settings, FLUX.1-dev's defaults. validate() is the one place options are checked."""

    prompt: str
    seed: int = 0
    steps: int = 28
    guidance: float = 3.5
    width: int = 1024
    height: int = 1024
    max_sequence_length: int = MAX_T5_TOKENS
    fast: bool = False  # skip steps on FastSchedule.of(steps): faster, not the same pixels; never the default

    def validate(self) -> GenerateOptions:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise OptionsError("`prompt` is empty: describe the image you want.")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not MIN_SIDE <= value <= MAX_SIDE or value % SIDE_MULTIPLE:
                rule = f"a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE}"
                raise OptionsError(f"`{name}` must be {rule}, but is {value}.")
        if not 1 <= self.steps <= MAX_STEPS:
            raise OptionsError(f"`steps` must be between 1 and {MAX_STEPS}, but is {self.steps}.")
        if not 0.0 <= self.guidance <= MAX_GUIDANCE:  # NaN fails this too
            raise OptionsError(f"`guidance` must be between 0 and {MAX_GUIDANCE:g}, but is {self.guidance}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise OptionsError(f"`seed` must be between 0 and {MAX_SEED}, but is {self.seed}.")
        if not 1 <= self.max_sequence_length <= MAX_T5_TOKENS:
            raise OptionsError(
                f"`max_sequence_length` must be between 1 and {MAX_T5_TOKENS}, but is {self.max_sequence_length}."
            )
        if not isinstance(self.fast, bool):
            raise OptionsError(f"`fast` must be true or false, but is {self.fast!r:.40}.")
        return self


@dataclass(frozen=True)
class FastSchedule:
    """--fast's static schedule, a pure function of the step count (FastSchedule.of), so that every image made at
    that count, the baseline and the LoRA image of a compare alike, runs and predicts the same steps. It is diffusers'
    TaylorSeer cache (fluxdemo.pipeline.fast): on a predicted step the transformer's blocks do not run, and its output
    is extrapolated from the last full steps. Steps count from 0 here, as diffusers counts them."""

    steps: int
    disable_cache_before_step: int  # steps 0 .. this - 1 run in full
    cache_interval: int  # then every this-th step runs in full
    max_order: int = 1  # the Taylor expansion's order: 1 extrapolates along a line
    method: str = "taylorseer"

    @classmethod
    def of(cls, steps: int) -> FastSchedule:
        warmup = max(2, round(steps * FAST_WARMUP_FRACTION))  # two full steps at least: a slope to extrapolate along
        return cls(steps, warmup, max(2, round(steps * FAST_INTERVAL_FRACTION)))

    def runs(self, step: int) -> bool:
        """Whether step `step` (from 0) runs in full: TaylorSeerCacheHook's rule, restated."""
        after_warmup = step - self.disable_cache_before_step - 1
        return step < self.disable_cache_before_step or after_warmup % self.cache_interval == 0

    def predicted(self) -> list[int]:
        """The predicted steps, numbered from 1 as the timeline and the report number them."""
        return [step + 1 for step in range(self.steps) if not self.runs(step)]


def steps_run(options: GenerateOptions) -> int:
    """The steps whose transformer blocks run (a predicted step costs next to nothing): what a step budget counts."""
    return options.steps - len(FastSchedule.of(options.steps).predicted()) if options.fast else options.steps


@dataclass(frozen=True)
class LoraChoice:
    """One LoRA of a stack: its name in the LoRA library and its strength."""

    name: str
    strength: float = 1.0

    def label(self) -> str:
        return f"{self.name.removesuffix('.safetensors')}:{self.strength:g}"


Stack = tuple[LoraChoice, ...]  # empty: the base model


def parse_lora(text: str, default_strength: float = 1.0) -> LoraChoice:
    """`NAME` or `NAME:STRENGTH` (A1111's `<lora:name:weight>` order); a name may itself hold colons (a URL)."""
    name, colon, tail = text.strip().rpartition(":")
    if colon:
        try:
            return LoraChoice(name.strip(), float(tail))
        except ValueError:
            pass  # no number after the last colon: it belongs to the name
    return LoraChoice(text.strip(), default_strength)


def parse_stack(text: str, default_strength: float = 1.0) -> Stack:
    """A stack written `a:0.8+b:0.5` (entries without a strength take `default_strength`)."""
    parts = [part for part in text.split("+") if part.strip()]
    if not parts:
        raise OptionsError(f"{text!r} names no LoRA: write NAME, NAME:STRENGTH, or a stack such as a:0.8+b:0.5.")
    return tuple(parse_lora(part, default_strength) for part in parts)


def as_stack(value, default_strength: float = 1.0) -> Stack:
    """A stack from what callers pass: None, a name or `a:0.8+b:0.5` text, a LoraChoice, a (name, strength) pair,
    or a list of any of these."""
    if value is None or value == "" or value == ():
        return ()
    if isinstance(value, LoraChoice):
        return (value,)
    if isinstance(value, str):
        return parse_stack(value, default_strength)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str) and not isinstance(value[1], str):
        return (LoraChoice(value[0], check_lora_strength(value[1])),)
    if isinstance(value, (list, tuple)):
        return tuple(choice for item in value for choice in as_stack(item, default_strength))
    raise OptionsError(f"A LoRA is a name or a (name, strength) pair, not {type(value).__name__}.")


def stack_label(stack: Stack) -> str:
    """`base` or `a:0.8 + b:0.5`: how reports, labels and file names name a stack."""
    return " + ".join(choice.label() for choice in stack) or "base"


def check_lora_strength(value) -> float:
    """The one check of STRENGTH_RANGE (a public app narrows it with Limits)."""
    try:
        strength = float(value)
    except (TypeError, ValueError):
        raise OptionsError(f"A LoRA strength is a number, not {value!r}.") from None
    if not math.isfinite(strength) or not STRENGTH_MIN <= strength <= STRENGTH_MAX:
        raise OptionsError(
            f"A LoRA strength must be a finite number between {STRENGTH_MIN:g} and {STRENGTH_MAX:g}, but is {value}."
        )
    return strength
