"""Issue 18's CLI: a mistake answered before torch is imported (in a process of its own, where the imports are the
point), the real LoRA folder named, Hub names wherever a LoRA is named (against tests/fake_hub.py's loopback Hub), no
huggingface_hub retries when the Hub is unreachable, and a tiny kit that says how to use it. The rest run the CLI's
main() in this process (conftest's `cli`)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import socket
import subprocess
import sys
import threading
from pathlib import Path

import fake_hub as th
import pytest
import torch
from helpers import START_S
from huggingface_hub import constants
from safetensors.torch import save_file

from fluxdemo.errors import HubError
from fluxdemo.lora import LoraLibrary, inspect_lora
from fluxdemo.lora.report import flux_dev_dims
from fluxdemo.model.files import resolve
from fluxdemo.model.presets import Source
from fluxdemo.pipeline.options import PUBLIC_STRENGTH_RANGE, STRENGTH_RANGE
from fluxdemo.studio.forms import strength_range

TINY = ["--model", "tiny", "--prompt", "a cat", "--steps", "2", "--width", "64", "--height", "64"]
REPO = "bob/tiny-lora"

# Runs main() for each argument list in one process: (exit code, stderr) of each, and whether torch was imported.
CHECKS = """
import contextlib, io, json, sys
from fluxdemo.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        results.append([main(argv), err.getvalue()])
print(json.dumps({"results": results, "heavy": sorted({"torch", "diffusers", "huggingface_hub"} & set(sys.modules))}))
"""


def env_for(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    return {**env, "FLUXDEMO_CACHE": str(cache), "HF_HOME": str(cache / "hf")}


def test_mistakes_are_answered_before_torch_is_imported(tmp_path, fluxdemo_cache, tiny_kit):
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"mine")
    loras = tiny_kit / "loras"
    low, high = STRENGTH_RANGE
    cases = {
        ("generate", *TINY, "--width", "17", "--out", str(tmp_path / "a.png")): (
            "`width` must be a multiple of 16 between 16 and 2048, but is 17."
        ),
        ("generate", *TINY, "--seed", "-1", "--out", str(tmp_path / "a.png")): (
            "`seed` must be between 0 and 4294967295, but is -1."
        ),
        ("generate", *TINY, "--lora", "peft:9", "--out", str(tmp_path / "a.png")): (
            f"A LoRA strength must be a finite number between {low:g} and {high:g}, but is 9.0."
        ),
        ("grid", *TINY, "--lora", "peft:2", "--strengths", "0,3", "--out", str(tmp_path / "g")): (
            f"The grid column x3 takes peft:2 to strength 6, outside from {low:g} to {high:g}; choose smaller "
            "strengths."
        ),
        ("compare", *TINY, "--lora", "nosuch", "--out", str(tmp_path / "c")): (
            f"No LoRA named 'nosuch' in the LoRA folder {loras}; available: comfy.safetensors, kohya.safetensors, "
            "peft.safetensors, xlabs.safetensors."
        ),
        ("generate", *TINY, "--lora", str(tmp_path / "gone.safetensors"), "--out", str(tmp_path / "a.png")): (
            f"There is no LoRA file {tmp_path / 'gone.safetensors'} (nor one of that name in the LoRA folder "
            f"{loras}); check the path, or name a Hub LoRA as user/repo or user/repo/file.safetensors."
        ),
        ("generate", *TINY, "--out", str(taken)): f"{taken} exists; choose another --out or pass --overwrite.",
        ("generate", *TINY, "--overwrite", "--width", "8", "--out", str(taken)): (
            "`width` must be a multiple of 16 between 16 and 2048, but is 8."  # --overwrite lets the file pass
        ),
        ("generate", *TINY, "--out", str(taken / "x.png")): (
            f"{taken / 'x.png'} cannot be written: {taken} is a file; choose another --out."
        ),
        ("generate", *TINY, "--out", str(tmp_path)): f"{tmp_path} is a folder; --out names the PNG file to write.",
        ("compare", *TINY, "--lora", "peft", "--out", str(taken)): (
            f"{taken} is a file; --out names the folder to write into."
        ),
        ("inspect-lora", "--model", "tiny", "nosuch"): (
            f"No LoRA named 'nosuch' in the LoRA folder {loras}; available: comfy.safetensors, kohya.safetensors, "
            "peft.safetensors, xlabs.safetensors."
        ),
    }
    argvs = json.dumps([list(argv) for argv in cases])
    done = subprocess.run([sys.executable, "-c", CHECKS, argvs], capture_output=True, text=True,
                          env=env_for(fluxdemo_cache), timeout=START_S)  # fmt: skip
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer["results"] == [[2, f"error: {sentence}\n"] for sentence in cases.values()]
    assert answer["heavy"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.png"]  # nothing written


def test_a_local_name_works_without_its_suffix(tiny_kit):
    library = LoraLibrary(tiny_kit / "loras")
    assert library.get("peft").name == "peft.safetensors"
    assert library.get("peft").path == library.get("peft.safetensors").path
    assert not library.is_hub_name("peft") and not library.is_hub_name("peft", scan=False)


@pytest.mark.parametrize(
    ("flags", "limits", "why"),
    [
        ([], STRENGTH_RANGE, None),
        (["--share"], PUBLIC_STRENGTH_RANGE, "0 to 2 on a public link, the range LoRAs are made for"),
        (["--host", "0.0.0.0"], PUBLIC_STRENGTH_RANGE, "0 to 2 on a public link, the range LoRAs are made for"),
    ],
    ids=["local", "share", "host"],
)
def test_the_studio_takes_the_cli_range_unless_public(flags, limits, why):
    """One range (options.STRENGTH_RANGE) for the CLI, the library and a studio on this machine; a public link's
    narrower one comes from the same module, and its sliders say why."""
    spec = importlib.util.spec_from_file_location("app", Path(__file__).resolve().parents[1] / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    got = app.check_flags(app.build_parser({}).parse_args(flags))
    assert (got.strength_min, got.strength_max) == limits
    assert strength_range(got) == (*limits, why)
    assert STRENGTH_RANGE[0] <= PUBLIC_STRENGTH_RANGE[0] <= PUBLIC_STRENGTH_RANGE[1] <= STRENGTH_RANGE[1]


# -- Hub names: the loopback fake Hub, the real huggingface_hub client, the CLI's main() in this process ----------


def use_endpoint(monkeypatch, endpoint: str) -> None:
    """Where huggingface_hub sends requests with no endpoint given (HF_ENDPOINT, which it reads at import)."""
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    template = endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)


@pytest.fixture
def fake_hub(cli, monkeypatch, tmp_path, tiny_kit):
    """The fake Hub with REPO in it, where the CLI (run by `cli`, whose offline setting this undoes) looks."""
    lora = (tiny_kit / "loras" / "peft.safetensors").read_bytes()
    monkeypatch.setitem(th.FILES, REPO, {"style.safetensors": lora, "README.md": b"---\ninstance_prompt: zkz\n---\n"})
    th.no_hub_setup(monkeypatch, tmp_path)
    monkeypatch.setenv("FLUXDEMO_CACHE", str(tmp_path / "cache"))  # the Hub LoRA cache: this test's own
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kits").symlink_to(tiny_kit.parent, target_is_directory=True)  # the session's kit
    hub = th.FakeHub()
    use_endpoint(monkeypatch, hub.endpoint)
    yield hub
    hub.stop()


@pytest.mark.parametrize(
    "name",
    [REPO, f"{REPO}/style.safetensors@{th.COMMIT}", f"https://huggingface.co/{REPO}/blob/main/style.safetensors"],
)
def test_generate_with_a_hub_lora(name, cli, fake_hub, tmp_path):
    done = cli("generate", *TINY, "--lora", f"{name}:0.8", "--out", str(tmp_path / "a.png"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "a.png") and (tmp_path / "a.png").is_file()
    assert ("GET", f"/api/models/{REPO}/revision/{th.COMMIT if '@' in name else 'main'}") in fake_hub.requests


def test_inspect_lora_takes_a_hub_name(cli, fake_hub):
    done = cli("inspect-lora", "--model", "tiny", "--json", REPO)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["format"], report["compatible"]) == ("peft", True)
    assert report["name"] == f"{REPO}/style.safetensors"  # the one LoRA file found in the repo


# -- an unreachable Hub: one request and one sentence, not huggingface_hub's retries --------------------------------


@pytest.fixture
def slammed_door():
    """A loopback port that accepts each connection and closes it unanswered (a broken proxy, a captive network):
    huggingface_hub retries that five times with back-off. Yields (endpoint, connections counted)."""
    server = socket.create_server(("127.0.0.1", 0))
    seen = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            seen.append(1)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}", seen
    server.close()


def test_an_unreachable_hub_costs_one_request(slammed_door, tmp_path, monkeypatch):
    endpoint, seen = slammed_door
    th.no_hub_setup(monkeypatch, tmp_path)  # CI runs with HF_HUB_OFFLINE=1, which huggingface_hub read at import
    with pytest.raises(HubError) as e:
        resolve(Source("flux1-dev-Q8_0.gguf", th.GGUF_REPO), component="transformer", preset="dev-q8",
                offline=False, cache_dir=tmp_path, endpoint=endpoint)  # fmt: skip
    assert str(e.value).startswith(
        f"transformer ({th.GGUF_REPO}/flux1-dev-Q8_0.gguf) is not in the Hugging Face cache ({tmp_path}) and the Hub "
        "could not be reached. Run `python -m fluxdemo download --model dev-q8` on a machine with network"
    )
    assert len(seen) == 1


def test_generate_without_network_is_one_sentence(cli, tmp_path, monkeypatch, caplog):
    """What the terminal would show: the one error line (stderr), and no log line from huggingface_hub, whose retries
    were 27 lines over 44 s (caplog sees every record the CLI's log handler would print)."""
    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    th.no_hub_setup(monkeypatch, tmp_path)
    use_endpoint(monkeypatch, endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty Hugging Face cache
    with caplog.at_level(logging.INFO):  # the CLI's level
        done = cli("generate", "--prompt", "a cat", "--device", "cpu", "--out", str(tmp_path / "a.png"))
    assert done.returncode == 2
    (error,) = done.stderr.splitlines()
    assert error.startswith("error: ") and "Traceback" not in done.stderr
    assert "could not be reached. Run `python -m fluxdemo download --model dev-q8`" in error
    assert [r.getMessage() for r in caplog.records if r.name.startswith("huggingface_hub")] == []
    assert not any("Retry" in r.getMessage() for r in caplog.records)


# -- tiny --out: the kit says how to use it, and what it says works ---------------------------------------------------


def test_tiny_kit_prints_commands_that_work(cli, tmp_path, monkeypatch):
    built = cli("tiny", "--out", str(tmp_path / "my kit"))
    assert built.returncode == 0, built.stderr
    lines = built.stdout.splitlines()
    assert lines[0] == str(tmp_path / "my kit")
    export = next(line.strip() for line in lines if line.strip().startswith("export "))
    compare = next(line.strip() for line in lines if line.strip().startswith("python -m fluxdemo compare"))
    assert any(line.strip().startswith("python app.py --model tiny --lora-dir ") for line in lines)
    files = dict(item.split("=", 1) for item in shlex.split(export)[1:])
    assert all(Path(path).exists() and Path(path).is_relative_to(tmp_path / "my kit") for path in files.values())
    for variable, path in files.items():  # the export, in this process
        monkeypatch.setenv(variable, path)
    monkeypatch.setenv("FLUXDEMO_CACHE", str(tmp_path / "empty"))
    monkeypatch.chdir(tmp_path)
    used = cli(*shlex.split(compare)[3:], "--steps", "2", "--width", "64", "--height", "64")
    assert used.returncode == 0, used.stderr
    assert sorted(p.name for p in (tmp_path / "compare").iterdir()) == [
        "baseline.png", "lora.png", "report.json", "side_by_side.png",
    ]  # fmt: skip
    assert not (tmp_path / "empty").exists()  # nothing came from (or went to) the kit cache


# -- verdicts: the family named, from keys in each trainer's spelling or from musubi-tuner's metadata ---------------


def lora_file(path: Path, modules: dict[str, tuple[int, int]], meta: dict[str, str] | None = None) -> Path:
    """A kohya-style LoRA (lora_down/lora_up, alpha) of the given modules and (out, in) shapes."""
    tensors = {}
    for module, (out, inp) in modules.items():
        tensors |= {f"{module}.lora_down.weight": torch.zeros(2, inp), f"{module}.lora_up.weight": torch.zeros(out, 2)}
        tensors[f"{module}.alpha"] = torch.tensor(2.0)
    save_file(tensors, str(path), metadata=meta)
    return path


def peft_file(path: Path, modules: dict[str, tuple[int, int]], meta: dict[str, str] | None = None) -> Path:
    """A PEFT-style LoRA (lora_A/lora_B), as diffusers and ai-toolkit save them."""
    tensors = {}
    for module, (out, inp) in modules.items():
        tensors |= {f"{module}.lora_A.weight": torch.zeros(2, inp), f"{module}.lora_B.weight": torch.zeros(out, 2)}
    save_file(tensors, str(path), metadata=meta)
    return path


W = 3072  # Qwen-Image's and HunyuanVideo's width is FLUX.1's: their attention shapes fit, their names tell
FAMILIES = {
    "sd15-kohya-mid-block": (
        lambda p: lora_file(
            p,
            {
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": (1280, 768),
                "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (1280, 1280),
                "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k": (1280, 768),
            },
        ),
        "an SD1.5 LoRA (kohya naming: lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q), not FLUX: it "
        "adapts a UNet FLUX.1-dev does not have",
    ),
    "qwen-image-musubi": (
        lambda p: lora_file(
            p,
            {
                "lora_unet_transformer_blocks_0_attn_to_q": (W, W),
                "lora_unet_transformer_blocks_0_img_mlp_net_0_proj": (4 * W, W),
            },
            {"ss_network_module": "networks.lora_qwen_image", "modelspec.architecture": "Qwen-Image/lora"},
        ),
        "a Qwen-Image LoRA: it does not fit FLUX.1-dev (its key lora_unet_transformer_blocks_0_img_mlp_net_0_proj is "
        "Qwen-Image's)",
    ),
    "qwen-image-ai-toolkit": (
        lambda p: peft_file(
            p,
            {
                "diffusion_model.transformer_blocks.59.attn.to_q": (W, W),
                "diffusion_model.transformer_blocks.59.txt_mod.1": (6 * W, W),
            },
        ),
        "a Qwen-Image LoRA: it does not fit FLUX.1-dev (its key diffusion_model.transformer_blocks.59.txt_mod.1 is "
        "Qwen-Image's)",
    ),
    "qwen-image-attention-only-metadata": (
        lambda p: lora_file(
            p, {"lora_unet_transformer_blocks_0_attn_to_q": (W, W)}, {"ss_network_module": "networks.lora_qwen_image"}
        ),  # fmt: skip
        "a Qwen-Image LoRA: it does not fit FLUX.1-dev (its metadata names 'networks.lora_qwen_image')",
    ),
    "wan-musubi": (
        lambda p: lora_file(
            p,
            {
                "lora_unet_blocks_0_self_attn_q": (5120, 5120),
                "lora_unet_blocks_0_cross_attn_k": (5120, 5120),
                "lora_unet_blocks_0_ffn_0": (13824, 5120),
            },
            {"ss_network_module": "networks.lora_wan", "modelspec.architecture": "wan2.1/lora"},
        ),
        "a Wan LoRA: it does not fit FLUX.1-dev (its key lora_unet_blocks_0_cross_attn_k is Wan's)",
    ),
    "wan-ai-toolkit": (
        lambda p: peft_file(p, {"diffusion_model.blocks.3.self_attn.o": (1536, 1536)}),
        "a Wan LoRA: it does not fit FLUX.1-dev (its key diffusion_model.blocks.3.self_attn.o is Wan's)",
    ),
    "hunyuan-video-original": (
        lambda p: peft_file(
            p,
            {
                "diffusion_model.double_blocks.0.img_attn_qkv": (3 * W, W),
                "diffusion_model.double_blocks.0.img_mlp.fc1": (4 * W, W),
                "diffusion_model.single_blocks.0.linear1": (7 * W, W),
            },
        ),
        "a HunyuanVideo LoRA: it does not fit FLUX.1-dev (its key diffusion_model.double_blocks.0.img_attn_qkv is "
        "HunyuanVideo's)",
    ),
    "hunyuan-video-musubi": (
        lambda p: lora_file(
            p,
            {
                "lora_unet_double_blocks_0_img_attn_qkv": (3 * W, W),
                "lora_unet_double_blocks_0_img_mod_linear": (6 * W, W),
            },
            {"ss_network_module": "networks.lora", "modelspec.architecture": "hunyuan-video/lora"},
        ),
        "a HunyuanVideo LoRA: it does not fit FLUX.1-dev (its key lora_unet_double_blocks_0_img_mod_linear is "
        "HunyuanVideo's)",
    ),
    "hunyuan-video-attention-only-metadata": (
        lambda p: lora_file(
            p, {"lora_unet_double_blocks_0_img_attn_qkv": (3 * W, W)}, {"modelspec.architecture": "hunyuan-video/lora"}
        ),  # fmt: skip
        "a HunyuanVideo LoRA: it does not fit FLUX.1-dev (its metadata names 'hunyuan-video/lora')",
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_named(family, tmp_path):
    build, verdict = FAMILIES[family]
    report = inspect_lora(build(tmp_path / "x.safetensors"), flux_dev_dims())
    assert report.compatible is False
    assert report.problems[0] == verdict


@pytest.mark.parametrize(
    "modules",
    [
        {"lora_unet_double_blocks_0_img_attn_qkv": (3 * W, W), "lora_unet_double_blocks_0_img_mod_lin": (6 * W, W)},
        {"lora_unet_single_blocks_0_linear1": (7 * W, W), "lora_unet_single_blocks_0_modulation_lin": (3 * W, W)},
    ],
    ids=["double", "single"],
)
def test_flux_kohya_names_are_not_taken_for_another_family(modules, tmp_path):
    report = inspect_lora(lora_file(tmp_path / "x.safetensors", modules), flux_dev_dims())
    assert (report.compatible, report.problems) == (True, [])
