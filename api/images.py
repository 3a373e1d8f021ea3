"""Images in and out of JSON: base64 (with or without a ``data:`` URI prefix), optional URLs.

Every failure is a ``FieldError`` naming the request field and saying what is wrong, so a client
sees ``init_images[0]: not a base64 image …`` rather than a stack trace.
"""
from __future__ import annotations

import base64
import binascii
import io
import urllib.request
from typing import Optional

from PIL import Image

from engine import InvalidRequest
from engine.images import decode_image, read_image

MAX_URL_BYTES = 32 * 2**20
URL_TIMEOUT_S = 20


class FieldError(ValueError):
    """A request field holds a value the server cannot use; answered 422 with ``field`` as its loc."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def decode_base64(text: str, field: str) -> bytes:
    """The bytes of a base64 string, ``data:image/png;base64,`` prefix allowed."""
    if not isinstance(text, str) or not text.strip():
        raise FieldError(field, "expected a base64-encoded image, found an empty value")
    payload = text.split(",", 1)[1] if text.lstrip().startswith("data:") and "," in text else text
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise FieldError(field, "not valid base64; send the image file's bytes base64-encoded "
                                "(optionally prefixed with data:image/png;base64,)") from None


def open_image(data: bytes, field: str, as_rgb: bool = False) -> Image.Image:
    """Decode image bytes fully with the engine's checks (a truncated file or a decompression bomb
    fails here, not later on the device worker); ``as_rgb``: as the model will see it (upright,
    transparency on white, 8-bit RGB), else as stored, metadata kept."""
    try:
        return read_image(data) if as_rgb else decode_image(data)
    except InvalidRequest as exc:
        raise FieldError(field, str(exc)) from None


def fetch_url(url: str, field: str) -> bytes:
    """GET an http(s) URL (used only with ``--allow-image-urls``), at most ``MAX_URL_BYTES``."""
    try:
        with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:  # noqa: S310 - scheme checked by caller
            data = response.read(MAX_URL_BYTES + 1)
    except (OSError, ValueError) as exc:
        raise FieldError(field, f"could not download {url}: {exc}", status=400) from None
    if len(data) > MAX_URL_BYTES:
        raise FieldError(field, f"{url} is larger than {MAX_URL_BYTES // 2**20} MiB", status=400)
    return data


def is_url(text: Optional[str]) -> bool:
    return isinstance(text, str) and text.strip().lower().startswith(("http://", "https://"))


def image_from_field(text: str, field: str, allow_urls: bool = False) -> Image.Image:
    """A request's init image, as the model sees it: base64, or a URL when ``allow_urls`` (else a 400
    saying how to enable it)."""
    if is_url(text):
        if not allow_urls:
            raise FieldError(field, "image URLs are not fetched by this server; send the image base64-encoded, "
                                    "or start the server with --allow-image-urls", status=400)
        return open_image(fetch_url(text.strip(), field), field, as_rgb=True)
    return open_image(decode_base64(text, field), field, as_rgb=True)
