"""A preset's model files: a local override, the tiny kit, or the Hugging Face Hub through huggingface_hub's cache.

Everything Hub-related goes through huggingface_hub (hf_hub_download for files, snapshot_download for folders), so
its cache (HF_HOME / HF_HUB_CACHE), its tqdm progress bars, HF_TOKEN and HF_HUB_OFFLINE all work as users expect.
Every Hub failure becomes a HubError whose message says what to do; a file that arrives but is not what the preset
expects becomes a ModelFileError. One log line per file says where it came from, how big it is and how long it took.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx2  # huggingface_hub 2.x's HTTP client: its transport errors are how "no network" reaches us
from huggingface_hub import constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import get_session

from fluxdemo.errors import HubError, ModelFileError
from fluxdemo.model.presets import CLI_FLAGS, COMPONENTS, Preset, Source
from fluxdemo.safetensors_header import HeaderError, read_header

logger = logging.getLogger(__name__)

TOKENS_URL = "https://huggingface.co/settings/tokens"

# What a folder source must hold to be usable: any one of the alternatives, each a set of files.
FOLDER_CONTENTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "tokenizer": (("vocab.json", "merges.txt"), ("tokenizer.json",)),  # CLIP: slow or fast tokenizer
    "tokenizer_2": (("tokenizer.json",), ("spiece.model",)),  # T5: fast or sentencepiece tokenizer
    "config_dir": (("transformer/config.json",),),
}


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
        lines = [
            f"preset {self.preset}: {len(self.files)} files, {human_size(self.total_bytes)}, {self.seconds:.1f} s"
        ]
        for f in self.files:
            check = "verified" if f.verified else "present"
            size = human_size(f.bytes)
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
    preset: Preset,
    *,
    token: str | None = None,
    cache_dir: Path | None = None,
    endpoint: str | None = None,
    on_file: Callable[[str], None] | None = None,
) -> DownloadReport:
    """Fetch and verify every file of a preset; files already in the cache are checked, not downloaded again.
    `on_file` is called with each component's name before its file is fetched (a progress display's hook)."""
    sources = preset.sources()
    # Smallest first: the gated files are the small ones, so a licence or token problem shows up in seconds,
    # not after 18 GB of transformer and T5.
    order = sorted(sources, key=lambda n: sources[n].approx_bytes)
    files = []
    for name in order:
        if on_file is not None:
            on_file(name)
        files.append(_fetch(sources[name], name, preset.name, token, None, cache_dir, endpoint))
    report = DownloadReport(preset=preset.name, files=tuple(files))
    logger.info(
        "preset %s: %d files, %s, %.1f s", preset.name, len(files), human_size(report.total_bytes), report.seconds
    )
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
        offline = offline_mode() if offline is None else offline
        try:
            path, origin = _from_hub(source, component, token, offline, cache_dir, endpoint)
        except (HfHubHTTPError, EntryNotFoundError, OfflineModeIsEnabled, httpx2.TransportError, OSError) as e:
            raise _hub_error(e, source, component, preset, offline, cache_dir) from e
    verified = _verify(path, source, component, preset)
    report = FileReport(component, path, disk_size(path), time.perf_counter() - start, origin, verified)
    logger.info(
        "%s: %s from %s, %s, %.2f s -> %s",
        component,
        source.describe(),
        origin,
        human_size(report.bytes),
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
    from fluxdemo.model.tiny import ensure_kit  # lazily: building a kit needs torch, resolving a Hub file does not

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
    _reach(endpoint)
    path = get(local_files_only=False)
    if source.folder and not path.is_dir():
        # snapshot_download only warns when the patterns match nothing, and returns the snapshot root
        raise HubError(
            f"{_what(source, component)}: the repository {source.repo_id} has no folder {source.path}. "
            f"Check the name at https://huggingface.co/{source.repo_id}/tree/main; if the preset is out of date, "
            f"point {_override(component)} at a local copy."
        )
    return path, "download"


def _reach(endpoint: str | None) -> None:
    """One plain request before huggingface_hub's own, which retry an unreachable Hub with back-off (five tries a
    file: 44 s and 27 log lines for a preset): a refused or timed-out request raises httpx2.TransportError at once."""
    get_session().head(endpoint or constants.ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)


def offline_mode() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at import; reading it again here honours a later setting too.
    return (
        constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in constants.ENV_VARS_TRUE_VALUES
    )


def hub_failure(error: BaseException) -> tuple[str, int | None]:
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
    kind, status = hub_failure(error)
    if kind == "disk-full":
        need = human_size(source.approx_bytes) if source.approx_bytes else "an unknown amount"
        return HubError(
            f"Disk full while downloading {what}: it needs about {need}, and the Hugging Face cache at {cache} "
            f"has {human_size(_free_bytes(cache))} free. Free some space there, or move the cache to a bigger disk: "
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
        return safetensors_problem(path, size), True
    return None, False


def safetensors_problem(path: Path, size: int) -> str | None:
    """What is wrong with a safetensors file's header (fluxdemo.safetensors_header's check), or None."""
    try:
        read_header(path)
    except HeaderError as e:
        if e.kind in ("not", "length"):
            return f"its safetensors header length ({e.length}) does not fit a {size}-byte file"
        if e.kind == "extent":
            # the same rule the safetensors loader applies: a truncated download fails here, not deep in loading
            return f"its tensors need {e.needed} bytes but the file has {size} (truncated or corrupt)"
        if e.kind == "json":
            return f"its safetensors header is not valid JSON ({e.cause})"
        if e.kind == "object":
            return "its safetensors header is not a JSON object"
        return f"its safetensors header is not valid: {e.what}"
    return None


def _nonempty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def disk_size(path: Path) -> int:
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


def human_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
