"""Inpainting as A1111 does it, on the compiled UNet of any model.

A 4-channel UNet (every txt2img checkpoint) inpaints by latent masking: diffusers' inpaint
pipelines put the noised original back outside the mask after every step. A 9-channel UNet (an SD
inpainting checkpoint) reads the mask and the masked image as extra input channels. Both run at a
compiled size: "whole picture" fits image and mask to the request's size; "only masked" crops the
region around the mask (plus padding, grown to the request's aspect ratio), denoises it at the
request's size and pastes it back into the full-size original.

After decoding, the original is laid back over the result outside the (blurred) mask, so pixels
the mask leaves alone are the input's own (A1111's overlay).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image, ImageFilter, ImageOps
from scipy.ndimage import gaussian_filter

from .errors import InvalidRequest
from .images import fit_image, to_rgb
from .types import INPAINT_FILLS, Inpaint, Size

MAX_MASK_BLUR = 64
MAX_PADDING = 256
LATENT_FILLS = ("latent noise", "latent nothing")
INPAINTING_UNET_CHANNELS = 9


@dataclass(frozen=True)
class InpaintInputs:
    """What one row gives the inpaint pipeline (``image`` and ``mask`` at the compiled size), and
    what the overlay needs afterwards (``original`` and ``overlay_mask`` at the output size)."""

    image: Image.Image  # what the pipeline reads (masked area pre-filled for "fill")
    mask: Image.Image  # "L", white = repaint, blurred
    original: Image.Image  # what the result is laid into
    overlay_mask: Image.Image  # where the result replaces the original (A1111's mask_for_overlay)
    crop: Optional[tuple[int, int, int, int]] = None  # "only masked": the region of the original redrawn


def check_inpaint(inpaint: Inpaint, init_image: Optional[Image.Image]) -> None:
    """Refuse what cannot be inpainted, saying what to send instead."""
    if init_image is None:
        raise InvalidRequest("inpainting needs an init image to paint into: send one with the mask")
    if not isinstance(inpaint.mask, Image.Image):
        raise InvalidRequest(f"the inpaint mask must be an image, got {type(inpaint.mask).__name__}")
    if inpaint.mask.size != init_image.size:
        raise InvalidRequest(f"the mask is {inpaint.mask.width}x{inpaint.mask.height} and the image "
                             f"{init_image.width}x{init_image.height}: they must be the same size")
    if inpaint.fill not in INPAINT_FILLS:
        raise InvalidRequest(f"unknown masked content {inpaint.fill!r}; choose one of: {', '.join(INPAINT_FILLS)}")
    for name, value, high in (("mask blur", inpaint.blur, MAX_MASK_BLUR),
                              ("only-masked padding", inpaint.padding, MAX_PADDING)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high:
            raise InvalidRequest(f"{name} must be a whole number of pixels from 0 to {high}, got {value!r}")
    if not np.asarray(mask_of(inpaint)).any():
        raise InvalidRequest("the mask is empty (all black): paint the area to change in white"
                             + (", or turn off 'invert mask'" if inpaint.invert else ""))


def mask_of(inpaint: Inpaint) -> Image.Image:
    """The mask as one channel, white = repaint (an alpha channel counts: a transparent brush stroke
    on a transparent layer, as Gradio's editor sends it), inverted on request."""
    mask = inpaint.mask
    if mask.mode in ("RGBA", "LA") and mask.getextrema()[-1][0] < 255:
        mask = mask.getchannel("A")
    mask = mask.convert("L")
    return ImageOps.invert(mask) if inpaint.invert else mask


def prepare(init_image: Image.Image, inpaint: Inpaint, size: Size, resize_mode: str) -> InpaintInputs:
    """The image, mask and overlay of one inpaint request, the pipeline's part at the compiled ``size``."""
    mask = mask_of(inpaint)
    image = to_rgb(init_image)
    if inpaint.only_masked:  # the mask's region (grown to the aspect ratio of ``size``) at ``size``
        blurred = blur(mask, inpaint.blur)
        crop = VaeImageProcessor.get_crop_region(blurred, size.width, size.height, pad=inpaint.padding)
        part = image.crop(crop).resize((size.width, size.height), Image.LANCZOS)
        part_mask = blurred.crop(crop).resize((size.width, size.height), Image.LANCZOS)
        return InpaintInputs(_filled(part, part_mask, inpaint), part_mask, image, blurred, crop)
    image = fit_image(image, size, resize_mode)
    mask = blur(fit_image(mask.convert("RGB"), size, resize_mode).convert("L"), inpaint.blur)
    overlay_mask = Image.fromarray(np.clip(np.asarray(mask, dtype=np.float32) * 2, 0, 255).astype(np.uint8))
    return InpaintInputs(_filled(image, mask, inpaint), mask, image, overlay_mask)


def _filled(image: Image.Image, mask: Image.Image, inpaint: Inpaint) -> Image.Image:
    return fill_masked(image, mask) if inpaint.fill == "fill" else image


def blur(mask: Image.Image, radius: int) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius > 0 else mask


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill": the masked area painted with the colours around it (a normalized Gaussian
    blur of the unmasked pixels, coarse to fine), so the model starts from a smooth guess."""
    rgb = np.asarray(image, dtype=np.float64)
    keep = 1.0 - np.asarray(mask, dtype=np.float64) / 255.0
    filled = rgb.copy()
    for sigma in (max(image.size) / 4, 16.0, 4.0, 1.0):
        weight = gaussian_filter(keep, sigma)
        guess = np.stack([gaussian_filter(rgb[..., c] * keep, sigma) for c in range(3)], axis=-1)
        known = weight > 1e-3
        filled[known] = guess[known] / weight[known, None]
    result = rgb * keep[..., None] + filled * (1.0 - keep[..., None])
    return Image.fromarray(np.clip(np.round(result), 0, 255).astype(np.uint8))


def overlay(result: Image.Image, inputs: InpaintInputs) -> Image.Image:
    """``result`` (pasted back into its crop for "only masked") under the original outside the mask."""
    return VaeImageProcessor().apply_overlay(inputs.overlay_mask, inputs.original, result, inputs.crop)


def inpaint_infotext(inpaint: Inpaint) -> dict[str, Any]:
    """A1111's infotext fields for inpainting (the ones it writes; defaults left out as it does)."""
    return {
        "Mask blur": inpaint.blur,
        "Masked content": inpaint.fill,
        "Inpaint area": "Only masked" if inpaint.only_masked else None,
        "Masked area padding": inpaint.padding if inpaint.only_masked else None,
        "Mask mode": "Inpaint not masked" if inpaint.invert else None,
    }


def inpaint_kwargs(rows: list[InpaintInputs], fill: str, size: Size) -> dict[str, Any]:
    """Inpaint pipeline arguments for a call's rows (one image and mask each, at ``size``)."""
    images, masks = [r.image for r in rows], [r.mask for r in rows]
    kwargs: dict[str, Any] = {"image": _one_or_list(images), "mask_image": _one_or_list(masks), "width": size.width,
                              "height": size.height}
    if fill in LATENT_FILLS:
        kwargs["latent_fill"] = (fill, masks)
    return kwargs


def whole_image_kwargs(kwargs: dict[str, Any], size: Size) -> dict[str, Any]:
    """txt2img / img2img arguments turned into inpainting everything, for a 9-channel (inpainting)
    UNet, as A1111 runs such models: a white mask, and for txt2img a grey image at strength 1
    (the masked-image channels then hold what A1111 gives them: an encoded blank)."""
    rows = len(kwargs["prompt"]) if isinstance(kwargs["prompt"], list) else 1
    converted = dict(kwargs)
    if "image" not in converted:
        converted.update(image=Image.new("RGB", (size.width, size.height), (127, 127, 127)), strength=1.0)
    converted.update(mask_image=_one_or_list([Image.new("L", (size.width, size.height), 255)] * rows),
                     width=size.width, height=size.height)
    return converted


def is_inpainting_unet(unet: Any) -> bool:
    """A UNet that reads mask and masked image as 5 extra input channels (SD inpainting checkpoints)."""
    return unet.config["in_channels"] == INPAINTING_UNET_CHANNELS


class LatentFill:
    """A1111's "latent noise" / "latent nothing": the masked area of the encoded original becomes
    noise (from each row's own generator) or zeros before it is noised to the first step.

    Mixed into diffusers' inpaint pipelines (``fill_pipeline``): their ``_encode_vae_image`` encodes
    the init image first, then (9-channel UNets) the masked image, which stays as it is.
    """

    latent_fill: Optional[tuple[str, list[Image.Image]]] = None  # (mode, one mask per row)

    def __call__(self, *args: Any, latent_fill: Optional[tuple[str, list[Image.Image]]] = None, **kwargs: Any) -> Any:
        self.latent_fill = latent_fill
        return super().__call__(*args, **kwargs)  # type: ignore[misc]

    def _encode_vae_image(self, image: torch.Tensor, generator: Any) -> torch.Tensor:
        latents = super()._encode_vae_image(image, generator)  # type: ignore[misc]
        if self.latent_fill is None:
            return latents
        mode, masks = self.latent_fill
        self.latent_fill = None  # the init image only
        keep = torch.stack([latent_keep_mask(mask, latents.shape[-2:]) for mask in masks])[:, None].to(latents.dtype)
        if mode == "latent nothing":
            return latents * keep
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g, dtype=latents.dtype)
                             for g in _generators(generator, latents.shape[0])])
        return latents * keep + noise * (1 - keep)


def latent_keep_mask(mask: Image.Image, latent_hw: Any) -> torch.Tensor:
    """1 where the original is kept, at latent resolution (rounded, as A1111 and diffusers do)."""
    small = mask.resize((int(latent_hw[1]), int(latent_hw[0])), Image.BILINEAR)
    return 1.0 - torch.from_numpy(np.round(np.asarray(small, dtype=np.float32) / 255.0))


def _one_or_list(values: list[Any]) -> Any:
    return values[0] if len(values) == 1 else values  # one row: the pipeline's solo path


def _generators(generator: Any, rows: int) -> list[Any]:
    if isinstance(generator, list):
        return generator
    return [generator] * rows


_FILL_CLASSES: dict[type, type] = {}


def fill_pipeline(pipeline_class: type) -> type:
    """``pipeline_class`` with ``LatentFill`` mixed in (one subclass per diffusers class)."""
    if pipeline_class not in _FILL_CLASSES:
        _FILL_CLASSES[pipeline_class] = type(f"Filled{pipeline_class.__name__}", (LatentFill, pipeline_class), {})
    return _FILL_CLASSES[pipeline_class]


__all__ = ["InpaintInputs", "LatentFill", "check_inpaint", "fill_masked", "fill_pipeline", "inpaint_infotext",
           "inpaint_kwargs",
           "is_inpainting_unet", "latent_keep_mask", "mask_of", "overlay", "prepare", "whole_image_kwargs"]
