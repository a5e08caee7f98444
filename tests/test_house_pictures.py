"""The house rebuilt (issue 17) makes the same pictures: a compare's PNGs on the tiny kit, bit for bit, against the
SHA-256 they had before the wings (measured at the commit before the move, on this project's machines)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from fluxdemo.cli import main

COMPARE = ["compare", "--model", "tiny", "--prompt", "a lighthouse at dusk", "--seed", "7", "--steps", "4",
           "--width", "64", "--height", "48", "--lora", "kohya:0.8", "--lora", "comfy:0.5"]  # fmt: skip
BEFORE = {
    "baseline.png": "288f684d8e6b6176aa2ad1a0900d31f572f538a30af8adc82e3b774ee2da4107",
    "lora.png": "ed1698ed6236458fd287917ddc4b928be8475ef5cc83a3800d57a761f1e87d9d",
    "side_by_side.png": "17301bb540091182e5801ef92c70b62212f517cc1de6f9bfd241fabe96da6061",
}


def test_a_compare_makes_the_pngs_it_made_before_the_wings(tiny_kit: Path, tmp_path: Path) -> None:
    assert main([*COMPARE, "--out", str(tmp_path / "out")]) == 0
    made = {name: hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() for name in BEFORE}
    assert made == BEFORE
