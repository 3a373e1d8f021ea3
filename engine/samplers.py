"""A1111 sampler names mapped to diffusers schedulers.

Every request builds a fresh scheduler with ``make_scheduler`` from the model's own scheduler
config: a scheduler is mutated by ``set_timesteps`` and must never be shared between requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import diffusers

from .errors import UnknownSampler


@dataclass(frozen=True)
class SamplerRecipe:
    scheduler_class: str
    overrides: Mapping[str, Any] = field(default_factory=dict)


_KARRAS = {"use_karras_sigmas": True}

SAMPLERS: dict[str, SamplerRecipe] = {
    "Euler": SamplerRecipe("EulerDiscreteScheduler"),
    "Euler a": SamplerRecipe("EulerAncestralDiscreteScheduler"),
    "Heun": SamplerRecipe("HeunDiscreteScheduler"),
    "LMS": SamplerRecipe("LMSDiscreteScheduler"),
    "LMS Karras": SamplerRecipe("LMSDiscreteScheduler", _KARRAS),
    "DPM2": SamplerRecipe("KDPM2DiscreteScheduler"),
    "DPM2 Karras": SamplerRecipe("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": SamplerRecipe("KDPM2AncestralDiscreteScheduler"),
    "DPM2 a Karras": SamplerRecipe("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM++ 2M": SamplerRecipe("DPMSolverMultistepScheduler"),
    "DPM++ 2M Karras": SamplerRecipe("DPMSolverMultistepScheduler", _KARRAS),
    "DPM++ 2M SDE": SamplerRecipe("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "DPM++ 2M SDE Karras": SamplerRecipe(
        "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", **_KARRAS}
    ),
    "DPM++ SDE": SamplerRecipe("DPMSolverSDEScheduler"),
    "DPM++ SDE Karras": SamplerRecipe("DPMSolverSDEScheduler", _KARRAS),
    "DDIM": SamplerRecipe("DDIMScheduler"),
    "PLMS": SamplerRecipe("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": SamplerRecipe("UniPCMultistepScheduler"),
}

# Algorithm choices of the model's own scheduler that must not leak into the chosen sampler.
# Everything else (betas, prediction type, clip_sample, ...) describes the model and is kept;
# ``from_config`` ignores keys a scheduler class does not know.
_DROP_KEYS = ("algorithm_type", "use_karras_sigmas", "skip_prk_steps")


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def check_sampler(name: str) -> SamplerRecipe:
    """The recipe for ``name``; raises ``UnknownSampler`` listing the valid names."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UnknownSampler(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}") from None


def make_scheduler(name: str, base_config: Mapping[str, Any]) -> Any:
    """A new scheduler of sampler ``name`` built from a model's scheduler config."""
    recipe = check_sampler(name)
    config = {k: v for k, v in dict(base_config).items() if k not in _DROP_KEYS}
    config.update(recipe.overrides)
    scheduler_class = getattr(diffusers, recipe.scheduler_class)
    return scheduler_class.from_config(config)
