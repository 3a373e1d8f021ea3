"""``/metrics``: Prometheus text format for dashboards and autoscalers.

What an operator needs to size and scale the service: queue depth per model (waiting and running
jobs in the engine's queue), request latency from submission to answer (queueing included),
images made (``rate(sd_images_total[1m])`` is images/s) and the warm replicas per model. Under
``--ray`` the ingress reports the same names, with the replicas Serve runs.
"""
from __future__ import annotations

from collections import Counter as Tally
from typing import Any, Iterator

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from engine import Cancelled, Engine

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class EngineMetrics:
    """The counters the engine's job listener feeds, plus gauges read from the engine on scrape."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.registry = CollectorRegistry()
        self.latency = Histogram("sd_request_seconds", "Generation requests: seconds from submission to answer",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("sd_requests", "Generation requests answered, by outcome (ok, interrupted, error)",
                                ["model", "outcome"], registry=self.registry)
        self.images = Counter("sd_images", "Images generated", ["model"], registry=self.registry)
        self.registry.register(_EngineCollector(engine))
        engine.add_job_listener(self.observe)

    def observe(self, job: Any, outcome: Any) -> None:
        """A finished job and its result or exception (called on the engine's worker thread)."""
        if self.engine.is_load_job(job):
            return
        model = self.engine.job_model(job)
        failed = isinstance(outcome, BaseException)
        kind = "interrupted" if isinstance(outcome, Cancelled) else "error" if failed else "ok"
        self.requests.labels(model, kind).inc()
        if job.finished is not None:
            self.latency.labels(model).observe(job.finished - job.submitted)
        if not failed:
            self.images.labels(model).inc(len(outcome.images))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queue = self.engine.queue()
        waiting = GaugeMetricFamily("sd_queue_waiting", "Jobs waiting in the engine's queue", labels=["model"])
        running = GaugeMetricFamily("sd_queue_running", "Jobs running", labels=["model"])
        models = [spec.id for spec in self.engine.registry.models]
        for family, jobs in ((waiting, queue.waiting), (running, queue.running)):
            counts = Tally(self.engine.job_model(job) for job in jobs)
            for model in models:
                family.add_metric([model], counts.get(model, 0))
        yield waiting
        yield running
        replicas = GaugeMetricFamily("sd_replicas", "Warm replicas (ready) and replicas starting (loading)",
                                     labels=["model", "state"])
        status = self.engine.status()
        for state, entries in (("ready", status["warm"]), ("loading", status["loading"])):
            counts = Tally(entry["model"] for entry in entries)
            for model in models:
                replicas.add_metric([model, state], counts.get(model, 0))
        yield replicas


def create_router(metrics: EngineMetrics, user: Any) -> APIRouter:
    router = APIRouter()

    @router.get("/metrics", include_in_schema=False, dependencies=[Depends(user)])
    def scrape() -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return router
