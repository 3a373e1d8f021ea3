"""The sampler table, names and aliases (fast; the pixels each sampler gives are test_parity.py's job).

Expected values are written down here from A1111's sampler list and diffusers' documented mapping
(https://huggingface.co/docs/diffusers/api/schedulers/overview, including its "Noise schedules and schedule
types" table: Karras -> use_karras_sigmas=True, sgm_uniform -> timestep_spacing="trailing"), not read from
engine.samplers."""
from __future__ import annotations

import pytest
import torch

from engine.errors import InvalidRequest, UnknownSampler
from engine.samplers import (canonical_sampler, check_sampler, check_sampler_for, family_sampler_names,
                             make_scheduler, sampler_aliases, sampler_names, seed_scheduler)

# A1111 name -> (diffusers class, use_karras_sigmas, algorithm_type or None where the class has none)
TABLE = {
    "Euler": ("EulerDiscreteScheduler", False, None),
    "Euler SGM Uniform": ("EulerDiscreteScheduler", False, None),
    "Euler a": ("EulerAncestralDiscreteScheduler", None, None),
    "Euler a SGM Uniform": ("EulerAncestralDiscreteScheduler", None, None),
    "Heun": ("HeunDiscreteScheduler", False, None),
    "LMS": ("LMSDiscreteScheduler", False, None),
    "LMS Karras": ("LMSDiscreteScheduler", True, None),
    "DPM2": ("KDPM2DiscreteScheduler", False, None),
    "DPM2 Karras": ("KDPM2DiscreteScheduler", True, None),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", False, None),
    "DPM2 a Karras": ("KDPM2AncestralDiscreteScheduler", True, None),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", False, "dpmsolver++"),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", True, "dpmsolver++"),
    "DPM++ 2M SGM Uniform": ("DPMSolverMultistepScheduler", False, "dpmsolver++"),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", False, "sde-dpmsolver++"),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", True, "sde-dpmsolver++"),
    "DPM++ 2M SDE SGM Uniform": ("DPMSolverMultistepScheduler", False, "sde-dpmsolver++"),
    "DPM++ SDE": ("DPMSolverSDEScheduler", False, None),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", True, None),
    "DDIM": ("DDIMScheduler", None, None),
    "PLMS": ("PNDMScheduler", None, None),
    "UniPC": ("UniPCMultistepScheduler", False, None),
    "LCM": ("LCMScheduler", None, None),  # A1111's modules/sd_samplers_lcm.py
}
SGM_UNIFORM = [name for name in TABLE if name.endswith(" SGM Uniform")]
# A model's own scheduler config whose algorithm choices (Karras sigmas, an SDE solver, PRK steps)
# must not leak into another sampler, and that leaves clip_sample out.
MODEL_CONFIG = {"_class_name": "DPMSolverMultistepScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "prediction_type": "v_prediction",
                "steps_offset": 1, "algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True,
                "skip_prk_steps": False, "timestep_spacing": "leading"}
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
    if name in SGM_UNIFORM:
        assert config.timestep_spacing == "trailing"
    elif name != "LCM":
        assert config.timestep_spacing == "leading"  # the model's own spacing is kept for the other samplers
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
    ("LCM", ["k_lcm", "lcm"]),
    ("Euler a SGM Uniform", ["euler_a_sgm_uniform"]),
    ("DPM++ 2M SDE SGM Uniform", ["dpmpp_2m_sde_sgm_uniform"]),
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
    # A1111's "SGM Uniform" schedule type, by its name, its label or its alias (modules/sd_schedulers.py)
    ("Euler a", "sgm_uniform", "Euler a SGM Uniform"),
    ("k_euler", "SGM Uniform", "Euler SGM Uniform"),
    ("dpmpp_2m", " SGMUniform ", "DPM++ 2M SGM Uniform"),
    ("DPM++ 2M SDE", "sgm_uniform", "DPM++ 2M SDE SGM Uniform"),
    ("euler_a_sgm_uniform", "automatic", "Euler a SGM Uniform"),
    ("Euler a SGM Uniform", "sgm_uniform", "Euler a SGM Uniform"),
    # a name that carries its schedule keeps it, as A1111 splits "X Karras" into X + Karras
    ("DPM++ 2M Karras", "sgm_uniform", "DPM++ 2M Karras"),
    ("Euler a SGM Uniform", "karras", "Euler a SGM Uniform"),
    ("k_lcm", "automatic", "LCM"),
    ("lcm", None, "LCM"),
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
    assert str(info.value) == ("schedule type 'exponential' is not available for UniPC; use 'automatic', 'karras' "
                               "or 'sgm_uniform'")
    assert not isinstance(info.value, UnknownSampler)
    for asked in ("DDIM", "LCM"):
        with pytest.raises(InvalidRequest) as info:
            canonical_sampler(asked, "SGM Uniform")
        assert str(info.value) == (
            f"schedule type 'sgm_uniform' is not available for {asked}; use 'automatic', or 'sgm_uniform' with one "
            "of: Euler, Euler a, DPM++ 2M, DPM++ 2M SDE")


# The timesteps a 4-step schedule visits, of 1000 training timesteps. "SGM Uniform" (trailing): 1000 - 250 k,
# minus 1 -> 999, 749, 499, 249 (A1111's sgm_uniform: linspace(999, 0, 5) without its last point, i.e.
# 999, 749.25, 499.5, 249.75, before its sigma interpolation). The model's own "leading" spacing with
# steps_offset 1: 250 k + 1 -> 751, 501, 251, 1 (Euler, Euler a); DPMSolverMultistepScheduler's leading
# divides by steps + 1: 200 k + 1 -> 801, 601, 401, 201. LCM: every 4th (floor(12.5 i)) of the 50-step
# distillation schedule 999, 979, ..., 19 (20 k - 1) -> 999, 759, 499, 259.
SGM_UNIFORM_4 = [999, 749, 499, 249]
LEADING_4 = {"Euler": [751, 501, 251, 1], "Euler a": [751, 501, 251, 1], "DPM++ 2M": [801, 601, 401, 201],
             "DPM++ 2M SDE": [801, 601, 401, 201]}
LCM_4 = [999, 759, 499, 259]


@pytest.mark.parametrize("name", SGM_UNIFORM)
def test_sgm_uniform_samplers_run_trailing_timesteps_over_the_models_own_spacing(name):
    plain = name.removesuffix(" SGM Uniform")
    for spacing in ("leading", "linspace", "trailing"):
        scheduler = make_scheduler(name, {**MODEL_CONFIG, "timestep_spacing": spacing})
        scheduler.set_timesteps(4)
        assert scheduler.timesteps.round().long().tolist() == SGM_UNIFORM_4, spacing
    scheduler = make_scheduler(plain, MODEL_CONFIG)  # the plain sampler keeps the model's leading spacing
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.round().long().tolist() == LEADING_4[plain]


def test_lcm_takes_its_timesteps_from_the_distillation_schedule_whatever_the_models_spacing():
    for spacing in ("leading", "trailing"):
        scheduler = make_scheduler("LCM", {**MODEL_CONFIG, "timestep_spacing": spacing})
        scheduler.set_timesteps(4)
        assert scheduler.timesteps.tolist() == LCM_4
        assert scheduler.config.original_inference_steps == 50


def test_lcm_runs_at_most_50_steps():
    from engine.samplers import check_steps_for

    check_steps_for("LCM", 50)
    check_steps_for("Euler a", 150)
    with pytest.raises(InvalidRequest) as info:
        check_steps_for("LCM", 51)
    assert str(info.value) == ("sampler 'LCM' runs at most 50 steps (its timesteps come from the 50-step LCM "
                               "distillation schedule); 51 were asked for")
    scheduler = make_scheduler("LCM", MODEL_CONFIG)
    scheduler.set_timesteps(50)  # what diffusers accepts ...
    with pytest.raises(ValueError):
        scheduler.set_timesteps(51)  # ... and refuses


def test_a_models_own_schedule_type_does_not_leak_into_the_samplers():
    """A model config that names a sigma schedule (Exponential, Beta: other A1111 schedule types) must not
    reach "X Karras" (diffusers refuses two at once) nor "X" / "X SGM Uniform"."""
    for key in ("use_exponential_sigmas", "use_beta_sigmas"):
        config = {**MODEL_CONFIG, key: True}
        for name in ("DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SGM Uniform", "Euler", "LMS Karras"):
            scheduler = make_scheduler(name, config)
            assert not scheduler.config.get(key), (key, name)
            scheduler.set_timesteps(4)
    assert torch.is_tensor(scheduler.timesteps)


def test_pixart_refuses_the_samplers_that_call_the_transformer_twice():
    # LCM and the SGM Uniform samplers call it once per step: PixArt runs them
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
