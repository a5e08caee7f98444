"""Getting a preset's files: a local override, the tiny kit, or the Hugging Face Hub through its own cache.

Everything Hub-related goes through huggingface_hub (hf_hub_download for files, snapshot_download for folders), so
its cache (HF_HOME / HF_HUB_CACHE), its tqdm progress bars, HF_TOKEN and HF_HUB_OFFLINE all work as users expect.
Every Hub failure becomes a HubError whose message says what to do; a file that arrives but is not what the preset
expects becomes a ModelFileError. One log line per file says where it came from, how big it is and how long it took.

LoRAs a visitor names on the Hub are another matter (download_lora): they never use the operator's HF_TOKEN, are
read at one pinned commit, counted while they stream, and kept in this app's own cache folder under a quota.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
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
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

from fluxdemo.config import CLI_FLAGS, COMPONENTS, Preset, Source
from fluxdemo.errors import CancelledError, HubError, ModelFileError
from fluxdemo.files import new_file_mode
from fluxdemo.untrusted import MAX_CARD_BYTES, MAX_FIELD_CHARS, capped, model_card, names_list, read_capped

logger = logging.getLogger(__name__)

TOKENS_URL = "https://huggingface.co/settings/tokens"

# What a folder source must hold to be usable: any one of the alternatives, each a set of files.
FOLDER_CONTENTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "tokenizer": (("vocab.json", "merges.txt"), ("tokenizer.json",)),  # CLIP: slow or fast tokenizer
    "tokenizer_2": (("tokenizer.json",), ("spiece.model",)),  # T5: fast or sentencepiece tokenizer
    "config_dir": (("transformer/config.json",),),
}

# A safetensors header beyond this is a corrupt length field, not a real header (real ones are a few MB at most).
_MAX_SAFETENSORS_HEADER = 100_000_000


@dataclass(frozen=True)
class FileReport:
    """One component's file as fetched: where it lies, how it got there, and whether its contents were checked."""

    component: str
    path: Path
    bytes: int
    seconds: float
    origin: str  # "cache" (already in the Hugging Face cache), "download", "local" (an override) or "kit"
    verified: bool  # True when the contents were checked (GGUF magic, safetensors header, folder files)


@dataclass(frozen=True)
class DownloadReport:
    preset: str
    files: tuple[FileReport, ...]

    @property
    def total_bytes(self) -> int:
        return sum(f.bytes for f in self.files)

    @property
    def seconds(self) -> float:
        return sum(f.seconds for f in self.files)

    def describe(self) -> str:
        """A table for the console: a total line, then one line per file (origin, size, seconds, check, path)."""
        width = max((len(f.component) for f in self.files), default=0)
        lines = [f"preset {self.preset}: {len(self.files)} files, {_human(self.total_bytes)}, {self.seconds:.1f} s"]
        for f in self.files:
            check = "verified" if f.verified else "present"
            size = _human(f.bytes)
            lines.append(
                f"  {f.component:<{width}}  {f.origin:<8}  {size:>8}  {f.seconds:7.1f} s  {check:<8}  {f.path}"
            )
        return "\n".join(lines)


def resolve(
    source: Source,
    *,
    token: str | None = None,
    offline: bool | None = None,
    component: str = "file",
    preset: str = "<preset>",
    cache_dir: Path | None = None,
    endpoint: str | None = None,
) -> Path:
    """A local file (or folder, for folder sources) holding this source, fetched from the Hub if need be.

    `token` overrides HF_TOKEN; `offline` overrides HF_HUB_OFFLINE (None: read it now); `component` and `preset`
    only make the error messages precise; `cache_dir` and `endpoint` default to huggingface_hub's (HF_HUB_CACHE,
    HF_ENDPOINT). Raises HubError when the Hub cannot deliver, ModelFileError when the file is not usable.
    """
    return _fetch(source, component, preset, token, offline, cache_dir, endpoint).path


def download_preset(
    preset: Preset, *, token: str | None = None, cache_dir: Path | None = None, endpoint: str | None = None
) -> DownloadReport:
    """Fetch and verify every file of a preset; files already in the cache are checked, not downloaded again."""
    sources = preset.sources()
    # Smallest first: the gated files are the small ones, so a licence or token problem shows up in seconds,
    # not after 18 GB of transformer and T5.
    order = sorted(sources, key=lambda n: sources[n].approx_bytes)
    files = tuple(_fetch(sources[n], n, preset.name, token, None, cache_dir, endpoint) for n in order)
    report = DownloadReport(preset=preset.name, files=files)
    logger.info("preset %s: %d files, %s, %.1f s", preset.name, len(files), _human(report.total_bytes), report.seconds)
    return report


def _fetch(
    source: Source,
    component: str,
    preset: str,
    token: str | None,
    offline: bool | None,
    cache_dir: Path | None,
    endpoint: str | None,
) -> FileReport:
    start = time.perf_counter()
    if source.local is not None:
        path, origin = _from_local(source, component), "local"
    elif source.kit is not None:
        path, origin = _from_kit(source, component), "kit"
    else:
        offline = _offline_mode() if offline is None else offline
        try:
            path, origin = _from_hub(source, component, token, offline, cache_dir, endpoint)
        except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, httpx2.TransportError, OSError) as e:
            raise _hub_error(e, source, component, preset, offline, cache_dir) from e
    verified = _verify(path, source, component, preset)
    report = FileReport(component, path, _size(path), time.perf_counter() - start, origin, verified)
    logger.info(
        "%s: %s from %s, %s, %.2f s -> %s",
        component,
        source.describe(),
        origin,
        _human(report.bytes),
        report.seconds,
        path,
    )
    return report


def _from_local(source: Source, component: str) -> Path:
    path = Path(source.local)
    if not path.exists():
        kind = "folder" if source.folder else "file"
        raise ModelFileError(
            f"{component} {kind} not found: {path}. Point {_override(component)} at an existing {kind}, "
            "or unset it to use the preset's own file."
        )
    return path


def _from_kit(source: Source, component: str) -> Path:
    from fluxdemo.tiny import ensure_kit  # lazily: building a kit needs torch, resolving a Hub file does not

    kit = ensure_kit(source.kit)
    path = kit / source.path
    if not path.exists():
        raise ModelFileError(
            f"{component} is missing from the tiny kit '{source.kit}': {path} does not exist. "
            f"Delete the kit folder {kit} so that it is rebuilt on the next run."
        )
    return path


def _from_hub(
    source: Source,
    component: str,
    token: str | None,
    offline: bool,
    cache_dir: Path | None,
    endpoint: str | None,
) -> tuple[Path, str]:
    def get(local_files_only: bool) -> Path:
        common = {
            "repo_id": source.repo_id,
            "cache_dir": cache_dir,
            "token": token,
            "endpoint": endpoint,
            "local_files_only": local_files_only,
        }
        if source.folder:
            return Path(snapshot_download(allow_patterns=[f"{source.path}/*"], **common)) / source.path
        return Path(hf_hub_download(filename=source.path, **common))

    # The cache first, without a network round trip: preset files are fixed names in fixed repos, and this way a
    # machine with a flaky or filtered network starts as fast as an offline one once everything is cached.
    try:
        path = get(local_files_only=True)
        if path.exists():
            return path, "cache"
    except LocalEntryNotFoundError:
        if offline:
            raise
    path = get(local_files_only=False)
    if source.folder and not path.is_dir():
        # snapshot_download only warns when the patterns match nothing, and returns the snapshot root
        raise HubError(
            f"{_what(source, component)}: the repository {source.repo_id} has no folder {source.path}. "
            f"Check the name at https://huggingface.co/{source.repo_id}/tree/main; if the preset is out of date, "
            f"point {_override(component)} at a local copy."
        )
    return path, "download"


def _offline_mode() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; reading it again here honours a later setting too.
    return (
        constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    )


def _failure(error: BaseException) -> tuple[str, int | None]:
    """(kind, HTTP status) of a Hub failure: the one classification that the model-file and the LoRA translators
    each word in their own sentence. Kinds: disk-full, gated, no-repo, no-revision, no-file, unreachable,
    unauthorized, http, permission, other."""
    status = error.response.status_code if isinstance(error, HfHubHTTPError) and error.response is not None else None
    if _disk_full(error):
        kind = "disk-full"
    elif isinstance(error, GatedRepoError):  # before no-repo: a GatedRepoError is a RepositoryNotFoundError
        kind = "gated"
    elif isinstance(error, RepositoryNotFoundError):
        kind = "no-repo"
    elif isinstance(error, RevisionNotFoundError):
        kind = "no-revision"
    elif isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled, httpx2.TransportError)):
        kind = "unreachable"  # before no-file: a LocalEntryNotFoundError is an EntryNotFoundError
    elif isinstance(error, EntryNotFoundError):
        kind = "no-file"
    elif status is not None:
        kind = "unauthorized" if status == 401 else "http"
    elif isinstance(error, PermissionError):
        kind = "permission"
    else:
        kind = "other"
    return kind, status


def _hub_error(
    error: Exception, source: Source, component: str, preset: str, offline: bool, cache_dir: Path | None
) -> HubError:
    """The HubError that says what to do about a failure of huggingface_hub."""
    what, cache = _what(source, component), Path(cache_dir or constants.HF_HUB_CACHE)
    kind, status = _failure(error)
    if kind == "disk-full":
        need = _human(source.approx_bytes) if source.approx_bytes else "an unknown amount"
        return HubError(
            f"Disk full while downloading {what}: it needs about {need}, and the Hugging Face cache at {cache} "
            f"has {_human(_free_bytes(cache))} free. Free some space there, or move the cache to a bigger disk: "
            "set HF_HOME=/path/on/a/bigger/disk/huggingface (and move the old cache folder there to keep what is "
            "already downloaded)."
        )
    if kind == "gated" or (kind == "no-repo" and status == 401 and source.gated):
        licence = (
            source.licence if source.licence.startswith("https://") else f"https://huggingface.co/{source.repo_id}"
        )
        why = "no valid token was sent" if status == 401 else "the token in use has not been granted access"
        return HubError(
            f"{what} is in the gated repository {source.repo_id} and the Hub refused access ({why}). "
            f"Accept the licence at {licence} while logged in to your Hugging Face account, then set "
            f"HF_TOKEN=<a token with read access> (create one at {TOKENS_URL})."
        )
    if kind == "no-repo":
        return HubError(
            f"{what}: the repository {source.repo_id} was not found on the Hub (or it is private and the token in "
            f"use cannot see it). Check the repo id at https://huggingface.co/{source.repo_id}; if the preset is out "
            f"of date, point {_override(component)} at a local copy."
        )
    if kind in ("no-revision", "no-file"):
        return HubError(
            f"{what}: the repository {source.repo_id} has no file {source.path}. Check the name at "
            f"https://huggingface.co/{source.repo_id}/tree/main; if the preset is out of date, point "
            f"{_override(component)} at a local copy."
        )
    if kind == "unreachable":
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached"
        return HubError(
            f"{what} is not in the Hugging Face cache ({cache}) and {why}. Run `python -m fluxdemo download "
            f"--model {preset}` on a machine with network (files land in the Hugging Face cache, HF_HOME), or point "
            f"{_override(component)} at a local {'folder' if source.folder else 'file'}."
        )
    if kind == "unauthorized":
        return HubError(
            f"The Hub rejected the token in use (HTTP 401) for {what}. Set HF_TOKEN=<a token with read access> "
            f"(create one at {TOKENS_URL}), or unset HF_TOKEN for public files."
        )
    if kind == "http":
        return HubError(
            f"The Hub answered HTTP {status} for {what}; it may be down or rate-limiting. Try again in a few "
            f"minutes, or point {_override(component)} at a local copy."
        )
    if kind == "permission":
        return HubError(
            f"Cannot write {what} into the Hugging Face cache at {cache} ({error.strerror}). Make that folder "
            "writable, or set HF_HOME to a folder you can write to."
        )
    return HubError(f"Downloading {what} failed ({error}). Run the same command again to retry.")


def _disk_full(error: BaseException) -> bool:
    """Whether ENOSPC (or a disk quota) is anywhere in the chain: huggingface_hub re-raises and wraps freely."""
    seen: set[int] = set()
    pending: list[BaseException] = [error]
    while pending:
        e = pending.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        pending.extend(x for x in (e.__cause__, e.__context__) if x is not None)
    return False


def _free_bytes(folder: Path) -> int:
    for p in (folder, *folder.parents):  # the cache folder itself may not exist yet
        if p.exists():
            return shutil.disk_usage(p).free
    return 0


def _verify(path: Path, source: Source, component: str, preset: str) -> bool:
    """Check the file is what the preset expects; True when its contents could be checked, not just its size."""
    problem, checked = _problem(path, component)
    if problem is None:
        return checked
    if source.local is not None:
        fix = f"Point {_override(component)} at a correct {'folder' if source.folder else 'file'}."
    elif source.kit is not None:
        kit = path.parents[len(Path(source.path).parts) - 1] if Path(source.path).parts else path
        fix = f"Delete the kit folder {kit} so that it is rebuilt on the next run."
    else:
        # the snapshot entry is a link to a blob: deleting only the link would bring the same bad blob back
        fix = (
            f"Delete the cached copy {path.resolve()} and run `python -m fluxdemo download --model {preset}` to "
            "fetch it again."
        )
    kind = "folder" if path.is_dir() else "file"
    raise ModelFileError(f"{component} {kind} {path} is not usable: {problem}. {fix}")


def _problem(path: Path, component: str) -> tuple[str | None, bool]:
    """(what is wrong or None, whether the contents were checked)."""
    if path.is_dir():
        alternatives = FOLDER_CONTENTS.get(component)
        if alternatives is None:
            return None, False
        for files in alternatives:
            if all(_nonempty(path / f) for f in files):
                return None, True
        wanted = " or ".join("+".join(files) for files in alternatives)
        return f"the folder does not contain {wanted}", False
    if not path.is_file():
        return "it does not exist", False
    size = path.stat().st_size
    if size == 0:
        return "it is empty (0 bytes)", False
    if path.suffix == ".gguf":
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            return f"it does not start with the GGUF magic b'GGUF' (it starts with {magic!r})", False
        return None, True
    if path.suffix == ".safetensors":
        return _safetensors_problem(path, size), True
    return None, False


def _safetensors_problem(path: Path, size: int) -> str | None:
    """Parse only the 8-byte header length and the JSON header; check the tensors fill the file exactly."""
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if not 2 <= n <= min(size - 8, _MAX_SAFETENSORS_HEADER):
            return f"its safetensors header length ({n}) does not fit a {size}-byte file"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"its safetensors header is not valid JSON ({e})"
    if not isinstance(header, dict):
        return "its safetensors header is not a JSON object"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        return "its safetensors header has a tensor entry without valid data_offsets"
    if 8 + n + end != size:
        # the same rule the safetensors loader applies: a truncated download fails here, not deep in loading
        return f"its tensors need {8 + n + end} bytes but the file has {size} (truncated or corrupt)"
    return None


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _what(source: Source, component: str) -> str:
    return f"{component} ({source.describe()})"


def _override(component: str) -> str:
    """How the user points a component at a local file: its environment variable, and its CLI flag if it has one."""
    if component not in COMPONENTS:
        return "a local path"
    env = f"FLUXDEMO_{component.upper()}"
    return f"{env} (or {CLI_FLAGS[component]})" if component in CLI_FLAGS else env


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


# --- LoRAs from the Hub ---------------------------------------------------------------------------------------------

HUB_URL = re.compile(
    r"https?://(?:www\.)?(?:huggingface\.co|hf\.co)/(?P<repo>[\w.-]+/[\w.-]+)"
    r"(?:/(?:blob|resolve|tree)/(?P<rev>[^/?#]+))?(?:/(?P<file>[^?#]+?))?/?(?:[?#].*)?"
)
HUB_NAME = re.compile(r"(?P<repo>[\w][\w.-]*/[\w][\w.-]*)(?P<file>(?:/[\w.\- ]+)*)(?:@(?P<rev>[\w.\-/]+))?")
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
class HubLoraRef:
    """Where a LoRA lives on the Hub: a repo, optionally one file in it and a revision (branch, tag or commit)."""

    repo_id: str
    filename: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return (
            self.repo_id
            + (f"/{self.filename}" if self.filename else "")
            + (f"@{self.revision}" if self.revision else "")
        )


@dataclass(frozen=True)
class HubLora:
    """A LoRA file downloaded into this app's Hub-LoRA cache, with what the repo's model card says about it."""

    ref: HubLoraRef  # with filename and revision (the commit) filled in
    path: Path
    trigger_words: list[str]
    example_prompts: list[str]


def parse_hub_lora(name: str) -> HubLoraRef | None:
    """A Hub reference in `name` (user/repo, user/repo/file.safetensors, user/repo@rev, or a huggingface.co URL),
    or None when `name` is not one. A two-part name ending in .safetensors is a local path, never a repo."""
    m = HUB_URL.fullmatch(name.strip())
    if m:
        return HubLoraRef(m["repo"], m["file"] or None, m["rev"])
    m = HUB_NAME.fullmatch(name.strip())
    if m is None or m["repo"].lower().endswith(".safetensors") or m["repo"].startswith(".") or ".." in name:
        return None
    filename = m["file"].lstrip("/") or None
    if filename and not filename.lower().endswith(".safetensors"):
        return None
    return HubLoraRef(m["repo"], filename, m["rev"])


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
        commit = None if _offline_mode() else _pin(hub)
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
    logger.info("LoRA %s from the Hub at %s: %s (%s)", ref, commit[:12], path.name, _human(_size(path)))
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
        info = hub.api.model_info(hub.ref.repo_id, revision=hub.ref.revision or constants.DEFAULT_REVISION,
                                  timeout=constants.HF_HUB_ETAG_TIMEOUT)  # fmt: skip
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
        raise HubError(f"{repo} holds more than {MAX_LISTED_FILES:,} files; name the LoRA file: "
                       f"{repo}/file.safetensors.")  # fmt: skip
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
        raise HubError(f"{repo} has no LoRA: none of its .safetensors files ({names_list(candidates)}) holds "
                       "LoRA weights.")  # fmt: skip
    if len(loras) > 1:
        choices = names_list([f"{repo}/{f} ({_human(files[f])})" for f in loras])
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
            raise HubError(f"{what} is {_human(size)}, more than the {_human(self.quota)} this app keeps for Hub "
                           "LoRAs; put the file in the LoRA folder instead.")  # fmt: skip
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
            f"{what} is {_human(size)}, over the {_human(limit)} limit for "
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
                        f"{_shown(hub.ref)} sent more than the {_human(limit)} limit for {what}; the download was "
                        "stopped and deleted."
                    )
        problem = _safetensors_problem(tmp, tmp.stat().st_size) if lora else None
        if problem:
            raise HubError(f"{_shown(hub.ref)} is not a usable safetensors file: {problem}. It was deleted; ask its "
                           "author for a working file.")  # fmt: skip
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
        with get_session().stream("GET", url, headers=headers, follow_redirects=False,
                                  timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:  # fmt: skip
            location = response.headers.get("Location")
            if response.is_redirect and location and on_hub:
                url = urljoin(url, location)
                continue
            if response.is_redirect:
                raise HubError(f"The Hub's download server sent {_shown(hub.ref)} on to another address, which this "
                               "app does not follow; try again in a few minutes.")  # fmt: skip
            hf_raise_for_status(response)
            yield response
            return
    raise HubError(f"The Hub redirected {_shown(hub.ref)} too many times; try again in a few minutes.")


def _shown(text: object) -> str:
    """A visitor's name inside a sentence, cut: a name can be megabytes long."""
    return capped(str(text), MAX_FIELD_CHARS)


def _lora_hub_error(error: Exception, ref: HubLoraRef) -> HubError:
    """The sentence for a failed Hub LoRA; it never says whether this server holds a token."""
    page = f"https://huggingface.co/{_shown(ref.repo_id)}"
    kind, status = _failure(error)
    if kind == "gated":
        return HubError(f"{_shown(ref.repo_id)} is a gated repository, which this app does not open: accept its "
                        f"terms at {page}, download the LoRA yourself and upload the .safetensors file.")  # fmt: skip
    # The Hub answers 401 for a missing repo and for a private one alike; so do we
    if kind in ("no-repo", "unauthorized"):
        return HubError(f"There is no repository {_shown(ref.repo_id)} on the Hub (or it is private). Check the "
                        f"name at {page}.")  # fmt: skip
    if kind == "no-revision":
        return HubError(f"{_shown(ref.repo_id)} has no revision {_shown(ref.revision)!r} (no branch, tag or commit "
                        f"of that name); see its branches and tags at {page}/tree/main.")  # fmt: skip
    if kind == "no-file":
        return HubError(f"{_shown(ref.repo_id)} has no file {_shown(ref.filename)}; see its files at "
                        f"{page}/tree/main.")  # fmt: skip
    if kind == "unreachable":
        why = "offline mode is on (HF_HUB_OFFLINE=1)" if _offline_mode() else "the Hub could not be reached"
        return HubError(
            f"{_shown(ref)} is not among the Hub LoRAs this app downloaded before, and {why}. Try again once the "
            "Hub can be reached (a LoRA named with its file, user/repo/file.safetensors, is then kept for offline "
            "use), or put the .safetensors file in the LoRA folder."
        )
    if kind == "disk-full":
        return HubError(f"The disk is full: {_shown(ref)} could not be stored. Try again later, or put the "
                        ".safetensors file in the LoRA folder.")  # fmt: skip
    if status is not None:
        return HubError(f"The Hub answered HTTP {status} for {_shown(ref)}; try again in a few minutes.")
    return HubError(f"Getting {_shown(ref)} from the Hub failed ({type(error).__name__}); try again.")
