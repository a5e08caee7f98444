"""The app in front of strangers: many users at once, a full queue, clients that go away, file routes, hostile
uploads, and what a public link shows. The studio runs on the tiny kit and is driven through gradio_client and plain
HTTP on 127.0.0.1, as a browser or a script on the internet would drive it.

Isolation is checked where it can fail: the model is shared (loaded LoRAs, the active one and its strength, the
scheduler), so every concurrent result is compared, pixel for pixel, with the same request run alone on a separate
manager; and the transformer's base weights must hash the same afterwards.
"""

from __future__ import annotations

import concurrent.futures
import errno
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hostile
import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError
from PIL import Image

from fluxdemo.config import get_preset
from fluxdemo.manager import ModelManager
from fluxdemo.pipeline import GenerateOptions, compare, generate, sweep
from fluxdemo.studio import build_studio

ROOT = Path(__file__).resolve().parents[1]
SIZE = dict(steps=2, width=16, height=16)
CONCURRENT = 28
MAX_UPLOAD = 2**20


def options(i: int) -> GenerateOptions:
    return GenerateOptions(f"request {i % 5}: a lighthouse at dusk", seed=100 + i, guidance=3.5, **SIZE)


# (endpoint, LoRA or None, strength): every LoRA of the kit, strengths from off to over-driven, and plain images
MIX = [
    ("compare", "peft.safetensors", 0.5),
    ("generate", None, 1.0),
    ("compare", "kohya.safetensors", 1.0),  # also adapts CLIP: the prompt embeddings depend on it
    ("generate", "comfy.safetensors", 0.8),
    ("compare", "xlabs.safetensors", 1.5),
    ("generate", "kohya.safetensors", 0.3),
    ("compare", "comfy.safetensors", 0.0),
    ("sweep", "peft.safetensors", "0, 0.7, 1.4"),
]


def api_args(o: GenerateOptions, lora: str | None, strength) -> tuple:
    return o.prompt, lora, strength, o.seed, o.steps, o.guidance, o.width, o.height


def alone(manager: ModelManager, endpoint: str, o: GenerateOptions, lora: str | None, strength) -> list[np.ndarray]:
    """The library's own result for one request, as the images the endpoint returns, in order."""
    if endpoint == "compare":
        images = compare(manager, o, lora, strength).images
    elif endpoint == "sweep":
        images = sweep(manager, o, lora, [float(s) for s in strength.split(",")]).images
    else:
        images = generate(manager, o, lora, strength).images
    return [np.asarray(image) for image in images.values()]


def served(endpoint: str, result) -> list[np.ndarray]:
    """The images of a gradio_client result, read from the PNGs it downloaded."""
    first = result[0]
    if endpoint == "compare":
        paths = list(first)
    elif endpoint == "sweep":
        paths = [item["image"] for item in first]
    else:
        paths = [first]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def lora_dir(tiny_kit: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("security-app") / "loras"
    shutil.copytree(tiny_kit / "loras", folder)
    return folder


@pytest.fixture(scope="module")
def app_manager(lora_dir: Path) -> ModelManager:
    return ModelManager(get_preset("tiny", use_env=False), device="cpu", lora_dir=lora_dir)


@pytest.fixture(scope="module")
def clean(lora_dir: Path) -> ModelManager:
    """A second manager over the same files: each request run alone, for the expected results."""
    return ModelManager(get_preset("tiny", use_env=False), device="cpu", lora_dir=lora_dir)


@contextmanager
def launched(manager: ModelManager, queue_size: int) -> Iterator[str]:
    demo = build_studio(manager, max_upload_bytes=MAX_UPLOAD, queue_size=queue_size)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, max_file_size=MAX_UPLOAD)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def url(app_manager: ModelManager) -> Iterator[str]:
    with launched(app_manager, queue_size=64) as local_url:
        yield local_url


@pytest.fixture(scope="module")
def client(url: str) -> Client:
    return Client(url, verbose=False)


def wait_until_running(job, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while job.status().code.name not in ("PROCESSING", "PROGRESS", "ITERATING"):
        assert not job.done() and time.monotonic() < deadline, f"never started: {job.status()}"
        time.sleep(0.02)


def wait_for_an_empty_queue(url: str, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while httpx.get(f"{url.rstrip('/')}/gradio_api/queue/status", timeout=10).json()["queue_size"]:
        assert time.monotonic() < deadline, "the queue never emptied"
        time.sleep(0.05)


# --- 1. isolation under load --------------------------------------------------------------------------------------


def test_concurrent_requests_equal_the_same_requests_alone(url, app_manager, clean) -> None:
    requests = [(MIX[i % len(MIX)], options(i)) for i in range(CONCURRENT)]
    base_hash = hostile.base_weights_hash(app_manager.get("transformer"))

    def one(item):
        (endpoint, lora, strength), o = item
        # one client per user: its own session, its own connection, as separate browsers would have
        return Client(url, verbose=False).submit(*api_args(o, lora, strength), api_name=f"/{endpoint}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        jobs = list(pool.map(one, requests))
    results = [job.result(timeout=300) for job in jobs]  # an error in any of them fails here, with its message

    for ((endpoint, lora, strength), o), result in zip(requests, results, strict=True):
        expected = alone(clean, endpoint, o, lora, strength)
        assert same(served(endpoint, result), expected), f"{endpoint} {lora} {strength} seed {o.seed}"
    assert hostile.base_weights_hash(app_manager.get("transformer")) == base_hash
    hostile.check_consistent(app_manager)


def test_a_full_queue_turns_requests_away_with_a_clear_message(app_manager, clean) -> None:
    o = options(0)
    with launched(app_manager, queue_size=2) as local_url:
        client = Client(local_url, verbose=False)
        with app_manager.session():  # the model is busy: the first job runs into the lock, the rest wait
            first = client.submit(*api_args(o, None, 1.0), api_name="/generate")
            wait_until_running(first)
            jobs = [client.submit(*api_args(o, None, 1.0), api_name="/generate") for _ in range(5)]
            outcomes = []
            for job in jobs:
                try:
                    job.result(timeout=3)  # a full queue answers at once; an accepted job waits for the lock
                    outcomes.append("done")
                except QueueError as e:
                    outcomes.append(str(e))
                except concurrent.futures.TimeoutError:
                    outcomes.append("waiting")
        full = [x for x in outcomes if "Queue is full" in x]
        assert len(full) == 3 and outcomes.count("waiting") == 2, outcomes
        expected = alone(clean, "generate", o, None, 1.0)
        for job in [first, *(j for j, x in zip(jobs, outcomes, strict=True) if x == "waiting")]:
            assert same(served("generate", job.result(timeout=60)), expected)


# --- 4. clients that go away --------------------------------------------------------------------------------------

CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from gradio_client import Client
    url, steps, want = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    job = Client(url, verbose=False).submit("a client that leaves", None, 1.0, 3, steps, 3.5, 16, 16,
                                            api_name="/generate")
    while job.status().code.name not in want.split(","):
        time.sleep(0.02)
    print("reached", job.status().code.name, flush=True)
    time.sleep(600)
    """
)


def start_leaving_client(url: str, steps: int, until: str) -> subprocess.Popen:
    """A client in its own process that submits a job, says when it has reached `until`, and then waits (killed)."""
    process = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, url, str(steps), until],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    line = process.stdout.readline()
    assert line.startswith("reached"), f"the client never got there: {line!r}"
    return process


@pytest.mark.parametrize("stage", ["queued", "running"])
def test_a_client_that_disconnects_leaves_the_app_clean(url, client, app_manager, clean, stage) -> None:
    o = options(1)
    expected = alone(clean, "compare", o, "kohya.safetensors", 0.9)
    client.predict(*api_args(o, "kohya.safetensors", 0.9), api_name="/compare")
    before = hostile.rest_state(app_manager)
    if stage == "queued":
        with app_manager.session():  # busy: the leaving client's job waits in the queue, then the client dies
            blocker = client.submit(*api_args(o, None, 1.0), api_name="/generate")
            wait_until_running(blocker)
            leaving = start_leaving_client(url, 2, "IN_QUEUE")
            leaving.kill()
        blocker.result(timeout=60)
    else:
        leaving = start_leaving_client(url, 40, "PROGRESS,PROCESSING")
        leaving.kill()
    leaving.wait(timeout=30)
    wait_for_an_empty_queue(url)
    with app_manager.session():  # what still runs for the dead client ends first, and nothing starts meanwhile
        assert hostile.rest_state(app_manager) == before
        hostile.check_consistent(app_manager)
    assert same(
        served("compare", client.predict(*api_args(o, "kohya.safetensors", 0.9), api_name="/compare")), expected
    )


# --- 2. paths: LoRA names, gradio's file routes, uploads ----------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "/etc/passwd", "black-forest-labs/FLUX.1-dev", "../loras/peft.safetensors", "{lora}"],
)
def test_api_lora_names_must_be_listed_files(client, lora_dir, name) -> None:
    name = name.replace("{lora}", str(lora_dir / "peft.safetensors"))  # its absolute path is not its name
    with pytest.raises(AppError) as error:
        client.predict(*api_args(options(2), name, 1.0), api_name="/compare")
    assert "root:" not in str(error.value)
    with pytest.raises(AppError):
        client.predict(name, api_name="/inspect_lora")


def file_route_probes(lora_dir: Path, kit: Path) -> list[str]:
    project = ROOT
    targets = [
        str(lora_dir / "peft.safetensors"),
        str(kit / "gguf" / "flux1-tiny-Q8_0.gguf"),
        str(kit / "transformer" / "config.json"),
        str(project / "app.py"),
        "app.py",
        "fluxdemo/studio.py",
        "pyproject.toml",
        "/etc/passwd",
        "../../../../../../etc/passwd",
        "..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "%252e%252e%252f%252e%252e%252fetc%252fpasswd",
        "..\\..\\..\\..\\etc\\passwd",
        "//etc/passwd",
        "file:///etc/passwd",
        "~/.bashrc",
        f"{project}/../../../etc/passwd",
    ]
    return [f"{prefix}{target}" for prefix in ("/gradio_api/file=", "/file=") for target in targets]


def test_file_routes_serve_nothing_of_the_machine(url, lora_dir, tiny_kit) -> None:
    secrets = [(lora_dir / "peft.safetensors").read_bytes()[:64], b"root:x:0:0", b"[tool.ruff]", b"def build_studio"]
    with httpx.Client(base_url=url.rstrip("/"), timeout=10) as http:
        for probe in file_route_probes(lora_dir, tiny_kit):
            response = http.get(probe)
            assert response.status_code in (400, 403, 404), f"{probe}: {response.status_code}"
            assert not any(s in response.content for s in secrets), probe


def test_hostile_uploads_are_refused_and_the_app_keeps_serving(client, url, lora_dir, tiny_kit, tmp_path, clean):
    peft = (tiny_kit / "loras" / "peft.safetensors").read_bytes()
    canary = tmp_path / "unpickled"
    files = {
        "pickle.safetensors": hostile.malicious_pickle(canary),
        "zip.safetensors": hostile.torch_zip(),
        "bomb.safetensors": hostile.pack(b'{"a":' * 100_000),
        "lying.safetensors": hostile.pack({"x": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}),
        "cut.safetensors": peft[: len(peft) // 2],
        "big.safetensors": peft + b"\0" * MAX_UPLOAD,
    }
    before = sorted(p.name for p in lora_dir.iterdir())
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        # gradio_client itself refuses a file over the app's max_file_size (ValueError) before sending it
        with pytest.raises(ValueError if name == "big.safetensors" else AppError):
            client.predict(handle_file(tmp_path / name), api_name="/upload_lora")
    assert not canary.exists()
    assert sorted(p.name for p in lora_dir.iterdir()) == before

    # A browser can send any file name; a script can send "../../escape.safetensors". It is a label at most.
    response = httpx.post(
        f"{url.rstrip('/')}/gradio_api/upload", files=[("files", ("../../escape.safetensors", peft))]
    )
    (uploaded,) = response.json()
    file = {"path": uploaded, "orig_name": "../../escape.safetensors", "meta": {"_type": "gradio.FileData"}}
    stored = client.predict(file, api_name="/upload_lora")
    assert (lora_dir / stored).read_bytes() == peft and "/" not in stored
    assert not any(
        p.exists() for p in (lora_dir.parent / "escape.safetensors", lora_dir.parent.parent / "escape.safetensors")
    )
    (lora_dir / stored).unlink()

    o = options(3)
    result = client.predict(*api_args(o, "peft.safetensors", 1.0), api_name="/compare")
    assert same(served("compare", result), alone(clean, "compare", o, "peft.safetensors", 1.0))


# --- 6. outputs on a full disk -------------------------------------------------------------------------------------


def test_a_full_disk_is_a_clear_error_and_the_next_run_works(client, clean, monkeypatch, lora_dir, tiny_kit) -> None:
    """The disk fills while the app writes a result (ENOSPC at the fsync, where a full disk shows on most
    filesystems): the client reads a sentence, not a traceback or the server's paths, and the next run is whole.
    tests/test_images.py fills a real 64 kB tmpfs for the library's side of this."""
    o = options(6)
    expected = alone(clean, "compare", o, "peft.safetensors", 1.0)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(AppError, match="disk is full") as error:
        client.predict(*api_args(o, "peft.safetensors", 1.0), api_name="/compare")
    monkeypatch.undo()
    leaked = [p for p in [*machine_paths(lora_dir, tiny_kit), tempfile.gettempdir()] if p in str(error.value)]
    assert leaked == [], f"{error.value} shows {leaked}"
    result = client.predict(*api_args(o, "peft.safetensors", 1.0), api_name="/compare")
    assert same(served("compare", result), expected)


# --- 5. what a page and its API show ------------------------------------------------------------------------------


def machine_paths(lora_dir: Path, kit: Path) -> list[str]:
    return [str(p) for p in (lora_dir, kit, Path.home(), ROOT, lora_dir.parent) if str(p) not in ("/", "")]


def test_page_and_api_list_no_absolute_paths(url, client, lora_dir, tiny_kit) -> None:
    with httpx.Client(base_url=url.rstrip("/"), timeout=10) as http:
        pages = {route: http.get(route).text for route in ("/", "/config", "/gradio_api/info")}
    for route, text in pages.items():
        leaked = [p for p in machine_paths(lora_dir, tiny_kit) if p in text]
        assert leaked == [], f"{route} shows {leaked}"
    # and neither do the errors a client sees, nor the LoRA report
    messages = [client.predict("peft.safetensors", api_name="/inspect_lora").__repr__()]
    for args in (api_args(options(4), "../../etc/passwd", 1.0), api_args(options(4), "missing.safetensors", 1.0)):
        with pytest.raises(AppError) as error:
            client.predict(*args, api_name="/compare")
        messages.append(str(error.value))
    for message in messages:
        leaked = [p for p in machine_paths(lora_dir, tiny_kit) if p in message]
        assert leaked == [], f"{message[:200]} shows {leaked}"


def load_app():
    """app.py as a module (it is a script at the project root, not part of the package)."""
    spec = importlib.util.spec_from_file_location("app", ROOT / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    return app


def run_app(monkeypatch: pytest.MonkeyPatch, manager: ModelManager, flags: tuple[str, ...]) -> tuple:
    """app.main with these flags over our manager, stopped at demo.launch -> (the Blocks it built, launch kwargs)."""
    import gradio as gr

    app = load_app()
    launches: list[tuple] = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launches.append((self, kwargs)))
    monkeypatch.setattr(app, "manager_from_args", lambda args: (manager, None))
    loggers = [logging.getLogger(n) for n in ("", "diffusers", "transformers", "httpx", "huggingface_hub")]
    levels = [logger.level for logger in loggers]  # main() sets them for a terminal; the test session keeps its own
    try:
        assert app.main(["--model", "tiny", *flags]) == 0
    finally:
        monkeypatch.undo()
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    (launch,) = launches
    return launch


@pytest.mark.parametrize(
    ("flags", "public"),
    [
        (("--share",), True),
        (("--host", "0.0.0.0"), True),
        (("--share", "--auth", "me:secret"), True),
        (("--host", "127.0.0.1"), False),
    ],
)
def test_public_launch_posture(monkeypatch, app_manager, caplog, flags, public) -> None:
    """--share or a public host: a warning unless --auth is set, no monitoring endpoints, server errors hidden."""
    with caplog.at_level(logging.WARNING):
        _, kwargs = run_app(monkeypatch, app_manager, flags)
    warned = any("--auth" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert warned == (public and "--auth" not in flags)
    assert (kwargs.get("enable_monitoring"), kwargs.get("show_error")) == ((False, False) if public else (None, None))


def test_public_app_serves_no_monitoring_no_error_details_and_asks_for_a_login(monkeypatch, app_manager, lora_dir):
    """The app as app.py builds it for `--share --auth`, launched on loopback (no tunnel) and driven from outside."""
    import fluxdemo.studio

    demo, kwargs = run_app(monkeypatch, app_manager, ("--share", "--auth", "me:secret"))
    local = {"share": False, "server_name": "127.0.0.1", "server_port": None}
    demo.launch(**{**kwargs, **local}, prevent_thread_lock=True, quiet=True)
    try:
        with httpx.Client(base_url=demo.local_url.rstrip("/"), timeout=10) as http:
            assert http.get("/gradio_api/info").status_code == 401  # nothing without a login
            assert http.post("/login", data={"username": "me", "password": "secret"}).status_code == 200
            # gradio's defaults serve per-function analytics here, and print a dashboard link to the server console
            for route in ("/monitoring", "/monitoring/summary"):
                assert http.get(route).status_code == 403, route
        secret = f"internal detail {lora_dir}"

        def broken(*args, **kwargs):
            raise RuntimeError(secret)

        monkeypatch.setattr(fluxdemo.studio, "generate", broken)
        client = Client(demo.local_url, auth=("me", "secret"), verbose=False)
        with pytest.raises(AppError) as error:
            client.predict(*api_args(options(5), None, 1.0), api_name="/generate")
        assert "internal detail" not in str(error.value) and str(lora_dir) not in str(error.value)
    finally:
        demo.close()
