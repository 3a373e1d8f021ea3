"""``python -m engine bench --concurrency 1,4,8``: images/s and latency of concurrent requests through
the engine's queue, with batching off and on, side by side.

For each concurrency level ``c`` the same ``requests`` txt2img requests (seeds ``seed .. seed+N-1``)
are shared among ``c`` client threads calling ``Engine.generate`` — the path the app's UI and API
take (submit to the queue, run on the device worker). "off" is an engine that never batches; "on"
batches compatible waiting requests up to the model's largest compiled batch (its ``batch_sizes``).
Every image is compared with the one the first row (off, concurrency 1) made for its seed.
For the whole server under HTTP clients, use ``tools/load_bench.py``.
"""
from __future__ import annotations

import json
import queue
import statistics
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, TypeVar

import numpy as np

from .registry import Registry
from .types import GenerateRequest, Size

Log = Callable[[str], None]
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ConcurrencyRow:
    """One measured level: ``label`` says what ran ("off"/"on": batching here; "api"/"ui" in
    tools/load_bench.py)."""

    label: str
    clients: int
    requests: int
    wall_s: float
    images_per_s: float
    p50_s: float
    p95_s: float
    max_pixel_diff: Optional[int]  # vs the first row for the same seed
    max_batch_seen: Optional[int] = None

    @classmethod
    def measured(cls, label: str, clients: int, wall_s: float, latencies: Sequence[float],
                 max_pixel_diff: Optional[int], max_batch_seen: Optional[int] = None) -> "ConcurrencyRow":
        ordered = sorted(latencies)
        return cls(label, clients, len(ordered), round(wall_s, 3), float(f"{len(ordered) / wall_s:.3g}"),
                   round(statistics.median(ordered), 3), round(ordered[int(0.95 * (len(ordered) - 1))], 3),
                   max_pixel_diff, max_batch_seen)


def max_pixel_diff(images: dict[int, np.ndarray], reference: dict[int, np.ndarray]) -> Optional[int]:
    """The largest per-channel difference from ``reference`` for the same seeds (None: no reference)."""
    if not reference:
        return None
    return max(int(np.abs(images[seed].astype(np.int16) - reference[seed].astype(np.int16)).max()) for seed in images)


def run_clients(call: Callable[[T], R], items: Sequence[T], clients: int) -> tuple[float, list[float], dict[T, R]]:
    """Share ``items`` among ``clients`` threads, each calling ``call(item)`` in turn as a user
    waiting for each answer would; returns (wall seconds, per-call latencies, item -> result)."""
    todo: "queue.Queue[T]" = queue.Queue()
    for item in items:
        todo.put(item)
    lock = threading.Lock()
    latencies: list[float] = []
    results: dict[T, R] = {}

    def client() -> None:
        while True:
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            started = time.perf_counter()
            result = call(item)
            with lock:
                latencies.append(time.perf_counter() - started)
                results[item] = result

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies, results


def run_concurrency(registry: Registry, backend_name: str, levels: Sequence[int], requests: int, model: Optional[str],
                    size: Optional[Size], steps: Optional[int], prompt: str, seed: int,
                    log: Log, batch_wait_s: float = 0.0, replicas: int = 1) -> list[ConcurrencyRow]:
    """Batching off, on, and (``replicas`` > 1) on with that many warm copies of the model, each on its
    own device worker (the app's ``--replicas``)."""
    batch: list[GenerateRequest] = [GenerateRequest(model=model, prompt=prompt, steps=steps, size=size, seed=seed + i)
                                    for i in range(requests)]
    configurations = [("off", False, 1), ("on", True, 1)] + ([(f"on x{replicas}", True, replicas)] if replicas > 1 else [])
    rows: list[ConcurrencyRow] = []
    reference: dict[int, np.ndarray] = {}
    for label, batching, copies in configurations:
        engine = _engine(registry, backend_name, model, batching, batch_wait_s, copies)
        try:
            run_clients(engine.generate, batch[:2], 1)  # load and warm up, unmeasured
            for clients in levels:
                wall, latencies, by_request = run_clients(engine.generate, batch, clients)
                results = {request.seed: result for request, result in by_request.items()}
                images = {s: np.asarray(r.images[0].image) for s, r in results.items()}
                rows.append(ConcurrencyRow.measured(label, clients, wall, latencies, max_pixel_diff(images, reference),
                                                    max(r.batch_requests for r in results.values())))
                reference = reference or images
                log(f"batching {rows[-1].label:>3}, {clients} clients: {rows[-1].images_per_s:.3g} images/s, "
                    f"p50 {rows[-1].p50_s:.3f} s, p95 {rows[-1].p95_s:.3f} s, batches up to {rows[-1].max_batch_seen}")
        finally:
            engine.close()
    return rows


def _engine(registry: Registry, backend_name: str, model: Optional[str], batching: bool, batch_wait_s: float,
            copies: int):  # noqa: ANN202 - Engine, imported lazily
    from .backends import make_backend
    from .engine import Engine, EngineSettings, ReplicaTarget

    replicas = (ReplicaTarget(registry.get(model or registry.default_model).id, None, copies),) if copies > 1 else ()
    engine = Engine(registry, make_backend(backend_name),
                    EngineSettings(batching=batching, batch_wait_s=batch_wait_s, replicas=replicas))
    if replicas:
        engine.start_replicas()
    return engine


def to_markdown(rows: list[ConcurrencyRow], title: str, label: str = "batching") -> str:
    """The rows as a markdown table; ``label`` names what the rows' labels vary."""
    lines = [f"# {title}", "", f"| {label} | clients | requests | wall s | images/s | p50 s | p95 s | largest batch "
             "| max pixel diff |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.label} | {r.clients} | {r.requests} | {r.wall_s} | {r.images_per_s} | {r.p50_s} | {r.p95_s} "
              f"| {r.max_batch_seen} | {'—' if r.max_pixel_diff is None else r.max_pixel_diff} |" for r in rows]
    return "\n".join(lines) + "\n"


BAR_COLOURS = ((150, 150, 150), (234, 88, 12), (37, 99, 235), (22, 163, 74), (147, 51, 234))


def draw_png(rows: list[ConcurrencyRow], title: str, path: Path) -> None:
    """Grouped bars: images/s per concurrency level, one bar per row label (in first-seen order)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    levels = list(dict.fromkeys(r.clients for r in rows))
    labels = list(dict.fromkeys(r.label for r in rows))
    colours = dict(zip(labels, BAR_COLOURS * (1 + len(labels) // len(BAR_COLOURS))))
    width, height, left, top, plot_h = 640, 360, 60, 40, 260
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    legend = ", ".join(f"{name}: {label}" for label, name in zip(labels, ("grey", "orange", "blue", "green", "purple")))
    draw.text((10, 4), f"{title}: images/s", fill="black", font=font)
    draw.text((10, 18), legend, fill="black", font=font)
    best = max(r.images_per_s for r in rows) or 1.0
    group_w = (width - left - 20) / len(levels)
    base_y = top + plot_h
    for g, clients in enumerate(levels):
        bar_w = (group_w - 20) / len(labels)
        for k, label in enumerate(labels):
            row = next((r for r in rows if r.clients == clients and r.label == label), None)
            if row is None:
                continue
            x0 = left + g * group_w + 10 + k * bar_w
            x1 = x0 + bar_w - 6
            y0 = base_y - plot_h * row.images_per_s / best
            draw.rectangle([x0, y0, x1, base_y], fill=colours[label])
            draw.text((x0, y0 - 12), f"{row.images_per_s:.1f}", fill="black", font=font)
        draw.text((left + g * group_w + group_w / 2 - 20, base_y + 8), f"{clients} clients", fill="black", font=font)
    draw.line([left, base_y, width - 10, base_y], fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_all(rows: list[ConcurrencyRow], title: str, out_dir: Path, label: str = "batching") -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "concurrency.md", out_dir / "concurrency.json", out_dir / "concurrency.png"]
    paths[0].write_text(to_markdown(rows, title, label), encoding="utf-8")
    paths[1].write_text(json.dumps([asdict(r) for r in rows], indent=2), encoding="utf-8")
    draw_png(rows, title, paths[2])
    return paths


__all__ = ["ConcurrencyRow", "max_pixel_diff", "run_clients", "run_concurrency", "to_markdown", "write_all"]
