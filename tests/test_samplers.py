"""The sampler table, names and aliases (fast; the pixels each sampler gives are test_parity.py's job).

Expected values are written down here from A1111's sampler list and diffusers' documented mapping
(https://huggingface.co/docs/diffusers/api/schedulers/overview), not read from engine.samplers."""
from __future__ import annotations

import pytest

from engine.errors import InvalidRequest, UnknownSampler
from engine.samplers import (canonical_sampler, check_sampler, check_sampler_for, family_sampler_names,
                             make_scheduler, sampler_aliases, sampler_names, seed_scheduler)

# A1111 name -> (diffusers class, use_karras_sigmas, algorithm_type or None where the class has none)
TABLE = {
    "Euler": ("EulerDiscreteScheduler", False, None),
    "Euler a": ("EulerAncestralDiscreteScheduler", None, None),
    "Heun": ("HeunDiscreteScheduler", False, None),
    "LMS": ("LMSDiscreteScheduler", False, None),
    "LMS Karras": ("LMSDiscreteScheduler", True, None),
    "DPM2": ("KDPM2DiscreteScheduler", False, None),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", True, None),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", False, None),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", True, None),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", False, "dpmsolver++"),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", True, "dpmsolver++"),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", False, "sde-dpmsolver++"),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", True, "sde-dpmsolver++"),
    "DPM++ SDE": ("DPMSolverSDEScheduler", False, None),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", True, None),
    "DDIM": ("DDIMScheduler", None, None),
    "PLMS": ("PNDMScheduler", None, None),
    "UniPC": ("UniPCMultistepScheduler", False, None),
}
# A model's own scheduler config whose algorithm choices (Karras sigmas, an SDE solver, PRK steps)
# must not leak into another sampler, and that leaves clip_sample out.
MODEL_CONFIG = {"_class_name": "DPMSolverMultistepScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                "steps_offset": 1, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True,
                "skip_prk_steps": False}
UNKNOWN = ("unknown sampler 'Euler b'; choose one of: " + ", ".join(TABLE))


def test_the_samplers_are_a1111s_in_its_order():
    assert sampler_names() == list(TABLE)


@pytest.mark.parametrize("name", TABLE)
def test_each_sampler_builds_its_scheduler_from_the_models_config(name):
    class_name, karras, algorithm = TABLE[name]
    scheduler = make_scheduler(name, MODEL_CONFIG)
    config = scheduler.config
    assert type(scheduler).__name__ == class_name
    assert config.get("use_karras_sigmas") is karras
    assert config.get("algorithm_type") == algorithm
    assert (config.beta_start, config.beta_schedule, config.prediction_type) == (0.00085, "scaled_linear", "v_prediction")
    assert config.get("clip_sample") in (None, False)  # never clipped unless the model says so
    if name == "PLMS":
        assert config.skip_prk_steps is True
    assert make_scheduler(name, MODEL_CONFIG) is not scheduler  # a fresh one per request


def test_a_models_own_clip_sample_is_kept():
    assert make_scheduler("DDIM", {**MODEL_CONFIG, "clip_sample": True}).config.clip_sample is True
    assert make_scheduler("DDIM", MODEL_CONFIG).config.clip_sample is False  # DDIM's class default is True


def test_unknown_samplers_are_refused_listing_the_known_ones():
    for lookup in (check_sampler, lambda name: make_scheduler(name, MODEL_CONFIG), canonical_sampler):
        with pytest.raises(UnknownSampler) as info:
            lookup("Euler b")
        assert str(info.value) == UNKNOWN
    assert check_sampler("Heun").scheduler_class == "HeunDiscreteScheduler"


@pytest.mark.parametrize("name, aliases", [
    ("Euler", ["k_euler", "euler"]),
    ("Euler a", ["k_euler_a", "k_euler_ancestral", "euler_a"]),
    ("DPM2 a Karras", ["k_dpm_2_a_ka", "dpm2_a_karras"]),
    ("DPM++ 2M SDE Karras", ["k_dpmpp_2m_sde_ka", "dpmpp_2m_sde_karras"]),
    ("DDIM", ["ddim"]),
    ("PLMS", ["plms", "pndm"]),
    ("UniPC", ["unipc"]),
    ("Unlisted Name", ["unlisted_name"]),
])
def test_aliases_are_a1111s_k_diffusion_names_and_snake_case(name, aliases):
    assert sampler_aliases(name) == aliases


@pytest.mark.parametrize("asked, schedule, found", [
    ("Euler a", "automatic", "Euler a"),
    ("  euler A ", "Automatic", "Euler a"),
    ("k_euler_ancestral", None, "Euler a"),
    ("DPMPP_2M_SDE", "", "DPM++ 2M SDE"),
    ("pndm", "uniform", "PLMS"),
    ("K_LMS_KA", "automatic", "LMS Karras"),
    ("DPM++ 2M", "karras", "DPM++ 2M Karras"),
    ("dpm2 a", " KARRAS ", "DPM2 a Karras"),
    ("DPM++ SDE Karras", "karras", "DPM++ SDE Karras"),
    ("DPM++ SDE Karras", "automatic", "DPM++ SDE Karras"),
])
def test_names_aliases_and_the_schedule_field_resolve_to_one_sampler(asked, schedule, found):
    assert canonical_sampler(asked, schedule) == found
    if schedule == "automatic":
        assert canonical_sampler(asked) == found  # the default schedule


def test_a_schedule_a_sampler_does_not_have_is_refused_naming_the_choices():
    with pytest.raises(InvalidRequest) as info:
        canonical_sampler("Euler", "karras")
    assert str(info.value) == (
        "schedule type 'karras' is not available for Euler; use 'automatic', or 'karras' with one of: "
        "LMS, DPM2, DPM2 a, DPM++ 2M, DPM++ 2M SDE, DPM++ SDE")
    with pytest.raises(InvalidRequest) as info:
        canonical_sampler("UniPC", "Exponential")
    assert str(info.value) == "schedule type 'exponential' is not available for UniPC; use 'automatic' or 'karras'"
    assert not isinstance(info.value, UnknownSampler)


def test_pixart_refuses_the_samplers_that_call_the_transformer_twice():
    two_calls = ["Heun", "DPM2", "DPM2 Karras", "DPM2 a", "DPM2 a Karras", "DPM++ SDE", "DPM++ SDE Karras"]
    assert family_sampler_names("pixart-sigma") == [n for n in TABLE if n not in two_calls]
    assert family_sampler_names("sd15") == family_sampler_names("sdxl") == list(TABLE)
    with pytest.raises(InvalidRequest) as info:
        check_sampler_for("pixart-sigma", "px", "Heun")
    assert str(info.value) == (
        "sampler 'Heun' is not available for px (pixart-sigma): it runs the transformer twice per step (a "
        "second-order sampler); PixArt-Sigma is served with single-evaluation samplers only, so a step costs one "
        "call of the tensor-parallel transformer; use one of: " + ", ".join(family_sampler_names("pixart-sigma")))
    assert check_sampler_for("pixart-sigma", "px", "Euler").scheduler_class == "EulerDiscreteScheduler"
    assert check_sampler_for("sd15", "m", "Heun").scheduler_class == "HeunDiscreteScheduler"
    with pytest.raises(UnknownSampler):
        check_sampler_for("sd15", "m", "Euler b")


def test_only_a_scheduler_that_draws_its_own_noise_is_seeded():
    sde = make_scheduler("DPM++ SDE", MODEL_CONFIG)
    seeds = [7, 8]
    seed_scheduler(sde, seeds)
    seeds.append(9)  # the scheduler keeps its own list
    assert sde.noise_sampler_seed == [7, 8]
    euler = make_scheduler("Euler", MODEL_CONFIG)
    seed_scheduler(euler, [7])
    assert not hasattr(euler, "noise_sampler_seed")
