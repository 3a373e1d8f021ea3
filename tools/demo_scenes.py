"""Procedural "shapes" data set used to train the shipped demo model.

Every image is a 64x64 RGB picture of one flat-colored shape (circle, square
or triangle) on a flat background of a different color, with a caption such as
``"a small red circle on a blue background"``.  Everything is seeded and pure
numpy, so the same seed always gives the same scenes, pixels and captions.

The shape geometry lives in :func:`shape_mask` (normalized coordinates), which
is shared by the renderer and by the evaluator in :mod:`tools.scene_eval`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

IMAGE_SIZE = 64
"""Side of the rendered square images, in pixels."""

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (40, 170, 60),
    "blue": (35, 70, 225),
    "yellow": (245, 220, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (150, 45, 175),
    "cyan": (30, 210, 220),
}
"""Color name -> RGB.  The closest pair (blue/purple) is 128 RGB units apart."""

COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")

SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (10.0, 13.0), "large": (18.0, 23.0)}
"""Size name -> (min, max) half-extent of the shape's bounding box, in pixels."""

JITTER = 4.0
"""Maximum offset in pixels of a shape's center from the image center, along each axis."""

SUPERSAMPLE = 4
"""Samples per pixel along each axis when rasterizing (anti-aliasing)."""

TEMPLATE_WORDS: tuple[str, ...] = ("a", "on", "background", "shape")
VOCABULARY: tuple[str, ...] = TEMPLATE_WORDS + SIZES + COLORS + SHAPES
"""Every word that can appear in a caption."""


@dataclass(frozen=True)
class Scene:
    """A fully specified scene: colors, shape, size class and exact geometry."""

    fg: str
    bg: str
    shape: str
    size: str
    cx: float = IMAGE_SIZE / 2
    cy: float = IMAGE_SIZE / 2
    radius: float | None = None  # half-extent in pixels; None = middle of the size range

    @property
    def half_extent(self) -> float:
        """Half the side of the shape's (square) bounding box, in pixels."""
        if self.radius is not None:
            return self.radius
        low, high = SIZE_RADIUS[self.size]
        return (low + high) / 2

    @property
    def spec(self) -> SceneSpec:
        """The scene's attributes as a fully specified :class:`SceneSpec`."""
        return SceneSpec(fg=self.fg, bg=self.bg, shape=self.shape, size=self.size)


@dataclass(frozen=True)
class SceneSpec:
    """A partial scene, as asked for by a caption; ``None`` means "any"."""

    fg: str | None = None
    bg: str | None = None
    shape: str | None = None
    size: str | None = None


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test for ``shape`` in normalized coordinates.

    ``u`` (x) and ``v`` (y, pointing down) are in [-1, 1] over the shape's
    bounding box.  The triangle is upright: apex at the top middle, base along
    the bottom edge, so it fills half of its bounding box.
    """
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "square":
        return (np.abs(u) <= 1.0) & (np.abs(v) <= 1.0)
    if shape == "triangle":
        return (np.abs(u) <= (v + 1.0) / 2.0) & (v <= 1.0)
    raise ValueError(f"unknown shape {shape!r}")


def coverage(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased fraction (0..1) of each pixel covered by the scene's shape."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / SUPERSAMPLE
    r = scene.half_extent
    u = (coords[None, :] - scene.cx) / r
    v = (coords[:, None] - scene.cy) / r
    inside = shape_mask(scene.shape, u, v).astype(np.float32)
    return inside.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))


def render(scene: Scene) -> Image.Image:
    """Rasterize ``scene`` into a 64x64 RGB image (deterministic)."""
    alpha = coverage(scene)[..., None]
    fg = np.asarray(PALETTE[scene.fg], dtype=np.float32)
    bg = np.asarray(PALETTE[scene.bg], dtype=np.float32)
    pixels = bg * (1.0 - alpha) + fg * alpha
    return Image.fromarray(np.round(pixels).astype(np.uint8), mode="RGB")


def caption(
    scene: Scene | SceneSpec,
    *,
    with_size: bool = True,
    with_fg: bool = True,
    with_bg: bool = True,
) -> str:
    """Caption of a scene, e.g. ``"a small red circle on a blue background"``.

    The ``with_*`` switches drop the size word, the foreground color or the
    background clause; fields that are ``None`` in a :class:`SceneSpec` are
    always left out; a missing shape is written as the generic word "shape".
    """
    words = ["a"]
    if with_size and scene.size:
        words.append(scene.size)
    if with_fg and scene.fg:
        words.append(scene.fg)
    words.append(scene.shape or "shape")
    if with_bg and scene.bg:
        words += ["on", "a", scene.bg, "background"]
    return " ".join(words)


def random_caption(
    scene: Scene,
    rng: np.random.Generator,
    p_size: float = 0.5,
    p_fg: float = 0.9,
    p_bg: float = 0.9,
    p_shape: float = 0.9,
) -> str:
    """Caption with each optional part kept with the given probability (for training)."""
    keep = rng.random(4) < np.array([p_size, p_fg, p_bg, p_shape])
    if not keep[3]:
        scene = replace(scene.spec, shape=None)
    return caption(scene, with_size=bool(keep[0]), with_fg=bool(keep[1]), with_bg=bool(keep[2]))


def parse_caption(text: str) -> SceneSpec:
    """What a prompt asks for: the attributes it names (others are ``None``).

    A color word followed by ``background`` is the background color; any other
    color word is the foreground color.  Unknown words are ignored.
    """
    words = re.findall(r"[a-z]+", text.lower())
    found: dict[str, str] = {}
    for i, word in enumerate(words):
        if word in PALETTE:
            is_bg = i + 1 < len(words) and words[i + 1] == "background"
            found.setdefault("bg" if is_bg else "fg", word)
        elif word in SHAPES:
            found.setdefault("shape", word)
        elif word in SIZES:
            found.setdefault("size", word)
    return SceneSpec(**found)


def random_scene(rng: np.random.Generator) -> Scene:
    """Draw one scene: distinct fg/bg colors, random shape and size, jittered size and position."""
    fg, bg = rng.choice(len(COLORS), size=2, replace=False)
    size = SIZES[rng.integers(len(SIZES))]
    radius = float(rng.uniform(*SIZE_RADIUS[size]))
    cx, cy = (IMAGE_SIZE / 2 + float(d) for d in rng.uniform(-JITTER, JITTER, size=2))
    return Scene(
        fg=COLORS[fg],
        bg=COLORS[bg],
        shape=SHAPES[rng.integers(len(SHAPES))],
        size=size,
        cx=cx,
        cy=cy,
        radius=radius,
    )


def sample_scenes(n: int, seed: int = 0) -> list[Scene]:
    """``n`` reproducible random scenes for ``seed``."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng) for _ in range(n)]


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """Render scenes into a float32 array of shape (n, 3, H, W) scaled to [-1, 1]."""
    pixels = np.stack([np.asarray(render(s), dtype=np.float32) for s in scenes])
    return pixels.transpose(0, 3, 1, 2) / 127.5 - 1.0
