"""Faults a long-running server meets, each survived: a corrupted or deleted artifact, a process killed
mid-generation, a pickle checkpoint, a full outputs disk, too many requests, a growing outputs dir."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image

from engine import (ArtifactCorrupt, ArtifactMissing, Engine, EngineSettings, GenerateRequest, ModelLoadError,
                    OutputStore, RateLimited, RateLimiter, Size, artifacts)
from engine.backends import make_backend
from engine.compile import compile_all
from engine.registry import load_registry
from test_compile import _registry_copy
from test_outputs import generated
from ui.models import model_rows
from ui_server import last_outputs, start_app

SIZE = Size(64, 64)
REQUEST = GenerateRequest(model="tiny-sd21", prompt="a red circle", steps=2, seed=7)


def _copy_variants(compiled_registry, artifacts_dir: Path, models: tuple[str, ...]) -> None:
    for model in models:
        shutil.copytree(artifacts.variant_dir(compiled_registry.artifacts_dir, model, SIZE, "cpu"),
                        artifacts.variant_dir(artifacts_dir, model, SIZE, "cpu"))


@pytest.fixture
def private_registry(compiled_registry, tmp_path):
    """The tiny registry over a private copy of the tiny-sd21 and tiny-sd15 artifacts (safe to break)."""
    registry = dataclasses.replace(compiled_registry, artifacts_dir=tmp_path / "artifacts")
    _copy_variants(compiled_registry, registry.artifacts_dir, ("tiny-sd21", "tiny-sd15"))
    return registry


@pytest.fixture
def engine_on(request):
    engines = []

    def make(registry, backend: str = "cpu") -> Engine:
        engines.append(Engine(registry, make_backend(backend), EngineSettings(max_warm=2)))
        return engines[-1]

    yield make
    for engine in engines:
        engine.close()


def _flip_a_byte(path: Path) -> None:
    """Damage a file in place without changing its size (a bit rot / partial overwrite)."""
    with open(path, "r+b") as handle:
        handle.seek(path.stat().st_size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))  # a rewrite in place moves the mtime


def _unet_file(registry, model: str = "tiny-sd21") -> Path:
    return artifacts.variant_dir(registry.artifacts_dir, model, SIZE, "cpu") / "unet" / "model.pt"


def test_a_corrupted_artifact_is_a_broken_model_and_the_others_keep_serving(private_registry, engine_on):
    engine = engine_on(private_registry)
    _flip_a_byte(_unet_file(private_registry))
    with pytest.raises(ArtifactCorrupt, match=r"model tiny-sd21@64x64 is broken: unet .* sha256 .*"
                                              r"--models tiny-sd21 --resolutions 64x64 --force"):
        engine.generate(REQUEST)
    states = {info.id: info.compiled for info in engine.models()}
    assert states["tiny-sd21"][SIZE] == "broken" and states["tiny-sd15"][SIZE] == "compiled"
    row = next(r for r in model_rows(SimpleNamespace(engine=engine), engine.models()) if r[0] == "tiny-sd21")
    assert row[6] == "🛑 broken" and row[8].endswith("--models tiny-sd21 --resolutions 64x64 --force")
    assert engine.generate(dataclasses.replace(REQUEST, model="tiny-sd15")).images  # the others keep serving
    outcomes = compile_all(private_registry, make_backend("cpu"), ["tiny-sd21"], [SIZE], force=True,
                           log=lambda line: None)
    assert [o.state for o in outcomes] == ["compiled"]
    assert engine.generate(REQUEST).images[0].image.size == (64, 64)


def test_sha256_is_checked_once_per_file_and_again_after_a_change(private_registry, engine_on, monkeypatch):
    hashed: list[str] = []
    real = artifacts.sha256_file
    monkeypatch.setattr(artifacts, "sha256_file", lambda path: hashed.append(Path(path).parent.name) or real(path))
    engine_on(private_registry).load("tiny-sd21", SIZE)
    assert sorted(hashed) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]  # new inodes: hashed once
    hashed.clear()
    monkeypatch.setattr(artifacts, "_checked", {})  # a restarted server: only .verified.json remembers
    engine_on(private_registry).load("tiny-sd21", SIZE)
    assert hashed == []
    os.utime(_unet_file(private_registry), ns=(time.time_ns(), time.time_ns() + 5_000_000))
    engine_on(private_registry).load("tiny-sd21", SIZE)
    assert hashed == ["unet"]


def test_a_fresh_compile_is_not_hashed_again_at_first_load(tiny_dir, tmp_path, monkeypatch):
    registry = load_registry(_registry_copy(tiny_dir, tmp_path, ["tiny-sd15"]))
    compile_all(registry, make_backend("cpu"), log=lambda line: None)
    monkeypatch.setattr(artifacts, "sha256_file", lambda path: pytest.fail(f"{path} hashed again"))
    engine = Engine(registry, make_backend("cpu"))
    try:
        engine.load("tiny-sd15", SIZE)
    finally:
        engine.close()


def test_compile_all_verify_rehashes_everything_and_names_the_broken(tiny_dir, compiled_registry, tmp_path, capsys):
    import compile_all as cli

    path = _registry_copy(tiny_dir, tmp_path, ["tiny-sd21", "tiny-sd15"])
    _copy_variants(compiled_registry, tmp_path / "artifacts", ("tiny-sd21", "tiny-sd15"))
    assert cli.main(["--registry", str(path), "--backend", "cpu", "--verify"]) == 0
    assert capsys.readouterr().out.count(" ok") == 2
    unet = _unet_file(load_registry(path))
    stat = unet.stat()
    _flip_a_byte(unet)
    os.utime(unet, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old mtime: --verify hashes anyway
    assert cli.main(["--registry", str(path), "--backend", "cpu", "--verify"]) == 1
    out, err = capsys.readouterr()
    assert "tiny-sd21            64x64       BROKEN: unet" in out and "tiny-sd15            64x64       ok" in out
    assert "1 variant(s) broken" in err


def test_an_artifact_deleted_while_warm_keeps_serving_and_a_reload_says_what_to_do(private_registry, engine_on):
    engine = engine_on(private_registry)
    before = np.asarray(engine.generate(REQUEST).images[0].image)
    shutil.rmtree(artifacts.variant_dir(private_registry.artifacts_dir, "tiny-sd21", SIZE, "cpu"))
    assert np.array_equal(np.asarray(engine.generate(REQUEST).images[0].image), before)  # the warm copy serves
    assert engine.unload("tiny-sd21") == 1
    with pytest.raises(ArtifactMissing, match="python compile_all.py .*--models tiny-sd21 --resolutions 64x64"):
        engine.generate(REQUEST)
    assert engine.generate(dataclasses.replace(REQUEST, model="tiny-sd15")).images


def test_a_pickle_checkpoint_is_refused_unless_allowed(tiny_dir, tmp_path, engine_on):
    """A .ckpt is a pickle: opening one can run code. Refused with the way out, unless the admin says so."""
    import torch
    import yaml
    from safetensors.torch import load_file

    torch.save({"state_dict": load_file(tiny_dir / "tiny-sd15.safetensors")}, tmp_path / "tiny.ckpt")
    registry_path = tmp_path / "registry.yaml"
    registry_path.write_text(yaml.safe_dump({"models": [{
        "id": "pickled", "family": "sd15", "resolutions": ["64x64"],
        "source": {"single_file": str(tmp_path / "tiny.ckpt"), "config": str(tiny_dir / "tiny-sd15")}}]}))
    request = GenerateRequest(model="pickled", prompt="x", steps=2, seed=1)
    with pytest.raises(ModelLoadError, match=r"tiny.ckpt is a pickle checkpoint .*safetensors.*--allow-unsafe-pickle"):
        engine_on(load_registry(registry_path), "eager").generate(request)
    allowed = engine_on(load_registry(registry_path, allow_unsafe_pickle=True), "eager")
    assert allowed.generate(request).images[0].image.size == (64, 64)
    assert allowed.reload_registry().models[0].source.unpickle_allowed  # a refresh keeps the admin's choice


def test_the_outputs_cap_deletes_the_oldest_images_first(tmp_path, monkeypatch):
    monkeypatch.setattr(OutputStore, "KEEP_NEWEST", 1)
    one = len(generated(0).png)
    store = OutputStore(tmp_path, max_bytes=3 * one + one // 2)
    paths = [store.save("txt2img", generated(seed)) for seed in range(6)]
    kept = sorted(tmp_path.glob("*-images/*/*.png"))
    assert kept == paths[-3:]
    reopened = OutputStore(tmp_path, max_bytes=2 * one + one // 2)  # a restart with a smaller cap
    assert reopened.save("img2img", generated(9)).exists()
    assert len(list(tmp_path.glob("*-images/*/*.png"))) == 2 and not paths[-3].exists()


def test_the_outputs_cap_never_deletes_the_images_of_a_request_being_answered(tmp_path):
    store = OutputStore(tmp_path, max_bytes=1)  # a cap smaller than one image
    paths = [store.save("txt2img", generated(seed)) for seed in range(OutputStore.KEEP_NEWEST + 2)]
    assert [p.exists() for p in paths] == [False, False] + [True] * OutputStore.KEEP_NEWEST


def test_partial_files_of_a_killed_writer_are_removed_when_the_store_opens(tmp_path):
    folder = tmp_path / "txt2img-images" / "2026-11-25"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (folder / f".partial-{dead.pid}-abc.png").write_bytes(b"half a png")
        (folder / f".partial-{live.pid}-def.png").write_bytes(b"another server is writing this")
        (folder / "00000-1.png").write_bytes(b"a finished image")
        OutputStore(tmp_path)
        assert sorted(p.name for p in folder.iterdir()) == [f".partial-{live.pid}-def.png", "00000-1.png"]
    finally:
        live.kill()
        live.wait()


def test_rate_limiter_refills_per_client():
    now = [0.0]
    limiter = RateLimiter(2, clock=lambda: now[0])
    limiter.acquire("a")
    limiter.acquire("a")
    with pytest.raises(RateLimited, match="2 generation requests a minute per client; try again in 30 s") as caught:
        limiter.acquire("a")
    assert caught.value.retry_after_s == pytest.approx(30.0)
    limiter.acquire("b")  # another client has its own budget
    now[0] = 30.0
    limiter.acquire("a")
    with pytest.raises(RateLimited):
        limiter.acquire("a")


def test_the_launched_app_limits_requests_per_client_and_caps_its_outputs(compiled_registry, tmp_path):
    """``--rate-limit 2``: the UI and the API of one client share two requests a minute.
    ``--outputs-max-gb``: the saved PNGs stay under the cap, newest kept."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    cap_gb = 30_000 / 2**30
    server = start_app(Path(compiled_registry.path), tmp_path / "server",
                       ["--rate-limit", "2", "--outputs-max-gb", f"{cap_gb:.10f}"])
    try:
        client = Client(server.url, verbose=False, download_files=str(tmp_path / "downloads"))
        ui = dict(prompt="x", negative_prompt="", model="tiny-sd15", resolution="64x64", sampler="Euler",
                  steps=2, cfg_scale=7, seed=1, batch_count=8, api_name="/txt2img")
        images, _, _ = client.predict(**ui)  # 8 PNGs over the cap: all kept while the UI serves them
        assert len(images) == 8 and len(last_outputs(server)) == 8
        body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "n_iter": 16, "save_images": True,
                "override_settings": {"sd_model_checkpoint": "tiny-sd15"}}
        assert requests.post(server.url + "sdapi/v1/txt2img", json=body, timeout=60).status_code == 200
        saved = last_outputs(server)  # the oldest went first; the newest 16 (one request's worth) stay
        assert [p.name[:5] for p in saved] == [f"{n:05d}" for n in range(8, 24)]
        body = {**body, "n_iter": 1}
        refused = requests.post(server.url + "sdapi/v1/txt2img", json=body, timeout=60)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "generation requests a minute per client" in refused.json()["detail"]
        with pytest.raises(AppError, match="too many requests"):
            client.predict(**ui)
        assert requests.get(server.url + "sdapi/v1/sd-models", timeout=10).status_code == 200  # only generation counts
    finally:
        server.stop()


def test_kill_9_during_generation_then_restart_serves_and_keeps_finished_images(compiled_registry, tmp_path):
    """The server killed while it generates and saves: every PNG it finished opens, nothing partial is
    left once a server opens the outputs again, and the restarted server serves."""
    args = ["--preload", "tiny-sd15@64x64"]
    server = start_app(Path(compiled_registry.path), tmp_path / "first", args)
    body = {"prompt": "x", "steps": 12, "width": 64, "height": 64, "n_iter": 16, "save_images": True,
            "override_settings": {"sd_model_checkpoint": "tiny-sd15"}}
    caller = threading.Thread(target=lambda: _post_ignoring_errors(server.url + "sdapi/v1/txt2img", body))
    caller.start()
    deadline = time.monotonic() + 60
    while len(last_outputs(server)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    caller.join(timeout=30)
    finished = last_outputs(server)
    assert 3 <= len(finished) < 16, "killed mid-request"
    folder = finished[0].parent
    (folder / ".partial-999999999-x.png").write_bytes(b"\x89PNG half")  # what a kill mid-write leaves
    restarted = start_app(Path(compiled_registry.path), tmp_path / "second", ["--outputs", str(server.outputs)])
    try:
        assert not list(folder.glob(".partial-*"))
        for path in finished:
            with Image.open(path) as image:
                image.load()
                assert image.size == (64, 64) and "Seed:" in image.info["parameters"]
        response = requests.post(restarted.url + "sdapi/v1/txt2img", json={**body, "n_iter": 1}, timeout=120)
        assert response.status_code == 200
        assert len(last_outputs(server)) == len(finished) + 1  # numbering goes on after the survivors
    finally:
        restarted.stop()


def _post_ignoring_errors(url: str, body: dict) -> None:
    try:
        requests.post(url, json=body, timeout=120)
    except requests.RequestException:
        pass  # the server was killed under it: that is the point


def test_reliability_flags_and_their_environment():
    from ui.settings import SettingsError, parse_settings

    flags = parse_settings(["--outputs-max-gb", "0.5", "--rate-limit", "10", "--allow-unsafe-pickle"], {})
    assert (flags.outputs_max_gb, flags.rate_limit, flags.allow_unsafe_pickle) == (0.5, 10, True)
    env = parse_settings([], {"SD_OUTPUTS_MAX_GB": "20", "SD_RATE_LIMIT": "3", "SD_ALLOW_UNSAFE_PICKLE": "1"})
    assert (env.outputs_max_gb, env.rate_limit, env.allow_unsafe_pickle) == (20.0, 3, True)
    default = parse_settings([], {})
    assert (default.outputs_max_gb, default.rate_limit, default.allow_unsafe_pickle) == (None, None, False)
    for argv, message in ((["--outputs-max-gb", "-1"], "--outputs-max-gb must be a positive number"),
                          (["--outputs-max-gb", "lots"], "--outputs-max-gb must be a number, found 'lots'"),
                          (["--rate-limit", "0"], "--rate-limit must be at least 1")):
        with pytest.raises(SettingsError, match=message):
            parse_settings(argv, {})


def test_a_full_outputs_disk_fails_the_request_clearly_and_the_api_keeps_serving(cpu_engine, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from api import create_api

    app, _ = create_api(cpu_engine, tmp_path / "outputs")
    body = {"prompt": "x", "steps": 2, "width": 64, "height": 64, "save_images": True,
            "override_settings": {"sd_model_checkpoint": "tiny-sd21"}}
    real_write = Path.write_bytes

    def disk_full(self: Path, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    with TestClient(app) as client:
        monkeypatch.setattr(Path, "write_bytes", disk_full)
        refused = client.post("/sdapi/v1/txt2img", json=body)
        assert refused.status_code == 503
        assert "could not be saved" in refused.json()["detail"] and "No space left on device" in refused.json()["detail"]
        monkeypatch.setattr(Path, "write_bytes", real_write)  # space freed: the next request is saved
        assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    saved = list((tmp_path / "outputs").glob("txt2img-images/*/*"))
    assert [p.suffix for p in saved] == [".png"] and not saved[0].name.startswith(".")


def test_every_rank_of_a_sharded_component_is_checked(tmp_path):
    """A component sharded over NeuronCores lists the other ranks' files in ``shards``: a damaged
    rank 3 makes the component broken as a damaged rank 0 would."""
    files = {}
    for rank in range(4):
        path = tmp_path / "transformer" / "shards" / f"tp_{rank}.pt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([rank]) * 64)
        files[rank] = {"file": str(path.relative_to(tmp_path)), "bytes": 64, "sha256": artifacts.sha256_file(path)}
    manifest = {"fingerprint": "f", "components": {"transformer": {**files[0], "shards": [files[r] for r in (1, 2, 3)]}}}
    (tmp_path / artifacts.MANIFEST).write_text(json.dumps(manifest))
    assert artifacts.verify_checksums(tmp_path, manifest) == []
    _flip_a_byte(tmp_path / files[3]["file"])
    assert artifacts.verify_checksums(tmp_path, manifest) == ["transformer"]
    assert artifacts.variant_status(tmp_path, "f").state == "broken"
    (tmp_path / files[2]["file"]).write_bytes(b"short")
    assert artifacts.variant_status(tmp_path, "f").reason == "transformer file is missing or changed"
