"""The house rebuilt (issue 17) makes the same pictures: a compare's images on the tiny kit, pixel for pixel, against
what they were before the wings. The PNG files themselves matched byte for byte (SHA-256 288f684d..., ed1698ed...,
17301bb5...) until their parameters gained `fast` (issue 19); these are the same pictures' decoded pixels, checked
equal to those files' at the commit before that change."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

from fluxdemo.cli import main

COMPARE = ["compare", "--model", "tiny", "--prompt", "a lighthouse at dusk", "--seed", "7", "--steps", "4",
           "--width", "64", "--height", "48", "--lora", "kohya:0.8", "--lora", "comfy:0.5"]  # fmt: skip
BEFORE = {  # SHA-256 of each image's RGB bytes
    "baseline.png": "7b86debabfc2a52f383c308e35cce1f860599c830d4a38c450bff15c3f7fc8ab",
    "lora.png": "23e0c7a1cdba5ed909dce8c605acf61f753926799da8272290a9ce840502e0ef",
    "side_by_side.png": "0f31249e3c381261fac7e35b585c74ae1fd779b047ef978826003f6000af331e",
}


def test_a_compare_makes_the_pictures_it_made_before_the_wings(tiny_kit: Path, tmp_path: Path) -> None:
    assert main([*COMPARE, "--out", str(tmp_path / "out")]) == 0
    made = {
        name: hashlib.sha256(np.asarray(Image.open(tmp_path / "out" / name)).tobytes()).hexdigest() for name in BEFORE
    }
    assert made == BEFORE
