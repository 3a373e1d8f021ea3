"""Pixel-statistics evaluator for images of the demo "shapes" scenes.

:func:`classify` guesses what an image shows:

* background color: median of the border pixels, snapped to the nearest palette color;
* foreground mask: pixels far from that background color, largest connected blob;
* foreground color: median of the (eroded) blob, nearest palette color other than the background;
* shape: "triangle" when the top half of the blob's bounding box holds clearly less than half
  of the blob (an upright triangle puts 25% there, circles and squares 50%; this survives blur),
  otherwise the circle or square template, fitted to the bounding box, with the better IoU;
* size: the blob's bounding-box extent (small shapes are 20-26 px wide, large ones 36-46 px).

:func:`score` compares guesses with what prompts asked for (see
:func:`tools.demo_scenes.parse_caption`) and returns accuracies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from tools.demo_scenes import PALETTE, parse_caption, shape_mask

BORDER = 2
"""Width in pixels of the border ring used to estimate the background."""

FG_DISTANCE = 64.0
"""RGB distance from the background above which a pixel is foreground (half the closest palette pair)."""

MIN_BLOB_PIXELS = 6
"""Blobs smaller than this are treated as "no foreground"."""

LARGE_EXTENT = 31
"""Bounding-box side (pixels, at 64x64) from which a shape counts as large."""

TRIANGLE_TOP_FRACTION = 0.375
"""Top-half share of the blob below which it is a triangle (triangle 0.25, circle/square 0.5)."""

ATTRIBUTES: tuple[str, ...] = ("fg", "bg", "shape", "size")

_NAMES = tuple(PALETTE)
_RGB = np.asarray([PALETTE[name] for name in _NAMES], dtype=np.float32)


@dataclass(frozen=True)
class SceneGuess:
    """What :func:`classify` sees in an image; ``None`` when no foreground was found."""

    fg: str | None
    bg: str
    shape: str | None
    size: str | None = None


def nearest_color(rgb: np.ndarray, exclude: str | None = None) -> str:
    """Name of the palette color nearest to ``rgb``, optionally skipping one name."""
    distances = np.linalg.norm(_RGB - np.asarray(rgb, dtype=np.float32), axis=1)
    if exclude is not None:
        distances[_NAMES.index(exclude)] = np.inf
    return _NAMES[int(np.argmin(distances))]


def to_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An image as a float32 (H, W, 3) RGB array in 0..255."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    return np.asarray(image, dtype=np.float32)[..., :3]


def border_pixels(pixels: np.ndarray, width: int = BORDER) -> np.ndarray:
    """The (N, 3) pixels of the ring of ``width`` pixels along the image border."""
    ring = np.ones(pixels.shape[:2], dtype=bool)
    ring[width:-width, width:-width] = False
    return pixels[ring]


def foreground_mask(pixels: np.ndarray, bg_rgb: np.ndarray) -> np.ndarray:
    """Largest connected blob of pixels farther than :data:`FG_DISTANCE` from ``bg_rgb``."""
    far = np.linalg.norm(pixels - bg_rgb, axis=-1) > FG_DISTANCE
    labels, count = ndimage.label(far)
    if count == 0:
        return far
    sizes = ndimage.sum(far, labels, index=np.arange(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a non-empty mask, with exclusive x1/y1."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def template(shape: str, box: tuple[int, int, int, int]) -> np.ndarray:
    """Mask of ``shape`` filling ``box``, sampled at pixel centers, over the box's pixels."""
    x0, y0, x1, y1 = box
    u = (np.arange(x0, x1) + 0.5 - (x0 + x1) / 2) / ((x1 - x0) / 2)
    v = (np.arange(y0, y1) + 0.5 - (y0 + y1) / 2) / ((y1 - y0) / 2)
    return shape_mask(shape, u[None, :], v[:, None])


def top_fraction(mask: np.ndarray) -> float:
    """Fraction of the blob's pixels that lie in the top half of its bounding box."""
    x0, y0, x1, y1 = bounding_box(mask)
    crop = mask[y0:y1, x0:x1].astype(np.float32)
    rows = np.arange(y1 - y0) + 0.5
    return float(crop[rows < (y1 - y0) / 2].sum() / crop.sum())


def template_iou(mask: np.ndarray, shape: str) -> float:
    """IoU of the blob with ``shape`` fitted to the blob's bounding box."""
    box = bounding_box(mask)
    x0, y0, x1, y1 = box
    crop, tmpl = mask[y0:y1, x0:x1], template(shape, box)
    return float((tmpl & crop).sum() / max((tmpl | crop).sum(), 1))


def classify_shape(mask: np.ndarray) -> str:
    """Triangle if the blob is top-light, else the better-fitting of circle and square."""
    if top_fraction(mask) < TRIANGLE_TOP_FRACTION:
        return "triangle"
    return max(("circle", "square"), key=lambda shape: template_iou(mask, shape))


def classify_size(mask: np.ndarray) -> str:
    """``"large"`` when the blob's bounding box is at least :data:`LARGE_EXTENT` wide or tall (at 64x64)."""
    x0, y0, x1, y1 = bounding_box(mask)
    extent = max(x1 - x0, y1 - y0) * 64 / max(mask.shape)
    return "large" if extent >= LARGE_EXTENT else "small"


def foreground_color(pixels: np.ndarray, mask: np.ndarray, bg: str) -> str:
    """Nearest palette color (other than ``bg``) to the median of the blob's inner pixels."""
    inner = ndimage.binary_erosion(mask)
    region = inner if inner.sum() >= MIN_BLOB_PIXELS else mask
    return nearest_color(np.median(pixels[region], axis=0), exclude=bg)


def classify(image: Image.Image | np.ndarray) -> SceneGuess:
    """Guess background color, foreground color, shape and size of a scene image."""
    pixels = to_array(image)
    bg = nearest_color(np.median(border_pixels(pixels), axis=0))
    mask = foreground_mask(pixels, _RGB[_NAMES.index(bg)])
    if mask.sum() < MIN_BLOB_PIXELS:
        return SceneGuess(fg=None, bg=bg, shape=None, size=None)
    return SceneGuess(
        fg=foreground_color(pixels, mask, bg),
        bg=bg,
        shape=classify_shape(mask),
        size=classify_size(mask),
    )


def score(
    prompts: Sequence[str], images: Sequence[Image.Image | np.ndarray]
) -> dict[str, float]:
    """Accuracy per attribute over the prompts that name it, plus ``"all"``.

    ``"all"`` is the fraction of images where every attribute the prompt names
    was recognized.  Attributes no prompt names are left out of the result.
    """
    if len(prompts) != len(images):
        raise ValueError("prompts and images differ in length")
    hits = {attr: [] for attr in ATTRIBUTES}
    all_ok = []
    for prompt, image in zip(prompts, images):
        spec, guess = parse_caption(prompt), classify(image)
        checks = {
            attr: getattr(guess, attr) == getattr(spec, attr)
            for attr in ATTRIBUTES
            if getattr(spec, attr) is not None
        }
        for attr, ok in checks.items():
            hits[attr].append(ok)
        all_ok.append(all(checks.values()))
    result = {attr: float(np.mean(oks)) for attr, oks in hits.items() if oks}
    result["all"] = float(np.mean(all_ok)) if all_ok else float("nan")
    return result
