"""LoRAs a visitor names on the Hub (download_lora): found in the repo at one pinned commit, size-checked three times
(listed, served, counted while they stream), and kept in this app's own cache folder under a quota. They never use
the operator's HF_TOKEN (only an opt-in LoRA token), and every failure is a HubError sentence."""

from __future__ import annotations

import logging
import os
import re
import shlex
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote, urljoin, urlsplit

import httpx2  # huggingface_hub 2.x's HTTP client: its transport errors are how "no network" reaches us
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from fluxdemo.errors import CancelledError, HubError
from fluxdemo.files import new_file_mode
from fluxdemo.lora.names import HubLoraRef
from fluxdemo.lora.names import parse_hub_lora as parse_hub_lora  # its home before lora/names.py
from fluxdemo.model.files import disk_size, hub_failure, human_size, offline_mode, safetensors_problem
from fluxdemo.untrusted import MAX_CARD_BYTES, MAX_FIELD_CHARS, capped, model_card, names_list, read_capped

logger = logging.getLogger(__name__)

# --- LoRAs from the Hub ---------------------------------------------------------------------------------------------

MAX_LORA_CANDIDATES = 8  # safetensors files whose headers are read to find the LoRA among them
MAX_LISTED_FILES = 1000  # a repo listing is read this far at most: LoRA repos hold a handful of files
HUB_LORA_QUOTA_BYTES = 4 * 2**30  # the Hub-LoRA cache's total; the least recently used files are deleted first
_COMMIT = re.compile(r"[0-9a-f]{40}")
_CHUNK = 1 << 20
_MAX_REDIRECTS = 5
_PARTIAL = ".partial-"  # a download in progress, renamed into place only when complete and checked
_STALE_PARTIAL_SECONDS = 3600
_CACHE_LOCK = threading.Lock()  # eviction and the bytes promised to downloads in progress must not interleave
_RESERVED: dict[Path, int] = {}  # cache root -> bytes that downloads in progress will add


@dataclass(frozen=True)
class HubLora:
    """A LoRA file downloaded into this app's Hub-LoRA cache, with what the repo's model card says about it."""

    ref: HubLoraRef  # with filename and revision (the commit) filled in
    path: Path
    trigger_words: list[str]
    example_prompts: list[str]


def hub_lora_cache_dir() -> Path:
    """Where Hub LoRAs are kept: $FLUXDEMO_CACHE/hub-loras, else ~/.cache/fluxdemo/hub-loras (as the tiny kits)."""
    root = os.environ.get("FLUXDEMO_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "fluxdemo") / "hub-loras"


def is_commit(revision: str | None) -> bool:
    return revision is not None and _COMMIT.fullmatch(revision) is not None


def download_lora(
    ref: HubLoraRef,
    is_lora: Callable[[list[str]], bool],
    max_bytes: int,
    *,
    token: str | None = None,
    cache_dir: Path | None = None,
    endpoint: str | None = None,
    quota_bytes: int = HUB_LORA_QUOTA_BYTES,
    cancelled: Callable[[], bool] | None = None,
) -> HubLora:
    """Find the LoRA file in a Hub repo (the named one, or the one .safetensors file whose keys `is_lora` accepts)
    at one pinned commit, check its size, and download it into this app's own Hub-LoRA cache (`cache_dir`, at most
    `quota_bytes`, least recently used files evicted first); every failure is a HubError sentence.

    `token` is a token for LoRAs only: None sends no token at all, never HF_TOKEN or the login file, which are the
    operator's for the model files. `cancelled` is asked between requests and between chunks (CancelledError)."""
    from huggingface_hub import HfApi

    hub = _LoraHub(HfApi(endpoint=endpoint, token=token or False), ref, token, endpoint, cancelled)
    cache = _LoraCache(Path(cache_dir) if cache_dir else hub_lora_cache_dir(), ref.repo_id, quota_bytes)
    try:
        commit = None if offline_mode() else _pin(hub)
        if commit is None:  # offline or unreachable: a file downloaded before, named exactly
            return cache.served(ref)
        hub.commit = commit
        files, complete = _listing(hub)
        filename = ref.filename or _pick_lora(hub, files, complete, is_lora)
        if filename not in files and complete:
            raise HubError(
                f"{_shown(ref.repo_id)} has no file {_shown(filename)}; its .safetensors files: "
                f"{names_list(sorted(f for f in files if f.lower().endswith('.safetensors')))}."
            )
        path = cache.fetch(hub, filename, files.get(filename), max_bytes, lora=True)
        words, prompts = _model_card(hub, cache, files.get("README.md"), complete)
        cache.remember(ref.revision, commit)
    except (HubError, CancelledError):
        raise
    except Exception as e:
        raise _lora_hub_error(e, ref) from None
    logger.info("LoRA %s from the Hub at %s: %s (%s)", ref, commit[:12], path.name, human_size(disk_size(path)))
    return HubLora(HubLoraRef(ref.repo_id, filename, commit), path, words, prompts)


@dataclass
class _LoraHub:
    """One LoRA request's view of the Hub: the client (no token unless a LoRA token is set), the pinned commit."""

    api: object
    ref: HubLoraRef
    token: str | None
    endpoint: str | None
    cancelled: Callable[[], bool] | None
    commit: str = ""

    def check_cancelled(self) -> None:
        if self.cancelled is not None and self.cancelled():
            raise CancelledError(f"Cancelled while getting {_shown(self.ref)} from the Hub; nothing was kept.")


def _pin(hub: _LoraHub) -> str | None:
    """The commit the revision names now (every later request reads that commit, so a push in between cannot swap
    files), or None when the Hub cannot be reached: one plain request, because huggingface_hub's listing retries an
    unreachable Hub five times with back-off (23 s) before it gives up. A missing, private or gated repo raises."""
    try:
        info = hub.api.model_info(
            hub.ref.repo_id,
            revision=hub.ref.revision or constants.DEFAULT_REVISION,
            timeout=constants.HF_HUB_ETAG_TIMEOUT,
        )
    except httpx2.TransportError as e:
        logger.info("The Hub could not be reached (%s); looking in the Hub-LoRA cache", e)
        return None
    if not is_commit(info.sha):
        raise HubError(f"The Hub named no commit for {_shown(hub.ref)}; try again in a few minutes.")
    return info.sha


def _listing(hub: _LoraHub) -> tuple[dict[str, int], bool]:
    """({.safetensors file or README.md: listed size}, whether the listing is complete): read lazily and stopped
    after MAX_LISTED_FILES entries, since a repo can hold millions of files."""
    files = {}
    for seen, entry in enumerate(hub.api.list_repo_tree(hub.ref.repo_id, revision=hub.commit, recursive=True), 1):
        if seen > MAX_LISTED_FILES:
            return files, False
        size = getattr(entry, "size", None)
        if size is not None and (entry.path.lower().endswith(".safetensors") or entry.path == "README.md"):
            files[entry.path] = size
    return files, True


def _pick_lora(hub: _LoraHub, files: dict[str, int], complete: bool, is_lora: Callable[[list[str]], bool]) -> str:
    repo = _shown(hub.ref.repo_id)
    if not complete:
        raise HubError(
            f"{repo} holds more than {MAX_LISTED_FILES:,} files; name the LoRA file: {repo}/file.safetensors."
        )
    files = {f: n for f, n in files.items() if f.lower().endswith(".safetensors")}
    if not files:
        raise HubError(f"{repo} holds no .safetensors file, so no LoRA this app can load.")
    candidates = sorted(files, key=lambda f: files[f])[:MAX_LORA_CANDIDATES]  # LoRAs are the small files
    loras = []
    for f in candidates:
        hub.check_cancelled()
        keys = hub.api.parse_safetensors_file_metadata(hub.ref.repo_id, f, revision=hub.commit).tensors
        if is_lora(list(keys)):
            loras.append(f)
    if not loras:
        raise HubError(
            f"{repo} has no LoRA: none of its .safetensors files ({names_list(candidates)}) holds LoRA weights."
        )
    if len(loras) > 1:
        choices = names_list([f"{repo}/{f} ({human_size(files[f])})" for f in loras])
        raise HubError(f"{repo} holds several LoRA files; name the one you want: {choices}.")
    return loras[0]


def _model_card(hub: _LoraHub, cache: _LoraCache, listed: int | None, complete: bool) -> tuple[list[str], list[str]]:
    """(trigger words, example prompts) from the repo's README.md front matter, when it is small enough: a card
    over MAX_CARD_BYTES (listed, served or counted) is no card, not an error."""
    if (listed is None and complete) or (listed or 0) > MAX_CARD_BYTES:
        return [], []
    try:
        path = cache.fetch(hub, "README.md", listed, MAX_CARD_BYTES, lora=False)
    except CancelledError:
        raise
    except Exception:  # no card, or an unusable one: the LoRA itself is what was asked for
        return [], []
    return _card_fields(path)


def _card_fields(path: Path) -> tuple[list[str], list[str]]:
    text = read_capped(path, MAX_CARD_BYTES) if path.is_file() else None
    card = model_card(text or "")
    return list(card.trigger_words), list(card.example_prompts)


class _LoraCache:
    """This app's own cache of Hub LoRAs, apart from the Hugging Face cache: <root>/<owner>--<repo>/<commit>/<file>
    and <root>/<owner>--<repo>/refs/<revision> (the commit last used for a branch or tag, for offline use). Its
    total is kept under `quota` by deleting the least recently used files (last use: their access time)."""

    def __init__(self, root: Path, repo_id: str, quota: int) -> None:
        self.root, self.quota = root, quota
        self.repo = root / repo_id.replace("/", "--")  # one path component, whatever the repo id holds

    def path(self, commit: str, filename: str) -> Path:
        path = self.repo / commit / filename
        if (
            not is_commit(commit)
            or ".." in PurePosixPath(filename).parts
            or not path.resolve().is_relative_to(self.repo.resolve())
        ):
            raise HubError(f"{_shown(filename)} is not a file name this app stores; name a plain file in the repo.")
        return path

    def served(self, ref: HubLoraRef) -> HubLora:
        """A file downloaded before for this name, without any request; LocalEntryNotFoundError when there is none."""
        commit = ref.revision if is_commit(ref.revision) else self._ref(ref.revision)
        if not ref.filename or commit is None or not self.path(commit, ref.filename).is_file():
            raise LocalEntryNotFoundError(f"{ref} is not in the Hub-LoRA cache")
        path = self.path(commit, ref.filename)
        mark_used(path)
        return HubLora(HubLoraRef(ref.repo_id, ref.filename, commit), path, *_card_fields(path.parent / "README.md"))

    def remember(self, revision: str | None, commit: str) -> None:
        refs = self.repo / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        (refs / quote(revision or constants.DEFAULT_REVISION, safe="")).write_text(commit)

    def _ref(self, revision: str | None) -> str | None:
        try:
            commit = (self.repo / "refs" / quote(revision or constants.DEFAULT_REVISION, safe="")).read_text()
        except OSError:
            return None
        return commit if is_commit(commit) else None

    def fetch(self, hub: _LoraHub, filename: str, listed: int | None, limit: int, *, lora: bool) -> Path:
        """The file at the pinned commit: from this cache, or downloaded when its listed and served sizes are within
        `limit` (and then counted, as sizes can lie)."""
        path = self.path(hub.commit, filename)
        if path.is_file():
            mark_used(path)
            return path
        hub.check_cancelled()
        url = hf_hub_url(hub.ref.repo_id, filename, revision=hub.commit, endpoint=hub.endpoint)
        what = f"{_shown(hub.ref.repo_id)}/{_shown(filename)}"
        _within(what, listed, limit, lora)  # the listing first: a whole model costs no further request
        served = get_hf_file_metadata(url, token=hub.token or False, endpoint=hub.endpoint).size
        _within(what, served, limit, lora)
        with self._room(served or listed or limit, what):
            _stream(hub, url, path, limit, lora)
        return path

    @contextmanager
    def _room(self, size: int, what: str) -> Iterator[None]:
        """Evict least recently used files until `size` more bytes fit the quota, and hold them while downloading."""
        if size > self.quota:
            raise HubError(
                f"{what} is {human_size(size)}, more than the {human_size(self.quota)} this app keeps for Hub "
                "LoRAs; put the file in the LoRA folder instead."
            )
        with _CACHE_LOCK:
            files = _cached_files(self.root)
            total = sum(st.st_size for _, st in files) + _RESERVED.get(self.root, 0)
            for path, st in sorted(files, key=lambda f: f[1].st_atime_ns):
                if total + size <= self.quota:
                    break
                path.unlink(missing_ok=True)
                total -= st.st_size
                logger.info("Hub-LoRA cache over its quota: deleted %s, used least recently", path)
            _RESERVED[self.root] = _RESERVED.get(self.root, 0) + size
        try:
            yield
        finally:
            with _CACHE_LOCK:
                _RESERVED[self.root] -= size


def _within(what: str, size: int | None, limit: int, lora: bool) -> None:
    if size is not None and size > limit:
        raise HubError(
            f"{what} is {human_size(size)}, over the {human_size(limit)} limit for "
            f"{'a LoRA; it is probably a whole model, not a LoRA' if lora else 'a model card'}."
        )


def _cached_files(root: Path) -> list[tuple[Path, os.stat_result]]:
    """The cache's files (not its refs); a partial download older than an hour is a crashed one, and deleted."""
    found = []
    for path in root.glob("*/*/**/*"):
        try:
            st = path.lstat()
        except OSError:  # deleted meanwhile by another download's eviction
            continue
        if not stat.S_ISREG(st.st_mode) or path.relative_to(root).parts[1] == "refs":
            continue
        if path.name.startswith(_PARTIAL):
            if time.time() - st.st_mtime > _STALE_PARTIAL_SECONDS:
                path.unlink(missing_ok=True)
            continue  # one in progress is counted by its reservation
        found.append((path, st))
    return found


def mark_used(path: Path) -> None:
    """Mark a use: the access time orders eviction; the modification time stays, as it identifies the file."""
    with suppress(OSError):  # evicted meanwhile: it is downloaded again when next asked for
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))


def _stream(hub: _LoraHub, url: str, dest: Path, limit: int, lora: bool) -> None:
    """Download `url` into `dest`, counting bytes as they arrive and stopping past `limit`: hf_hub_download cannot
    stop a file whose listed and served sizes lie. A partial or refused file never stays behind."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_PARTIAL, dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, _response(hub, url) as response:
            for chunk in response.iter_bytes(_CHUNK):
                hub.check_cancelled()
                out.write(chunk)
                if out.tell() > limit:
                    what = "a LoRA" if lora else "a model card"
                    raise HubError(
                        f"{_shown(hub.ref)} sent more than the {human_size(limit)} limit for {what}; the download was "
                        "stopped and deleted."
                    )
        problem = safetensors_problem(tmp, tmp.stat().st_size) if lora else None
        if problem:
            raise HubError(
                f"{_shown(hub.ref)} is not a usable safetensors file: {problem}. It was deleted; ask its "
                "author for a working file."
            )
        os.chmod(tmp, new_file_mode())  # as any file the user saves, not mkstemp's 0600
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _response(hub: _LoraHub, url: str) -> Iterator[httpx2.Response]:
    """The GET response for a file: redirects on the Hub's own host are followed, and one redirect off it (to its
    CDN), never more, so the Hub cannot send the server on to a third host; the LoRA token goes to the Hub only."""
    hub_host = urlsplit(url).netloc
    for _ in range(_MAX_REDIRECTS):
        on_hub = urlsplit(url).netloc == hub_host
        headers = build_hf_headers(token=(hub.token or False) if on_hub else False)
        with get_session().stream(
            "GET", url, headers=headers, follow_redirects=False, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
        ) as response:
            location = response.headers.get("Location")
            if response.is_redirect and location and on_hub:
                url = urljoin(url, location)
                continue
            if response.is_redirect:
                raise HubError(
                    f"The Hub's download server sent {_shown(hub.ref)} on to another address, which this "
                    "app does not follow; try again in a few minutes."
                )
            hf_raise_for_status(response)
            yield response
            return
    raise HubError(f"The Hub redirected {_shown(hub.ref)} too many times; try again in a few minutes.")


def _shown(text: object) -> str:
    """A visitor's name inside a sentence, cut: a name can be megabytes long."""
    return capped(str(text), MAX_FIELD_CHARS)


def download_command(ref: HubLoraRef) -> str:
    """The huggingface_hub command that fetches the LoRA into a folder: what to run when this app cannot."""
    what = shlex.quote(ref.filename) if ref.filename else "--include '*.safetensors'"
    revision = f" --revision {shlex.quote(ref.revision)}" if ref.revision else ""
    return _shown(f"hf download {shlex.quote(ref.repo_id)} {what}{revision} --local-dir LORA_FOLDER")


def _lora_hub_error(error: Exception, ref: HubLoraRef) -> HubError:
    """The sentence for a failed Hub LoRA; it never says whether this server holds a token."""
    page = f"https://huggingface.co/{_shown(ref.repo_id)}"
    kind, status = hub_failure(error)
    if kind == "gated":
        return HubError(
            f"{_shown(ref.repo_id)} is a gated repository, which this app does not open: accept its "
            f"terms at {page}, download the LoRA yourself and upload the .safetensors file."
        )
    # The Hub answers 401 for a missing repo and for a private one alike; so do we
    if kind in ("no-repo", "unauthorized"):
        return HubError(
            f"There is no repository {_shown(ref.repo_id)} on the Hub (or it is private). Check the name at {page}."
        )
    if kind == "no-revision":
        return HubError(
            f"{_shown(ref.repo_id)} has no revision {_shown(ref.revision)!r} (no branch, tag or commit "
            f"of that name); see its branches and tags at {page}/tree/main."
        )
    if kind == "no-file":
        return HubError(
            f"{_shown(ref.repo_id)} has no file {_shown(ref.filename)}; see its files at {page}/tree/main."
        )
    if kind == "unreachable":
        why, fix = (
            ("offline mode is on (HF_HUB_OFFLINE=1)", "Run it again with HF_HUB_OFFLINE=0 to fetch it")
            if offline_mode()
            else ("the Hub could not be reached", "Try again once the Hub can be reached")
        )
        return HubError(
            f"{_shown(ref)} is not among the Hub LoRAs this app downloaded before, and {why}. {fix} (a LoRA named "
            "with its file, user/repo/file.safetensors, is then kept for offline use), or, on a machine that reaches "
            f"the Hub, put the file in the LoRA folder: {download_command(ref)}"
        )
    if kind == "disk-full":
        return HubError(
            f"The disk is full: {_shown(ref)} could not be stored. Try again later, or put the "
            ".safetensors file in the LoRA folder."
        )
    if status is not None:
        return HubError(f"The Hub answered HTTP {status} for {_shown(ref)}; try again in a few minutes.")
    return HubError(f"Getting {_shown(ref)} from the Hub failed ({type(error).__name__}); try again.")
