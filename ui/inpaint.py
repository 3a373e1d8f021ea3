"""The img2img tab's inpaint sub-tabs (A1111's "Inpaint" with a brush and "Inpaint upload" with a
mask file) and their settings: mask blur, mask mode, masked content, inpaint area and padding —
turned into the image the request starts from and the engine's ``Inpaint``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import gradio as gr
from PIL import Image, ImageChops

from engine import INPAINT_FILLS, Inpaint, InvalidRequest
from engine.images import to_rgb
from engine.inpaint import MAX_MASK_BLUR, MAX_PADDING

from .common import Radio, Slider, whole

IMG2IMG, INPAINT, INPAINT_UPLOAD = "img2img", "Inpaint", "Inpaint upload"
MODES = (IMG2IMG, INPAINT, INPAINT_UPLOAD)
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
AREAS = ("Whole picture", "Only masked")


@dataclass
class InpaintControls:
    mode: gr.State  # the selected sub-tab
    editor: gr.ImageEditor
    upload_image: gr.Image
    upload_mask: gr.Image
    settings: gr.Group
    blur: gr.Slider
    mask_mode: gr.Radio
    fill: gr.Radio
    area: gr.Radio
    padding: gr.Slider

    def inputs(self) -> dict[str, Any]:
        """The handler's keyword arguments these controls feed."""
        return dict(img2img_mode=self.mode, inpaint_editor=self.editor, inpaint_image=self.upload_image,
                    inpaint_mask=self.upload_mask, mask_blur=self.blur, mask_mode=self.mask_mode,
                    masked_content=self.fill, inpaint_area=self.area, masked_padding=self.padding)


@dataclass
class InpaintTabs:
    """The two inpaint sub-tabs and their image inputs."""

    brush: gr.Tab
    upload: gr.Tab
    editor: gr.ImageEditor
    upload_image: gr.Image
    upload_mask: gr.Image


def inpaint_tabs(tab: str) -> InpaintTabs:
    """Lay out the "Inpaint" and "Inpaint upload" sub-tabs (inside the caller's ``gr.Tabs``, after its
    own "img2img" sub-tab)."""
    with gr.Tab(INPAINT, id=f"{tab}_inpaint", elem_id=f"{tab}_inpaint_tab") as brush_tab:
        editor = gr.ImageEditor(label="Image for inpainting with mask", type="pil", height=320,
                                sources=["upload", "clipboard"], elem_id=f"{tab}_inpaint_editor",
                                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=12),
                                transforms=(), layers=False)
    with gr.Tab(INPAINT_UPLOAD, id=f"{tab}_inpaint_upload", elem_id=f"{tab}_inpaint_upload_tab") as upload_tab:
        upload_image = gr.Image(label="Image for inpainting", type="pil", image_mode="RGB", height=220,
                                sources=["upload", "clipboard"], elem_id=f"{tab}_inpaint_image")
        upload_mask = gr.Image(label="Mask (white: repaint)", type="pil", image_mode="RGBA", height=220,
                               sources=["upload", "clipboard"], elem_id=f"{tab}_inpaint_mask")
    return InpaintTabs(brush_tab, upload_tab, editor, upload_image, upload_mask)


def inpaint_settings(tab: str, plain_tab: gr.Tab, tabs: InpaintTabs) -> InpaintControls:
    """The settings group (shown on the inpaint sub-tabs) and the state that follows the sub-tab."""
    mode = gr.State(IMG2IMG)
    with gr.Group(visible=False, elem_id=f"{tab}_inpaint_settings") as settings:
        with gr.Row():
            blur = Slider(0, MAX_MASK_BLUR, step=1, value=Inpaint.blur, label="Mask blur", elem_id=f"{tab}_mask_blur")
            padding = Slider(0, MAX_PADDING, step=4, value=Inpaint.padding, label="Only masked padding, pixels",
                             elem_id=f"{tab}_inpaint_full_res_padding")
        mask_mode = Radio(list(MASK_MODES), value=MASK_MODES[0], label="Mask mode", elem_id=f"{tab}_mask_mode")
        fill = Radio(list(INPAINT_FILLS), value=Inpaint.fill, label="Masked content", elem_id=f"{tab}_inpainting_fill")
        area = Radio(list(AREAS), value=AREAS[0], label="Inpaint area", elem_id=f"{tab}_inpaint_full_res",
                     info="Only masked: the mask's region is redrawn at the generation size and pasted back")
    for sub_tab, name in ((plain_tab, IMG2IMG), (tabs.brush, INPAINT), (tabs.upload, INPAINT_UPLOAD)):
        sub_tab.select(lambda name=name: (name, gr.update(visible=name != IMG2IMG)), outputs=[mode, settings],
                       queue=False, api_visibility="private")
    return InpaintControls(mode, tabs.editor, tabs.upload_image, tabs.upload_mask, settings, blur, mask_mode, fill,
                           area, padding)


def inpaint_input(mode: Any, init_image: Optional[Image.Image], editor: Any, upload_image: Any, upload_mask: Any,
                  blur: Any, mask_mode: Any, fill: Any, area: Any, padding: Any) -> tuple[Any, Optional[Inpaint]]:
    """The image the request starts from and its ``Inpaint`` (None on the plain img2img sub-tab)."""
    if mode not in (INPAINT, INPAINT_UPLOAD):
        return init_image, None
    if mode == INPAINT:
        image, mask = _from_editor(editor)
    else:
        if upload_image is None or upload_mask is None:
            raise InvalidRequest("Inpaint upload needs both an image and a mask: drop them into the two boxes")
        image, mask = upload_image, upload_mask
    return image, Inpaint(mask, blur=whole("mask blur", blur, Inpaint.blur), fill=fill or Inpaint.fill,
                          only_masked=area == AREAS[1], padding=whole("only masked padding", padding, Inpaint.padding),
                          invert=mask_mode == MASK_MODES[1])


def _from_editor(editor: Any) -> tuple[Image.Image, Image.Image]:
    """The editor's background and, as the mask, where any of its layers was painted."""
    background = editor.get("background") if isinstance(editor, dict) else None
    if background is None:
        raise InvalidRequest("Inpaint needs an image: drop one into the editor, then paint the area to change")
    mask = Image.new("L", background.size, 0)
    for layer in editor.get("layers") or ():
        painted = layer.convert("RGBA").getchannel("A")
        mask = ImageChops.lighter(mask, painted.resize(background.size) if painted.size != background.size else painted)
    return to_rgb(background), mask


__all__ = ["IMG2IMG", "INPAINT", "INPAINT_UPLOAD", "InpaintControls", "InpaintTabs", "inpaint_input",
           "inpaint_settings", "inpaint_tabs"]
