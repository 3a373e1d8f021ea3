"""Shared fixtures: tiny random-weight models of every family, built once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tiny models gain nothing from threads, and a shared 2-core machine loses a lot to oversubscription.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with tiny sd15/sd21/sdxl diffusers models and their model_registry.yaml."""
    from make_tiny_models import make_all
    from engine.cli import quiet_libraries

    quiet_libraries()
    out = tmp_path_factory.mktemp("tiny")
    make_all(out)
    return out


@pytest.fixture(scope="session")
def tiny_registry_path(tiny_dir: Path) -> Path:
    return tiny_dir / "model_registry.yaml"


@pytest.fixture(scope="session")
def compiled_registry(tiny_registry_path: Path):
    """The tiny registry with every variant compiled for the cpu backend."""
    from engine.backends import make_backend
    from engine.compile import compile_all
    from engine.registry import load_registry

    registry = load_registry(tiny_registry_path)
    outcomes = compile_all(registry, make_backend("cpu"), log=lambda line: None)
    assert all(o.state in ("compiled", "skipped") for o in outcomes), outcomes
    return registry


@pytest.fixture(scope="session")
def cpu_engine(compiled_registry):
    from engine import Engine, EngineSettings
    from engine.backends import make_backend

    return Engine(compiled_registry, make_backend("cpu"), EngineSettings(max_warm=3))


@pytest.fixture(scope="session")
def eager_engine(compiled_registry):
    from engine import Engine, EngineSettings
    from engine.backends import make_backend

    return Engine(compiled_registry, make_backend("eager"), EngineSettings(max_warm=3))
