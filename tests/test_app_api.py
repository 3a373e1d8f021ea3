"""The web app driven through its API with gradio_client, as a script would use it.

``app.py`` runs in a subprocess on the tiny compiled registry (see ``ui_server.py``); every
request goes through Gradio's queue, the handlers and the real engine.
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from PIL import Image

from engine import ReplicaTarget, Size
from engine.infotext import parse_infotext
from ui.settings import SHARE_WARNING, AppSettings, Preload, Replicas, SettingsError, parse_settings

pytest_plugins = ["ui_server"]


@pytest.fixture(scope="module")
def client(ui_server, tmp_path_factory):
    from gradio_client import Client

    return Client(ui_server.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def _png_parameters(path: str) -> dict[str, str]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return {**parse_infotext(image.info["parameters"]), "_size": f"{image.width}x{image.height}"}


def test_txt2img_returns_pngs_with_the_request_parameters(client, ui_server):
    images, info, stats = client.predict(
        prompt="a red circle", negative_prompt="blurry", model="tiny-sd15", resolution="64x96",
        sampler="DPM++ 2M", steps=3, cfg_scale=6.5, seed=1234, batch_count=2, api_name="/txt2img")
    assert len(images) == 2
    for index, item in enumerate(images):
        params = _png_parameters(item["image"])
        assert params["Prompt"] == "a red circle" and params["Negative prompt"] == "blurry"
        assert (params["Seed"], params["Steps"], params["Sampler"]) == (str(1234 + index), "3", "DPM++ 2M")
        assert params["Size"] == params["_size"] == "64x96"
        assert params["CFG scale"] == "6.5" and params["Model"] == "tiny-sd15"
    assert "Seed: 1234" in info
    assert stats.startswith("Seed 1234") and "it/s" in stats
    saved = sorted(p.name for p in (ui_server.outputs / "txt2img-images").glob("*/*-123[45].png"))
    assert [name.split("-", 1)[1] for name in saved] == ["1234.png", "1235.png"]
    assert _png_parameters(str(next((ui_server.outputs / "txt2img-images").glob("*/*-1235.png"))))["Seed"] == "1235"


def test_random_seed_is_reported(client):
    images, info, _ = client.predict(prompt="a square", steps=2, seed=-1, api_name="/txt2img")
    seed = int(parse_infotext(info)["Seed"])
    assert 0 <= seed < 2**32 and _png_parameters(images[0]["image"])["Seed"] == str(seed)


def test_img2img_returns_pngs_with_the_request_parameters(client, tmp_path):
    from gradio_client import handle_file

    source = tmp_path / "source.png"
    Image.new("RGB", (80, 50), (200, 30, 30)).save(source)
    images, info, _ = client.predict(
        init_image=handle_file(str(source)), prompt="a blue square", negative_prompt="", model="tiny-sd15",
        resolution="64x64", sampler="Euler", steps=4, cfg_scale=7, seed=77, batch_count=1, denoising_strength=0.5,
        resize_mode="crop and resize", api_name="/img2img")
    assert len(images) == 1
    params = _png_parameters(images[0]["image"])
    assert (params["Prompt"], params["Seed"], params["Sampler"], params["Steps"]) == ("a blue square", "77", "Euler", "4")
    assert params["Size"] == params["_size"] == "64x64"
    assert params["Denoising strength"] == "0.5"


# Bad requests (sizes, samplers, models, numbers, images) and what each says: test_input_table.py.


def test_interrupt_stops_only_its_own_session_and_others_take_turns_in_the_engine_queue(ui_server):
    """Two users: B's interrupt leaves A's job running; B's job waits in the engine's queue (its
    progress shows its position) and runs between two of A's images instead of after A's whole
    batch; A's interrupt stops A at a step boundary, keeping the finished images."""
    from gradio_client import Client

    a = Client(ui_server.url, verbose=False, download_files=str(ui_server.tmp / "a"))
    b = Client(ui_server.url, verbose=False, download_files=str(ui_server.tmp / "b"))
    long_job = a.submit(prompt="a long job", steps=150, batch_count=16, seed=10, api_name="/txt2img")
    _wait_for(lambda: _image_number(long_job) >= 1, "the long job to start")
    b.predict(api_name="/txt2img_interrupt")  # B has nothing running: A's job must go on
    queued = b.submit(prompt="between two images", steps=2, seed=11, api_name="/txt2img")
    # B's job shows its queue position while A's image runs (unless A's image ended within the 50 ms
    # between two polls, B then running at once: either way it must finish before A's batch does)
    _wait_for(lambda: "In queue: position 1" in _progress_text(queued) or queued.done(),
              "B's job to wait in the engine queue")
    images_b, _, stats_b = queued.result(timeout=60)
    assert len(images_b) == 1 and "Interrupted" not in stats_b
    assert not long_job.done(), "B waited for A's whole batch, or B's interrupt stopped A"

    _wait_for(lambda: _image_number(long_job) >= 3, "the long job's third image")
    started = time.monotonic()
    a.predict(api_name="/txt2img_interrupt")
    images, _, stats = long_job.result(timeout=60)
    assert time.monotonic() - started < 20
    assert stats.startswith("**Interrupted**") and 2 <= len(images) < 16
    assert f"after {len(images)} of 16 images" in stats


def test_models_load_and_unload(client):
    message = client.predict("tiny-sd15", "64x64", api_name="/load_model")[2]
    assert message.startswith("Loaded **tiny-sd15@64x64**")
    table = client.predict("tiny-sd15", "64x64", api_name="/unload_model")[0]
    rows = {(row[0], row[3]): row for row in table["data"]}
    assert rows[("tiny-sd15", "64x64")][4] == "1, 4"  # batch sizes from the registry
    assert rows[("tiny-sd15", "64x64")][5] == "75"  # prompt tokens (prompt_chunks [1])
    assert rows[("tiny-sd15", "64x64")][7] == ""
    assert "compile_all.py" not in rows[("tiny-sd15", "64x64")][8]


def test_png_info_reads_our_parameters(client, tmp_path):
    from gradio_client import handle_file

    from engine.infotext import png_with_parameters

    path = tmp_path / "a1111.png"
    text = "a cat\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 9, Size: 512x512"
    path.write_bytes(png_with_parameters(Image.new("RGB", (8, 8)), text))
    parameters, table = client.predict(handle_file(str(path)), api_name="/png_info")
    assert parameters == text and "<th>Sampler</th><td>Euler a</td>" in table


def test_png_info_names_a_file_that_is_not_an_image(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    path = tmp_path / "notes.png"
    path.write_text("these are notes, not a picture")
    with pytest.raises(AppError, match=r"Source: the file is not a readable image") as failure:
        client.predict(handle_file(str(path)), api_name="/png_info")
    assert "Could not preprocess" not in str(failure.value)


def _progress_text(job) -> str:
    return " ".join(unit.desc or "" for unit in (job.status().progress_data or []))


def _image_number(job) -> int:
    """Which image of its batch a job is making, from its progress line ("Image 3/16 · step ...")."""
    match = re.search(r"Image (\d+)/", _progress_text(job))
    return int(match.group(1)) if match else 0


def _wait_for(condition, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# --- settings (no server needed) -----------------------------------------------------------------

def test_settings_from_flags_and_environment(tmp_path):
    auth_file = tmp_path / "users.txt"
    auth_file.write_text("# team\nalice:wonder\n\nbob:builder\n")
    env = {"SD_BACKEND": "eager", "GRADIO_SERVER_PORT": "9000", "SD_MAX_WARM": "3", "SD_REGISTRY": "reg.yaml"}
    settings = parse_settings(["--port", "9001", "--auth-file", str(auth_file), "--preload", "a, b@512x768",
                               "--share"], env)
    assert settings == AppSettings(registry=Path("reg.yaml"), backend="eager", port=9001, share=True,
                                   auth=(("alice", "wonder"), ("bob", "builder")),
                                   preload=(Preload("a"), Preload("b", "512x768")), max_warm=3)
    assert not settings.share_without_auth


def test_settings_defaults_and_share_warning():
    from engine.registry import DEFAULT_REGISTRY

    with pytest.raises(SettingsError, match="--share makes this machine reachable by anyone"):
        parse_settings(["--share"], {})
    settings = parse_settings(["--share", "--insecure-share"], {})
    assert (settings.registry, settings.host, settings.port, settings.backend) == (
        DEFAULT_REGISTRY, "127.0.0.1", 7860, "auto")
    assert settings.outputs == Path("outputs") and settings.concurrency == 1
    assert settings.share_without_auth and "anyone with the public link" in SHARE_WARNING


def test_replica_and_ray_settings():
    settings = parse_settings(["--replicas", "sd15=2", "--replicas", "sdxl@1024x1024=3", "--replicas", "auto"], {})
    assert settings.replicas == (Replicas("sd15", None, 2), Replicas("sdxl", "1024x1024", 3))
    assert settings.replicas_auto and settings.ray is None
    assert settings.public_flags()["replicas"] == ["auto", "sd15=2", "sdxl@1024x1024=3"]
    from_env = parse_settings([], {"SD_REPLICAS": "sd15=2, auto", "SD_RAY": "1"})
    assert from_env.replicas == (Replicas("sd15", None, 2),) and from_env.replicas_auto and from_env.ray == ""
    assert parse_settings(["--ray"], {}).ray == ""
    assert parse_settings(["--ray", "ray://head:10001"], {}).ray == "ray://head:10001"


def test_cpu_serves_auto_replicas_unless_told_otherwise():
    """The cpu backend's default is a copy of the default model per --threads cores (the measured way
    to use a 2-core host, docs/performance.md); Neuron and GPU keep one copy; naming models or
    ``off`` turns it off."""
    import app

    default = parse_settings([], {})
    assert default.replicas_auto is None and default.public_flags()["replicas"] == []
    assert app.replicas_auto(default, "cpu") and app.engine_settings(default, "cpu").replicas_auto
    assert not app.replicas_auto(default, "neuron") and not app.replicas_auto(default, "eager")
    assert not app.replicas_auto(parse_settings(["--replicas", "sd15=2"], {}), "cpu")
    off = parse_settings(["--replicas", "off"], {})
    assert off.replicas_auto is False and not app.replicas_auto(off, "cpu") and off.public_flags()["replicas"] == ["off"]
    assert not app.replicas_auto(parse_settings([], {"SD_REPLICAS": "off"}), "cpu")
    assert app.replicas_auto(parse_settings(["--replicas", "auto"], {}), "neuron")
    with pytest.raises(SettingsError, match="give auto or off, not both"):
        parse_settings(["--replicas", "auto", "--replicas", "off"], {})


def test_replicas_reach_the_engine_and_bad_names_are_refused(compiled_registry, capsys, monkeypatch):
    import torch

    import app

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # main() sets the process's threads

    settings = parse_settings(["--registry", str(compiled_registry.path), "--replicas", "tiny-sd15@64x64=2"], {})
    assert app.engine_settings(settings).replicas == (ReplicaTarget("tiny-sd15", Size(64, 64), 2),)
    assert app.main(["--registry", str(compiled_registry.path), "--replicas", "no-such-model=2", "--no-autocompile"]) == 2
    assert "no-such-model" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--auth", "nopassword"], "expected USER:PASS"),
    (["--replicas", "sd15"], "write MODEL=N or MODEL@WxH=N"),
    (["--replicas", "sd15=0"], "must be at least 1"),
    (["--max-warm", "0"], "--max-warm must be at least 1"),
    (["--port", "http"], "--port must be an integer"),
    (["--auth-file", "/nonexistent/users"], "cannot read it"),
])
def test_bad_settings_are_named(argv, message):
    with pytest.raises(SettingsError, match=message):
        parse_settings(argv, {})


# --- the eager backend, in process ----------------------------------------------------------------

def test_eager_backend_takes_width_and_height_in_process(eager_engine, tmp_path, monkeypatch, caplog):
    """On the any-size eager backend the sliders set the size; here the app runs in this process."""
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))  # read by gradio when it saves files
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    from gradio_client import Client

    from ui import build_app

    settings = AppSettings(registry=eager_engine.registry.path, backend="eager", outputs=tmp_path / "outputs")
    demo = build_app(eager_engine, settings)
    from ui_server import free_port

    demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False, download_files=str(tmp_path / "downloads"))
        images, info, _ = client.predict(prompt="a wide one", model="tiny-sd15", width=96, height=64, steps=2,
                                         seed=3, api_name="/txt2img")
        assert _png_parameters(images[0]["image"])["_size"] == "96x64" and "Size: 96x64" in info
        assert len(list((tmp_path / "outputs" / "txt2img-images").glob("*/00000-3.png"))) == 1
        _unexpected_errors_are_generic_and_logged_once(client, eager_engine, monkeypatch, caplog)
    finally:
        demo.close()


def _unexpected_errors_are_generic_and_logged_once(client, engine, monkeypatch, caplog) -> None:
    from gradio_client.exceptions import AppError

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(engine, "submit", broken)
    caplog.clear()
    with pytest.raises(AppError, match="txt2img failed with an internal error; the details are in the server log"):
        client.predict(prompt="x", steps=2, api_name="/txt2img")
    logged = [r for r in caplog.records if r.name == "ui" and r.exc_info]
    assert len(logged) == 1 and "disk on fire" in str(logged[0].exc_info[1])
    monkeypatch.undo()
    images, _, _ = client.predict(prompt="x", steps=2, api_name="/txt2img")
    assert len(images) == 1


def test_a_truncated_prompt_is_shown_with_its_dropped_words(client):
    words = " ".join(f"word{i}" for i in range(40))
    images, _, stats = client.predict(prompt=words, steps=2, seed=3, api_name="/txt2img")
    assert len(images) == 1 and "⚠️ the prompt is" in stats and "these words were ignored" in stats
