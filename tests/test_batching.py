"""Concurrent requests run as one device call (engine/scheduler.py forms the batch,
engine/batching.py runs it): same images as alone, per-request interrupt, no padding in results.

tiny-sd15 is compiled for batches of 1 and 4 (tests/make_tiny_models.py), tiny-sd21 for 1 only.
Batched rows run on the batch-4 UNet graph, solo ones on the batch-1 graph: the tolerance is 1
level per channel (measured: 0 or 1 on these models).
"""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from engine import Cancelled, GenerateRequest
from engine.samplers import sampler_names
from engine.scheduler import Batching, Scheduler

TOLERANCE = 1


@pytest.fixture(scope="module")
def batch_engine(compiled_registry):
    """An engine whose free worker waits 300 ms for company, so requests submitted together batch."""
    from engine import Engine, EngineSettings
    from engine.backends import make_backend

    engine = Engine(compiled_registry, make_backend("cpu"), EngineSettings(max_warm=3, batch_wait_s=0.3))
    yield engine
    engine.close()


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def requests_for(sampler: str, steps: int = 4) -> list[GenerateRequest]:
    return [GenerateRequest(model="tiny-sd15", prompt=prompt, negative_prompt=negative, sampler=sampler, steps=steps,
                            cfg_scale=6.5, seed=seed)
            for prompt, negative, seed in (("a red circle", "", 11), ("a blue square", "blurry", 22),
                                           ("a green triangle", "dark", 33))]


@pytest.mark.parametrize("sampler", sampler_names())
def test_batched_images_equal_solo_images_for_every_sampler(batch_engine, cpu_engine, sampler):
    requests = requests_for(sampler)
    jobs = [batch_engine.submit(r) for r in requests]
    batched = [job.result(60) for job in jobs]
    assert [r.batch_requests for r in batched] == [3, 3, 3]
    for request, result in zip(requests, batched):
        alone = cpu_engine.generate(request)  # nothing else waiting: runs alone, on the batch-1 graph
        assert alone.batch_requests == 1 and len(result.images) == 1  # 3 rows padded to 4: no 4th image
        assert result.images[0].infotext == alone.images[0].infotext
        diff = np.abs(pixels(result.images[0].image) - pixels(alone.images[0].image)).max()
        assert diff <= TOLERANCE, f"{sampler}: batched image differs by {diff} levels"


def test_img2img_with_the_same_strength_batches_and_matches_solo(batch_engine, cpu_engine):
    sources = [Image.new("RGB", (64, 64), color) for color in ((250, 0, 0), (0, 0, 250))]
    requests = [GenerateRequest(model="tiny-sd15", prompt="x", init_image=image, strength=0.5, steps=4, seed=5 + i,
                                sampler="Euler") for i, image in enumerate(sources)]
    batched = [job.result(60) for job in [batch_engine.submit(r) for r in requests]]
    assert [r.batch_requests for r in batched] == [2, 2]
    for request, result in zip(requests, batched):
        alone = cpu_engine.generate(request)
        assert np.abs(pixels(result.images[0].image) - pixels(alone.images[0].image)).max() <= TOLERANCE


def test_requests_that_differ_in_steps_or_model_are_not_mixed(batch_engine):
    jobs = [batch_engine.submit(GenerateRequest(model="tiny-sd15", prompt="x", steps=3, seed=1)),
            batch_engine.submit(GenerateRequest(model="tiny-sd15", prompt="x", steps=4, seed=1)),
            batch_engine.submit(GenerateRequest(model="tiny-sd21", prompt="x", steps=3, seed=1)),
            batch_engine.submit(GenerateRequest(model="tiny-sd15", prompt="y", steps=3, seed=2))]
    results = [job.result(60) for job in jobs]
    assert [r.batch_requests for r in results] == [2, 1, 1, 2]  # the first and the last ran together


def test_an_interrupt_inside_a_batch_stops_only_that_request(batch_engine):
    requests = requests_for("Euler a", steps=150)
    jobs = [batch_engine.submit(r, owner=f"user-{i}") for i, r in enumerate(requests)]
    deadline = time.monotonic() + 30
    while not (jobs[1].progress and jobs[1].progress.step >= 3):
        assert time.monotonic() < deadline, "the batch never started"
        time.sleep(0.01)
    assert jobs[1].progress.batch == 3
    batch_engine.interrupt("user-1")
    with pytest.raises(Cancelled):
        jobs[1].result(5)
    assert not jobs[0].future.done(), "the interrupted request did not leave the batch at once"
    finished = [jobs[0].result(60), jobs[2].result(60)]
    assert [len(r.images) for r in finished] == [1, 1] and [r.images[0].seed for r in finished] == [11, 33]


def test_a_request_with_more_images_than_a_call_takes_runs_in_several_calls(batch_engine, cpu_engine):
    request = GenerateRequest(model="tiny-sd15", prompt="many", steps=3, seed=100, num_images=6)
    result = batch_engine.generate(request)
    assert [image.seed for image in result.images] == list(range(100, 106))
    assert result.timings["steps_run"] == 6  # 2 calls (4 + 2 rows) x 3 steps
    alone = [cpu_engine.generate(GenerateRequest(model="tiny-sd15", prompt="many", steps=3, seed=100 + i))
             for i in range(6)]
    for image, single in zip(result.images, alone):
        assert np.abs(pixels(image.image) - pixels(single.images[0].image)).max() <= TOLERANCE


# --- the scheduler's batch formation, without a model ---------------------------------------------

class Recorder:
    def __init__(self):
        self.batches: list[list[str]] = []
        self.release = threading.Event()

    def __call__(self, jobs):
        if jobs[0].payload == ("block", 1):
            assert self.release.wait(10)
        self.batches.append([f"{job.payload[0]}{job.payload[1]}" for job in jobs])
        return [None for _ in jobs]


def _scheduler(recorder, wait_s=0.0, limit=4):
    policy = Batching(key=lambda p: None if p[0] == "block" else p[0], rows=lambda p: p[1], limit=lambda p: limit,
                      wait_s=wait_s)
    return Scheduler(recorder, workers=1, batching=policy)


def test_scheduler_gathers_compatible_jobs_in_order_up_to_the_limit():
    recorder = Recorder()
    scheduler = _scheduler(recorder)
    try:
        blocker = scheduler.submit(("block", 1))
        while blocker.state != "running":
            time.sleep(0.005)
        jobs = [scheduler.submit(p) for p in (("a", 1), ("b", 1), ("a", 2), ("a", 2), ("b", 1), ("a", 1))]
        recorder.release.set()
        for job in jobs:
            job.result(5)
        # a1 + a2 fill 3 rows; the next a2 would make 5 > 4; a1 fits. b's run together after.
        assert recorder.batches[1:] == [["a1", "a2", "a1"], ["b1", "b1"], ["a2"]]
    finally:
        recorder.release.set()
        scheduler.close()


def test_scheduler_waits_for_company_only_up_to_wait_s():
    recorder = Recorder()
    scheduler = _scheduler(recorder, wait_s=0.3)
    try:
        first = scheduler.submit(("a", 1))
        time.sleep(0.05)
        second = scheduler.submit(("a", 1))  # arrives while the free worker waits for company
        first.result(5), second.result(5)
        assert recorder.batches == [["a1", "a1"]]
        started = time.monotonic()
        scheduler.submit(("a", 4)).result(5)  # a full batch does not wait
        assert time.monotonic() - started < 0.25
    finally:
        scheduler.close()
