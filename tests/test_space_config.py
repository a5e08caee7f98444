"""The Space's configuration as Hugging Face reads it: the README's front matter, requirements.txt (what the Space
installs) against ZeroGPU's rules, and constraints.txt (what local installs and CI pin) against both; and ZeroGPU's
placement: everything on the device at start-up, nothing moved inside a GPU task."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from helpers import tiny_model
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]

# hub-docs docs/hub/spaces-zerogpu.md, "Supported Versions" (its state of August 2026): a Space that pins a torch
# off this list fails to build, and its Python is one of these two.
ZERO_GPU_TORCH = ("2.8.0", "2.9.1", "2.10.0", "2.11.0")
ZERO_GPU_PYTHON = ("3.10", "3.12")


def front_matter() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    match = re.match(r"---\n(.*?)\n---\n", text, re.S)
    assert match, "README.md must start with the Space's front matter between --- lines"
    pairs = (line.split(":", 1) for line in match.group(1).splitlines() if ":" in line)
    return {key.strip(): value.strip() for key, value in pairs}


def requirements(name: str) -> dict[str, Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in (ROOT / name).read_text().splitlines())
    reqs = [Requirement(line) for line in lines if line and not line.startswith("-")]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def pinned(req: Requirement) -> str:
    specs = list(req.specifier)
    assert len(specs) == 1 and specs[0].operator == "==", f"{req} must pin one version"
    return specs[0].version


def project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_front_matter_names_a_gradio_space_that_runs_app_py():
    meta = front_matter()
    assert meta["sdk"] == "gradio"
    assert meta["app_file"] == "app.py" and (ROOT / "app.py").is_file()
    assert meta["sdk_version"] == pinned(requirements("requirements.txt")["gradio"])


def test_python_version_suits_zero_gpu_and_the_package():
    version = front_matter()["python_version"]
    assert version.startswith('"'), "quote python_version: YAML reads 3.10 as the number 3.1"
    version = version.strip('"')
    assert version in ZERO_GPU_PYTHON
    assert SpecifierSet(project()["requires-python"]).contains(version + ".0")


def test_space_torch_is_one_zero_gpu_builds():
    torch = requirements("requirements.txt")["torch"]
    assert pinned(torch) in ZERO_GPU_TORCH  # an exact pin: a range would resolve to whatever is newest on PyPI


def test_space_installs_the_versions_ci_tests_except_torch():
    space, local = requirements("requirements.txt"), requirements("constraints.txt")
    assert {n: pinned(r) for n, r in space.items() if n != "torch"} == {
        n: pinned(local[n]) for n in space if n != "torch"
    }


def test_every_dependency_is_pinned_for_local_installs_and_admits_both_pins():
    space, local = requirements("requirements.txt"), requirements("constraints.txt")
    for line in project()["dependencies"]:
        dep = Requirement(line)
        name = dep.name.lower().replace("_", "-")
        assert name in local, f"constraints.txt must pin {name}"
        assert name in space, f"requirements.txt (the Space's list) must name {name}"
        for version in (pinned(local[name]), pinned(space[name])):
            assert dep.specifier.contains(version), f"pyproject's {dep} refuses {version}"


def test_ci_runs_the_torch_constraints_txt_pins():
    # the local CPU wheel is 2.13.0+cpu: the pin without the local label
    installed = Version(importlib.metadata.version("torch")).public
    assert pinned(requirements("constraints.txt")["torch"]) == installed == "2.13.0"


@pytest.fixture
def resident_manager(tiny_kit):
    """A manager as app.py builds it on ZeroGPU (on the CPU here: the moves it records are the same)."""
    from fluxdemo.studio.zero_gpu import ZERO_GPU_STRATEGY

    return tiny_model(tiny_kit / "loras", strategy=ZERO_GPU_STRATEGY)


def test_zero_gpu_tasks_move_nothing(resident_manager, kit_lora):
    from fluxdemo.model.manager import MODEL_COMPONENTS
    from fluxdemo.pipeline import GenerateOptions, compare
    from fluxdemo.studio.zero_gpu import preload_for_zero_gpu

    preload_for_zero_gpu(resident_manager)
    assert set(resident_manager.on_device_now()) >= set(MODEL_COMPONENTS)
    before = list(resident_manager.moves)
    result = compare(resident_manager, GenerateOptions("a cat", steps=2, width=64, height=64), kit_lora)
    assert set(result.images) == {"baseline", "lora"}
    assert resident_manager.moves == before
