"""``python -m engine bench``: the numbers' arithmetic, and one real (tiny) run through every output."""
from __future__ import annotations

import argparse

import csv
import json
from pathlib import Path

import pytest

from engine.bench import (INSTANCE_PRICES, BenchRow, BenchSettings, RunSample, _steps_list, cost_per_10k_images,
                          pairwise_ratios, percentile, run_bench)
from engine.bench_report import COLUMNS, command_line, format_text, row_values, to_csv, write_all
from engine.types import Size


def test_percentile_interpolates_like_numpy():
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 95) == pytest.approx(4.8)
    assert percentile([5.0, 1.0, 3.0], 0) == 1.0


def test_ratios_are_pairwise_per_run():
    assert pairwise_ratios([1.0, 3.0], [2.0, 4.0]) == (0.5, 0.75)
    with pytest.raises(ValueError):
        pairwise_ratios([1.0], [1.0, 2.0])


def test_cost_per_10k_images_from_hourly_price():
    # one image per second for 10,000 s at $3.60/h is $10
    assert cost_per_10k_images(3.6, 1.0) == pytest.approx(10.0)
    assert cost_per_10k_images(INSTANCE_PRICES["inf2.xlarge"], 0.970) == pytest.approx(0.7582 * 10000 / 0.970 / 3600)
    assert cost_per_10k_images(None, 1.0) is None
    assert BenchSettings(instance="inf2.8xlarge").price() == 1.9679
    assert BenchSettings(instance="inf2.8xlarge", price_per_hour=2.0).price() == 2.0


def test_row_statistics():
    samples = tuple(RunSample(seconds=s, denoise_s=s / 2, steps=10, unet_s=s / 4, unet_calls=10) for s in (1.0, 2.0, 3.0))
    row = BenchRow("cpu", "m", Size(64, 64), "fp32", "Euler", 10, samples, cold_start_s=5.0, peak_rss_mb=100.0,
                   added_rss_mb=10.0, unet_flops=1e9, price_per_hour=3.6)
    assert row.p50_s == 2.0
    assert row.mean_s == 2.0
    assert row.images_per_s == 0.5
    assert row.cost_per_10k == pytest.approx(20.0)
    assert row.it_per_s == pytest.approx(10.0)  # 10 steps in 1.0 s (median denoise time)
    assert row.unet_share == pytest.approx(0.25)
    assert row.unet_flops_per_s == pytest.approx(1e9 * 10 / 0.5)  # median over runs


def test_steps_option_parses_lists():
    assert _steps_list("20,30,50") == (20, 30, 50)
    for bad in ("", "a,b", "0"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"expected positive step counts such as 20,30,50, found {bad!r}"):
            _steps_list(bad)


def test_bench_compare_and_switch_on_tiny_model(compiled_registry, tmp_path: Path):
    """One short real run: engine cpu + eager + plain diffusers interleaved, then model switching."""
    settings = BenchSettings(registry=compiled_registry.path, model="tiny-sd15", steps=(2, 3), runs=2, warmup=0,
                             backend="cpu", instance="inf2.xlarge", compare="diffusers", switch_model="tiny-sd21")
    report = run_bench(settings, log=lambda line: None)

    assert [(r.runner, r.steps) for r in report.rows] == [
        ("cpu", 2), ("cpu", 3), ("eager", 2), ("eager", 3), ("diffusers", 2), ("diffusers", 3)]
    for row in report.rows:
        assert len(row.samples) == 2 and row.unet_flops > 0 and 0 < row.load_s < row.cold_start_s and row.peak_rss_mb > 0
        assert row.unet_calls == row.steps  # one CFG-batched UNet call per Euler a step
        for sample in row.samples:  # the phases are measured inside the request and add up to less
            assert sample.text_encoder_s > 0 and sample.unet_s > 0 and sample.vae_decode_s > 0 and sample.rest_s > 0
        assert row.cost_per_10k == pytest.approx(cost_per_10k_images(0.7582, row.images_per_s))
    for comp, steps in zip(report.comparisons, (2, 3)):
        assert comp.steps == steps and set(comp.ratios) == {"cpu", "eager"}
        by_runner = {r.runner: r for r in report.rows if r.steps == steps}
        expected = [a / c for a, c in zip(by_runner["cpu"].latencies, by_runner["diffusers"].latencies)]
        assert list(comp.ratios["cpu"]) == pytest.approx(expected)
        # same seed, same scheduler, fp32: the engine's images are plain diffusers' images
        assert comp.max_pixel_diff == {"cpu": 0, "eager": 0}
    assert report.switch is not None and len(report.switch.switch_s) == 2

    paths = write_all(report, tmp_path)
    assert [p.name for p in paths] == ["bench.md", "bench.csv", "bench.json", "bench.png"]
    with open(tmp_path / "bench.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == [name for name, _ in COLUMNS] and len(table) == 6
    assert float(table[0]["p50_s"]) == pytest.approx(report.rows[0].p50_s, rel=1e-5)
    markdown = (tmp_path / "bench.md").read_text()
    assert command_line(settings) in markdown and "model: tiny-sd15" in markdown and "| cpu | 2 |" in markdown
    assert "cpu/diffusers" in markdown and "model switching" in markdown and "checked 2026-11" in markdown
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["comparisons"][0]["medians"]["cpu"] == pytest.approx(report.comparisons[0].median("cpu"))
    from PIL import Image

    assert Image.open(tmp_path / "bench.png").size[0] > 100
    text = format_text(report)
    assert "P50 s" in text and "median" in text
    assert row_values(report.rows[0], report)["pct_of_peak"] > 0
    assert to_csv(report).count("\n") == 7


def test_cli_registers_bench(tmp_path: Path, compiled_registry, capsys):
    from engine.cli import main

    out = tmp_path / "cli"
    assert main(["bench", "--registry", str(compiled_registry.path), "--model", "tiny-sdxl", "--steps", "2",
                 "--runs", "1", "--warmup", "0", "--backend", "cpu", "--price-per-hour", "1.5",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tiny-sdxl" in printed and "$1.5/h as given" in printed
    assert (out / "bench.csv").is_file() and (out / "bench.png").is_file()


def test_each_view_gets_a_fresh_scheduler_copy(cpu_engine):
    """The scheduler prototype cache (a speed fix) still gives every request a scheduler of its own."""
    warm = cpu_engine.load("tiny-sd15")
    first, second = warm.view("txt2img", "DPM++ 2M"), warm.view("txt2img", "DPM++ 2M")
    assert first.scheduler is not second.scheduler
    first.scheduler.set_timesteps(5)
    assert second.scheduler.num_inference_steps is None
    assert dict(first.scheduler.config) == dict(second.scheduler.config)
    assert type(warm.view("txt2img", "Euler a").scheduler).__name__ == "EulerAncestralDiscreteScheduler"


def test_cpu_bf16_convolutional_components_are_traced_channels_last(tiny_dir, tmp_path: Path):
    """bf16 UNet/VAE artifacts carry NHWC weights (a speed fix); fp32 artifacts and text encoders do not."""
    import yaml

    from engine import Engine, GenerateRequest
    from engine.artifacts import read_manifest, variant_dir
    from engine.backends import make_backend
    from engine.compile import compile_all
    from engine.registry import load_registry

    source = {"local": str(tiny_dir / "tiny-sd15")}
    models = [{"id": f"tiny-{dtype}", "family": "sd15", "source": source, "dtype": dtype, "resolutions": ["64x64"],
               "defaults": {"sampler": "Euler", "steps": 2}} for dtype in ("fp32", "bf16")]
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"artifacts_dir": "artifacts", "models": models}))
    registry = load_registry(path)
    backend = make_backend("cpu")
    assert all(o.state == "compiled" for o in compile_all(registry, backend, log=lambda line: None))
    for dtype, expected in (("bf16", "channels_last"), ("fp32", "contiguous")):
        manifest = read_manifest(variant_dir(registry.artifacts_dir, f"tiny-{dtype}", Size(64, 64), "cpu"))
        formats = {name: entry["memory_format"] for name, entry in manifest["components"].items()}
        assert formats == {"text_encoder": "contiguous", "unet": expected, "vae_decoder": expected,
                           "vae_encoder": expected}
    result = Engine(registry, backend).generate(GenerateRequest(model="tiny-bf16", prompt="a cat", seed=1))
    assert result.images[0].image.size == (64, 64)


def test_concurrency_bench_runs_through_the_queue_with_batching_off_and_on(compiled_registry, tmp_path):
    """``--concurrency``: the same requests at each level, batching off then on; batched images within 1 level."""
    from engine.bench_concurrency import run_concurrency, write_all

    rows = run_concurrency(compiled_registry, "cpu", (1, 4), requests=4, model="tiny-sd15", size=None, steps=2,
                           prompt="a red circle", seed=7, log=lambda line: None)
    assert [(r.label, r.clients) for r in rows] == [("off", 1), ("off", 4), ("on", 1), ("on", 4)]
    assert [r.max_batch_seen for r in rows[:3]] == [1, 1, 1]  # off never batches; one client has no company
    assert rows[3].max_batch_seen >= 2  # 3 clients' requests wait while the first one runs
    assert rows[0].max_pixel_diff is None and all(r.max_pixel_diff <= 1 for r in rows[1:])
    assert all(r.requests == 4 and r.images_per_s > 0 and r.p95_s >= r.p50_s for r in rows)
    paths = write_all(rows, "tiny", tmp_path)
    assert [p.name for p in paths] == ["concurrency.md", "concurrency.json", "concurrency.png"]
    assert "| on | 4 | 4 |" in paths[0].read_text()


def test_concurrency_bench_adds_a_row_with_warm_replicas(compiled_registry, monkeypatch):
    """``--replicas 2``: a third configuration, batching on with two warm copies of the model."""
    import engine.bench_concurrency as bench_concurrency

    warm_copies = []
    make_engine = bench_concurrency._engine

    def counting(*args):
        engine = make_engine(*args)
        warm_copies.append(len([i for i in engine.pool.snapshot() if i.key.model == "tiny-sd15"]))
        return engine

    monkeypatch.setattr(bench_concurrency, "_engine", counting)
    rows = bench_concurrency.run_concurrency(compiled_registry, "cpu", (2,), requests=2, model="tiny-sd15", size=None,
                                             steps=2, prompt="a red circle", seed=7, log=lambda line: None, replicas=2)
    assert [r.label for r in rows] == ["off", "on", "on x2"] and warm_copies == [0, 0, 2]
    assert all(r.max_pixel_diff <= 1 for r in rows[1:])
