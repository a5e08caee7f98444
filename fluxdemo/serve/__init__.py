"""Scale-out on Ray Serve (the optional extra `pip install "fluxdemo[ray]"`): a model's runs made on N replicas.

Only `python app.py --ray` and `fluxdemo serve` import this wing; without them Ray is never imported.
"""

from fluxdemo.serve.deploy import APP, ServeSettings, connect, deploy, running_replicas, serve_forever, serve_model
from fluxdemo.serve.front import RayFront

__all__ = ["APP", "RayFront", "ServeSettings", "connect", "deploy", "running_replicas", "serve_forever", "serve_model"]
