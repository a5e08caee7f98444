"""The line under the studio's title while the model's files download at start-up (app.py --download-at-start)."""

from __future__ import annotations

from collections.abc import Callable

import gradio as gr

from fluxdemo.model.prefetch import PrefetchState
from fluxdemo.studio.guard import without_paths

REFRESH_SECONDS = 2.0
DownloadState = Callable[[], PrefetchState]  # Prefetch.state, or a stand-in in tests


def download_note(state: PrefetchState) -> str:
    """What a visitor reads: how far the download is, or why it stopped; nothing once the files are here."""
    total = f"{state.total_bytes / 1e9:.1f} GB"
    if state.error is not None:
        return (
            f"The model files ({total}) could not be downloaded at start-up: {without_paths(state.error)} "
            "The first run will try again."
        )
    if state.finished:
        return ""
    now = f" (now: {state.current.replace('_', ' ')})" if state.current else ""
    return (
        f"Downloading the model files: **{state.done_bytes / 1e9:.1f} of {total}**{now}. "
        "A run started now waits for them."
    )


def download_line(demo: gr.Blocks, state: DownloadState | None) -> None:
    """A Markdown line in the page being built (none without a start-up download), current on each page load and
    refreshed every REFRESH_SECONDS until the download has ended; the refresh skips the queue (it reads numbers)."""
    if state is None:
        return
    line, timer = gr.Markdown(visible=False), gr.Timer(REFRESH_SECONDS)

    def refresh() -> tuple:
        now = state()
        text = download_note(now)
        return gr.Markdown(text, visible=bool(text)), gr.Timer(active=not (now.finished or now.error))

    gr.on([demo.load, timer.tick], refresh, None, [line, timer], queue=False, api_visibility="private")
