"""``python -m engine generate`` as a user runs it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from engine.infotext import parse_infotext, read_parameters

ROOT = Path(__file__).resolve().parent.parent


def run_engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)


def test_generate_txt2img_and_img2img(compiled_registry, tmp_path):
    out = tmp_path / "cat.png"
    result = run_engine("generate", "--registry", str(compiled_registry.path), "--model", "tiny-sdxl",
                        "--prompt", "a cat", "--negative-prompt", "dog", "--sampler", "DPM++ 2M Karras",
                        "--steps", "3", "--cfg", "4.5", "--seed", "11", "--num-images", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "tiny-sdxl 64x64 on cpu" in result.stdout
    params = parse_infotext(read_parameters(Image.open(out)))
    assert params["Seed"] == "11" and params["Sampler"] == "DPM++ 2M Karras" and params["CFG scale"] == "4.5"
    assert parse_infotext(read_parameters(Image.open(tmp_path / "cat-1.png")))["Seed"] == "12"

    edited = tmp_path / "edited.png"
    result = run_engine("generate", "--registry", str(compiled_registry.path), "--prompt", "a dog", "--steps", "4",
                        "--init-image", str(out), "--strength", "0.5", "--out", str(edited))
    assert result.returncode == 0, result.stderr
    assert parse_infotext(read_parameters(Image.open(edited)))["Denoising strength"] == "0.5"


def test_generate_error_is_one_readable_line(compiled_registry, tmp_path):
    result = run_engine("generate", "--registry", str(compiled_registry.path), "--prompt", "x", "--size", "96x96",
                        "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2
    assert result.stderr.startswith("error: 96x96 is not compiled for tiny-sd15; compiled: 64x64, 64x96")
    assert "Traceback" not in result.stderr


def test_generate_on_a_fresh_checkout_compiles_the_model_first_like_the_app(tiny_dir, tmp_path):
    """No compile_all.py step needed: the requested model and size are compiled, once."""
    import yaml

    data = yaml.safe_load((tiny_dir / "model_registry.yaml").read_text())
    data["models"] = [dict(m, source={"local": str(tiny_dir / m["source"]["local"])})
                      for m in data["models"] if m["id"] == "tiny-sd21"]
    data.update(default_model="tiny-sd21", artifacts_dir=str(tmp_path / "artifacts"))
    registry = tmp_path / "registry.yaml"
    registry.write_text(yaml.safe_dump(data))
    args = ("generate", "--registry", str(registry), "--backend", "cpu", "--prompt", "x", "--steps", "2")
    refused = run_engine(*args, "--no-autocompile", "--out", str(tmp_path / "refused.png"))
    assert refused.returncode == 2 and "compile_all.py" in refused.stderr
    first = run_engine(*args, "--out", str(tmp_path / "first.png"))
    assert first.returncode == 0, first.stderr
    assert "Compiling tiny-sd21 (64x64) for the cpu backend" in first.stderr and (tmp_path / "first.png").exists()
    second = run_engine(*args, "--out", str(tmp_path / "second.png"))
    assert second.returncode == 0 and "Compiling" not in second.stderr
