"""The shipped demo model through the real engine: it follows prompts, on every sampler and path.

The demo model (models/demo-shapes) draws simple procedural scenes; tools/scene_eval.py reads the
colors and shape back from the pixels, which makes the whole stack (registry -> cpu compile ->
warm pool -> samplers -> PNG) checkable against what each prompt asked for.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

from engine import Engine, EngineSettings, GenerateRequest, Size
from engine.backends import make_backend
from engine.compile import compile_all
from engine.registry import DEFAULT_REGISTRY, Registry, load_registry
from engine.samplers import sampler_names

DEMO = "demo-shapes"
# Point at a freshly trained candidate (tools/train_demo_model.py --out DIR) to test it before shipping.
CANDIDATE = os.environ.get("DEMO_MODEL_DIR")
pytestmark = pytest.mark.skipif(
    not CANDIDATE and not (DEFAULT_REGISTRY.parent / "models" / DEMO / "model_index.json").is_file(),
    reason="models/demo-shapes is not in this checkout")


def demo_only_registry(artifacts_dir: Path, source_dir: Path | None = None) -> Registry:
    """The shipped registry's demo entry alone, compiling into ``artifacts_dir``."""
    registry = load_registry(DEFAULT_REGISTRY)
    spec = dataclasses.replace(registry.get(DEMO), resolutions=(Size(64, 64),))  # the size it was trained at
    if source_dir is not None:
        spec = dataclasses.replace(spec, source=dataclasses.replace(spec.source, ref=str(source_dir)))
    return dataclasses.replace(registry, artifacts_dir=artifacts_dir, models=(spec,), default_model=DEMO)


@pytest.fixture(scope="module")
def demo_registry(tmp_path_factory) -> Registry:
    registry = demo_only_registry(tmp_path_factory.mktemp("demo-artifacts"), Path(CANDIDATE) if CANDIDATE else None)
    outcomes = compile_all(registry, make_backend("cpu"), log=lambda line: None)
    assert [o.state for o in outcomes] == ["compiled"]
    return registry


@pytest.fixture(scope="module")
def demo_engine(demo_registry) -> Engine:
    return Engine(demo_registry, make_backend("cpu"), EngineSettings(max_warm=1))


def generate_all(engine: Engine, prompts: list[str], **kwargs) -> list:
    """Image i of prompt i with seed i, one request per prompt."""
    return [engine.generate(GenerateRequest(prompt=p, seed=i, **kwargs)).images[0].image for i, p in enumerate(prompts)]


def test_follows_prompts_with_default_sampler(demo_engine):
    from tools.eval_demo_model import eval_prompts
    from tools.scene_eval import score

    prompts = eval_prompts(36)
    accuracy = score(prompts, generate_all(demo_engine, prompts))
    assert accuracy["fg"] >= 0.90, accuracy
    assert accuracy["bg"] >= 0.90, accuracy
    assert accuracy["shape"] >= 0.75, accuracy


# PLMS extrapolates the model's noise predictions from earlier steps; this small model's predictions
# are too rough for that (see the model card).
PLMS_LIMITATION = pytest.mark.xfail(reason="PLMS does not work with the tiny demo model (see its model card)",
                                    strict=True)


@pytest.mark.parametrize("sampler", [pytest.param(name, marks=PLMS_LIMITATION) if name == "PLMS"
                                     else name for name in sampler_names()])
def test_every_sampler_gets_the_colors_right(demo_engine, sampler):
    from tools.eval_demo_model import eval_prompts
    from tools.scene_eval import score

    prompts = eval_prompts(30)
    accuracy = score(prompts, generate_all(demo_engine, prompts, sampler=sampler))
    assert min(accuracy["fg"], accuracy["bg"]) >= 0.80, accuracy


def _img2img_red_circle_to_blue(engine: Engine, strength: float):
    from tools.demo_scenes import Scene, render
    from tools.scene_eval import classify

    red_circle = render(Scene(shape="circle", fg="red", bg="white", size="large"))
    request = GenerateRequest(prompt="a blue circle on a white background", init_image=red_circle, strength=strength, seed=1)
    return classify(engine.generate(request).images[0].image)


def test_img2img_strong_denoising_follows_the_prompt(demo_engine):
    guess = _img2img_red_circle_to_blue(demo_engine, 0.8)
    assert (guess.fg, guess.shape) == ("blue", "circle")


def test_img2img_weak_denoising_keeps_the_input(demo_engine):
    guess = _img2img_red_circle_to_blue(demo_engine, 0.1)
    assert (guess.fg, guess.shape) == ("red", "circle")


def test_cpu_backend_equals_eager_backend(demo_engine, demo_registry):
    eager = Engine(demo_registry, make_backend("eager"))
    request = GenerateRequest(prompt="a small yellow square on a black background", seed=3)
    traced = np.asarray(demo_engine.generate(request).images[0].image, dtype=np.int16)
    plain = np.asarray(eager.generate(request).images[0].image, dtype=np.int16)
    assert np.abs(traced - plain).max() <= 1


def test_negative_prompt_steers_away(demo_engine):
    from tools.scene_eval import classify

    def red_rate(negative: str) -> float:
        images = [demo_engine.generate(GenerateRequest(prompt="a circle on a blue background", negative_prompt=negative,
                                                       seed=seed)).images[0].image for seed in range(10)]
        return sum(classify(image).fg == "red" for image in images) / len(images)

    assert red_rate("red") < red_rate("")
