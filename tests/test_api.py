"""The HTTP API in process (FastAPI's TestClient) on the tiny compiled models and a real cpu engine:
A1111 request/response shapes, errors by status and field, options, progress, interrupt, the
SageMaker routes and auth. The launched server with real clients is in test_api_server.py."""
from __future__ import annotations

import re
import base64
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from engine.infotext import parse_infotext


@pytest.fixture(scope="module")
def api_engine(compiled_registry):
    """An engine of this module's own: the options tests change its default model."""
    from engine import Engine, EngineSettings
    from engine.backends import make_backend

    engine = Engine(compiled_registry, make_backend("cpu"), EngineSettings(max_warm=3))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def api(api_engine, tmp_path_factory):
    from api import create_api

    app, ctx = create_api(api_engine, tmp_path_factory.mktemp("api-outputs"), flags={"backend": "cpu"})
    with TestClient(app) as client:
        client.ctx = ctx
        yield client


@pytest.fixture(autouse=True)
def default_model(api_engine):
    api_engine.set_default_model("tiny-sd15")


def b64_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def gradient() -> Image.Image:
    array = np.zeros((48, 80, 3), dtype=np.uint8)
    array[..., 0] = np.linspace(0, 255, 80, dtype=np.uint8)[None, :]
    array[..., 2] = np.linspace(255, 0, 48, dtype=np.uint8)[:, None]
    return Image.fromarray(array)


# --- txt2img / img2img ---------------------------------------------------------------------------

def test_txt2img_answers_in_a1111_shape_with_seeds_per_image(api):
    body = {"prompt": "a red circle", "negative_prompt": "blurry", "seed": 100, "batch_size": 2, "n_iter": 2,
            "steps": 3, "cfg_scale": 6.5, "sampler_name": "DPM++ 2M", "width": 64, "height": 96}
    response = api.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    info = json.loads(data["info"])
    assert info["all_seeds"] == [100, 101, 102, 103] and info["seed"] == 100
    assert (info["sampler_name"], info["steps"], info["cfg_scale"]) == ("DPM++ 2M", 3, 6.5)
    assert (info["width"], info["height"], info["sd_model_name"]) == (64, 96, "tiny-sd15")
    assert info["all_prompts"] == ["a red circle"] * 4 and info["negative_prompt"] == "blurry"
    assert data["parameters"]["prompt"] == "a red circle" and data["parameters"]["n_iter"] == 2
    assert len(data["images"]) == 4 and data["warnings"] == []
    for index, text in enumerate(data["images"]):
        image = decode(text)
        assert image.format == "PNG" and image.size == (64, 96)
        params = parse_infotext(image.info["parameters"])
        assert params["Seed"] == str(100 + index) and params["Sampler"] == "DPM++ 2M"
        assert image.info["parameters"] == info["infotexts"][index]


def test_api_images_equal_the_engines_for_the_same_seed(api, api_engine):
    from engine import GenerateRequest

    data = api.post("/sdapi/v1/txt2img", json={"prompt": "a square", "seed": 9, "steps": 3, "cfg_scale": 5.5,
                                               "sampler_name": "Euler"}).json()
    direct = api_engine.generate(GenerateRequest(model="tiny-sd15", prompt="a square", seed=9, steps=3,
                                                 cfg_scale=5.5, sampler="Euler"))
    assert np.array_equal(pixels(decode(data["images"][0])), pixels(direct.images[0].image))


def test_legacy_sampler_index_and_karras_schedule(api):
    data = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "sampler_index": "k_dpmpp_2m",
                                               "scheduler": "Karras"}).json()
    assert json.loads(data["info"])["sampler_name"] == "DPM++ 2M Karras"
    refused = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "DDIM", "scheduler": "karras"})
    assert refused.status_code == 422 and "not available for DDIM" in refused.json()["detail"][0]["msg"]


def test_img2img_takes_data_uri_images_and_resize_modes(api):
    source = "data:image/png;base64," + b64_png(gradient())
    results = {}
    for mode in (0, 1, 2):
        response = api.post("/sdapi/v1/img2img", json={
            "prompt": "blue", "init_images": [source], "resize_mode": mode, "denoising_strength": 0.3,
            "steps": 4, "seed": 5, "sampler_name": "Euler", "width": 64, "height": 64})
        assert response.status_code == 200, response.text
        data = response.json()
        assert data["parameters"]["init_images"] is None  # echoed only with include_init_images
        params = parse_infotext(decode(data["images"][0]).info["parameters"])
        assert params["Denoising strength"] == "0.3" and params["Size"] == "64x64"
        results[mode] = pixels(decode(data["images"][0]))
    # A 80x48 gradient fitted three ways into 64x64: the modes must differ.
    assert not np.array_equal(results[0], results[1]) and not np.array_equal(results[1], results[2])


def test_img2img_with_several_init_images_cycles_them(api):
    red, blue = Image.new("RGB", (64, 64), (250, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 250))
    common = {"prompt": "x", "denoising_strength": 0.5, "steps": 4, "sampler_name": "Euler"}
    data = api.post("/sdapi/v1/img2img", json={**common, "init_images": [b64_png(red), b64_png(blue)],
                                               "batch_size": 3, "seed": 1, "include_init_images": True}).json()
    assert json.loads(data["info"])["all_seeds"] == [1, 2, 3] and len(data["parameters"]["init_images"]) == 2
    for index, (source, seed) in enumerate([(red, 1), (blue, 2), (red, 3)]):  # image i starts from init i % 2
        alone = api.post("/sdapi/v1/img2img", json={**common, "init_images": [b64_png(source)], "seed": seed}).json()
        # The three ran as one batch on the batch-4 UNet, alone on the batch-1 UNet: within 1 level.
        assert np.abs(pixels(decode(data["images"][index])) - pixels(decode(alone["images"][0]))).max() <= 1


def test_send_images_false_and_save_images(api):
    outputs = api.ctx.outputs.root
    before = set(outputs.rglob("*.png"))
    data = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "seed": 77, "send_images": False,
                                               "save_images": True}).json()
    assert data["images"] == [] and json.loads(data["info"])["all_seeds"] == [77]
    saved = set(outputs.rglob("*.png")) - before
    assert [p.name.split("-", 1)[1] for p in saved] == ["77.png"] and "txt2img-images" in str(next(iter(saved)))


# --- what cannot be done is refused, never a 500 -------------------------------------------------

@pytest.mark.parametrize("body, status, needle", [
    ({"width": 128, "height": 128}, 400, "128x128 is not compiled for tiny-sd15; compiled: 64x64, 64x96"),
    ({"sampler_name": "Bogus"}, 404, "Sampler not found"),
    ({"override_settings": {"sd_model_checkpoint": "nope"}}, 404, "model 'nope' not found"),
    ({"enable_hr": True}, 400, "hires fix to 128x128: 128x128 is not compiled for tiny-sd15"),
    ({"enable_hr": True, "hr_prompt": "sharper"}, 400, "hr_prompt: a different prompt for the hires pass"),
    ({"styles": ["cinematic"]}, 400, "styles: prompt styles are not available"),
    ({"subseed_strength": 0.5}, 400, "subseed_strength"),
    ({"restore_faces": True}, 400, "restore_faces"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{}]}}}, 400, "alwayson_scripts"),
    ({"override_settings": {"CLIP_stop_at_last_layers": 2}}, 400, "override_settings.CLIP_stop_at_last_layers"),
    ({"batch_size": 8, "n_iter": 3}, 422, "at most 16 images"),
    ({"steps": 0}, 422, "steps"),
    ({"cfg_scale": 99}, 422, "cfg_scale"),
    ({"seed": -5}, 422, "seed"),
])
def test_txt2img_refusals_name_the_field(api, body, status, needle):
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, **body})
    assert response.status_code == status, response.text
    assert needle in json.dumps(response.json())


def test_unknown_fields_are_accepted_and_reported(api):
    response = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "my_extension_field": 1,
                                                   "override_settings": {"sd_vae": "Automatic", "eta_noise": 3}})
    assert response.status_code == 200
    assert response.json()["warnings"] == ["ignored fields this server does not know: my_extension_field",
                                           "ignored override_settings: eta_noise"]


def test_bad_init_images_are_422_at_their_index(api):
    """What each bad image says is in the input table (test_input_table.py); here, where it says it."""
    images = [b64_png(gradient()), base64.b64encode(b"hello, not an image").decode()]
    response = api.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": images, "steps": 2})
    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "init_images", 1] and "not a readable image" in error["msg"]


def test_a_truncated_prompt_is_reported_in_warnings(api):
    words = " ".join(f"word{i}" for i in range(40))
    data = api.post("/sdapi/v1/txt2img", json={"prompt": words, "steps": 2, "seed": 1}).json()
    assert any("these words were ignored" in w and "the model reads 1 chunk" in w and "add 4 to prompt_chunks" in w
               for w in data["warnings"])


def test_an_empty_prompt_generates_as_in_a1111(api):
    data = api.post("/sdapi/v1/txt2img", json={"steps": 2, "seed": 8}).json()
    assert len(data["images"]) == 1 and json.loads(data["info"])["prompt"] == ""


def test_a_failed_request_leaves_the_engine_serving(api):
    assert api.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": ["aGk="]}).status_code == 422
    assert api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}).status_code == 200


# --- listings, options, png-info ----------------------------------------------------------------

def test_listings(api):
    models = api.get("/sdapi/v1/sd-models").json()
    sd15 = next(m for m in models if m["model_name"] == "tiny-sd15")
    assert sd15["title"] == "tiny-sd15" and sd15["compiled"] == ["64x64", "64x96"] and "hash" in sd15
    samplers = {s["name"]: s for s in api.get("/sdapi/v1/samplers").json()}
    assert "k_euler_a" in samplers["Euler a"]["aliases"] and "euler_a" in samplers["Euler a"]["aliases"]
    assert [s["name"] for s in api.get("/sdapi/v1/schedulers").json()] == ["automatic", "karras", "sgm_uniform"]
    assert api.get("/sdapi/v1/loras").json() == [] and api.get("/sdapi/v1/sd-vae").json() == []
    assert api.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}
    memory = api.get("/sdapi/v1/memory").json()
    assert memory["ram"]["total"] > 0 and memory["engine"]["backend"] == "cpu" and "error" in memory["cuda"]
    assert api.get("/sdapi/v1/cmd-flags").json() == {"backend": "cpu"}


def test_options_switch_the_default_model_and_warm_it(api, api_engine):
    api_engine.unload("tiny-sd21")
    response = api.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd21", "CLIP_stop_at_last_layers": 1})
    assert response.status_code == 200, response.text
    assert "CLIP_stop_at_last_layers" in response.json()["warnings"][0]
    assert api_engine.is_warm("tiny-sd21")
    options = api.get("/sdapi/v1/options").json()
    assert options["sd_model_checkpoint"] == "tiny-sd21" and options["CLIP_stop_at_last_layers"] == 1
    data = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2}).json()
    assert json.loads(data["info"])["sd_model_name"] == "tiny-sd21"
    one_off = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2,
                                                  "override_settings": {"sd_model_checkpoint": "TINY-SDXL"}}).json()
    assert json.loads(one_off["info"])["sd_model_name"] == "tiny-sdxl"
    assert api.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "tiny-sd21"
    assert api.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}).status_code == 404
    # a title copied from AUTOMATIC1111 (file name and short hash) finds the registry id
    a1111_title = api.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "override_settings": {
        "sd_model_checkpoint": "tiny-sd15.safetensors [6ce0161689]"}}).json()
    assert json.loads(a1111_title["info"])["sd_model_name"] == "tiny-sd15"


def test_png_info_reads_a1111_parameters_and_other_chunks(api):
    from PIL.PngImagePlugin import PngInfo

    text = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 9, Size: 512x512"
    meta = PngInfo()
    meta.add_text("parameters", text)
    meta.add_text("Software", "AUTOMATIC1111")
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG", pnginfo=meta)
    data = api.post("/sdapi/v1/png-info", json={"image": base64.b64encode(buffer.getvalue()).decode()}).json()
    assert data["info"] == text and data["items"] == {"Software": "AUTOMATIC1111"}
    assert data["parameters"]["Sampler"] == "Euler a" and data["parameters"]["Negative prompt"] == "dog"
    assert api.post("/sdapi/v1/png-info", json={"image": "%%%"}).status_code == 422


def test_refresh_checkpoints_rereads_the_registry_and_keeps_it_when_broken(compiled_registry, tmp_path):
    from api import create_api
    from engine import Engine
    from engine.backends import make_backend

    from engine import load_registry

    original = Path(compiled_registry.path).read_text()
    registry_file = Path(compiled_registry.path).with_name("refresh-test-registry.yaml")  # same relative paths
    registry_file.write_text(original)

    engine = Engine(load_registry(registry_file), make_backend("eager"))
    app, _ = create_api(engine, tmp_path / "out")
    with TestClient(app) as client:
        registry_file.write_text("models: [oops")
        broken = client.post("/sdapi/v1/refresh-checkpoints")
        assert broken.status_code == 503 and str(registry_file) in broken.json()["detail"]
        assert len(client.get("/sdapi/v1/sd-models").json()) == len(compiled_registry.models)
        registry_file.write_text(original)
        assert client.post("/sdapi/v1/refresh-checkpoints").status_code == 200
    engine.close()


# --- progress, interrupt, skip -------------------------------------------------------------------

def _long_request(api, results, **extra):
    """tiny-sd21 is compiled for batch 1: the request's images are made one after the other."""
    body = {"prompt": "a long one", "steps": 150, "batch_size": 4, "seed": 3,
            "override_settings": {"sd_model_checkpoint": "tiny-sd21"}, **extra}
    results.append(api.post("/sdapi/v1/txt2img", json=body))


def _wait_progress(api, condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = api.get("/sdapi/v1/progress").json()
        if condition(progress):
            return progress
        time.sleep(0.05)
    raise AssertionError(f"progress never matched: {progress}")


def test_progress_reports_the_queue_and_interrupt_returns_the_finished_images(api, api_engine):
    results: list = []
    runner = threading.Thread(target=_long_request, args=(api, results))
    runner.start()
    progress = _wait_progress(api, lambda p: p["state"]["sampling_step"] > 0 and p["state"]["job_no"] > 0)
    assert progress["state"]["sampling_steps"] == 150 and 0 < progress["progress"] < 1
    assert progress["state"]["job_count"] >= 1 and progress["eta_relative"] > 0
    _wait_progress(api, lambda p: p["progress"] > 0.3)  # past the first image of four
    assert api.post("/sdapi/v1/interrupt").json() == {"interrupted": 1}
    runner.join(60)
    data = results[0].json()
    assert results[0].status_code == 200 and 1 <= len(data["images"]) < 4
    assert json.loads(data["info"])["interrupted"] is True and "interrupted" in data["warnings"][-1]
    _wait_progress(api, lambda p: p["state"]["job_count"] == 0, timeout=5)  # the device call ends within a step


def test_skip_drops_the_current_image_and_goes_on(api):
    results: list = []
    runner = threading.Thread(target=_long_request, args=(api, results), kwargs={"batch_size": 2, "steps": 100})
    runner.start()
    _wait_progress(api, lambda p: p["state"]["sampling_step"] > 5)
    assert api.post("/sdapi/v1/skip").json() == {"skipped": 1}
    runner.join(60)
    info = json.loads(results[0].json()["info"])
    assert info["all_seeds"] == [4] and info["interrupted"] is False


# --- SageMaker ------------------------------------------------------------------------------------

def test_invocations_seed_001_body_returns_the_png_of_txt2img(api):
    body = {"prompt": "a lovely cat", "parameters": {"num_inference_steps": 3, "guidance_scale": 6, "seed": 21}}
    response = api.post("/invocations", json=body)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    same = api.post("/sdapi/v1/txt2img", json={"prompt": "a lovely cat", "steps": 3, "cfg_scale": 6, "seed": 21}).json()
    assert np.array_equal(pixels(Image.open(io.BytesIO(response.content))), pixels(decode(same["images"][0])))


def test_invocations_quick_kit_body_with_count_needs_json(api):
    body = {"prompt": "a photo", "negative_prompt": "", "steps": 3, "sampler": "euler_a", "seed": 52362,
            "height": 64, "width": 64, "count": 2}
    as_json = api.post("/invocations", json=body, headers={"Accept": "application/json"})
    info = json.loads(as_json.json()["info"])
    assert info["all_seeds"] == [52362, 52363] and info["sampler_name"] == "Euler a"
    assert api.post("/invocations", json=body).headers["content-type"].startswith("application/json")
    refused = api.post("/invocations", json=body, headers={"Accept": "image/png"})
    assert refused.status_code == 406 and "Accept: application/json" in refused.json()["detail"]


def test_invocations_img2img_with_base64_and_url_input(api):
    body = {"prompt": "x", "steps": 3, "seed": 2, "width": 64, "height": 64, "input_image": b64_png(gradient())}
    response = api.post("/invocations", json=body, headers={"Accept": "application/json"})
    params = parse_infotext(decode(response.json()["images"][0]).info["parameters"])
    assert response.status_code == 200 and params["Denoising strength"] == "0.75"
    url = api.post("/invocations", json={**body, "input_image": "https://example.com/in.png"})
    assert url.status_code == 400 and "--allow-image-urls" in url.json()["detail"]
    assert api.post("/invocations", json={"prompt": "x", "count": 99}).status_code == 422


def test_invocations_fetch_urls_only_when_allowed(api_engine, tmp_path):
    """--allow-image-urls: the server downloads the image (from a local HTTP server here)."""
    import http.server

    from api import create_api

    (tmp_path / "in.png").write_bytes(base64.b64decode(b64_png(gradient())))
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    app, _ = create_api(api_engine, tmp_path / "out", allow_image_urls=True)
    try:
        with TestClient(app) as client:
            base = f"http://127.0.0.1:{server.server_port}"
            body = {"prompt": "x", "steps": 2, "seed": 2, "width": 64, "height": 64, "input_image": f"{base}/in.png"}
            assert client.post("/invocations", json=body).headers["content-type"] == "image/png"
            missing = client.post("/invocations", json={**body, "input_image": f"{base}/missing.png"})
            assert missing.status_code == 400 and "could not download" in missing.json()["detail"]
    finally:
        server.shutdown()


def test_ping_is_503_until_the_default_model_is_warm(compiled_registry, tmp_path):
    from api import create_api
    from engine import Engine
    from engine.backends import make_backend

    engine = Engine(compiled_registry, make_backend("cpu"))
    app, ctx = create_api(engine, tmp_path)
    with TestClient(app) as client:
        assert client.get("/ping").status_code == 503 and client.get("/ping").json()["status"] == "loading"
        ctx.startup_error = "tiny-sd15@64x64 is broken"
        assert client.get("/ping").json() == {"status": "failed", "model": "tiny-sd15", "detail": "tiny-sd15@64x64 is broken"}
        engine.load("tiny-sd15")
        assert client.get("/ping").json() == {"status": "ready", "model": "tiny-sd15"}
    engine.close()


# --- schema and auth -----------------------------------------------------------------------------

def test_openapi_schema_comes_from_the_pydantic_models(api):
    schema = api.get("/openapi.json").json()
    txt2img = schema["paths"]["/sdapi/v1/txt2img"]["post"]
    assert txt2img["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/Txt2ImgRequest")
    assert "init_images" in schema["components"]["schemas"]["Img2ImgRequest"]["required"]
    assert {"/ping", "/invocations", "/sdapi/v1/progress"} <= set(schema["paths"])
    assert "swagger" in api.get("/docs").text.lower()


def test_with_auth_every_route_but_ping_needs_credentials(api_engine, tmp_path):
    from api import create_api

    app, _ = create_api(api_engine, tmp_path, auth=[("alice", "wonder")])
    paths = app.openapi()["paths"]
    routes = sorted({(method.upper(), path) for path, operations in paths.items() for method in operations})
    routes += [("GET", "/openapi.json"), ("GET", "/docs")]
    assert len(routes) > 25
    with TestClient(app) as client:
        for method, path in routes:
            response = client.request(method, path)
            if path == "/ping":
                assert response.status_code in (200, 503)
            else:
                assert response.status_code == 401, (method, path, response.status_code)
                assert response.headers["www-authenticate"].startswith("Basic")
        assert client.get("/sdapi/v1/options", auth=("alice", "wrong")).status_code == 401
        assert client.get("/sdapi/v1/options", auth=("alice", "wonder")).status_code == 200
        assert client.get("/openapi.json", auth=("alice", "wonder")).status_code == 200


def test_metrics_count_requests_images_latency_and_queue(api):
    def sample(text: str, name: str, **labels) -> float:
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        match = re.search(rf"^{name}\{{{wanted}\}} (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    before = api.get("/metrics").text
    assert api.post("/sdapi/v1/txt2img", json={"prompt": "p", "steps": 2, "batch_size": 3}).status_code == 200
    response = api.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = response.text
    assert sample(after, "sd_images_total", model="tiny-sd15") - sample(before, "sd_images_total", model="tiny-sd15") == 3
    assert (sample(after, "sd_requests_total", model="tiny-sd15", outcome="ok")
            - sample(before, "sd_requests_total", model="tiny-sd15", outcome="ok")) == 1
    assert sample(after, "sd_request_seconds_count", model="tiny-sd15") >= 1
    assert sample(after, "sd_queue_waiting", model="tiny-sd15") == 0
    assert sample(after, "sd_replicas", model="tiny-sd15", state="ready") == 1


def test_img2img_inpaints_with_a1111s_fields(api, api_engine):
    from test_inpaint import square_mask, textured

    from engine import GenerateRequest, Inpaint, Size

    body = {"prompt": "a red ball", "init_images": [b64_png(textured())], "mask": b64_png(square_mask()),
            "mask_blur": 3, "inpainting_fill": 2, "inpaint_full_res": False, "denoising_strength": 0.8,
            "steps": 4, "seed": 8, "sampler_name": "Euler", "cfg_scale": 6, "width": 64, "height": 64}
    response = api.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    image = decode(response.json()["images"][0])
    params = parse_infotext(image.info["parameters"])
    assert params["Mask blur"] == "3" and params["Masked content"] == "latent noise" and "Inpaint area" not in params
    direct = api_engine.generate(GenerateRequest(
        model="tiny-sd15", prompt="a red ball", sampler="Euler", steps=4, cfg_scale=6, seed=8, size=Size(64, 64),
        init_image=textured(), strength=0.8, inpaint=Inpaint(square_mask(), blur=3, fill="latent noise")))
    assert np.array_equal(pixels(image), pixels(direct.images[0].image))
    # A1111's API defaults: only masked (inpaint_full_res true), padding 0, fill 0; blur x/y 4
    default = api.post("/sdapi/v1/img2img", json={**body, "mask_blur": None, "inpainting_fill": 0,
                                                  "inpaint_full_res": 1, "inpainting_mask_invert": 1})
    params = parse_infotext(decode(default.json()["images"][0]).info["parameters"])
    assert params["Inpaint area"] == "Only masked" and params["Masked area padding"] == "0"
    assert params["Mask blur"] == "4" and params["Masked content"] == "fill"
    assert params["Mask mode"] == "Inpaint not masked"


@pytest.mark.parametrize("change, status, message", [
    ({"mask_blur_x": 2, "mask_blur_y": 6}, 422, "mask_blur_x 2 and mask_blur_y 6 differ"),
    ({"mask_round": False}, 400, "mask_round: an unrounded latent mask is not available here; send true"),
    ({"latent_mask": "x"}, 400, "latent_mask: a separate latent mask is not available here"),
    ({"mask": "bm90IGFuIGltYWdl"}, 422, "mask"),
    ({"inpainting_fill": 4}, 422, "inpainting_fill"),
])
def test_bad_inpaint_fields_are_refused_naming_the_field(api, change, status, message):
    from test_inpaint import square_mask, textured

    body = {"prompt": "x", "init_images": [b64_png(textured())], "mask": b64_png(square_mask()), "steps": 2,
            **change}
    response = api.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == status and message in response.text, response.text


def test_a_mask_of_another_size_is_refused(api):
    from test_inpaint import square_mask, textured

    response = api.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [b64_png(textured())], "steps": 2,
                                                    "mask": b64_png(square_mask(width=32))})
    assert response.status_code == 422
    assert "the mask is 32x64 and the image 64x64: they must be the same size" in response.text
