"""Shared fixtures: one tiny model kit per test session, built under pytest's temp dir (never in ~/.cache)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# One torch thread per test process (and the apps and CLIs it starts): OpenMP's threads spin while they wait, and
# beside other work on 2 cores two of them made a tiny compare 10x slower than one (0.24 s against 2.4 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

FAILED = pytest.StashKey[bool]()  # set on a test whose call failed, for fixtures that add what they saw


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than 20 s (e.g. builds the real-width tiny-wide kit)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.when == "call" and report.failed:
        item.stash[FAILED] = True
    return report


@pytest.fixture(scope="session", autouse=True)
def fluxdemo_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """FLUXDEMO_CACHE for the session, so code that builds kits or caches files on its own stays out of ~."""
    cache = tmp_path_factory.mktemp("fluxdemo-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUXDEMO_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session", autouse=True)
def patient_launch() -> Iterator[None]:
    """gradio's launch asks its own page up to five times with 3 s timeouts and then refuses to start ("When
    localhost is not accessible..."); beside the model jobs of a test process on a busy machine the page can take
    longer. Here it waits as a hang guard instead; the page must still answer."""
    import gradio.networking
    import httpx

    def url_ok(url: str) -> bool:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.head(url, timeout=30, verify=False).status_code in (200, 401, 301, 302, 303, 307, 308):
                    return True
            time.sleep(0.5)
        return False

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gradio.networking, "url_ok", url_ok)
        yield


@pytest.fixture(scope="session")
def tiny_kit(fluxdemo_cache: Path) -> Path:
    from fluxdemo.model.tiny import ensure_kit

    return ensure_kit("tiny", cache_dir=fluxdemo_cache / "kits")


@pytest.fixture(scope="session")
def tiny_wide_kit(fluxdemo_cache: Path) -> Path:
    """The real-width kit (0.7 GB, about 30 s to build on 2 CPU cores): built once, for the slow tests that need it."""
    from fluxdemo.model.tiny import ensure_kit

    return ensure_kit("tiny-wide", cache_dir=fluxdemo_cache / "kits")


@pytest.fixture(scope="session")
def manager(tiny_kit: Path):
    """One Model over the tiny preset, on the CPU, shared like the app shares its one manager."""
    from helpers import tiny_model  # here, not at the top: a run of only the light tests never imports torch

    return tiny_model(tiny_kit / "loras")


@pytest.fixture(scope="module")
def lora_dir(tiny_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The module's own copy of the kit's LoRA folder, for tests that upload into it or break its files."""
    folder = tmp_path_factory.mktemp("loras") / "loras"
    shutil.copytree(tiny_kit / "loras", folder)
    return folder


@pytest.fixture(scope="module")
def app_manager(lora_dir: Path):
    """The module's Model over its own LoRA folder: what a launched studio serves."""
    from helpers import tiny_model

    return tiny_model(lora_dir)


@pytest.fixture(scope="module")
def clean(lora_dir: Path):
    """A second Model over the same files that nothing else touches: each request run alone, for the references."""
    from helpers import tiny_model

    return tiny_model(lora_dir)


@pytest.fixture(scope="session")
def kit_lora() -> str:
    """A sample LoRA of the kit, by its name in the LoRA library."""
    return "peft.safetensors"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> tuple[Path, list[str]]:
    """A real full disk: (folder, command prefix) where the prefix runs a command with a 64 kB tmpfs mounted at the
    folder, in a private mount namespace that the kernel drops when the command ends. Skips where impossible."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = 'mount -t tmpfs -o size=64k tmpfs "$1" && shift && exec "$@"'
    unshare = shutil.which("unshare")
    for flags in (["--user", "--map-root-user", "--mount"], ["--mount"]):
        prefix = [unshare, *flags, "sh", "-c", mount, "sh", str(disk)] if unshare else []
        if prefix and subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
            return disk, prefix
    pytest.skip("cannot mount a tmpfs in a private mount namespace here (needs unshare and user namespaces or root)")
