"""The Ray Serve deployments: ``ModelServer`` (one deployment per registry model) and ``Ingress``.

Each ``ModelServer`` replica owns an ``Engine`` with its model warm: requests that reach it wait in
that engine's queue and batch there, exactly as in the single-process app. ``generate`` streams
``StreamEvent``s (which replica took the request, progress at each step, then the result or the
engine error), so the ingress can report progress and stop a request by cancelling its stream.

``Ingress`` serves the same FastAPI + Gradio app as ``python app.py`` (built by ``app.build_server``)
around a ``ClusterEngine`` that sends each job to its model's deployment handle.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from ray import serve
from ray.serve.handle import DeploymentHandle

from .config import APP_NAME, ServeOptions

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often a replica reports on a request it is running (and notices a cancel)


@dataclass(frozen=True)
class StreamEvent:
    """One message of a ``generate`` stream: ``replica`` (payload: ``ReplicaInfo``), ``queued``
    (payload: position in the replica's queue), ``progress`` (a ``Progress``), ``result`` (a
    ``GenerateResult``) or ``error`` (the ``EngineError`` the request ended with)."""

    kind: str
    payload: Any = None


@dataclass(frozen=True)
class ReplicaInfo:
    replica_id: str
    startup_s: float  # constructor to ready: load and warm-up (the cold start a request may wait for)


class ModelServer:
    """One replica: an ``Engine`` on this node's backend with ``model`` warm at its first size."""

    def __init__(self, options: ServeOptions, model: str):
        started = time.perf_counter()
        import torch

        from engine import Engine, EngineSettings
        from engine.backends import make_backend

        torch.set_num_threads(options.threads)
        registry = options.load_registry()
        spec = registry.get(model)
        self.engine = Engine(registry, make_backend(options.backend, options.neuron_target),
                             EngineSettings(max_warm=len(spec.resolutions), workers=1, batch_wait_s=options.batch_wait_s))
        self.engine.set_default_model(spec.id)
        self.engine.load(spec.id)
        context = serve.get_replica_context()
        self.info = ReplicaInfo(str(context.replica_id.unique_id), time.perf_counter() - started)
        log.info("replica %s of %s ready in %.1fs", self.info.replica_id, spec.id, self.info.startup_s)

    async def generate(self, request: Any, owner: str) -> AsyncIterator[StreamEvent]:
        """Run ``request`` (a ``GenerateRequest`` with its seed fixed) in this replica's engine."""
        from engine import EngineError

        yield StreamEvent("replica", self.info)
        try:
            job = self.engine.submit(request, owner=owner)
        except EngineError as exc:
            yield StreamEvent("error", exc)
            return
        try:
            while not await asyncio.to_thread(job.wait, POLL_S):
                yield (StreamEvent("queued", job.position) if job.state == "queued"
                       else StreamEvent("progress", job.progress))
        except asyncio.CancelledError:  # the caller interrupted (or went away): stop at the next step
            job.interrupt()
            raise
        try:
            yield StreamEvent("result", job.result())
        except EngineError as exc:
            yield StreamEvent("error", exc)

    def load(self, size: Optional[Any]) -> float:
        """Warm this replica's model at ``size``; returns the load seconds."""
        return self.engine.load(self.engine.default_model, size).load_seconds

    def status(self) -> dict[str, Any]:
        return {"replica": self.info.replica_id, "startup_s": self.info.startup_s, **self.engine.status()}

    def check_health(self) -> None:
        """Serve's health check: a replica whose engine stopped is restarted."""
        if self.engine.scheduler.workers < 1:
            raise RuntimeError("the engine has no device worker")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


@serve.ingress()
class Ingress:
    """The UI and HTTP API of ``python app.py``, feeding the model deployments."""

    def __init__(self, options: ServeOptions, handles: dict[str, DeploymentHandle]):
        import os

        from ui.settings import parse_settings

        from .cluster_engine import ClusterEngine

        self.settings = parse_settings(list(options.app_flags), os.environ)
        registry = options.load_registry()
        self.engine = ClusterEngine(registry, options.backend, handles)

    def __serve_build_asgi_app__(self) -> Any:
        from app import build_server

        return build_server(self.engine, self.settings)


def build_application(options: ServeOptions) -> Any:
    """The Serve application: a ``ModelServer`` deployment per registry model, and the ingress."""
    from .config import model_deployment_options

    registry = options.load_registry()
    model_server = serve.deployment(ModelServer)
    handles = {
        spec.id: model_server.options(**model_deployment_options(spec, options, spec.id == registry.default_model))
        .bind(options, spec.id)
        for spec in registry.models if spec.id in options.models
    }
    ingress = serve.deployment(Ingress, name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    return ingress.bind(options, handles)


def run(options: ServeOptions, address: Optional[str], host: str, port: int, blocking: bool = True) -> Any:
    """Start (or join ``address`` / ``RAY_ADDRESS``) a Ray cluster and run the app on it at
    ``host:port``; blocks until Ctrl+C unless ``blocking`` is False (then returns the ingress handle)."""
    import ray

    root = str(Path(__file__).resolve().parent.parent)
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": root}})
    serve.start(http_options={"host": host, "port": port})
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    handle = serve.run(build_application(options), name=APP_NAME, route_prefix="/", blocking=False)
    print(f"* Running on local URL:  http://{shown}:{port}  (Ray Serve application {APP_NAME!r})", flush=True)
    if not blocking:
        return handle
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a service manager's stop: shut Serve down as Ctrl+C does
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("Shutting down Ray Serve", flush=True)
        serve.shutdown()
        ray.shutdown()
    return None
