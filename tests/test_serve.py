"""Scale-out on Ray Serve (issue 20), on the CPU: one local Ray instance for the module, the tiny kit, 2 replicas of
one torch thread each. The pictures are compared with the same work done in this process, at the same thread count
(a matrix product's reduction order, and so its last bits, follow the thread count)."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import ray  # the extra fluxdemo[ray]: requirements-dev.txt installs it
import torch
from helpers import START_S, open_client, tiny_model
from PIL import Image

import app
import fluxdemo.cli
from fluxdemo.errors import CancelledError, FluxdemoError
from fluxdemo.pipeline import Controls, GenerateOptions, ResultsCache, compare, generate, grid

OPTS = GenerateOptions("a lighthouse at dusk", seed=7, steps=3, width=32, height=32)
LORA = "peft.safetensors"


def pixels(image) -> np.ndarray:
    return np.asarray(image)


@pytest.fixture(scope="module")
def front(tiny_kit: Path):
    """(the front's model, its RayFront): 2 CPU replicas of 1 thread on a Ray started for this module."""
    from fluxdemo.serve import ServeSettings, serve_model

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    model = tiny_model(tiny_kit / "loras")
    runner = serve_model(model, ServeSettings(replicas=2, threads=1))
    yield model, runner
    # The module's own cluster ends, Serve's actors with it: serve.shutdown() first waited out each replica's
    # graceful shutdown for a cluster about to go (up to 6.6 s quiet and 17.6 s beside other work; this, 1.7 s).
    ray.shutdown()


@pytest.fixture
def one_thread():
    """This process at the replicas' thread count, for the in-process reference pictures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_compare_runs_on_two_replicas_and_equals_the_single_process_compare(front, tiny_kit, one_thread):
    model, _ = front
    cache = ResultsCache()
    result = compare(model, OPTS, LORA, 0.8, cache=cache)
    made_by = {label: entry.replica for label, entry in result.report.images.items()}
    assert made_by["baseline"] != made_by["lora"]  # the two images at once, on the two replicas
    assert set(result.report.replicas) == set(made_by.values())
    assert result.report.model.preset == "tiny" and result.report.batches == [["baseline"], ["lora"]]
    here = compare(tiny_model(tiny_kit / "loras"), OPTS, LORA, 0.8)
    for label in ("baseline", "lora"):
        assert np.array_equal(pixels(result.images[label]), pixels(here.images[label])), label
    assert result.report.images["lora"].loras == here.report.images["lora"].loras
    # The results cache stays in front: a new strength reuses the baseline, wherever it was made.
    again = compare(model, OPTS, LORA, 0.4, cache=cache)
    assert "baseline" in again.report.reused and again.report.images["baseline"].replica is None
    assert list(again.report.replicas) == [again.report.images["lora"].replica]
    assert np.array_equal(pixels(again.images["baseline"]), pixels(result.images["baseline"]))


def test_a_fast_compare_fanned_out_skips_the_same_steps_on_both_replicas(front):
    """--fast's schedule is static: the baseline and the LoRA image skip the same steps on different replicas."""
    result = compare(front[0], replace(OPTS, steps=6, fast=True), LORA, 0.8).report
    assert result.images["baseline"].replica != result.images["lora"].replica
    assert result.images["baseline"].skipped_steps == result.images["lora"].skipped_steps == [3, 5]
    assert result.fast.steps == 6


def test_a_replica_killed_during_a_grid_costs_one_retry_and_the_next_request_works(front, one_thread):
    model, runner = front
    killed: list[str] = []

    def kill_the_first_busy_replica(stage: str, done: int, total: int) -> None:
        if not killed and runner.busy:
            name, actor = next(iter(runner.busy.items()))
            ray.kill(ray.get_actor(actor, namespace="serve"), no_restart=True)
            killed.append(name)

    options = GenerateOptions("grid", steps=4, width=32, height=32)
    rows, strengths = ["peft.safetensors", "xlabs.safetensors:0.5"], [0, 0.5, 1]
    try:
        result = grid(model, options, ["a fox"], [1], rows, strengths, Controls(progress=kill_the_first_busy_replica))
    except FluxdemoError as e:  # the only other outcome allowed: a sentence
        assert str(e).startswith("The model replica making ") and str(e).endswith("run it again."), str(e)
    else:
        assert killed and len(result.images) == 6
        assert killed[0] not in {entry.replica for entry in result.report.images.values()}
        for cell in result.report.cells:  # every cell is the picture a single process makes
            stack = [(x.name, x.strength) for x in cell.loras]
            one = generate(tiny_model(model.lora_dir, model.preset), replace(options, prompt="a fox", seed=1), stack)
            assert np.array_equal(pixels(result.images[cell.label]), pixels(next(iter(one.images.values()))))
    after = generate(model, OPTS, LORA)
    assert after.report.images["lora"].replica != killed[0]


def test_cancel_stops_the_job_on_its_replica(front):
    model, runner = front

    def cancel_once_started() -> bool:
        return bool(runner.busy)

    with pytest.raises(CancelledError):
        generate(model, replace(OPTS, steps=100), LORA, controls=Controls(cancelled=cancel_once_started))
    assert generate(model, OPTS).report.images["baseline"].replica  # the replicas serve the next request


def test_the_studio_on_replicas_lets_one_job_in_per_replica_and_shows_who_made_what(front, tiny_kit, one_thread):
    from fluxdemo.studio import build_studio

    model, _ = front
    demo = build_studio(model)
    limits = {fn.api_name: fn.concurrency_limit for fn in demo.fns.values() if fn.concurrency_id == "gpu"}
    assert limits == {"compare": 2, "generate": 2, "sweep": 2, "grid": 2}
    demo.launch(prevent_thread_lock=True, quiet=True)
    try:
        client = open_client(demo.local_url)
        o = replace(OPTS, seed=11)
        (baseline, adapted), report = client.predict(
            o.prompt, LORA, 0.5, o.seed, o.steps, o.guidance, o.width, o.height, api_name="/compare"
        )
    finally:
        demo.close()
    assert {report["images"][label]["replica"] for label in ("baseline", "lora")} == set(report["replicas"])
    here = compare(tiny_model(tiny_kit / "loras", model.preset), o, LORA, 0.5)
    assert np.array_equal(np.asarray(Image.open(adapted).convert("RGB")), pixels(here.images["lora"]))
    assert np.array_equal(np.asarray(Image.open(baseline).convert("RGB")), pixels(here.images["baseline"]))


def test_without_ray_a_run_imports_no_ray(tiny_kit, tmp_path):
    script = (
        "import sys, app, fluxdemo.cli, fluxdemo.studio\n"
        f"assert fluxdemo.cli.main(['generate', '--model', 'tiny', '--prompt', 'p', '--steps', '1', '--width', '32', "
        f"'--height', '32', '--lora-dir', {str(tiny_kit / 'loras')!r}, '--out', {str(tmp_path / 'a.png')!r}]) == 0\n"
        "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))\n"
    )
    root = Path(app.__file__).parent
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=START_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_replicas_without_ray_is_a_sentence(caplog):
    with caplog.at_level(logging.ERROR):
        assert app.main(["--model", "tiny", "--replicas", "2"]) == 2
    assert "--replicas needs --ray: replicas are Ray Serve's." in [r.getMessage() for r in caplog.records]


def test_fluxdemo_serve_checks_its_flags_first(capsys):
    assert fluxdemo.cli.main(["serve", "--model", "tiny", "--replicas", "0"]) == 2
    assert capsys.readouterr().err == "error: --replicas must be at least 1, but is 0.\n"
