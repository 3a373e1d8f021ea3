"""Frozen value types that cross the engine's public boundary."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # pragma: no cover - typing only
    from PIL import Image

_SIZE_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")

RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")
# A1111's "masked content" choices, in the order of its API's ``inpainting_fill`` (0-3)
INPAINT_FILLS = ("fill", "original", "latent noise", "latent nothing")


@dataclass(frozen=True, order=True)
class Size:
    """An image size in pixels, written ``WxH`` (width first, as A1111 does)."""

    width: int
    height: int

    @classmethod
    def parse(cls, text: "str | Size") -> "Size":
        """Parse ``"512x768"``; raises ``ValueError`` with the expected form otherwise."""
        if isinstance(text, Size):
            return text
        match = _SIZE_RE.match(str(text))
        if not match:
            raise ValueError(f"expected a size written WIDTHxHEIGHT such as 512x512, found {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class VariantKey:
    """One warm pipeline: a model at one size (``size`` is None on the any-size eager backend)."""

    model: str
    size: Optional[Size]

    def __str__(self) -> str:
        return f"{self.model}@{self.size or 'any'}"


@dataclass(frozen=True)
class ReplicaKey:
    """One warm copy of a variant: the pool may hold several (``index`` 0, 1, ...) on disjoint cores."""

    variant: VariantKey
    index: int = 0

    @property
    def model(self) -> str:
        return self.variant.model

    @property
    def size(self) -> Optional[Size]:
        return self.variant.size

    def __str__(self) -> str:
        return str(self.variant) if self.index == 0 else f"{self.variant} (replica {self.index + 1})"


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix for txt2img: make the image at the request's size, upscale it ``scale``
    times (or to ``size``) with ``upscaler``, then denoise it again there as img2img with ``strength``
    for ``steps`` (None: the request's steps). Fixed-shape backends need both sizes compiled."""

    scale: float = 2.0
    upscaler: str = "Latent"
    steps: Optional[int] = None
    strength: float = 0.7
    size: Optional[Size] = None


@dataclass(frozen=True)
class Inpaint:
    """A1111's inpaint settings for an img2img request: repaint where ``mask`` is white (or, with
    ``invert``, black), blurred by ``blur`` pixels; ``fill``: what the masked area starts from
    (``INPAINT_FILLS``); ``only_masked``: redraw only the mask's region (plus ``padding`` pixels) at
    the request's size and paste it back into the full-size original."""

    mask: "Image.Image"
    blur: int = 4
    fill: str = "original"
    only_masked: bool = False
    padding: int = 32
    invert: bool = False


@dataclass(frozen=True)
class GenerateRequest:
    """Everything one generation needs. ``None`` fields take the model's registry defaults.

    ``seed=-1`` draws a random seed; image ``i`` of the request uses ``seed + i``.
    ``init_image`` turns the request into img2img with ``strength`` (denoising strength).
    """

    model: Optional[str] = None
    prompt: str = ""
    negative_prompt: str = ""
    sampler: Optional[str] = None
    steps: Optional[int] = None
    cfg_scale: Optional[float] = None
    seed: int = -1
    size: Optional[Size] = None
    num_images: int = 1
    init_image: Optional["Image.Image"] = None
    strength: float = 0.75
    resize_mode: str = "just resize"
    hires: Optional[HiresFix] = None  # txt2img only
    inpaint: Optional[Inpaint] = None  # img2img only: repaint the masked area

    @property
    def mode(self) -> str:
        if self.init_image is None:
            return "txt2img"
        return "inpaint" if self.inpaint is not None else "img2img"


@dataclass(frozen=True)
class Progress:
    """A step boundary of a running request (reported through ``on_progress``)."""

    step: int
    total_steps: int
    image_index: int
    num_images: int
    elapsed_s: float
    it_per_s: float
    preview: Optional["Image.Image"] = None
    batch: int = 1  # requests sharing this device call (1: alone)
    images_in_call: int = 1  # this request's images made together, from ``image_index`` on

    @property
    def fraction(self) -> float:
        done = self.image_index * self.total_steps + self.step * self.images_in_call
        return done / max(1, self.total_steps * self.num_images)


@dataclass(frozen=True)
class GeneratedImage:
    """One output image, its seed, its A1111 ``parameters`` text and the PNG bytes carrying it."""

    image: "Image.Image"
    seed: int
    infotext: str
    png: bytes = field(repr=False)


@dataclass(frozen=True)
class GenerateResult:
    """The images of a request plus what it took to make them."""

    request: GenerateRequest
    model: str
    size: Size
    sampler: str
    steps: int
    cfg_scale: float
    seed: int
    images: tuple[GeneratedImage, ...]
    timings: dict[str, float]
    notices: tuple[str, ...] = ()  # things the user should know, e.g. the words a too-long prompt lost

    @property
    def batch_requests(self) -> int:
        """How many requests shared the device calls that made these images (1: ran alone)."""
        return int(self.timings.get("batch_requests", 1))

    @property
    def it_per_s(self) -> float:
        denoise = self.timings.get("denoise_s", 0.0)
        return self.timings.get("steps_run", 0.0) / denoise if denoise > 0 else 0.0
