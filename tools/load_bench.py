"""Concurrent clients against a running server: images/s and latency, as users see them.

    python app.py &                                      # the server under test, as users start it
    python tools/load_bench.py --url http://127.0.0.1:7860/ --requests 16 --clients 1,8 --via api,ui

For each way in (``api``: POST /sdapi/v1/txt2img; ``ui``: the UI's /txt2img event through
gradio_client, i.e. Gradio's queue) and each client count, the same ``--requests`` txt2img requests
(seeds ``seed .. seed+N-1``) are shared among that many client threads. Reported per row: wall time,
images/s (= requests / wall), p50/p95 latency, and the largest pixel difference from the image the
first row made for the same seed (0 unless requests ran batched: then at most 1 level).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import threading
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine.bench_concurrency import ConcurrencyRow, max_pixel_diff, run_clients  # noqa: E402 - after the path set-up


def api_caller(url: str, body: dict) -> Callable[[int], np.ndarray]:
    def call(seed: int) -> np.ndarray:
        data = json.dumps({**body, "seed": seed}).encode()
        request = urllib.request.Request(url + "sdapi/v1/txt2img", data=data,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=600) as response:
            image = json.loads(response.read())["images"][0]
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(image))).convert("RGB"))
    return call


def ui_caller(url: str, body: dict) -> Callable[[int], np.ndarray]:
    from gradio_client import Client

    local = threading.local()  # one client (one session) per thread, as separate users would have
    # gradio_client opens a new httpx client for most calls; with certificate checks on, each one loads the
    # CA bundle (~30 ms of CPU): on a 2-core machine 8 such clients took a core from the server they measure.
    # A plain-http URL has no certificate to check.
    verify = not url.startswith("http://")

    def call(seed: int) -> np.ndarray:
        if not hasattr(local, "client"):
            local.client = Client(url, verbose=False, ssl_verify=verify)
        images, _, _ = local.client.predict(prompt=body["prompt"], steps=body["steps"], seed=seed, batch_count=1,
                                            api_name="/txt2img")
        return np.asarray(Image.open(images[0]["image"]).convert("RGB"))
    return call


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:7860/")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--clients", default="1,8", help="comma-separated client counts")
    p.add_argument("--via", default="api,ui", help="api, ui or both (comma-separated)")
    p.add_argument("--prompt", default="a red circle on a blue background")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=2, help="unmeasured requests per way first")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    url = args.url if args.url.endswith("/") else args.url + "/"
    body = {"prompt": args.prompt, "steps": args.steps}
    seeds = list(range(args.seed, args.seed + args.requests))
    callers = {"api": api_caller, "ui": ui_caller}
    rows: list[ConcurrencyRow] = []
    reference: dict[int, np.ndarray] = {}
    for via in args.via.split(","):
        call = callers[via.strip()](url, body)
        run_clients(call, seeds[:args.warmup], 1)
        for clients in (int(c) for c in args.clients.split(",")):
            wall, latencies, images = run_clients(call, seeds, clients)
            rows.append(ConcurrencyRow.measured(via, clients, wall, latencies, max_pixel_diff(images, reference)))
            reference = reference or images
            print(f"{via:>3} x{clients}: {rows[-1].images_per_s:.3g} images/s, p50 {rows[-1].p50_s:.2f} s, "
                  f"p95 {rows[-1].p95_s:.2f} s, max pixel difference: {rows[-1].max_pixel_diff}", flush=True)
    print("\n| via | clients | requests | wall s | images/s | p50 s | p95 s | max pixel diff vs first row |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.label} | {row.clients} | {row.requests} | {row.wall_s} | {row.images_per_s} | {row.p50_s} | "
              f"{row.p95_s} | {'—' if row.max_pixel_diff is None else row.max_pixel_diff} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump([asdict(row) for row in rows], handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
