"""The package as pip builds it: the wheel carries `fluxdemo`, its model configs and its label fonts, nothing else,
and the `fluxdemo` console command. Built offline (no build isolation: the venv's setuptools) from a copy of the
checkout, so the build's own folders never land in the working tree."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files are the project's")
    from helpers import START_S  # here, not at the top: the other tests of this light module need no torch

    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # a file deleted but not yet committed is still listed
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(out), "-q"],
        capture_output=True, text=True, timeout=START_S,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (path,) = out.glob("fluxdemo-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_carries_the_package_and_its_configs_only(wheel):
    names = set(wheel.namelist())
    meta = {n for n in names if n.split("/")[0].endswith(".dist-info")}
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fluxdemo").rglob("*.py")}  # the four wings too
    configs = {p.relative_to(ROOT).as_posix() for p in (ROOT / "fluxdemo" / "configs").rglob("*.json")}
    assert len(configs) == 5  # scheduler, text_encoder, text_encoder_2, transformer, vae of FLUX.1-dev
    fonts = {
        f"fluxdemo/pipeline/fonts/{name}"
        for name in (
            "NotoSans-Regular-Latin.ttf",
            "NotoSans-Regular-Extended.ttf",
            "NotoSansCJK-Regular-Subset.otf",
            "OFL.txt",
            "README.md",
        )
    }
    assert names - meta == modules | configs | fonts
    assert {n.split("/")[0] for n in names - meta} == {"fluxdemo"}  # no bench/, loras/, tests/, app.py


def test_wheel_has_the_fluxdemo_command(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    assert dict(parser["console_scripts"]) == {"fluxdemo": "fluxdemo.cli:main"}
