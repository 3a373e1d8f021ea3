"""The img2img tab: an input image + prompt → images. Its Generate event is the ``/img2img`` API endpoint."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Optional

import gradio as gr
from PIL import Image

from engine import EngineError, GenerateRequest, InvalidRequest
from engine.images import read_image
from engine.types import RESIZE_MODES

from .common import (GENERATE_ADMISSION, GENERATE_QUEUE, AppContext, GenerationControls, Radio, Slider, output_panel,
                     parameter_controls, prompt_row, request_size, run_job, tab_outputs, upload_bytes, user_error,
                     whole, wire_common)
from .inpaint import IMG2IMG, InpaintControls, inpaint_input, inpaint_settings, inpaint_tabs

TAB = "img2img"


class InitImage(gr.Image):
    """``gr.Image`` (the same widget: a template component) that reads uploads with the engine's
    ``read_image``: a file that is empty, not an image, truncated or a decompression bomb is refused
    with a message saying so (Gradio's own preprocessing answers "Could not preprocess input
    component at index 0", and decodes a 100-megapixel bomb); the handler gets the RGB image the
    model starts from (upright, first frame, transparency on white)."""

    is_template = True

    def preprocess(self, payload: Any) -> Optional[Image.Image]:
        if payload is None:
            return None
        try:
            return read_image(upload_bytes(payload))
        except EngineError as exc:
            raise user_error(InvalidRequest(f"{self.label}: {exc}")) from None


@dataclass
class Img2ImgControls(GenerationControls):
    init_image: Optional[gr.Image] = None
    strength: Optional[gr.Slider] = None
    resize_mode: Optional[gr.Radio] = None
    inpaint: Optional[InpaintControls] = None


def build(ctx: AppContext, model: gr.Dropdown) -> Img2ImgControls:
    """Lay out the tab (inside the caller's ``gr.Tabs``) and wire its events."""
    info = ctx.model_info(model.value)
    with gr.Tab("img2img", id=TAB, elem_id=f"tab_{TAB}"):
        prompt, negative, generate, interrupt = prompt_row(TAB)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, elem_id=f"{TAB}_settings"):
                with gr.Tabs(elem_id=f"{TAB}_mode_tabs"):
                    with gr.Tab("img2img", id=f"{TAB}_plain", elem_id=f"{TAB}_plain_tab") as plain_tab:
                        init_image = InitImage(label="Image for img2img", type="pil", image_mode="RGB", height=280,
                                               sources=["upload", "clipboard"], elem_id=f"{TAB}_image")
                    sub_tabs = inpaint_tabs(TAB)
                inpaint = inpaint_settings(TAB, plain_tab, sub_tabs)
                resize_mode = Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], label="Resize mode",
                                       elem_id=f"{TAB}_resize_mode",
                                       info="how the image is fitted to the generation size")
                strength = Slider(0, 1, step=0.01, value=0.75, label="Denoising strength",
                                     elem_id=f"{TAB}_denoising_strength",
                                     info="0 keeps the image, 1 replaces it")
                params = parameter_controls(ctx, TAB, info)
            with gr.Column(scale=1, elem_id=f"{TAB}_results"):
                gallery, stats, infotext = output_panel(TAB)
    controls = Img2ImgControls(TAB, prompt, negative, generate, interrupt, gallery=gallery, stats=stats,
                               info=infotext, init_image=init_image, strength=strength, resize_mode=resize_mode,
                               inpaint=inpaint, **params)
    wire(ctx, controls, model)
    return controls


def wire(ctx: AppContext, c: Img2ImgControls, model: gr.Dropdown) -> None:
    def img2img(init_image: Any, prompt: str, negative_prompt: Optional[str] = None, model: Optional[str] = None,
                resolution: Optional[str] = None, width: Optional[float] = None, height: Optional[float] = None,
                sampler: Optional[str] = None, steps: Optional[float] = None, cfg_scale: Optional[float] = None,
                seed: float = -1, batch_count: float = 1, denoising_strength: float = 0.75,
                resize_mode: str = RESIZE_MODES[0], img2img_mode: str = IMG2IMG, inpaint_editor: Any = None,
                inpaint_image: Any = None, inpaint_mask: Any = None, mask_blur: Optional[float] = None,
                mask_mode: Optional[str] = None, masked_content: Optional[str] = None,
                inpaint_area: Optional[str] = None, masked_padding: Optional[float] = None,
                request: gr.Request = None, progress: gr.Progress = gr.Progress()) -> Iterator[tuple[Any, ...]]:
        """Redraw ``init_image`` following the prompt, ``batch_count`` times. The image is fitted to
        the generation size with ``resize_mode``; ``denoising_strength`` 0 keeps it, 1 replaces it.
        With ``img2img_mode`` "Inpaint" (the editor's image and brush strokes) or "Inpaint upload"
        (``inpaint_image`` and ``inpaint_mask``, white: repaint) only the masked area is redrawn, as set
        by ``mask_blur``, ``mask_mode``, ``masked_content``, ``inpaint_area`` and ``masked_padding``.
        Returns the PNGs (each carrying its A1111 parameters), the first image's parameters and a
        line with seed, time and it/s (while it runs, intermediate outputs carry the live preview)."""

        def make_request() -> GenerateRequest:
            image, inpaint = inpaint_input(img2img_mode, init_image, inpaint_editor, inpaint_image, inpaint_mask,
                                           mask_blur, mask_mode, masked_content, inpaint_area, masked_padding)
            if image is None:
                raise InvalidRequest("img2img needs an input image: drop one into the image box")
            return GenerateRequest(
                model=model or None, prompt=prompt or "", negative_prompt=negative_prompt or "",
                sampler=sampler or None, steps=whole("steps", steps), cfg_scale=cfg_scale,
                seed=whole("seed", seed, -1), size=request_size(ctx, resolution, width, height),
                init_image=image, strength=_strength(denoising_strength),
                resize_mode=resize_mode or RESIZE_MODES[0], inpaint=inpaint)

        yield from tab_outputs(run_job(ctx, make_request, batch_count, request, progress, "img2img"))

    inputs = dict(init_image=c.init_image, prompt=c.prompt, negative_prompt=c.negative_prompt, model=model,
                  resolution=c.resolution, width=c.width, height=c.height, sampler=c.sampler, steps=c.steps,
                  cfg_scale=c.cfg_scale, seed=c.seed, batch_count=c.batch_count, denoising_strength=c.strength,
                  resize_mode=c.resize_mode, **(c.inpaint.inputs() if c.inpaint else {}))
    c.generate.click(img2img, inputs_kwargs=inputs, outputs=[c.gallery, c.info, c.stats], api_name="img2img",
                     concurrency_id=GENERATE_QUEUE, concurrency_limit=GENERATE_ADMISSION, show_progress_on=[c.gallery])
    wire_common(ctx, c)


def _strength(value: Any) -> float:
    if value in (None, ""):
        return 0.75
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"denoising strength must be a number from 0 to 1, got {value!r}") from None
