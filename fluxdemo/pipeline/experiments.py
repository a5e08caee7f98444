"""Experiments, the unit of work: a set of images, each an options + LoRA-stack pair, made with the least work.

What is shared is done once: one prompt encoding per prompt (and CLIP-LoRA state), one initial noise per seed and
size, one transformer trip for every image, one VAE trip for all decodes. What was made before comes from the
ResultsCache, keyed by everything that determines the pixels, so a compare that changes only the LoRA or the strength
reuses its baseline bit for bit. Every image's report says which LoRAs (by SHA-256) and strengths made it, and which
stages were reused.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace

import torch
from PIL import Image

from fluxdemo.errors import LoraError, OptionsError
from fluxdemo.lora import LoraEntry
from fluxdemo.lora.adapters import LoadedLora
from fluxdemo.pipeline.cache import ResultsCache
from fluxdemo.pipeline.model import Model
from fluxdemo.pipeline.options import (
    MAX_BATCH,
    MAX_LORAS_PER_RUN,
    MAX_STACK,
    FastSchedule,
    GenerateOptions,
    Stack,
    check_lora_strength,
    stack_label,
)
from fluxdemo.pipeline.report import ImageReport, LoraSummary, LoraUse, ModelInfo, RunReport
from fluxdemo.pipeline.stages import Controls, Embeddings, decode, denoise, encode, initial_noise

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSpec:
    """One image of an experiment: a label unique in it, the options, and the stack (empty: the base model)."""

    label: str
    options: GenerateOptions
    stack: Stack = ()


@dataclass
class Result:
    """What an experiment returns: images by label, in the order asked, and the run's report."""

    images: dict[str, Image.Image]
    report: RunReport


@dataclass(frozen=True)
class _Resolved:
    """A stack checked against the library: entries with non-zero strengths (a LoRA at 0 is the base model exactly,
    so it is left out of the work and of the cache key), and every LoRA as named, for the report."""

    active: tuple[tuple[LoraEntry, float], ...]
    named: tuple[tuple[LoraEntry, float], ...]

    def key(self) -> tuple:
        return tuple((entry.sha256, strength) for entry, strength in self.active)

    def clip_key(self) -> tuple:
        return tuple((e.sha256, s) for e, s in self.active if e.report.text_encoder)


def run(
    manager: Model,
    specs: Sequence[ImageSpec],
    controls: Controls = Controls(),
    cache: ResultsCache | None = None,
    batch: int = 1,
) -> Result:
    """Make every image of an experiment; what the cache holds (or another image of the same run) is reused.
    controls.on_image hears when each image to make starts (reused images are not counted).

    batch > 1 sends up to that many images of one size, step count and guidance through the transformer together:
    images with the same stack (other seeds or prompts), and images whose stacks are the base model or one LoRA
    each, every sample with its own adapter (PEFT's mixed batches; each LoRA at one strength per batch, LoKr/LoHa
    kept factored only with their own stack; not under --compile, where a mixed batch would be another graph). About
    1.3-2.6x faster on a CPU (bench/RESULTS.md), within 1/255 of one at a time but not bit-identical, so batched
    images are cached apart from unbatched ones; the report lists the batches."""
    if manager.runner is not None:  # made elsewhere, e.g. on Ray Serve replicas (fluxdemo.serve.front)
        return manager.runner.run(manager, specs, controls, cache, batch)
    # 1. Check every option and every stack, before anything is loaded or applied.
    specs, resolved = _check(manager, specs, batch)
    if cache is not None:
        for r in resolved.values():
            for entry, _ in r.named:
                cache.saw(entry.name, entry.sha256)
    width = max(spec.options.width for spec in specs)
    height = max(spec.options.height for spec in specs)
    with torch.inference_mode(), manager.session(width, height) as timeline:
        start = time.perf_counter()
        # 2. Reuse what the cache holds; an image asked twice is made once.
        keys = _keys(manager, specs, resolved, controls, batch)
        made, reused, todo = _reuse(specs, keys, cache, timeline)
        # 3. Make the rest: load, encode, denoise, decode.
        embeddings, passes, skipped = {}, [], {}
        if todo:
            images, embeddings, passes, skipped = _make(manager, todo, resolved, controls, batch)
            made.update({keys[label]: image for label, image in images.items()})
        if cache is not None:
            for spec in todo:
                cache.put(keys[spec.label], made[keys[spec.label]])
        # 4. Report.
        images = {spec.label: made[keys[spec.label]] for spec in specs}
        skipped = _observed(specs, keys, skipped)
        report = _report(manager, specs, resolved, embeddings, reused, todo, timeline, start, passes, skipped)
    return Result(images, report)


def _check(manager: Model, specs: Sequence[ImageSpec], batch: int) -> tuple[list[ImageSpec], dict[Stack, _Resolved]]:
    """The specs with validated options, and every stack checked whole against the library."""
    if not isinstance(batch, int) or not 1 <= batch <= MAX_BATCH:
        raise OptionsError(f"`batch` must be a whole number from 1 to {MAX_BATCH}, but is {batch!r}.")
    specs = [replace(spec, options=spec.options.validate()) for spec in specs]
    labels = [spec.label for spec in specs]
    if not specs or len(set(labels)) != len(labels):
        raise OptionsError(f"An experiment needs images with distinct labels, got {labels}.")
    if manager.compile is not None and not manager.compile.ahead_of_time and any(s.options.fast for s in specs):
        # diffusers' step cache hooks into the very blocks torch.compile compiled whole; ahead of time it wraps them
        raise OptionsError(
            "Fast mode does not work with torch.compile: untick Fast, or start with --compile aot (or without it)."
        )
    resolved = {spec.stack: _resolve(manager, spec.stack) for spec in specs}
    names = {entry.name for r in resolved.values() for entry, _ in r.active}
    if len(names) > MAX_LORAS_PER_RUN:
        raise OptionsError(
            f"One run can use at most {MAX_LORAS_PER_RUN} different LoRAs, but this one uses "
            f"{len(names)}: split it into smaller runs."
        )
    return specs, resolved


def _keys(manager: Model, specs: list[ImageSpec], resolved: dict, controls: Controls, batch: int) -> dict[str, tuple]:
    """Each image's cache key; the stack's (sha256, strength) pairs stay last, where ResultsCache.saw() reads them."""
    identity = manager.file_identity()
    batched = ("batch", batch) if batch > 1 else ()
    scope = (controls.cache_scope,) if controls.cache_scope else ()  # a visitor's results apart from another's
    return {spec.label: (*scope, *batched, *_key(identity, spec.options, resolved[spec.stack])) for spec in specs}


def _reuse(specs: list[ImageSpec], keys: dict, cache: ResultsCache | None, timeline):
    """(images found by key, the labels reused, the specs to make: one per key)."""
    made: dict[tuple, Image.Image] = {}
    reused: list[str] = []
    todo: list[ImageSpec] = []
    for spec in specs:
        hit = cache.get(keys[spec.label]) if cache is not None else None
        if hit is not None:
            made[keys[spec.label]] = hit
            reused.append(spec.label)
            timeline.add(f"{spec.label} (cached)", 0.0)
        elif keys[spec.label] not in {keys[t.label] for t in todo}:
            todo.append(spec)
    return made, reused, todo


def _resolve(manager: Model, stack: Stack) -> _Resolved:
    if len(stack) > MAX_STACK:
        raise OptionsError(f"A stack holds at most {MAX_STACK} LoRAs, but this one has {len(stack)}.")
    library = manager.adapters.library
    named, problems = [], []
    for choice in stack:
        strength = check_lora_strength(choice.strength)
        if not isinstance(choice.name, str) or not choice.name.strip():
            raise OptionsError("A LoRA of the stack has no name: pick one from the list or remove the row.")
        try:
            entry = library.get(choice.name)
        except LoraError as e:
            problems.append(str(e))
            continue
        if not entry.report.compatible:
            problems.append(f"{entry.name} cannot be applied: {'; '.join(entry.report.problems)}")
            continue
        named.append((entry, strength))
    if problems:
        whole = f"The stack {stack_label(stack)} was not applied: " if len(stack) > 1 else ""
        raise LoraError(whole + " ".join(problems))
    shas = [entry.sha256 for entry, _ in named]
    twice = sorted({entry.name for entry, _ in named if shas.count(entry.sha256) > 1})
    if twice:
        raise OptionsError(
            f"The stack names the same LoRA twice ({', '.join(twice)}): give it once, with the strength you want."
        )
    manager.adapters.check_stack(sum(s != 0.0 for _, s in named))  # under --compile, its slots
    return _Resolved(tuple((e, s) for e, s in named if s != 0.0), tuple(named))


def _key(identity: tuple, options: GenerateOptions, resolved: _Resolved) -> tuple:
    return (identity, *asdict(options).values(), resolved.key())


def _make(manager: Model, todo: list[ImageSpec], resolved: dict, controls: Controls, batch: int):
    """The images not reused, by label, their embeddings by label, and the labels of each transformer pass. Each
    stage runs under the manager's out-of-memory fallback (freed, one strategy lighter, run once more)."""
    # 1. Load the LoRAs (the stacks were checked in run's step 1).
    names = list(dict.fromkeys(entry.name for spec in todo for entry, _ in resolved[spec.stack].active))
    loaded: dict[str, LoadedLora] = {}
    if names:
        adapters = manager.adapters
        loaded = manager.with_fallback(
            "load LoRA", lambda: {n: adapters.load(n, keep=names) for n in names}, ("transformer",)
        )
    # 2. Encode.
    embeddings = manager.with_fallback(
        "encode", lambda: _encode_all(manager, todo, resolved, loaded, controls), ("text_encoder", "text_encoder_2")
    )
    # 3. Denoise.
    pairs, passes, skipped = manager.with_fallback(
        "denoise", lambda: _denoise_all(manager, todo, resolved, loaded, embeddings, controls, batch), ("transformer",)
    )
    # 4. Decode.
    decoded = manager.with_fallback(
        "decode", lambda: decode(manager, [x for _, x in pairs], [s.options for s, _ in pairs]), ("vae",)
    )
    images = {spec.label: image for (spec, _), image in zip(pairs, decoded, strict=True)}
    return images, embeddings, passes, skipped


def _applied(
    resolved: _Resolved, loaded: dict[str, LoadedLora], text_encoder: bool = False
) -> list[tuple[LoadedLora, float]]:
    return [(loaded[e.name], s) for e, s in resolved.active if not text_encoder or loaded[e.name].affects_text_encoder]


def _encode_all(manager: Model, todo, resolved: dict, loaded: dict, controls: Controls) -> dict[str, Embeddings]:
    """Each distinct (prompt, T5 length, CLIP LoRA state) encoded once; the embeddings by label."""
    adapters = manager.adapters
    done: dict[tuple, Embeddings] = {}
    for spec in todo:
        o, clip_key = spec.options, resolved[spec.stack].clip_key()
        if (o.prompt, o.max_sequence_length, clip_key) not in done:
            if adapters.loaded():  # CLIP runs as the base model unless the stack has a CLIP part
                adapters.activate(_applied(resolved[spec.stack], loaded, text_encoder=True), ("text_encoder",))
            done[o.prompt, o.max_sequence_length, clip_key] = encode(
                manager, o.prompt, o.max_sequence_length, clip_key, controls.cache_scope
            )
    return {s.label: done[s.options.prompt, s.options.max_sequence_length, resolved[s.stack].clip_key()] for s in todo}


def _denoise_all(manager: Model, todo, resolved: dict, loaded: dict, embeddings: dict, controls: Controls, batch: int):
    """(spec, packed latents) per image, stack by stack, in passes of up to `batch`; and each pass's labels."""
    adapters = manager.adapters
    made_latents: list[tuple[ImageSpec, torch.Tensor]] = []
    skipped: dict[str, list[int]] = {}  # each fast image's predicted steps, as its pass observed them
    order = sorted(todo, key=lambda s: [r.key() for r in resolved.values()].index(resolved[s.stack].key()))
    chunks = _batches(order, resolved, batch, loaded)
    with manager.on_device("transformer") as transformer:
        for chunk in chunks:
            first, o = chunk[0], chunk[0].options
            mixed = len({resolved[s.stack].key() for s in chunk}) > 1
            if adapters.loaded() and not mixed:
                adapters.activate(_applied(resolved[first.stack], loaded), ("transformer",))
            if controls.on_image:
                controls.on_image(len(made_latents) + 1, len(order), first.label)
            label = first.label if len(chunk) == 1 else f"{first.label} (+{len(chunk) - 1})"
            noises = [initial_noise(s.options.seed, o.width, o.height) for s in chunk]
            stacks = [_applied(resolved[s.stack], loaded) for s in chunk]
            per_sample = adapters.per_sample(stacks) if mixed else nullcontext()
            with manager.timeline.stage(f"denoise {label}"), per_sample:
                conds = [embeddings[s.label] for s in chunk]
                observed: list[int] = []
                latents = denoise(manager, transformer, conds, noises, o, label, controls, observed)
            made_latents += zip(chunk, latents.split(1), strict=True)
            skipped.update({s.label: observed for s in chunk if o.fast})
    return made_latents, [[s.label for s in chunk] for chunk in chunks], skipped


def _batches(
    order: list[ImageSpec], resolved: dict, size: int, loaded: dict[str, LoadedLora]
) -> list[list[ImageSpec]]:
    """Images that can share a transformer pass, at most `size` together, each put in the first pass it fits."""
    chunks: list[list[ImageSpec]] = []
    for spec in order:
        chunk = next((c for c in chunks if len(c) < size and _fits(c, spec, resolved, loaded)), None)
        if chunk is None:
            chunks.append([spec])
        else:
            chunk.append(spec)
    return chunks


def _fits(chunk: list[ImageSpec], spec: ImageSpec, resolved: dict, loaded: dict[str, LoadedLora]) -> bool:
    """Same size, steps, guidance, T5 length and fast mode, and either one stack for all, or each stack the base model
    or one per-sample LoRA at one strength across the pass (PEFT's mixed batches give a sample one adapter, not a
    sum)."""

    def shape(o: GenerateOptions) -> tuple:
        return o.width, o.height, o.steps, o.guidance, o.max_sequence_length, o.fast

    if shape(chunk[0].options) != shape(spec.options):  # every image of a pass has the first one's shape
        return False
    stacks = {resolved[s.stack].key(): resolved[s.stack].active for s in (*chunk, spec)}
    if len(stacks) == 1:
        return True
    strengths: dict[str, float] = {}
    return all(
        len(active) <= 1 and all(loaded[e.name].per_sample and strengths.setdefault(e.name, s) == s for e, s in active)
        for active in stacks.values()
    )


def _report(manager, specs, resolved, embeddings, reused, todo, timeline, start, passes, skipped) -> RunReport:
    entries = {e.name: e for r in resolved.values() for e, _ in r.named}
    images = {
        spec.label: ImageReport(
            options=spec.options,
            loras=[LoraUse(e.name, e.sha256, s) for e, s in resolved[spec.stack].named],
            reused=spec.label in reused,
            skipped_steps=_skipped(spec, skipped),
        )
        for spec in specs
    }
    stages = []
    encodings = list(embeddings.values())
    if todo and all(len(e.reused) == 2 for e in encodings):
        stages.append("encode")
    elif any("t5" in e.reused for e in encodings):
        stages.append("encode t5")
    stages += reused
    first_use = next((images[s.label].loras[0] for s in specs if images[s.label].loras), None)
    return RunReport(
        options=specs[0].options,
        model=ModelInfo(
            preset=manager.preset.name,
            transformer_quant=manager.preset.transformer_quant,
            t5_quant=manager.preset.t5_quant,
            dtype=str(manager.dtype).removeprefix("torch."),
            device=str(manager.device),
            weights=manager.weights_choice.format,
            weights_reason=manager.weights_choice.reason,
            compiled=manager.compile is not None,
            compile_setup=manager.compile.describe() if manager.compile else None,
        ),
        images=images,
        loras=[LoraSummary.of(e) for e in entries.values()],
        lora=LoraSummary.of(entries[first_use.name], first_use.strength) if first_use else None,
        strengths={label: (image.loras[0].strength if image.loras else None) for label, image in images.items()},
        text_encoder_lora=any(e.report.text_encoder for e in entries.values()),
        truncated_tokens=max((e.truncated_tokens for e in encodings), default=0),
        reused=stages,
        strategy=manager.strategy,
        events=list(manager.events),
        timeline=list(timeline.stages),
        seconds=time.perf_counter() - start,
        memory=manager.memory_report(),
        batches=passes,
        fast=FastSchedule.of(specs[0].options.steps) if specs[0].options.fast else None,
    )


def _observed(specs: list[ImageSpec], keys: dict, made: dict[str, list[int]]) -> dict[str, list[int] | None]:
    """Each fast image's skipped steps by label, from those of the images made (`made`, by label): an image asked
    twice is made once, under its first label, so its steps go to every label of its key; None for a cached one."""
    observed = {keys[label]: steps for label, steps in made.items()}
    return {spec.label: observed.get(keys[spec.label]) for spec in specs if spec.options.fast}


def _skipped(spec: ImageSpec, skipped: dict[str, list[int] | None]) -> list[int] | None:
    """A fast image's predicted steps: as observed when made now; from the cache, its schedule's, as the cache key
    holds `fast` and the step count, which decide the schedule."""
    if not spec.options.fast:
        return None
    observed = skipped[spec.label]
    return FastSchedule.of(spec.options.steps).predicted() if observed is None else observed
