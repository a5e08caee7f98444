"""Model presets: where each component's files come from and how each is kept quantized.

A preset is data (like black-forest-labs/flux's `configs` registry): the loaders read it, nothing in it runs.
The configs of FLUX.1-dev ship inside the package (fluxdemo/configs/flux1-dev) because the gated repo may be
unreachable; the tiny presets point into a kit that `fluxdemo.model.tiny` builds locally.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from fluxdemo.errors import OptionsError

PACKAGE_CONFIGS = Path(__file__).parents[1] / "configs" / "flux1-dev"

# Component names are diffusers' (FluxPipeline's): one vocabulary from the presets to the offload log.
COMPONENTS = ("transformer", "text_encoder_2", "text_encoder", "vae", "tokenizer", "tokenizer_2")
SOURCES = (*COMPONENTS, "config_dir")  # config_dir: the diffusers-layout folder of configs

FLUX_DEV_REPO = "black-forest-labs/FLUX.1-dev"
FLUX_DEV_LICENCE = "https://huggingface.co/black-forest-labs/FLUX.1-dev"


@dataclass(frozen=True)
class Source:
    """Where one component's file (or folder) comes from.

    `repo_id` + `path` name a Hub file (or, with folder=True, a folder of files); `kit` names a locally built tiny
    kit instead of a repo; `local` overrides both with a path on this machine.
    """

    path: str
    repo_id: str | None = None
    kit: str | None = None
    local: Path | None = None
    folder: bool = False
    gated: bool = False
    approx_bytes: int = 0  # on-disk size, for download and memory planning before the file is here
    licence: str = ""

    def describe(self) -> str:
        if self.local is not None:
            return str(self.local)
        if self.kit is not None:
            return f"tiny kit '{self.kit}': {self.path}"
        return f"{self.repo_id}/{self.path}"


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    transformer: Source  # GGUF with BFL tensor names (city96 layout)
    transformer_quant: str  # the GGUF type of its block weights, e.g. "Q8_0"
    text_encoder_2: Source  # T5 encoder: GGUF with llama.cpp names, or safetensors (then quantized with quanto)
    t5_quant: str  # "Q8_0"/"Q4_K_M" (GGUF, kept packed) or "qint8" (quanto, for safetensors)
    text_encoder: Source  # CLIP-L, safetensors, full precision
    vae: Source  # safetensors, full precision
    tokenizer: Source  # CLIP tokenizer folder
    tokenizer_2: Source  # T5 tokenizer folder
    config_dir: Source  # diffusers-layout folder holding transformer/, text_encoder*/, vae/, scheduler/ configs
    vram_gb: float  # what the default strategy needs on a GPU, for the README and the planner's first guess
    licence: str = ""

    def sources(self) -> dict[str, Source]:
        return {name: getattr(self, name) for name in SOURCES}

    def with_local(self, component: str, path: str | Path) -> Preset:
        """This preset with one component read from a local file or folder instead."""
        if component not in SOURCES:
            raise OptionsError(f"Unknown component {component!r}; choose from {', '.join(SOURCES)}.")
        source = dataclasses.replace(getattr(self, component), local=Path(path).expanduser())
        return dataclasses.replace(self, **{component: source})


def _hub(
    repo_id: str, path: str, gb: float, *, gated: bool = False, folder: bool = False, licence: str = ""
) -> Source:
    return Source(path=path, repo_id=repo_id, gated=gated, folder=folder, approx_bytes=int(gb * 1e9), licence=licence)


def _flux_dev(
    name: str,
    description: str,
    transformer_file: str,
    transformer_gb: float,
    quant: str,
    t5_file: str,
    t5_gb: float,
    t5_quant: str,
    vram_gb: float,
) -> Preset:
    gated = dict(gated=True, licence=FLUX_DEV_LICENCE)
    return Preset(
        name=name,
        description=description,
        transformer=_hub("city96/FLUX.1-dev-gguf", transformer_file, transformer_gb, licence=FLUX_DEV_LICENCE),
        transformer_quant=quant,
        text_encoder_2=_hub("city96/t5-v1_1-xxl-encoder-gguf", t5_file, t5_gb, licence="Apache-2.0"),
        t5_quant=t5_quant,
        text_encoder=_hub(FLUX_DEV_REPO, "text_encoder/model.safetensors", 0.246, **gated),
        vae=_hub(FLUX_DEV_REPO, "vae/diffusion_pytorch_model.safetensors", 0.168, **gated),
        tokenizer=_hub(FLUX_DEV_REPO, "tokenizer", 0.002, folder=True, **gated),
        tokenizer_2=_hub(FLUX_DEV_REPO, "tokenizer_2", 0.003, folder=True, **gated),
        config_dir=Source(path=".", local=PACKAGE_CONFIGS),
        vram_gb=vram_gb,
        licence="FLUX.1-dev Non-Commercial License (transformer, CLIP, VAE); Apache-2.0 (T5)",
    )


def _tiny(kit: str, description: str) -> Preset:
    def k(path: str, *, folder: bool = False) -> Source:
        return Source(path=path, kit=kit, folder=folder)

    return Preset(
        name=kit,
        description=description,
        transformer=k(f"gguf/flux1-{kit}-Q8_0.gguf"),
        transformer_quant="Q8_0",
        text_encoder_2=k(f"gguf/t5-v1_1-{kit}-encoder-Q8_0.gguf"),
        t5_quant="Q8_0",
        text_encoder=k("text_encoder/model.safetensors"),
        vae=k("vae/diffusion_pytorch_model.safetensors"),
        tokenizer=k("tokenizer", folder=True),
        tokenizer_2=k("tokenizer_2", folder=True),
        config_dir=k(".", folder=True),
        vram_gb=0.0,
        licence="random weights, made by fluxdemo.model.tiny",
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _flux_dev("dev-q8", "FLUX.1-dev, Q8_0 transformer, Q8_0 T5-XXL (best quality)",
                  "flux1-dev-Q8_0.gguf", 12.7, "Q8_0", "t5-v1_1-xxl-encoder-Q8_0.gguf", 5.06, "Q8_0", 14.0),
        _flux_dev("dev-q4", "FLUX.1-dev, Q4_K_S transformer, Q4_K_M T5-XXL (8 GB cards)",
                  "flux1-dev-Q4_K_S.gguf", 6.81, "Q4_K_S", "t5-v1_1-xxl-encoder-Q4_K_M.gguf", 2.9, "Q4_K_M", 8.0),
        _tiny("tiny", "random-weight FLUX-shaped model, 2+2 blocks of width 32: runs anywhere in milliseconds"),
        _tiny("tiny-wide", "random-weight FLUX at the real width 3072, 1+1 blocks: exercises real-width code paths"),
    )
}  # fmt: skip

DEFAULT_PRESET = "dev-q8"

# FLUXDEMO_TRANSFORMER=/path/to/flux1-dev-Q8_0.gguf etc.: every file of a preset can come from this machine.
ENV_OVERRIDES = {f"FLUXDEMO_{c.upper()}": c for c in SOURCES}
# The CLI's flags for the files users most often have locally (the messages of fluxdemo.model.files name them too).
CLI_FLAGS = {"transformer": "--transformer", "text_encoder_2": "--t5", "text_encoder": "--clip", "vae": "--vae"}


def get_preset(name: str, overrides: dict[str, str | Path] | None = None, *, use_env: bool = True) -> Preset:
    """The named preset with local-path overrides applied (environment first, then explicit ones)."""
    if name not in PRESETS:
        raise OptionsError(f"Unknown model preset {name!r}; choose from {', '.join(PRESETS)}.")
    preset = PRESETS[name]
    merged: dict[str, str | Path] = {}
    if use_env:
        merged.update({c: os.environ[v] for v, c in ENV_OVERRIDES.items() if os.environ.get(v)})
    merged.update({c: p for c, p in (overrides or {}).items() if p})
    for component, path in merged.items():
        preset = preset.with_local(component, path)
    return preset
