"""The LoRA folder, scanned recursively and cached by (size, mtime), and LoRAs named by a Hub repo (HubLoras: the
operator's policy for them)."""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from fluxdemo.errors import CancelledError, HubError, LoraError
from fluxdemo.lora.convert import inspect_lora
from fluxdemo.lora.hub import HUB_LORA_QUOTA_BYTES, download_lora, mark_used
from fluxdemo.lora.keys import split_role
from fluxdemo.lora.names import LORA_SUFFIX, HubLoraRef, parse_hub_lora
from fluxdemo.lora.report import REPORT_MAX_ITEMS, LoraReport, bounded, flux_dev_dims
from fluxdemo.lora.upload import MAX_UPLOAD_BYTES
from fluxdemo.lru import LRU
from fluxdemo.model.names import FluxDims
from fluxdemo.untrusted import MAX_FIELD_CHARS, capped, names_list

logger = logging.getLogger(__name__)

HUB_MEMO_ENTRIES = 64  # Hub LoRAs remembered by name (a visitor can name as many as they like)
REFUSED_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
# --- discovery --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraEntry:
    """One file in the LoRA folder: inspected (report), or refused without being opened / unreadable (refused)."""

    name: str  # path relative to the folder, posix
    path: Path
    size: int
    mtime_ns: int
    sha256: str | None = None
    report: LoraReport | None = None
    refused: str | None = None

    @property
    def usable(self) -> bool:
        return self.report is not None and self.report.compatible

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "usable": self.usable,
            "refused": self.refused,
            "report": self.report.to_dict() if self.report else None,
        }


@dataclass(frozen=True)
class HubLoras:
    """The operator's policy for LoRAs named by a Hub repo (app.py's flags, never a visitor's): LoraLibrary's hub
    arguments, carried as one value from the flags to the library."""

    enabled: bool = True
    max_bytes: int = MAX_UPLOAD_BYTES
    quota_bytes: int = HUB_LORA_QUOTA_BYTES
    token: str | None = None  # for LoRAs only; the operator's HF_TOKEN is never sent for a visitor's LoRA
    cache: Path | None = None  # default: hub_lora_cache_dir()
    endpoint: str | None = None  # default: HF_ENDPOINT

    def library_args(self) -> dict:
        return dict(
            hub=self.enabled,
            hub_max_bytes=self.max_bytes,
            hub_endpoint=self.endpoint,
            hub_cache=self.cache,
            hub_quota_bytes=self.quota_bytes,
            hub_token=self.token,
        )


class LoraLibrary:
    """The LoRA folder, scanned recursively; entries are cached by (size, mtime) and re-inspected only on change."""

    def __init__(
        self,
        folder: Path,
        dims: FluxDims | None = None,
        clip_config: Mapping | None = None,
        *,
        hub: bool = True,
        hub_max_bytes: int = MAX_UPLOAD_BYTES,
        hub_endpoint: str | None = None,
        hub_cache: Path | None = None,
        hub_quota_bytes: int = HUB_LORA_QUOTA_BYTES,
        hub_token: str | None = None,
    ) -> None:
        """`hub`: whether names of Hub repos are fetched at all (HF_HUB_OFFLINE aside); `hub_max_bytes`: one Hub
        LoRA's limit; `hub_cache` (default hub_lora_cache_dir()) and `hub_quota_bytes`: their own cache folder and its
        total; `hub_token`: a token for LoRAs only (None: none is sent; HF_TOKEN is the operator's, never used)."""
        self.folder = Path(folder)
        self.dims = dims or flux_dev_dims()
        self.clip_config = clip_config
        self.hub, self.hub_max_bytes, self.hub_endpoint, self.hub_cache = hub, hub_max_bytes, hub_endpoint, hub_cache
        self.hub_quota_bytes, self.hub_token = hub_quota_bytes, hub_token
        self._hub = LRU(HUB_MEMO_ENTRIES)  # Hub reference -> its entry
        self._hub_lock = threading.Lock()
        self._index: dict[str, LoraEntry] = {}
        self._lock = threading.Lock()

    @property
    def entries(self) -> list[LoraEntry]:
        return [self._index[n] for n in sorted(self._index)]

    def refresh(self) -> list[LoraEntry]:
        with self._lock:
            root = self.folder.resolve()
            found: dict[str, LoraEntry] = {}
            # followlinks=False: a linked folder could lead anywhere; linked files are checked one by one below.
            for dirpath, dirnames, filenames in os.walk(root) if root.is_dir() else ():
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for filename in sorted(f for f in filenames if not f.startswith(".")):  # .upload-*.tmp, caches
                    path = Path(dirpath) / filename
                    if path.suffix.lower() != ".safetensors" and path.suffix.lower() not in REFUSED_SUFFIXES:
                        continue
                    name = path.relative_to(root).as_posix()
                    try:
                        st = path.stat()
                    except OSError:  # a dangling link
                        continue
                    if not stat.S_ISREG(st.st_mode):  # a FIFO named *.safetensors would block the scan when opened
                        continue
                    old = self._index.get(name)
                    same = old is not None and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns)
                    found[name] = old if same else self._scan(root, path, name, st)
            self._index = found
            usable = sum(e.usable for e in found.values())
            logger.info("LoRA folder %s: %d files, %d usable", self.folder, len(found), usable)
            return self.entries

    def _scan(self, root: Path, path: Path, name: str, st: os.stat_result) -> LoraEntry:
        entry = LoraEntry(name, path, st.st_size, st.st_mtime_ns)
        if not path.resolve().is_relative_to(root):
            return dataclasses.replace(entry, refused="a link leading outside the LoRA folder; not opened")
        if path.suffix.lower() in REFUSED_SUFFIXES:
            return dataclasses.replace(
                entry,
                refused=f"{path.suffix} files are pickles, which can run code when "
                "loaded; never opened. Use the .safetensors release of this LoRA",
            )
        try:
            report = inspect_lora(path, self.dims, clip_config=self.clip_config)
        except (LoraError, OSError) as e:
            return dataclasses.replace(entry, refused=str(e))
        return dataclasses.replace(entry, sha256=report.sha256, report=report)

    def get(self, name: str) -> LoraEntry:
        """The entry for a name relative to the folder, or for a Hub reference (user/repo[/file.safetensors][@rev] or
        a huggingface.co URL) not found in the folder; unsafe or unknown names raise LoraError, opening nothing."""
        entry = self._local(name)
        if entry is None:
            ref = parse_hub_lora(name)
            if ref is not None:
                return self._from_hub(name, ref)
            names = names_list([e.name for e in self.entries if e.usable])
            raise LoraError(
                f"No LoRA named {capped(name, MAX_FIELD_CHARS)!r} in the LoRA folder {self.folder}; "
                f"available: {names}."
            )
        if not entry.path.resolve().is_relative_to(self.folder.resolve()):
            raise LoraError(f"{name!r} is a link leading outside the LoRA folder {self.folder}; not opened.")
        if entry.refused:
            raise LoraError(f"{name}: {entry.refused}")
        return entry

    def _local(self, name: str) -> LoraEntry | None:
        """The folder's entry for a name, with or without its .safetensors (as the CLI and the studio's rows write
        it), rescanning when it is new or changed; LoraError for an unsafe name."""
        pure = PurePosixPath(name)
        if not name or "\\" in name or "\x00" in name or pure.is_absolute() or ".." in pure.parts:
            raise LoraError(
                f"{capped(name, MAX_FIELD_CHARS)!r} is not a LoRA name: give a path inside the LoRA "
                f"folder {self.folder}."
            )
        keys = [pure.as_posix()]
        if not name.lower().endswith(LORA_SUFFIX):
            keys.append(keys[0] + LORA_SUFFIX)
        if all(k not in self._index for k in keys) or any(_changed(self._index[k]) for k in keys if k in self._index):
            self.refresh()  # new, edited or deleted since the last scan
        return next((self._index[k] for k in keys if k in self._index), None)

    def is_hub_name(self, name: str, scan: bool = True) -> bool:
        """Whether get(name) goes to the Hub: a Hub reference that names no file in the LoRA folder. No network,
        so a caller can fetch Hub LoRAs (prefetch) before it queues the GPU work that uses them; with scan=False
        not even the disk (the folder as last scanned), for callers in the server's event loop."""
        if not scan:
            key = PurePosixPath(name).as_posix()
            local = key in self._index or key + LORA_SUFFIX in self._index
            return not local and parse_hub_lora(name) is not None
        try:
            return self._local(name) is None and parse_hub_lora(name) is not None
        except LoraError:
            return False

    def fetched(self, name: str) -> bool:
        """Whether a Hub name is downloaded and inspected already (prefetch), so get() needs no network."""
        with self._hub_lock:
            return _memo_key(name) in self._hub

    def prefetch(self, names: Iterable[str], cancelled: Callable[[], bool] | None = None) -> list[LoraEntry]:
        """Download and inspect the Hub LoRAs among `names` (folder names are skipped), so that get() later finds
        them without network; `cancelled` is asked between files and between chunks (CancelledError)."""
        entries = []
        for name in names:
            if cancelled is not None and cancelled():
                raise CancelledError("Cancelled while getting LoRAs from the Hub.")
            if self.is_hub_name(name):
                entries.append(self._from_hub(name, parse_hub_lora(name), cancelled))
        return entries

    def _from_hub(self, name: str, ref: HubLoraRef, cancelled: Callable[[], bool] | None = None) -> LoraEntry:
        if not self.hub:
            raise LoraError(
                f"LoRAs from the Hub are turned off on this app; put the .safetensors file of "
                f"{capped(name, MAX_FIELD_CHARS)} in the LoRA folder (or upload it) instead, or start the app with "
                "--hub-loras on (FLUXDEMO_HUB_LORAS=on)."
            )
        key = _memo_key(name)
        with self._hub_lock:
            cached = self._hub.get(key)
            if cached is not None and not _changed(cached):
                mark_used(cached.path)
                return cached if cached.name == name else dataclasses.replace(cached, name=name)  # as spelt here
        try:
            got = download_lora(
                ref,
                _has_lora_keys,
                self.hub_max_bytes,
                token=self.hub_token,
                cache_dir=self.hub_cache,
                endpoint=self.hub_endpoint,
                quota_bytes=self.hub_quota_bytes,
                cancelled=cancelled,
            )
        except HubError as e:
            raise LoraError(str(e)) from None
        try:
            report = inspect_lora(got.path, self.dims, clip_config=self.clip_config)
        except LoraError:
            got.path.unlink(missing_ok=True)  # a file that fails inspection must not fill the cache
            raise
        # The file's own trigger words win; many Hub LoRAs carry theirs only in the model card (instance_prompt).
        report = dataclasses.replace(
            report,
            name=str(dataclasses.replace(got.ref, revision=ref.revision)),
            trigger_words=report.trigger_words or got.trigger_words,
            # what every client is shown anyway: a file with a million keys made each memo entry 90 MiB
            matched=bounded(report.matched, REPORT_MAX_ITEMS - 1),
            unmatched=bounded(report.unmatched, REPORT_MAX_ITEMS - 1),
        )
        st = got.path.stat()
        entry = LoraEntry(name, got.path, st.st_size, st.st_mtime_ns, report.sha256, report)
        with self._hub_lock:
            self._hub.put(key, entry)
        return entry


def _memo_key(name: str) -> str:
    """One memo entry for the spellings of one Hub reference (a repo id and its URL)."""
    ref = parse_hub_lora(name)
    return name if ref is None else str(ref)


def _has_lora_keys(keys: list[str]) -> bool:
    """Whether tensor names look like an adapter's (any format we read), from a header alone."""
    return any(split_role(k) is not None or ".processor." in k for k in keys)


def _changed(entry: LoraEntry) -> bool:
    try:
        st = entry.path.stat()
    except OSError:
        return True
    return (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns)
