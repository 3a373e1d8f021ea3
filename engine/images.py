"""Fitting an init image to the compiled size, the three ways A1111 offers."""
from __future__ import annotations

from PIL import Image, ImageFilter

from .errors import InvalidRequest
from .types import RESIZE_MODES, Size


def fit_image(image: Image.Image, size: Size, mode: str = "just resize") -> Image.Image:
    """``just resize`` stretches; ``crop and resize`` fills and crops the center;
    ``resize and fill`` fits inside and fills the margins with a blurred stretch of the image."""
    if mode not in RESIZE_MODES:
        raise InvalidRequest(f"unknown resize mode {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
    image = image.convert("RGB")
    target = (size.width, size.height)
    if mode == "just resize" or image.size == target:
        return image.resize(target, Image.LANCZOS)
    scale_cover = max(size.width / image.width, size.height / image.height)
    scale_fit = min(size.width / image.width, size.height / image.height)
    if mode == "crop and resize":
        return _centered(image, scale_cover, size)
    background = image.resize(target, Image.LANCZOS).filter(ImageFilter.GaussianBlur(radius=max(target) / 32))
    fitted = image.resize((max(1, round(image.width * scale_fit)), max(1, round(image.height * scale_fit))), Image.LANCZOS)
    background.paste(fitted, ((size.width - fitted.width) // 2, (size.height - fitted.height) // 2))
    return background


def _centered(image: Image.Image, scale: float, size: Size) -> Image.Image:
    resized = image.resize((max(size.width, round(image.width * scale)), max(size.height, round(image.height * scale))), Image.LANCZOS)
    left = (resized.width - size.width) // 2
    top = (resized.height - size.height) // 2
    return resized.crop((left, top, left + size.width, top + size.height))
