"""Init images: reading an uploaded file safely, turning any image mode into the RGB the model
sees, and fitting it to the generation size the three ways A1111 offers.

Every face (UI upload, API base64, SageMaker) reads files with ``read_image``, so a file that is not
an image, is cut short or would decode to gigabytes is refused with the same ``InvalidRequest``
naming what is wrong, before anything reaches a device worker.
"""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from .errors import InvalidRequest
from .types import RESIZE_MODES, Size

MAX_PIXELS = 4096 * 4096  # an input larger than this is refused before its pixels are decoded
BACKGROUND = (255, 255, 255)  # transparent pixels become white, A1111's default img2img background
FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"
_ORIENTATION = 0x0112  # the EXIF tag cameras use for "rotate this for display"


def read_image(data: bytes) -> Image.Image:
    """Decode an image file's bytes into the RGB image the model will start from (``to_rgb``).

    Raises ``InvalidRequest`` saying what is wrong: empty, not an image, truncated, more than
    ``MAX_PIXELS`` pixels (checked from the header, before decoding), or metadata too large."""
    return to_rgb(decode_image(data))


def decode_image(data: bytes) -> Image.Image:
    """Decode the first frame of an image file as stored (mode, metadata and EXIF kept)."""
    if not data:
        raise InvalidRequest(f"the image file is empty (0 bytes); upload a {FORMATS} image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            check_pixels(image.width, image.height)
            image.load()
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow refuses these from the header, before a size we could check is returned
        found = re.search(r"\((\d+) pixels\)", str(exc))
        pixels = f"{int(found.group(1)):,}" if found else "too many"
        raise InvalidRequest(f"the image has {pixels} pixels, more than can be decoded safely; at most "
                             f"{MAX_PIXELS:,} (4096x4096) are accepted: downscale it first") from None
    except UnidentifiedImageError:
        kind = _looks_like(data)
        if kind:
            raise InvalidRequest(f"the {kind} file is truncated or damaged (it starts like a {kind}, then cannot be "
                                 "read); upload the complete file") from None
        raise InvalidRequest(f"the file is not a readable image ({len(data):,} bytes that are not {FORMATS}); "
                             f"upload a {FORMATS} image") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's decoders raise many types for damaged files
        raise InvalidRequest(_damaged(exc)) from None
    return image


_SIGNATURES = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"BM", "BMP"),
               (b"II*\0", "TIFF"), (b"MM\0*", "TIFF"))


def _looks_like(data: bytes) -> str:
    """The format whose signature ``data`` starts with ('' for none): a cut file still has one."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if data.startswith(magic)), "")


def _damaged(exc: Exception) -> str:
    text = str(exc)
    if "truncated" in text.lower():
        return "the image file is truncated (it ends before its pixels do); upload the complete file"
    if "MAX_TEXT_CHUNK" in text or "too much memory" in text.lower():
        return "the image's metadata (a text chunk) is too large to read safely; re-save the image without it"
    return f"the file is not a readable image, or it is damaged ({type(exc).__name__}: {text}); upload a {FORMATS} image"


def check_pixels(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise InvalidRequest(f"the image is {width}x{height} ({width * height:,} pixels); at most {MAX_PIXELS:,} "
                             "(4096x4096) are accepted: downscale it first")
    if width < 1 or height < 1:
        raise InvalidRequest(f"the image is {width}x{height}: it has no pixels")


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as photo viewers show it, in 8-bit RGB: EXIF rotation applied, transparency on
    white, 16-bit and float pixels scaled to 8 bits (a plain ``convert`` would clip them to white)."""
    try:
        if image.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose copies even an upright image
            image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a malformed EXIF block: keep the image as stored
        pass
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return Image.fromarray(_to_8bit(np.asarray(image)), "L").convert("RGB")
    if "A" in image.mode or "a" in image.mode or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _to_8bit(pixels: np.ndarray) -> np.ndarray:
    """16-bit integers (0..65535) or floats (0..1, else taken as 0..255) as 0..255."""
    values = pixels.astype(np.float64)
    if pixels.dtype.kind == "f":
        values = np.nan_to_num(values) * (255.0 if values.max(initial=0) <= 1.0 else 1.0)
    elif values.max(initial=0) > 255:
        values = values / 257.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def fit_image(image: Image.Image, size: Size, mode: str = "just resize") -> Image.Image:
    """``just resize`` stretches; ``crop and resize`` fills and crops the center;
    ``resize and fill`` fits inside and fills the margins with a blurred stretch of the image."""
    if mode not in RESIZE_MODES:
        raise InvalidRequest(f"unknown resize mode {mode!r}; choose one of: {', '.join(RESIZE_MODES)}")
    image = to_rgb(image)
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
