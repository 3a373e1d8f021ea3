"""The launched ``app.py`` through real third-party clients: ``webuiapi`` (the A1111 API client),
``sd-parsers`` (an independent A1111 infotext parser), ``schemathesis`` (the OpenAPI schema run
against the live server), ``gradio_client`` (the UI) and plain HTTP for SageMaker's routes."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from PIL import Image

pytest_plugins = ["ui_server"]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def http(url: str, body: dict | None = None, headers: dict | None = None,
         auth: tuple[str, str] | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one request; errors are answers too."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})},
                                     method="POST" if body is not None else "GET")
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture(scope="module")
def webui(ui_server):
    import webuiapi

    return webuiapi.WebUIApi(baseurl=ui_server.url + "sdapi/v1", sampler="Euler a", steps=3)


def test_webuiapi_txt2img_img2img_and_infotexts_parsed_by_sd_parsers(webui):
    from sd_parsers import ParserManager

    result = webui.txt2img(prompt="a red circle", negative_prompt="blurry", seed=40, width=64, height=96,
                           batch_size=2, cfg_scale=6.5, sampler_name="DPM++ 2M", scheduler="karras")
    assert [image.size for image in result.images] == [(64, 96), (64, 96)]
    assert result.info["all_seeds"] == [40, 41] and result.info["sampler_name"] == "DPM++ 2M Karras"
    assert result.parameters["prompt"] == "a red circle"
    for index, image in enumerate(result.images):
        parsed = ParserManager().parse(image)
        sampler = parsed.samplers[0]
        assert parsed.generator.name == "AUTOMATIC1111" and sampler.name == "DPM++ 2M Karras"
        assert sampler.parameters == {"cfg_scale": "6.5", "seed": str(40 + index), "steps": "3"}
        assert parsed.full_prompt == "a red circle" and parsed.full_negative_prompt == "blurry"
        assert sampler.model.name == "tiny-sd15" and parsed.metadata["Size"] == "64x96"

    edited = webui.img2img(images=[result.images[0]], prompt="blue", seed=3, denoising_strength=0.5, steps=4,
                           width=64, height=64, resize_mode=1)
    assert edited.images[0].size == (64, 64) and edited.info["denoising_strength"] == 0.5
    info = webui.png_info(edited.images[0])
    assert info.info == edited.info["infotexts"][0] and info.json["parameters"]["Denoising strength"] == "0.5"


def test_webuiapi_models_samplers_and_switching(webui):
    assert "tiny-sd21" in webui.util_get_model_names()
    assert {"Euler a", "DPM++ 2M Karras", "UniPC"} <= set(webui.util_get_sampler_names())
    assert webui.util_get_scheduler_names() == ["automatic", "karras", "sgm_uniform"]
    try:
        webui.util_set_model("tiny-sd21")
        assert webui.util_get_current_model() == "tiny-sd21"
        assert webui.txt2img(prompt="x", seed=1, width=64, height=64).info["sd_model_name"] == "tiny-sd21"
        webui.set_options({"sd_model_checkpoint": "tiny-sdxl"})
        assert webui.get_options()["sd_model_checkpoint"] == "tiny-sdxl"
    finally:
        webui.set_options({"sd_model_checkpoint": "tiny-sd15"})


def test_webuiapi_interrupt_stops_a_running_request(webui):
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=webui.txt2img(
        prompt="long", steps=150, batch_size=8, seed=5, width=64, height=64)))
    runner.start()
    deadline = time.monotonic() + 30
    while webui.get_progress()["state"]["sampling_step"] < 3:
        assert time.monotonic() < deadline, "the long request never started"
        time.sleep(0.05)
    progress = webui.get_progress()
    assert progress["state"]["job_count"] >= 1 and progress["state"]["sampling_steps"] == 150
    webui.interrupt()
    runner.join(60)
    result = outcome["result"]
    assert result.info["interrupted"] is True and len(result.images) < 8


def test_same_seed_gives_the_same_pixels_through_ui_api_and_invocations(ui_server, tmp_path):
    from gradio_client import Client

    client = Client(ui_server.url, verbose=False, download_files=str(tmp_path))
    images, _, _ = client.predict(prompt="a blue square", model="tiny-sd15", resolution="64x64", sampler="Euler a",
                                  steps=4, cfg_scale=7.5, seed=4321, batch_count=1, api_name="/txt2img")
    from_ui = pixels(Image.open(images[0]["image"]))

    body = {"prompt": "a blue square", "steps": 4, "cfg_scale": 7.5, "seed": 4321, "sampler_name": "Euler a",
            "width": 64, "height": 64}
    status, _, raw = http(ui_server.url + "sdapi/v1/txt2img", body)
    assert status == 200
    from_api = pixels(Image.open(io.BytesIO(base64.b64decode(json.loads(raw)["images"][0]))))

    quick_kit = {"prompt": "a blue square", "steps": 4, "sampler": "euler_a", "seed": 4321, "height": 64,
                 "width": 64, "parameters": {"guidance_scale": 7.5}}
    status, headers, png = http(ui_server.url + "invocations", quick_kit, {"Accept": "image/png"})
    assert status == 200 and headers["content-type"] == "image/png"
    from_invocations = pixels(Image.open(io.BytesIO(png)))
    assert np.array_equal(from_ui, from_api) and np.array_equal(from_api, from_invocations)


def test_ping_and_docs_on_the_launched_server(ui_server):
    status, _, body = http(ui_server.url + "ping")
    assert status == 200 and json.loads(body)["status"] == "ready"
    assert http(ui_server.url + "docs")[0] == 200
    assert http(ui_server.url + "openapi.json")[0] == 200
    assert http(ui_server.url)[0] == 200  # the UI is still at /


# --- the OpenAPI schema against the live server --------------------------------------------------

# Valid but slow on the tiny model (16 images x 150 steps ~ 20 s): the fuzzer's values are capped.
_CAPS = {"steps": 4, "batch_size": 2, "n_iter": 2, "count": 2}


def _capped(case):
    if isinstance(case.body, dict):
        for key, cap in _CAPS.items():
            if isinstance(case.body.get(key), int) and case.body[key] > cap:
                case.body[key] = cap
    return case


def test_openapi_schema_holds_against_the_live_server(ui_server):
    """Every operation of /openapi.json, fuzzed by schemathesis against the launched server: no 5xx
    (but /ping's documented 503), statuses, content types and bodies as the schema says."""
    from hypothesis import given
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(ui_server.url + "openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) > 25
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case):
            # A schema cannot say which sizes are compiled: a valid-looking 512x512 is a documented 400.
            _capped(case).call_and_validate(excluded_checks=[positive_data_acceptance])

        check()


# --- auth ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def auth_server(compiled_registry, tmp_path_factory):
    from ui_server import start_app

    server = start_app(Path(compiled_registry.path), tmp_path_factory.mktemp("auth-server"),
                       extra_args=["--auth", "alice:wonder"])
    yield server
    server.stop()


def test_with_auth_every_api_route_and_the_ui_need_credentials(auth_server):
    status, _, raw = http(auth_server.url + "openapi.json", auth=("alice", "wonder"))
    assert status == 200
    paths = json.loads(raw)["paths"]
    routes = [(method.upper(), path) for path, operations in paths.items() for method in operations]
    assert len(routes) > 25
    for method, path in routes + [("GET", "/openapi.json"), ("GET", "/docs")]:
        status, headers, _ = http(auth_server.url + path.lstrip("/"), {} if method == "POST" else None)
        if path == "/ping":
            assert status in (200, 503)
        else:
            assert status == 401 and headers["www-authenticate"].startswith("Basic"), (method, path, status)
    assert http(auth_server.url + "sdapi/v1/txt2img", {"prompt": "x"}, auth=("alice", "nope"))[0] == 401
    status, _, raw = http(auth_server.url + "sdapi/v1/txt2img", {"prompt": "x", "steps": 2}, auth=("alice", "wonder"))
    assert status == 200 and len(json.loads(raw)["images"]) == 1
    # The UI: Gradio's own routes refuse without its login cookie.
    assert http(auth_server.url + "config")[0] == 401
    assert http(auth_server.url + "gradio_api/info")[0] == 401


def test_with_auth_the_ui_queue_files_and_metrics_need_credentials(auth_server):
    """What the OpenAPI list does not cover: /metrics, Gradio's queue and API, gradio_client and a
    saved output's file URL are refused without credentials and work with them."""
    import requests
    from gradio_client import Client

    assert http(auth_server.url + "metrics")[0] == 401
    status, _, raw = http(auth_server.url + "metrics", auth=("alice", "wonder"))
    assert status == 200 and b"sd_queue_waiting" in raw
    assert requests.post(auth_server.url + "gradio_api/queue/join", json={"fn_index": 0, "data": [],
                                                                          "session_hash": "x"}).status_code == 401
    from gradio_client.exceptions import AuthenticationError

    with pytest.raises(AuthenticationError, match="credentials were not provided"):
        Client(auth_server.url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):  # a wrong password
        Client(auth_server.url, auth=("alice", "nope"), verbose=False)
    client = Client(auth_server.url, auth=("alice", "wonder"), verbose=False)
    images, infotext, _ = client.predict(prompt="a blue square", steps=2, seed=7, batch_count=1, api_name="/txt2img")
    assert images and "Seed: 7" in infotext
    saved = sorted(auth_server.outputs.rglob("*.png"))
    assert saved
    file_url = auth_server.url + f"gradio_api/file={saved[-1]}"
    assert requests.get(file_url).status_code in (401, 403)
    session = requests.Session()
    assert session.post(auth_server.url + "login", data={"username": "alice", "password": "wonder"}).status_code == 200
    answer = session.get(file_url)
    assert answer.status_code == 200 and answer.content[:8] == b"\x89PNG\r\n\x1a\n"
    page = requests.get(auth_server.url)
    assert "a blue square" not in page.text  # the page without a login shows no prompt or output


def test_webuiapi_with_credentials_and_interrupt_scoped_to_the_user(auth_server):
    import webuiapi

    alice = webuiapi.WebUIApi(baseurl=auth_server.url + "sdapi/v1", username="alice", password="wonder", steps=2)
    result = alice.txt2img(prompt="x", seed=2, width=64, height=64)
    assert len(result.images) == 1 and result.info["all_seeds"] == [2]
    assert alice.interrupt() == {"interrupted": 0}  # nothing of alice's is running


@pytest.mark.parametrize("path", [
    "gradio_api/file=/etc/passwd", "file=/etc/passwd", "gradio_api/file=%2Fetc%2Fpasswd",
    "gradio_api/file={outputs}/../../../../etc/passwd", "static/../../../../etc/passwd",
    "assets/..%2F..%2F..%2Fetc%2Fpasswd", "gradio_api/file={registry}",
])
def test_no_route_serves_files_outside_the_outputs(ui_server, compiled_registry, path):
    url = ui_server.url + path.format(outputs=ui_server.outputs, registry=compiled_registry.path)
    status, _, body = http(url)
    assert status in (403, 404) and b"root:" not in body and b"models:" not in body


def test_saved_outputs_are_served(ui_server):
    status, _, raw = http(ui_server.url + "sdapi/v1/txt2img", {"prompt": "x", "steps": 2, "seed": 5150,
                                                                "save_images": True})
    assert status == 200
    [saved] = sorted(ui_server.outputs.glob("txt2img-images/*/*-5150.png"))
    status, headers, body = http(ui_server.url + f"gradio_api/file={saved}")
    assert status == 200 and body == saved.read_bytes()
