"""Launch ``python app.py`` on the tiny compiled registry for the UI tests (a pytest plugin).

Test modules load it with ``pytest_plugins = ["ui_server"]`` so the session fixture ``ui_server``
is one server shared by the API and browser tests (starting one costs ~10 s: gradio, torch and
diffusers imports). The app runs in a subprocess, exactly as a user starts it, on a free loopback
port, with ``GRADIO_TEMP_DIR`` and the outputs directory in the test's tmp dir and one CPU thread.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import pytest

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AppServer:
    """A running ``app.py``: its URL, outputs directory and log file."""

    process: subprocess.Popen
    url: str
    outputs: Path
    log_path: Path
    tmp: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def child_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "SD_"))}
    env.update(
        GRADIO_TEMP_DIR=str(tmp / "gradio"), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1",
    )
    return env


def start_app(registry: Path, tmp: Path, extra_args: Sequence[str] = (), backend: str = "cpu",
              timeout_s: float = START_TIMEOUT_S) -> AppServer:
    """Start the app and wait until its page answers; fails with the app's log if it does not."""
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    outputs = tmp / "outputs"
    log_path = tmp / "app.log"
    # one copy of each model unless the test asks for replicas: queue positions and timings stay those
    # of one device worker whatever the machine's cores (test_app_api.py checks the cpu default, auto)
    replicas = () if any(arg.startswith("--replicas") for arg in extra_args) else ("--replicas", "off")
    command = [sys.executable, str(ROOT / "app.py"), "--registry", str(registry), "--backend", backend,
               "--host", "127.0.0.1", "--port", str(port), "--outputs", str(outputs), "--threads", "1",
               *replicas, *extra_args]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=tmp, env=child_env(tmp), stdout=log, stderr=subprocess.STDOUT)
    server = AppServer(process, f"http://127.0.0.1:{port}/", outputs, log_path, tmp)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(f"app.py exited with {process.returncode}:\n{server.log()}")
        if _answers(server.url):
            return server
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"app.py did not answer within {timeout_s:.0f}s:\n{server.log()}")


def _answers(url: str) -> bool:
    """The server answers HTTP (a 401 behind --auth counts: it is up)."""
    try:
        with urllib.request.urlopen(url + "config", timeout=2) as response:
            return response.status == 200
    except urllib.error.HTTPError as error:
        return error.code == 401
    except OSError:
        return False


@pytest.fixture(scope="session")
def ui_server(compiled_registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    """``app.py`` serving the tiny compiled registry on the cpu backend (one per test session)."""
    server = start_app(Path(compiled_registry.path), tmp_path_factory.mktemp("ui-server"))
    try:
        yield server
    finally:
        server.stop()
    # Handlers log unexpected exceptions (with their traceback) as "ERROR ui: ... failed".
    assert "ERROR ui:" not in server.log(), f"the app hit an unexpected exception:\n{server.log()}"


def last_outputs(server: AppServer, mode: str = "txt2img", count: Optional[int] = None) -> list[Path]:
    """The PNGs the app saved for ``mode``, oldest first."""
    files = sorted((server.outputs / f"{mode}-images").glob("*/*.png"))
    return files if count is None else files[-count:]
