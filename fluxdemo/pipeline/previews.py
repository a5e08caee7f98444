"""Live previews: what an image being denoised looks like so far, drawn from its packed latents.

Two ways, the cheaper by default:
- latent_preview: FLUX.1's 16 latent channels projected to RGB, one pixel per latent (1/8 of the image's side); a
  small matmul, nothing to download.
- TinyDecoder: TAEF1 (madebyollin/taef1, diffusers' AutoencoderTiny with 16 latent channels, 2.4 M parameters), a
  distilled FLUX.1 VAE that draws the full-size picture in a few ms on a GPU. Used when it is already on disk: the
  Hugging Face cache (`hf download madebyollin/taef1`) or a folder the operator names; never downloaded by a run.

The stages call the drawer every few steps, within a time budget (PREVIEW_BUDGET of the steps' own time): a
drawer that knows its cost (TinyDecoder's seconds_per_megapixel, measured on every draw) is not called when the
preview would overrun it, so TAEF1 on a CPU beside a millisecond step costs nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

from fluxdemo.errors import OptionsError

logger = logging.getLogger(__name__)

VAE_FACTOR = 8  # FLUX.1's VAE: one latent per 8x8 pixels
TAEF1_REPO = "madebyollin/taef1"
PREVIEW_BUDGET = 0.05  # previews may cost at most this share of the denoising steps' time (issue 9: 5%)

# (packed latents [B, tokens, 64], width, height) -> a picture of the first image of the batch
DrawPreview = Callable[[torch.Tensor, int, int], Image.Image]

# FLUX.1's 16 latent channels -> RGB, a linear fit to the VAE's decodes (ComfyUI's latent_formats.Flux): a preview
# for the cost of one small matmul, with nothing to download.
FLUX_LATENT_RGB = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)  # fmt: skip
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)


def unpack(packed: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Packed latents [B, tokens, 64] -> the first image's latents [1, 16, height/8, width/8]."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(packed[:1], height, width, VAE_FACTOR)


def latent_preview(packed: torch.Tensor, width: int, height: int) -> Image.Image:
    """A rough RGB picture of packed latents at 1/8 of the image's size (one pixel per latent)."""
    latents = unpack(packed.float().cpu(), width, height)[0]  # [16, h, w]
    factors = torch.tensor(FLUX_LATENT_RGB, dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents, factors) + torch.tensor(FLUX_LATENT_RGB_BIAS)
    pixels = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy(), "RGB")


class TinyDecoder:
    """A tiny VAE decoder (TAEF1) as a preview drawer: full-size pictures, on the latents' device."""

    def __init__(self, vae: torch.nn.Module, source: str) -> None:
        self.vae = vae.eval().requires_grad_(False)
        self.source = source  # where it came from, for the log and the report
        self.seconds_per_megapixel = 0.0
        self(torch.zeros(1, 16, 64), 64, 64)  # a first measure of the cost, refined by every draw

    @torch.inference_mode()
    def __call__(self, packed: torch.Tensor, width: int, height: int) -> Image.Image:
        start = time.perf_counter()
        vae, config = self.vae, self.vae.config
        if vae.device != packed.device:  # about 10 MB; it stays where the denoising runs
            vae.to(packed.device)
        latents = unpack(packed, width, height).to(vae.dtype)
        # the same latent scaling diffusers' FluxPipeline applies before any VAE's decode (TAEF1's is 1 and 0)
        pixels = vae.decode(latents / config.scaling_factor + config.shift_factor, return_dict=False)[0][0]
        rgb = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
        picture = Image.fromarray(rgb.cpu().numpy(), "RGB")  # .cpu() waits for the device: an honest time
        self.seconds_per_megapixel = (time.perf_counter() - start) / (width * height / 1e6)
        return picture


def cost(draw: DrawPreview, width: int, height: int) -> float:
    """The seconds a drawer expects to take for one preview (0 for one that does not say)."""
    return getattr(draw, "seconds_per_megapixel", 0.0) * width * height / 1e6


def preview_drawer(source: str | None = None) -> DrawPreview:
    """The preview drawer for `source`: "off" or "latent" -> latent_preview; a folder -> the AutoencoderTiny in it
    (config.json and safetensors weights); None -> TAEF1 if the Hugging Face cache holds it, else latent_preview.
    Reads only local files."""
    if source in ("off", "latent"):
        return latent_preview
    if source is None:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(TAEF1_REPO, "config.json")
        if not isinstance(config, str):
            return latent_preview
        folder = Path(config).parent
    else:
        folder = Path(source).expanduser()
        if not (folder / "config.json").is_file():
            raise OptionsError(
                f"The preview decoder {source} is not a folder with config.json and safetensors weights: download "
                f"TAEF1 with `hf download {TAEF1_REPO} --local-dir {source}`, or pass `off`."
            )
    from diffusers import AutoencoderTiny

    try:
        vae = AutoencoderTiny.from_pretrained(folder, use_safetensors=True)  # never a pickle
    except (OSError, ValueError) as e:
        raise OptionsError(
            f"The preview decoder in {folder} could not be loaded ({type(e).__name__}); it needs config.json and "
            f"diffusion_pytorch_model.safetensors, e.g. `hf download {TAEF1_REPO}`, or pass `off`."
        ) from e
    if vae.config.latent_channels != 16:
        raise OptionsError(
            f"The preview decoder in {folder} takes {vae.config.latent_channels} latent channels, FLUX.1 has 16: use "
            f"TAEF1 ({TAEF1_REPO}), or pass `off`."
        )
    logger.info("Live previews drawn by the tiny decoder in %s", folder)
    return TinyDecoder(vae, str(folder))
