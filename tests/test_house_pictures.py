"""The house rebuilt (issue 17) makes the same pictures: a compare's images on the tiny kit, pixel for pixel, against
what they were before the wings. The PNG files themselves matched byte for byte (SHA-256 288f684d..., ed1698ed...,
17301bb5...) until their parameters gained `fast` (issue 19); these are the same pictures' decoded pixels, checked
equal to those files' at the commit before that change. side_by_side.png's two labels are drawn in the shipped Noto
Sans since labels take any script (issue 18; Pillow's own font before, 0f31249e...): its images are checked against
baseline.png and lora.png pixel for pixel."""

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
    "side_by_side.png": "2d04cf61bd661481fa0da6e2f69efa98fcb54922b5691401439a27e03b8189d8",
}


def test_a_compare_makes_the_pictures_it_made_before_the_wings(tiny_kit: Path, tmp_path: Path) -> None:
    assert main([*COMPARE, "--out", str(tmp_path / "out")]) == 0
    made = {
        name: hashlib.sha256(np.asarray(Image.open(tmp_path / "out" / name)).tobytes()).hexdigest() for name in BEFORE
    }
    assert made == BEFORE
    names = ("side_by_side.png", "baseline.png", "lora.png")
    both, base, lora = (np.asarray(Image.open(tmp_path / "out" / name).convert("RGB")) for name in names)
    assert np.array_equal(both[:48, :64], base) and np.array_equal(both[:48, 64 + 8 :], lora)  # the gap is 8 pixels
