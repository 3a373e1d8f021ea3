"""PixArt-Sigma (family ``pixart-sigma``) on CPU: registry, TorchScript compile, generation through the
Engine, parity with plain diffusers ``PixArtSigmaPipeline``, and the requests the family refuses.

The model is the tiny random PixArt-Sigma from tests/make_tiny_models.py (T5 encoder, 2-layer
transformer with learned sigma, tiny VAE), compiled by the session's ``compiled_registry`` fixture.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from engine import GenerateRequest, artifacts
from engine.errors import InvalidRequest, RegistryError
from engine.registry import DEFAULT_REGISTRY, load_registry
from engine.types import Size

MODEL = "tiny-pixart-sigma"
SEED, STEPS, CFG = 21, 3, 6.5
PROMPT, NEGATIVE = "a red square", "blurry, green"


def _registry_with(tmp_path, **fields):
    model = {"id": "px", "family": "pixart-sigma", "source": {"hub": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"},
             "resolutions": ["1024x1024"], **fields}
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"models": [model]}))
    return path


def test_shipped_registry_lists_pixart_sigma_1024_and_512():
    registry = load_registry(DEFAULT_REGISTRY)
    by_ref = {spec.source.ref: spec for spec in registry.models}
    big, small = by_ref["PixArt-alpha/PixArt-Sigma-XL-2-1024-MS"], by_ref["PixArt-alpha/PixArt-Sigma-XL-2-512-MS"]
    assert big.family == small.family == "pixart-sigma"
    assert big.resolutions == (Size(1024, 1024),) and small.resolutions == (Size(512, 512),)
    assert big.tp_degree == small.tp_degree == 8
    assert (big.defaults.sampler, big.defaults.steps, big.defaults.cfg_scale) == ("DPM++ 2M", 20, 4.5)


def test_registry_defaults_tp_degree_and_what_the_family_refuses(tmp_path):
    spec = load_registry(_registry_with(tmp_path)).get("px")
    assert spec.tp_degree == 8 and (spec.defaults.sampler, spec.defaults.steps, spec.defaults.cfg_scale) == (
        "DPM++ 2M", 20, 4.5)
    with pytest.raises(RegistryError, match=r"'px', field 'defaults.sampler': expected one of .*DPM\+\+ 2M.*found 'Heun'"):
        load_registry(_registry_with(tmp_path, defaults={"sampler": "Heun"}))
    with pytest.raises(RegistryError, match="field 'tp_degree': expected one of 1, 2, 4, 8, 16, 32, found 3"):
        load_registry(_registry_with(tmp_path, tp_degree=3))
    with pytest.raises(RegistryError, match=r"field 'batch_sizes': expected \[1\] for family pixart-sigma"):
        load_registry(_registry_with(tmp_path, batch_sizes=[1, 2]))
    with pytest.raises(RegistryError, match="no single-file loader"):
        load_registry(_registry_with(tmp_path, source={"single_file": "px.safetensors"}))
    sd = tmp_path / "sd.yaml"
    sd.write_text(yaml.safe_dump({"models": [{"id": "s", "family": "sd15", "source": {"hub": "a/b"},
                                              "resolutions": ["512x512"], "tp_degree": 2}]}))
    with pytest.raises(RegistryError, match="'s', field 'tp_degree': expected no tp_degree for family sd15"):
        load_registry(sd)


def test_compiled_artifacts_t5_with_mask_transformer_and_vae_decoder(compiled_registry):
    directory = artifacts.variant_dir(compiled_registry.artifacts_dir, MODEL, Size(64, 64), "cpu")
    manifest = json.loads((directory / "manifest.json").read_text())
    components = manifest["components"]
    assert set(components) == {"text_encoder", "transformer", "vae_decoder"}  # no img2img: no VAE encoder
    assert [i["shape"] for i in components["text_encoder"]["inputs"]] == [[1, 300], [1, 300]]  # ids, mask
    assert [i["dtype"] for i in components["text_encoder"]["inputs"]] == ["int64", "int64"]
    assert [i["shape"] for i in components["transformer"]["inputs"]] == [[2, 4, 8, 8], [2, 300, 32], [2], [2, 300]]
    assert components["transformer"]["batch"] == 2 and manifest["family"] == "pixart-sigma"
    assert manifest["tp_degree"] == 1  # the cpu backend shards nothing
    assert artifacts.verify_checksums(directory, manifest) == []


@pytest.fixture(scope="module")
def plain_pixart(compiled_registry):
    from diffusers import PixArtSigmaPipeline

    pipe = PixArtSigmaPipeline.from_pretrained(compiled_registry.get(MODEL).source.ref)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain_image(pipe, sampler: str) -> np.ndarray:
    """What plain diffusers makes, the scheduler built as diffusers' docs map the A1111 name."""
    import diffusers

    from test_parity import DIFFUSERS_DOCS_TABLE

    name, options = DIFFUSERS_DOCS_TABLE[sampler]
    config = {k: v for k, v in pipe.scheduler.config.items() if k not in ("algorithm_type", "use_karras_sigmas")}
    config.setdefault("clip_sample", False)
    pipe.scheduler = getattr(diffusers, name).from_config(config, **options)
    image = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG,
                 generator=torch.Generator("cpu").manual_seed(SEED), height=64, width=64,
                 use_resolution_binning=False, clean_caption=False).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "DPM++ 2M Karras", "Euler a", "UniPC", "DDIM"])
def test_engine_equals_plain_pixart_sigma_pipeline(cpu_engine, plain_pixart, sampler):
    result = cpu_engine.generate(GenerateRequest(model=MODEL, prompt=PROMPT, negative_prompt=NEGATIVE,
                                                 sampler=sampler, steps=STEPS, cfg_scale=CFG, seed=SEED))
    ours = np.asarray(result.images[0].image.convert("RGB"), dtype=np.int16)
    assert ours.std() > 5  # an image, not a blank
    assert np.abs(ours - plain_image(plain_pixart, sampler)).max() <= 1, sampler
    assert "Model: tiny-pixart-sigma" in result.images[0].infotext and "Sampler: " + sampler in result.images[0].infotext


def test_default_sampler_steps_progress_and_model_list(cpu_engine):
    steps = []
    result = cpu_engine.generate(GenerateRequest(model=MODEL, prompt=PROMPT, seed=3),
                                 on_progress=lambda p: steps.append((p.step, p.total_steps)))
    assert (result.sampler, result.steps, result.cfg_scale) == ("DPM++ 2M", 4, 4.5)  # the tiny entry's defaults
    assert steps == [(1, 4), (2, 4), (3, 4), (4, 4)]
    info = next(m for m in cpu_engine.models() if m.id == MODEL)
    assert info.family == "pixart-sigma" and info.compiled_sizes() == [Size(64, 64)]


def test_refused_sampler_and_img2img_name_the_model(cpu_engine):
    with pytest.raises(InvalidRequest, match=r"sampler 'Heun' is not available for tiny-pixart-sigma \(pixart-sigma\)"
                                             r".*use one of: .*DPM\+\+ 2M"):
        cpu_engine.generate(GenerateRequest(model=MODEL, prompt=PROMPT, sampler="Heun", seed=1))
    with pytest.raises(InvalidRequest, match="img2img is not available for tiny-pixart-sigma: the pixart-sigma "
                                             "family has no img2img pipeline"):
        cpu_engine.generate(GenerateRequest(model=MODEL, prompt=PROMPT, seed=1, init_image=Image.new("RGB", (64, 64))))


def test_eager_backend_generates_pixart_sigma(eager_engine):
    result = eager_engine.generate(GenerateRequest(model=MODEL, prompt=PROMPT, steps=2, seed=5))
    assert result.images[0].image.size == (64, 64)


@pytest.fixture(scope="module")
def api(cpu_engine, tmp_path_factory):
    from fastapi.testclient import TestClient

    from api import create_api

    app, _ctx = create_api(cpu_engine, tmp_path_factory.mktemp("pixart-api"), flags={"backend": "cpu"})
    with TestClient(app) as client:
        yield client


def test_api_lists_generates_and_refuses_img2img_for_pixart(api):
    import base64
    import io

    listed = next(m for m in api.get("/sdapi/v1/sd-models").json() if m["model_name"] == MODEL)
    assert listed["family"] == "pixart-sigma" and listed["compiled"] == ["64x64"]
    pick = {"override_settings": {"sd_model_checkpoint": MODEL}}
    made = api.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, "steps": 2, "seed": 7, **pick})
    assert made.status_code == 200 and json.loads(made.json()["info"])["infotexts"][0].endswith(
        "Model: tiny-pixart-sigma, Backend: cpu")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 20, 20)).save(buffer, format="PNG")
    refused = api.post("/sdapi/v1/img2img", json={"prompt": PROMPT, "steps": 2, **pick,
                                                  "init_images": [base64.b64encode(buffer.getvalue()).decode()]})
    assert refused.status_code == 422 and "img2img is not available for tiny-pixart-sigma" in refused.text


def test_ui_models_tab_lists_pixart_with_its_compiled_size(cpu_engine):
    from types import SimpleNamespace

    from ui.models import model_rows

    rows = model_rows(SimpleNamespace(engine=cpu_engine), cpu_engine.models())
    [row] = [r for r in rows if r[0] == MODEL]
    assert row[2] == "pixart-sigma" and row[3] == "64x64" and "compiled" in row[6]


def test_live_preview_comes_through_the_pixart_step_callback(cpu_engine):
    """PixArtSigmaPipeline has only the legacy step callback; the serving pipeline passes the latents on."""
    previews = []
    cpu_engine.generate(GenerateRequest(model=MODEL, prompt=PROMPT, seed=3, steps=6),  # a preview every 5 steps
                        on_progress=lambda p: previews.append(p.preview))
    assert previews[:4] == [None] * 4 and previews[4] is not None and previews[4].size == (64, 64)


def test_a_prompt_longer_than_t5_reads_names_the_cut_words(cpu_engine):
    """PixArt-Sigma's T5 reads 300 tokens (299 and its end token), not CLIP's 75."""
    fits = "ab " * 149 + "a"  # the tiny tokenizer: "▁a", "b" per "ab" -> 299 tokens
    result = cpu_engine.generate(GenerateRequest(model=MODEL, prompt=fits + " zz", seed=1, steps=1))
    assert result.notices == ('the prompt is 301 tokens and the model reads 299: these words were ignored: "zz"',)
    assert cpu_engine.generate(GenerateRequest(model=MODEL, prompt=fits, seed=1, steps=1)).notices == ()
