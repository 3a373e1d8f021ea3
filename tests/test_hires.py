"""Hires fix: txt2img at a compiled size, upscaled (latents or pixels), denoised again at a larger
compiled size — against the same two passes done by hand with plain diffusers, plus its refusals,
infotext and the HTTP API fields."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from engine import GenerateRequest, HiresFix, InvalidRequest, Size, UnsupportedResolution
from engine.infotext import parse_infotext

SEED, STEPS, HIRES_STEPS, STRENGTH, CFG = 11, 4, 6, 0.6, 6.5
FIRST, SECOND = Size(64, 64), Size(64, 96)  # both compiled for tiny-sd15 in the tiny registry


@pytest.fixture(scope="module")
def diffusers_pipes(compiled_registry):
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    txt2img = StableDiffusionPipeline.from_pretrained(compiled_registry.get("tiny-sd15").source.ref,
                                                      safety_checker=None, requires_safety_checker=False)
    txt2img.scheduler = EulerDiscreteScheduler.from_config(txt2img.scheduler.config)
    img2img = StableDiffusionImg2ImgPipeline(**txt2img.components)
    for pipe in (txt2img, img2img):
        pipe.set_progress_bar_config(disable=True)
    return txt2img, img2img


def by_hand(pipes, upscaler: str) -> np.ndarray:
    """The two passes with plain diffusers: first pass, A1111's upscale, img2img from the same seed."""
    txt2img, img2img = pipes
    common = dict(prompt="a red square", negative_prompt="blurry", guidance_scale=CFG)
    first = txt2img(**common, num_inference_steps=STEPS, width=FIRST.width, height=FIRST.height,
                    generator=torch.Generator("cpu").manual_seed(SEED),
                    output_type="latent" if upscaler == "Latent" else "pil").images
    if upscaler == "Latent":  # bilinear on the latents, no antialias
        image = torch.nn.functional.interpolate(first, size=(SECOND.height // 8, SECOND.width // 8), mode="bilinear")
    else:
        image = first[0].resize((SECOND.width, SECOND.height), Image.Resampling.LANCZOS)
    final = img2img(**common, image=image, strength=STRENGTH, num_inference_steps=HIRES_STEPS,
                    generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return np.asarray(final.convert("RGB"), dtype=np.int16)


def hires_request(upscaler: str = "Latent", **changes) -> GenerateRequest:
    fix = HiresFix(upscaler=upscaler, steps=HIRES_STEPS, strength=STRENGTH, size=SECOND)
    return GenerateRequest(model="tiny-sd15", prompt="a red square", negative_prompt="blurry", sampler="Euler",
                           steps=STEPS, cfg_scale=CFG, seed=SEED, size=FIRST, hires=fix, **changes)


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_hires_equals_the_two_passes_done_with_plain_diffusers(cpu_engine, diffusers_pipes, upscaler):
    result = cpu_engine.generate(hires_request(upscaler))
    ours = np.asarray(result.images[0].image.convert("RGB"), dtype=np.int16)
    assert result.images[0].image.size == (SECOND.width, SECOND.height) and result.size == SECOND
    assert np.abs(ours - by_hand(diffusers_pipes, upscaler)).max() <= 1


def test_hires_infotext_records_it_as_a1111_does(cpu_engine):
    image = cpu_engine.generate(hires_request("Lanczos", num_images=2)).images[1]
    params = parse_infotext(image.infotext)
    assert (params["Size"], params["Seed"], params["Hires upscaler"], params["Hires resize"],
            params["Hires steps"], params["Denoising strength"]) == ("64x64", str(SEED + 1), "Lanczos", "64x96", "6",
                                                                     "0.6")
    assert "Hires upscale" not in params  # a resize target, not a scale
    scaled = cpu_engine.generate(GenerateRequest(model="tiny-sd15", prompt="x", steps=2, seed=1, size=FIRST,
                                                 hires=HiresFix(scale=1.0, strength=0.5))).images[0]
    assert parse_infotext(scaled.infotext)["Hires upscale"] == "1" and "Hires steps" not in scaled.infotext


@pytest.mark.parametrize("fix, error, message", [
    (HiresFix(scale=2.0), UnsupportedResolution, r"hires fix to 128x192: 128x192 is not compiled for tiny-sd15; "
                                                 r"compiled: 64x64, 64x96"),
    (HiresFix(upscaler="ESRGAN_4x"), InvalidRequest, r"unknown hires upscaler 'ESRGAN_4x'; choose one of Latent, "
                                                     r"Latent \(antialiased\), .*, Lanczos, Nearest"),
    (HiresFix(scale=8.0), InvalidRequest, r"hires scale must be between 1 and 4, got 8"),
    (HiresFix(size=SECOND, strength=0.1, steps=5), InvalidRequest, r"runs no denoising step in the second pass"),
    (HiresFix(size=Size(64, 64), strength=1.5), InvalidRequest, r"hires denoising strength must be between 0 and 1"),
])
def test_hires_refusals_name_the_problem(cpu_engine, fix, error, message):
    with pytest.raises(error, match=message):
        cpu_engine.submit(GenerateRequest(model="tiny-sd15", prompt="x", steps=4, size=SECOND, hires=fix))


def test_hires_is_refused_for_img2img_and_smaller_targets(cpu_engine):
    with pytest.raises(InvalidRequest, match="hires fix is for txt2img"):
        cpu_engine.submit(GenerateRequest(model="tiny-sd15", prompt="x", init_image=Image.new("RGB", (64, 64)),
                                          hires=HiresFix()))
    with pytest.raises(InvalidRequest, match=r"the hires size 64x64 is smaller than the first pass \(64x96\)"):
        cpu_engine.submit(GenerateRequest(model="tiny-sd15", prompt="x", size=SECOND, hires=HiresFix(size=FIRST)))


def test_hires_on_the_eager_backend_scales_to_any_size(eager_engine):
    result = eager_engine.generate(GenerateRequest(model="tiny-sd21", prompt="x", steps=2, seed=3, size=Size(64, 64),
                                                   hires=HiresFix(scale=1.5, upscaler="Latent (bicubic antialiased)")))
    assert result.images[0].image.size == (96, 96)


def test_the_api_takes_a1111_hires_fields(cpu_engine, tmp_path):
    import base64
    import io

    from fastapi.testclient import TestClient

    from api import create_api

    app, _ = create_api(cpu_engine, tmp_path)
    body = {"prompt": "a red square", "negative_prompt": "blurry", "sampler_name": "Euler", "steps": STEPS,
            "cfg_scale": CFG, "seed": SEED, "width": 64, "height": 64, "enable_hr": True, "hr_upscaler": "Latent",
            "hr_resize_x": 64, "hr_resize_y": 96, "hr_second_pass_steps": HIRES_STEPS, "denoising_strength": STRENGTH,
            "override_settings": {"sd_model_checkpoint": "tiny-sd15"}}
    with TestClient(app) as client:
        response = client.post("/sdapi/v1/txt2img", json=body)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
        assert image.size == (64, 96) and "Hires upscaler: Latent" in image.info["parameters"]
        expected = np.asarray(cpu_engine.generate(hires_request()).images[0].image.convert("RGB"), dtype=np.int16)
        assert np.abs(np.asarray(image.convert("RGB"), dtype=np.int16) - expected).max() == 0
        refused = client.post("/sdapi/v1/txt2img", json={**body, "hr_resize_x": 0, "hr_resize_y": 0, "hr_scale": 2})
        assert refused.status_code == 400 and "128x128 is not compiled" in refused.json()["detail"]


pytest_plugins = ["ui_server"]


def test_the_ui_takes_the_hires_fix_controls(ui_server, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(ui_server.url, verbose=False, download_files=str(tmp_path))
    ui = dict(prompt="a red square", negative_prompt="blurry", model="tiny-sd15", resolution="64x64", sampler="Euler",
              steps=STEPS, cfg_scale=CFG, seed=SEED, batch_count=1, enable_hr=True, hr_upscaler="Latent",
              hr_resize="64x96", hr_second_pass_steps=HIRES_STEPS, denoising_strength=STRENGTH, api_name="/txt2img")
    images, info, stats = client.predict(**ui)
    with Image.open(images[0]["image"]) as image:
        assert image.size == (64, 96) and "Hires resize: 64x96" in image.info["parameters"]
    assert "Hires upscaler: Latent" in info and "64x96" in stats
    with pytest.raises(AppError, match="hires fix to 128x128: 128x128 is not compiled"):
        client.predict(**{**ui, "hr_resize": "from Upscale by", "hr_scale": 2})


# A1111's upscalers, written from its latent_upscale_modes and PIL filters (not from engine/hires.py).
A1111_LATENT_MODES = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                      "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                      "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
PIXEL_FILTERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}


@pytest.mark.parametrize("name", [*A1111_LATENT_MODES, *PIXEL_FILTERS])
def test_each_upscaler_resizes_as_a1111_names_it(name):
    from engine.hires import HiresPlan, upscale

    plan = HiresPlan(Size(48, 40), 4, 0.5, HiresFix(upscaler=name))
    if name in PIXEL_FILTERS:
        source = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
        expected = np.asarray(source.resize((48, 40), PIXEL_FILTERS[name]))
        assert np.array_equal(np.asarray(upscale(source, plan)), expected)
    else:
        latents = torch.randn(4, 3, 4, generator=torch.Generator().manual_seed(0))
        mode, antialias = A1111_LATENT_MODES[name]
        expected = torch.nn.functional.interpolate(latents[None], size=(5, 6), mode=mode, antialias=antialias)[0]
        assert torch.equal(upscale(latents, plan), expected)
