"""The input table (``input_cases.py``) at three levels: the engine, the HTTP API and the UI.

Engine: ``engine.images.read_image`` + ``Engine.generate`` on the shared cpu engine. HTTP and UI:
the launched ``app.py`` (``ui_server``), ``/sdapi/v1`` with httpx and the Gradio endpoints with
``gradio_client``. Every case must give images of the right size or a refusal naming the problem:
never a traceback, a 5xx or Gradio's generic preprocessing error; after every case the server is
alive, and each level ends with a valid request that must succeed.
"""
from __future__ import annotations

import base64
import functools
import io
import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from engine import EngineError, GenerateRequest, Size
from engine.images import fit_image, read_image
from engine.types import RESIZE_MODES
from input_cases import BASE, IMAGE, REFUSED, Case, cases_at, image_bytes

pytest_plugins = ["ui_server"]

DEFAULT_PROMPT = "a red circle"
GENERIC = ("could not preprocess", "traceback", "internal error", "exception")


@functools.lru_cache(maxsize=None)
def cached_image(name: str) -> tuple[bytes, str]:
    return image_bytes(name)


def fields_of(case: Case) -> dict[str, Any]:
    return {"prompt": DEFAULT_PROMPT, "negative_prompt": "", "batch": 1, "strength": 0.75,
            "resize_mode": RESIZE_MODES[0], **BASE, **case.change}


def check_refusal(case: Case, level: str, message: str, record: Any) -> None:
    record("refused", message)  # in --junitxml: what the user saw (docs/reliability-inputs.md)
    _, needle = case.at(level)
    assert needle.lower() in message.lower(), f"{case.id} at {level}: {needle!r} not in {message!r}"
    assert not any(word in message.lower() for word in GENERIC), f"{case.id} at {level}: generic {message!r}"


def check_images(case: Case, level: str, sizes: list[tuple[int, int]], notices: str, record: Any) -> None:
    shown = f"{len(sizes)} x {sizes[0][0]}x{sizes[0][1]}" if sizes else "no images"
    record("images", shown + (f"; {notices}" if notices else ""))
    fields = fields_of(case)
    size = Size.parse(case.size)
    assert sizes == [(size.width, size.height)] * fields["batch"], f"{case.id} at {level}: {sizes}"
    _, needle = case.at(level)
    assert needle.lower() in notices.lower(), f"{case.id} at {level}: notice {needle!r} not in {notices!r}"


# --- engine --------------------------------------------------------------------------------------

def engine_request(case: Case) -> GenerateRequest:
    """The case as the engine's request; an init image goes through ``read_image`` as the faces' do."""
    f = fields_of(case)
    request = GenerateRequest(model=f["model"], prompt=f["prompt"], negative_prompt=f["negative_prompt"],
                              sampler=f["sampler"], steps=f["steps"], cfg_scale=f["cfg_scale"], seed=f["seed"],
                              size=Size.parse(f["size"]), num_images=f["batch"])
    if case.mode == "img2img":
        image = read_image(cached_image(f["image"])[0])
        request = replace(request, init_image=image, strength=f["strength"], resize_mode=f["resize_mode"])
    return request


@pytest.mark.parametrize("case", cases_at("engine"), ids=lambda c: c.id)
def test_engine(cpu_engine, record_property, case: Case):
    expect, _ = case.at("engine")
    try:
        result = cpu_engine.generate(engine_request(case))
    except EngineError as exc:
        assert expect == REFUSED, f"{case.id}: refused with {exc}"
        check_refusal(case, "engine", str(exc), record_property)
        return
    assert expect == IMAGE, f"{case.id}: made images instead of refusing"
    check_images(case, "engine", [g.image.size for g in result.images], " ".join(result.notices), record_property)


@pytest.mark.parametrize("case", [c for c in cases_at("engine") if c.looks], ids=lambda c: c.id)
def test_engine_sees_the_init_image_as_it_looks(case: Case):
    """The pixels the model starts from: upright, first frame, alpha on white, 16-bit scaled down."""
    fitted = np.asarray(fit_image(read_image(cached_image(case.change["image"])[0]), Size(64, 64)), dtype=int)
    for (x, y), color in case.looks.items():
        assert np.abs(fitted[y, x] - np.array(color)).max() <= 24, f"{case.id} at {(x, y)}: {fitted[y, x]} != {color}"


def test_engine_serves_after_the_table(cpu_engine):
    result = cpu_engine.generate(engine_request(Case("valid", {}, IMAGE)))
    assert len(result.images) == 1


# --- HTTP API (the launched server) --------------------------------------------------------------

@pytest.fixture(scope="module")
def log_start(ui_server) -> int:
    """Where the server's log stood before this module's requests (other modules share the server)."""
    return len(ui_server.log())


@pytest.fixture(scope="module")
def http(ui_server, log_start):
    with httpx.Client(base_url=ui_server.url.rstrip("/"), timeout=120) as client:
        yield client


def api_body(case: Case) -> dict[str, Any]:
    """The case as an A1111 request body (NaN and infinity travel as JSON's NaN/Infinity)."""
    f = fields_of(case)
    width, height = (int(n) for n in re.fullmatch(r"(-?\d+)x(-?\d+)", f["size"]).groups())
    body = {"prompt": f["prompt"], "negative_prompt": f["negative_prompt"], "steps": f["steps"],
            "cfg_scale": f["cfg_scale"], "seed": f["seed"], "batch_size": f["batch"], "width": width, "height": height}
    if f["sampler"] is not None:
        body["sampler_name"] = f["sampler"]
    if f["model"] is not None:
        body["override_settings"] = {"sd_model_checkpoint": f["model"]}
    if case.mode == "img2img":
        mode = f["resize_mode"]
        body.update(denoising_strength=f["strength"], resize_mode=RESIZE_MODES.index(mode) if mode in RESIZE_MODES else mode)
        if f.get("image"):
            encoded = base64.b64encode(cached_image(f["image"])[0]).decode()
            body["init_images"] = ["data:image/png;base64," + encoded if f.get("data_uri") else encoded]
        elif "image_text" in f:
            body["init_images"] = [f["image_text"]]
    return {**body, **f.get("extra", {})}


@pytest.mark.parametrize("case", cases_at("api"), ids=lambda c: c.id)
def test_http_api(http, ui_server, record_property, case: Case):
    expect, _ = case.at("api")
    response = http.post(f"/sdapi/v1/{case.mode}", content=json.dumps(api_body(case)),
                         headers={"content-type": "application/json"})
    assert ui_server.alive() and http.get("/sdapi/v1/progress").status_code == 200, f"{case.id}: the server stopped"
    assert response.status_code < 500, f"{case.id}: {response.status_code} {response.text[:500]}"
    if expect == REFUSED:
        assert 400 <= response.status_code < 500, f"{case.id}: {response.status_code}"
        record_property("status", response.status_code)
        check_refusal(case, "api", response.text, record_property)
        return
    assert response.status_code == 200, f"{case.id}: {response.text[:500]}"
    data = response.json()
    sizes = [Image.open(io.BytesIO(base64.b64decode(text))).size for text in data["images"]]
    check_images(case, "api", sizes, " ".join(data["warnings"]), record_property)


def test_http_api_serves_after_the_table(http):
    response = http.post("/sdapi/v1/img2img", json=api_body(Case("valid", {"image": "png"}, IMAGE)))
    assert response.status_code == 200 and len(response.json()["images"]) == 1


# --- UI (gradio_client against the launched server) ----------------------------------------------

@pytest.fixture(scope="module")
def ui_client(ui_server, log_start, tmp_path_factory):
    from gradio_client import Client

    return Client(ui_server.url, verbose=False, download_files=str(tmp_path_factory.mktemp("table-downloads")))


def ui_arguments(case: Case, files: Path) -> dict[str, Any]:
    """The case as the arguments of the ``/txt2img`` or ``/img2img`` endpoint."""
    from gradio_client import handle_file

    f = fields_of(case)
    kwargs = {"prompt": f["prompt"], "negative_prompt": f["negative_prompt"], "resolution": f["size"],
              "steps": f["steps"], "cfg_scale": f["cfg_scale"], "seed": f["seed"], "batch_count": f["batch"],
              "api_name": f"/{case.mode}"}
    kwargs.update({key: f[key] for key in ("model", "sampler") if f[key] is not None})
    if case.mode == "img2img":
        kwargs.update(denoising_strength=f["strength"], resize_mode=f["resize_mode"], init_image=None)
        if f.get("image"):
            data, suffix = cached_image(f["image"])
            path = files / f"{f['image']}{suffix}"
            path.write_bytes(data)
            kwargs["init_image"] = handle_file(str(path))
    return kwargs


@pytest.mark.parametrize("case", cases_at("ui"), ids=lambda c: c.id)
def test_ui(ui_client, ui_server, tmp_path, record_property, case: Case):
    from gradio_client.exceptions import AppError

    assert not any(isinstance(v, float) and not math.isfinite(v) for v in case.change.values())
    expect, _ = case.at("ui")
    try:
        images, _, stats = ui_client.predict(**ui_arguments(case, tmp_path))
    except AppError as exc:
        assert ui_server.alive() and httpx.get(ui_server.url + "config").status_code == 200, f"{case.id}: stopped"
        assert expect == REFUSED, f"{case.id}: refused with {exc}"
        check_refusal(case, "ui", str(exc), record_property)
        return
    assert expect == IMAGE, f"{case.id}: made images instead of refusing"
    sizes = [Image.open(item["image"]).size for item in images]
    check_images(case, "ui", sizes, stats, record_property)


def test_ui_serves_after_the_table(ui_client, ui_server, tmp_path, log_start):
    images, _, _ = ui_client.predict(**ui_arguments(Case("valid", {"image": "png"}, IMAGE), tmp_path))
    assert len(images) == 1
    log = ui_server.log()[log_start:]
    assert "Traceback" not in log and "ERROR" not in log, log[-3000:]
