"""Resize modes on an input where they really differ: 200x100, a red band on the left, green elsewhere."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from engine import GenerateRequest, InvalidRequest, Size
from engine.images import fit_image

RED, GREEN = (255, 0, 0), (0, 255, 0)
SQUARE = Size(64, 64)


def banded() -> Image.Image:
    image = Image.new("RGB", (200, 100), GREEN)
    image.paste(RED, (0, 0, 40, 100))  # the left fifth
    return image


def px(image: Image.Image, x: int, y: int) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)[y, x]


def near(pixel: np.ndarray, colour: tuple[int, int, int], tolerance: int = 12) -> bool:
    return bool(np.abs(pixel - np.array(colour)).max() <= tolerance)


def test_just_resize_stretches_the_whole_image():
    out = fit_image(banded(), SQUARE, "just resize")
    assert out.size == (64, 64)
    # the band is the left fifth: 12.8 of 64 columns, top to bottom
    assert near(px(out, 5, 0), RED) and near(px(out, 5, 63), RED) and near(px(out, 20, 32), GREEN)


def test_crop_and_resize_keeps_the_centre_and_loses_the_band():
    out = fit_image(banded(), SQUARE, "crop and resize")
    # scaled to 128x64, then the middle 64 columns: original x 50..150, all green
    assert all(near(px(out, x, y), GREEN) for x in (0, 32, 63) for y in (0, 32, 63))


def test_resize_and_fill_fits_inside_and_fills_the_margins():
    out = fit_image(banded(), SQUARE, "resize and fill")
    # the whole image, 64x32, sits in rows 16..47: band and all
    assert near(px(out, 5, 32), RED) and near(px(out, 40, 32), GREEN)
    middle = np.asarray(out, dtype=np.int16)[16:48]
    expected = np.asarray(banded().resize((64, 32), Image.LANCZOS), dtype=np.int16)
    assert np.abs(middle - expected).max() <= 1
    # the margins are a blurred stretch of the image, not a flat colour: reddish left, green right
    top = np.asarray(out, dtype=np.int16)[2]
    assert top[2][0] > top[2][1] and near(top[60], GREEN, 40)


def test_the_three_modes_give_three_different_inputs_and_images(cpu_engine):
    inputs = {mode: np.asarray(fit_image(banded(), SQUARE, mode), dtype=np.int16)
              for mode in ("just resize", "crop and resize", "resize and fill")}
    outputs = {mode: np.asarray(cpu_engine.generate(GenerateRequest(
        prompt="x", init_image=banded(), strength=0.3, steps=4, resize_mode=mode, seed=3)).images[0].image,
        dtype=np.int16) for mode in inputs}
    modes = list(inputs)
    for i, a in enumerate(modes):
        for b in modes[i + 1:]:
            assert np.abs(inputs[a] - inputs[b]).max() > 50, (a, b)  # fill vs stretch differ at the band edge
            assert np.abs(outputs[a] - outputs[b]).max() > 0, (a, b)


def test_an_unknown_mode_is_refused_by_name():
    with pytest.raises(InvalidRequest, match="unknown resize mode 'stretch'; choose one of: just resize"):
        fit_image(banded(), SQUARE, "stretch")
