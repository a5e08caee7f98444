"""fluxdemo.model.files against the loopback fake Hub (tests/fake_hub.py): the real huggingface_hub client."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from fake_hub import (
    COMMIT,
    FILES,
    GATED_REPO,
    GGUF,
    GGUF_REPO,
    GRANTED_TOKEN,
    LICENCE,
    FakeHub,
    no_hub_setup,
    sha256,
)
from helpers import START_S

from fluxdemo.errors import HubError, ModelFileError
from fluxdemo.model.files import download_preset, resolve
from fluxdemo.model.presets import PACKAGE_CONFIGS, PRESETS, Preset, Source

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    no_hub_setup(monkeypatch, tmp_path)
    fake = FakeHub()
    yield fake
    fake.stop()


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hf-cache"


def _src(repo: str, path: str, **kw) -> Source:
    return Source(path=path, repo_id=repo, **kw)


def test_download_then_cache_hit_without_the_hub(hub, cache, caplog):
    source = _src(GGUF_REPO, "flux1-dev-Q8_0.gguf")
    caplog.set_level(logging.INFO, logger="fluxdemo.model.files")

    path = resolve(source, component="transformer", cache_dir=cache, endpoint=hub.endpoint)
    assert path.read_bytes() == GGUF
    assert path.is_relative_to(cache)
    assert ("GET", f"/cdn/{sha256(GGUF)}") in hub.requests
    assert f"transformer: {GGUF_REPO}/flux1-dev-Q8_0.gguf from download, 35 B" in caplog.text

    calls = len(hub.requests)
    assert resolve(source, component="transformer", cache_dir=cache, endpoint=hub.endpoint) == path
    assert len(hub.requests) == calls  # a cache hit costs no request at all

    hub.stop()
    caplog.clear()
    assert resolve(source, component="transformer", cache_dir=cache, endpoint=hub.endpoint) == path
    assert f"transformer: {GGUF_REPO}/flux1-dev-Q8_0.gguf from cache, 35 B" in caplog.text


def test_folder_source_fetches_only_its_folder_and_works_offline_after(hub, cache, monkeypatch):
    source = _src(GATED_REPO, "tokenizer", folder=True, gated=True, licence=LICENCE)
    folder = resolve(source, component="tokenizer", token=GRANTED_TOKEN, cache_dir=cache, endpoint=hub.endpoint)
    assert folder.name == "tokenizer"
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]
    assert not (folder.parent / "vae").exists()  # allow_patterns kept the rest of the repo out

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = len(hub.requests)
    assert resolve(source, component="tokenizer", cache_dir=cache, endpoint=hub.endpoint) == folder
    assert len(hub.requests) == calls


def test_gated_repo_token_explicit_or_from_hf_token(hub, cache, monkeypatch):
    source = _src(GATED_REPO, "vae/diffusion_pytorch_model.safetensors", gated=True, licence=LICENCE)
    path = resolve(source, component="vae", token=GRANTED_TOKEN, cache_dir=cache, endpoint=hub.endpoint)
    assert path.read_bytes() == FILES[GATED_REPO]["vae/diffusion_pytorch_model.safetensors"]

    monkeypatch.setenv("HF_TOKEN", GRANTED_TOKEN)  # huggingface_hub reads it itself
    other = _src(GATED_REPO, "text_encoder/model.safetensors", gated=True, licence=LICENCE)
    assert resolve(other, component="text_encoder", cache_dir=cache, endpoint=hub.endpoint).is_file()


@pytest.mark.parametrize(
    ("token", "why"),
    [(None, "no valid token was sent"), ("hf_not_granted", "the token in use has not been granted access")],
)
@pytest.mark.parametrize("folder", [False, True])
def test_gated_repo_without_access(hub, cache, token, why, folder):
    path = "tokenizer" if folder else "vae/diffusion_pytorch_model.safetensors"
    source = _src(GATED_REPO, path, folder=folder, gated=True, licence=LICENCE)
    with pytest.raises(HubError) as e:
        resolve(source, component="vae", token=token, cache_dir=cache, endpoint=hub.endpoint)
    assert str(e.value) == (
        f"vae ({GATED_REPO}/{path}) is in the gated repository {GATED_REPO} and the Hub refused access ({why}). "
        f"Accept the licence at {LICENCE} while logged in to your Hugging Face account, then set "
        "HF_TOKEN=<a token with read access> (create one at https://huggingface.co/settings/tokens)."
    )


def test_missing_repo(hub, cache):
    with pytest.raises(HubError) as e:
        resolve(_src("nobody/nothing", "x.gguf"), component="transformer", cache_dir=cache, endpoint=hub.endpoint)
    assert str(e.value) == (
        "transformer (nobody/nothing/x.gguf): the repository nobody/nothing was not found on the Hub (or it is "
        "private and the token in use cannot see it). Check the repo id at https://huggingface.co/nobody/nothing; "
        "if the preset is out of date, point FLUXDEMO_TRANSFORMER (or --transformer) at a local copy."
    )


def test_missing_file(hub, cache):
    with pytest.raises(HubError) as e:
        resolve(_src(GGUF_REPO, "flux1-dev-Q9.gguf"), component="transformer", cache_dir=cache, endpoint=hub.endpoint)
    assert str(e.value) == (
        f"transformer ({GGUF_REPO}/flux1-dev-Q9.gguf): the repository {GGUF_REPO} has no file flux1-dev-Q9.gguf. "
        f"Check the name at https://huggingface.co/{GGUF_REPO}/tree/main; if the preset is out of date, point "
        "FLUXDEMO_TRANSFORMER (or --transformer) at a local copy."
    )


def test_missing_folder(hub, cache):
    source = _src(GATED_REPO, "tokenizer_3", folder=True, gated=True)
    with pytest.raises(HubError) as e:
        resolve(source, component="tokenizer_2", token=GRANTED_TOKEN, cache_dir=cache, endpoint=hub.endpoint)
    assert str(e.value).startswith(
        f"tokenizer_2 ({GATED_REPO}/tokenizer_3): the repository {GATED_REPO} has no folder tokenizer_3. "
    )


@pytest.mark.parametrize("how", ["env", "argument"])
def test_offline_with_nothing_cached(hub, cache, monkeypatch, how):
    offline = None
    if how == "env":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        offline = True
    with pytest.raises(HubError) as e:
        resolve(
            _src(GGUF_REPO, "flux1-dev-Q8_0.gguf"),
            component="transformer",
            preset="dev-q8",
            offline=offline,
            cache_dir=cache,
            endpoint=hub.endpoint,
        )
    assert str(e.value) == (
        f"transformer ({GGUF_REPO}/flux1-dev-Q8_0.gguf) is not in the Hugging Face cache ({cache}) and offline "
        "mode is on (HF_HUB_OFFLINE=1). Run `python -m fluxdemo download --model dev-q8` on a machine with network "
        "(files land in the Hugging Face cache, HF_HOME), or point FLUXDEMO_TRANSFORMER (or --transformer) at a "
        "local file."
    )
    assert hub.requests == []


def test_download_that_is_not_a_gguf(hub, cache):
    source = _src(GGUF_REPO, "not-a-gguf.gguf")
    with pytest.raises(ModelFileError) as e:
        resolve(source, component="transformer", preset="dev-q8", cache_dir=cache, endpoint=hub.endpoint)
    path = next((cache / "models--city96--FLUX.1-dev-gguf" / "snapshots" / COMMIT).glob("*.gguf"))
    assert str(e.value) == (
        f"transformer file {path} is not usable: it does not start with the GGUF magic b'GGUF' (it starts with "
        f"b'<!DO'). Delete the cached copy {path.resolve()} and run `python -m fluxdemo download --model dev-q8` to "
        "fetch it again."
    )


def test_truncated_safetensors(hub, cache):
    source = _src(GATED_REPO, "vae/truncated.safetensors", gated=True)
    with pytest.raises(
        ModelFileError, match=r"its tensors need 104 bytes but the file has 99 \(truncated or corrupt\)"
    ):
        resolve(source, component="vae", token=GRANTED_TOKEN, cache_dir=cache, endpoint=hub.endpoint)


def test_local_override(tmp_path):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(ModelFileError) as e:
        resolve(Source(path="x.gguf", repo_id=GGUF_REPO, local=missing), component="transformer")
    assert str(e.value) == (
        f"transformer file not found: {missing}. Point FLUXDEMO_TRANSFORMER (or --transformer) at an existing file, "
        "or unset it to use the preset's own file."
    )
    good = tmp_path / "mine.gguf"
    good.write_bytes(GGUF)
    assert resolve(Source(path="x.gguf", repo_id=GGUF_REPO, local=good), component="transformer") == good

    empty = tmp_path / "my-tokenizer"
    empty.mkdir()
    with pytest.raises(ModelFileError) as e:
        resolve(Source(path="tokenizer", local=empty, folder=True), component="tokenizer")
    assert str(e.value) == (
        f"tokenizer folder {empty} is not usable: the folder does not contain vocab.json+merges.txt or "
        "tokenizer.json. Point FLUXDEMO_TOKENIZER at a correct folder."
    )


def test_download_preset_reports_every_file(hub, cache, caplog):
    def s(repo: str, path: str, kb: int, **kw) -> Source:
        return _src(repo, path, approx_bytes=kb * 1000, **kw)

    gated = {"gated": True, "licence": LICENCE}
    preset = Preset(
        name="fake",
        description="the fake Hub's files",
        transformer=s(GGUF_REPO, "flux1-dev-Q8_0.gguf", 900),
        transformer_quant="Q8_0",
        text_encoder_2=s(GGUF_REPO, "t5-v1_1-xxl-encoder-Q8_0.gguf", 500),
        t5_quant="Q8_0",
        text_encoder=s(GATED_REPO, "text_encoder/model.safetensors", 30, **gated),
        vae=s(GATED_REPO, "vae/diffusion_pytorch_model.safetensors", 20, **gated),
        tokenizer=s(GATED_REPO, "tokenizer", 2, folder=True, **gated),
        tokenizer_2=s(GATED_REPO, "tokenizer_2", 3, folder=True, **gated),
        config_dir=Source(path=".", local=PACKAGE_CONFIGS),
        vram_gb=0.0,
    )
    caplog.set_level(logging.INFO, logger="fluxdemo.model.files")
    report = download_preset(preset, token=GRANTED_TOKEN, cache_dir=cache, endpoint=hub.endpoint)

    got = {f.component: (f.origin, f.verified) for f in report.files}
    assert [f.component for f in report.files][:3] == ["config_dir", "tokenizer", "tokenizer_2"]  # smallest first
    assert got == {
        "config_dir": ("local", True),
        "tokenizer": ("download", True),
        "tokenizer_2": ("download", True),
        "vae": ("download", True),
        "text_encoder": ("download", True),
        "text_encoder_2": ("download", True),
        "transformer": ("download", True),
    }
    assert {f.component: f.bytes for f in report.files}["transformer"] == len(GGUF)
    assert all(f.seconds >= 0 for f in report.files)
    assert sum(1 for r in caplog.records if r.name == "fluxdemo.model.files" and " from " in r.getMessage()) == 7

    again = download_preset(preset, cache_dir=cache, endpoint=hub.endpoint)  # no token needed: all cached
    assert {f.origin for f in again.files} == {"cache", "local"}


def test_tiny_kit_preset_resolves_and_verifies(tiny_kit):
    report = download_preset(PRESETS["tiny"])
    assert {f.origin for f in report.files} == {"kit"}
    assert all(f.verified and f.path.is_relative_to(tiny_kit) for f in report.files)
    assert report.describe().splitlines()[0].startswith("preset tiny: 7 files, ")

    with pytest.raises(ModelFileError) as e:
        resolve(Source(path="gguf/nothing.gguf", kit="tiny"), component="transformer")
    assert str(e.value) == (
        f"transformer is missing from the tiny kit 'tiny': {tiny_kit / 'gguf/nothing.gguf'} does not exist. "
        f"Delete the kit folder {tiny_kit} so that it is rebuilt on the next run."
    )


# Disk full for real: a 64 kB tmpfs as the cache, mounted in a private mount namespace of a child process (so
# nothing outside it ever sees the mount, and the kernel removes it when the child exits).
TINY_DISK_SCRIPT = """
import json, sys
from pathlib import Path
from fluxdemo.model.presets import Source
from fluxdemo.errors import HubError
from fluxdemo.model.files import resolve
source = Source(path="big-Q8_0.gguf", repo_id=sys.argv[2], approx_bytes=300_024)
try:
    resolve(source, component="transformer", cache_dir=Path(sys.argv[1]), endpoint=sys.argv[3])
except HubError as e:
    print(json.dumps({"error": str(e), "files": sorted(str(p) for p in Path(sys.argv[1]).rglob("*") if p.is_file())}))
"""


def test_disk_full_while_downloading(hub, tmp_path, tiny_disk):
    disk, on_tiny_disk = tiny_disk
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {"HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [*on_tiny_disk, sys.executable, "-c", TINY_DISK_SCRIPT, str(disk), GGUF_REPO, hub.endpoint],
        capture_output=True,
        text=True,
        timeout=START_S,
        env=env,
        cwd=REPO_ROOT,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    prefix = (
        f"Disk full while downloading transformer ({GGUF_REPO}/big-Q8_0.gguf): it needs about 300 kB, and the "
        f"Hugging Face cache at {disk} has "
    )
    suffix = (
        " free. Free some space there, or move the cache to a bigger disk: set "
        "HF_HOME=/path/on/a/bigger/disk/huggingface (and move the old cache folder there to keep what is already "
        "downloaded)."
    )
    assert re.fullmatch(re.escape(prefix) + r"\d[\d.]* k?B" + re.escape(suffix), result["error"]), result["error"]
    assert not [f for f in result["files"] if "/blobs/" in f]  # no partial blob left behind
