"""Fast tests of the procedural demo data set, its evaluator and the shipped tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # so plain `pytest` finds the tools package too
    sys.path.insert(0, str(ROOT))

from tools.demo_scenes import (  # noqa: E402
    COLORS,
    IMAGE_SIZE,
    PALETTE,
    SHAPES,
    SIZES,
    VOCABULARY,
    Scene,
    SceneSpec,
    caption,
    parse_caption,
    random_caption,
    render,
    sample_scenes,
)
from tools.scene_eval import classify, score  # noqa: E402

TOKENIZER_DIR = ROOT / "models" / "demo-shapes" / "tokenizer"


def test_palette_and_vocabulary() -> None:
    assert len(PALETTE) >= 6
    assert set(SHAPES) == {"circle", "square", "triangle"}
    assert set(SIZES) == {"small", "large"}
    assert set(COLORS) | set(SHAPES) | set(SIZES) <= set(VOCABULARY)


def test_sampling_is_reproducible_and_valid() -> None:
    first, second = sample_scenes(50, seed=7), sample_scenes(50, seed=7)
    assert first == second
    assert first != sample_scenes(50, seed=8)
    assert all(scene.fg != scene.bg for scene in first)


def test_rendering_is_deterministic() -> None:
    scene = sample_scenes(1, seed=3)[0]
    image = render(scene)
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(render(scene)))


def test_render_uses_the_scene_colors() -> None:
    scene = Scene(fg="red", bg="blue", shape="square", size="large")
    pixels = np.asarray(render(scene))
    assert tuple(pixels[0, 0]) == PALETTE["blue"]
    assert tuple(pixels[IMAGE_SIZE // 2, IMAGE_SIZE // 2]) == PALETTE["red"]


def test_captions_round_trip() -> None:
    for scene in sample_scenes(100, seed=11):
        assert parse_caption(caption(scene)) == scene.spec
        assert parse_caption(caption(scene, with_size=False)).size is None


def test_random_captions_use_only_vocabulary_words() -> None:
    rng = np.random.default_rng(0)
    for scene in sample_scenes(100, seed=12):
        text = random_caption(scene, rng)
        assert set(text.split()) <= set(VOCABULARY)
        spec = parse_caption(text)
        for attr in ("fg", "bg", "shape", "size"):
            assert getattr(spec, attr) in (None, getattr(scene, attr))


def test_parse_partial_and_noisy_captions() -> None:
    assert parse_caption("a circle on a blue background") == SceneSpec(bg="blue", shape="circle")
    assert parse_caption("A Small RED triangle, on a green background!") == SceneSpec(
        fg="red", bg="green", shape="triangle", size="small"
    )
    assert parse_caption("a dog in space") == SceneSpec()


def test_evaluator_on_ground_truth_scenes() -> None:
    scenes = sample_scenes(200, seed=2024)
    result = score([caption(s) for s in scenes], [render(s) for s in scenes])
    for attr in ("fg", "bg", "shape", "size", "all"):
        assert result[attr] >= 0.99, (attr, result)


def test_evaluator_without_foreground() -> None:
    blank = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3)) + np.asarray(PALETTE["green"])
    guess = classify(blank)
    assert guess.bg == "green" and guess.fg is None and guess.shape is None
    assert score(["a red circle on a green background"], [blank])["fg"] == 0.0


@pytest.mark.skipif(not TOKENIZER_DIR.is_dir(), reason="demo model not built yet")
def test_tokenizer_has_one_token_per_vocabulary_word() -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR)
    assert tokenizer.model_max_length == 77
    for word in VOCABULARY:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, word
        assert tokenizer.convert_ids_to_tokens(ids) == [f"{word}</w>"]
    ids = tokenizer("a zebra on a blue background", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
