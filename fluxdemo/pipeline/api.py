"""What users run: generate(), compare(), sweep() and grid(), each a set of images for fluxdemo.pipeline.experiments.

A LoRA argument is a name in the manager's LoRA library, a stack written `a:0.8+b:0.5`, or a list of names and
(name, strength) pairs; `strength` is the default for entries that give none. compare() is the base model against
the stack, from one seed and one encoding of the prompt. Pass a ResultsCache to reuse what earlier calls made (a
compare that changes only the strength then denoises only the LoRA image).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from PIL import Image

from fluxdemo.errors import OptionsError
from fluxdemo.pipeline.cache import ResultsCache
from fluxdemo.pipeline.experiments import ImageSpec, Result, run
from fluxdemo.pipeline.images import GridText, grid_image
from fluxdemo.pipeline.model import Model
from fluxdemo.pipeline.options import MAX_SEED as MAX_SEED
from fluxdemo.pipeline.options import MAX_SIDE as MAX_SIDE
from fluxdemo.pipeline.options import MAX_STEPS as MAX_STEPS
from fluxdemo.pipeline.options import MIN_SIDE as MIN_SIDE
from fluxdemo.pipeline.options import SIDE_MULTIPLE as SIDE_MULTIPLE
from fluxdemo.pipeline.options import GenerateOptions, LoraChoice, Stack, as_stack
from fluxdemo.pipeline.options import stack_label as stack_label
from fluxdemo.pipeline.report import GridCell, GridLayout, RunReport
from fluxdemo.pipeline.stages import Controls
from fluxdemo.pipeline.stages import encode as encode
from fluxdemo.pipeline.stages import initial_noise as initial_noise
from fluxdemo.pipeline.stages import pipeline_view as pipeline_view

MAX_GRID_CELLS = 64  # images in one grid call (prompts x seeds x rows x strengths)
MAX_GRID_PICTURE_PIXELS = 4096 * 4096  # one grid picture's cells together: 64 cells at 2048x2048 would be 268 MP
ROW_AXIS, COLUMN_AXIS = "LoRA or stack", "strength: × each LoRA's own"  # a grid picture's axis titles

LoraArg = str | LoraChoice | tuple | list | None


def generate(
    manager: Model,
    options: GenerateOptions,
    lora: LoraArg = None,
    strength: float = 1.0,
    controls: Controls = Controls(),
    cache: ResultsCache | None = None,
) -> Result:
    """One image: with a LoRA stack ("lora") or the base model ("baseline")."""
    stack = as_stack(lora, strength)
    return run(manager, [ImageSpec("lora" if stack else "baseline", options, stack)], controls, cache)


def compare(
    manager: Model,
    options: GenerateOptions,
    lora: LoraArg,
    strength: float = 1.0,
    controls: Controls = Controls(),
    cache: ResultsCache | None = None,
    batch: int = 1,
) -> Result:
    """The base model's image ("baseline") and the stack's ("lora"), from one seed and one encoding; batch=2 makes
    both in one transformer pass when the stack is one LoRA (see experiments.run)."""
    stack = as_stack(lora, strength)
    if not stack:
        raise OptionsError("Compare needs a LoRA: pick one (or a stack) to set against the base model.")
    return run(manager, [ImageSpec("baseline", options), ImageSpec("lora", options, stack)], controls, cache, batch)


def scaled(stack: Stack, strength: float) -> Stack:
    """The stack with every LoRA's strength multiplied by `strength` (a sweep or grid column), rounded past float
    noise so that reports and PNGs say 0.8 x 0.75 = 0.6, not 0.6000000000000001."""
    return tuple(replace(choice, strength=round(choice.strength * strength, 9)) for choice in stack)


def sweep(
    manager: Model,
    options: GenerateOptions,
    lora: LoraArg,
    strengths: Sequence[float],
    controls: Controls = Controls(),
    cache: ResultsCache | None = None,
    batch: int = 1,
) -> Result:
    """One image per strength, same seed: images keyed "strength 0.5" etc., in the order given. For a stack, each
    strength multiplies every LoRA's own. With batch > 1 the strength-0 image shares a pass with another (a LoRA
    runs at one strength per pass)."""
    stack = as_stack(lora)
    if not stack:
        raise OptionsError("A sweep needs a LoRA: pick one (or a stack) to sweep.")
    specs = [ImageSpec(sweep_label(s), options, scaled(stack, s)) for s in dict.fromkeys(strengths)]
    return run(manager, specs, controls, cache, batch)


def sweep_label(strength: float) -> str:
    """A sweep image's key in Result.images: "strength 0.5" (scaled_label() says what it ran at)."""
    return f"strength {strength:g}"


def grid(
    manager: Model,
    options: GenerateOptions,
    prompts: Sequence[str],
    seeds: Sequence[int],
    rows: Sequence[LoraArg],
    strengths: Sequence[float],
    controls: Controls = Controls(),
    cache: ResultsCache | None = None,
    batch: int = 1,
) -> Result:
    """Forge's X/Y plot for LoRAs: per prompt and seed, one row per LoRA stack and one column per strength (which
    multiplies each LoRA's own). Images are keyed by their cell's label; report.cells lists every cell (a GridCell),
    report.grid the axes. Cells at strength 0 are the baseline, made once per prompt and seed. batch > 1 sends cells
    through the transformer together: those of one row and column (their seeds and prompts), and those of one column
    whose rows are single LoRAs, with the baseline (see experiments.run)."""
    prompts, seeds = list(dict.fromkeys(prompts)), list(dict.fromkeys(seeds))
    strengths = list(dict.fromkeys(strengths))
    stacks = [as_stack(row) for row in rows]
    if not prompts or not seeds or not stacks or not strengths:
        raise OptionsError("A grid needs at least one prompt, one seed, one LoRA row and one strength.")
    if any(not stack for stack in stacks):
        raise OptionsError("Every grid row names a LoRA or a stack such as a:0.8+b:0.5.")
    count = len(prompts) * len(seeds) * len(stacks) * len(strengths)
    if count > MAX_GRID_CELLS:
        raise OptionsError(
            f"A grid of {len(prompts)} prompts x {len(seeds)} seeds x {len(stacks)} rows x {len(strengths)} "
            f"strengths is {count} images; at most {MAX_GRID_CELLS} fit in one grid."
        )
    specs, cells = [], []
    for p, prompt in enumerate(prompts):
        for seed in seeds:
            for r, stack in enumerate(stacks):
                for c, strength in enumerate(strengths):
                    label = f"p{p + 1} seed {seed} row {r + 1} x{strength:g}"
                    cell_stack = scaled(stack, strength)
                    specs.append(ImageSpec(label, replace(options, prompt=prompt, seed=seed), cell_stack))
                    cell = GridCell(
                        prompt=prompt,
                        seed=seed,
                        strength=strength,
                        row=r,
                        column=c,
                        loras=list(cell_stack),
                        label=label,
                    )
                    cells.append(cell)
    result = run(manager, specs, controls, cache, batch)
    layout = GridLayout(prompts=prompts, seeds=seeds, rows=[stack_label(s) for s in stacks], strengths=strengths)
    result.report = replace(result.report, cells=cells, grid=layout)
    return result


def grid_pictures(result: Result) -> list[tuple[str, int, Image.Image]]:
    """The labelled grid pictures of a grid() result: (prompt, seed, picture) per prompt and seed. The base model's
    column (strength 0) is drawn once, in the first row: it is the same picture in every row."""
    layout, cells = result.report.grid, result.report.cells
    pictures = []
    for prompt in layout.prompts:
        for seed in layout.seeds:
            rows: list[list[Image.Image | None]] = [[None] * len(layout.strengths) for _ in layout.rows]
            for c in cells:
                if c.prompt == prompt and c.seed == seed and not _repeated_base(c):
                    rows[c.row][c.column] = result.images[c.label]
            pictures.append((prompt, seed, grid_image(_fit_cells(rows), grid_text(result.report, prompt, seed))))
    return pictures


def grid_text(report: RunReport, prompt: str, seed: int) -> GridText:
    """What the grid picture of one prompt and seed says: the seed and prompt, the rows' stacks, the columns."""
    layout = report.grid
    columns = tuple(column_label(s) for s in layout.strengths)
    return GridText(f"seed {seed} · {prompt}", tuple(layout.rows), columns, ROW_AXIS, COLUMN_AXIS)


def grid_cells(report: RunReport) -> list[tuple[str, str]]:
    """A grid() result's cells as a gallery shows them: (label, caption), the base model's once per prompt and seed.
    A caption names the prompt (when there are several), the seed, the row's stack and the column's strength:
    "seed 1 · kohya:0.8 + comfy:0.5 × 0.5", "seed 1 · base model"."""
    layout = report.grid
    shown = []
    for cell in (c for c in report.cells if not _repeated_base(c)):
        prompt = f"p{layout.prompts.index(cell.prompt) + 1} " * (len(layout.prompts) > 1)
        stack = f"{layout.rows[cell.row]} {column_label(cell.strength)}" if cell.strength else "base model"
        shown.append((cell.label, f"{prompt}seed {cell.seed} · {stack}"))
    return shown


def column_label(strength: float) -> str:
    """A sweep's or grid's column as pictures and captions write it: it multiplies each LoRA's own strength."""
    return f"× {strength:g}" if strength else "base model"


def scaled_label(stack: Stack, strength: float) -> str:
    """One image of a sweep as people read it: the strengths it ran at and its column, "a:0.4 + b:0.25 (× 0.5)"."""
    return f"{stack_label(scaled(stack, strength))} ({column_label(strength)})" if strength else "base model"


def _repeated_base(cell: GridCell) -> bool:
    """A grid cell at strength 0 below the first row: the base model's picture again."""
    return cell.strength == 0 and cell.row > 0


def _fit_cells(rows: list[list[Image.Image | None]]) -> list[list[Image.Image | None]]:
    """The cells scaled down, all by one factor, until the grid holds at most MAX_GRID_PICTURE_PIXELS (each cell's
    own PNG keeps its full size)."""
    total = sum(cell.width * cell.height for row in rows for cell in row if cell is not None)
    if total <= MAX_GRID_PICTURE_PIXELS:
        return rows
    scale = (MAX_GRID_PICTURE_PIXELS / total) ** 0.5

    def fit(cell: Image.Image) -> Image.Image:
        return cell.resize((max(1, int(cell.width * scale)), max(1, int(cell.height * scale))), Image.LANCZOS)

    return [[None if cell is None else fit(cell) for cell in row] for row in rows]
