"""--compile's settings, without torch (flags.py reads them for --help): the LoRA capacity of the compiled slots,
the backend, and the memory strategies compilation works with. fluxdemo.lora.hotswap does the work."""

from __future__ import annotations

from dataclasses import dataclass

from fluxdemo.errors import OptionsError

COMPILE_CHOICES = ("on", "off", "aot")
AHEAD_OF_TIME = "aoti"  # the backend of --compile aot: torch.export + AOTInductor (fluxdemo.lora.aot)
BACKENDS = {"on": "inductor", "aot": AHEAD_OF_TIME}
DEFAULT_RANK = 64  # the usual FLUX LoRA ranks are 4-64; each slot costs its rank's matmuls at every step
DEFAULT_SLOTS = 2  # LoRAs active at once; each slot computes at every step, even at strength 0
MAX_RANK = 1024
MAX_SLOTS = 4  # as many as a stack may hold (pipeline.options.MAX_STACK)
COMPILED_STRATEGIES = ("resident", "model-offload")  # the transformer whole on the device while it runs


@dataclass(frozen=True)
class CompileSettings:
    """How --compile compiles: slots x rank of LoRA capacity, and torch.compile's backend (tests use a cheap one)."""

    slots: int = DEFAULT_SLOTS
    rank: int = DEFAULT_RANK
    backend: str = "inductor"

    def __post_init__(self) -> None:
        if not (isinstance(self.slots, int) and 1 <= self.slots <= MAX_SLOTS):
            raise OptionsError(f"--compile-slots must be from 1 to {MAX_SLOTS}, but is {self.slots!r}.")
        if not (isinstance(self.rank, int) and 1 <= self.rank <= MAX_RANK):
            raise OptionsError(f"--compile-rank must be from 1 to {MAX_RANK}, but is {self.rank!r}.")

    def describe(self) -> str:
        """One sentence for the report and the run panel."""
        slots = f"{self.slots} slot{'s' * (self.slots > 1)}"
        how = (
            "ahead of time (torch.export + AOTInductor, once per image size)"
            if self.backend == AHEAD_OF_TIME
            else f"(torch.compile, {self.backend})"
        )
        return (
            f"Compiled: the transformer's repeated blocks {how}, LoRAs hot-swapped into {slots} of rank "
            f"{self.rank}, so a LoRA or strength change does not recompile."
        )

    @property
    def ahead_of_time(self) -> bool:
        return self.backend == AHEAD_OF_TIME


def check_strategy(settings: CompileSettings | None, strategy: str) -> None:
    """Compiled blocks must see the whole transformer on the device; disk reads it back (a new module to compile)
    every request and group-offload streams its blocks through hooks."""
    if settings is not None and strategy not in COMPILED_STRATEGIES:
        raise OptionsError(
            f"--compile works with the resident and model-offload memory strategies, not {strategy}: start without "
            "--compile, or with --strategy resident or model-offload if the model fits."
        )


def check_stack(settings: CompileSettings | None, count: int) -> None:
    """A stack of `count` LoRAs (their transformer parts) fits the compiled slots."""
    if settings is not None and count > settings.slots:
        raise OptionsError(
            f"With --compile a stack holds at most {settings.slots} LoRAs (the compiled slots), but this one has "
            f"{count}: restart with --compile-slots {count}, or without --compile."
        )
