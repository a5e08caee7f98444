"""The LoRA folder as the page sees it: the pickers, uploads, Hub downloads and the LoRA report."""

from __future__ import annotations

import logging
from pathlib import Path

import gradio as gr

from fluxdemo.errors import FluxdemoError, OptionsError
from fluxdemo.lora import LoraLibrary, LoraReport, save_upload
from fluxdemo.studio.guard import for_people, without_paths
from fluxdemo.studio.handlers import CancelFlags
from fluxdemo.studio.render import lora_card
from fluxdemo.untrusted import MAX_SENTENCE_CHARS, markdown_text

logger = logging.getLogger(__name__)
NONE, NONE_LABEL = "", "none: the base model"  # the pickers' choice of no LoRA (Generate then makes a base image)


class LoraFiles:
    """The handlers of the LoRA pickers; a Hub download stops on the session's Cancel."""

    def __init__(self, library: LoraLibrary, max_upload_bytes: int, cancel_flags: CancelFlags) -> None:
        self.library = library
        self.max_upload_bytes = max_upload_bytes
        self.cancel_flags = cancel_flags

    def lora_choices(self, value: str | None = None) -> dict:
        """The LoRA folder as dropdown settings: choices (library names), and `value` kept when it is still there."""
        entries = self.library.entries
        names = [e.name for e in entries if e.refused is None]
        refused = [e for e in entries if e.refused is not None]
        info = f"{len(names)} in {self.library.folder.name}/"  # never the absolute path: the page is public
        if refused:
            info += f"; not listed: {', '.join(e.name for e in refused[:3])} (see the server log)"
        if value != NONE and value not in names:  # a LoRA gone from the folder: the first usable one instead
            value = next((e.name for e in entries if e.usable), names[0] if names else None)
        return dict(choices=[(NONE_LABEL, NONE), *names], value=value, info=info)

    @for_people
    def refresh_loras(self, current: str | None) -> gr.Dropdown:
        """The dropdown after a look at the LoRA folder (files added, changed or removed since)."""
        for entry in self.library.refresh():
            if entry.refused:
                logger.warning("LoRA folder: %s not listed: %s", entry.name, entry.refused)
        return gr.Dropdown(**self.lora_choices(current))

    def refresh_pickers(self, first: str | None, *others: str | None) -> list:
        """Every LoRA picker of the stack after a look at the folder; the rows below the first keep an empty
        choice."""
        names = self.lora_choices()["choices"]
        return [self.refresh_loras(first)] + [
            gr.Dropdown(choices=names, value=v if v in names else "") for v in others
        ]

    @for_people
    def upload_lora(self, file: str | None) -> str:
        """Store an uploaded .safetensors LoRA in the LoRA folder -> its name there (a known file keeps its name)."""
        if not file:
            raise gr.Error("Choose a .safetensors LoRA file to upload.", print_exception=False)
        src = Path(file)
        path = save_upload(src, self.library.folder, src.name, self.max_upload_bytes)
        if self._fits(path.name):
            gr.Info(f"Saved {src.name} as {path.name}.")
        else:
            gr.Warning(
                f"Saved {src.name} as {path.name}, but it does not fit this model (its card says why): it is listed, "
                "not picked, and Compare refuses it."
            )
        return path.name

    @for_people
    def hub_lora(self, ref: str | None, request: gr.Request) -> str:
        """A LoRA from the Hugging Face Hub (user/repo, user/repo/file.safetensors, @revision, or its URL): found,
        size-checked, downloaded into the app's Hub LoRA cache and inspected -> the name that picks it. Cancel stops
        the download."""
        ref = (ref or "").strip()
        if not ref:
            raise gr.Error(
                "Type a Hub repo id such as user/repo (or user/repo/file.safetensors), or its URL.",
                print_exception=False,
            )
        with self.cancel_flags.watch(request) as cancelled:
            (entry,) = self.library.prefetch([ref], cancelled.is_set)
        gr.Info(f"{ref}: a {entry.report.format} LoRA, ready to pick.")
        return ref

    def pick(self, name: str, first: str | None, *others: str | None) -> list:
        """The pickers after an upload or a Hub download: the folder listed again (its count too), and the new LoRA
        in the first one when it fits the model; one that does not is listed, not picked (upload_lora said why)."""
        pickers = self.refresh_pickers(first, *others)
        if not self._fits(name):
            return pickers
        shown = self.lora_choices()
        names = shown["choices"]
        pickers[0] = gr.Dropdown(**{**shown, "choices": names if name in names else [*names, name], "value": name})
        return pickers

    def _fits(self, name: str) -> bool:
        try:
            report = self.library.get(name).report
        except FluxdemoError:
            return False
        return report is None or report.compatible

    @for_people
    def inspect_lora(self, lora: str | None) -> dict:
        """The LoRA report (format, rank, alpha, targets, trigger words, problems, ...) of a name in the folder."""
        report = self.report(lora)
        return report.to_dict() if report else {}

    def report(self, lora: str | None) -> LoraReport | None:
        if not lora:
            return None
        if self.library.is_hub_name(lora) and not self.library.fetched(lora):  # inspecting never downloads
            raise OptionsError(f'{lora} is a Hub LoRA not downloaded yet: press "Use a LoRA from the Hub" first.')
        return self.library.get(lora).report

    def stack_card(self, *names: str | None) -> str:
        """The card of every LoRA of the stack, in the pickers' order."""
        cards = [self._card(name) for name in names if name]
        return "\n\n---\n\n".join(cards) if cards else lora_card(None)

    def _card(self, name: str) -> str:
        if self.library.is_hub_name(name) and not self.library.fetched(name):
            sentence = 'A Hub LoRA not downloaded yet: press "Use a LoRA from the Hub" with its name.'
        else:
            try:
                return lora_card(self.library.get(name).report)
            except FluxdemoError as e:
                sentence = without_paths(str(e))
        return f"### {markdown_text(name)}\n\n- **Problem:** {markdown_text(sentence, MAX_SENTENCE_CHARS)}"
