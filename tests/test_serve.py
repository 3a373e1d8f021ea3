"""``python app.py --ray`` for real: a local Ray cluster (2 CPUs here) serving the shipped demo model.

Each test launches the app as a user does (a subprocess that starts its own Ray cluster), talks to
it over HTTP and stops it. Measured numbers are printed (``pytest -s``); the asserted bounds are
looser than the targets so that a busy 2-core machine does not flake.
"""
from __future__ import annotations

import base64
import io
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from PIL import Image

from ui_server import start_app

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -r requirements-ray.txt)")

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "demo-shapes"
RAY_START_TIMEOUT_S = 180
STEPS = int(os.environ.get("RAY_TEST_STEPS", "40"))
pytestmark = pytest.mark.skipif(not (DEMO / "model_index.json").is_file(), reason="models/demo-shapes is missing")


def demo_registry(directory: Path, scaling: dict, batch_sizes: tuple[int, ...] = (1, 4, 8)) -> Path:
    """The shipped demo model alone, with ``scaling``, compiling into ``directory``/artifacts."""
    path = directory / "registry.yaml"
    path.write_text(yaml.safe_dump({
        "artifacts_dir": str(directory / "artifacts"),
        "default_model": "demo-shapes",
        "models": [{"id": "demo-shapes", "title": "Demo shapes", "family": "sd15", "source": {"local": str(DEMO)},
                    "dtype": "fp32", "resolutions": ["64x64"], "batch_sizes": list(batch_sizes),
                    "defaults": {"sampler": "DPM++ 2M", "steps": 20, "cfg_scale": 4}, "scaling": scaling}],
    }))
    return path


@pytest.fixture(scope="module")
def registry_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("ray-registry")
    demo_registry(directory, {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "idle_s": 15})
    return directory


@pytest.fixture(scope="module")
def unbatched_registry_dir(tmp_path_factory) -> Path:
    """Without batching: a replica runs one request per call, so what replicas add shows alone."""
    directory = tmp_path_factory.mktemp("ray-registry-batch1")
    demo_registry(directory, {}, batch_sizes=(1,))
    return directory


def start_ray_app(registry_dir: Path, tmp: Path, *args: str):
    server = start_app(registry_dir / "registry.yaml", tmp, ["--ray", *args], timeout_s=RAY_START_TIMEOUT_S)
    wait_until(lambda: requests.get(server.url + "ping", timeout=5).status_code == 200, 120, server)
    return server


def stop(server) -> None:
    server.stop()
    assert "ERROR ui:" not in server.log(), server.log()[-5000:]


def wait_until(condition, timeout_s: float, server=None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"not reached in {timeout_s:.0f}s" + (f":\n{server.log()[-4000:]}" if server else ""))


def txt2img(url: str, seed: int, **fields) -> requests.Response:
    body = {"prompt": f"a red circle on a blue background {seed % 3}", "seed": seed, "steps": STEPS, **fields}
    return requests.post(url + "sdapi/v1/txt2img", json=body, timeout=300)


def burst(url: str, seeds: list[int], **fields) -> tuple[dict[int, requests.Response], float]:
    """One concurrent client per seed; returns the responses and the wall time."""
    responses: dict[int, requests.Response] = {}

    def client(seed: int) -> None:
        responses[seed] = txt2img(url, seed, **fields)

    threads = [threading.Thread(target=client, args=(seed,)) for seed in seeds]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return responses, time.perf_counter() - started


def pixels(response: requests.Response) -> np.ndarray:
    image = Image.open(io.BytesIO(base64.b64decode(response.json()["images"][0])))
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def deployment(url: str) -> dict:
    return requests.get(url + "sdapi/v1/memory", timeout=10).json()["engine"]["ray"]["deployments"]["demo-shapes"]


def test_two_replicas_serve_more_images_per_second_and_the_same_images(unbatched_registry_dir, tmp_path):
    """16 concurrent clients, 1 then 2 CPU replicas (1 CPU, 1 torch thread each), one request per
    UNet call; every image equals the single-process engine's for its seed, pixel for pixel."""
    registry_dir = unbatched_registry_dir
    from engine import Engine, EngineSettings, GenerateRequest, load_registry
    from engine.backends import make_backend

    seeds = list(range(16))
    rates = {}
    images = {}
    for replicas in (1, 2):
        server = start_ray_app(registry_dir, tmp_path / f"r{replicas}", "--replicas", f"demo-shapes={replicas}")
        try:
            wait_until(lambda: deployment(server.url)["running"] == replicas, 120, server)
            burst(server.url, [100, 101])  # warm both replicas' first calls
            responses, seconds = burst(server.url, seeds)
            assert all(r.status_code == 200 for r in responses.values()), [r.text for r in responses.values()]
            rates[replicas] = len(seeds) / seconds
            images[replicas] = {seed: pixels(r) for seed, r in responses.items()}
        finally:
            stop(server)
    ratio = rates[2] / rates[1]
    print(f"\nRay Serve, 16 concurrent clients: 1 replica {rates[1]:.2f} img/s, 2 replicas {rates[2]:.2f} img/s, "
          f"ratio {ratio:.2f}x")
    # Measured here alone: 1.44-1.45x (3.7 -> 5.35 img/s; 1.73x for replicas in one process); 1.24x once
    # at the end of a full suite run. The 2 cores also run the ingress, Serve's proxy and controller
    # and the 16 clients (~0.3 core). The bound only catches a second replica that adds nothing
    # (docs/scaling.md has the benchmark).
    assert ratio >= 1.1, rates

    registry = load_registry(registry_dir / "registry.yaml")
    engine = Engine(registry, make_backend("cpu"), EngineSettings(max_warm=1))
    try:
        for seed in seeds:
            request = GenerateRequest(prompt=f"a red circle on a blue background {seed % 3}", seed=seed, steps=STEPS)
            expected = np.asarray(engine.generate(request).images[0].image.convert("RGB"), dtype=np.int16)
            for replicas in (1, 2):
                assert np.array_equal(images[replicas][seed], expected), (replicas, seed)
    finally:
        engine.close()


def replica_pids(deployment_name: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if f"ServeReplica:sd:{deployment_name}" in line]


def test_a_replica_killed_mid_burst_loses_and_duplicates_nothing(registry_dir, tmp_path):
    server = start_ray_app(registry_dir, tmp_path, "--replicas", "demo-shapes=2")
    try:
        wait_until(lambda: deployment(server.url)["running"] == 2, 120, server)
        pids = replica_pids("model-demo-shapes")
        assert len(pids) == 2, pids
        results: dict[int, requests.Response] = {}
        runner = threading.Thread(target=lambda: results.update(burst(server.url, list(range(12)), steps=40,
                                                                      save_images=True)[0]))
        runner.start()
        time.sleep(1.5)
        os.kill(pids[0], signal.SIGKILL)  # a replica crashes while requests run on it
        runner.join()
        codes = sorted(r.status_code for r in results.values())
        print(f"\nreplica killed mid-burst: status codes {codes}")
        assert set(codes) <= {200, 503}, [r.text for r in results.values()]
        for response in results.values():
            if response.status_code == 503:
                assert "try again" in response.json()["detail"]
        saved = sorted((server.outputs).rglob("*.png"))
        assert len(saved) == codes.count(200)  # every answered image saved once, nothing else
        wait_until(lambda: deployment(server.url)["running"] == 2, 120, server)  # Serve replaced it
        assert txt2img(server.url, 7).status_code == 200
    finally:
        stop(server)


def test_autoscaling_adds_a_replica_under_a_burst_and_removes_it_when_idle(registry_dir, tmp_path):
    """Registry scaling: min 1, max 2, 1 ongoing request per replica as the target, 15 s idle.
    Serve decides to add the replica within seconds of the burst; starting it (a new process that
    imports torch and loads the model) takes ~8 s here, so the burst may end before it serves."""
    server = start_ray_app(registry_dir, tmp_path)
    try:
        assert deployment(server.url)["running"] == 1
        seen = []
        stop_watch = threading.Event()

        def watch() -> None:
            while not stop_watch.is_set():
                seen.append(sum(deployment(server.url)["replicas"].values()))  # starting or running
                time.sleep(0.5)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            responses, _ = burst(server.url, list(range(32)), steps=100)
        finally:
            stop_watch.set()
            watcher.join()
        assert all(r.status_code == 200 for r in responses.values())
        print(f"\nautoscaling: replicas seen during the burst {sorted(set(seen))}")
        assert max(seen) == 2
        wait_until(lambda: deployment(server.url)["running"] == 2, 60, server)  # the new replica came up
        started = time.monotonic()
        wait_until(lambda: sum(deployment(server.url)["replicas"].values()) == 1, 120, server)  # idle: back to 1
        print(f"autoscaling: back to 1 replica {time.monotonic() - started:.0f}s after the second was up")
    finally:
        stop(server)


@pytest.mark.browser
def test_the_ui_through_the_ray_ingress_generates_shows_progress_and_interrupts(registry_dir, tmp_path):
    """Debian's chromium against ``app.py --ray``: a generation with progress, then an interrupted one."""
    playwright_api = pytest.importorskip("playwright.sync_api")
    from test_browser import CHROMIUM, CHROMIUM_ARGS, set_number

    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium")
    expect = playwright_api.expect
    server = start_ray_app(registry_dir, tmp_path)
    try:
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 950})
            page.set_default_timeout(60_000)
            page.goto(server.url)
            page.locator("#txt2img_prompt textarea").fill("a yellow sun on a green background")
            set_number(page, "txt2img_steps", 150)
            page.locator("#txt2img_generate").click()
            page.wait_for_function("() => /step \\d+\\/150/.test(document.body.innerText)")  # progress from the replica
            page.locator("#txt2img_interrupt").click()
            expect(page.locator("#txt2img_stats")).to_contain_text("Interrupted")
            set_number(page, "txt2img_steps", 20)
            page.locator("#txt2img_generate").click()
            expect(page.locator("#txt2img_gallery img").first).to_be_visible()
            expect(page.locator("#txt2img_info textarea")).to_have_value(re.compile(r"Steps: 20, .*Model: demo-shapes"))
            page.get_by_role("tab", name="Models").click()
            expect(page.locator("#models_status")).to_contain_text("Ray Serve")
            page.screenshot(path=str(tmp_path / "ray-models.png"))
            if os.environ.get("UI_SCREENSHOTS") == "1":
                page.screenshot(path=str(ROOT / "docs" / "screenshots" / "ray-models.png"))
            browser.close()
    finally:
        stop(server)
