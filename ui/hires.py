"""The txt2img tab's "Hires. fix" controls (A1111's): upscaler, upscale factor or a compiled size to
resize to, hires steps and denoising strength — turned into the engine's ``HiresFix``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import gradio as gr

from engine import HIRES_UPSCALERS, HiresFix, ModelInfo, Size

from .common import AppContext, Slider, parse_size, resolution_choices, whole

FROM_SCALE = "from Upscale by"


@dataclass
class HiresControls:
    enable: gr.Checkbox
    upscaler: gr.Dropdown
    scale: gr.Slider
    resize_to: gr.Dropdown
    steps: gr.Slider
    strength: gr.Slider


def resize_choices(info: Optional[ModelInfo], fixed_shape: bool) -> list[str]:
    """What the second pass may be resized to: by the factor, or (fixed-shape) a compiled size."""
    return [FROM_SCALE, *(resolution_choices(info, fixed_shape) if fixed_shape else [])]


def hires_controls(ctx: AppContext, tab: str, info: Optional[ModelInfo]) -> HiresControls:
    with gr.Accordion("Hires. fix", open=False, elem_id=f"{tab}_hr"):
        enable = gr.Checkbox(False, label="Hires. fix: upscale, then denoise again at the larger size",
                             elem_id=f"{tab}_enable_hr")
        with gr.Row():
            upscaler = gr.Dropdown(list(HIRES_UPSCALERS), value="Latent", label="Upscaler",
                                   elem_id=f"{tab}_hr_upscaler")
            steps = Slider(0, 150, step=1, value=0, label="Hires steps", info="0: as Sampling steps",
                           elem_id=f"{tab}_hires_steps")
            strength = Slider(0, 1, step=0.01, value=HiresFix.strength, label="Denoising strength",
                              elem_id=f"{tab}_denoising_strength")
        with gr.Row():
            scale = Slider(1, 4, step=0.05, value=HiresFix.scale, label="Upscale by", elem_id=f"{tab}_hr_scale")
            resize_to = gr.Dropdown(resize_choices(info, ctx.fixed_shape), value=FROM_SCALE,
                                    label="Resize to (compiled sizes)", elem_id=f"{tab}_hr_resize",
                                    visible=ctx.fixed_shape)
    return HiresControls(enable, upscaler, scale, resize_to, steps, strength)


def hires_fix(enable: Any, upscaler: Any, scale: Any, resize_to: Any, steps: Any, strength: Any) -> Optional[HiresFix]:
    """The request's ``HiresFix`` from the controls (None when the box is not ticked)."""
    if not enable:
        return None
    size: Optional[Size] = None if resize_to in (None, "", FROM_SCALE) else parse_size(resize_to)
    return HiresFix(scale=HiresFix.scale if scale is None else scale, upscaler=upscaler or "Latent",
                    steps=whole("hires steps", steps, 0) or None,
                    strength=HiresFix.strength if strength is None else strength, size=size)


__all__ = ["HiresControls", "hires_controls", "hires_fix", "resize_choices"]
