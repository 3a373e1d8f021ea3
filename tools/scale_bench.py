"""Replicas, measured as users reach them: images/s and latency for 1, 2, N replicas, in one process
(``--replicas``) and on Ray Serve (``--ray --replicas``), at several client counts.

    python tools/scale_bench.py --modes local,ray --replicas 1,2 --clients 1,4,16 \\
        --out docs/bench/scale-demo-shapes-cpu

For each mode and replica count the app is launched as a user launches it (``python app.py …`` in a
subprocess, on a free port), warmed up, measured through the HTTP API with
``tools/load_bench.py``'s client, and stopped. Rows are labelled ``local xN`` / ``ray xN``; every
image is compared with the first row's for the same seed. Writes concurrency.{md,json,png} to
``--out``.
"""
from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from engine.bench_concurrency import ConcurrencyRow, max_pixel_diff, run_clients, write_all  # noqa: E402
from load_bench import api_caller  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get_json(url: str) -> Optional[dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def _ready(url: str, model: str, replicas: int) -> bool:
    """/ping answers 200 and (under Ray) Serve runs ``replicas`` replicas of ``model``."""
    if _get_json(url + "ping") is None:
        return False
    memory = _get_json(url + "sdapi/v1/memory") or {}
    engine = memory.get("engine", {})
    if "ray" in engine:
        return engine["ray"]["deployments"].get(model, {}).get("running") == replicas
    return sum(1 for warm in engine.get("warm", []) if warm["model"] == model) >= replicas


def launch(mode: str, replicas: int, args: argparse.Namespace, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    command = [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--threads", str(args.threads),
               "--replicas", f"{args.model}={replicas}", "--outputs", str(log_path.parent / "outputs"),
               *(["--registry", args.registry] if args.registry else []), *(["--ray"] if mode == "ray" else [])]
    process = subprocess.Popen(command, cwd=ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}; see {log_path}")
        if _ready(url, args.model, replicas):
            return process, url
        time.sleep(1)
    process.terminate()
    raise RuntimeError(f"app.py was not ready within {args.start_timeout}s; see {log_path}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="local,ray", help="local (one process), ray (Ray Serve) or both")
    p.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    p.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--model", default="demo-shapes")
    p.add_argument("--registry", help="registry file (default: the app's)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=1, help="torch threads per replica (Ray: its CPUs)")
    p.add_argument("--start-timeout", type=int, default=240)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "scale-demo-shapes-cpu")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(1000, 1000 + args.requests))
    body = {"prompt": "a red circle on a blue background", "steps": args.steps}
    rows: list[ConcurrencyRow] = []
    reference: dict[int, np.ndarray] = {}
    for mode in args.modes.split(","):
        for replicas in (int(n) for n in args.replicas.split(",")):
            label = f"{mode} x{replicas}"
            process, url = launch(mode, replicas, args, args.out / f"app-{mode}-{replicas}.log")
            try:
                call = api_caller(url, body)
                run_clients(call, seeds[:max(2, replicas)], max(2, replicas))  # every replica's first call
                for clients in (int(c) for c in args.clients.split(",")):
                    wall, latencies, images = run_clients(call, seeds, clients)
                    rows.append(ConcurrencyRow.measured(label, clients, wall, latencies,
                                                        max_pixel_diff(images, reference)))
                    reference = reference or images
                    print(f"{label} x{clients} clients: {rows[-1].images_per_s:.2f} images/s, "
                          f"p50 {rows[-1].p50_s:.2f} s, p95 {rows[-1].p95_s:.2f} s, "
                          f"max pixel diff {rows[-1].max_pixel_diff}", flush=True)
            finally:
                stop(process)
    title = f"{args.model}: replicas in one process and on Ray Serve ({args.steps} steps, {args.threads} thread(s) each)"
    for path in write_all(rows, title, args.out, label="replicas"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
