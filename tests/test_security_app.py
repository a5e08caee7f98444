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
import signal
import socket
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
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError, ValidationError
from gradio_client.utils import QueueError
from helpers import (
    HANG_S,
    MAX_UPLOAD,
    MIX,
    ROOT,
    START_S,
    alone,
    api_args,
    launched,
    open_client,
    options,
    same,
    served,
)

from fluxdemo.pipeline import STRENGTH_RANGE, Model
from fluxdemo.pipeline.limits import Limits

# Two passes over the mix of 8 (each endpoint and LoRA twice, with different prompts and seeds), queued at once from
# a client each: every request waits and runs among all the others. 28 (3.5 passes) cost 6 s more for no new kind.
CONCURRENT = 16


@pytest.fixture(scope="module")
def url(app_manager: Model) -> Iterator[str]:
    with launched(app_manager, queue_size=64) as local_url:
        yield local_url


@pytest.fixture(scope="module")
def client(url: str) -> Client:
    return open_client(url)


def wait_until_running(job, deadline_s: float = HANG_S) -> None:
    deadline = time.monotonic() + deadline_s
    while job.status().code.name not in ("PROCESSING", "PROGRESS", "ITERATING"):
        assert not job.done() and time.monotonic() < deadline, f"never started: {job.status()}"
        time.sleep(0.02)


def queue_answer(job) -> str:
    """ "waiting" once the queue took the job (it cannot run: the test holds the model), else the queue's refusal."""
    while not job.done() and job.status().code.name in ("STARTING", "JOINING_QUEUE"):
        time.sleep(0.02)
    if not job.done():
        return "waiting"
    try:
        job.result()
    except QueueError as e:
        return str(e)
    return "done"


def wait_for_an_empty_queue(url: str, deadline_s: float = HANG_S) -> None:
    deadline = time.monotonic() + deadline_s
    while httpx.get(f"{url.rstrip('/')}/gradio_api/queue/status", timeout=HANG_S).json()["queue_size"]:
        assert time.monotonic() < deadline, "the queue never emptied"
        time.sleep(0.05)


# --- 1. isolation under load --------------------------------------------------------------------------------------


def test_concurrent_requests_equal_the_same_requests_alone(url, app_manager, clean) -> None:
    requests = [(MIX[i % len(MIX)], options(i)) for i in range(CONCURRENT)]
    base_hash = hostile.base_weights_hash(app_manager.get("transformer"))

    def one(item):
        (endpoint, lora, strength), o = item
        # one client per user: its own session, its own connection, as separate browsers would have
        return open_client(url).submit(*api_args(o, lora, strength), api_name=f"/{endpoint}")

    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        jobs = list(pool.map(one, requests))
    results = [job.result(timeout=HANG_S) for job in jobs]  # an error in any of them fails here, with its message

    for ((endpoint, lora, strength), o), result in zip(requests, results, strict=True):
        expected = alone(clean, endpoint, o, lora, strength)
        assert same(served(endpoint, result), expected), f"{endpoint} {lora} {strength} seed {o.seed}"
    assert hostile.base_weights_hash(app_manager.get("transformer")) == base_hash
    hostile.check_consistent(app_manager)


def test_a_full_queue_turns_requests_away_with_a_clear_message(app_manager, clean) -> None:
    o = options(0)
    with launched(app_manager, queue_size=2, limits=Limits(max_jobs_per_client=8)) as local_url:  # one client
        client = open_client(local_url)
        with app_manager.session():  # the model is busy: the first job runs into the lock, the rest wait
            first = client.submit(*api_args(o, None, 1.0), api_name="/generate")
            wait_until_running(first)
            jobs = [client.submit(*api_args(o, None, 1.0), api_name="/generate") for _ in range(5)]
            outcomes = [queue_answer(job) for job in jobs]
        full = [x for x in outcomes if "Queue is full" in x]
        assert len(full) == 3 and outcomes.count("waiting") == 2, outcomes
        expected = alone(clean, "generate", o, None, 1.0)
        for job in [first, *(j for j, x in zip(jobs, outcomes, strict=True) if x == "waiting")]:
            assert same(served("generate", job.result(timeout=HANG_S)), expected)


# --- 4. clients that go away --------------------------------------------------------------------------------------

CLIENT_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from gradio_client import Client
    url, steps, want, side, hang_s = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    job = Client(url, verbose=False, httpx_kwargs={"timeout": hang_s}).submit(
        "a client that leaves", None, 1.0, 3, steps, 3.5, side, side, api_name="/generate"
    )
    while job.status().code.name not in want.split(","):
        time.sleep(0.02)
    print("reached", job.status().code.name, flush=True)
    time.sleep(600)
    """
)


def start_leaving_client(url: str, steps: int, until: str, side: int = 16) -> subprocess.Popen:
    """A client in its own process that submits a job, says when it has reached `until`, and then waits (killed)."""
    process = subprocess.Popen(
        [sys.executable, "-c", CLIENT_SCRIPT, url, str(steps), until, str(side), str(HANG_S)],
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
        blocker.result(timeout=HANG_S)
    else:
        leaving = start_leaving_client(url, 40, "PROGRESS,PROCESSING")
        leaving.kill()
    leaving.wait(timeout=HANG_S)
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
    with pytest.raises((AppError, ValidationError)) as error:  # a Hub-shaped name is refused before the queue
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
        "fluxdemo/studio/page.py",
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
    with httpx.Client(base_url=url.rstrip("/"), timeout=HANG_S) as http:
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
    with httpx.Client(base_url=url.rstrip("/"), timeout=HANG_S) as http:
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


def run_app(monkeypatch: pytest.MonkeyPatch, manager: Model, flags: tuple[str, ...]) -> tuple:
    """app.main with these flags over our manager, stopped at demo.launch -> (the Blocks it built, launch kwargs)."""
    import gradio as gr

    app = load_app()
    launches: list[tuple] = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launches.append((self, kwargs)))
    monkeypatch.setattr(app, "manager_from_args", lambda args, hub_loras: (manager, None))
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
    import fluxdemo.studio.work

    demo, kwargs = run_app(monkeypatch, app_manager, ("--share", "--auth", "me:secret"))
    local = {"share": False, "server_name": "127.0.0.1", "server_port": None}
    demo.launch(**{**kwargs, **local}, prevent_thread_lock=True, quiet=True)
    try:
        with httpx.Client(base_url=demo.local_url.rstrip("/"), timeout=HANG_S) as http:
            assert http.get("/gradio_api/info").status_code == 401  # nothing without a login
            assert http.post("/login", data={"username": "me", "password": "secret"}).status_code == 200
            # gradio's defaults serve per-function analytics here, and print a dashboard link to the server console
            for route in ("/monitoring", "/monitoring/summary"):
                assert http.get(route).status_code == 403, route
        secret = f"internal detail {lora_dir}"

        def broken(*args, **kwargs):
            raise RuntimeError(secret)

        monkeypatch.setattr(fluxdemo.studio.work, "generate", broken)
        client = open_client(demo.local_url, auth=("me", "secret"))
        with pytest.raises(AppError) as error:
            client.predict(*api_args(options(5), None, 1.0), api_name="/generate")
        assert "internal detail" not in str(error.value) and str(lora_dir) not in str(error.value)
    finally:
        demo.close()


# --- 7. bounds on every request, a work budget, what a visitor cannot reach (pipeline/limits.py, studio/admission.py)


def refusal(response: httpx.Response) -> str:
    """The sentence of a request gradio's queue refused before queueing it (HTTP 422, gradio's validation shape)."""
    assert response.status_code == 422, (response.status_code, response.text[:300])
    (problem,) = response.json()["detail"]
    return problem["message"]


def test_huge_prompts_are_refused_before_the_queue_and_leave_no_memory_behind(url) -> None:
    """20 requests with 10 MB prompts, sent raw to the queue as a script would: each is refused with a sentence,
    before it is queued or kept, and the server (this process) grows by less than 50 MB in all."""
    fn = hostile.fn_index(url, "compare")
    body = hostile.join_body(fn, ["x" * 10 * 2**20, "peft.safetensors", 1.0, 1, 2, 3.5, 16, 16], "flood")
    with httpx.Client(base_url=url.rstrip("/"), timeout=HANG_S) as http:
        hostile.join(http, body)  # the first one warms gradio's and httpx's buffers
        before = hostile.rss_bytes()
        for _ in range(20):
            assert refusal(hostile.join(http, body)) == (
                "`Prompt` is 10,485,760 characters; the limit is 2,000 (the operator can raise it with "
                "--max-prompt-chars or FLUXDEMO_MAX_PROMPT_CHARS)."
            )
        grown = hostile.rss_bytes() - before
    assert grown < 50 * 2**20, f"RSS grew by {grown / 2**20:.0f} MB"


@pytest.mark.parametrize(
    ("index", "value", "sentence"),
    [
        (1, 5, "`LoRA` must be one name (text), but is a number."),
        (1, ["peft.safetensors"], "`LoRA` must be one name (text), but is a list."),
        (2, "NaN", "`LoRA strength` must be a finite number, but is nan."),
        (2, "Infinity", "`LoRA strength` must be a finite number, but is inf."),
        (2, 7.5, "`LoRA strength` must be between 0 and 2, but is 7.5."),
        (2, "1.0", "`LoRA strength` must be a number, but is text ('1.0')."),
        (4, True, "`Steps` must be a number, but is True (a yes/no)."),
        (0, {"a": 1}, "`Prompt` must be text, but is an object."),
    ],
)
def test_wrong_types_and_non_finite_numbers_are_sentences_before_any_handler_runs(url, index, value, sentence):
    data = ["a cat", "peft.safetensors", 1.0, 1, 2, 3.5, 16, 16]
    data[index] = value
    raw = hostile.join_body(hostile.fn_index(url, "compare"), data, "types").decode()
    raw = raw.replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")  # as a script sends them, unquoted
    with httpx.Client(base_url=url.rstrip("/"), timeout=HANG_S) as http:
        assert refusal(hostile.join(http, raw)) == sentence


def test_the_heaviest_request_is_refused_at_once_and_runs_when_the_operator_raises_the_limit(client, app_manager):
    heaviest = ("a cat", "peft.safetensors", "0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 2", 1, 100, 3.5, 2048, 2048)
    with pytest.raises(ValidationError) as error:  # refused before it is queued
        client.predict(*heaviest, api_name="/sweep")
    assert str(error.value) == "1 parameter(s) failed validation:\n- request: " + (
        "This request is 8 images x 100 steps at 2048x2048 (with the prompt's tokens and the decode) = 3,415 units of "
        "work; the limit is 512 (the operator can raise it with --max-work or FLUXDEMO_MAX_WORK). Ask for fewer "
        "images, fewer steps or a smaller size."
    )
    # The same sweep at 10 steps and 16x16 (18.28 units: each step carries the prompt's tokens), against a limit
    # lowered below it and then raised above it
    small = (*heaviest[:4], 10, 3.5, 16, 16)
    lowered = pytest.raises(ValidationError, match=r"= 18 units of work; the limit is 18.2 \(the operator can raise")
    with launched(app_manager, queue_size=4, limits=Limits(max_work=18.2)) as local_url, lowered:
        open_client(local_url).predict(*small, api_name="/sweep")
    with launched(app_manager, queue_size=4, limits=Limits(max_work=18.3)) as local_url:
        gallery, report = open_client(local_url).predict(*small, api_name="/sweep")
    assert len(gallery) == 8 and report["options"]["steps"] == 10


def wait_for_step(job, at_least: int, deadline_s: float = HANG_S) -> int:
    """The step the job's progress shows, once it is at least `at_least`."""
    deadline = time.monotonic() + deadline_s
    while True:
        progress = job.status().progress_data
        if progress and progress[0].index is not None and progress[0].index >= at_least:
            return progress[0].index
        assert not job.done() and time.monotonic() < deadline, f"never reached step {at_least}: {job.status()}"
        time.sleep(0.01)


def test_cancel_inspect_and_upload_work_while_the_model_queue_is_full(app_manager, tiny_kit, tmp_path) -> None:
    long, short = ("a long job", None, 1.0, 7, 100, 3.5, 512, 512), ("a short job", None, 1.0, 7, 2, 3.5, 16, 16)
    with launched(app_manager, queue_size=2) as local_url:
        victim = open_client(local_url)
        job = victim.submit(*long, api_name="/generate")
        wait_for_step(job, 2)
        fillers = [open_client(local_url).submit(*short, api_name="/generate") for _ in range(2)]
        for filler in fillers:
            while filler.status().code.name != "IN_QUEUE":
                time.sleep(0.01)
        with pytest.raises(QueueError, match="Queue is full"):
            open_client(local_url).predict(*short, api_name="/generate")

        # what a page does while it waits: read the LoRA's card, upload one; neither waits for the model (the long
        # job runs until Cancel below, and the fillers queue behind it meanwhile)
        assert victim.predict("peft.safetensors", api_name="/inspect_lora")["name"] == "peft.safetensors"
        (tmp_path / "mine.safetensors").write_bytes((tiny_kit / "loras" / "peft.safetensors").read_bytes())
        stored = victim.predict(handle_file(tmp_path / "mine.safetensors"), api_name="/upload_lora")
        assert not job.done() and [f.status().code.name for f in fillers] == ["IN_QUEUE", "IN_QUEUE"]
        (app_manager.adapters.library.folder / stored).unlink(missing_ok=True)

        wait_for_step(job, 3)
        victim.predict(api_name="/cancel")  # back once the flag is set; a 512x512 step takes longer than that
        progress = job.status().progress_data  # none once the job has ended: it stopped before this read
        seen = progress[0].index if progress and progress[0].index is not None else None
        with pytest.raises(AppError, match=r"^Cancelled during the baseline image, after step \d+ of 100\.") as error:
            job.result(timeout=HANG_S)
        stopped_at = int(str(error.value).split("after step ")[1].split(" ")[0])
        # the step it was in when Cancel answered, plus one: the progress this client reads lags by up to a step
        assert seen is None or stopped_at <= seen + 2, f"step {seen} when Cancel answered; it stopped at {stopped_at}"
        assert 3 <= stopped_at < 100
        for filler in fillers:  # the others' jobs were not touched: they run once the slot is free
            assert Path(filler.result(timeout=HANG_S)[0]).is_file()


def test_one_client_may_queue_two_model_jobs(app_manager) -> None:
    o = options(7)
    with launched(app_manager, queue_size=8) as local_url:
        client = open_client(local_url)
        with app_manager.session():  # the model is busy, so the first job waits for it
            jobs = [client.submit(*api_args(o, None, 1.0), api_name="/generate") for _ in range(2)]
            for job in jobs:  # both joined: waiting or running, they count
                while job.status().code.name in ("STARTING", "JOINING_QUEUE"):
                    time.sleep(0.01)
            with pytest.raises(ValidationError, match="You have 2 model jobs queued or running; the limit is 2 per"):
                client.predict(*api_args(o, None, 1.0), api_name="/generate")
            other = open_client(local_url).submit(*api_args(o, None, 1.0), api_name="/generate")
        for job in [*jobs, other]:
            job.result(timeout=HANG_S)


def test_a_job_whose_client_has_gone_stops_early(url, app_manager, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="fluxdemo.studio.guard"):
        leaving = start_leaving_client(url, 100, "PROGRESS", side=512)
        leaving.kill()
        with app_manager.session():  # free once the job has stopped; the whole job would take 100 steps
            pass
        # the handler logs after the job has let go of the model: wait for its line (a hang guard, not a limit)
        deadline = time.monotonic() + HANG_S
        while not (stopped := [r.getMessage() for r in caplog.records if r.getMessage().startswith("Cancelled")]):
            assert time.monotonic() < deadline, "the stopped job never said so"
            time.sleep(0.05)
    (stopped,) = stopped
    assert stopped.startswith("Cancelled during the baseline image, after step ") and stopped.endswith(" of 100.")
    assert int(stopped.split("after step ")[1].split(" ")[0]) < 100, stopped  # it did not run to its end


def test_no_event_lets_a_visitor_change_the_memory_strategy(url, app_manager) -> None:
    """The strategy is shown, not settable: no event takes it, and every event of the page, sent the name of a
    strategy for each input through the queue, leaves it as the operator set it."""
    config = httpx.get(f"{url.rstrip('/')}/config", timeout=HANG_S).json()
    (shown,) = [c for c in config["components"] if c["props"].get("label", "").startswith("Memory strategy")]
    assert shown["props"]["interactive"] is False
    assert not [d for d in config["dependencies"] if shown["id"] in d["inputs"]]
    before = (app_manager.requested_strategy, app_manager.strategy)
    with httpx.Client(base_url=url.rstrip("/"), timeout=HANG_S) as http:
        for dependency in config["dependencies"]:
            data = ["disk"] * len(dependency["inputs"])
            hostile.join(http, hostile.join_body(dependency["id"], data, "strategist"))
    wait_for_an_empty_queue(url)
    assert (app_manager.requested_strategy, app_manager.strategy) == before


def test_a_public_app_shows_no_facts_about_its_host(app_manager) -> None:
    with launched(app_manager, queue_size=4, public=True) as local_url:
        page = httpx.get(f"{local_url.rstrip('/')}/config", timeout=HANG_S).text
        _, report = open_client(local_url).predict(*api_args(options(8), None, 1.0), api_name="/generate")
    assert "RAM available" not in page and "Memory plan" not in page
    hidden = ("plan", "peak_rss_bytes", "peak_anon_rss_bytes", "peak_file_rss_bytes", "predicted_ram_bytes")
    assert not set(hidden) & set(report["memory"]), report["memory"]
    assert report["memory"]["strategy"] == app_manager.strategy


@pytest.mark.parametrize(
    ("flags", "env", "sentence"),
    [
        (("--queue-size", "0"), {}, "--queue-size (or FLUXDEMO_QUEUE_SIZE) must be at least 1, but is 0."),
        (("--queue-size", "-5"), {}, "--queue-size (or FLUXDEMO_QUEUE_SIZE) must be at least 1, but is -5."),
        (("--max-upload-mb", "0"), {}, "--max-upload-mb (or FLUXDEMO_MAX_UPLOAD_MB) must be at least 1, but is 0."),
        (("--auth", " : "), {}, "--auth (or FLUXDEMO_AUTH) must be USER:PASS, both parts non-empty, e.g. me:s3cret."),
        (("--max-work", "nan"), {}, "--max-work must be a finite number > 0, but is nan."),
        ((), {"FLUXDEMO_MAX_JOBS_PER_CLIENT": "0"}, "--max-jobs-per-client must be a whole number >= 1, but is 0."),
        (("--cache-images", "-1"), {}, "--cache-images (or FLUXDEMO_CACHE_IMAGES) must be 0 or more, but is -1."),
        ((), {"FLUXDEMO_BATCH": "9"}, "--batch (or FLUXDEMO_BATCH) must be from 1 to 8, but is 9."),
        (
            ("--preview-decoder", "/nowhere/taef1"),
            {},
            "The preview decoder /nowhere/taef1 is not a folder with config.json and safetensors weights: download "
            "TAEF1 with `hf download madebyollin/taef1 --local-dir /nowhere/taef1`, or pass `off`.",
        ),
        (
            (),
            {"FLUXDEMO_STRATEGY": "fast"},
            "--strategy (or FLUXDEMO_STRATEGY) must be one of auto, resident, "
            "model-offload, group-offload, disk, but is 'fast'.",
        ),  # fmt: skip
    ],
)
def test_bad_flags_are_a_sentence_and_exit_2(monkeypatch, caplog, flags, env, sentence) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = load_app()
    monkeypatch.setattr(app, "manager_from_args", lambda args: pytest.fail("started despite a bad flag"))
    with caplog.at_level(logging.ERROR):
        assert app.main(["--model", "tiny", *flags]) == 2
    assert sentence in [r.getMessage() for r in caplog.records]


def test_operator_flags_and_variables_set_the_limits(monkeypatch) -> None:
    app = load_app()
    args = app.build_parser({"FLUXDEMO_MAX_WORK": "2000", "FLUXDEMO_MAX_PROMPT_CHARS": "500"}).parse_args(
        ["--max-jobs-per-client", "4"]
    )
    low, high = STRENGTH_RANGE  # on this machine the studio takes the CLI's range (a public link: test_cli_names)
    assert app.check_flags(args) == Limits(
        max_prompt_chars=500, max_work=2000.0, max_jobs_per_client=4, strength_min=low, strength_max=high
    )


def test_one_client_may_not_fill_a_cheap_queue_group(url, tiny_kit, lora_dir) -> None:
    """Uploads (the `files` group) while one is stuck: the client's first four wait or run, a fifth is refused with
    a sentence, another client still gets in."""
    from fluxdemo.lora import upload as lora

    source = tiny_kit / "loras" / "peft.safetensors"
    client = open_client(url)
    with lora._UPLOAD_LOCK:  # every upload stops where it would store its file
        jobs = [client.submit(handle_file(source), api_name="/upload_lora") for _ in range(4)]
        for job in jobs:
            while job.status().code.name in ("STARTING", "JOINING_QUEUE"):
                time.sleep(0.01)
        with pytest.raises(ValidationError, match=r"You have 4 requests of this kind waiting; wait for them to fin"):
            client.predict(handle_file(source), api_name="/upload_lora")
        other = open_client(url).submit(handle_file(source), api_name="/upload_lora")
        while other.status().code.name in ("STARTING", "JOINING_QUEUE"):
            time.sleep(0.01)
    for job in [*jobs, other]:
        assert (lora_dir / job.result(timeout=HANG_S)).is_file()


def test_sigterm_removes_the_run_folders_as_ctrl_c_does(tmp_path) -> None:
    """How Spaces stop an app: SIGTERM. The app exits with 0 and its run folders are gone."""
    with socket_port() as port:
        pass
    env = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_ANALYTICS_ENABLED": "False"}
    app = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--model", "tiny", "--port", str(port)], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + START_S  # a hang guard for imports on a busy machine, not a speed limit
        while not _answers(f"http://127.0.0.1:{port}/gradio_api/info"):
            assert app.poll() is None and time.monotonic() < deadline, "the app never came up"
            time.sleep(0.5)
        assert list(tmp_path.glob("fluxdemo-studio-*"))
        app.send_signal(signal.SIGTERM)
        assert app.wait(timeout=HANG_S) == 0
    finally:
        app.kill()
    assert list(tmp_path.glob("fluxdemo-studio-*")) == []


def _answers(address: str) -> bool:
    try:
        return httpx.get(address, timeout=HANG_S).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def socket_port() -> Iterator[int]:
    """A free TCP port on loopback (closed again before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]
