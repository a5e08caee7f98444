"""The three stages of one FLUX image: encode (cached per encoder) -> denoise -> decode.

The denoising loop is diffusers' own FluxPipeline.__call__ (flow-matching Euler, FLUX.1-dev's shifted schedule),
called with our prompt embeddings and our initial noise; we only decide what is on the device when, and time it.
fluxdemo.pipeline.experiments decides which images need which stages; fluxdemo.pipeline.api is the public face.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from fluxdemo.errors import CancelledError
from fluxdemo.pipeline.fast import step_cache
from fluxdemo.pipeline.model import Model
from fluxdemo.pipeline.options import MAX_T5_TOKENS, SIDE_MULTIPLE, FastSchedule, GenerateOptions
from fluxdemo.pipeline.previews import PREVIEW_BUDGET, DrawPreview, cost, latent_preview

logger = logging.getLogger(__name__)

LATENT_CHANNELS = 16

# (stage, done, total): e.g. ("baseline", 12, 28). The UI maps it to gr.Progress, the CLI to a log line.
ProgressFn = Callable[[str, int, int], None]
# (stage, step, preview image): a cheap look at the latents while an image denoises.
PreviewFn = Callable[[str, int, Image.Image], None]


@dataclass(frozen=True)
class Embeddings:
    prompt_embeds: torch.Tensor  # T5: [1, max_sequence_length, 4096]
    pooled: torch.Tensor  # CLIP pooled: [1, 768]
    truncated_tokens: int  # how many T5 tokens the prompt lost to max_sequence_length
    reused: tuple[str, ...] = ()  # the encoders whose output came from the cache: "t5", "clip"


@dataclass(frozen=True)
class Controls:
    """How a caller watches and stops a run."""

    progress: ProgressFn | None = None
    cancelled: Callable[[], bool] | None = None  # polled after each step; True stops the run cleanly
    preview: PreviewFn | None = None
    preview_every: int = 4  # steps between previews, skipped while they have cost more than PREVIEW_BUDGET
    on_image: Callable[[int, int, str], None] | None = None  # (i, n, label): the i-th of n images to make starts
    draw: DrawPreview = latent_preview  # how a preview is drawn (fluxdemo.pipeline.previews: the projection or TAEF1)
    cache_scope: str = ""  # whose caches: "" shares them; a public app gives each visitor its own


def initial_noise(seed: int, width: int, height: int) -> torch.Tensor:
    """The packed initial latents for a seed: drawn on the CPU in float32, so every device and dtype starts from
    the same numbers (what diffusers draws for a CPU generator, then packs)."""
    from diffusers import FluxPipeline

    generator = torch.Generator("cpu").manual_seed(seed)
    h, w = 2 * (height // SIDE_MULTIPLE), 2 * (width // SIDE_MULTIPLE)
    noise = torch.randn((1, LATENT_CHANNELS, h, w), generator=generator, dtype=torch.float32)
    return FluxPipeline._pack_latents(noise, 1, LATENT_CHANNELS, h, w)


def encode(
    manager: Model,
    prompt: str,
    max_sequence_length: int = MAX_T5_TOKENS,
    clip_state: tuple = (),
    scope: str = "",
) -> Embeddings:
    """T5 + CLIP embeddings of a prompt. Each encoder has its own cache entry: T5 never carries a LoRA, so a CLIP
    LoRA (`clip_state`: the active CLIP adapters and their strengths, already set) re-encodes CLIP only. `scope`
    keeps one visitor's cached embeddings apart from another's (Controls.cache_scope)."""
    t5_key, clip_key = ("t5", scope, prompt, max_sequence_length), ("clip", scope, prompt, clip_state)
    embeds, pooled = manager.embedding_cache.get(t5_key), manager.embedding_cache.get(clip_key)
    reused = tuple(name for name, hit in (("t5", embeds), ("clip", pooled)) if hit is not None)
    if len(reused) == 2:
        manager.timeline.add("encode (cached)", 0.0)
    view = pipeline_view(manager, "tokenizer", "tokenizer_2")
    truncated = max(0, len(view.tokenizer_2(prompt).input_ids) - max_sequence_length)
    if truncated and embeds is None:
        logger.warning("The prompt is %d T5 tokens over %d; the end is cut off.", truncated, max_sequence_length)
    if pooled is None:
        with manager.timeline.stage("encode clip"), manager.on_device("text_encoder") as clip:
            view.register_modules(text_encoder=clip)
            pooled = view._get_clip_prompt_embeds(prompt, device=manager.device).cpu()
        manager.embedding_cache.put(clip_key, pooled)
    if embeds is None:
        with manager.timeline.stage("encode t5"), manager.on_device("text_encoder_2") as t5:
            view.register_modules(text_encoder_2=t5)
            # dtype given: diffusers would take it from CLIP, which this view holds only when CLIP ran too
            embeds = view._get_t5_prompt_embeds(
                prompt, max_sequence_length=max_sequence_length, device=manager.device, dtype=manager.dtype
            ).cpu()
        manager.embedding_cache.put(t5_key, embeds)
    return Embeddings(embeds, pooled, truncated, reused)


def pipeline_view(manager: Model, *components: str, **modules):
    """A FluxPipeline over only the named parts. diffusers takes its execution device from the first module it
    finds (the VAE), which is wrong while only the stage's component is on the device."""
    from diffusers import FluxPipeline

    tokenizer, tokenizer_2 = manager.tokenizers()
    parts = dict.fromkeys(
        ("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer")
    )
    available = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
    parts.update({c: available[c] for c in components})
    parts.update(modules)
    return FluxPipeline(**parts)


def denoise(
    manager: Model,
    transformer: torch.nn.Module,
    embeddings: Embeddings | list[Embeddings],
    noise: torch.Tensor | list[torch.Tensor],
    options: GenerateOptions,
    label: str,
    controls: Controls,
    skipped: list[int] | None = None,
) -> torch.Tensor:
    """The flow-matching loop, with the transformer already on the device. Returns packed latents: for one image, or
    for a batch (lists of embeddings and noises, one per image, that share options but for prompt and seed) in one
    pass through the transformer per step, batch first. options.fast predicts the steps of FastSchedule.of(steps)
    (fluxdemo.pipeline.fast); `skipped` receives those the pass skipped (from 1), as observed."""
    if isinstance(embeddings, list):  # a batch: one transformer pass per step for all of its images
        embeddings = Embeddings(
            torch.cat([e.prompt_embeds for e in embeddings]), torch.cat([e.pooled for e in embeddings]), 0
        )
        noise = torch.cat(noise)
    view = pipeline_view(manager, scheduler=manager.scheduler(), transformer=transformer)
    view.set_progress_bar_config(disable=True)  # our timeline logs each step, with its seconds
    last = time.perf_counter()
    spent = {"steps": 0.0, "previews": 0.0}

    def on_step(pipe, i: int, t, kwargs: dict) -> dict:
        nonlocal last
        if manager.device.type == "cuda":
            torch.cuda.synchronize(manager.device)  # honest per-step seconds; the loop syncs each step anyway
        now = time.perf_counter()
        manager.timeline.add(f"{label} step {i + 1}/{options.steps}", now - last)
        spent["steps"] += now - last
        if controls.progress:
            controls.progress(label, i + 1, options.steps)
        if controls.cancelled and controls.cancelled():
            raise CancelledError(f"Cancelled during the {label} image, after step {i + 1} of {options.steps}.")
        due = controls.preview and controls.preview_every > 0 and (i + 1) % controls.preview_every == 0
        afford = PREVIEW_BUDGET * spent["steps"] - spent["previews"]
        if due and cost(controls.draw, options.width, options.height) <= afford:
            controls.preview(label, i + 1, controls.draw(kwargs["latents"], options.width, options.height))
            spent["previews"] += time.perf_counter() - now
        last = time.perf_counter()  # a preview's cost is its own, not the next step's
        return kwargs

    device, dtype = manager.device, manager.dtype
    with step_cache(transformer, FastSchedule.of(options.steps) if options.fast else None, skipped):
        (latents,) = view(
            prompt_embeds=embeddings.prompt_embeds.to(device, dtype),
            pooled_prompt_embeds=embeddings.pooled.to(device, dtype),
            latents=noise.to(device, dtype),
            num_inference_steps=options.steps,
            guidance_scale=options.guidance,
            height=options.height,
            width=options.width,
            max_sequence_length=options.max_sequence_length,
            output_type="latent",
            return_dict=False,
            callback_on_step_end=on_step,
        )
    return latents


def decode(manager: Model, latents: list[torch.Tensor], options: list[GenerateOptions]) -> list[Image.Image]:
    """Packed latents -> PIL images (each with its own size), with one trip of the VAE to the device for all."""
    from diffusers import FluxPipeline
    from diffusers.image_processor import VaeImageProcessor

    images = []
    with manager.timeline.stage("decode", f"{len(latents)} images"), manager.on_device("vae") as vae:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        processor = VaeImageProcessor(vae_scale_factor=factor * 2)
        for packed, o in zip(latents, options, strict=True):
            x = FluxPipeline._unpack_latents(packed, o.height, o.width, factor)
            x = x / vae.config.scaling_factor + vae.config.shift_factor
            pixels = vae.decode(x.to(manager.device, vae.dtype), return_dict=False)[0]
            images.append(processor.postprocess(pixels, output_type="pil")[0])
    return images
