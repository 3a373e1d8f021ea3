"""LoRAs fused at compile: a small LoRA made here (random weights on the tiny SD1.5's attention, in
diffusers/peft format and converted to kohya/A1111 format), fused into the UNet and text encoder by
the registry entry that lists it, compiled (TorchScript, cpu) and run eagerly; both must equal plain
diffusers' ``load_lora_weights`` + ``fuse_lora`` for the same seed, and differ from the base model.
Also: the fingerprint follows the file and the scale, ``<lora:name:w>`` selects or refuses, the
registry refuses what is not a LoRA, and ``/sdapi/v1/loras`` lists them."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from engine import GenerateRequest, InvalidRequest, RegistryError
from engine.infotext import parse_infotext

PROMPT, SEED, STEPS, CFG = "a red square", 5, 3, 6.0
SCALE = 0.8
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def make_lora(base: Path, seed: int, text_encoders: tuple[str, ...] = ("text_encoder",)) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on a tiny model's attention (UNet and text encoders), random A and B, keyed as
    diffusers saves it (``unet.….lora_A.weight``, ``text_encoder.….lora_B.weight``)."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    classes = {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    modules = {"unet": UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
               **{name: classes[name].from_pretrained(base, subfolder=name) for name in text_encoders}}
    layers = {}
    for name, module in modules.items():
        targets = UNET_TARGETS if name == "unet" else TEXT_TARGETS
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=targets, init_lora_weights=False), module)
        layers[name] = get_peft_model_state_dict(module)
    return {f"{prefix}.{key}": value.detach().clone() * 2.0 for prefix, state in layers.items()
            for key, value in state.items()}


def to_kohya(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LoRA as A1111 / kohya's sd-scripts write it for SD1.5 (``lora_unet_…``, ``lora_te_…``,
    ``lora_down`` / ``lora_up`` / ``alpha``), by diffusers' own PEFT→kohya converter."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    kohya = convert_state_dict_to_kohya(state_dict)
    return {key.replace("lora_te1_", "lora_te_"): value for key, value in kohya.items()}


def entry(model_id: str, loras: list[dict] | None = None) -> dict:
    return {"id": model_id, "family": "sd15", "source": {"local": "tiny-sd15"}, "resolutions": ["64x64"],
            "defaults": {"sampler": "Euler", "steps": STEPS, "cfg_scale": CFG},
            **({"loras": loras} if loras else {})}


def write_registry(directory: Path, models: list[dict]) -> Path:
    path = directory / "model_registry.yaml"
    path.write_text(yaml.safe_dump({"artifacts_dir": "artifacts", "models": models}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def lora_dir(tiny_dir, tmp_path_factory) -> Path:
    """tiny-sd15 (linked, and as one checkpoint), ``detail.safetensors`` (diffusers format), ``style_kohya.safetensors``
    (another LoRA, kohya format) and a registry: base, base-detail (detail at 0.8), base-style and
    file-detail (the single-file base with detail); tiny-sdxl and xl-lora (a LoRA on its UNet and both
    text encoders)."""
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("lora")
    (directory / "tiny-sd15").symlink_to(tiny_dir / "tiny-sd15")
    (directory / "tiny-sd15.safetensors").symlink_to(tiny_dir / "tiny-sd15.safetensors")
    save_file(make_lora(tiny_dir / "tiny-sd15", seed=1), directory / "detail.safetensors",
              metadata={"ss_network_dim": "4"})
    save_file(to_kohya(make_lora(tiny_dir / "tiny-sd15", seed=2)), directory / "style_kohya.safetensors")
    (directory / "tiny-sdxl").symlink_to(tiny_dir / "tiny-sdxl")
    save_file(make_lora(tiny_dir / "tiny-sdxl", seed=3, text_encoders=("text_encoder", "text_encoder_2")),
              directory / "xl.safetensors")
    write_registry(directory, [
        entry("base"),
        entry("base-detail", [{"source": "detail.safetensors", "scale": SCALE}]),
        entry("base-style", [{"source": "style_kohya.safetensors", "name": "style"}]),
        {**entry("file-detail", [{"source": "detail.safetensors", "scale": SCALE}]),
         "source": {"single_file": "tiny-sd15.safetensors", "config": "tiny-sd15"}},
        {"id": "xl-lora", "family": "sdxl", "source": {"local": "tiny-sdxl"}, "resolutions": ["64x64"],
         "loras": [{"source": "xl.safetensors", "scale": 0.7}]},
    ])
    return directory


@pytest.fixture(scope="module")
def registry(lora_dir):
    from engine.registry import load_registry

    return load_registry(lora_dir / "model_registry.yaml")


@pytest.fixture(scope="module")
def lora_engine(registry):
    """A cpu (TorchScript) engine with base-detail compiled, and an eager one."""
    from engine import Engine, EngineSettings
    from engine.backends import make_backend
    from engine.compile import compile_all

    cpu = make_backend("cpu")
    outcomes = compile_all(registry, cpu, models=["base-detail"], log=lambda line: None)
    assert [o.state for o in outcomes] == ["compiled"], outcomes
    engines = {"cpu": Engine(registry, cpu, EngineSettings(max_warm=1)),
               "eager": Engine(registry, make_backend("eager"), EngineSettings(max_warm=1))}
    yield engines
    for engine in engines.values():
        engine.close()


@pytest.fixture(scope="module")
def reference(lora_dir):
    """Plain diffusers: the base model's image, and with each LoRA loaded and fused as diffusers does it
    (a fresh pipeline each: unfusing subtracts again, which is not exact in floating point)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    def run(lora: str = "", scale: float = 1.0) -> np.ndarray:
        pipe = StableDiffusionPipeline.from_pretrained(lora_dir / "tiny-sd15", safety_checker=None,
                                                       requires_safety_checker=False)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if lora:
            pipe.load_lora_weights(lora_dir / lora)
            pipe.fuse_lora(lora_scale=scale)
        image = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=CFG, height=64, width=64,
                     generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
        return np.asarray(image.convert("RGB"), dtype=np.int16)

    return {"base": run(), "detail": run("detail.safetensors", SCALE), "style": run("style_kohya.safetensors")}


def ours(engine, model: str, prompt: str = PROMPT):
    result = engine.generate(GenerateRequest(model=model, prompt=prompt, sampler="Euler", steps=STEPS, cfg_scale=CFG,
                                             seed=SEED))
    return result, np.asarray(result.images[0].image.convert("RGB"), dtype=np.int16)


def test_registry_reads_both_formats(registry, lora_dir):
    detail, = registry.get("base-detail").loras
    style, = registry.get("base-style").loras
    assert (detail.name, detail.scale, detail.format, detail.components) == (
        "detail", SCALE, "diffusers", ("text_encoder", "unet"))
    assert (style.name, style.scale, style.format, style.components) == (
        "style", 1.0, "kohya", ("text_encoder", "unet"))
    assert dict(detail.metadata) == {"ss_network_dim": "4"} and len(detail.short_hash) == 12
    assert registry.get("base").loras == ()


def test_compiled_lora_equals_diffusers_fuse_lora(lora_engine, reference):
    """The TorchScript (cpu) artifacts of base-detail are the fused weights diffusers makes."""
    result, image = ours(lora_engine["cpu"], "base-detail")
    assert np.abs(image - reference["detail"]).max() <= 1
    assert np.abs(image - reference["base"]).max() > 10  # the LoRA changes the image
    assert np.abs(reference["detail"] - reference["base"]).mean() > 2
    info = parse_infotext(result.images[0].infotext)
    assert info["Lora hashes"] == f"detail: {lora_engine['cpu'].registry.get('base-detail').loras[0].short_hash}"
    assert f'Lora hashes: "detail: ' in result.images[0].infotext  # quoted, as A1111 writes it


def test_eager_fuses_kohya_lora_as_diffusers(lora_engine, reference):
    """The eager backend fuses the same way, here from a kohya/A1111-format file, and into a model
    loaded from one checkpoint file (its pipeline is whole: every component is fused at once)."""
    _, image = ours(lora_engine["eager"], "base-style")
    assert np.abs(image - reference["style"]).max() <= 1
    assert np.abs(image - reference["base"]).max() > 10
    _, image = ours(lora_engine["eager"], "file-detail")
    assert np.abs(image - reference["detail"]).max() <= 1


def test_sdxl_lora_fuses_into_both_text_encoders(lora_engine, lora_dir):
    """SDXL: the UNet, text_encoder and text_encoder_2 (eager, loaded one component at a time) equal
    diffusers' StableDiffusionXLPipeline with the LoRA loaded and fused."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    def reference(lora: bool) -> np.ndarray:
        pipe = StableDiffusionXLPipeline.from_pretrained(lora_dir / "tiny-sdxl", add_watermarker=False)
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if lora:
            pipe.load_lora_weights(lora_dir / "xl.safetensors")
            pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=0.7)
        image = pipe(PROMPT, num_inference_steps=STEPS, guidance_scale=CFG, height=64, width=64,
                     generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
        return np.asarray(image.convert("RGB"), dtype=np.int16)

    _, image = ours(lora_engine["eager"], "xl-lora")
    assert np.abs(image - reference(True)).max() <= 1
    assert np.abs(image - reference(False)).max() > 10


def test_prompt_tag_selects_the_fused_variant(lora_engine):
    """<lora:detail:0.8> on the base model runs base-detail; the tag is not prompt text (same image as
    base-detail without it) but stays in the infotext's prompt, as in A1111."""
    engine = lora_engine["cpu"]
    tagged, tagged_image = ours(engine, "base", f"{PROMPT} <lora:detail:0.8>")
    plain, plain_image = ours(engine, "base-detail")
    assert tagged.model == "base-detail" and np.array_equal(tagged_image, plain_image)
    assert parse_infotext(tagged.images[0].infotext)["Prompt"] == f"{PROMPT} <lora:detail:0.8>"
    assert ours(engine, "base-detail", f"<lora:detail:0.805>{PROMPT}")[0].model == "base-detail"  # within 0.01


@pytest.mark.parametrize("prompt, expected", [
    ("x <lora:detail:0.5>", r"base has no LoRA fused in, and the prompt asks for <lora:detail:0.5> .*: detail is "
                            r"fused at 0.8 into base-detail, file-detail \(write <lora:detail:0.8>\)\. .*"
                            r"loras: \[\{source: FILE.safetensors, scale: WEIGHT\}\]"),
    ("x <lora:detail>", r"asks for <lora:detail:1> .*detail is fused at 0.8"),
    ("x <lora:nowhere:1>", r"<lora:nowhere:1> .*: no model has a LoRA named 'nowhere'.*compile_all.py"),
    ("x <lora:detail:0.8> <lora:style:1>",
     r"asks for <lora:detail:0.8>, <lora:style:1> .*style is fused at 1 into base-style"),
    ("x <hypernet:foo:1>", r"only <lora:name:weight> extra networks"),
    ("x <lora:detail:lots>", r"the weight must be a number"),
    ("x <lora:detail:0.8:0.5>", r"different weights"),
])
def test_prompt_tag_refusals(lora_engine, prompt, expected):
    with pytest.raises(InvalidRequest, match=expected):
        lora_engine["cpu"].submit(GenerateRequest(model="base", prompt=prompt))


def test_other_weight_on_the_variant_is_refused(lora_engine):
    with pytest.raises(InvalidRequest, match=r"base-detail has detail at 0.8 fused in, and the prompt asks for "
                                             r"<lora:detail:1>"):
        lora_engine["cpu"].submit(GenerateRequest(model="base-detail", prompt="<lora:detail:1>"))


def test_fingerprint_follows_lora_file_and_scale(lora_engine, lora_dir):
    """Another scale or other file content makes the compiled artifact stale; the same content under
    another path (a moved file) does not."""
    from engine.backends import make_backend
    from engine.compile import plan
    from engine.registry import load_registry

    cpu = make_backend("cpu")

    def state(loras: list[dict]) -> str:
        registry = load_registry(write_registry(variant, [entry("base-detail", loras)]))
        row, = plan(registry, cpu, models=["base-detail"])
        return f"{row.status.state} {row.status.reason}"

    variant = lora_dir / "variant"
    variant.mkdir()
    (variant / "tiny-sd15").symlink_to(lora_dir / "tiny-sd15")
    (variant / "artifacts").symlink_to(lora_dir / "artifacts")
    shutil.copy(lora_dir / "detail.safetensors", variant / "moved.safetensors")
    assert state([{"source": "moved.safetensors", "scale": SCALE, "name": "detail"}]).startswith("compiled")
    stale = state([{"source": "moved.safetensors", "scale": 0.5, "name": "detail"}])
    assert stale.startswith("stale") and "LoRA detail" in stale and "at 0.8" in stale
    from safetensors.torch import load_file, save_file

    tensors = load_file(variant / "moved.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 0.01
    save_file(tensors, variant / "moved.safetensors")
    assert state([{"source": "moved.safetensors", "scale": SCALE, "name": "detail"}]).startswith("stale")


@pytest.mark.parametrize("lora, expected", [
    ({"source": "../tiny-sd15.safetensors"}, r"loras\[0\].source.*not a LoRA in kohya/A1111 format.*named like"),
    ({"source": "lycoris.safetensors"}, r"LyCORIS"),
    ({"source": "sdxl.safetensors"}, r"an SDXL LoRA"),
    ({"source": "missing.safetensors"}, r"loras\[0\].source': expected an existing .safetensors file"),
    ({"source": "detail.pt"}, r"expected a .safetensors LoRA file"),
    ({"source": "detail.safetensors", "scale": 0}, r"loras\[0\].scale"),
    ({"source": "detail.safetensors", "name": "a:b"}, r"loras\[0\].name"),
    ({"source": "detail.safetensors", "weight": 1}, r"loras\[0\].weight': expected one of source, scale, name"),
])
def test_registry_refuses_what_it_cannot_fuse(lora_dir, tiny_dir, lora, expected):
    from safetensors.torch import save_file

    from engine.registry import load_registry

    directory = lora_dir / "refusals"
    if not directory.exists():
        directory.mkdir()
        (directory / "tiny-sd15").symlink_to(tiny_dir / "tiny-sd15")
        shutil.copy(lora_dir / "detail.safetensors", directory / "detail.safetensors")
        save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)},
                  directory / "lycoris.safetensors")
        save_file({"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 2)},
                  directory / "sdxl.safetensors")
    with pytest.raises(RegistryError, match=expected):
        load_registry(write_registry(directory, [entry("base-x", [lora])]))


def test_registry_refuses_loras_on_pixart(lora_dir):
    from engine.registry import load_registry

    model = {"id": "pix", "family": "pixart-sigma", "source": {"hub": "x/y"}, "resolutions": ["64x64"],
             "loras": [{"source": "detail.safetensors"}]}
    (lora_dir / "pix").mkdir()
    with pytest.raises(RegistryError, match=r"model 'pix', field 'loras': expected no loras for family pixart-sigma"):
        load_registry(write_registry(lora_dir / "pix", [model]))


def test_sdapi_loras_lists_fused_loras(lora_engine, tmp_path):
    from fastapi.testclient import TestClient

    from api import create_api

    app, _ = create_api(lora_engine["cpu"], tmp_path, flags={"backend": "cpu"})
    with TestClient(app) as client:
        items = client.get("/sdapi/v1/loras").json()
    by_name = {item["name"]: item for item in items}
    assert sorted(by_name) == ["detail", "style", "xl"]
    detail = by_name["detail"]
    assert detail["alias"] == "detail" and detail["path"].endswith("detail.safetensors")
    assert detail["metadata"] == {"ss_network_dim": "4"} and detail["scale"] == SCALE
    assert detail["models"] == ["base-detail", "file-detail"] and len(detail["hash"]) == 12


@pytest.mark.parametrize("keys, expected", [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha"], ("kohya", ("unet",))),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
      "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], ("kohya", ("text_encoder", "text_encoder_2"))),
    (["unet.down_blocks.0.attentions.0.processor.to_q_lora.down.weight",  # diffusers' older attention-processor form
      "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight"],
     ("diffusers", ("text_encoder", "unet"))),
    (["text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"], ("diffusers", ("text_encoder_2",))),
])
def test_detect_format(keys, expected):
    from engine.lora import detect_format

    assert detect_format(keys) == expected


@pytest.mark.parametrize("keys, expected", [
    ([], "no tensors"),
    (["base_model.model.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "its tensors are named like: base_model"),
    (["unet.down_blocks.0.attentions.0.proj_in.weight"], "not a LoRA"),  # a UNet's own weights
    (["lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1"], "LyCORIS"),
])
def test_detect_format_refuses(keys, expected):
    from engine.lora import LoraFormatError, detect_format

    with pytest.raises(LoraFormatError, match=expected):
        detect_format(keys)


def test_the_models_tab_shows_the_fused_loras(lora_engine):
    from types import SimpleNamespace

    from ui.models import COLUMNS, model_rows

    engine = lora_engine["cpu"]
    rows = {row[0]: dict(zip(COLUMNS, row)) for row in model_rows(SimpleNamespace(engine=engine), engine.models())}
    assert rows["base-detail"]["LoRAs fused"] == f"<lora:detail:{SCALE:g}>"
    assert rows["base"]["LoRAs fused"] == ""
