"""Connect to Ray, deploy the replicas as the Serve application "fluxdemo", and make a model's runs go there."""

from __future__ import annotations

import atexit
import logging
import time
from dataclasses import dataclass

import ray
from ray import serve

from fluxdemo.errors import FluxdemoError
from fluxdemo.pipeline.model import Model
from fluxdemo.serve.front import RayFront
from fluxdemo.serve.replica import ModelSpec, deployment

logger = logging.getLogger(__name__)

APP = "fluxdemo"  # the Serve application's name: `fluxdemo serve` deploys it, `app.py --ray` uses or deploys it
DEPLOYMENT = "FluxReplica"
CPU_REPLICAS = 2  # replicas when the cluster has no GPU and none were asked for


@dataclass(frozen=True)
class ServeSettings:
    """Where and how many: `address` of a running Ray cluster (None: RAY_ADDRESS, a cluster started on this machine
    with `ray start`, else a new one here); `replicas` (None: the running application's, else one per GPU of the
    cluster, else CPU_REPLICAS); `threads`, torch threads per CPU replica (None: the cluster's CPUs shared out);
    `app`, the Serve application's name (two fronts of other models, or bench/scale.py's 1 and 2, side by side)."""

    address: str | None = None
    replicas: int | None = None
    threads: int | None = None
    app: str = APP

    def __post_init__(self) -> None:
        for name in ("replicas", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise FluxdemoError(f"--{name} must be at least 1, but is {value}.")


def connect(address: str | None) -> None:
    """Join (or start) the Ray cluster, and Serve on it without its HTTP proxy: the page calls handles."""
    if not ray.is_initialized():
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as e:
            where = "here or at RAY_ADDRESS" if address == "auto" else f"at {address}"
            raise FluxdemoError(
                f"No Ray cluster answers {where}: start one with `ray start --head`, then pass the address it "
                "prints (e.g. --ray 10.0.0.1:6379); a cluster with token authentication also wants RAY_AUTH_TOKEN."
            ) from e
    serve.start(proxy_location="Disabled")


def running_replicas(name: str = APP) -> int:
    """Replicas of the application running now (0: none deployed)."""
    app = serve.status().applications.get(name)
    if app is None or DEPLOYMENT not in app.deployments:
        return 0
    return app.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0)


def deploy(model: Model, settings: ServeSettings) -> tuple[serve.handle.DeploymentHandle, int]:
    """The replicas of `model`'s preset and flags, deployed (replacing a running application); (handle, replicas)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    replicas = settings.replicas or gpus or CPU_REPLICAS
    threads = settings.threads or (None if gpus else max(1, int(ray.cluster_resources()["CPU"]) // replicas))
    spec = ModelSpec(
        model.preset,
        model.requested_strategy,
        str(model.lora_dir),
        model.hub_loras,
        threads,
        model.weights,
        model.compile,
    )
    where = f"{replicas} GPU replicas" if gpus else f"{replicas} CPU replicas of {threads} threads"
    logger.info("Ray Serve: deploying %s of %s", where, model.preset.name)
    handle = serve.run(deployment(spec, replicas, bool(gpus)), name=settings.app, route_prefix=None)
    return handle, replicas


def serve_model(model: Model, settings: ServeSettings) -> RayFront:
    """Make `model`'s runs go to Ray Serve replicas: the running application's when no replica count is asked for,
    else freshly deployed ones (taken down when this process ends)."""
    connect(settings.address)
    replicas = running_replicas(settings.app) if settings.replicas is None else 0
    if replicas:
        handle = serve.get_app_handle(settings.app)
        logger.info("Ray Serve: using the running application %r (%d replicas)", settings.app, replicas)
    else:
        handle, replicas = deploy(model, settings)
        atexit.register(_take_down, settings.app)
    front = RayFront(handle, replicas)
    model.runner = front
    return front


def _take_down(app: str) -> None:
    """The replicas this process deployed, taken down as it ends (unless Ray went first)."""
    if ray.is_initialized():
        serve.delete(app)


def serve_forever(model: Model, settings: ServeSettings) -> None:
    """`fluxdemo serve`: the replicas deployed on a running cluster (a process's own Ray would end with it) and kept
    up until Ctrl+C; `python app.py --ray ADDRESS` then sends its runs there."""
    connect(settings.address or "auto")
    _, replicas = deploy(model, settings)
    address = ray.get_runtime_context().gcs_address
    logger.info(
        "%d replicas of %s are up as the Serve application %r; start the page with: python app.py --ray %s "
        "(Ctrl+C here takes them down)",
        replicas,
        model.preset.name,
        settings.app,
        address,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(settings.app)
