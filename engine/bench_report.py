"""Render a ``BenchReport``: a text table for the terminal, Markdown, CSV, JSON and a PNG plot.

The PNG is drawn with Pillow (already a dependency) so the benchmark needs nothing extra.
"""
from __future__ import annotations

import csv
import io
import json
import shlex
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Optional

from .bench import PRICES_CHECKED, BenchReport, BenchRow, BenchSettings
from .types import Size

COLUMNS = (
    # (CSV name, table header)
    ("runner", "runner"),
    ("model", "model"),
    ("size", "size"),
    ("dtype", "dtype"),
    ("sampler", "sampler"),
    ("steps", "steps"),
    ("runs", "runs"),
    ("p50_s", "P50 s"),
    ("p95_s", "P95 s"),
    ("it_per_s", "it/s"),
    ("images_per_s", "img/s"),
    ("cost_per_10k_usd", "$/10k img"),
    ("cold_start_s", "cold start s"),
    ("load_s", "load s"),
    ("peak_rss_mb", "peak RSS MB"),
    ("added_rss_mb", "+RSS MB"),
    ("unet_gflop_per_call", "UNet GFLOP/call"),
    ("unet_calls_per_image", "UNet calls"),
    ("text_encoder_s", "text enc s"),
    ("unet_s", "UNet s"),
    ("vae_decode_s", "VAE dec s"),
    ("rest_s", "rest s"),
    ("unet_share", "UNet share"),
    ("unet_gflop_per_s", "UNet GFLOP/s"),
    ("pct_of_peak", "% of peak"),
)


def peak_flops(report: BenchReport, dtype: str) -> float:
    return float(report.machine.get("peak_bf16_flops" if dtype == "bf16" else "peak_fp32_flops") or 0.0)


def row_values(row: BenchRow, report: BenchReport) -> dict[str, Any]:
    """Raw values of one row, keyed by CSV column name."""
    peak = peak_flops(report, row.dtype)
    achieved = row.unet_flops_per_s
    return {
        "runner": row.runner,
        "model": row.model,
        "size": str(row.size),
        "dtype": row.dtype,
        "sampler": row.sampler,
        "steps": row.steps,
        "runs": len(row.samples),
        "p50_s": row.p50_s,
        "p95_s": row.p95_s,
        "it_per_s": row.it_per_s,
        "images_per_s": row.images_per_s,
        "cost_per_10k_usd": row.cost_per_10k,
        "cold_start_s": row.cold_start_s,
        "load_s": row.load_s,
        "peak_rss_mb": row.peak_rss_mb,
        "added_rss_mb": row.added_rss_mb,
        "unet_gflop_per_call": row.unet_flops / 1e9,
        "unet_calls_per_image": row.unet_calls,
        "text_encoder_s": row.text_encoder_s,
        "unet_s": row.unet_s,
        "vae_decode_s": row.vae_decode_s,
        "rest_s": row.rest_s,
        "unet_share": row.unet_share,
        "unet_gflop_per_s": achieved / 1e9,
        "pct_of_peak": 100.0 * achieved / peak if peak else None,
    }


def _fmt(name: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if name in ("steps", "runs"):
        return str(int(value))
    if name == "unet_calls_per_image":
        return f"{value:g}"
    if name == "unet_share":
        return f"{100 * value:.0f}%"
    if name in ("peak_rss_mb", "added_rss_mb"):
        return f"{value:.0f}"
    if name == "pct_of_peak":
        return f"{value:.1f}"
    if name == "cost_per_10k_usd":
        return f"{value:.2f}"
    if name in ("p50_s", "p95_s", "text_encoder_s", "unet_s", "vae_decode_s", "rest_s"):
        return f"{value:.3f}" if value < 10 else f"{value:.2f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def _table_cells(report: BenchReport) -> tuple[list[str], list[list[str]], list[str]]:
    """Headers and cells of the columns that differ between rows, and ``name: value`` of the rest."""
    cells = [[_fmt(name, row_values(row, report)[name]) for name, _ in COLUMNS] for row in report.rows]
    varying = [i for i in range(len(COLUMNS)) if len(report.rows) < 2 or len({r[i] for r in cells}) > 1
               or COLUMNS[i][0] in ("runner", "steps", "p50_s")]
    common = [f"{COLUMNS[i][1]}: {cells[0][i]}" for i in range(len(COLUMNS)) if i not in varying]
    return [COLUMNS[i][1] for i in varying], [[r[i] for i in varying] for r in cells], common


def command_line(settings: BenchSettings) -> str:
    """The command that reproduces this report."""
    parts = ["python", "-m", "engine", "bench", "--registry", str(settings.registry)]
    options: list[tuple[str, Optional[Any]]] = [
        ("--model", settings.model), ("--size", settings.size), ("--sampler", settings.sampler),
        ("--steps", ",".join(map(str, settings.steps)) or None), ("--runs", settings.runs),
        ("--warmup", settings.warmup), ("--backend", settings.backend),
        ("--price-per-hour", settings.price_per_hour), ("--instance", settings.instance),
        ("--compare", settings.compare), ("--switch-model", settings.switch_model),
        ("--cfg", settings.cfg_scale), ("--seed", settings.seed), ("--threads", settings.threads),
    ]
    for flag, value in options:
        if value is not None:
            parts += [flag, str(value)]
    if settings.prompt != BenchSettings.prompt:
        parts += ["--prompt", settings.prompt]
    if settings.negative_prompt:
        parts += ["--negative-prompt", settings.negative_prompt]
    return " ".join(shlex.quote(p) for p in parts)


def _machine_lines(report: BenchReport) -> list[str]:
    m = report.machine
    lines = [
        f"machine: {m['cpu']}, {m.get('logical_cpus')} logical CPUs, torch threads {m['torch_threads']}; "
        f"torch {m['torch']}, diffusers {m['diffusers']}; {m['date']}",
        f"estimated peak ({m['torch_threads']} cores x {m['ghz']:.2f} GHz x FLOPs/cycle, AVX-512 FMA): "
        f"fp32 {m['peak_fp32_flops'] / 1e9:.0f} GFLOP/s, bf16 {m['peak_bf16_flops'] / 1e9:.0f} GFLOP/s"
        + (f"; AMX bf16 {m['peak_amx_bf16_flops'] / 1e9:.0f} GFLOP/s (1024 FLOPs/cycle; bf16 rows can exceed "
           f"100% of the AVX-512 peak)" if m.get("peak_amx_bf16_flops") else ""),
    ]
    before, others = m.get("load_before"), m.get("other_cpu_cores")
    if before is not None or others is not None:
        spare = max(0, (m.get("logical_cpus") or 0) - m["torch_threads"])
        if (others or 0.0) > spare + 0.1:
            verdict = "  WARNING: they competed for our cores; timings are inflated"
        elif (others or 0.0) > 0.1:
            verdict = " (on cores this benchmark left free; they still share caches and memory bandwidth)"
        else:
            verdict = ""
        lines.append(f"interference: load average before start {_maybe(before)}, other processes kept "
                     f"{_maybe(others)} cores busy on average during the runs" + verdict)
    price = report.settings.price()
    if price is None:
        lines.append("cost: no price given (use --instance or --price-per-hour)")
    elif report.settings.instance:
        lines.append(f"cost: {report.settings.instance} at ${price}/h, us-east-1 on-demand, prices as published "
                     f"by AWS, checked {PRICES_CHECKED}; prices change")
    else:
        lines.append(f"cost: ${price}/h as given")
    return lines


def _maybe(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _comparison_lines(report: BenchReport, markdown: bool) -> list[str]:
    lines: list[str] = []
    for comp in report.comparisons:
        runners = list(comp.ratios)
        header = ["run", *[f"{r}/{comp.baseline}" for r in runners]]
        rows = [[str(i + 1), *[f"{comp.ratios[r][i]:.3f}" for r in runners]] for i in range(len(comp.ratios[runners[0]]))]
        rows.append(["median", *[f"{comp.median(r):.3f}" for r in runners]])
        title = f"latency ratios against plain {comp.baseline}, {comp.steps} steps (per run, then median)"
        diffs = ", ".join(f"{r} vs {comp.baseline}: {comp.max_pixel_diff[r]}" for r in runners)
        lines += ["", f"### {title}" if markdown else title, ""]
        lines += _render(header, rows, markdown)
        lines += ["", f"max pixel difference of run 1 (0-255): {diffs}"]
    return lines


def _switch_lines(report: BenchReport, markdown: bool) -> list[str]:
    s = report.switch
    if s is None:
        return []
    from statistics import median

    title = f"model switching: {s.model} alternating with {s.other} (both warm)"
    header = ["previous request", "median s", "runs"]
    rows = [[f"same model ({s.model})", f"{median(s.same_s):.4f}", str(len(s.same_s))],
            [f"other model ({s.other})", f"{median(s.switch_s):.4f}", str(len(s.switch_s))]]
    lines = ["", f"### {title}" if markdown else title, ""]
    lines += _render(header, rows, markdown)
    lines += ["", f"added by a switch: {s.added_s * 1000:+.1f} ms per request"]
    return lines


def _render(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return out + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_text(report: BenchReport) -> str:
    headers, body, common = _table_cells(report)
    lines = ["; ".join(common), ""] if common else []
    lines += _render(headers, body, markdown=False)
    lines += [""] + _machine_lines(report)
    lines += _comparison_lines(report, markdown=False) + _switch_lines(report, markdown=False)
    return "\n".join(lines)


def to_markdown(report: BenchReport) -> str:
    headers, body, common = _table_cells(report)
    lines = ["# Benchmark", "", "```", command_line(report.settings), "```", ""]
    lines += (["; ".join(common), ""] if common else []) + _render(headers, body, markdown=True)
    lines += [""] + [f"- {line}" for line in _machine_lines(report)]
    lines += [f"- peak RSS: the process's peak right after the runner's cold start (earlier runners "
              f"of a --compare run stay loaded); +RSS: what that cold start added"]
    lines += _comparison_lines(report, markdown=True) + _switch_lines(report, markdown=True)
    return "\n".join(lines) + "\n"


def to_csv(report: BenchReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([name for name, _ in COLUMNS])
    for row in report.rows:
        values = row_values(row, report)
        writer.writerow(["" if values[n] is None else (f"{values[n]:.6g}" if isinstance(values[n], float) else values[n])
                         for n, _ in COLUMNS])
    return buffer.getvalue()


def to_json(report: BenchReport) -> str:
    settings = {f.name: getattr(report.settings, f.name) for f in fields(report.settings)}
    settings = {k: (str(v) if isinstance(v, (Path, Size)) else v) for k, v in settings.items()}
    data = {
        "command": command_line(report.settings),
        "settings": settings,
        "machine": report.machine,
        "rows": [{**row_values(r, report), "latencies_s": r.latencies, "samples": [asdict(s) for s in r.samples]}
                 for r in report.rows],
        "comparisons": [{"steps": c.steps, "baseline": c.baseline, "ratios": c.ratios,
                         "medians": {r: c.median(r) for r in c.ratios}, "max_pixel_diff": c.max_pixel_diff}
                        for c in report.comparisons],
        "switch": None if report.switch is None else {
            "model": report.switch.model, "other": report.switch.other, "same_s": report.switch.same_s,
            "switch_s": report.switch.switch_s, "added_s": report.switch.added_s},
    }
    return json.dumps(data, indent=2)


_COLORS = [(52, 101, 164), (245, 121, 0), (78, 154, 6), (117, 80, 123), (204, 0, 0), (193, 125, 17)]


def draw_png(report: BenchReport, path: Path) -> None:
    """Horizontal bars: P50 latency per row (P95 as a whisker), one colour per runner."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    rows = report.rows
    runners = list(dict.fromkeys(r.runner for r in rows))
    label_w, bar_w, row_h, top = 260, 560, 26, 50
    width, height = label_w + bar_w + 120, top + row_h * len(rows) + 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    first = rows[0]
    draw.text((10, 10), f"{first.model} {first.size} {first.dtype}, {first.sampler}: latency per image "
                        f"(bar P50, whisker P95)", fill="black", font=font)
    longest = max(max(r.p95_s, r.p50_s) for r in rows) or 1.0
    scale = bar_w / longest
    for i, row in enumerate(rows):
        y = top + i * row_h
        color = _COLORS[runners.index(row.runner) % len(_COLORS)]
        draw.text((10, y + 6), f"{row.runner}, {row.steps} steps", fill="black", font=font)
        x0 = label_w
        draw.rectangle([x0, y + 4, x0 + max(1, int(row.p50_s * scale)), y + row_h - 4], fill=color)
        p95_x = x0 + int(row.p95_s * scale)
        draw.line([p95_x, y + 2, p95_x, y + row_h - 2], fill="black", width=2)
        draw.text((max(p95_x, x0 + int(row.p50_s * scale)) + 6, y + 6),
                  f"{row.p50_s:.3f}s  {row.images_per_s:.2f} img/s", fill="black", font=font)
    axis_y = top + row_h * len(rows) + 8
    draw.line([label_w, axis_y, label_w + bar_w, axis_y], fill="black")
    for k in range(5):
        x = label_w + int(bar_w * k / 4)
        draw.line([x, axis_y, x, axis_y + 4], fill="black")
        draw.text((x - 10, axis_y + 8), f"{longest * k / 4:.2g}s", fill="black", font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_all(report: BenchReport, out_dir: Path, stem: str = "bench") -> list[Path]:
    """Write ``stem``.md / .csv / .json / .png into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{stem}.{ext}" for ext in ("md", "csv", "json", "png")]
    paths[0].write_text(to_markdown(report), encoding="utf-8")
    paths[1].write_text(to_csv(report), encoding="utf-8")
    paths[2].write_text(to_json(report), encoding="utf-8")
    draw_png(report, paths[3])
    return paths
