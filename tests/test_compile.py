"""compile_all: artifact layout, manifest, incremental and forced runs, atomicity, CLI summary."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from engine import artifacts
from engine.backends import make_backend
from engine.compile import compile_all, plan
from engine.registry import load_registry
from engine.types import Size

ROOT = Path(__file__).resolve().parent.parent


def _registry_copy(tiny_dir: Path, tmp_path: Path, models: list[str], artifacts_dir: str = "artifacts") -> Path:
    """A registry over the tiny models with its own artifacts directory."""
    data = yaml.safe_load((tiny_dir / "model_registry.yaml").read_text())
    data["models"] = [dict(m, source={"local": str(tiny_dir / m["source"]["local"])})
                      for m in data["models"] if m["id"] in models]
    data["default_model"] = models[0]
    data["artifacts_dir"] = str(tmp_path / artifacts_dir)
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "compile_all.py"), *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300, **kwargs)


def test_layout_and_manifest(compiled_registry):
    directory = artifacts.variant_dir(compiled_registry.artifacts_dir, "tiny-sdxl", Size(64, 64), "cpu")
    manifest = json.loads((directory / "manifest.json").read_text())
    assert set(manifest["components"]) == {"text_encoder", "text_encoder_2", "unet", "unet_b3", "vae_decoder",
                                           "vae_encoder"}
    unet = manifest["components"]["unet"]
    assert unet["file"] == "unet/model.pt" and (directory / unet["file"]).stat().st_size == unet["bytes"]
    assert [i["shape"] for i in unet["inputs"]] == [[2, 4, 8, 8], [2], [2, 77, 64], [2, 32], [2, 6]]
    # batch_sizes: [3] in the registry: one more UNet for 3 requests (6 rows with CFG); 1 is always there.
    unet_b3 = manifest["components"]["unet_b3"]
    assert manifest["batch_sizes"] == [1, 3] and unet_b3["file"] == "unet_b3/model.pt" and unet_b3["batch"] == 6
    assert [i["shape"] for i in unet_b3["inputs"]] == [[6, 4, 8, 8], [6], [6, 77, 64], [6, 32], [6, 6]]
    assert len(unet["sha256"]) == 64 and unet["compile_seconds"] > 0
    assert manifest["versions"]["torch"] and manifest["versions"]["diffusers"]
    assert manifest["source"]["kind"] == "local" and manifest["dtype"] == "fp32" and manifest["size"] == "64x64"
    assert artifacts.verify_checksums(directory, manifest) == []


def test_incremental_force_and_status_table(tiny_dir, tmp_path):
    registry = load_registry(_registry_copy(tiny_dir, tmp_path, ["tiny-sd21"]))
    backend = make_backend("cpu")
    assert [r.status.state for r in plan(registry, backend)] == ["missing"]
    first = compile_all(registry, backend, log=lambda line: None)
    assert [o.state for o in first] == ["compiled"]
    manifest_path = artifacts.variant_dir(registry.artifacts_dir, "tiny-sd21", Size(64, 64), "cpu") / "manifest.json"
    created = manifest_path.stat().st_mtime_ns
    assert [o.state for o in compile_all(registry, backend, log=lambda line: None)] == ["skipped"]
    assert manifest_path.stat().st_mtime_ns == created
    assert [o.state for o in compile_all(registry, backend, force=True, log=lambda line: None)] == ["compiled"]
    assert manifest_path.stat().st_mtime_ns != created
    listing = _run_cli("--registry", str(registry.path), "--backend", "cpu", "--list")
    assert listing.returncode == 0 and "tiny-sd21" in listing.stdout and "compiled" in listing.stdout


def test_dry_run_compiles_nothing(tiny_dir, tmp_path):
    path = _registry_copy(tiny_dir, tmp_path, ["tiny-sd15"])
    result = _run_cli("--registry", str(path), "--backend", "cpu", "--dry-run", "--resolutions", "64x96")
    assert result.returncode == 0, result.stderr
    assert "64x96" in result.stdout and "64x64" not in result.stdout and "would compile 1 of 1" in result.stdout
    assert not (tmp_path / "artifacts").exists()


def test_failure_gives_nonzero_exit_and_summary(tiny_dir, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_index.json").write_text("{}")
    path = _registry_copy(tiny_dir, tmp_path, ["tiny-sd15"])
    data = yaml.safe_load(path.read_text())
    data["models"].append({"id": "broken", "family": "sd15", "source": {"local": str(broken)}, "resolutions": ["64x64"]})
    path.write_text(yaml.safe_dump(data))
    result = _run_cli("--registry", str(path), "--backend", "cpu", "--resolutions", "64x64")
    assert result.returncode == 1
    assert "summary: 1 compiled, 0 up to date, 1 failed" in result.stdout
    assert "FAILED broken 64x64" in result.stderr and "cannot load" in result.stderr


def test_exception_mid_compile_publishes_nothing(tiny_dir, tmp_path, monkeypatch):
    registry = load_registry(_registry_copy(tiny_dir, tmp_path, ["tiny-sd15"]))
    backend = make_backend("cpu")
    original = backend.compile_component

    def interrupt_at_unet(family, component, *args, **kwargs):
        if component == "unet":
            raise KeyboardInterrupt
        return original(family, component, *args, **kwargs)

    monkeypatch.setattr(backend, "compile_component", interrupt_at_unet)
    with pytest.raises(KeyboardInterrupt):
        compile_all(registry, backend, resolutions=[Size(64, 64)], log=lambda line: None)
    variant_parent = registry.artifacts_dir / "tiny-sd15" / "64x64"
    assert list(variant_parent.iterdir()) == []
    assert plan(registry, backend, resolutions=[Size(64, 64)])[0].status.state == "missing"


def test_kill_9_mid_compile_leaves_nothing_loadable(tiny_dir, tmp_path):
    path = _registry_copy(tiny_dir, tmp_path, ["tiny-sdxl"])
    process = subprocess.Popen([sys.executable, str(ROOT / "compile_all.py"), "--registry", str(path), "--backend", "cpu"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    for line in process.stdout:  # wait until a component has been written into the partial directory
        if "text_encoder_2  done" in line or time.time() > deadline:
            break
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    parent = tmp_path / "artifacts" / "tiny-sdxl" / "64x64"
    leftovers = list(parent.iterdir())
    assert leftovers and all(p.name.startswith(".partial-") for p in leftovers)
    registry = load_registry(path)
    assert plan(registry, make_backend("cpu"))[0].status.state == "missing"
    rerun = _run_cli("--registry", str(path), "--backend", "cpu", "--list")
    assert "removing leftover of an interrupted compile" in rerun.stdout
    assert [p.name for p in parent.iterdir()] == []


def test_kill_9_during_a_forced_recompile_leaves_the_old_artifact_byte_identical(tiny_dir, tmp_path):
    """`compile_all.py --force` over a good artifact, killed mid-way: the old artifact's files keep
    their sha256, the variant stays "compiled" and it still generates."""
    import hashlib

    from engine import Engine, EngineSettings, GenerateRequest

    path = _registry_copy(tiny_dir, tmp_path, ["tiny-sdxl"])
    assert _run_cli("--registry", str(path), "--backend", "cpu").returncode == 0
    variant = tmp_path / "artifacts" / "tiny-sdxl" / "64x64" / "cpu"

    def digests() -> dict[str, str]:
        return {str(p.relative_to(variant)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(variant.rglob("*")) if p.is_file()}

    before = digests()
    process = subprocess.Popen([sys.executable, str(ROOT / "compile_all.py"), "--registry", str(path), "--backend",
                                "cpu", "--force"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    for line in process.stdout:  # killed once the new compile has written a component
        if "text_encoder_2  done" in line or time.time() > deadline:
            break
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert digests() == before and before
    registry = load_registry(path)
    backend = make_backend("cpu")
    assert plan(registry, backend)[0].status.state == "compiled"
    engine = Engine(registry, backend, EngineSettings(max_warm=1))
    try:
        image = engine.generate(GenerateRequest(model="tiny-sdxl", prompt="p", seed=1, steps=2)).images[0].image
        assert image.size == (64, 64)
    finally:
        engine.close()


def test_a_publish_killed_between_its_renames_gets_the_old_variant_back(tiny_dir, tmp_path):
    """The one window of a forced recompile: the old variant moved aside, the new one not yet in
    place. The next compile_all.py run puts the old one back (byte-identical) instead of deleting it."""
    path = _registry_copy(tiny_dir, tmp_path, ["tiny-sd21"])
    assert _run_cli("--registry", str(path), "--backend", "cpu").returncode == 0
    variant = tmp_path / "artifacts" / "tiny-sd21" / "64x64" / "cpu"
    files = {p.relative_to(variant): p.read_bytes() for p in variant.rglob("*") if p.is_file()}
    os.replace(variant, variant.parent / ".partial-old-cpu-0123abcd")  # what publish() does first ...
    (variant.parent / ".partial-cpu-4242-deadbeef").mkdir()  # ... with the new one still partial
    listing = _run_cli("--registry", str(path), "--backend", "cpu", "--list")
    assert f"restored a variant an interrupted compile had moved aside: {variant}" in listing.stdout
    assert "tiny-sd21" in listing.stdout and "compiled" in listing.stdout
    assert {p.relative_to(variant): p.read_bytes() for p in variant.rglob("*") if p.is_file()} == files
    assert [p.name for p in variant.parent.iterdir()] == ["cpu"]
