"""The PNG Info tab: drop a PNG (ours or A1111's), read its parameters, send them to a generation tab."""
from __future__ import annotations

import html
from typing import Any, Optional

import gradio as gr
from PIL import Image

from engine import EngineError, InvalidRequest, Size
from engine.images import read_image
from engine.infotext import parse_infotext, read_parameters

from .common import AppContext, GenerationControls, upload_bytes, user_error

TAB = "pnginfo"


class SourceImage(gr.Image):
    """``gr.Image`` (the same widget) that hands the handler the uploaded file itself, its text chunks
    intact, once the engine's ``read_image`` has checked it is an image: an empty, truncated or
    non-image file, or a decompression bomb, is refused naming the problem (Gradio's own
    preprocessing answers "Could not preprocess input component at index 0")."""

    is_template = True

    def preprocess(self, payload: Any) -> Optional[str]:
        if payload is None:
            return None
        try:
            read_image(upload_bytes(payload))
        except EngineError as exc:
            raise user_error(InvalidRequest(f"{self.label}: {exc}")) from None
        return payload.path


def read_png_parameters(path: Optional[str]) -> str:
    """The A1111 ``parameters`` text of an image file ('' when it has none or is no image)."""
    if not path:
        return ""
    try:
        with Image.open(path) as image:
            return read_parameters(image)
    except OSError:
        return ""


def parameters_table(text: str) -> str:
    if not text:
        return "<p class='pnginfo-empty'>No generation parameters in this image.</p>"
    fields = parse_infotext(text)
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in fields.items() if v)
    return f"<table class='pnginfo-table'>{rows}</table>"


def send_updates(ctx: AppContext, text: str, target: GenerationControls, model: gr.Dropdown,
                 current_model: Optional[str]) -> dict[Any, Any]:
    """Control updates that reproduce ``text`` in ``target`` (fields the PNG lacks stay as they are)."""
    fields = parse_infotext(text)
    updates: dict[Any, Any] = {target.prompt: fields.get("Prompt", ""),
                               target.negative_prompt: fields.get("Negative prompt", "")}
    model_id = current_model
    wanted_model = fields.get("Model")
    if wanted_model:
        if wanted_model in ctx.engine.registry.ids:
            updates[model] = model_id = wanted_model
        else:
            gr.Warning(f"model {wanted_model!r} from the PNG is not in the registry; keeping {current_model}")
    if fields.get("Sampler"):
        updates[target.sampler] = fields["Sampler"]
    for key, control, kind in (("Steps", target.steps, int), ("CFG scale", target.cfg_scale, float),
                               ("Seed", target.seed, int)):
        value = _number(fields.get(key), kind)
        if value is not None:
            updates[control] = value
    size = _size(fields.get("Size"))
    if size is not None:
        if ctx.fixed_shape:
            info = ctx.model_info(model_id)
            compiled = [str(s) for s in info.compiled_sizes()] if info else []
            if str(size) not in compiled:
                gr.Warning(f"{size} is not compiled for {model_id}; compiled: {', '.join(compiled) or 'none'}")
            updates[target.resolution] = gr.update(choices=compiled, value=str(size))
        else:
            updates[target.width], updates[target.height] = size.width, size.height
    strength = _number(fields.get("Denoising strength"), float)
    if strength is not None and getattr(target, "strength", None) is not None:
        updates[target.strength] = strength
    return updates


def _number(text: Optional[str], kind: type) -> Optional[float]:
    try:
        return kind(float(text)) if text not in (None, "") else None
    except ValueError:
        return None


def _size(text: Optional[str]) -> Optional[Size]:
    try:
        return Size.parse(text) if text else None
    except ValueError:
        return None


def build(ctx: AppContext, tabs: gr.Tabs, model: gr.Dropdown, txt2img: GenerationControls,
          img2img: GenerationControls) -> None:
    with gr.Tab("PNG Info", id=TAB, elem_id=f"tab_{TAB}"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                image = SourceImage(label="Source", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                    elem_id="pnginfo_image", height=420)
            with gr.Column(scale=1):
                text = gr.Textbox(label="parameters", lines=4, max_lines=12, interactive=False,
                                  elem_id="pnginfo_parameters", buttons=["copy"])
                table = gr.HTML(elem_id="pnginfo_table")
                with gr.Row():
                    to_txt2img = gr.Button("Send to txt2img", elem_id="pnginfo_send_txt2img")
                    to_img2img = gr.Button("Send to img2img", elem_id="pnginfo_send_img2img")

    def show(path: Optional[str]) -> tuple[str, str]:
        """The A1111 parameters of a PNG and the same as a table."""
        parameters = read_png_parameters(path)
        return parameters, (parameters_table(parameters) if path else "")

    image.change(show, inputs=image, outputs=[text, table], api_name="png_info", concurrency_limit=None)

    t2i_outputs = _outputs(txt2img, model, tabs)
    i2i_outputs = _outputs(img2img, model, tabs) + [img2img.init_image]

    def send_txt2img(parameters: str, current_model: Optional[str]) -> dict[Any, Any]:
        if not parameters:
            raise gr.Error("this image carries no generation parameters", print_exception=False)
        return {**send_updates(ctx, parameters, txt2img, model, current_model), tabs: gr.Tabs(selected="txt2img")}

    def send_img2img(parameters: str, current_model: Optional[str], path: Optional[str]) -> dict[Any, Any]:
        updates = send_updates(ctx, parameters, img2img, model, current_model) if parameters else {}
        if path is None:
            raise gr.Error("drop an image first", print_exception=False)
        return {**updates, img2img.init_image: path, tabs: gr.Tabs(selected="img2img")}

    to_txt2img.click(send_txt2img, inputs=[text, model], outputs=t2i_outputs, api_visibility="private",
                     concurrency_limit=None)
    to_img2img.click(send_img2img, inputs=[text, model, image], outputs=i2i_outputs, api_visibility="private",
                     concurrency_limit=None)


def _outputs(target: GenerationControls, model: gr.Dropdown, tabs: gr.Tabs) -> list[Any]:
    controls = [target.prompt, target.negative_prompt, target.sampler, target.steps, target.cfg_scale, target.seed,
                target.resolution, target.width, target.height, model, tabs]
    strength = getattr(target, "strength", None)
    return controls + ([strength] if strength is not None else [])
