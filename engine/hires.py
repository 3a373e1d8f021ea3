"""Hires fix (A1111's "Hires. fix"): txt2img at a compiled size, upscaled, then denoised again at a
larger compiled size as img2img — the way to big images from a model that composes well only near
its training size, and on fixed-shape backends the only way: each pass runs its own compiled variant.

Upscalers, by A1111's names: the "Latent …" ones interpolate the first pass's latents (bilinear,
bicubic or nearest, with or without antialiasing; the first pass is never decoded); "Lanczos" and
"Nearest" scale its decoded pixels (the second pass encodes them again). The second pass draws its
noise from the same seeds, as A1111 does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from PIL import Image

from .errors import InvalidRequest
from .types import HiresFix, Size

# name -> (works on "latent" or "pixel", interpolation, antialias)
UPSCALERS: dict[str, tuple[str, Any, bool]] = {
    "Latent": ("latent", "bilinear", False),
    "Latent (antialiased)": ("latent", "bilinear", True),
    "Latent (bicubic)": ("latent", "bicubic", False),
    "Latent (bicubic antialiased)": ("latent", "bicubic", True),
    "Latent (nearest)": ("latent", "nearest", False),
    "Latent (nearest-exact)": ("latent", "nearest-exact", False),
    "Lanczos": ("pixel", Image.Resampling.LANCZOS, False),
    "Nearest": ("pixel", Image.Resampling.NEAREST, False),
}
MAX_SCALE = 4.0


@dataclass(frozen=True)
class HiresPlan:
    """A validated hires fix: the second pass's size, steps and strength, and what was asked."""

    size: Size
    steps: int
    strength: float
    asked: HiresFix

    @property
    def on_latents(self) -> bool:
        return UPSCALERS[self.asked.upscaler][0] == "latent"

    def infotext(self) -> dict[str, Any]:
        """The fields A1111 writes for a hires image (its ``Size`` stays the first pass's)."""
        return {
            "Denoising strength": self.strength,
            "Hires upscale": None if self.asked.size else self.asked.scale,
            "Hires resize": str(self.size) if self.asked.size else None,
            "Hires steps": self.asked.steps,
            "Hires upscaler": self.asked.upscaler,
        }


def plan_hires(hires: HiresFix, first: Size, steps: int, check_range: Callable[..., None],
               check_size: Callable[[Size], Size]) -> HiresPlan:
    """Validate ``hires`` for a first pass at ``first`` with ``steps``; ``check_size`` refuses a
    second-pass size the backend cannot run (naming the compiled ones)."""
    if hires.upscaler not in UPSCALERS:
        raise InvalidRequest(f"unknown hires upscaler {hires.upscaler!r}; choose one of {', '.join(UPSCALERS)}")
    if hires.size is None:
        check_range("hires scale", hires.scale, 1.0, MAX_SCALE)
        size = Size(_multiple_of_8(first.width * hires.scale), _multiple_of_8(first.height * hires.scale))
    else:
        size = hires.size
    check_range("hires denoising strength", hires.strength, 0.0, 1.0)
    second_steps = steps if hires.steps in (None, 0) else hires.steps
    check_range("hires steps", second_steps, 1, 150, whole=True)
    if int(second_steps * hires.strength) < 1:
        raise InvalidRequest(
            f"hires denoising strength {hires.strength:g} with {second_steps} steps runs no denoising step in the "
            "second pass (it runs strength x steps of them); raise the strength or the hires steps")
    if size.width < first.width or size.height < first.height:
        raise InvalidRequest(f"the hires size {size} is smaller than the first pass ({first}); hires fix only enlarges")
    return HiresPlan(check_size(size), int(second_steps), float(hires.strength), hires)


def _multiple_of_8(value: float) -> int:
    return int(value) // 8 * 8


def upscale(output: Any, plan: HiresPlan) -> Any:
    """One first-pass output (latents ``(channels, h, w)`` or a PIL image) at the second pass's size."""
    kind, how, antialias = UPSCALERS[plan.asked.upscaler]
    if kind == "latent":
        shape = (plan.size.height // 8, plan.size.width // 8)
        return torch.nn.functional.interpolate(output[None].float(), size=shape, mode=how, antialias=antialias)[0]
    return output.resize((plan.size.width, plan.size.height), how)


def second_pass_images(outputs: list[Any], plan: HiresPlan) -> Any:
    """The ``image`` argument of the second pass for these rows: a latent batch, or PIL images."""
    upscaled = [upscale(output, plan) for output in outputs]
    if plan.on_latents:
        return torch.stack(upscaled)
    return upscaled[0] if len(upscaled) == 1 else upscaled


__all__ = ["HiresPlan", "UPSCALERS", "plan_hires", "second_pass_images"]
