"""A1111 sampler names mapped to diffusers schedulers.

Every request builds a fresh scheduler with ``make_scheduler`` from the model's own scheduler
config: a scheduler is mutated by ``set_timesteps`` and must never be shared between requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import diffusers

from .errors import InvalidRequest, UnknownSampler


@dataclass(frozen=True)
class SamplerRecipe:
    scheduler_class: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


_KARRAS = {"use_karras_sigmas": True}
# A1111's "SGM Uniform" schedule type (modules/sd_schedulers.py ``sgm_uniform``: n timesteps evenly spaced
# from the last training timestep down, the final one left out) is diffusers' ``timestep_spacing="trailing"``
# (the schedulers overview's "Noise schedules and schedule types" table), the spacing the sd-turbo and
# sdxl-turbo model cards sample with.
_SGM_UNIFORM = {"timestep_spacing": "trailing"}

SAMPLERS: dict[str, SamplerRecipe] = {
    "Euler": SamplerRecipe("EulerDiscreteScheduler"),
    "Euler SGM Uniform": SamplerRecipe("EulerDiscreteScheduler", _SGM_UNIFORM),
    "Euler a": SamplerRecipe("EulerAncestralDiscreteScheduler"),
    "Euler a SGM Uniform": SamplerRecipe("EulerAncestralDiscreteScheduler", _SGM_UNIFORM),
    "Heun": SamplerRecipe("HeunDiscreteScheduler"),
    "LMS": SamplerRecipe("LMSDiscreteScheduler"),
    "LMS Karras": SamplerRecipe("LMSDiscreteScheduler", _KARRAS),
    "DPM2": SamplerRecipe("KDPM2DiscreteScheduler"),
    "DPM2 Karras": SamplerRecipe("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": SamplerRecipe("KDPM2AncestralDiscreteScheduler"),
    "DPM2 a Karras": SamplerRecipe("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM++ 2M": SamplerRecipe("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": SamplerRecipe("DPMSolverMultistepScheduler", _KARRAS),
    "DPM++ 2M SGM Uniform": SamplerRecipe("DPMSolverMultistepScheduler", _SGM_UNIFORM),
    "DPM++ 2M SDE": SamplerRecipe("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": SamplerRecipe(
        "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", **_KARRAS}
    ),
    "DPM++ 2M SDE SGM Uniform": SamplerRecipe(
        "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", **_SGM_UNIFORM}
    ),
    "DPM++ SDE": SamplerRecipe("DPMSolverSDEScheduler"),
    "DPM++ SDE Karras": SamplerRecipe("DPMSolverSDEScheduler", _KARRAS),
    "DDIM": SamplerRecipe("DDIMScheduler"),
    "PLMS": SamplerRecipe("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": SamplerRecipe("UniPCMultistepScheduler"),
    # A1111's LCM sampler (modules/sd_samplers_lcm.py; listed after the timestep samplers). Its timesteps
    # come from the 50-step LCM distillation schedule (``original_inference_steps``), so it has no schedule
    # types here, and it runs at most that many steps (``LCM_MAX_STEPS``).
    "LCM": SamplerRecipe("LCMScheduler"),
}

# Algorithm choices of the model's own scheduler that must not leak into the chosen sampler: the solver
# (an SDE solver, PRK steps) and the sigma schedules that A1111 calls schedule types (Karras, Exponential,
# Beta; diffusers refuses more than one of them at once, so a model config that set one would break the
# Karras samplers). Everything else (betas, prediction type, clip_sample, ...) describes the model and is
# kept, and so is the model's own ``timestep_spacing`` for the plain samplers ("leading" with
# ``steps_offset`` 1 for SD 1.x/SDXL; the turbo models say "trailing"); the "SGM Uniform" samplers set
# "trailing" over it. LCM ignores timestep_spacing and steps_offset. ``from_config`` ignores keys a
# scheduler class does not know.
_DROP_KEYS = ("algorithm_type", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "skip_prk_steps")

# A1111's aliases (k-diffusion names), as /sdapi/v1/samplers lists them; ``sampler_aliases`` adds
# the snake_case spelling that scripts such as the SageMaker Stable Diffusion Quick Kit send ("euler_a").
_K_ALIASES: dict[str, tuple[str, ...]] = {
    "Euler": ("k_euler",), "Euler a": ("k_euler_a", "k_euler_ancestral"), "Heun": ("k_heun",),
    "LMS": ("k_lms",), "LMS Karras": ("k_lms_ka",), "DPM2": ("k_dpm_2",), "DPM2 Karras": ("k_dpm_2_ka",),
    "DPM2 a": ("k_dpm_2_a",), "DPM2 a Karras": ("k_dpm_2_a_ka",), "DPM++ 2M": ("k_dpmpp_2m",),
    "DPM++ 2M Karras": ("k_dpmpp_2m_ka",), "DPM++ 2M SDE": ("k_dpmpp_2m_sde",),
    "DPM++ 2M SDE Karras": ("k_dpmpp_2m_sde_ka",), "DPM++ SDE": ("k_dpmpp_sde",),
    "DPM++ SDE Karras": ("k_dpmpp_sde_ka",), "DDIM": ("ddim",), "PLMS": ("plms", "pndm"), "UniPC": ("unipc",),
    "LCM": ("k_lcm",),
}
KARRAS_SUFFIX = " Karras"
SGM_UNIFORM_SUFFIX = " SGM Uniform"
# A1111's schedule types this table has, by their API name (``scheduler`` field, /sdapi/v1/schedulers):
# the suffix of the sampler names that run them, and their label. A1111 also accepts the label and, for
# SGM Uniform, the alias "SGMUniform" (modules/sd_schedulers.py).
SCHEDULES: dict[str, tuple[str, str]] = {"karras": (KARRAS_SUFFIX, "Karras"),
                                         "sgm_uniform": (SGM_UNIFORM_SUFFIX, "SGM Uniform")}
_SCHEDULE_SPELLINGS = {"karras": "karras", "sgm_uniform": "sgm_uniform", "sgm uniform": "sgm_uniform",
                       "sgmuniform": "sgm_uniform"}
# LCMScheduler picks its timesteps from the 50-step distillation schedule (``original_inference_steps``)
# and refuses more steps than that (A1111's LCM repeats sigmas instead).
LCM_MAX_STEPS = 50


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def sampler_aliases(name: str) -> list[str]:
    """Other names a client may use for sampler ``name``: A1111's k-diffusion aliases and snake_case."""
    snake = name.lower().replace("++", "pp").replace(" ", "_")
    return [alias for alias in dict.fromkeys((*_K_ALIASES.get(name, ()), snake)) if alias != name]


def canonical_sampler(name: str, schedule: str = "automatic") -> str:
    """The A1111 sampler name for ``name`` (a name or alias, any case) under A1111's separate
    ``scheduler`` field: "automatic" (or "uniform") keeps the sampler's own schedule, "karras" and
    "sgm_uniform" (or its label "SGM Uniform") pick the sampler's "X Karras" / "X SGM Uniform" variant.
    A name that already carries a schedule ("DPM++ 2M Karras") keeps it, as A1111 reads such names.
    Raises ``UnknownSampler`` for an unknown name and ``InvalidRequest`` for a schedule the sampler
    does not have, naming what is available."""
    wanted = name.strip().lower()
    found = next((n for n in SAMPLERS if wanted == n.lower() or wanted in sampler_aliases(n)), None)
    if found is None:
        raise UnknownSampler(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    schedule = (schedule or "automatic").strip().lower()
    if schedule in ("automatic", "uniform"):
        return found
    key = _SCHEDULE_SPELLINGS.get(schedule)
    if key is not None:
        if any(found.endswith(suffix) for suffix, _ in SCHEDULES.values()):
            return found
        suffix = SCHEDULES[key][0]
        if found + suffix in SAMPLERS:
            return found + suffix
        having = [n[:-len(suffix)] for n in SAMPLERS if n.endswith(suffix)]
        raise InvalidRequest(f"schedule type {key!r} is not available for {found}; use 'automatic', or {key!r} "
                             f"with one of: {', '.join(having)}")
    *others, last = (repr(k) for k in SCHEDULES)
    raise InvalidRequest(f"schedule type {schedule!r} is not available for {found}; use 'automatic', "
                         f"{', '.join(others)} or {last}")


def sampler_max_steps(name: str) -> int | None:
    """The most steps sampler ``name`` runs (LCM: ``LCM_MAX_STEPS``), None where only the engine's limit applies."""
    return LCM_MAX_STEPS if check_sampler(name).scheduler_class == "LCMScheduler" else None


def check_steps_for(name: str, steps: int) -> None:
    """``InvalidRequest`` when sampler ``name`` cannot run ``steps`` steps (LCM: at most ``LCM_MAX_STEPS``)."""
    if (sampler_max_steps(name) or steps) < steps:
        raise InvalidRequest(f"sampler {name!r} runs at most {LCM_MAX_STEPS} steps (its timesteps come from the "
                             f"{LCM_MAX_STEPS}-step LCM distillation schedule); {steps} were asked for")


def family_sampler_names(family: str) -> list[str]:
    """The samplers models of ``family`` run (PixArt-Sigma refuses some, see ``engine.families``)."""
    from .families import FAMILIES

    refused = FAMILIES[family].refused_samplers
    return [name for name in SAMPLERS if name not in refused]


def check_sampler_for(family: str, model: str, name: str) -> SamplerRecipe:
    """``check_sampler``, and ``InvalidRequest`` naming the model, why and the usable samplers when
    ``family`` does not run sampler ``name``."""
    from .families import FAMILIES

    recipe = check_sampler(name)
    why = FAMILIES[family].refused_samplers.get(name)
    if why is not None:
        raise InvalidRequest(f"sampler {name!r} is not available for {model} ({family}): {why}; use one of: "
                             f"{', '.join(family_sampler_names(family))}")
    return recipe


def check_sampler(name: str) -> SamplerRecipe:
    """The recipe for ``name``; raises ``UnknownSampler`` listing the valid names."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UnknownSampler(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}") from None


def seed_scheduler(scheduler: Any, seeds: list[int]) -> None:
    """Seed the noise a scheduler draws itself, one seed per row, as A1111 does: "DPM++ SDE" takes
    its Brownian-tree noise from ``noise_sampler_seed`` (else from the global torch RNG, which made
    the same request give different images). Other schedulers draw from the pipeline's generators."""
    if hasattr(scheduler, "noise_sampler_seed"):
        scheduler.noise_sampler_seed = list(seeds)  # a list: one tree per row, the same alone or batched


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> Any:
    """A new scheduler of sampler ``name`` built from a model's scheduler config."""
    recipe = check_sampler(name)
    config = {k: v for k, v in dict(base_config).items() if k not in _DROP_KEYS}
    # Stable Diffusion never clips the predicted sample (A1111's DDIM does not; SD checkpoints say
    # clip_sample: false). A config that leaves it out would get DDIM's class default, True: SD
    # pipelines correct that for SD 1.x/2.x, SDXL's does not, so it is set here for every family.
    config.setdefault("clip_sample", False)
    config.update(recipe.overrides)
    scheduler_class = getattr(diffusers, recipe.scheduler_class)
    return scheduler_class.from_config(config)
