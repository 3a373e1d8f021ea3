"""Few-step models at CFG <= 1: no unconditional half, so the UNet runs one row per request — a
graph of its own on fixed-shape backends (``cfg_free_unet``), one NeuronCore on Neuron."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from engine import GenerateRequest, Size

SEED, STEPS = 5, 4


def registry_file(directory: Path, tiny_dir: Path, **entry) -> Path:
    model = {"id": "turbo", "family": "sd15", "source": {"local": str(tiny_dir / "tiny-sd15")},
             "resolutions": ["64x64"], "defaults": {"sampler": "Euler a SGM Uniform", "steps": 1, "cfg_scale": 0},
             **entry}
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "model_registry.yaml"
    path.write_text(yaml.safe_dump({"artifacts_dir": "artifacts", "default_model": "turbo", "models": [model]}))
    return path


@pytest.mark.parametrize("entry, expected", [
    ({}, True),  # default CFG 0: a few-step model
    ({"defaults": {"cfg_scale": 7}}, False),
    ({"defaults": {"cfg_scale": 7}, "cfg_free_unet": True}, True),
    ({"cfg_free_unet": False}, False),
])
def test_cfg_free_unet_defaults_to_models_whose_default_cfg_is_at_most_1(tiny_dir, tmp_path, entry, expected):
    from engine.registry import load_registry

    assert load_registry(registry_file(tmp_path, tiny_dir, **entry)).get("turbo").cfg_free_unet is expected


def test_cfg_free_unet_must_be_a_boolean(tiny_dir, tmp_path):
    from engine import RegistryError
    from engine.registry import load_registry

    with pytest.raises(RegistryError, match="cfg_free_unet.*true or false"):
        load_registry(registry_file(tmp_path, tiny_dir, cfg_free_unet="yes"))


@pytest.mark.parametrize("batch_sizes, unets", [
    ([1], ["unet", "unet_nocfg"]),
    ([1, 2], ["unet", "unet_b2", "unet_nocfg"]),  # 2 requests without CFG: the 2-row graph of unet
    ([1, 3], ["unet", "unet_b3", "unet_nocfg", "unet_b3_nocfg"]),
])
def test_one_cfg_free_unet_per_row_count_no_cfg_graph_has(tiny_dir, tmp_path, batch_sizes, unets):
    from engine.compile import _components
    from engine.families import FAMILIES
    from engine.registry import load_registry

    spec = load_registry(registry_file(tmp_path, tiny_dir, batch_sizes=batch_sizes)).get("turbo")
    assert [c for c in _components(FAMILIES["sd15"], spec) if c.startswith("unet")] == unets


@pytest.fixture(scope="module")
def turbo_engine(tiny_dir, tmp_path_factory):
    from engine import Engine, EngineSettings
    from engine.backends import make_backend
    from engine.compile import compile_all
    from engine.registry import load_registry

    registry = load_registry(registry_file(tmp_path_factory.mktemp("turbo"), tiny_dir))
    assert [o.state for o in compile_all(registry, make_backend("cpu"), log=lambda line: None)] == ["compiled"]
    engine = Engine(registry, make_backend("cpu"), EngineSettings(max_warm=1))
    yield engine
    engine.close()


def unet_rows_called(engine, request: GenerateRequest) -> tuple[np.ndarray, list[int]]:
    """The image, and the row count of every compiled UNet graph call it made."""
    with engine.pool.lease(engine._key(engine.registry.get("turbo"), Size(64, 64))) as warm:
        unet = warm.components["unet"]
    calls: list[int] = []
    originals = {chunks: dict(by_rows) for chunks, by_rows in unet._runners.items()}
    for chunks, by_rows in unet._runners.items():
        for rows, runner in by_rows.items():
            by_rows[rows] = lambda *inputs, runner=runner: calls.append(inputs[0].shape[0]) or runner(*inputs)
    try:
        result = engine.generate(request)
    finally:
        for chunks, by_rows in originals.items():
            unet._runners[chunks].update(by_rows)
    return np.asarray(result.images[0].image, dtype=np.int16), calls


@pytest.mark.parametrize("cfg", [0.0, 1.0])
def test_at_cfg_up_to_1_each_step_runs_the_one_row_graph_and_equals_diffusers(turbo_engine, tiny_dir, cfg):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    image, calls = unet_rows_called(turbo_engine, GenerateRequest(prompt="a red ball", steps=STEPS, cfg_scale=cfg,
                                                                  seed=SEED))
    assert calls == [1] * STEPS
    pipe = StableDiffusionPipeline.from_pretrained(tiny_dir / "tiny-sd15", safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt="a red ball", num_inference_steps=STEPS, guidance_scale=cfg, width=64, height=64,
                    generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    assert np.abs(image - np.asarray(expected, dtype=np.int16)).max() <= 1


def test_above_cfg_1_the_cfg_pair_graph_runs(turbo_engine):
    _, calls = unet_rows_called(turbo_engine, GenerateRequest(prompt="a red ball", steps=STEPS, cfg_scale=3.0,
                                                              seed=SEED))
    assert calls == [2] * STEPS
