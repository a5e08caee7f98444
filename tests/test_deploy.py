"""Deploying on a Space: the README's deploy section against the code and the `hf` command it tells people to run,
and the model's download at start-up (app.py --download-at-start) against a loopback Hub."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import logging
import re
import shlex
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from fake_hub import no_hub_setup
from helpers import HANG_S
from huggingface_hub import SpaceHardware, hf_hub_download
from huggingface_hub.utils import filter_repo_objects
from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS
from safetensors.numpy import save

from fluxdemo.model.prefetch import Prefetch, PrefetchState
from fluxdemo.model.presets import ENV_OVERRIDES, PRESETS, Source
from fluxdemo.studio.model_download import download_note

ROOT = Path(__file__).resolve().parents[1]
HF = Path(sys.executable).with_name("hf")  # the console script huggingface_hub installs beside python
# What a Space must keep private: anything that logs in or reads on someone's behalf (SECURITY.md).
SECRETS = {"HF_TOKEN", "FLUXDEMO_AUTH", "FLUXDEMO_HUB_LORA_TOKEN"}


def load_app():
    """app.py as a module (a script at the project root, not part of the package)."""
    spec = importlib.util.spec_from_file_location("app", ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return app


def deploy_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Deploying on Hugging Face Spaces")
    return text[start : text.index("\n## ", start + 1)]


def table_rows(section: str) -> dict[str, str]:
    """name -> how the variables table says to set it (secret, variable, set by the Space)."""
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) == 3:
            for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
                rows[name] = cells[1]
    return rows


def commands(section: str, inline: bool = False) -> list[list[str]]:
    """The `hf` command lines of the section's bash blocks (and with `inline`, the commands on a Space in its text),
    split as a shell would."""
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith("hf ")]
    return [
        shlex.split(line) for line in lines + (re.findall(r"`(hf [a-z -]+ YOU/[^`]+)`", section) if inline else [])
    ]


def names_read_by_code() -> set[str]:
    sources = [ROOT / "app.py", *sorted((ROOT / "fluxdemo").rglob("*.py"))]
    literal = {name for path in sources for name in re.findall(r"\"(FLUXDEMO_[A-Z0-9_]+)\"", path.read_text())}
    return literal | set(ENV_OVERRIDES)  # the file overrides' names are built from the component names


# --- the README's deploy section ----------------------------------------------------------------------------------


def test_every_fluxdemo_variable_the_section_names_is_one_the_code_reads_and_every_one_is_named():
    named = set(re.findall(r"\bFLUXDEMO_[A-Z0-9_]+", deploy_section()))
    assert named == names_read_by_code()


def test_credentials_are_secrets_and_everything_else_a_variable():
    rows = table_rows(deploy_section())
    assert {n for n, how in rows.items() if how == "secret"} == SECRETS
    assert {n for n, how in rows.items() if how == "variable"} >= names_read_by_code() - SECRETS
    assert set(rows.values()) == {"secret", "variable", "set by the Space"}


def test_the_commands_set_no_secret_as_a_variable_and_type_the_secrets_into_stdin():
    section = deploy_section()
    variables = [arg.split("=")[0] for cmd in commands(section) for flag, arg in pairwise(cmd) if flag == "-e"]
    assert variables and not set(variables) & SECRETS
    assert ["hf", "spaces", "secrets", "add", "YOU/fluxdemo", "--secrets-file", "-"] in commands(section)
    typed = re.search(r"Ctrl\+D:\n\s*```\n(.*?)```", section, re.S).group(1)
    assert {line.split("=")[0] for line in typed.split()} == {"HF_TOKEN", "FLUXDEMO_AUTH"}


def test_the_variables_defaults_in_the_table_are_the_apps():
    app = load_app()
    args = vars(app.build_parser({}).parse_args([]))
    defaults = {env: str(args[flag[2:].replace("-", "_")]) for flag, env in app.VARIABLES.items()}
    table = {
        m[0]: m[1]
        for m in re.findall(
            r"\| `(FLUXDEMO_[A-Z_]+)` \| variable \| [^|]*?\(default:? `?([\w.,-]+?)`?[;)]", deploy_section()
        )
    }
    assert len(table) >= 9
    for name, value in table.items():
        default = defaults[name]
        assert value.replace(",", "") == default or float(value.replace(",", "")) == float(default), name


def test_every_hf_command_parses_and_gets_as_far_as_the_hub(tmp_path):
    """Each command of the section as written, run offline: the installed `hf` takes every argument and option and
    fails only where it would reach the Hub (an unknown option would stop it before, with exit 2)."""
    section = deploy_section()
    space = tmp_path / "space"  # the section's /tmp/fluxdemo-space, filled by its own git archive line
    (archive,) = [line for line in section.splitlines() if "git archive HEAD" in line]
    subprocess.run(["bash", "-c", archive.replace("/tmp/fluxdemo-space", str(space))], cwd=ROOT, check=True)
    assert (space / "app.py").read_text() == (ROOT / "app.py").read_text()
    offline = {"HF_HUB_OFFLINE": "1", "HF_TOKEN": "hf_test", "HF_HOME": str(tmp_path / "hf"), "NO_COLOR": "1"}
    ran = []
    for cmd in commands(section, inline=True):
        if cmd[1:3] == ["auth", "login"]:  # interactive: its help is enough
            cmd = [*cmd, "--help"]
        argv = [str(HF), *(str(space) if a == "/tmp/fluxdemo-space" else a for a in cmd[1:])]
        done = subprocess.run(argv, capture_output=True, text=True, env=offline, input="HF_TOKEN=hf_x\n", cwd=ROOT)
        said = done.stdout + done.stderr
        assert "--help" in cmd or "offline mode is enabled" in said, (cmd, said[-500:])
        assert done.returncode in (0, 1), (cmd, said[-500:])
        ran.append(" ".join(cmd[1:3]))
    blocks = ["auth login", "buckets create", "repos create", "spaces secrets", "upload YOU/fluxdemo", "spaces logs"]
    assert ran[:6] == blocks and set(ran[6:]) == {"spaces variables", "spaces secrets", "repos delete-files"}


def test_the_create_command_asks_for_the_hardware_the_front_matter_suggests():
    front = re.match(r"---\n(.*?)\n---\n", (ROOT / "README.md").read_text(), re.S).group(1)
    suggested = re.search(r"^suggested_hardware: (\S+)$", front, re.M).group(1)
    assert suggested in {h.value for h in SpaceHardware}
    (create,) = [c for c in commands(deploy_section()) if c[1:3] == ["repos", "create"]]
    assert create[create.index("--flavor") + 1] == suggested
    assert create[create.index("--sdk") + 1] == "gradio" and create[create.index("--type") + 1] == "space"


def test_the_upload_sends_the_app_and_the_readmes_pictures_and_leaves_out_tests_and_bench():
    (upload,) = [c for c in commands(deploy_section()) if c[1] == "upload"]
    excluded = [upload[i + 1] for i, w in enumerate(upload) if w == "--exclude"]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    # what `git archive HEAD` writes is what git tracks; hf upload filters it as upload_folder does
    sent = set(filter_repo_objects(tracked, ignore_patterns=[*excluded, *DEFAULT_IGNORE_PATTERNS]))
    assert {"app.py", "README.md", "requirements.txt", "pyproject.toml"} <= sent
    assert {f for f in tracked if f.startswith("fluxdemo/")} <= sent
    pictures = set(re.findall(r'(?:\]\(|src=")(docs/[^)"]+)', (ROOT / "README.md").read_text()))
    assert len(pictures) == 3 and pictures <= sent  # the Space's page shows the README with them
    assert not {f for f in sent if f.split("/")[0] in ("tests", "bench")}


def test_the_lora_folder_and_cache_the_commands_set_live_on_the_mounted_bucket():
    (create,) = [c for c in commands(deploy_section()) if c[1:3] == ["repos", "create"]]
    mount = create[create.index("-v") + 1].rsplit(":", 1)[1]
    variables = dict(create[i + 1].split("=", 1) for i, w in enumerate(create) if w == "-e")
    assert variables.keys() == {"FLUXDEMO_LORA_DIR", "FLUXDEMO_CACHE"}
    assert all(Path(v).is_relative_to(mount) for v in variables.values())


# --- the download at start-up ---------------------------------------------------------------------------------------


class LoopbackHub:
    """A loopback Hub serving plain (non-LFS) files; `hold` names a file sent half, then the rest on `release`."""

    def __init__(self, files: dict[str, dict[str, bytes]], gated: frozenset[str] = frozenset()) -> None:
        self.files, self.gated, self.hold, self.release = files, gated, None, threading.Event()
        self.gets: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def _answer(self, path: str) -> tuple[int, dict[str, str], bytes]:
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if m is None or m[1] not in self.files:
            return 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, b""
        if m[1] in self.gated:
            message = f"Access to model {m[1]} is restricted. You must have access to it and be authenticated."
            return 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": message}, b""
        data = self.files[m[1]][m[3]]
        return 200, {"X-Repo-Commit": "c" * 40, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, data

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            timeout = 10  # a stuck client must not hang the suite

            def do_HEAD(self) -> None:
                self._send(body=False)

            def do_GET(self) -> None:
                hub.gets.append(self.path)
                self._send(body=True)

            def _send(self, body: bool) -> None:
                status, headers, data = hub._answer(self.path)
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(key, value)
                self.end_headers()
                if body and hub.hold and self.path.endswith(hub.hold):  # the first half, then a pause
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    hub.release.wait(timeout=HANG_S)  # a hang guard: the test releases it, or stop() does
                    data = data[len(data) // 2 :]
                if body:
                    self.wfile.write(data)

            def log_message(self, format: str, *args) -> None:
                pass

        return Handler

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


MiB = 2**20
GGUF = b"GGUF" + bytes(60)
VAE = save({"w": np.zeros(4, dtype=np.float32)})
# A preset shaped like dev-q8: three big files on the Hub, the rest local (the tiny kit's tokenizers and configs)
HUB_FILES = {
    "transformer": Source("flux.gguf", repo_id="city/flux", approx_bytes=12_700_000_000),
    "text_encoder_2": Source("t5.gguf", repo_id="city/t5", approx_bytes=5_060_000_000),
    "vae": Source("vae.safetensors", repo_id="bfl/flux", approx_bytes=168_000_000),
}
CONTENTS = {"city/flux": {"flux.gguf": GGUF}, "city/t5": {"t5.gguf": GGUF}, "bfl/flux": {"vae.safetensors": VAE}}


@pytest.fixture
def hub_preset(tiny_kit, monkeypatch, tmp_path):
    no_hub_setup(monkeypatch, tmp_path)  # CI runs with HF_HUB_OFFLINE=1, which huggingface_hub read at import
    return dataclasses.replace(PRESETS["tiny"], **HUB_FILES)


@pytest.fixture
def hub():
    fake = LoopbackHub(CONTENTS)
    yield fake
    fake.stop()


def wait_for(condition, what: str) -> None:
    """Poll until `condition()`; the deadline only keeps a broken download from hanging the suite."""
    deadline = time.monotonic() + HANG_S
    while not condition():
        assert time.monotonic() < deadline, f"still waiting for {what} after {HANG_S} s"
        time.sleep(0.01)


def ended(prefetch: Prefetch) -> PrefetchState:
    """The download's state once its thread has ended; HANG_S only keeps a broken download from hanging the suite."""
    prefetch.join(timeout=HANG_S)
    state = prefetch.state()
    assert state.finished or state.error is not None, f"the download had not ended after {HANG_S} s: {state}"
    return state


def test_the_start_up_download_fetches_the_presets_hub_files_smallest_first(hub_preset, hub, tmp_path):
    prefetch = Prefetch(hub_preset, cache_dir=tmp_path, endpoint=hub.endpoint).start()
    assert ended(prefetch) == PrefetchState(17_928_000_000, 17_928_000_000, None, finished=True, error=None)
    assert [path.rsplit("/", 1)[1] for path in hub.gets] == ["vae.safetensors", "t5.gguf", "flux.gguf"]
    for source in HUB_FILES.values():  # in the cache: the first run finds them without the Hub
        cached = hf_hub_download(source.repo_id, source.path, cache_dir=tmp_path, local_files_only=True)
        assert Path(cached).read_bytes() == CONTENTS[source.repo_id][source.path]
    assert download_note(prefetch.state()) == ""


def test_the_page_says_how_far_the_download_is(hub_preset, tmp_path):
    # 24 MiB: its first half is more than one of huggingface_hub's 10 MiB download chunks, so some of it is written
    hub = LoopbackHub({**CONTENTS, "city/flux": {"flux.gguf": GGUF + bytes(24 * MiB)}})
    hub.hold, before = "flux.gguf", 168_000_000 + 5_060_000_000
    try:
        prefetch = Prefetch(hub_preset, cache_dir=tmp_path, endpoint=hub.endpoint).start()
        # one whole chunk lands on disk; the next cannot complete before the rest is sent
        wait_for(lambda: prefetch.state().done_bytes >= before + 10 * MiB, "the transformer's first chunk")
        state = prefetch.state()
        assert (state.current, state.finished) == ("transformer", False)
        assert state.done_bytes - before <= 12 * MiB  # no more than the half sent so far
        assert download_note(state) == (
            "Downloading the model files: **5.2 of 17.9 GB** (now: transformer). A run started now waits for them."
        )
        hub.release.set()
        ended(prefetch)
    finally:
        hub.stop()
    assert prefetch.state().done_bytes == prefetch.state().total_bytes


def test_a_failed_download_is_one_sentence_on_the_page_without_the_machines_paths(hub_preset, tmp_path):
    hub = LoopbackHub(CONTENTS, gated=frozenset({"bfl/flux"}))
    try:
        prefetch = Prefetch(hub_preset, cache_dir=tmp_path, endpoint=hub.endpoint).start()
        state = ended(prefetch)
    finally:
        hub.stop()
    assert (state.finished, state.current, state.done_bytes) == (False, "vae", 0)
    assert download_note(state) == (
        "The model files (17.9 GB) could not be downloaded at start-up: vae (bfl/flux/vae.safetensors) is in the "
        "gated repository bfl/flux and the Hub refused access (no valid token was sent). Accept the licence at "
        "https://huggingface.co/bfl/flux while logged in to your Hugging Face account, then set HF_TOKEN=<a token "
        "with read access> (create one at https://huggingface.co/settings/tokens). The first run will try again."
    )


def test_an_offline_failure_on_the_page_names_no_folder_of_the_machine(hub_preset, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    prefetch = Prefetch(hub_preset, cache_dir=tmp_path / "hf-cache").start()
    note = download_note(ended(prefetch))
    assert "is not in the Hugging Face cache (.../hf-cache) and offline mode is on" in note
    assert str(tmp_path) not in note


@pytest.mark.parametrize(
    ("setting", "env", "started"),
    [
        ("auto", {"SPACE_ID": "you/fluxdemo"}, True),
        ("auto", {}, False),
        ("on", {}, True),
        ("off", {"SPACE_ID": "x"}, False),
    ],
)
def test_the_download_starts_at_launch_on_a_space_or_when_asked(
    hub_preset, hub, tmp_path, monkeypatch, setting, env, started
):
    app = load_app()
    # the loopback Hub and a cache of the test's own, where app.py leaves huggingface_hub's defaults
    monkeypatch.setattr(app, "Prefetch", functools.partial(Prefetch, endpoint=hub.endpoint, cache_dir=tmp_path))
    args = app.build_parser({}).parse_args(["--download-at-start", setting])
    prefetch = app.start_download(args, hub_preset, env)
    assert (prefetch is not None) == started
    if prefetch is not None:
        assert ended(prefetch).finished and len(hub.gets) == 3
    assert app.start_download(args, PRESETS["tiny"], {"SPACE_ID": "x"}) is None  # a kit has nothing to fetch


def test_a_bad_download_setting_is_a_sentence_and_exit_2(monkeypatch, caplog):
    monkeypatch.setenv("FLUXDEMO_DOWNLOAD_AT_START", "maybe")
    with caplog.at_level(logging.ERROR):
        assert load_app().main(["--model", "tiny"]) == 2
    assert (
        "--download-at-start (or FLUXDEMO_DOWNLOAD_AT_START) must be auto, on or off, but is 'maybe'." in caplog.text
    )


def test_the_studio_shows_the_download_on_each_page_load_and_stops_asking_when_it_is_done(manager):
    from fluxdemo.studio import build_studio

    states = iter([PrefetchState(168_000_000, 17_928_000_000, "text_encoder_2", False, None)])
    done = PrefetchState(17_928_000_000, 17_928_000_000, None, True, None)
    demo = build_studio(manager, download=lambda: next(states, done))
    (refresh,) = [f for f in demo.fns.values() if f.name == "refresh"]
    assert {t[1] for t in refresh.targets} == {"load", "tick"} and refresh.queue is False
    line, timer = refresh.fn()
    assert (line.value, line.visible, timer.active) == (
        "Downloading the model files: **0.2 of 17.9 GB** (now: text encoder 2). A run started now waits for them.",
        True,
        True,
    )
    line, timer = refresh.fn()
    assert (line.visible, timer.active) == (False, False)
    assert "Downloading" not in str(build_studio(manager).config)  # no line without a start-up download


def test_the_section_quotes_the_line_the_page_shows_for_dev_q8():
    sizes = {name: source.approx_bytes for name, source in PRESETS["dev-q8"].sources().items()}
    before = sum(sizes.values()) - sizes["transformer"]
    note = download_note(PrefetchState(before, sum(sizes.values()), "transformer", False, None))
    assert note.split(". A run")[0] + "." in deploy_section()
