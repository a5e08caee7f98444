"""A preset's Hub files fetched in the background at start-up, and how far that has got.

On a GPU Space the model's 18 GB would otherwise download on the first visitor's first Compare, inside the GPU slot.
Started at launch, the download runs while the page is already up, the page says how far it is, and the first run
finds the files in the Hugging Face cache. A run that starts earlier waits on huggingface_hub's lock for the file
being fetched instead of fetching it twice.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

from fluxdemo.errors import FluxdemoError
from fluxdemo.model.files import download_preset
from fluxdemo.model.presets import Preset

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefetchState:
    """Where the start-up download stands; sizes are the preset's (known before any file arrives)."""

    done_bytes: int
    total_bytes: int
    current: str | None  # the component being fetched now
    finished: bool
    error: str | None  # the sentence of a failure; the first run then tries again itself


class Prefetch:
    """Fetches a preset's files on a thread of its own; `state()` is safe to call from any thread."""

    def __init__(
        self, preset: Preset, *, token: str | None = None, cache_dir: Path | None = None, endpoint: str | None = None
    ) -> None:
        self.preset = preset
        # Only Hub files count: local overrides, kits and the packaged configs are already on this machine.
        self._sizes = {
            name: source.approx_bytes
            for name, source in preset.sources().items()
            if source.repo_id is not None and source.local is None
        }
        self._options = dict(token=token, cache_dir=cache_dir, endpoint=endpoint)
        self._lock = threading.Lock()
        self._done: list[str] = []
        self._current: str | None = None
        self._finished = False
        self._error: str | None = None
        self._thread = threading.Thread(target=self._run, name="fluxdemo-prefetch", daemon=True)

    @property
    def needed(self) -> bool:
        """Whether the preset has any file on the Hub (a tiny kit or local files have none)."""
        return bool(self._sizes)

    def start(self) -> Prefetch:
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def state(self) -> PrefetchState:
        with self._lock:
            done, current, finished, error = (
                sum(self._sizes[n] for n in self._done),
                self._current,
                self._finished,
                self._error,
            )
        partly = self._written(current) if current in self._sizes and error is None else 0
        return PrefetchState(done + partly, sum(self._sizes.values()), current, finished, error)

    def _written(self, component: str) -> int:
        """The bytes of the file being fetched that are on disk already. huggingface_hub tells its progress only to
        tqdm bars, which differ between its HTTP and Xet downloads; both write the file as `blobs/*.incomplete` in
        the repo's cache folder first, so this counts that file's allocated blocks (right even if written sparsely)."""
        repo = self.preset.sources()[component].repo_id
        cache = Path(self._options["cache_dir"] or constants.HF_HUB_CACHE)
        blobs = cache / repo_folder_name(repo_id=repo, repo_type="model") / "blobs"
        written = 0
        for part in blobs.glob("*.incomplete"):
            with contextlib.suppress(OSError):  # renamed into place between the listing and the stat
                written += part.stat().st_blocks * 512
        return min(written, self._sizes[component])

    def _advance(self, component: str | None, finished: bool = False) -> None:
        """The file being fetched was done: on to `component` (None: none, at the end)."""
        with self._lock:
            if self._current in self._sizes:
                self._done.append(self._current)
            self._current, self._finished = component, finished

    def _run(self) -> None:
        try:
            download_preset(self.preset, on_file=self._advance, **self._options)
        except FluxdemoError as e:
            logger.error("The start-up download of %s failed: %s", self.preset.name, e)
            with self._lock:
                self._error = str(e)
            return
        except Exception as e:  # a thread's failure is otherwise silent: say it, and leave the first run to retry
            logger.exception("The start-up download of %s failed", self.preset.name)
            with self._lock:
                self._error = f"An unexpected error ({type(e).__name__}); the details are in the server log."
            return
        self._advance(None, finished=True)
