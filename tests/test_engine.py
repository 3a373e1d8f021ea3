"""The Engine end to end on tiny models: registry -> compiled cpu artifacts -> generate -> PNG."""
from __future__ import annotations

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from engine import (ArtifactMismatch, ArtifactMissing, Cancelled, GenerateRequest, InvalidRequest, Size,
                    UnknownModel, UnknownSampler, UnsupportedResolution)
from engine.infotext import parse_infotext, read_parameters
from engine.samplers import sampler_names

FAMILY_MODELS = ["tiny-sd15", "tiny-sd21", "tiny-sdxl"]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def red_square() -> Image.Image:
    image = Image.new("RGB", (80, 80), (0, 0, 255))
    image.paste((255, 0, 0), (20, 20, 60, 60))
    return image


@pytest.mark.parametrize("model", FAMILY_MODELS)
def test_txt2img_png_carries_a1111_parameters(cpu_engine, model):
    result = cpu_engine.generate(GenerateRequest(model=model, prompt="a red circle", negative_prompt="blue",
                                                 seed=7, steps=3, cfg_scale=6.5, num_images=2))
    assert [im.seed for im in result.images] == [7, 8]
    for generated in result.images:
        png = Image.open(io.BytesIO(generated.png))
        assert png.format == "PNG" and png.size == (64, 64)
        params = parse_infotext(read_parameters(png))
        assert params["Prompt"] == "a red circle" and params["Negative prompt"] == "blue"
        assert params["Steps"] == "3" and params["CFG scale"] == "6.5" and params["Model"] == model
        assert params["Seed"] == str(generated.seed) and params["Size"] == "64x64"
    assert result.timings["total_s"] > 0 and result.it_per_s > 0


@pytest.mark.parametrize("model", FAMILY_MODELS)
@pytest.mark.parametrize("img2img", [False, True], ids=["txt2img", "img2img"])
def test_traced_output_equals_eager_output(cpu_engine, eager_engine, model, img2img):
    extra = {"init_image": red_square(), "strength": 0.6} if img2img else {}
    request = GenerateRequest(model=model, prompt="a small square", seed=123, steps=3, **extra)
    traced = cpu_engine.generate(request).images[0].image
    eager = eager_engine.generate(request).images[0].image
    assert np.abs(pixels(traced) - pixels(eager)).max() <= 1


def test_image_i_is_plain_diffusers_with_seed_plus_i(cpu_engine, compiled_registry):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    spec = compiled_registry.get("tiny-sd15")
    result = cpu_engine.generate(GenerateRequest(model="tiny-sd15", prompt="a cat", seed=40, steps=3, num_images=2))
    pipe = StableDiffusionPipeline.from_pretrained(spec.source.ref, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for index, generated in enumerate(result.images):
        expected = pipe("a cat", num_inference_steps=3, guidance_scale=7.0, height=64, width=64,
                        generator=torch.Generator("cpu").manual_seed(40 + index)).images[0]
        assert np.abs(pixels(generated.image) - pixels(expected)).max() <= 1


def test_single_file_checkpoint_matches_its_diffusers_directory(cpu_engine):
    request = dict(prompt="a cat", seed=9, steps=3)
    from_file = cpu_engine.generate(GenerateRequest(model="tiny-sd15-file", **request)).images[0].image
    from_dir = cpu_engine.generate(GenerateRequest(model="tiny-sd15", **request)).images[0].image
    assert np.abs(pixels(from_file) - pixels(from_dir)).max() <= 1


def test_same_seed_same_image_other_seed_other_image(cpu_engine):
    make = lambda seed: pixels(cpu_engine.generate(GenerateRequest(prompt="a dog", seed=seed, steps=3)).images[0].image)
    assert np.array_equal(make(5), make(5))
    assert not np.array_equal(make(5), make(6))


def test_random_seed_is_reported(cpu_engine):
    result = cpu_engine.generate(GenerateRequest(prompt="a dog", seed=-1, steps=2))
    assert 0 <= result.seed < 2**32 and result.images[0].seed == result.seed


@pytest.mark.parametrize("sampler", sampler_names())
def test_every_sampler_runs(cpu_engine, sampler):
    result = cpu_engine.generate(GenerateRequest(prompt="a tree", sampler=sampler, steps=3, seed=1))
    image = pixels(result.images[0].image)
    assert image.shape == (64, 64, 3) and image.std() > 0
    assert parse_infotext(result.images[0].infotext)["Sampler"] == sampler


def test_non_square_compiled_size(cpu_engine):
    result = cpu_engine.generate(GenerateRequest(prompt="tall", size=Size(64, 96), steps=2, seed=1))
    assert result.images[0].image.size == (64, 96)


@pytest.mark.parametrize("mode", ["just resize", "crop and resize", "resize and fill"])
def test_img2img_resize_modes_reach_compiled_size(cpu_engine, mode):
    init = Image.new("RGB", (200, 100), (0, 255, 0))
    result = cpu_engine.generate(GenerateRequest(prompt="x", init_image=init, strength=0.5, steps=4,
                                                 resize_mode=mode, seed=3))
    assert result.images[0].image.size == (64, 64)
    assert "Denoising strength: 0.5" in result.images[0].infotext


def test_uncompiled_resolution_lists_compiled_sizes_and_command(cpu_engine):
    with pytest.raises(UnsupportedResolution) as info:
        cpu_engine.generate(GenerateRequest(model="tiny-sdxl", prompt="x", size=Size(128, 128)))
    message = str(info.value)
    assert "128x128 is not compiled for tiny-sdxl" in message and "compiled: 64x64" in message
    assert "compile_all.py" in message and "--models tiny-sdxl --resolutions 128x128" in message


@pytest.mark.parametrize("request_kwargs, error", [
    ({"model": "nope"}, UnknownModel),
    ({"sampler": "Euler z"}, UnknownSampler),
    ({"steps": 0}, InvalidRequest),
    ({"steps": 151}, InvalidRequest),
    ({"cfg_scale": 31}, InvalidRequest),
    ({"num_images": 0}, InvalidRequest),
    ({"init_image": Image.new("RGB", (64, 64)), "strength": 0.1, "steps": 4}, InvalidRequest),  # no step to run
    ({"init_image": Image.new("RGB", (64, 64)), "strength": 1.5}, InvalidRequest),
])
def test_bad_requests_raise_clear_errors_and_engine_keeps_serving(cpu_engine, request_kwargs, error):
    kwargs = {"prompt": "x", "steps": 2, **request_kwargs}
    with pytest.raises(error):
        cpu_engine.generate(GenerateRequest(**kwargs))
    assert cpu_engine.generate(GenerateRequest(prompt="ok", steps=2, seed=1)).images


def test_cancel_stops_at_step_boundary_and_engine_keeps_serving(cpu_engine):
    cancel = threading.Event()
    seen = []

    def on_progress(progress):
        seen.append(progress.step)
        if progress.step == 2:
            cancel.set()

    with pytest.raises(Cancelled):
        cpu_engine.generate(GenerateRequest(prompt="x", steps=20, num_images=3), on_progress=on_progress, cancel=cancel)
    assert seen == [1, 2]
    assert cpu_engine.generate(GenerateRequest(prompt="after", steps=2, seed=2)).images


def test_progress_reports_every_step(cpu_engine):
    seen = []  # tiny-sd21 is compiled for batch 1 only: its images run one after the other
    cpu_engine.generate(GenerateRequest(model="tiny-sd21", prompt="x", steps=3, num_images=2, seed=1),
                        on_progress=seen.append)
    assert [(p.image_index, p.step, p.total_steps) for p in seen] == [(0, 1, 3), (0, 2, 3), (0, 3, 3),
                                                                      (1, 1, 3), (1, 2, 3), (1, 3, 3)]
    assert [p.fraction for p in seen] == pytest.approx([1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6, 1.0])


def test_progress_of_images_made_in_one_call(cpu_engine):
    seen = []  # tiny-sd15 is compiled for batches of 1 and 4: two images run as one call
    cpu_engine.generate(GenerateRequest(model="tiny-sd15", prompt="x", steps=3, num_images=2, seed=1),
                        on_progress=seen.append)
    assert [(p.image_index, p.step, p.images_in_call) for p in seen] == [(0, 1, 2), (0, 2, 2), (0, 3, 2)]
    assert [p.fraction for p in seen] == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_models_and_status_show_compiled_and_warm(cpu_engine):
    cpu_engine.generate(GenerateRequest(model="tiny-sd15", prompt="x", steps=1, seed=1))
    info = {m.id: m for m in cpu_engine.models()}
    assert info["tiny-sd15"].compiled == {Size(64, 64): "compiled", Size(64, 96): "compiled"}
    assert Size(64, 64) in info["tiny-sd15"].warm
    status = cpu_engine.status()
    assert status["backend"] == "cpu" and any(w["model"] == "tiny-sd15" for w in status["warm"])
    assert cpu_engine.unload("tiny-sd15") >= 1
    assert not any(w["model"] == "tiny-sd15" for w in cpu_engine.status()["warm"])


def _fresh_engine(registry):
    from engine import Engine
    from engine.backends import make_backend

    return Engine(registry, make_backend("cpu"))


def test_missing_and_stale_artifacts_are_refused_with_the_command(compiled_registry, tmp_path):
    import dataclasses
    import json
    import shutil

    from engine import artifacts

    registry = dataclasses.replace(compiled_registry, artifacts_dir=tmp_path / "artifacts")
    source = artifacts.variant_dir(compiled_registry.artifacts_dir, "tiny-sd21", Size(64, 64), "cpu")
    target = artifacts.variant_dir(registry.artifacts_dir, "tiny-sd21", Size(64, 64), "cpu")
    engine = _fresh_engine(registry)
    with pytest.raises(ArtifactMissing, match="--models tiny-sd21 --resolutions 64x64"):
        engine.generate(GenerateRequest(model="tiny-sd21", prompt="x", steps=1))
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["fingerprint"] = "0" * 16
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactMismatch, match="--force"):
        engine.generate(GenerateRequest(model="tiny-sd21", prompt="x", steps=1))
    shutil.rmtree(target)
    shutil.copytree(source, target)
    with open(target / "unet" / "model.pt", "ab") as handle:
        handle.write(b"garbage")
    with pytest.raises(ArtifactMismatch, match="unet file is missing or changed"):
        engine.generate(GenerateRequest(model="tiny-sd21", prompt="x", steps=1))


def test_compiled_serving_never_loads_full_weights(compiled_registry, monkeypatch):
    import diffusers
    import transformers

    def forbidden(cls, *args, **kwargs):
        raise AssertionError(f"{cls.__name__} weights were loaded while serving compiled artifacts")

    for cls in (diffusers.UNet2DConditionModel, diffusers.AutoencoderKL, transformers.CLIPTextModel,
                transformers.CLIPTextModelWithProjection, diffusers.StableDiffusionPipeline):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(forbidden))
    monkeypatch.setattr(diffusers.StableDiffusionPipeline, "from_single_file", classmethod(forbidden))
    engine = _fresh_engine(compiled_registry)
    for model in ("tiny-sdxl", "tiny-sd15-file"):
        assert engine.generate(GenerateRequest(model=model, prompt="x", steps=2, seed=1)).images


@pytest.mark.parametrize("sampler", sampler_names())
def test_every_sampler_is_reproducible_by_seed(cpu_engine, sampler):
    """The same request twice gives identical pixels ("DPM++ SDE" once drew from the global RNG)."""
    request = GenerateRequest(model="tiny-sd21", prompt="a red circle", sampler=sampler, steps=3, seed=99)
    first, second = cpu_engine.generate(request), cpu_engine.generate(request)
    torch.manual_seed(12345)  # the global RNG must not matter
    third = cpu_engine.generate(request)
    assert np.array_equal(pixels(first.images[0].image), pixels(second.images[0].image))
    assert np.array_equal(pixels(first.images[0].image), pixels(third.images[0].image))


def test_a_prompt_over_75_tokens_says_which_words_were_dropped(cpu_engine):
    words = " ".join(f"word{i}" for i in range(40))  # the tiny tokenizer splits each into several tokens
    result = cpu_engine.generate(GenerateRequest(model="tiny-sd15", prompt=words, negative_prompt="blurry",
                                                 steps=2, seed=1))
    [notice] = result.notices
    assert notice.startswith("the prompt is 230 tokens in 4 chunks and the model reads 1 chunk: ")
    assert "word39" in notice.replace(" ", "") and "word0" not in notice.replace(" ", "")
    assert cpu_engine.generate(GenerateRequest(model="tiny-sd15", prompt="a red circle", steps=2)).notices == ()


def test_a_running_model_keeps_its_lease_while_another_model_loads(compiled_registry):
    """max_warm=1 and two device workers: model A is mid-generation when model B loads. A must stay
    warm (never evicted or freed while it runs) and finish correctly; once A is done, the pool goes
    back to one warm model."""
    from engine import Engine, EngineSettings
    from engine.backends import make_backend

    engine = Engine(compiled_registry, make_backend("cpu"), EngineSettings(max_warm=1, workers=2))
    running, release = threading.Event(), threading.Event()

    def hold(progress) -> None:  # noqa: ANN001 - Progress
        if progress.step == 2:
            running.set()
            assert release.wait(60)

    try:
        job = engine.submit(GenerateRequest(model="tiny-sd15", prompt="a", seed=5, steps=4), on_progress=hold)
        assert running.wait(60)
        loaded = engine.load("tiny-sd21")  # on the other worker, while A is between steps 2 and 3
        assert loaded.key.model == "tiny-sd21"
        # over max_warm, the idle model goes, never the one generating
        assert [(info.key.model, info.in_use) for info in engine.pool.snapshot()] == [("tiny-sd15", True)]
        release.set()
        result = job.result(timeout=60)
        solo = _fresh_engine(compiled_registry).generate(
            GenerateRequest(model="tiny-sd15", prompt="a", seed=5, steps=4)).images[0].image
        assert np.array_equal(pixels(result.images[0].image), pixels(solo))
        assert [info.key.model for info in engine.pool.snapshot()] == ["tiny-sd15"]
    finally:
        release.set()
        engine.close()


@pytest.mark.parametrize("sampler", [s for s in sampler_names() if s.endswith(" Karras")])
def test_karras_variants_differ_from_their_plain_sampler(cpu_engine, sampler):
    """"X Karras" runs the Karras sigma schedule: its pixels differ from "X" for the same seed."""
    def image(name: str) -> np.ndarray:
        return pixels(cpu_engine.generate(GenerateRequest(prompt="a", seed=11, steps=5, sampler=name)).images[0].image)

    assert np.abs(image(sampler) - image(sampler.removesuffix(" Karras"))).max() > 0


def test_a_fractional_cfg_scale_is_used_as_given(cpu_engine):
    """CFG 6.5 is neither 6 nor 7, and the infotext says 6.5."""
    def run(cfg: float):
        return cpu_engine.generate(GenerateRequest(prompt="a", negative_prompt="b", seed=2, steps=3, cfg_scale=cfg)).images[0]

    half, six, seven = run(6.5), run(6.0), run(7.0)
    assert "CFG scale: 6.5" in half.infotext
    assert np.abs(pixels(half.image) - pixels(six.image)).max() > 0
    assert np.abs(pixels(half.image) - pixels(seven.image)).max() > 0


# (kept out of test_scheduler.py: mutation testing runs that file per mutant, and cpu_engine compiles)
def test_engine_generation_runs_on_the_device_worker_and_reports_progress(cpu_engine):
    """The engine's jobs run on its worker thread whatever thread submits them."""
    seen_threads = set()
    steps = []

    def on_progress(p):
        seen_threads.add(threading.current_thread().name)
        steps.append(p.step)

    job = cpu_engine.submit(GenerateRequest(model="tiny-sd15", prompt="a circle", steps=3, seed=1),
                            owner="t", on_progress=on_progress)
    result = job.result(60)
    assert steps == [1, 2, 3] and seen_threads == {"device-worker-0"}
    assert job.progress.step == 3 and result.images[0].seed == 1


@pytest.mark.parametrize("free_copies, expected", [(3.9, 1), (4.1, 2), (100, 4)])
def test_replicas_auto_on_cpu_takes_at_most_half_the_free_memory(compiled_registry, monkeypatch, free_copies, expected):
    """Auto replicas are the app's cpu default, so a big model on a small host must not double itself
    into swap: copies are capped at half of MemAvailable, a copy counted as its artifacts' bytes."""
    import engine.engine as engine_module
    from engine import Engine, EngineSettings
    from engine.backends import make_backend

    variant = compiled_registry.artifacts_dir / "tiny-sd15" / "64x64" / "cpu"
    copy_bytes = sum(f.stat().st_size for f in variant.rglob("*") if f.is_file() and f.suffix == ".pt")
    assert copy_bytes > 100_000, "the variant's weights were not found where the test expects them"
    monkeypatch.setattr(engine_module, "usable_cores", lambda: 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(engine_module, "available_memory_bytes", lambda: int(free_copies * copy_bytes))
    engine = Engine(compiled_registry, make_backend("cpu"), EngineSettings(max_warm=1, replicas_auto=True))
    try:
        assert list(engine.start_replicas().values()) == [expected]
    finally:
        engine.close()


@pytest.mark.parametrize("cores, threads, backend, expected", [(2, 1, "cpu", 2), (4, 2, "cpu", 2), (2, 2, "cpu", 1),
                                                               (8, 1, "eager", 1)])
def test_replicas_auto_on_cpu_is_one_copy_per_group_of_torch_threads(compiled_registry, monkeypatch, cores, threads,
                                                                       backend, expected):
    """``--replicas auto`` without NeuronCores: each replica's device worker runs its calls on its own
    ``--threads`` cores (the cpu backend); a GPU (eager) gets one."""
    import engine.engine as engine_module
    from engine import Engine, EngineSettings
    from engine.backends import make_backend

    monkeypatch.setattr(engine_module, "usable_cores", lambda: cores)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    engine = Engine(compiled_registry, make_backend(backend), EngineSettings(max_warm=1, replicas_auto=True))
    try:
        warm = engine.start_replicas()
        assert list(warm.values()) == [expected]
        assert len([i for i in engine.pool.snapshot() if i.key.model == "tiny-sd15"]) == expected
        images = [job.result(60) for job in [engine.submit(GenerateRequest(model="tiny-sd15", prompt="x", steps=2,
                                                                           seed=i)) for i in range(4)]]
        assert all(len(r.images) == 1 for r in images)
    finally:
        engine.close()


def test_models_tab_counts_a_model_with_two_replicas_once_against_max_warm(compiled_registry):
    """``--max-warm`` counts models at a size, not replicas: two copies of one model are "1 of at most 2",
    each copy listed on its own line."""
    from types import SimpleNamespace

    from engine import Engine, EngineSettings, ReplicaTarget
    from engine.backends import make_backend
    from ui.models import status_markdown

    engine = Engine(compiled_registry, make_backend("cpu"),
                    EngineSettings(max_warm=2, replicas=(ReplicaTarget("tiny-sd15", None, 2),)))
    try:
        engine.start_replicas()
        text = status_markdown(SimpleNamespace(engine=engine))
        assert "**warm models** 1 of at most 2 (2 copies)" in text
        assert "@ 64x64 replica 1," in text and "@ 64x64 replica 2," in text
    finally:
        engine.close()
