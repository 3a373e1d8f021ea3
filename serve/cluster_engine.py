"""``ClusterEngine``: the engine facade of the Ray ingress (``python app.py --ray``).

The UI and HTTP API talk to it exactly as to ``Engine``: it *is* an ``Engine`` whose device
workers, instead of running a pipeline, send each job to its model's Serve deployment and relay the
stream back (progress, then the result). Requests still pass through the engine's one queue here
(positions, owners, interrupt), and validation and random seeds happen here, before a replica is
chosen, so a retried request makes the same image. Serve picks the replica and autoscales; each
replica's own engine batches what reaches it.

Differences from one process, all documented in docs/scaling.md: an interrupted request ends
without the images it had finished (its stream is cancelled); Skip is not available; models are
warmed and dropped by Serve's autoscaling, not by Load/Unload; the registry is read at deploy time.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import ray
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from engine import Cancelled, Engine, EngineSettings, ReplicaUnavailable, UnknownModel
from engine.registry import Registry
from engine.scheduler import Job
from engine.types import Size, VariantKey

from .config import APP_NAME, deployment_name

log = logging.getLogger(__name__)

IN_FLIGHT = 64  # requests the ingress has out to replicas at once; more wait in its queue
STATUS_TTL_S = 1.0


class _StreamEnded(Exception):
    """A replica's stream ended without a result (it was shut down mid-request)."""


_LOST = (RayActorError, ActorUnavailableError, _StreamEnded)  # the replica died or is restarting


class ClusterBackend:
    """What the faces read of a backend, for replicas running ``name`` somewhere in the cluster."""

    def __init__(self, name: str):
        self.name = name
        self.device = "Ray Serve cluster"
        self.fixed_shape = name != "eager"

    def stack_versions(self) -> dict[str, str]:
        return {"ray": ray.__version__}


@dataclass(frozen=True)
class RemoteWarm:
    """What ``ClusterEngine.load`` returns (the faces read ``key`` and ``load_seconds``)."""

    key: VariantKey
    load_seconds: float


class ClusterEngine(Engine):
    def __init__(self, registry: Registry, backend: str, handles: Mapping[str, Any], in_flight: int = IN_FLIGHT):
        self._handles = dict(handles)
        self._startup_s: dict[str, float] = {}  # model -> the slowest replica start seen (cold start)
        self._status_cache: tuple[float, dict[str, Any]] = (0.0, {})
        super().__init__(registry, ClusterBackend(backend),
                         EngineSettings(max_warm=max(1, len(self._handles)), workers=in_flight, batching=False))

    # --- the device work: one job, one stream from a replica --------------------------------------

    def _execute(self, jobs: list[Job[Any]]) -> list[Any]:
        return [self._run_load(job) if self.is_load_job(job) else self._run(job) for job in jobs]

    def _handle(self, model: str) -> Any:
        handle = self._handles.get(model)
        if handle is None:
            raise UnknownModel(
                f"{model} is in the registry but not deployed on this Ray cluster (it was not compiled for the "
                f"{self.backend.name} backend when the app started): compile it, then restart `python app.py --ray`. "
                f"Deployed: {', '.join(sorted(self._handles)) or 'none'}")
        return handle

    def _run_load(self, job: Job[Any]) -> Any:
        key: VariantKey = job.payload.key
        try:
            seconds = self._handle(key.model).load.remote(key.size).result()
        except _LOST as exc:
            return ReplicaUnavailable(f"the replica loading {key} stopped ({type(exc).__name__}); try again")
        return RemoteWarm(key, float(seconds))

    def _run(self, job: Job[Any]) -> Any:
        """The job's result or the exception it ends with; a replica lost mid-request is retried once."""
        work = job.payload
        model = work.resolved.spec.id
        request = dataclasses.replace(work.request, model=model, seed=work.resolved.seed)
        for attempt in (1, 2):
            try:
                return self._stream(job, request)
            except _LOST as exc:
                if job.interrupted:
                    return Cancelled("interrupted")
                log.warning("replica of %s lost during %s (attempt %d): %s", model, job.id, attempt, exc)
        return ReplicaUnavailable(
            f"the replicas of {model} stopped twice while running this request; Ray Serve restarts them: "
            "try again in a few seconds")

    def _stream(self, job: Job[Any], request: Any) -> Any:
        response = self._handle(request.model).options(stream=True).generate.remote(request, job.owner)
        for event in response:
            if job.interrupted:
                response.cancel()
                return Cancelled("interrupted")
            if event.kind == "replica":
                seen = self._startup_s.get(request.model, 0.0)
                self._startup_s[request.model] = max(seen, event.payload.startup_s)
            elif event.kind == "progress" and event.payload is not None:
                job.report(event.payload)
                if job.payload.on_progress is not None:
                    job.payload.on_progress(event.payload)
            elif event.kind in ("result", "error"):
                return event.payload
        raise _StreamEnded(f"the replica's stream for {job.id} ended without a result")

    # --- what is warm: Serve's view ---------------------------------------------------------------

    def _deployments(self) -> dict[str, Any]:
        """Per deployed model: Serve's status, replicas by state, and its autoscaling bounds (cached 1 s)."""
        taken, cached = self._status_cache
        if time.monotonic() - taken < STATUS_TTL_S:
            return cached
        try:
            app = serve.status().applications.get(APP_NAME)
        except Exception as exc:  # the controller is unreachable: report it, keep serving
            log.warning("could not read Serve's status: %s", exc)
            app = None
        result = {}
        for model in self._handles:
            deployment = app.deployments.get(deployment_name(model)) if app is not None else None
            states = {str(getattr(state, "value", state)): count
                      for state, count in (deployment.replica_states if deployment else {}).items()}
            result[model] = {
                "deployment": deployment_name(model),
                "status": str(getattr(deployment.status, "value", deployment.status)) if deployment else "UNKNOWN",
                "replicas": states,
                "running": states.get("RUNNING", 0),
                "scaling": dataclasses.asdict(self.registry.get(model).scaling),
                "cold_start_s": round(self._startup_s[model], 1) if model in self._startup_s else None,
            }
        self._status_cache = (time.monotonic(), result)
        return result

    def _variant_state(self, spec: Any, size: Size) -> str:
        """The replicas checked their artifacts when they started: deployed means compiled."""
        return "compiled" if spec.id in self._handles else "missing"

    def _default_key(self, model: str) -> VariantKey:
        spec = self.registry.get(model)
        return VariantKey(spec.id, spec.default_size if self.backend.fixed_shape else None)

    def _warm_keys(self) -> set[VariantKey]:
        return {self._default_key(model) for model, d in self._deployments().items() if d["running"]}

    def is_warm(self, model: str, size: Optional[Size] = None) -> bool:
        return self._deployments().get(self.registry.get(model).id, {}).get("running", 0) > 0

    def status(self) -> dict[str, Any]:
        deployments = self._deployments()
        queue = self.queue()
        running = [self.job_model(job) for job in queue.running]
        warm, loading = [], []
        for model, d in deployments.items():
            key = self._default_key(model)
            for index in range(d["running"]):
                warm.append({"model": model, "size": str(key.size or "any"), "replica": index,
                             "in_use": index < running.count(model), "load_seconds": d["cold_start_s"] or 0.0,
                             "device_ids": []})
            for index in range(d["replicas"].get("STARTING", 0)):
                loading.append({"model": model, "size": str(key.size or "any"), "replica": d["running"] + index,
                                "seconds": 0.0, "device_ids": []})
        return {"backend": self.backend.name, "device": self.backend.device, "versions": self.backend.stack_versions(),
                "max_warm": sum(d["scaling"]["max_replicas"] for d in deployments.values()),
                "warm": warm, "loading": loading, "ray": {"application": APP_NAME, "deployments": deployments}}

    def unload(self, model: str, size: Optional[Size] = None) -> int:
        """Serve's autoscaling decides when replicas go (``scaling.min_replicas: 0`` scales to zero)."""
        self.registry.get(model)
        return 0

    def reload_registry(self) -> Registry:
        """The deployments were made from the registry at deploy time: redeploy to change them."""
        log.info("refresh-checkpoints under Ray: the registry is read when the app is deployed; restart it to reload")
        return self.registry
