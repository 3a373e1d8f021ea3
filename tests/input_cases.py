"""The input table: what a user (or a script) may send, and what every face must answer.

Each case changes a few fields of a cheap valid request (tiny-sd15, 64x64, 2 steps, Euler, seed 5)
and says what must come back at each level — the engine (``Engine.generate``), the HTTP API
(``/sdapi/v1``) and the UI (``gradio_client`` against the launched app):

- ``IMAGE``: images of the right size (and, with ``needle``, a notice containing it: the words a
  too-long prompt lost);
- ``REFUSED``: a refusal whose message contains ``needle`` (case-insensitive) — an engine error, a
  4xx, a ``gr.Error`` — never a traceback, a 5xx or Gradio's generic "could not preprocess".

Fields use the table's own words (``prompt``, ``negative_prompt``, ``model``, ``sampler``, ``steps``,
``cfg_scale``, ``seed``, ``size`` as ``WxH`` text, ``batch``, ``strength``, ``resize_mode``, ``image``
naming a fixture of ``IMAGES``); ``test_input_table.py`` turns them into each level's request.
``expect`` and ``needle`` may be a mapping per level where the faces honestly differ (an API client
can send NaN, a browser cannot). ``looks`` gives pixels of the init image as the model sees it
(fitted to 64x64), checked at engine level: a correct image, not just an image.

The image fixtures are built in code; no binary file is committed. docs/reliability-inputs.md
shows this table as the user sees it.
"""
from __future__ import annotations

import html
import io
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Union

import numpy as np
from PIL import Image

IMAGE, REFUSED = "image", "refused"
LEVELS = ("engine", "api", "ui")
BASE = {"model": "tiny-sd15", "size": "64x64", "steps": 2, "sampler": "Euler", "seed": 5, "cfg_scale": 7.0}

PerLevel = Union[str, Mapping[str, str]]
RED, BLUE, WHITE, GRAY = (255, 0, 0), (0, 0, 255), (255, 255, 255), (128, 128, 128)


@dataclass(frozen=True)
class Case:
    id: str
    change: Mapping[str, Any]
    expect: PerLevel
    needle: PerLevel = ""
    size: str = "64x64"  # the size of the images an IMAGE case returns
    levels: tuple[str, ...] = LEVELS
    looks: Mapping[tuple[int, int], tuple[int, int, int]] = field(default_factory=dict)
    why: str = ""  # what the user sees, for docs/reliability-inputs.md when the needle does not say it

    @property
    def mode(self) -> str:
        return "img2img" if {"image", "image_text"} & set(self.change) else "txt2img"

    def at(self, level: str) -> tuple[str, str]:
        """(expectation, needle) at ``level``."""
        pick = lambda value: value.get(level, "") if isinstance(value, Mapping) else value  # noqa: E731
        return pick(self.expect), pick(self.needle)


# --- image fixtures: (file bytes, file name suffix) ----------------------------------------------

def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _noise(width: int, height: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header(width: int, height: int, depth: int = 8, color: int = 2) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))


def huge_header_png(side: int = 20000) -> bytes:
    """A valid PNG header claiming side x side pixels with almost no data (never decoded)."""
    return _png_header(side, side) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def bomb_png() -> bytes:
    """A real decompression bomb: 10000x10000 1-bit pixels (100 million) in a ~12 KB file."""
    return encode(Image.new("1", (10000, 10000)), "PNG")


def rgb16_png(width: int = 16, height: int = 16) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG, written by hand: Pillow cannot write one."""
    row = b"\0" + struct.pack(">HHH", 65535, 0, 0) * width  # filter byte, then red pixels
    return (_png_header(width, height, depth=16, color=2) + _chunk(b"IDAT", zlib.compress(row * height))
            + _chunk(b"IEND", b""))


def gray16_png() -> bytes:
    """A 16-bit grayscale PNG at mid gray (32896/65535 = 128/255)."""
    return encode(Image.fromarray(np.full((16, 16), 32896, dtype=np.uint16)), "PNG")


def float_tiff() -> bytes:
    """A 32-bit float TIFF in 0..1 (scientific and HDR tools write these)."""
    return encode(Image.fromarray(np.full((16, 16), 0.5, dtype=np.float32), mode="F"), "TIFF")


def exif_rotated_jpeg() -> bytes:
    """80x48 stored, left half red and right half blue, EXIF orientation 6: shown rotated 90° clockwise
    (48x80, red on top), as every photo viewer and A1111 show it."""
    array = np.zeros((48, 80, 3), dtype=np.uint8)
    array[:, :40] = RED
    array[:, 40:] = BLUE
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 32), color) for color in (RED, (0, 255, 0), BLUE)]
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)


def transparent_png() -> bytes:
    """Red where opaque, fully transparent (black underneath) in the lower half."""
    image = Image.new("RGBA", (32, 32), (*RED, 255))
    image.paste((0, 0, 0, 0), (0, 16, 32, 32))
    return encode(image, "PNG")


def palette_png(transparent: bool = False) -> bytes:
    image = Image.new("RGB", (32, 32), RED).quantize(colors=4)
    return encode(image, "PNG", **({"transparency": 0} if transparent else {}))


def text_bomb_png() -> bytes:
    """A small valid PNG carrying a zTXt chunk that inflates to 64 MB (a metadata bomb)."""
    plain = encode(Image.new("RGB", (16, 16), RED), "PNG")
    bomb = _chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * (64 << 20), 9))
    return plain[:-12] + bomb + plain[-12:]  # before IEND


def _with_text(png: bytes) -> bytes:
    """``png`` with an A1111 ``parameters`` text chunk after its header (as our outputs have)."""
    return png[:33] + _chunk(b"tEXt", b"parameters\0a cat, Steps: 20") + png[33:]


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


IMAGES: dict[str, Callable[[], tuple[bytes, str]]] = {
    "png": lambda: (encode(Image.new("RGB", (80, 48), RED), "PNG"), ".png"),
    "not-an-image": lambda: (b"hello, this is a text file and not an image\n", ".png"),
    "html-as-png": lambda: (b"<!doctype html><html><body>404 Not Found</body></html>", ".png"),
    "svg": lambda: (b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64" '
                    b'fill="red"/></svg>', ".svg"),
    "zero-byte": lambda: (b"", ".png"),
    "png-header-only": lambda: (encode(Image.new("RGB", (64, 64)), "PNG")[:60], ".png"),
    "png-cut-in-text-chunk": lambda: (_with_text(encode(Image.new("RGB", (64, 64)), "PNG"))[:60], ".png"),
    "jpeg-cut-after-signature": lambda: (encode(Image.new("RGB", (64, 64)), "JPEG")[:20], ".jpg"),
    "truncated-png": lambda: (_truncated(encode(_noise(64, 64), "PNG")), ".png"),
    "truncated-jpeg": lambda: (_truncated(encode(_noise(64, 64), "JPEG", quality=90)), ".jpg"),
    "1x1": lambda: (encode(Image.new("RGB", (1, 1), RED), "PNG"), ".png"),
    "7x3": lambda: (encode(Image.new("RGB", (7, 3), RED), "PNG"), ".png"),
    "panorama-4000x2": lambda: (encode(Image.new("RGB", (4000, 2), RED), "PNG"), ".png"),
    "4096x4096": lambda: (encode(Image.new("RGB", (4096, 4096), RED), "PNG"), ".png"),
    "4097x4096": lambda: (encode(Image.new("L", (4097, 4096)), "PNG"), ".png"),
    "20000x20000-header": lambda: (huge_header_png(), ".png"),
    "decompression-bomb": lambda: (bomb_png(), ".png"),
    "text-chunk-bomb": lambda: (text_bomb_png(), ".png"),
    "animated-gif": lambda: (animated("GIF"), ".gif"),
    "animated-webp": lambda: (animated("WEBP"), ".webp"),
    "webp": lambda: (encode(Image.new("RGB", (48, 48), RED), "WEBP", lossless=True), ".webp"),
    "cmyk-jpeg": lambda: (encode(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), "JPEG", quality=95), ".jpg"),
    "gray16-png": lambda: (gray16_png(), ".png"),
    "rgb16-png": lambda: (rgb16_png(), ".png"),
    "float-tiff": lambda: (float_tiff(), ".tif"),
    "palette-png": lambda: (palette_png(), ".png"),
    "palette-transparent-png": lambda: (palette_png(transparent=True), ".png"),
    "rgba-png": lambda: (transparent_png(), ".png"),
    "gray-alpha-png": lambda: (encode(Image.new("LA", (32, 32), (128, 255)), "PNG"), ".png"),
    "1bit-png": lambda: (encode(Image.new("1", (32, 32), 1), "PNG"), ".png"),
    "grayscale-jpeg": lambda: (encode(Image.new("L", (32, 32), 128), "JPEG", quality=95), ".jpg"),
    "exif-rotated-jpeg": lambda: (exif_rotated_jpeg(), ".jpg"),
    "bmp": lambda: (encode(Image.new("RGB", (32, 32), RED), "BMP"), ".bmp"),
    "multipage-tiff": lambda: (animated("TIFF"), ".tif"),
}


def image_bytes(name: str) -> tuple[bytes, str]:
    return IMAGES[name]()


# --- the table -----------------------------------------------------------------------------------

_WORDS = " ".join(f"word{i}" for i in range(40))
_UNREADABLE = "not a readable image"
_TOO_LARGE = "downscale it first"
_CENTER = (32, 32)
_TEXT_ONLY_IN_UI = {"engine": REFUSED, "api": REFUSED, "ui": IMAGE}

CASES: tuple[Case, ...] = (
    # prompts: every text is generated from; what the model cannot read is said, never dropped silently
    Case("prompt-empty", {"prompt": ""}, IMAGE, why="generates, as A1111 does"),
    Case("prompt-whitespace", {"prompt": " \n\t "}, IMAGE),
    Case("prompt-100k-characters", {"prompt": "a cat " * 16667}, IMAGE, "more characters",
         why="the notice quotes the first 300 dropped characters and counts the rest"),
    Case("prompt-over-77-tokens", {"prompt": _WORDS}, IMAGE, "these words were ignored"),
    # A1111 prompt syntax: weights, BREAK, brackets
    Case("prompt-weight-not-a-number", {"prompt": "a (red:1.2.3) ball"}, REFUSED, "is not a number"),
    Case("prompt-weight-huge", {"prompt": "a (red:1e30) ball"}, IMAGE),
    Case("prompt-brackets-unbalanced", {"prompt": "((a red [ball"}, IMAGE),
    Case("prompt-break-only", {"prompt": "BREAK BREAK"}, IMAGE),
    Case("prompt-nine-breaks", {"prompt": " BREAK ".join(["ball"] * 9)}, IMAGE, "these words were ignored"),
    Case("negative-prompt-over-77-tokens", {"negative_prompt": _WORDS}, IMAGE, "the negative prompt is"),
    Case("prompt-unicode", {"prompt": "ein Kätzchen, 一只小猫, кошка, ΓΑΤΑ"}, IMAGE),
    Case("prompt-rtl", {"prompt": "قطة على السطح \u202eright-to-left override\u202c שלום"}, IMAGE),
    Case("prompt-emoji", {"prompt": "🐱🚀 a cat astronaut 👩🏽‍🚀🏳️‍🌈"}, IMAGE),
    Case("prompt-control-characters", {"prompt": "a\x00b\x07c\x1b[31mred\x7f\x08\x0c d"}, IMAGE),
    Case("prompt-zero-width-and-bom", {"prompt": "\ufeffa\u200bcat\u200d\u2060"}, IMAGE),
    Case("prompt-newlines-like-infotext", {"prompt": "a cat\nNegative prompt: dog\nSteps: 99, Seed: 1, Size: 8x8"},
         IMAGE),
    Case("prompt-a1111-syntax", {"prompt": "(cat:1.3), [dog], BREAK, {a|b}"}, IMAGE),
    Case("prompt-lora-not-fused", {"prompt": "a cat <lora:nothing:1>"}, REFUSED, "no model has a LoRA named 'nothing'"),
    Case("prompt-lone-surrogate", {"prompt": "a cat \ud800"}, REFUSED, "U+D800", levels=("engine", "api"),
         why="gradio_client cannot encode it; a browser's would reach the engine's check"),
    Case("prompt-not-text", {"prompt": 12345}, _TEXT_ONLY_IN_UI, {"engine": "prompt", "api": "prompt"},
         why="the UI's text box sends the digits as text"),
    Case("prompt-null", {"prompt": None}, _TEXT_ONLY_IN_UI, {"engine": "prompt", "api": "prompt"},
         why="the UI's empty text box is an empty prompt"),
    # steps
    Case("steps-0", {"steps": 0}, REFUSED, "steps"),
    Case("steps-negative", {"steps": -3}, REFUSED, "steps"),
    Case("steps-151", {"steps": 151}, REFUSED, "steps"),
    Case("steps-huge", {"steps": 10**20}, REFUSED, "steps"),
    Case("steps-fraction", {"steps": 2.5}, REFUSED, "steps"),
    Case("steps-text", {"steps": "many"}, REFUSED, "steps"),
    Case("steps-nan", {"steps": float("nan")}, REFUSED, "steps", levels=("engine", "api")),
    Case("steps-1", {"steps": 1}, IMAGE),
    # CFG
    Case("cfg-0", {"cfg_scale": 0}, IMAGE),  # few-step models: no unconditional half
    Case("cfg-negative", {"cfg_scale": -7}, REFUSED, "cfg"),
    Case("cfg-31", {"cfg_scale": 31}, REFUSED, "cfg"),
    Case("cfg-nan", {"cfg_scale": float("nan")}, REFUSED, "cfg", levels=("engine", "api")),
    Case("cfg-inf", {"cfg_scale": float("inf")}, REFUSED, "cfg", levels=("engine", "api")),
    Case("cfg-minus-inf", {"cfg_scale": float("-inf")}, REFUSED, "cfg", levels=("engine", "api")),
    Case("cfg-text", {"cfg_scale": "high"}, REFUSED, "cfg"),
    Case("cfg-1-and-fraction", {"cfg_scale": 1.25}, IMAGE),
    # seeds
    Case("seed-random", {"seed": -1}, IMAGE),
    Case("seed-max", {"seed": 2**32 - 1}, IMAGE),
    Case("seed-negative", {"seed": -5}, REFUSED, "seed"),
    Case("seed-2**32", {"seed": 2**32}, REFUSED, "seed"),
    Case("seed-fraction", {"seed": 1.5}, REFUSED, "seed"),
    Case("seed-nan", {"seed": float("nan")}, REFUSED, "seed", levels=("engine", "api")),
    Case("seed-text", {"seed": "lucky"}, REFUSED, "seed"),
    # batch
    Case("batch-0", {"batch": 0}, REFUSED, {"engine": "number of images", "api": "batch_size", "ui": "batch count"}),
    Case("batch-17", {"batch": 17}, REFUSED, {"engine": "number of images", "api": "batch_size", "ui": "batch count"}),
    Case("batch-fraction", {"batch": 2.5}, REFUSED,
         {"engine": "number of images", "api": "batch_size", "ui": "batch count"}),
    Case("batch-2", {"batch": 2}, IMAGE),
    # sizes
    Case("size-not-multiple-of-8", {"size": "65x64"}, REFUSED, "multiples of 8"),
    Case("size-zero", {"size": "0x0"}, REFUSED, {"engine": "multiples of 8", "api": "width", "ui": "multiples of 8"}),
    Case("size-uncompiled", {"size": "128x128"}, REFUSED, "128x128 is not compiled for tiny-sd15; compiled: 64x64, 64x96"),
    Case("size-transposed-uncompiled", {"size": "96x64"}, REFUSED, "96x64 is not compiled"),
    Case("size-over-2048", {"size": "4096x4096"}, REFUSED, {"engine": "4096x4096 is not compiled", "api": "width",
                                                            "ui": "4096x4096 is not compiled"}),
    Case("size-compiled-portrait", {"size": "64x96"}, IMAGE, size="64x96"),
    Case("size-text", {"size": "huge"}, REFUSED, "expected a size written WIDTHxHEIGHT", levels=("ui",)),
    Case("size-unicode-times", {"size": "64×64"}, IMAGE, levels=("ui",)),
    # model and sampler
    Case("model-unknown", {"model": "no-such-model"}, REFUSED, "no-such-model"),
    Case("model-path-traversal", {"model": "../../etc/passwd"}, REFUSED, "../../etc/passwd"),
    Case("model-default", {"model": None}, IMAGE),
    Case("sampler-unknown", {"sampler": "Bogus"}, REFUSED, "bogus"),
    Case("sampler-default", {"sampler": None}, IMAGE),
    Case("sampler-not-text", {"sampler": ["Euler"]}, REFUSED, "sampler", levels=("engine", "api")),
    # img2img: denoising strength and resize mode
    Case("denoise-negative", {"image": "png", "strength": -0.1}, REFUSED, "denoising"),
    Case("denoise-1.5", {"image": "png", "strength": 1.5}, REFUSED, "denoising"),
    Case("denoise-nan", {"image": "png", "strength": float("nan")}, REFUSED, "denoising", levels=("engine", "api")),
    Case("denoise-0", {"image": "png", "strength": 0}, REFUSED, "denoising strength 0"),
    Case("denoise-1", {"image": "png", "strength": 1.0}, IMAGE),
    Case("resize-mode-unknown", {"image": "png", "resize_mode": "stretch"}, REFUSED,
         {"engine": "unknown resize mode", "api": "resize_mode", "ui": "resize mode"}),
    Case("img2img-portrait", {"image": "png", "size": "64x96", "resize_mode": "crop and resize"}, IMAGE, size="64x96"),
    # img2img: images that are not, or barely, images
    Case("image-missing", {"image": None}, REFUSED, {"api": "init_images", "ui": "needs an input image"},
         levels=("api", "ui")),
    Case("image-not-an-image", {"image": "not-an-image"}, REFUSED, _UNREADABLE),
    Case("image-html-named-png", {"image": "html-as-png"}, REFUSED, _UNREADABLE),
    Case("image-svg", {"image": "svg"}, REFUSED, _UNREADABLE),
    Case("image-zero-byte", {"image": "zero-byte"}, REFUSED, "empty"),
    Case("image-png-header-only", {"image": "png-header-only"}, REFUSED, "truncated"),
    Case("image-truncated-png", {"image": "truncated-png"}, REFUSED, "truncated"),
    Case("image-png-cut-in-text-chunk", {"image": "png-cut-in-text-chunk"}, REFUSED, "truncated"),
    Case("image-jpeg-cut-after-signature", {"image": "jpeg-cut-after-signature"}, REFUSED, "truncated"),
    Case("image-truncated-jpeg", {"image": "truncated-jpeg"}, REFUSED, "truncated"),
    Case("image-20000x20000-header", {"image": "20000x20000-header"}, REFUSED, _TOO_LARGE),
    Case("image-decompression-bomb", {"image": "decompression-bomb"}, REFUSED, _TOO_LARGE),
    Case("image-4097x4096", {"image": "4097x4096"}, REFUSED, "4097x4096"),
    Case("image-text-chunk-bomb", {"image": "text-chunk-bomb"}, REFUSED, "metadata"),
    # img2img: every image a camera, a browser or an editor writes gives a correct image
    Case("image-1x1", {"image": "1x1"}, IMAGE, looks={_CENTER: RED}),
    Case("image-1x1-resize-and-fill", {"image": "1x1", "resize_mode": "resize and fill"}, IMAGE),
    Case("image-7x3-crop", {"image": "7x3", "resize_mode": "crop and resize"}, IMAGE),
    Case("image-panorama-4000x2-crop", {"image": "panorama-4000x2", "resize_mode": "crop and resize"}, IMAGE),
    Case("image-4096x4096", {"image": "4096x4096"}, IMAGE, looks={_CENTER: RED}),
    Case("image-animated-gif", {"image": "animated-gif"}, IMAGE, looks={_CENTER: RED}, why="its first frame"),
    Case("image-animated-webp", {"image": "animated-webp"}, IMAGE, looks={_CENTER: RED}, why="its first frame"),
    Case("image-webp", {"image": "webp"}, IMAGE, looks={_CENTER: RED}),
    Case("image-cmyk-jpeg", {"image": "cmyk-jpeg"}, IMAGE, looks={_CENTER: RED}),
    Case("image-16bit-gray-png", {"image": "gray16-png"}, IMAGE, looks={_CENTER: GRAY}),
    Case("image-16bit-rgb-png", {"image": "rgb16-png"}, IMAGE, looks={_CENTER: RED}),
    Case("image-float-tiff", {"image": "float-tiff"}, IMAGE, looks={_CENTER: GRAY}),
    Case("image-palette", {"image": "palette-png"}, IMAGE, looks={_CENTER: RED}),
    Case("image-palette-transparent", {"image": "palette-transparent-png"}, IMAGE),
    Case("image-alpha", {"image": "rgba-png"}, IMAGE, looks={(32, 8): RED, (32, 56): WHITE},
         why="transparent pixels become white (A1111's default background)"),
    Case("image-gray-alpha", {"image": "gray-alpha-png"}, IMAGE, looks={_CENTER: GRAY}),
    Case("image-1bit", {"image": "1bit-png"}, IMAGE, looks={_CENTER: WHITE}),
    Case("image-grayscale-jpeg", {"image": "grayscale-jpeg"}, IMAGE, looks={_CENTER: GRAY}),
    Case("image-exif-rotated", {"image": "exif-rotated-jpeg"}, IMAGE, looks={(32, 6): RED, (32, 58): BLUE},
         why="upright, as photo viewers show it"),
    Case("image-bmp", {"image": "bmp"}, IMAGE, looks={_CENTER: RED}),
    Case("image-multipage-tiff", {"image": "multipage-tiff"}, IMAGE, looks={_CENTER: RED}, why="its first page"),
    # HTTP only: how the image travels
    Case("image-not-base64", {"image_text": "not base64 at all!"}, REFUSED, "not valid base64", levels=("api",)),
    Case("image-empty-string", {"image_text": ""}, REFUSED, "empty", levels=("api",)),
    Case("image-url-not-allowed", {"image_text": "http://169.254.169.254/latest/meta-data"}, REFUSED,
         "--allow-image-urls", levels=("api",)),
    Case("image-data-uri", {"image": "png", "data_uri": True}, IMAGE, levels=("api",)),
    # HTTP only: fields the API accepts and does not use, holding numbers JSON does not have
    Case("unknown-field-nan", {"extra": {"my_extension": float("nan")}}, IMAGE, "ignored fields", levels=("api",)),
    Case("override-setting-infinity", {"extra": {"override_settings": {"sd_model_checkpoint": "tiny-sd15",
                                                                         "eta_noise_seed_delta": float("inf")}}},
         IMAGE, "ignored override_settings", levels=("api",)),
)

assert len({case.id for case in CASES}) == len(CASES), "case ids must be unique"


def cases_at(level: str) -> list[Case]:
    return [case for case in CASES if level in case.levels]


# --- docs/reliability-inputs.md from a run: pytest tests/test_input_table.py --junitxml=run.xml --------

def markdown(junit_xml: str) -> str:
    """The table as the user sees it, from what ``test_input_table.py`` recorded at each level."""
    import xml.etree.ElementTree as ElementTree

    seen: dict[tuple[str, str], str] = {}
    for test in ElementTree.parse(junit_xml).iter("testcase"):
        found = re.fullmatch(r"test_(engine|http_api|ui)\[(.+)\]", test.get("name", ""))
        if found:
            props = {p.get("name"): p.get("value", "") for p in test.iter("property")}
            seen[(found.group(2), found.group(1).replace("http_", ""))] = _cell(props)
    rows = ["| Case | Request | Engine | HTTP API (`/sdapi/v1`) | UI (`gradio_client`) |", "|---|---|---|---|---|"]
    for case in CASES:
        cells = [seen.get((case.id, level), "—" if level not in case.levels else "not run") for level in LEVELS]
        request = _request(case) + (f" ({case.why})" if case.why else "")
        rows.append("| " + " | ".join(_md(text) for text in (case.id, request, *cells)) + " |")
    return "\n".join(rows) + "\n"


def _request(case: Case) -> str:
    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 48 else f"{text[:40]}… ({len(str(value)):,} chars)"
    return ", ".join(f"{key}={short(value)}" for key, value in case.change.items()) or "the base request"


def _cell(props: Mapping[str, str]) -> str:
    if "refused" in props:
        status = f"{props['status']}: " if "status" in props else ""
        return "refused — " + status + _message(props["refused"])
    images = props.get("images", "")
    count_size, _, notices = images.partition("; ")
    notice = notices.split("⚠️", 1)[1] if "⚠️" in notices else ("" if "it/s" in notices else notices)
    return f"images {count_size}" + (f" + notice: {_message(notice)}" if notice.strip() else "")


def _message(text: str) -> str:
    """A refusal without its JSON wrapping and test paths, cut to a readable length."""
    try:
        detail = json.loads(text)["detail"]
        text = detail if isinstance(detail, str) else "; ".join(
            ".".join(str(part) for part in error["loc"][1:]) + ": " * (len(error["loc"]) > 1) + error["msg"]
            for error in detail)
    except (ValueError, KeyError, TypeError):
        pass
    text = re.sub(r"/\S*/(model_registry\.yaml)", r"\1", html.unescape(text.strip()))
    return text if len(text) <= 480 else text[:477] + "…"


def _md(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split())


if __name__ == "__main__":
    import sys

    sys.stdout.write(markdown(sys.argv[1]))
