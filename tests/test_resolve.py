"""Request resolution (engine.resolve): every check, every default, the sizes a backend can run, LoRA
variants, hires planning and seeds, over a registry written here and the real cpu (fixed-shape) and
eager backends. Nothing is compiled: a fixed-shape backend reads only artifact manifests, so a
"compiled" variant is a manifest with the fingerprint the backend expects.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from PIL import Image

from engine import artifacts, resolve
from engine.backends import make_backend
from engine.compile import expected_fingerprint
from engine.errors import InvalidRequest, UnknownModel, UnknownSampler, UnsupportedResolution
from engine.hires import HiresPlan
from engine.registry import load_registry
from engine.resolve import (EAGER_MAX_SIDE, MAX_IMAGES, MAX_SEED, MAX_STEPS, Resolved, Resolver, check_fields,
                            check_range)
from engine.types import GenerateRequest, HiresFix, Inpaint, Size

CPU = make_backend("cpu")
EAGER = make_backend("eager")
# The CFG scale range a request may ask for (0 to 1: few-step models that run no unconditional half).
CFG_LOW, CFG_HIGH = "0", "30"


def _lora_file(path: Path) -> str:
    """A tiny kohya-format LoRA file (the registry reads its header and hashes it)."""
    import torch
    from safetensors.torch import save_file

    tensors = {"lora_unet_a.lora_down.weight": torch.ones(1, 2), "lora_unet_a.lora_up.weight": torch.ones(2, 1),
               "lora_unet_a.alpha": torch.tensor(1.0)}
    save_file(tensors, str(path))
    return path.name


@pytest.fixture
def registry(tmp_path):
    detail = _lora_file(tmp_path / "detail.safetensors")
    style = _lora_file(tmp_path / "style.safetensors")
    models = [
        {"id": "base", "family": "sd15", "source": {"hub": "org/base"},
         "resolutions": ["512x512", "512x768", "1024x1024"],
         "defaults": {"sampler": "DPM++ 2M", "steps": 25, "cfg_scale": 6.5}},
        {"id": "base-detail", "family": "sd15", "source": {"hub": "org/base"}, "resolutions": ["512x512"],
         "defaults": {"sampler": "Euler", "steps": 30, "cfg_scale": 5},
         "loras": [{"source": detail, "scale": 0.8}]},
        {"id": "base-both", "family": "sd15", "source": {"hub": "org/base"}, "resolutions": ["512x512"],
         "loras": [{"source": detail, "scale": 0.8}, {"source": style, "scale": -1}]},
        {"id": "other-detail", "family": "sd15", "source": {"hub": "org/other"}, "resolutions": ["512x512"],
         "loras": [{"source": detail, "scale": 0.5}]},
        {"id": "pix", "family": "pixart-sigma", "source": {"hub": "org/pix"}, "resolutions": ["512x512", "1024x1024"]},
    ]
    path = tmp_path / "model_registry.yaml"
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return load_registry(path)


@pytest.fixture
def cpu(registry):
    return Resolver(registry, CPU)


@pytest.fixture
def eager(registry):
    return Resolver(registry, EAGER)


def publish(resolver: Resolver, model: str, size: str, fingerprint=None, components=None) -> Path:
    """A published variant directory: a manifest with the backend's expected fingerprint (or ``fingerprint``)."""
    spec, size = resolver.registry.get(model), Size.parse(size)
    directory = artifacts.variant_dir(resolver.registry.artifacts_dir, spec.id, size, resolver.backend.name)
    directory.mkdir(parents=True)
    manifest = {"fingerprint": fingerprint or expected_fingerprint(spec, size, resolver.backend),
                "components": components or {}}
    (directory / artifacts.MANIFEST).write_text(json.dumps(manifest))
    return directory


def refused(call, message: str, error=InvalidRequest):
    """``call()`` raises exactly ``error`` with exactly ``message``."""
    with pytest.raises(error) as info:
        call()
    assert type(info.value) is error
    assert str(info.value) == message
    return info.value


def img(size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size)


# --- check_range ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [1, 5, 10, 1.0, 10.0, 7.25])
def test_a_number_within_the_range_passes(value):
    assert check_range("x", value, 1, 10) is None


@pytest.mark.parametrize("value", [1, 10, 2.0, 10.0])
def test_a_whole_number_may_be_written_as_a_float(value):
    assert check_range("x", value, 1, 10, whole=True) is None


@pytest.mark.parametrize("value, shown", [
    (0, "0"), (11, "11"), (0.999, "0.999"), (10.001, "10.001"), (-1, "-1"),
    (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"),
    (True, "True"), (False, "False"), ("5", "'5'"), (None, "None"), ([5], "[5]"),
])
def test_a_value_outside_the_range_or_not_a_number_is_refused_with_the_range(value, shown):
    refused(lambda: check_range("steps", value, 1, 10), f"steps must be between 1 and 10, got {shown}")


@pytest.mark.parametrize("value", [2.5, 1.0000001, 9.999])
def test_a_fraction_is_refused_where_a_whole_number_is_needed(value):
    refused(lambda: check_range("steps", value, 1, 10, whole=True), f"steps must be a whole number, got {value!r}")
    assert check_range("steps", value, 1, 10) is None  # without whole, it passes


@pytest.mark.parametrize("low, high, text", [(0.0, 1.0, "0 and 1"), (0.25, 2.5, "0.25 and 2.5"),
                                             (1e-05, 1e6, "1e-05 and 1000000"), (-2, 2, "-2 and 2")])
def test_the_range_is_written_without_needless_decimals(low, high, text):
    refused(lambda: check_range("v", "x", low, high), f"v must be between {text}, got 'x'")


# --- check_fields ----------------------------------------------------------------------------------------


def test_a_request_of_the_right_types_passes_the_field_check():
    assert check_fields(GenerateRequest()) is None
    assert check_fields(GenerateRequest(model="base", prompt="a cat \u00e9\U0001F431", negative_prompt="dog",
                                        sampler="Euler", size=Size(64, 64), init_image=img())) is None


@pytest.mark.parametrize("fields, message", [
    ({"prompt": 5}, "the prompt must be text, got int 5"),
    ({"prompt": None}, "the prompt must be text, got NoneType None"),
    ({"prompt": b"cat"}, "the prompt must be text, got bytes b'cat'"),
    ({"negative_prompt": None}, "the negative prompt must be text, got NoneType None"),
    ({"negative_prompt": ["dog"]}, "the negative prompt must be text, got list ['dog']"),
    ({"prompt": "ab\ud800c"}, "the prompt contains U+D800 at position 2, half of a UTF-16 surrogate pair and not a "
                              "character; send valid UTF-8 text"),
    ({"negative_prompt": "\udfff"}, "the negative prompt contains U+DFFF at position 0, half of a UTF-16 surrogate "
                                    "pair and not a character; send valid UTF-8 text"),
    ({"model": 5}, "model must be a name, got int 5"),
    ({"model": ["base"]}, "model must be a name, got list ['base']"),
    ({"sampler": 1.5}, "sampler must be a name, got float 1.5"),
    ({"size": "512x512"}, "size must be a Size such as Size(512, 512), got '512x512'"),
    ({"size": (512, 512)}, "size must be a Size such as Size(512, 512), got (512, 512)"),
    ({"init_image": b"\x89PNG"}, "init_image must be a PIL image (engine.images.read_image reads a file), got bytes"),
    ({"init_image": "cat.png"}, "init_image must be a PIL image (engine.images.read_image reads a file), got str"),
])
def test_a_field_of_the_wrong_type_is_refused_by_name(fields, message, cpu):
    refused(lambda: check_fields(GenerateRequest(**fields)), message)
    refused(lambda: cpu.resolve(GenerateRequest(**fields), "base"), message)  # before anything else is looked at


def test_the_prompt_is_checked_before_the_negative_prompt_and_the_model():
    refused(lambda: check_fields(GenerateRequest(prompt=1, negative_prompt=2, model=3)),
            "the prompt must be text, got int 1")
    refused(lambda: check_fields(GenerateRequest(negative_prompt=2, model=3, sampler=4)),
            "the negative prompt must be text, got int 2")
    refused(lambda: check_fields(GenerateRequest(model=3, sampler=4)), "model must be a name, got int 3")


# --- resolve: models and defaults ---------------------------------------------------------------------------


def test_an_empty_request_takes_the_default_model_and_its_defaults(cpu, registry):
    resolved = cpu.resolve(GenerateRequest(seed=7), "base")
    assert resolved == Resolved(registry.get("base"), "DPM++ 2M", 25, 6.5, Size(512, 512), 7, None)
    assert type(resolved.steps) is int and type(resolved.cfg_scale) is float and type(resolved.seed) is int


def test_the_request_model_wins_over_the_default_and_brings_its_own_defaults(cpu, registry):
    resolved = cpu.resolve(GenerateRequest(model="pix", seed=1), "base")
    assert resolved == Resolved(registry.get("pix"), "DPM++ 2M", 20, 4.5, Size(512, 512), 1)
    resolved = cpu.resolve(GenerateRequest(model="base-detail", seed=1), "base")
    assert (resolved.spec.id, resolved.sampler, resolved.steps, resolved.cfg_scale) == ("base-detail", "Euler", 30, 5.0)


def test_what_the_request_asks_for_wins_over_the_defaults(cpu):
    request = GenerateRequest(model="base", sampler="Euler a", steps=40, cfg_scale=9.5, seed=123,
                              size=Size(512, 768), num_images=4)
    resolved = cpu.resolve(request, "pix")
    assert (resolved.spec.id, resolved.sampler, resolved.steps, resolved.cfg_scale, resolved.size, resolved.seed) == (
        "base", "Euler a", 40, 9.5, Size(512, 768), 123)


def test_whole_numbers_written_as_floats_come_out_as_ints_and_the_cfg_as_a_float(cpu):
    resolved = cpu.resolve(GenerateRequest(steps=30.0, cfg_scale=7, seed=5.0, num_images=2.0), "base")
    assert (resolved.steps, resolved.cfg_scale, resolved.seed) == (30, 7.0, 5)
    assert type(resolved.steps) is int and type(resolved.cfg_scale) is float and type(resolved.seed) is int


def test_an_unknown_model_names_the_registry_and_its_models(cpu, registry):
    refused(lambda: cpu.resolve(GenerateRequest(model="nope"), "base"),
            f"unknown model 'nope'; the registry {registry.path} has: base, base-detail, base-both, other-detail, pix",
            UnknownModel)
    refused(lambda: cpu.resolve(GenerateRequest(), "gone"),
            f"unknown model 'gone'; the registry {registry.path} has: base, base-detail, base-both, other-detail, pix",
            UnknownModel)


# --- resolve: samplers ----------------------------------------------------------------------------------------


def test_an_unknown_sampler_is_refused_with_the_known_ones(cpu):
    error = refused(lambda: cpu.resolve(GenerateRequest(sampler="Nope"), "base"), _unknown_sampler("Nope"),
                    UnknownSampler)
    assert "Euler a" in str(error)


def _unknown_sampler(name: str) -> str:
    from engine.samplers import SAMPLERS

    return f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}"


def test_a_sampler_the_family_does_not_run_is_refused_for_that_model(cpu):
    from engine.families import FAMILIES
    from engine.samplers import family_sampler_names

    why = FAMILIES["pixart-sigma"].refused_samplers["Heun"]
    refused(lambda: cpu.resolve(GenerateRequest(model="pix", sampler="Heun"), "base"),
            f"sampler 'Heun' is not available for pix (pixart-sigma): {why}; use one of: "
            f"{', '.join(family_sampler_names('pixart-sigma'))}")
    assert cpu.resolve(GenerateRequest(model="base", sampler="Heun"), "base").sampler == "Heun"  # sd15 runs it


# --- resolve: steps, CFG, images, seed ---------------------------------------------------------------------------


def test_the_limits_are_the_documented_ones():
    assert (MAX_STEPS, MAX_IMAGES, MAX_SEED, EAGER_MAX_SIDE) == (150, 16, 4294967295, 2048)


@pytest.mark.parametrize("steps", [1, 150, 1.0, 150.0])
def test_steps_at_the_edges_pass(cpu, steps):
    assert cpu.resolve(GenerateRequest(steps=steps), "base").steps == int(steps)


@pytest.mark.parametrize("steps, message", [
    (0, "steps must be between 1 and 150, got 0"), (151, "steps must be between 1 and 150, got 151"),
    (-5, "steps must be between 1 and 150, got -5"), (math.nan, "steps must be between 1 and 150, got nan"),
    (math.inf, "steps must be between 1 and 150, got inf"), (True, "steps must be between 1 and 150, got True"),
    ("20", "steps must be between 1 and 150, got '20'"), (20.5, "steps must be a whole number, got 20.5"),
    (0.5, "steps must be between 1 and 150, got 0.5"),
])
def test_steps_out_of_range_or_fractional_are_refused(cpu, steps, message):
    refused(lambda: cpu.resolve(GenerateRequest(steps=steps), "base"), message)


@pytest.mark.parametrize("cfg", [float(CFG_LOW), int(CFG_LOW), float(CFG_HIGH), int(CFG_HIGH), 7.25, 1.5, 0.5])
def test_cfg_at_the_edges_and_fractional_passes(cpu, cfg):
    resolved = cpu.resolve(GenerateRequest(cfg_scale=cfg), "base")
    assert resolved.cfg_scale == cfg and type(resolved.cfg_scale) is float


@pytest.mark.parametrize("cfg, shown", [(float(CFG_LOW) - 0.5, None), (float(CFG_HIGH) + 0.5, None), (31, "31"),
                                        (-1, "-1"), (math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"),
                                        (True, "True"), ("7", "'7'")])
def test_cfg_out_of_range_or_not_a_number_is_refused(cpu, cfg, shown):
    shown = shown or repr(cfg)
    refused(lambda: cpu.resolve(GenerateRequest(cfg_scale=cfg), "base"),
            f"CFG scale must be between {CFG_LOW} and {CFG_HIGH}, got {shown}")


@pytest.mark.parametrize("count", [1, 16, 3.0])
def test_image_counts_at_the_edges_pass(cpu, count):
    assert cpu.resolve(GenerateRequest(num_images=count), "base").spec.id == "base"


@pytest.mark.parametrize("count, message", [
    (0, "number of images must be between 1 and 16, got 0"), (17, "number of images must be between 1 and 16, got 17"),
    (2.5, "number of images must be a whole number, got 2.5"), (True, "number of images must be between 1 and 16, "
                                                                      "got True"),
    (None, "number of images must be between 1 and 16, got None"),
])
def test_image_counts_out_of_range_are_refused(cpu, count, message):
    refused(lambda: cpu.resolve(GenerateRequest(num_images=count), "base"), message)


@pytest.mark.parametrize("seed", [0, 1, 4294967295, 12.0])
def test_a_seed_asked_for_is_kept(cpu, seed):
    resolved = cpu.resolve(GenerateRequest(seed=seed), "base")
    assert resolved.seed == seed and type(resolved.seed) is int


@pytest.mark.parametrize("seed, message", [
    (4294967296, "seed must be between 0 and 4294967295, got 4294967296"),
    (-2, "seed must be between 0 and 4294967295, got -2"), (1.5, "seed must be a whole number, got 1.5"),
    (math.nan, "seed must be between 0 and 4294967295, got nan"), ("7", "seed must be between 0 and 4294967295, got '7'"),
    (False, "seed must be between 0 and 4294967295, got False"),
])
def test_a_seed_out_of_range_is_refused(cpu, seed, message):
    refused(lambda: cpu.resolve(GenerateRequest(seed=seed), "base"), message)


@pytest.mark.parametrize("seed", [-1, None, -1.0])
def test_seed_minus_one_or_none_draws_one_from_the_system_random(cpu, monkeypatch, seed):
    drawn = []

    class Fixed:
        def randrange(self, stop):
            drawn.append(stop)
            return 987654321

    monkeypatch.setattr(resolve.random, "SystemRandom", Fixed)
    resolved = cpu.resolve(GenerateRequest(seed=seed), "base")
    assert resolved.seed == 987654321 and drawn == [MAX_SEED]


def test_drawn_seeds_are_in_range_and_differ(cpu):
    seeds = {cpu.resolve(GenerateRequest(), "base").seed for _ in range(5)}
    assert len(seeds) == 5 and all(0 <= s < MAX_SEED for s in seeds)


# --- resolve: img2img --------------------------------------------------------------------------------------------


def test_img2img_checks_the_strength_and_txt2img_ignores_it(cpu):
    assert cpu.resolve(GenerateRequest(init_image=img(), strength=1.0), "base").steps == 25
    assert cpu.resolve(GenerateRequest(init_image=img(), strength=0.04, steps=25), "base").steps == 25  # 1 step
    assert cpu.resolve(GenerateRequest(strength=7), "base").steps == 25  # no init image: strength unused


@pytest.mark.parametrize("strength, message", [
    (1.5, "denoising strength must be between 0 and 1, got 1.5"),
    (-0.1, "denoising strength must be between 0 and 1, got -0.1"),
    (math.nan, "denoising strength must be between 0 and 1, got nan"),
    (None, "denoising strength must be between 0 and 1, got None"),
    (0.0, "denoising strength 0 with 25 steps runs no denoising step (img2img runs strength x steps of them); "
          "raise the strength or the steps"),
    (0.039, "denoising strength 0.039 with 25 steps runs no denoising step (img2img runs strength x steps of them); "
            "raise the strength or the steps"),
])
def test_a_strength_out_of_range_or_running_no_step_is_refused(cpu, strength, message):
    refused(lambda: cpu.resolve(GenerateRequest(init_image=img(), strength=strength), "base"), message)


def test_a_strength_of_one_step_passes_at_the_requested_step_count(cpu):
    refused(lambda: cpu.resolve(GenerateRequest(init_image=img(), strength=0.5, steps=1), "base"),
            "denoising strength 0.5 with 1 steps runs no denoising step (img2img runs strength x steps of them); "
            "raise the strength or the steps")
    assert cpu.resolve(GenerateRequest(init_image=img(), strength=0.5, steps=2), "base").steps == 2


def test_img2img_and_inpaint_are_refused_for_a_family_without_img2img(cpu):
    refused(lambda: cpu.resolve(GenerateRequest(model="pix", init_image=img()), "base"),
            "img2img is not available for pix: the pixart-sigma family has no img2img pipeline (diffusers has none "
            "for it); use txt2img with this model, or pick another model for img2img")
    refused(lambda: cpu.resolve(GenerateRequest(model="pix", init_image=img(), inpaint=Inpaint(mask(img().size))),
                                "base"),
            "inpaint is not available for pix: the pixart-sigma family has no inpaint pipeline (diffusers has none "
            "for it); use txt2img with this model, or pick another model for inpaint")


# --- resolve: inpaint ---------------------------------------------------------------------------------------------


def mask(size, box=(8, 8, 40, 40)) -> Image.Image:
    """White (repaint) in ``box``, black elsewhere."""
    image = Image.new("L", size, 0)
    image.paste(255, box)
    return image


def test_no_inpaint_inputs_unless_asked(cpu):
    assert cpu.resolve(GenerateRequest(seed=1), "base").inpaint is None
    assert cpu.resolve(GenerateRequest(seed=1, init_image=img()), "base").inpaint is None


@pytest.mark.parametrize("resize_mode, only_masked, fill", [
    ("just resize", False, "original"), ("crop and resize", False, "latent noise"), ("resize and fill", False, "fill"),
    ("just resize", True, "original"),
])
def test_an_inpaint_request_gets_its_image_and_mask_at_the_resolved_size(eager, resize_mode, only_masked, fill):
    from engine.inpaint import prepare

    source = Image.new("RGB", (96, 64), (200, 30, 30))
    settings = Inpaint(mask((96, 64)), blur=2, fill=fill, only_masked=only_masked, padding=8)
    resolved = eager.resolve(GenerateRequest(init_image=source, inpaint=settings, size=Size(64, 96),
                                             resize_mode=resize_mode, seed=1), "base")
    assert resolved.inpaint == prepare(source, settings, Size(64, 96), resize_mode)
    assert resolved.inpaint.image.size == resolved.inpaint.mask.size == (64, 96)


def test_inpaint_settings_are_checked_against_the_init_image(cpu):
    refused(lambda: cpu.resolve(GenerateRequest(inpaint=Inpaint(mask((64, 64)))), "base"),
            "inpainting needs an init image to paint into: send one with the mask")
    refused(lambda: cpu.resolve(GenerateRequest(init_image=img((64, 64)), inpaint=Inpaint(mask((64, 72)))), "base"),
            "the mask is 64x72 and the image 64x64: they must be the same size")
    refused(lambda: cpu.resolve(GenerateRequest(init_image=img(), inpaint=Inpaint(mask(img().size), blur=-1)), "base"),
            "mask blur must be a whole number of pixels from 0 to 64, got -1")


# --- resolve: LoRA variants --------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt, model", [
    ("a cat <lora:detail:0.8>", "base-detail"),
    ("a cat <lora:detail:0.805>", "base-detail"),  # within the tolerance
    ("<lora:style:-1> a cat <lora:detail:0.8>", "base-both"),
    ("a cat", "base"),
])
def test_lora_tags_pick_the_variant_of_the_same_base_with_those_loras(cpu, registry, prompt, model):
    resolved = cpu.resolve(GenerateRequest(prompt=prompt, seed=1), "base")
    assert resolved.spec == registry.get(model)


def test_the_variant_brings_its_own_defaults(cpu):
    resolved = cpu.resolve(GenerateRequest(prompt="<lora:detail:0.8> a cat", seed=1), "base")
    assert (resolved.spec.id, resolved.sampler, resolved.steps, resolved.cfg_scale) == ("base-detail", "Euler", 30, 5.0)


def test_a_model_with_the_tagged_lora_fused_runs_itself(cpu):
    assert cpu.resolve(GenerateRequest(model="base-both", prompt="<lora:detail:0.8>"), "base").spec.id == "base-both"
    assert cpu.resolve(GenerateRequest(model="base-detail", prompt="x"), "base").spec.id == "base-detail"


def test_a_lora_at_another_weight_names_where_it_is_fused(cpu, registry):
    refused(lambda: cpu.resolve(GenerateRequest(prompt="a cat <lora:detail:0.3>"), "base"),
            "base has no LoRA fused in, and the prompt asks for <lora:detail:0.3> (a LoRA is fused into the weights "
            "at compile time, at one weight): detail is fused at 0.8 into base-detail, base-both (write "
            "<lora:detail:0.8>); detail is fused at 0.5 into other-detail (write <lora:detail:0.5>). Pick a model "
            "that has it, or add a registry entry with `loras: [{source: FILE.safetensors, scale: WEIGHT}]` to "
            f"{registry.path} and run `python compile_all.py --models NEW_ID`")
    refused(lambda: cpu.resolve(GenerateRequest(prompt="<lora:nope>"), "base-detail"),
            "base-detail has detail at 0.8 fused in, and the prompt asks for <lora:nope:1> (a LoRA is fused into the "
            "weights at compile time, at one weight): no model has a LoRA named 'nope'. Pick a model that has it, "
            "or add a registry entry with `loras: [{source: FILE.safetensors, scale: WEIGHT}]` to "
            f"{registry.path} and run `python compile_all.py --models NEW_ID`")


def test_the_variant_sampler_is_checked_for_the_variant(cpu):
    refused(lambda: cpu.resolve(GenerateRequest(prompt="<lora:detail:0.8>", sampler="Nope"), "base"),
            _unknown_sampler("Nope"), UnknownSampler)


# --- sizes --------------------------------------------------------------------------------------------------------


def _not_valid(size: str) -> str:
    return f"{size} is not a valid size: width and height must be multiples of 8 between 64 and 2048"


def _not_compiled(resolver: Resolver, model: str, size: str, compiled: str) -> str:
    path = resolver.registry.path
    return (f"{size} is not compiled for {model}; compiled: {compiled}. To add it, list {size} under resolutions of "
            f"{model} in {path} and run `python compile_all.py --registry {path} --backend {resolver.backend.name} "
            f"--models {model} --resolutions {size}`")


@pytest.mark.parametrize("size", ["500x512", "512x500", "56x512", "512x56", "0x512", "512x0", "60x64", "64x60",
                                  "-8x512", "512x-8"])
def test_a_size_that_is_not_multiples_of_8_from_64_is_invalid_on_every_backend(cpu, eager, registry, size):
    spec = registry.get("base")
    width, height = (int(v) for v in size.split("x"))
    for resolver in (cpu, eager):
        refused(lambda: resolver.check_size(spec, Size(width, height)), _not_valid(f"{width}x{height}"),
                UnsupportedResolution)


@pytest.mark.parametrize("size", ["64x64", "2048x2048", "64x2048", "2048x64", "640x384", "1000x1000"])
def test_eager_runs_any_valid_size_up_to_2048(eager, registry, size):
    assert eager.check_size(registry.get("base"), Size.parse(size)) == Size.parse(size)
    resolved = eager.resolve(GenerateRequest(size=Size.parse(size)), "base")
    assert resolved.size == Size.parse(size)


@pytest.mark.parametrize("size", ["2056x512", "512x2056", "2056x2056", "4096x4096"])
def test_eager_refuses_a_side_over_2048(eager, registry, size):
    refused(lambda: eager.check_size(registry.get("base"), Size.parse(size)), _not_valid(size), UnsupportedResolution)


def test_a_fixed_shape_backend_runs_only_the_registry_sizes(cpu, registry):
    spec = registry.get("base")
    for size in spec.resolutions:
        assert cpu.check_size(spec, size) == size
    assert cpu.resolve(GenerateRequest(size=Size(1024, 1024)), "base").size == Size(1024, 1024)
    refused(lambda: cpu.check_size(spec, Size(640, 640)), _not_compiled(cpu, "base", "640x640", "none"),
            UnsupportedResolution)
    refused(lambda: cpu.resolve(GenerateRequest(size=Size(64, 64)), "base"), _not_compiled(cpu, "base", "64x64", "none"),
            UnsupportedResolution)
    # no 2048 limit on a compiled size: a fixed-shape backend says what is compiled instead
    refused(lambda: cpu.check_size(spec, Size(2056, 2056)), _not_compiled(cpu, "base", "2056x2056", "none"),
            UnsupportedResolution)


def test_the_size_refusal_lists_the_compiled_sizes_in_registry_order(cpu, registry):
    publish(cpu, "base", "1024x1024")
    refused(lambda: cpu.check_size(registry.get("base"), Size(64, 64)), _not_compiled(cpu, "base", "64x64", "1024x1024"),
            UnsupportedResolution)
    publish(cpu, "base", "512x512")
    publish(cpu, "base", "512x768", fingerprint="compiled by an older stack")  # stale: not listed
    refused(lambda: cpu.check_size(registry.get("base"), Size(64, 64)),
            _not_compiled(cpu, "base", "64x64", "512x512, 1024x1024"), UnsupportedResolution)
    # another model's or another backend's artifacts do not count
    publish(Resolver(registry, EAGER), "base", "512x768")
    refused(lambda: cpu.check_size(registry.get("pix"), Size(64, 64)), _not_compiled(cpu, "pix", "64x64", "none"),
            UnsupportedResolution)


def test_the_compile_command_names_a_registry_only_when_it_is_not_the_project_one(registry):
    from engine.registry import DEFAULT_REGISTRY

    resolver = Resolver(load_registry(DEFAULT_REGISTRY), CPU)
    spec = resolver.registry.models[0]
    error = _raises_size(lambda: resolver.check_size(spec, Size(8192, 8192)))
    assert str(error).endswith(f"run `python compile_all.py --backend cpu --models {spec.id} --resolutions 8192x8192`")


def _raises_size(call) -> Exception:
    with pytest.raises(UnsupportedResolution) as info:
        call()
    return info.value


def test_variant_state_reads_the_manifest_of_the_backend(cpu, eager, registry, monkeypatch):
    spec, size = registry.get("base"), Size(512, 512)
    assert cpu.variant_state(spec, size) == "missing"
    directory = publish(cpu, "base", "512x512")
    assert cpu.variant_state(spec, size) == "compiled"
    assert eager.variant_state(spec, size) == "missing"  # another backend's directory
    assert cpu.variant_state(spec, Size(512, 768)) == "missing"
    assert cpu.variant_state(registry.get("base-detail"), size) == "missing"  # another model's
    publish(cpu, "base", "512x768", fingerprint="old")
    assert cpu.variant_state(spec, Size(512, 768)) == "stale"
    # a LoRA variant has its own fingerprint: the base's manifest does not make it compiled
    other = publish(cpu, "base-detail", "512x512", fingerprint=expected_fingerprint(spec, size, CPU))
    assert cpu.variant_state(registry.get("base-detail"), size) == "stale" and other.is_dir()
    # a component whose content failed its sha256 check
    (directory / "unet.pt").write_bytes(b"weights")
    manifest = json.loads((directory / artifacts.MANIFEST).read_text())
    manifest["components"] = {"unet": {"file": "unet.pt", "bytes": 7, "sha256": "0" * 64}}
    (directory / artifacts.MANIFEST).write_text(json.dumps(manifest))
    assert cpu.variant_state(spec, size) == "compiled"
    monkeypatch.setitem(artifacts._checked, artifacts._identity(directory / "unet.pt"), False)
    assert cpu.variant_state(spec, size) == "broken"


# --- hires fix -----------------------------------------------------------------------------------------------------


def test_no_hires_fix_unless_asked(cpu):
    assert cpu.resolve(GenerateRequest(seed=1), "base").hires is None


def test_a_hires_fix_is_planned_at_the_request_size_and_steps(cpu):
    hires = HiresFix(scale=2.0)
    resolved = cpu.resolve(GenerateRequest(hires=hires, seed=1), "base")
    assert resolved.hires == HiresPlan(Size(1024, 1024), 25, 0.7, hires)
    assert resolved.size == Size(512, 512)
    hires = HiresFix(scale=2.0, steps=10, strength=0.5)
    resolved = cpu.resolve(GenerateRequest(hires=hires, steps=40.0, seed=1), "base")
    assert resolved.hires == HiresPlan(Size(1024, 1024), 10, 0.5, hires)
    resolved = cpu.resolve(GenerateRequest(hires=HiresFix(scale=1.0), steps=12.0, seed=1), "base")
    assert resolved.hires.steps == 12 and type(resolved.hires.steps) is int and resolved.hires.size == Size(512, 512)


def test_a_hires_fix_to_a_size_is_checked_against_the_backend(cpu, eager, registry):
    hires = HiresFix(size=Size(1024, 1024))
    assert cpu.resolve(GenerateRequest(hires=hires, size=Size(512, 768)), "base").hires.size == Size(1024, 1024)
    assert cpu.plan_hires(registry.get("base"), GenerateRequest(hires=hires), Size(512, 512), 20) == HiresPlan(
        Size(1024, 1024), 20, 0.7, hires)
    refused(lambda: cpu.resolve(GenerateRequest(hires=HiresFix(scale=2.0), size=Size(512, 768)), "base"),
            "hires fix to 1024x1536: " + _not_compiled(cpu, "base", "1024x1536", "none"), UnsupportedResolution)
    publish(cpu, "base", "512x512")
    refused(lambda: cpu.resolve(GenerateRequest(hires=HiresFix(size=Size(1024, 1032))), "base"),
            "hires fix to 1024x1032: " + _not_compiled(cpu, "base", "1024x1032", "512x512"), UnsupportedResolution)
    assert eager.resolve(GenerateRequest(hires=HiresFix(size=Size(1024, 1032))), "base").hires.size == Size(1024, 1032)
    refused(lambda: eager.resolve(GenerateRequest(hires=HiresFix(scale=4.0), size=Size(1024, 1024)), "base"),
            "hires fix to 4096x4096: " + _not_valid("4096x4096"), UnsupportedResolution)


def test_a_hires_fix_is_for_txt2img_on_a_family_with_img2img(cpu, registry):
    refused(lambda: cpu.resolve(GenerateRequest(hires=HiresFix(), init_image=img()), "base"),
            "hires fix is for txt2img; for a larger img2img result, ask for a larger size")
    refused(lambda: cpu.resolve(GenerateRequest(model="pix", hires=HiresFix()), "base"),
            "hires fix is not available for pix: its second pass is img2img, which the pixart-sigma family does not "
            "have")
    refused(lambda: cpu.plan_hires(registry.get("pix"), GenerateRequest(hires=HiresFix()), Size(512, 512), 20),
            "hires fix is not available for pix: its second pass is img2img, which the pixart-sigma family does not "
            "have")


@pytest.mark.parametrize("hires, message", [
    (HiresFix(scale=True), "hires scale must be between 1 and 4, got True"),
    (HiresFix(scale=math.nan), "hires scale must be between 1 and 4, got nan"),
    (HiresFix(scale=2.0, steps=2.5), "hires steps must be a whole number, got 2.5"),
    (HiresFix(scale=2.0, strength=math.inf), "hires denoising strength must be between 0 and 1, got inf"),
])
def test_hires_values_are_checked_with_the_request_checks(cpu, hires, message):
    refused(lambda: cpu.resolve(GenerateRequest(hires=hires), "base"), message)


# --- prompt chunks -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny models' character-level CLIP tokenizer: "a " is one token."""
    from make_tiny_models import write_tokenizer
    from transformers import CLIPTokenizer

    directory = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer(directory)
    return CLIPTokenizer.from_pretrained(directory)


@pytest.fixture
def chunk_registry(tmp_path):
    models = [{"id": "base", "family": "sd15", "source": {"hub": "org/base"}, "resolutions": ["512x512"]},
              {"id": "long", "family": "sdxl", "source": {"hub": "org/xl"}, "resolutions": ["512x512"],
               "prompt_chunks": [3]},
              {"id": "pix", "family": "pixart-sigma", "source": {"hub": "org/pix"}, "resolutions": ["512x512"]}]
    path = tmp_path / "chunks.yaml"
    path.write_text(yaml.safe_dump({"models": models}, sort_keys=False))
    return load_registry(path)


def chunking(registry, backend, tokenizer, asked=None):
    """A resolver whose tokenizer_of hands out ``tokenizer`` (and notes for which models)."""
    asked = [] if asked is None else asked
    return Resolver(registry, backend, lambda spec: asked.append(spec.id) or tokenizer)


def _chunks(resolver, model, prompt="", negative_prompt=""):
    resolved = resolver.resolve(GenerateRequest(model=model, prompt=prompt, negative_prompt=negative_prompt, seed=1),
                                "base")
    return resolved.prompt_chunks, resolved.notices


def test_without_a_tokenizer_every_prompt_runs_in_one_chunk(chunk_registry):
    for backend in (CPU, EAGER):
        assert _chunks(Resolver(chunk_registry, backend), "long", "a " * 300, "b " * 300) == (1, ())


def test_pixart_reads_its_prompt_in_one_piece_and_needs_no_tokenizer(chunk_registry):
    def no_tokenizer(spec):
        raise AssertionError(f"tokenizer_of({spec.id}) called")

    assert _chunks(Resolver(chunk_registry, CPU, no_tokenizer), "pix", "a " * 300) == (1, ())


def test_a_fixed_shape_backend_runs_the_smallest_compiled_chunk_count_that_holds_the_prompt(chunk_registry,
                                                                                                tokenizer):
    asked = []
    resolver = chunking(chunk_registry, CPU, tokenizer, asked)
    assert _chunks(resolver, "base", "a " * 75) == (1, ())
    assert _chunks(resolver, "long", "a " * 75) == (1, ())
    assert _chunks(resolver, "long", "a " * 76) == (3, ())  # compiled for 1 and 3: 2 chunks run as 3
    assert _chunks(resolver, "long", "", "b " * 225) == (3, ())  # the longer of prompt and negative prompt
    assert asked == ["base", "long", "long", "long"]


def notices(tokenizer, prompt, negative_prompt, needed, chunks, model, compiled, registry):
    """What ``engine.prompt_embeds.prompt_notices`` says (its wording is tested with it, not here)."""
    from engine.prompt_embeds import prompt_notices

    return prompt_notices(tokenizer, prompt, negative_prompt, needed, chunks, model, compiled, str(registry.path))


def test_a_prompt_longer_than_the_compiled_chunks_is_cut_with_a_notice_naming_the_fix(chunk_registry, tokenizer):
    resolver = chunking(chunk_registry, CPU, tokenizer)
    prompt = "a " * 300
    expected = notices(tokenizer, prompt, "", 4, 3, "long", (1, 3), chunk_registry)
    assert len(expected) == 1 and "long" in expected[0] and str(chunk_registry.path) in expected[0]
    assert _chunks(resolver, "long", prompt) == (3, expected)
    prompt, negative = "a " * 80, "b " * 79
    expected = notices(tokenizer, prompt, negative, 2, 1, "base", (1,), chunk_registry)
    assert len(expected) == 2 and all("base" in n and str(chunk_registry.path) in n for n in expected)
    assert _chunks(resolver, "base", prompt, negative) == (1, expected)


def test_eager_runs_as_many_chunks_as_the_prompt_needs_up_to_8(chunk_registry, tokenizer):
    resolver = chunking(chunk_registry, EAGER, tokenizer)
    assert _chunks(resolver, "base", "a " * 76) == (2, ())  # base is compiled for 1 chunk: eager needs none
    assert _chunks(resolver, "long", "a " * 600) == (8, ())
    expected = notices(tokenizer, "a " * 601, "", 9, 8, "base", None, chunk_registry)
    assert len(expected) == 1 and "prompt_chunks" not in expected[0]  # nothing to compile: shorten it
    assert _chunks(resolver, "base", "a " * 601) == (8, expected)


def test_the_tokenizer_is_the_lora_variant_one(registry, tokenizer):
    asked = []
    resolver = chunking(registry, CPU, tokenizer, asked)
    assert _chunks(resolver, "base", "<lora:detail:0.8>" + "a " * 75) == (1, ())  # the tag is not read as text
    assert asked == ["base-detail"]


# --- samplers with a step limit (LCM) -----------------------------------------------------------------------------


def _lcm_steps(steps: int) -> str:
    return (f"sampler 'LCM' runs at most 50 steps (its timesteps come from the 50-step LCM distillation schedule); "
            f"{steps} were asked for")


def _lcm_part(most: int, what: str, strength: str) -> str:
    return (f"sampler 'LCM' runs at most {most} steps for {what} at denoising strength {strength} (50 x strength); "
            "lower the steps or raise the strength")


def test_lcm_runs_at_most_50_steps_and_other_samplers_150(cpu):
    assert cpu.resolve(GenerateRequest(sampler="LCM", steps=50.0), "base").steps == 50
    refused(lambda: cpu.resolve(GenerateRequest(sampler="LCM", steps=51), "base"), _lcm_steps(51))
    assert cpu.resolve(GenerateRequest(sampler="Euler", steps=150), "base").steps == 150
    assert cpu.resolve(GenerateRequest(sampler="LCM", steps=50, strength=0.1), "base").steps == 50  # txt2img


def test_lcm_img2img_runs_at_most_50_x_strength_steps(cpu):
    assert cpu.resolve(GenerateRequest(sampler="LCM", steps=25, strength=0.5, init_image=img()), "base").steps == 25
    refused(lambda: cpu.resolve(GenerateRequest(sampler="LCM", steps=26, strength=0.5, init_image=img()), "base"),
            _lcm_part(25, "img2img", "0.5"))
    refused(lambda: cpu.resolve(GenerateRequest(sampler="LCM", steps=38, init_image=img()), "base"),
            _lcm_part(37, "img2img", "0.75"))  # the default strength
    assert cpu.resolve(GenerateRequest(sampler="Euler", steps=150, strength=0.1, init_image=img()), "base").steps == 150


def test_lcm_limits_the_hires_pass_too(cpu):
    hires = HiresFix(scale=2.0, steps=35, strength=0.7)
    assert cpu.resolve(GenerateRequest(sampler="LCM", steps=10, hires=hires), "base").hires.steps == 35
    refused(lambda: cpu.resolve(GenerateRequest(sampler="LCM", steps=10, hires=HiresFix(scale=2.0, steps=36)), "base"),
            _lcm_part(35, "the hires pass", "0.7"))
    refused(lambda: cpu.resolve(GenerateRequest(sampler="LCM", steps=40, hires=HiresFix(scale=2.0)), "base"),
            _lcm_part(35, "the hires pass", "0.7"))  # the hires steps default to the request's 40
    refused(lambda: cpu.resolve(GenerateRequest(sampler="LCM", steps=30, hires=HiresFix(scale=2.0, steps=51)), "base"),
            _lcm_steps(51))
    assert cpu.resolve(GenerateRequest(sampler="Euler", steps=10, hires=HiresFix(scale=2.0, steps=150, strength=0.1)),
                       "base").hires.steps == 150
