"""Output images: PNGs that carry what made them, written safely, and the comparison pictures.

Every PNG holds two text chunks: "parameters", the AUTOMATIC1111/Forge infotext that image sites and prompt readers
understand, and "fluxdemo", a JSON copy of every ImageParams field that read_params() turns back into the exact
dataclass. Files are written to a temporary name in the target folder and renamed into place, so a crash or a full
disk never leaves a half-written PNG, and an existing file is only replaced when asked.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import itertools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, ImageChops, ImageDraw, PngImagePlugin

from fluxdemo.errors import FluxdemoError, OptionsError
from fluxdemo.files import new_file_mode
from fluxdemo.pipeline.labels import draw_label, fit, text_length
from fluxdemo.pipeline.options import FastSchedule
from fluxdemo.pipeline.png_settings import PARAMS_CHUNK, ImageParams
from fluxdemo.pipeline.report import RunReport

SCHEMA = 1  # of the "fluxdemo" chunk; bump when a field changes meaning

LABEL_BAND = 24  # pixels under the images of side_by_side() for their labels
MAX_DIFFERENCE_GAIN = 32.0  # difference() never stretches by more than this
MAX_ROW_LABEL = 320  # pixels for a grid's row labels; a longer label is cut with an ellipsis
BACKGROUND, LABEL_COLOUR, AXIS_COLOUR = (24, 24, 24), (235, 235, 235), (150, 170, 200)


def a1111_parameters(params: ImageParams) -> str:
    """The AUTOMATIC1111/Forge infotext: the prompt (with <lora:name:strength>), then one "Key: value, ..." line.

    FLUX.1-dev has no negative prompt and no real CFG: "CFG scale: 1" and Forge's "Distilled CFG Scale" carry the
    distilled guidance. LoRA hashes are the first 10 hex digits of the file's sha256 (civitai's AutoV2).
    """
    prompt = params.prompt + "".join(f" <lora:{_lora_tag(name)}:{_num(s)}>" for name, _, s in params.loras)
    items: list[tuple[str, Any]] = [
        ("Steps", params.steps),
        ("Sampler", "Euler"),
        ("Schedule type", "Flow matching"),
        ("CFG scale", 1),
        ("Distilled CFG Scale", params.guidance),
        ("Seed", params.seed),
        ("Size", f"{params.width}x{params.height}"),
        ("Model", params.model),
        ("Quant", params.quant),
    ]
    hashes = [f"{_lora_tag(name)}: {sha[:10]}" for name, sha, _ in params.loras if sha]
    if hashes:
        items.append(("Lora hashes", ", ".join(hashes)))
    if len(params.loras) == 1:
        items.append(("Lora strength", params.loras[0][2]))
    if params.fast:
        predicted = len(FastSchedule.of(params.steps).predicted())
        items.append(("Fast", f"TaylorSeer, {predicted} of {params.steps} steps predicted"))
    items.extend(params.extra)
    return prompt + "\n" + ", ".join(f"{k}: {_quote(_num(v))}" for k, v in items)


def png_bytes(image: Image.Image, params: ImageParams) -> bytes:
    """The image as PNG with the A1111 "parameters" chunk and the "fluxdemo" JSON chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(params))  # tEXt, or iTXt when the prompt is not Latin-1
    payload = {"schema": SCHEMA, **dataclasses.asdict(params)}
    info.add_itxt(PARAMS_CHUNK, json.dumps(payload, ensure_ascii=False, sort_keys=True))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, params: ImageParams, path: Path, *, overwrite: bool = False) -> Path:
    """Write the PNG atomically; refuse an existing path unless `overwrite`. Returns the path written."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OptionsError(f"{path} exists; choose another --out or remove it.")
    data = png_bytes(image, params)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        # Same folder, so the final rename stays on one filesystem and is atomic.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        os.fchmod(fd, new_file_mode())  # mkstemp's 0600 would make every PNG private
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            if tmp is not None:
                tmp.unlink(missing_ok=True)  # before measuring, so the free space reported is true
            raise FluxdemoError(
                f"Disk full while writing {path} ({len(data):,} bytes; {shutil.disk_usage(path.parent).free:,} "
                "free there). Nothing was written and earlier outputs are intact: free some space or choose "
                "another --out on a disk with room."
            ) from e
        raise
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)  # after a successful rename or link this is a no-op or drops the extra name
    return path


def _link_new(tmp: Path, path: Path) -> None:
    """Give `tmp` the name `path` only if nothing has taken that name since we looked (no silent overwrite)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise OptionsError(f"{path} exists; choose another --out or remove it.") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
            raise
        # a filesystem without hard links (FAT, some network mounts): a plain rename after the check above
        os.replace(tmp, path)


def side_by_side(
    left: Image.Image,
    right: Image.Image,
    labels: tuple[str, str] | None = ("baseline", "LoRA"),
    gap: int = 8,
) -> Image.Image:
    """Both images in one, `gap` pixels apart, each labelled in a band of LABEL_BAND pixels beneath it.

    Size: (left.width + gap + right.width, max(heights) + LABEL_BAND), or without the band when labels is None.
    """
    band = LABEL_BAND if labels is not None else 0
    height = max(left.height, right.height)
    canvas = Image.new("RGB", (left.width + gap + right.width, height + band), BACKGROUND)
    canvas.paste(left.convert("RGB"), (0, 0))
    canvas.paste(right.convert("RGB"), (left.width + gap, 0))
    if labels is not None:
        draw = ImageDraw.Draw(canvas)
        for text, x0, w in ((labels[0], 0, left.width), (labels[1], left.width + gap, right.width)):
            draw_label(draw, (x0 + w / 2, height + band / 2), fit(text, w), LABEL_COLOUR, "mm")
    return canvas


def difference(left: Image.Image, right: Image.Image) -> Image.Image:
    """Per-pixel |left - right| (RGB), stretched so that small changes are visible; identical images give all zero.

    The stretch maps the 99th percentile of the changed values to white (a few saturated pixels must not hide the
    broad, faint changes a LoRA makes), and is capped at MAX_DIFFERENCE_GAIN so rounding noise stays dark.
    """
    if left.size != right.size:
        raise OptionsError(f"difference() needs images of one size, got {left.size} and {right.size}")
    diff = ImageChops.difference(left.convert("RGB"), right.convert("RGB"))
    bands = diff.histogram()  # 256 counts per band
    counts = [bands[v] + bands[256 + v] + bands[512 + v] for v in range(256)]
    changed = sum(counts[1:])
    if changed == 0:
        return diff
    seen, level = 0, 1
    for level in range(1, 256):
        seen += counts[level]
        if seen >= 0.99 * changed:
            break
    gain = min(255 / level, MAX_DIFFERENCE_GAIN)
    return diff.point(lambda v: min(255, round(v * gain)))


def _lora_tag(name: str) -> str:
    """A LoRA as A1111 names it in `<lora:name:weight>`: the file's stem."""
    return Path(name).name.removesuffix(".safetensors")


@dataclasses.dataclass(frozen=True)
class GridText:
    """Everything a grid picture says: its title, the axes' titles, a label per row and per column."""

    title: str
    rows: tuple[str, ...]
    columns: tuple[str, ...]
    row_axis: str = ""
    column_axis: str = ""


def grid_image(rows: list[list[Image.Image | None]], text: GridText, gap: int = 4) -> Image.Image:
    """Forge's X/Y plot: the title on top, the columns' axis title over the column labels, the rows' axis title over
    the row labels at the left, and the cells. A None cell stays empty: a column that every row shares is drawn once,
    in the first row.

    Every cell is drawn at the first cell's size, in a column as wide as the cell or its label. Size:
    (left + sum(column width + gap), LABEL_BAND * (1 + titles) + len(rows) * (cell height + gap)), where left fits
    the widest row label or the rows' title (at most MAX_ROW_LABEL) and titles counts the title and the columns'.
    """
    cell_w, cell_h = next(cell for row in rows for cell in row if cell is not None).size
    left = min(max(_width(t) for t in [*text.rows, text.row_axis]) + 2 * gap, MAX_ROW_LABEL)
    widths = [max(cell_w, _width(label) + gap) for label in text.columns]
    xs = list(itertools.accumulate([left, *(w + gap for w in widths)]))  # each column's left edge, then the end
    top = LABEL_BAND * (1 + bool(text.title) + bool(text.column_axis))
    canvas = Image.new("RGB", (xs[-1], top + len(rows) * (cell_h + gap)), BACKGROUND)
    draw = ImageDraw.Draw(canvas)

    def put(label: str, xy: tuple[float, float], room: float, anchor: str, fill=LABEL_COLOUR) -> None:
        draw_label(draw, xy, fit(label, room), fill, anchor)

    if text.title:
        put(text.title, (gap, LABEL_BAND / 2), canvas.width - 2 * gap, "lm")
    if text.column_axis:
        middle = ((left + canvas.width) / 2, top - LABEL_BAND * 1.5)
        put(text.column_axis, middle, canvas.width - left, "mm", AXIS_COLOUR)
    put(text.row_axis, (gap, top - LABEL_BAND / 2), left - 2 * gap, "lm", AXIS_COLOUR)
    for x, w, label in zip(xs, widths, text.columns, strict=False):
        put(label, (x + w / 2, top - LABEL_BAND / 2), w, "mm")
    for r, (row, label) in enumerate(zip(rows, text.rows, strict=True)):
        y = top + r * (cell_h + gap)
        put(label, (gap, y + cell_h / 2), left - 2 * gap, "lm")
        for x, w, cell in zip(xs, widths, row, strict=False):
            if cell is not None:
                canvas.paste(cell.convert("RGB").resize((cell_w, cell_h)), (x + (w - cell_w) // 2, y))
    return canvas


def _width(text: str) -> int:
    return math.ceil(text_length(text))


def _num(value: Any) -> Any:
    """1.0 -> 1 and 3.5 -> 3.5, as A1111 writes numbers; anything else unchanged."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _quote(value: Any) -> str:
    """A1111's infotext quoting: a value holding a separator is written as a JSON string."""
    text = str(value)
    if any(c in text for c in ",:\n"):
        return json.dumps(text, ensure_ascii=False)
    return text


def params_from_report(report: RunReport, label: str, role: str | None = None) -> ImageParams:
    """The parameters of one image of a run, from the run's report: `label` as in Result.images ("baseline", "lora",
    "strength 0.5", a grid cell's label); `role` names a derived image ("side_by_side"), else the role is "baseline"
    without LoRAs and "lora" with."""
    image, model = report.images[label], report.model
    options = image.options
    loras = tuple((x.name, x.sha256, x.strength) for x in image.loras)
    return ImageParams(
        prompt=options.prompt,
        seed=options.seed,
        steps=options.steps,
        guidance=options.guidance,
        width=options.width,
        height=options.height,
        model=model.preset,
        quant=model.transformer_quant,
        role=role or ("lora" if loras else "baseline"),
        loras=loras,
        fast=options.fast,
    )
