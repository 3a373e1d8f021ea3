"""Live preview: the cheap latent -> RGB approximation every N steps, in progress and in the HTTP API."""
from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from engine import Engine, EngineSettings, GenerateRequest
from engine.backends import make_backend
from engine.preview import latent_preview


def test_the_cheap_approximation_maps_each_latent_channel_to_rgb():
    latents = torch.zeros(4, 2, 3)
    assert np.asarray(latent_preview(latents, "sd15", (3, 2))).tolist() == [[[128, 128, 128]] * 3] * 2
    latents[0] = 1.0  # A1111's factors for channel 0: (0.298, 0.207, 0.208) -> (1 + f) * 127.5
    assert np.asarray(latent_preview(latents, "sd15", (3, 2)))[0, 0].tolist() == [165, 154, 154]
    assert np.asarray(latent_preview(latents, "sdxl", (3, 2)))[0, 0].tolist() == [171, 181, 184]
    assert latent_preview(latents, "sd21", (24, 16)).size == (24, 16)  # scaled up to the image size


def test_progress_carries_a_preview_every_n_steps_and_the_image_is_unchanged(compiled_registry):
    request = GenerateRequest(model="tiny-sd21", prompt="a red circle", steps=10, seed=3)
    seen: list = []
    with_preview = Engine(compiled_registry, make_backend("cpu"), EngineSettings(preview_every=4))
    without = Engine(compiled_registry, make_backend("cpu"), EngineSettings(preview_every=0))
    try:
        image = with_preview.generate(request, on_progress=lambda p: seen.append((p.step, p.preview))).images[0].image
        assert [step for step, preview in seen if preview is not None] == [4, 5, 6, 7, 8, 9, 10]
        assert seen[3][1] is not seen[7][1] and seen[3][1].size == image.size  # a new preview at step 8
        plain: list = []
        same = without.generate(request, on_progress=lambda p: plain.append(p.preview)).images[0].image
        assert plain == [None] * 10 and np.array_equal(np.asarray(image), np.asarray(same))
    finally:
        with_preview.close()
        without.close()


def test_previews_are_off_by_default_on_neuron_only(cpu_engine):
    from engine.engine import default_preview_every

    assert [default_preview_every(name) for name in ("neuron", "cpu", "eager")] == [0, 5, 5]
    assert cpu_engine.preview_every == 5


def test_api_progress_returns_the_current_image_unless_skipped(compiled_registry, tmp_path):
    from fastapi.testclient import TestClient

    from api import create_api

    engine = Engine(compiled_registry, make_backend("cpu"), EngineSettings(preview_every=2))
    app, _ = create_api(engine, tmp_path)
    body = {"prompt": "x", "steps": 150, "width": 64, "height": 64, "n_iter": 2,
            "override_settings": {"sd_model_checkpoint": "tiny-sd15"}}
    try:
        with TestClient(app) as client:
            runner = threading.Thread(target=lambda: client.post("/sdapi/v1/txt2img", json=body))
            runner.start()
            progress = _wait(lambda: client.get("/sdapi/v1/progress").json(), lambda p: p["current_image"])
            preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
            assert preview.format == "PNG" and preview.size == (64, 64)
            skipped = client.get("/sdapi/v1/progress", params={"skip_current_image": True}).json()
            assert skipped["current_image"] is None and skipped["state"]["sampling_step"] > 0
            client.post("/sdapi/v1/interrupt")
            runner.join(60)
    finally:
        engine.close()


def _wait(fetch, condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fetch()
        if condition(value):
            return value
        time.sleep(0.05)
    pytest.fail(f"never matched: {value}")


pytest_plugins = ["ui_server"]


def test_the_ui_gallery_shows_live_previews_before_the_images(ui_server, tmp_path):
    from gradio_client import Client

    client = Client(ui_server.url, verbose=False, download_files=str(tmp_path))
    job = client.submit(prompt="a red circle", negative_prompt="", model="tiny-sd15", resolution="64x64",
                        sampler="Euler", steps=120, cfg_scale=7, seed=5, batch_count=2, api_name="/txt2img")
    final_images, info, stats = job.result(timeout=120)
    outputs = job.outputs()
    previews = [gallery for gallery, _, _ in outputs[:-1]]
    assert previews and all(len(gallery) == 1 for gallery in previews)  # one preview image at a time
    assert len(final_images) == 2 and "Seed: 5" in info and outputs[-1][0] == final_images
