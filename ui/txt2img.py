"""The txt2img tab: prompt → images. Its Generate event is the ``/txt2img`` API endpoint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import gradio as gr

from engine import GenerateRequest

from .common import (GENERATE_ADMISSION, GENERATE_QUEUE, AppContext, GenerationControls, output_panel,
                     parameter_controls, prompt_row, request_size, run_job, tab_outputs, whole, wire_common)
from .hires import HiresControls, hires_controls, hires_fix

TAB = "txt2img"


@dataclass
class Txt2ImgControls(GenerationControls):
    hires: Optional[HiresControls] = None


def build(ctx: AppContext, model: gr.Dropdown) -> Txt2ImgControls:
    """Lay out the tab (inside the caller's ``gr.Tabs``) and wire its events."""
    info = ctx.model_info(model.value)
    with gr.Tab("txt2img", id=TAB, elem_id=f"tab_{TAB}"):
        prompt, negative, generate, interrupt = prompt_row(TAB)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, elem_id=f"{TAB}_settings"):
                params = parameter_controls(ctx, TAB, info)
                hires = hires_controls(ctx, TAB, info)
            with gr.Column(scale=1, elem_id=f"{TAB}_results"):
                gallery, stats, infotext = output_panel(TAB)
    controls = Txt2ImgControls(TAB, prompt, negative, generate, interrupt, gallery=gallery, stats=stats,
                               info=infotext, hires=hires, **params)
    wire(ctx, controls, model)
    return controls


def wire(ctx: AppContext, c: Txt2ImgControls, model: gr.Dropdown) -> None:
    def txt2img(prompt: str, negative_prompt: Optional[str] = None, model: Optional[str] = None,
                resolution: Optional[str] = None, width: Optional[float] = None, height: Optional[float] = None,
                sampler: Optional[str] = None, steps: Optional[float] = None, cfg_scale: Optional[float] = None,
                seed: float = -1, batch_count: float = 1, enable_hr: bool = False, hr_upscaler: Optional[str] = None,
                hr_scale: Optional[float] = None, hr_resize: Optional[str] = None,
                hr_second_pass_steps: Optional[float] = None, denoising_strength: Optional[float] = None,
                request: gr.Request = None, progress: gr.Progress = gr.Progress()) -> Iterator[tuple[Any, ...]]:
        """Generate ``batch_count`` images from a prompt. Returns the PNGs (each carrying its A1111
        parameters), the first image's parameters and a line with seed, time and it/s (while it runs,
        intermediate outputs carry the live preview in the gallery).
        ``resolution`` (WxH) is used on fixed-shape backends, ``width``/``height`` on eager; left out,
        the model, size, sampler, steps and CFG are the registry's defaults. ``enable_hr``: hires fix
        with ``hr_upscaler``, ``hr_scale`` or ``hr_resize`` (a compiled WxH), ``hr_second_pass_steps``
        (0: same as steps) and ``denoising_strength``."""

        def make_request() -> GenerateRequest:
            return GenerateRequest(
                model=model or None, prompt=prompt or "", negative_prompt=negative_prompt or "",
                sampler=sampler or None, steps=whole("steps", steps), cfg_scale=cfg_scale,
                seed=whole("seed", seed, -1), size=request_size(ctx, resolution, width, height),
                hires=hires_fix(enable_hr, hr_upscaler, hr_scale, hr_resize, hr_second_pass_steps, denoising_strength))

        yield from tab_outputs(run_job(ctx, make_request, batch_count, request, progress, "txt2img"))

    h = c.hires
    assert h is not None
    inputs = dict(prompt=c.prompt, negative_prompt=c.negative_prompt, model=model, resolution=c.resolution,
                  width=c.width, height=c.height, sampler=c.sampler, steps=c.steps, cfg_scale=c.cfg_scale,
                  seed=c.seed, batch_count=c.batch_count, enable_hr=h.enable, hr_upscaler=h.upscaler, hr_scale=h.scale,
                  hr_resize=h.resize_to, hr_second_pass_steps=h.steps, denoising_strength=h.strength)
    gr.on([c.generate.click], txt2img, inputs_kwargs=inputs, outputs=[c.gallery, c.info, c.stats],
          api_name="txt2img", concurrency_id=GENERATE_QUEUE, concurrency_limit=GENERATE_ADMISSION,
          show_progress_on=[c.gallery])
    wire_common(ctx, c)
