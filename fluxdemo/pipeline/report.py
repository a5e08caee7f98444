"""What a run reports, typed: RunReport and its parts, read by field in the studio, the CLI and the PNG writer.

report.to_dict() is the JSON a user sees (the CLI's report.json, the studio's run report and API), written by
fluxdemo.records' one rule. To add a field: declare it on the class, in the place its key should take in the JSON,
with optional() when it may be unknown (then it is left out while None, and older callers need not set it); set it
where the report is built (experiments._report, or api.grid for grids); read it by name.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxdemo.lora import LoraEntry
from fluxdemo.model.memory import MemoryReport
from fluxdemo.model.timeline import Stage
from fluxdemo.pipeline.options import FastSchedule, GenerateOptions, LoraChoice
from fluxdemo.records import Record, optional


@dataclass(frozen=True, kw_only=True)
class ModelInfo(Record):
    """The model that made the images."""

    preset: str
    transformer_quant: str
    t5_quant: str
    dtype: str  # "bfloat16"
    device: str  # "cuda:0", "cpu"
    weights: str | None = optional()  # the transformer's format: gguf, bf16 or fp8 (fluxdemo.model.weights)
    weights_reason: str | None = optional()  # why the planner chose it, one sentence
    compiled: bool | None = optional()  # --compile: the transformer's blocks compiled, LoRAs hot-swapped
    compile_setup: str | None = optional()  # how, one sentence (CompileSettings.describe)


@dataclass(frozen=True)
class LoraUse(Record):
    """One LoRA of an image's stack, by file identity, at its strength (0 included: it was named)."""

    name: str
    sha256: str
    strength: float


@dataclass(frozen=True, kw_only=True)
class ImageReport(Record):
    """One image: its options, its stack, and whether it came from the cache."""

    options: GenerateOptions
    loras: list[LoraUse]
    reused: bool
    replica: str | None = optional()  # the Ray Serve replica that made it (fluxdemo.serve)
    # with options.fast: the steps (from 1) whose transformer blocks did not run, as observed while it was made
    skipped_steps: list[int] | None = optional()


@dataclass(frozen=True, kw_only=True)
class LoraSummary(Record):
    """What a run report says of one LoRA file: identity, format, size of the adaptation, trigger words."""

    name: str
    sha256: str
    format: str
    rank: int | dict[str, int] | None
    alpha: float | dict[str, int] | None
    targets: int
    modules: dict[str, int]
    text_encoder: bool
    trigger_words: list[str]
    strength: float | None = optional()  # set on RunReport.lora only

    @classmethod
    def of(cls, entry: LoraEntry, strength: float | None = None) -> LoraSummary:
        r = entry.report
        return cls(
            name=entry.name,
            sha256=entry.sha256,
            format=r.format,
            rank=r.rank,
            alpha=r.alpha,
            targets=r.targets,
            modules=r.modules,
            text_encoder=r.text_encoder,
            trigger_words=r.trigger_words,
            strength=strength,
        )


@dataclass(frozen=True, kw_only=True)
class GridCell(Record):
    """One cell of a grid: its prompt, seed, column strength, place, scaled stack and image label."""

    prompt: str
    seed: int
    strength: float
    row: int
    column: int
    loras: list[LoraChoice]
    label: str  # its key in Result.images
    file: str | None = optional()  # the CLI's PNG of the cell, in report.json


@dataclass(frozen=True, kw_only=True)
class GridLayout(Record):
    """A grid's axes: rows are stack labels (options.stack_label), columns strengths."""

    prompts: list[str]
    seeds: list[int]
    rows: list[str]
    strengths: list[float]


@dataclass(frozen=True, kw_only=True)
class ReplicaReport(Record):
    """What one Ray Serve replica made of a run (fluxdemo.serve), and on what."""

    images: list[str]
    model: ModelInfo
    strategy: str
    memory: MemoryReport
    seconds: float


@dataclass(frozen=True, kw_only=True)
class RunReport(Record):
    """One run: the first image's options, the model, each image by label, the LoRAs, what was reused, the stage
    timeline, the memory strategy and peaks; a grid adds its cells and layout."""

    options: GenerateOptions
    model: ModelInfo
    images: dict[str, ImageReport]
    loras: list[LoraSummary]
    lora: LoraSummary | None  # the first LoRA of the first image with one, at its strength (single-LoRA readers)
    strengths: dict[str, float | None]  # per image: its first LoRA's strength, None for the base model
    text_encoder_lora: bool
    truncated_tokens: int  # the most T5 tokens a prompt lost
    reused: list[str]  # stages served from the cache: "encode", "encode t5", image labels
    strategy: str
    events: list[str]  # what went wrong and what the manager did about it (an out-of-memory fallback)
    timeline: list[Stage]
    seconds: float
    memory: MemoryReport
    batches: list[list[str]]  # the image labels of each transformer pass
    fast: FastSchedule | None = optional()  # --fast's schedule, when the first image used it (each image says its own)
    cells: list[GridCell] | None = optional()
    grid: GridLayout | None = optional()
    replicas: dict[str, ReplicaReport] | None = optional()
