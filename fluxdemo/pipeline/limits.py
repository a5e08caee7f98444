"""The bounds on what one request may ask for, in one place, for the studio, the API, the CLI and the library alike.

A public link puts one GPU in front of strangers: every input is bounded here (prompt length, strengths, every number
finite), and so is the work one request may ask for, counted in units of one megapixel of tokens through one
denoising step, so that an absurd request is refused at once instead of holding the only model slot for hours. Each
refusal is an OptionsError whose sentence names the value, the limit and the flag (or environment variable) that
raises it: a visitor reads what to change, an operator reads what to set.

The defaults admit every ordinary request: a 28-step 1024x1024 compare (71 units), the default 6-strength sweep (212)
and a default grid of 2 LoRAs x 3 strengths x 2 seeds (425).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from numbers import Real

from fluxdemo.errors import OptionsError
from fluxdemo.pipeline.options import PUBLIC_STRENGTH_RANGE
from fluxdemo.pipeline.report import RunReport

MEGAPIXEL = 2**20  # 1024x1024 is one megapixel of work
# What a step costs besides the image's own tokens (one per 16x16 pixels): the 512 T5 tokens and the per-step work
# that does not grow with the image. Measured on the real-width kit as 935 image tokens' worth (bench/budget.py), so
# a 16x16 image costs a fifth of a 1024x1024 one per step, not nothing.
STEP_FIXED_PIXELS = 935 * 256
DECODE_STEPS = 1.0  # decoding and writing an image: about one step at its size (an estimate, to be measured on a GPU)
DEFAULT_MAX_PROMPT_CHARS = 2000  # T5 reads at most 512 tokens (about 2,000 characters of English); CLIP 77
DEFAULT_MAX_WORK = 512  # images x steps x megapixels: a 6-strength sweep at 50 steps and 1024x1024 is 300
DEFAULT_MAX_JOBS_PER_CLIENT = 2  # one running and one waiting: a page never needs more


def _real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. Operators set these by flag or environment (app.py); visitors cannot."""

    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    strength_min: float = PUBLIC_STRENGTH_RANGE[0]
    strength_max: float = PUBLIC_STRENGTH_RANGE[1]
    max_work: float = DEFAULT_MAX_WORK
    max_jobs_per_client: int = DEFAULT_MAX_JOBS_PER_CLIENT

    def __post_init__(self) -> None:
        if not (isinstance(self.max_prompt_chars, int) and self.max_prompt_chars >= 1):
            raise OptionsError(f"--max-prompt-chars must be a whole number >= 1, but is {self.max_prompt_chars!r}.")
        if not (_real(self.max_work) and math.isfinite(self.max_work) and self.max_work > 0):
            raise OptionsError(f"--max-work must be a finite number > 0, but is {self.max_work!r}.")
        if not (isinstance(self.max_jobs_per_client, int) and self.max_jobs_per_client >= 1):
            raise OptionsError(
                f"--max-jobs-per-client must be a whole number >= 1, but is {self.max_jobs_per_client!r}."
            )
        if not (_real(self.strength_min) and _real(self.strength_max) and self.strength_min <= self.strength_max):
            raise OptionsError(f"The strength range {self.strength_min!r} to {self.strength_max!r} is not a range.")


DEFAULT_LIMITS = Limits()


def check_text(name: str, value: object, limits: Limits = DEFAULT_LIMITS) -> str:
    """Text within the length limit; checked before anything tokenizes it."""
    if not isinstance(value, str):
        raise OptionsError(f"`{name}` must be text, but is {describe(value)}.")
    if len(value) > limits.max_prompt_chars:
        raise OptionsError(
            f"`{name}` is {len(value):,} characters; the limit is {limits.max_prompt_chars:,} "
            "(the operator can raise it with --max-prompt-chars or FLUXDEMO_MAX_PROMPT_CHARS)."
        )
    return value


def check_prompt(prompt: object, limits: Limits = DEFAULT_LIMITS) -> str:
    """The prompt (None: empty), if it is text within the length limit."""
    return "" if prompt is None else check_text("prompt", prompt, limits)


def check_number(name: str, value: object) -> float:
    """A finite real number (True/False, text, NaN and infinities are refused) -> the value as a float."""
    if not _real(value):
        raise OptionsError(f"`{name}` must be a number, but is {describe(value)}.")
    if not math.isfinite(value):
        raise OptionsError(f"`{name}` must be a finite number, but is {value}.")
    return float(value)


def check_strength(value: object, limits: Limits = DEFAULT_LIMITS, name: str = "strength") -> float:
    """A LoRA strength: finite and within the range."""
    strength = check_number(name, value)
    if not limits.strength_min <= strength <= limits.strength_max:
        raise OptionsError(
            f"`{name}` must be between {limits.strength_min:g} and {limits.strength_max:g}, but is {strength:g}."
        )
    return strength


def check_strengths(values: Iterable[object], limits: Limits = DEFAULT_LIMITS) -> list[float]:
    return [check_strength(v, limits) for v in values]


def work(images: int, steps: int, width: int, height: int) -> float:
    """A request's cost in megapixels of tokens through one step: per image, `steps` steps over the image's and the
    text's tokens, and its decode."""
    pixels = width * height
    return images * (steps * (pixels + STEP_FIXED_PIXELS) + DECODE_STEPS * pixels) / MEGAPIXEL


def check_work(images: int, steps: int, width: int, height: int, limits: Limits = DEFAULT_LIMITS) -> float:
    """The request's work, if within the budget; else a sentence with the sum, the limit and the flag."""
    cost = work(images, steps, width, height)
    if cost > limits.max_work:
        raise OptionsError(
            f"This request is {images} image{'s' * (images != 1)} x {steps} steps at {width}x{height} "
            f"(with the prompt's tokens and the decode) = {_units(cost)} units of work; the limit is "
            f"{limits.max_work:,g} (the operator can raise it with --max-work or FLUXDEMO_MAX_WORK). "
            "Ask for fewer images, fewer steps or a smaller size."
        )
    return cost


def check_request(options, images: int, strengths: Iterable[object] = (), limits: Limits = DEFAULT_LIMITS) -> None:
    """Everything this module bounds, for one request: `options` (a GenerateOptions, or anything with prompt, seed,
    steps, guidance, width and height) making `images` images at `strengths`. The library and the CLI call this
    before GenerateOptions.validate(), so a huge prompt is refused before it is tokenized."""
    check_prompt(options.prompt, limits)
    for name in ("seed", "steps", "guidance", "width", "height"):
        check_number(name, getattr(options, name))
    if not isinstance(getattr(options, "fast", False), bool):
        raise OptionsError(f"`fast` must be true or false, but is {describe(options.fast)}.")
    check_strengths(strengths, limits)
    check_work(images, options.steps, options.width, options.height, limits)


# Facts about the machine a public visitor has no business reading (free RAM, free VRAM, the server's RSS).
_HOST_MEMORY_FIELDS = ("plan", "peak_rss_bytes", "peak_anon_rss_bytes", "peak_file_rss_bytes", "predicted_ram_bytes")


def for_visitor(report: RunReport) -> RunReport:
    """A run report as a public app shows it: without facts about the host (the memory plan's free RAM and VRAM,
    the process's peak RSS). What the job itself used on the device stays."""
    return replace(report, memory=replace(report.memory, **dict.fromkeys(_HOST_MEMORY_FIELDS)))


def _units(cost: float) -> str:
    return f"{cost:,.0f}" if cost >= 10 else f"{cost:.2g}"  # 3,200; or 0.2 for a tiny test image


def describe(value: object) -> str:
    """What a wrong value is, in a visitor's words: "a number", "a list", "text ('1.0')"."""
    if isinstance(value, bool):
        return f"{value} (a yes/no)"
    if isinstance(value, str):
        return f"text ({value[:40]!r})"
    kind = {int: "a number", float: "a number", list: "a list", dict: "an object"}
    return kind.get(type(value), f"a {type(value).__name__}")
