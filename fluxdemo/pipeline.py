"""encode (cached) -> denoise -> decode, and the two things users run: generate() and compare().

The denoising loop is diffusers' own FluxPipeline.__call__ (flow-matching Euler, FLUX.1-dev's shifted schedule),
called with our prompt embeddings and our initial noise; we only decide what is on the device when, and time it.
compare() encodes the prompt once, draws the noise once, and runs the same loop with the LoRA off and on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from PIL import Image

from fluxdemo.errors import CancelledError, OptionsError
from fluxdemo.manager import ModelManager

logger = logging.getLogger(__name__)

MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 16, 2048, 16  # 16 = VAE factor 8 x FLUX's 2x2 latent packing
MAX_STEPS = 100
MAX_SEED = 2**32 - 1
MAX_T5_TOKENS = 512
LATENT_CHANNELS = 16

# (stage, done, total): e.g. ("baseline", 12, 28). The UI maps it to gr.Progress, the CLI to a log line.
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class GenerateOptions:
    """One image's settings, FLUX.1-dev's defaults. validate() is the one place options are checked."""

    prompt: str
    seed: int = 0
    steps: int = 28
    guidance: float = 3.5
    width: int = 1024
    height: int = 1024
    max_sequence_length: int = MAX_T5_TOKENS

    def validate(self) -> GenerateOptions:
        if not self.prompt.strip():
            raise OptionsError("`prompt` is empty: describe the image you want.")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not MIN_SIDE <= value <= MAX_SIDE or value % SIDE_MULTIPLE:
                rule = f"a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and {MAX_SIDE}"
                raise OptionsError(f"`{name}` must be {rule}, but is {value}.")
        if not 1 <= self.steps <= MAX_STEPS:
            raise OptionsError(f"`steps` must be between 1 and {MAX_STEPS}, but is {self.steps}.")
        if not 0.0 <= self.guidance <= 30.0:
            raise OptionsError(f"`guidance` must be between 0 and 30, but is {self.guidance}.")
        if not 0 <= self.seed <= MAX_SEED:
            raise OptionsError(f"`seed` must be between 0 and {MAX_SEED}, but is {self.seed}.")
        if not 1 <= self.max_sequence_length <= MAX_T5_TOKENS:
            raise OptionsError(
                f"`max_sequence_length` must be between 1 and {MAX_T5_TOKENS}, but is {self.max_sequence_length}."
            )
        return self


@dataclass(frozen=True)
class Embeddings:
    prompt_embeds: torch.Tensor  # T5: [1, max_sequence_length, 4096]
    pooled: torch.Tensor  # CLIP pooled: [1, 768]
    truncated_tokens: int  # how many T5 tokens the prompt lost to max_sequence_length


@dataclass
class Result:
    """What generate() and compare() return: images by role ("baseline", "lora") and a JSON-able report."""

    images: dict[str, Image.Image]
    report: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Controls:
    """How a caller watches and stops a run."""

    progress: ProgressFn | None = None
    cancelled: Callable[[], bool] | None = None  # polled after each step; True stops the run cleanly


def initial_noise(seed: int, width: int, height: int) -> torch.Tensor:
    """The packed initial latents for a seed: drawn on the CPU in float32, so every device and dtype starts from
    the same numbers (what diffusers draws for a CPU generator, then packs)."""
    from diffusers import FluxPipeline

    generator = torch.Generator("cpu").manual_seed(seed)
    h, w = 2 * (height // SIDE_MULTIPLE), 2 * (width // SIDE_MULTIPLE)
    noise = torch.randn((1, LATENT_CHANNELS, h, w), generator=generator, dtype=torch.float32)
    return FluxPipeline._pack_latents(noise, 1, LATENT_CHANNELS, h, w)


def encode(manager: ModelManager, prompt: str, max_sequence_length: int = MAX_T5_TOKENS) -> Embeddings:
    """T5 + CLIP embeddings of a prompt; the same prompt (and text-encoder LoRA state) again skips the encoders."""
    key = (prompt, max_sequence_length, manager.adapters.text_encoder_state())
    cached = manager.embedding_cache.get(key)
    if cached is not None:
        manager.timeline.add("encode (cached)", 0.0)
        return cached
    view = pipeline_view(manager, "tokenizer", "tokenizer_2")
    truncated = max(0, len(view.tokenizer_2(prompt).input_ids) - max_sequence_length)
    if truncated:
        logger.warning("The prompt is %d T5 tokens over %d; the end is cut off.", truncated, max_sequence_length)
    with manager.timeline.stage("encode clip"), manager.on_device("text_encoder") as clip:
        view.register_modules(text_encoder=clip)
        pooled = view._get_clip_prompt_embeds(prompt, device=manager.device)
    with manager.timeline.stage("encode t5"), manager.on_device("text_encoder_2") as t5:
        view.register_modules(text_encoder_2=t5)
        embeds = view._get_t5_prompt_embeds(prompt, max_sequence_length=max_sequence_length, device=manager.device)
    result = Embeddings(embeds.cpu(), pooled.cpu(), truncated)
    manager.embedding_cache.put(key, result)
    return result


def pipeline_view(manager: ModelManager, *components: str, **modules):
    """A FluxPipeline over only the named parts. diffusers takes its execution device from the first module it
    finds (the VAE), which is wrong while only the stage's component is on the device."""
    from diffusers import FluxPipeline

    tokenizer, tokenizer_2 = manager.tokenizers()
    parts = dict.fromkeys(("scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                           "transformer"))  # fmt: skip
    available = {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}
    parts.update({c: available[c] for c in components})
    parts.update(modules)
    return FluxPipeline(**parts)


def denoise(
    manager: ModelManager,
    transformer: torch.nn.Module,
    embeddings: Embeddings,
    noise: torch.Tensor,
    options: GenerateOptions,
    label: str,
    controls: Controls,
) -> torch.Tensor:
    """The flow-matching loop for one image, with the transformer already on the device. Returns packed latents."""
    view = pipeline_view(manager, scheduler=manager.scheduler(), transformer=transformer)
    view.set_progress_bar_config(disable=True)  # our timeline logs each step, with its seconds
    last = time.perf_counter()

    def on_step(pipe, i: int, t, kwargs: dict) -> dict:
        nonlocal last
        if manager.device.type == "cuda":
            torch.cuda.synchronize(manager.device)  # honest per-step seconds; the loop syncs each step anyway
        now = time.perf_counter()
        manager.timeline.add(f"{label} step {i + 1}/{options.steps}", now - last)
        last = now
        if controls.progress:
            controls.progress(label, i + 1, options.steps)
        if controls.cancelled and controls.cancelled():
            raise CancelledError(f"Cancelled during the {label} image, after step {i + 1} of {options.steps}.")
        return kwargs

    dtype = manager.dtype
    (latents,) = view(
        prompt_embeds=embeddings.prompt_embeds.to(manager.device, dtype),
        pooled_prompt_embeds=embeddings.pooled.to(manager.device, dtype),
        latents=noise.to(manager.device, dtype),
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


def decode(manager: ModelManager, latents: list[torch.Tensor], options: GenerateOptions) -> list[Image.Image]:
    """Packed latents -> PIL images, with one trip of the VAE to the device for all of them."""
    from diffusers import FluxPipeline
    from diffusers.image_processor import VaeImageProcessor

    images = []
    with manager.timeline.stage("decode"), manager.on_device("vae") as vae:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        processor = VaeImageProcessor(vae_scale_factor=factor * 2)
        for packed in latents:
            x = FluxPipeline._unpack_latents(packed, options.height, options.width, factor)
            x = x / vae.config.scaling_factor + vae.config.shift_factor
            pixels = vae.decode(x.to(manager.device, vae.dtype), return_dict=False)[0]
            images.append(processor.postprocess(pixels, output_type="pil")[0])
    return images


def generate(
    manager: ModelManager, options: GenerateOptions, lora: str | None = None, strength: float = 1.0,
    controls: Controls = Controls(),
) -> Result:  # fmt: skip
    """One image; with a LoRA (a name in the manager's LoRA library) at the given strength, or the base model."""
    variants = [("lora", strength)] if lora else [("baseline", None)]
    return _run(manager, options.validate(), lora, variants, controls)


def compare(
    manager: ModelManager, options: GenerateOptions, lora: str, strength: float = 1.0, controls: Controls = Controls()
) -> Result:
    """The base model's image and the LoRA's, from one seed and one encoding of the prompt."""
    return _run(manager, options.validate(), lora, [("baseline", None), ("lora", strength)], controls)


def sweep(
    manager: ModelManager, options: GenerateOptions, lora: str, strengths: list[float], controls: Controls = Controls()
) -> Result:
    """One image per strength, same seed: images keyed "strength 0.5" etc., in the order given."""
    return _run(manager, options.validate(), lora, [(f"strength {s:g}", s) for s in strengths], controls)


def _run(manager: ModelManager, options: GenerateOptions, lora: str | None,
         variants: list[tuple[str, float | None]], controls: Controls) -> Result:  # fmt: skip
    """Images that differ only in LoRA strength (None: the base model), sharing the prompt encoding and the noise.

    Each stage runs under the manager's out-of-memory fallback: on a device out-of-memory it is freed and run again,
    once, with a lighter strategy; a stage's work is all or nothing, so its retry starts from the same inputs.
    """
    with torch.inference_mode(), manager.session(options.width, options.height) as timeline:
        start = time.perf_counter()
        loaded = manager.with_fallback("load LoRA", lambda: manager.adapters.load(lora)) if lora else None
        # Only a text-encoder LoRA changes the embeddings; switching adapters needs the transformer in RAM, which the
        # disk strategy keeps out of RAM while T5 runs.
        switch_for_encode = any(a.affects_text_encoder for a in manager.adapters.loaded())

        def encode_all() -> dict[str, Embeddings]:
            embeddings = {}
            for label, strength in variants:  # encode first, so the transformer comes on once for all images
                if switch_for_encode:
                    manager.adapters.activate(loaded if strength is not None else None, strength or 0.0)
                embeddings[label] = encode(manager, options.prompt, options.max_sequence_length)
            return embeddings

        def denoise_all() -> list[torch.Tensor]:
            latents = []
            with manager.on_device("transformer") as transformer:
                for label, strength in variants:
                    manager.adapters.activate(loaded if strength is not None else None, strength or 0.0)
                    with timeline.stage(f"denoise {label}"):
                        packed = denoise(manager, transformer, embeddings[label], noise, options, label, controls)
                    latents.append(packed)
            return latents

        embeddings = manager.with_fallback("encode", encode_all)
        noise = initial_noise(options.seed, options.width, options.height)
        latents = manager.with_fallback("denoise", denoise_all)
        decoded = manager.with_fallback("decode", lambda: decode(manager, latents, options))
        images = dict(zip([label for label, _ in variants], decoded, strict=True))
        strengths = [s for _, s in variants if s is not None]
        report = {
            "options": asdict(options),
            "model": {"preset": manager.preset.name, "transformer_quant": manager.preset.transformer_quant,
                      "t5_quant": manager.preset.t5_quant, "dtype": str(manager.dtype).removeprefix("torch."),
                      "device": str(manager.device)},
            "lora": loaded.summary(strengths[0]) if loaded and strengths else None,
            "strengths": {label: s for label, s in variants},
            "text_encoder_lora": bool(loaded and loaded.affects_text_encoder),
            "truncated_tokens": next(iter(embeddings.values())).truncated_tokens,
            "strategy": manager.strategy,
            "events": list(manager.events),
            "timeline": timeline.to_list(),
            "seconds": time.perf_counter() - start,
            "memory": manager.memory_report(),
        }  # fmt: skip
    return Result(images, report)
