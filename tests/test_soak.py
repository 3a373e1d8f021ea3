"""A launched server under many requests: seeds reproduce across processes and under 8 concurrent clients
mixing models and samplers, and the server's memory stays flat over 300 requests."""
from __future__ import annotations

import base64
import io
import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from engine import GenerateRequest, Size
from engine.samplers import sampler_names
from ui_server import AppServer, start_app

MODELS = ("tiny-sd15", "tiny-sd21")  # batch_sizes [1, 4] and [1]
SOAK_REQUESTS = 300
RSS_GROWTH_LIMIT = 1.05


@pytest.fixture(scope="module")
def soak_server(compiled_registry, tmp_path_factory) -> AppServer:
    server = start_app(Path(compiled_registry.path), tmp_path_factory.mktemp("soak"), ["--max-warm", "2"])
    yield server
    server.stop()


def _cases() -> list[dict]:
    """Every sampler, alternating models, txt2img and img2img, each its own seed."""
    init = _png_base64(Image.radial_gradient("L").convert("RGB").resize((64, 64)))
    cases = []
    for index, sampler in enumerate(sampler_names()):
        body = {"prompt": f"a red circle {index}", "negative_prompt": "blurry", "sampler_name": sampler, "steps": 3,
                "cfg_scale": 6.5, "seed": 1000 + index, "width": 64, "height": 64,
                "override_settings": {"sd_model_checkpoint": MODELS[index % 2]}}
        if index % 3 == 2:
            body.update(init_images=[init], denoising_strength=0.6)
        cases.append(body)
    return cases


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _route(body: dict) -> str:
    return "img2img" if "init_images" in body else "txt2img"


def _pixels(server: AppServer, body: dict) -> np.ndarray:
    response = requests.post(f"{server.url}sdapi/v1/{_route(body)}", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0]))).convert("RGB"))


def _rss(server: AppServer) -> int:
    return requests.get(server.url + "sdapi/v1/memory", timeout=30).json()["ram"]["process_rss"]


def test_every_sampler_reproduces_across_processes_and_under_8_concurrent_clients(soak_server, cpu_engine):
    cases = _cases()
    serial = [_pixels(soak_server, body) for body in cases]
    for body, expected in zip(cases, serial):  # the same seed in this process, through the engine directly
        assert np.array_equal(np.asarray(_engine_image(cpu_engine, body).convert("RGB")), expected), body
    shuffled = list(enumerate(cases)) * 2
    random.Random(5).shuffle(shuffled)
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(lambda item: (item[0], _pixels(soak_server, item[1])), shuffled))
    differences = {(cases[i]["sampler_name"], cases[i]["override_settings"]["sd_model_checkpoint"]):
                   int(np.abs(image.astype(int) - serial[i]).max()) for i, image in concurrent}
    # A model with batch_sizes runs concurrent requests as one batch: batched matmuls may round 1 level
    # differently (issue 12's stated bound); a model without batching must give identical pixels.
    allowed = {"tiny-sd15": 1, "tiny-sd21": 0}
    assert {key: diff for key, diff in differences.items() if diff > allowed[key[1]]} == {}


def _engine_image(engine, body: dict) -> Image.Image:
    request = GenerateRequest(model=body["override_settings"]["sd_model_checkpoint"], prompt=body["prompt"],
                              negative_prompt=body["negative_prompt"], sampler=body["sampler_name"],
                              steps=body["steps"], cfg_scale=body["cfg_scale"], seed=body["seed"], size=Size(64, 64))
    if "init_images" in body:
        init = Image.open(io.BytesIO(base64.b64decode(body["init_images"][0]))).convert("RGB")
        request = GenerateRequest(**{**request.__dict__, "init_image": init, "strength": body["denoising_strength"]})
    return engine.generate(request).images[0].image


def test_rss_stays_flat_over_300_requests(soak_server):
    cases = _cases()
    with ThreadPoolExecutor(4) as pool:  # warm up: every model, sampler and code path once
        list(pool.map(lambda body: _pixels(soak_server, body), cases * 2))
    before = _rss(soak_server)
    bodies = [dict(cases[i % len(cases)], seed=i) for i in range(SOAK_REQUESTS)]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda body: _pixels(soak_server, body), bodies))
    after = _rss(soak_server)
    print(f"server RSS before {before / 2**20:.0f} MiB, after {SOAK_REQUESTS} requests {after / 2**20:.0f} MiB "
          f"({after / before:.3f}x)")
    assert after <= before * RSS_GROWTH_LIMIT, f"RSS grew from {before} to {after} bytes over {SOAK_REQUESTS} requests"
