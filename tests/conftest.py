"""Shared fixtures: one tiny model kit per test session, built under pytest's temp dir (never in ~/.cache)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

# One torch thread per test process (and the apps and CLIs it starts): OpenMP's threads spin while they wait, and
# beside other work on 2 cores two of them made a tiny compare 10x slower than one (0.24 s against 2.4 s).
os.environ.setdefault("OMP_NUM_THREADS", "1")

FAILED = pytest.StashKey[bool]()  # set on a test whose call failed, for fixtures that add what they saw


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: takes more than 20 s (e.g. builds the real-width tiny-wide kit)")


# The files that take longest, longest first (measured with --durations): xdist's --dist loadfile hands files to the
# workers in collection order, so with these first the two workers finish together instead of one waiting out a
# long file at the end. Any other file keeps its place after them.
LONGEST_FIRST = (
    "test_serve.py",
    "test_browser.py",
    "test_security_app.py",
    "test_reliability.py",
    "test_browser_person.py",
    "test_aot.py",
    "test_soak.py",
    "test_lora_pictures.py",
    "test_compile.py",
    "test_lora_formats.py",
    "test_cli.py",
    "test_tiny.py",
    "test_loading.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable: the rest in their order


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
    kits = _run_root(tmp_path_factory) / "kits"  # every xdist worker's kits/ is this one folder (_shared_kit)
    kits.mkdir(exist_ok=True)
    (cache / "kits").symlink_to(kits, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLUXDEMO_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session", autouse=True)
def patient_launch() -> Iterator[None]:
    """The studios the tests launch in this process wait for their page as app.py's do (studio.launch_check)."""
    import gradio.networking

    from fluxdemo.studio.launch_check import patient_url_ok

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gradio.networking, "url_ok", patient_url_ok)
        yield


def _run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This run's temp folder: with pytest-xdist, the one above the workers' own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _shared_kit(kind: str, cache: Path) -> Path:
    """A kit built once for the whole run: the first xdist worker to ask builds it while the others wait on the lock
    (ensure_kit alone is safe across processes, but each would build its own copy first)."""
    from fluxdemo.model.tiny import ensure_kit

    with open(cache / "kits" / f".{kind}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return ensure_kit(kind, cache_dir=cache / "kits")


@pytest.fixture(scope="session")
def tiny_kit(fluxdemo_cache: Path) -> Path:
    return _shared_kit("tiny", fluxdemo_cache)


@pytest.fixture(scope="session")
def tiny_wide_kit(fluxdemo_cache: Path) -> Path:
    """The real-width kit (0.7 GB, about 30 s to build on 2 CPU cores): built once, for the slow tests that need it."""
    return _shared_kit("tiny-wide", fluxdemo_cache)


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


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """The CLI's main(argv) in this process, offline: a function of the arguments giving Done(exit code, stdout,
    stderr). A test that wants the Hub undoes the offline setting after this fixture (fake_hub.no_hub_setup)."""
    from helpers import Done, library_log_levels_kept

    from fluxdemo.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", os.environ.get("TRANSFORMERS_VERBOSITY", "warning"))

    def call(*args: str) -> Done:
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's own exit
            code = e.code
        out, err = capsys.readouterr()
        return Done(code, out, err)

    with library_log_levels_kept():
        yield call


@pytest.fixture(scope="session")
def kit_lora() -> str:
    """A sample LoRA of the kit, by its name in the LoRA library."""
    return "peft.safetensors"


@pytest.fixture
def tiny_disk(tmp_path: Path) -> tuple[Path, list[str]]:
    """A real full disk: (folder, command prefix) where the prefix runs a command with a 64 kB tmpfs mounted at the
    folder, in a private mount namespace that the kernel drops when the command ends. Skips where impossible."""
    from helpers import HANG_S

    disk = tmp_path / "disk"
    disk.mkdir()
    mount = 'mount -t tmpfs -o size=64k tmpfs "$1" && shift && exec "$@"'
    unshare = shutil.which("unshare")
    for flags in (["--user", "--map-root-user", "--mount"], ["--mount"]):
        prefix = [unshare, *flags, "sh", "-c", mount, "sh", str(disk)] if unshare else []
        if prefix and subprocess.run([*prefix, "true"], capture_output=True, timeout=HANG_S).returncode == 0:
            return disk, prefix
    pytest.skip("cannot mount a tmpfs in a private mount namespace here (needs unshare and user namespaces or root)")
