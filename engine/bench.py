"""``python -m engine bench``: latency, throughput, cost, memory and UNet FLOP/s of one model.

Every row is one *runner* (the engine on a backend, or plain diffusers) at one step count, measured
over ``runs`` single-image requests after ``warmup`` unmeasured ones. ``--compare diffusers`` runs
(a) the engine on the chosen backend, (b) the engine's eager backend and (c) a plain diffusers
pipeline loaded the usual way, interleaved run by run with the same model, sampler, steps and seeds,
and reports the per-run ratios a/c and b/c and their medians. See docs/performance.md.

Definitions (also in the report):

* latency: wall time of one request as its caller sees it (``Engine.generate`` including the PNG
  with its infotext; ``pipe(...)`` returning a PIL image for plain diffusers);
* it/s: denoising steps / time from the call to the end of the last step (as the engine reports);
* images/s: 1 / mean latency (one stream, one image per request);
* cost per 10,000 images: ``price_per_hour * 10000 / images_per_s / 3600``;
* cold start: from nothing loaded (artifacts on disk, OS file cache as it is) to the first image;
* UNet FLOP/s: FLOPs of one UNet call (counted once on the eager UNet at the compiled shapes with
  ``torch.utils.flop_counter``) x UNet calls / time spent inside the UNet module.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import resource
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from .registry import DEFAULT_REGISTRY, ModelSpec, Registry, load_registry
from .types import GenerateRequest, Size, VariantKey

PRICES_CHECKED = "2026-11"
# us-east-1 on-demand $/hour, as published by AWS, checked 2026-11. Prices change: pass
# --price-per-hour for anything else.
INSTANCE_PRICES: dict[str, float] = {
    "inf2.xlarge": 0.7582,
    "inf2.8xlarge": 1.9679,
    "inf2.24xlarge": 6.4906,
    "inf2.48xlarge": 12.9813,
    "trn1.2xlarge": 1.3438,
    "trn1.32xlarge": 21.50,
}
COMPARE_TARGETS = ("diffusers",)
DEFAULT_PROMPT = "a small red circle on a blue background"

Log = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# --- settings and results --------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    registry: Path = DEFAULT_REGISTRY
    model: Optional[str] = None
    size: Optional[Size] = None
    sampler: Optional[str] = None
    steps: tuple[int, ...] = ()  # empty: the model's default steps
    runs: int = 5
    warmup: int = 1
    backend: str = "auto"
    price_per_hour: Optional[float] = None
    instance: Optional[str] = None
    compare: Optional[str] = None
    switch_model: Optional[str] = None
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = ""
    cfg_scale: Optional[float] = None
    seed: int = 0
    threads: Optional[int] = None

    def price(self) -> Optional[float]:
        """$/hour: ``price_per_hour`` if given, else the built-in price of ``instance``, else None."""
        if self.price_per_hour is not None:
            return self.price_per_hour
        return INSTANCE_PRICES[self.instance] if self.instance else None


@dataclass(frozen=True)
class RunSample:
    """One measured single-image request."""

    seconds: float
    denoise_s: float
    steps: int
    unet_s: float
    unet_calls: int
    text_encoder_s: float = 0.0
    vae_decode_s: float = 0.0

    @property
    def rest_s(self) -> float:
        return self.seconds - self.unet_s - self.text_encoder_s - self.vae_decode_s


@dataclass(frozen=True)
class BenchRow:
    runner: str  # "cpu", "eager", "neuron" (the engine on that backend) or "diffusers"
    model: str
    size: Size
    dtype: str
    sampler: str
    steps: int
    samples: tuple[RunSample, ...]
    cold_start_s: float
    peak_rss_mb: float
    added_rss_mb: float
    unet_flops: float  # per UNet call
    price_per_hour: Optional[float] = None
    load_s: float = 0.0  # the loading part of cold_start_s

    @property
    def latencies(self) -> list[float]:
        return [s.seconds for s in self.samples]

    @property
    def p50_s(self) -> float:
        return percentile(self.latencies, 50)

    @property
    def p95_s(self) -> float:
        return percentile(self.latencies, 95)

    @property
    def mean_s(self) -> float:
        return statistics.fmean(self.latencies)

    @property
    def it_per_s(self) -> float:
        return statistics.median(s.steps / s.denoise_s for s in self.samples if s.denoise_s > 0)

    @property
    def images_per_s(self) -> float:
        return 1.0 / self.mean_s

    @property
    def cost_per_10k(self) -> Optional[float]:
        return cost_per_10k_images(self.price_per_hour, self.images_per_s)

    @property
    def unet_calls(self) -> float:
        return statistics.median(s.unet_calls for s in self.samples)

    @property
    def unet_s(self) -> float:
        return statistics.median(s.unet_s for s in self.samples)

    @property
    def text_encoder_s(self) -> float:
        return statistics.median(s.text_encoder_s for s in self.samples)

    @property
    def vae_decode_s(self) -> float:
        return statistics.median(s.vae_decode_s for s in self.samples)

    @property
    def rest_s(self) -> float:
        """Median time outside the networks: tokenizer, scheduler, CFG, set-up, image conversion, PNG."""
        return statistics.median(s.rest_s for s in self.samples)

    @property
    def unet_share(self) -> float:
        return statistics.median(s.unet_s / s.seconds for s in self.samples)

    @property
    def unet_flops_per_s(self) -> float:
        """Achieved FLOP/s inside the UNet (median over runs)."""
        return statistics.median(self.unet_flops * s.unet_calls / s.unet_s for s in self.samples if s.unet_s > 0)


@dataclass(frozen=True)
class SwitchResult:
    """Latency of a request for model A when the previous request was for A (same) or B (switch)."""

    model: str
    other: str
    same_s: tuple[float, ...]
    switch_s: tuple[float, ...]

    @property
    def added_s(self) -> float:
        return statistics.median(self.switch_s) - statistics.median(self.same_s)


@dataclass(frozen=True)
class Comparison:
    """Per-run latency ratios of each engine runner against plain diffusers, at one step count."""

    steps: int
    baseline: str
    ratios: dict[str, tuple[float, ...]]  # runner -> ratio per run
    max_pixel_diff: dict[str, int]  # runner -> max |a - c| over the first run's pixels (0..255)

    def median(self, runner: str) -> float:
        return statistics.median(self.ratios[runner])


@dataclass
class BenchReport:
    settings: BenchSettings
    machine: dict[str, Any]
    rows: list[BenchRow] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    switch: Optional[SwitchResult] = None


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default method)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def cost_per_10k_images(price_per_hour: Optional[float], images_per_s: float) -> Optional[float]:
    if price_per_hour is None or images_per_s <= 0:
        return None
    return price_per_hour * 10_000 / images_per_s / 3600.0


def pairwise_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> tuple[float, ...]:
    if len(numerators) != len(denominators):
        raise ValueError("ratios need runs in pairs")
    return tuple(a / c for a, c in zip(numerators, denominators))


# --- host memory -------------------------------------------------------------------------------------


def _status_mb(field_name: str) -> Optional[float]:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def rss_mb() -> float:
    value = _status_mb("VmRSS")
    return value if value is not None else peak_rss_mb()


def peak_rss_mb() -> float:
    value = _status_mb("VmHWM")
    return value if value is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs`` 5); False if unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- machine and FLOPs ---------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """CPU model, cores, torch threads and an estimated peak FLOP/s for fp32 and bf16.

    Peak = cores used x GHz x FLOPs/cycle/core, assuming two 512-bit FMA units (Xeon Scalable):
    fp32 2 x 16 lanes x 2 = 64; bf16 with AVX512_BF16 (vdpbf16ps) twice that. AMX tiles, where
    present, go far beyond this (1024 bf16 FLOPs/cycle); oneDNN uses them for bf16 matmuls and
    convolutions, so bf16 rows can exceed 100% of the AVX-512 peak.
    """
    cpuinfo = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        pass
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    model_name = model.group(1).strip() if model else platform.processor() or "unknown"
    flags_match = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    flags = set(flags_match.group(1).split()) if flags_match else set()
    ghz_match = re.search(r"@\s*([\d.]+)\s*GHz", model_name)
    mhz_match = re.search(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.MULTILINE)
    ghz = float(ghz_match.group(1)) if ghz_match else (float(mhz_match.group(1)) / 1000 if mhz_match else 0.0)
    threads = torch.get_num_threads()
    if "avx512f" in flags:
        fp32_per_cycle = 64
    elif "avx2" in flags and "fma" in flags:
        fp32_per_cycle = 32
    else:
        fp32_per_cycle = 8
    bf16_per_cycle = fp32_per_cycle * 2 if "avx512_bf16" in flags else fp32_per_cycle
    import diffusers

    return {
        "cpu": model_name,
        "ghz": ghz,
        "logical_cpus": len(re.findall(r"^processor\s*:", cpuinfo, re.MULTILINE)) or None,
        "torch_threads": threads,
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "peak_fp32_flops": threads * ghz * 1e9 * fp32_per_cycle,
        "peak_bf16_flops": threads * ghz * 1e9 * bf16_per_cycle,
        # AMX tiles: 1024 bf16 FLOPs/cycle/core (Intel's figure, 16x the AVX-512 fp32 rate)
        "peak_amx_bf16_flops": threads * ghz * 1e9 * 1024 if "amx_bf16" in flags else None,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_before": load_average(),
    }


class OtherCpuUse:
    """Average number of cores that *other* processes kept busy between ``start()`` and ``stop()``.

    Machine-wide busy time from ``/proc/stat`` minus this process's own CPU time (``os.times``).
    Anything well above zero means the timings of that stretch are inflated by competition.
    """

    def __init__(self) -> None:
        self._start: Optional[tuple[float, float, float]] = None
        self.cores: Optional[float] = None

    @staticmethod
    def _sample() -> Optional[tuple[float, float, float]]:
        try:
            fields_ = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        idle = fields_[3] + (fields_[4] if len(fields_) > 4 else 0)
        busy = (sum(fields_[:8]) - idle) / hz
        own = os.times()
        return busy, own.user + own.system, time.perf_counter()

    def start(self) -> None:
        self._start = self._sample()

    def stop(self) -> Optional[float]:
        end = self._sample()
        if self._start is None or end is None or end[2] <= self._start[2]:
            return None
        busy, own, wall = (e - s for e, s in zip(end, self._start))
        self.cores = max(0.0, (busy - own) / wall)
        return self.cores


def load_average() -> Optional[float]:
    """The 1-minute load average (another busy process makes every timing here worthless)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def count_unet_flops(spec: ModelSpec, size: Size) -> float:
    """FLOPs of one UNet call at the compiled shapes (CFG batch), counted on the eager fp32 UNet."""
    from torch.utils.flop_counter import FlopCounterMode

    from .families import FAMILIES, TEXT_LENGTH, UNET, ShapeConfigs, example_inputs, traceable
    from .sources import ComponentLoader, load_parts

    family = FAMILIES[spec.family]
    parts = load_parts(spec)
    shapes = ShapeConfigs(unet=parts.unet_config, vae=parts.vae_config, token_ids=parts.prompt_token_ids(TEXT_LENGTH))
    inputs = example_inputs(family, UNET, size.width, size.height, shapes)
    loader = ComponentLoader(spec)
    try:
        unet = traceable(family, UNET, loader.module("unet"))
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            unet(*inputs)
        return float(counter.get_total_flops())
    finally:
        loader.close()
        gc.collect()


class PhaseTimer:
    """Wall time spent inside a pipeline's text encoders, UNet and VAE decoder, and UNet calls.

    Forward hooks on the text encoders and the UNet; ``vae.decode`` is wrapped on the instance
    (pipelines call the method, not ``forward``). Everything else in a request (tokenizer,
    scheduler, CFG arithmetic, pipeline set-up, image conversion, PNG) is the rest.
    """

    PHASES = ("text_encoder", "unet", "vae_decode")

    def __init__(self, components: dict[str, Any]):
        self.seconds = {phase: 0.0 for phase in self.PHASES}
        self.unet_calls = 0
        self._started: dict[str, float] = {}
        self._undo: list[Callable[[], None]] = []
        for name in ("text_encoder", "text_encoder_2", "unet"):
            module = components.get(name)
            if isinstance(module, torch.nn.Module):
                phase = "unet" if name == "unet" else "text_encoder"
                handles = [module.register_forward_pre_hook(self._pre(phase)),
                           module.register_forward_hook(self._post(phase))]
                self._undo += [handle.remove for handle in handles]
        vae = components.get("vae")
        if vae is not None:
            decode = vae.decode

            def timed_decode(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return decode(*args, **kwargs)
                finally:
                    self.seconds["vae_decode"] += time.perf_counter() - started

            vae.decode = timed_decode
            self._undo.append(lambda: vars(vae).pop("decode", None))

    def _pre(self, phase: str) -> Callable[..., None]:
        def hook(module: Any, args: Any) -> None:
            self._started[phase] = time.perf_counter()
        return hook

    def _post(self, phase: str) -> Callable[..., None]:
        def hook(module: Any, args: Any, output: Any) -> None:
            self.seconds[phase] += time.perf_counter() - self._started[phase]
            if phase == "unet":
                self.unet_calls += 1
        return hook

    def reset(self) -> None:
        self.seconds = {phase: 0.0 for phase in self.PHASES}
        self.unet_calls = 0

    def sample(self, seconds: float, denoise_s: float, steps: int) -> "RunSample":
        return RunSample(seconds, denoise_s, steps, self.seconds["unet"], self.unet_calls,
                         self.seconds["text_encoder"], self.seconds["vae_decode"])

    def remove(self) -> None:
        for undo in self._undo:
            undo()
        self._undo.clear()


# --- runners: one way of producing an image --------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """What every runner is asked to do for one image."""

    spec: ModelSpec
    size: Size
    sampler: str
    steps: int
    cfg_scale: float
    prompt: str
    negative_prompt: str
    seed: int


class EngineRunner:
    """The engine (``Engine.generate``) on one backend, with a fresh Engine per cold start."""

    def __init__(self, registry: Registry, backend_name: str, max_warm: int = 2):
        from .backends import make_backend

        self.registry = registry
        self.backend = make_backend(backend_name)
        self.name = self.backend.name
        self.max_warm = max_warm
        self.engine: Any = None
        self._timers: dict[str, PhaseTimer] = {}

    def cold_start(self, job: Job) -> float:
        """Load from artifacts (a fresh Engine) and make the first image; returns the load seconds."""
        from .engine import Engine, EngineSettings

        self.engine = Engine(self.registry, self.backend, EngineSettings(max_warm=self.max_warm))
        started = time.perf_counter()
        self.engine.load(job.spec.id, job.size)
        loaded = time.perf_counter() - started
        self.run(job)
        return loaded

    def _timer(self, job: Job) -> PhaseTimer:
        warm = self.engine.load(job.spec.id, job.size)
        key = str(warm.key)
        if key not in self._timers:
            self._timers[key] = PhaseTimer(warm.components)
        return self._timers[key]

    def run(self, job: Job) -> tuple[RunSample, Any]:
        request = GenerateRequest(model=job.spec.id, prompt=job.prompt, negative_prompt=job.negative_prompt,
                                  sampler=job.sampler, steps=job.steps, cfg_scale=job.cfg_scale, seed=job.seed,
                                  size=job.size)
        key = VariantKey(job.spec.id, job.size if self.backend.fixed_shape else None)
        timer = self._timer(job) if self.engine.pool.is_warm(key) else None
        if timer is not None:
            timer.reset()
        started = time.perf_counter()
        result = self.engine.generate(request)
        seconds = time.perf_counter() - started
        denoise_s, steps = result.timings["denoise_s"], int(result.timings["steps_run"])
        sample = timer.sample(seconds, denoise_s, steps) if timer else RunSample(seconds, denoise_s, steps, 0.0, 0)
        return sample, result.images[0].image

    def close(self) -> None:
        for timer in self._timers.values():
            timer.remove()
        self._timers.clear()
        self.engine = None
        gc.collect()


class DiffusersRunner:
    """A plain diffusers pipeline loaded the usual way: ``from_pretrained`` + the sampler's scheduler."""

    name = "diffusers"

    def __init__(self) -> None:
        self.pipe: Any = None
        self.timer: Optional[PhaseTimer] = None

    def cold_start(self, job: Job) -> float:
        """``from_pretrained`` and the first image; returns the load seconds."""
        from .samplers import make_scheduler
        from .sources import TORCH_DTYPES, pipeline_class_for

        spec = job.spec
        pipeline_class = pipeline_class_for(spec.family, "txt2img")
        dtype = TORCH_DTYPES[spec.dtype]
        extra: dict[str, Any] = {"add_watermarker": False} if spec.family == "sdxl" else {
            "safety_checker": None, "requires_safety_checker": False}
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # diffusers >= 0.40 prefers dtype=; 0.35 needs this
            if spec.source.kind == "single_file":
                pipe = pipeline_class.from_single_file(spec.source.ref, config=spec.source.config,
                                                       torch_dtype=dtype, **extra)
            else:
                kwargs = {"revision": spec.source.revision} if spec.source.revision else {}
                pipe = pipeline_class.from_pretrained(spec.source.ref, torch_dtype=dtype, **extra, **kwargs)
        pipe.scheduler = make_scheduler(job.sampler, pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        loaded = time.perf_counter() - started
        self.pipe = pipe
        self.timer = PhaseTimer(pipe.components)
        self.run(job)
        return loaded

    def run(self, job: Job) -> tuple[RunSample, Any]:
        assert self.pipe is not None and self.timer is not None
        last_step = [0.0]
        steps = [0]

        def on_step_end(pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
            last_step[0] = time.perf_counter()
            steps[0] += 1
            return callback_kwargs

        self.timer.reset()
        started = time.perf_counter()
        output = self.pipe(
            prompt=job.prompt, negative_prompt=job.negative_prompt or None, num_inference_steps=job.steps,
            guidance_scale=job.cfg_scale, generator=torch.Generator("cpu").manual_seed(job.seed),
            output_type="pil", width=job.size.width, height=job.size.height, callback_on_step_end=on_step_end)
        seconds = time.perf_counter() - started
        return self.timer.sample(seconds, last_step[0] - started, steps[0]), output.images[0]

    def close(self) -> None:
        if self.timer is not None:
            self.timer.remove()
        self.pipe = self.timer = None
        gc.collect()


def max_pixel_diff(a: Any, b: Any) -> int:
    """Largest per-channel difference (0..255) between two PIL images of the same size."""
    from PIL import ImageChops

    extrema = ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getextrema()
    return max(high for _, high in extrema)


# --- the benchmark ---------------------------------------------------------------------------------------


@dataclass
class _Loaded:
    runner: Any
    cold_start_s: float
    load_s: float
    added_rss_mb: float
    peak_rss_mb: float
    samples: dict[int, list[RunSample]] = field(default_factory=dict)


def _cold_start(runner: Any, job: Job, log: Log) -> _Loaded:
    gc.collect()
    before = rss_mb()
    reset_peak_rss()
    started = time.perf_counter()
    load_s = runner.cold_start(job)
    seconds = time.perf_counter() - started
    loaded = _Loaded(runner, seconds, load_s, rss_mb() - before, peak_rss_mb())
    log(f"{runner.name}: cold start {seconds:.2f}s (load {load_s:.2f}s, +{loaded.added_rss_mb:.0f} MB RSS)")
    return loaded


def _jobs(settings: BenchSettings, registry: Registry) -> tuple[ModelSpec, Size, str, float, tuple[int, ...]]:
    from .samplers import check_sampler

    spec = registry.get(settings.model or registry.default_model)
    size = settings.size or spec.default_size
    sampler = settings.sampler or spec.defaults.sampler
    check_sampler(sampler)
    cfg = spec.defaults.cfg_scale if settings.cfg_scale is None else settings.cfg_scale
    steps = settings.steps or (spec.defaults.steps,)
    return spec, size, sampler, cfg, steps


def run_bench(settings: BenchSettings, log: Log = _stderr) -> BenchReport:
    """Measure every runner at every step count; see the module docstring for the definitions."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if settings.compare not in (None, *COMPARE_TARGETS):
        raise ValueError(f"--compare takes one of {COMPARE_TARGETS}, got {settings.compare!r}")
    registry = load_registry(settings.registry)
    spec, size, sampler, cfg, steps_list = _jobs(settings, registry)
    report = BenchReport(settings, machine_info())

    def job(steps: int, seed: int) -> Job:
        return Job(spec, size, sampler, steps, cfg, settings.prompt, settings.negative_prompt, seed)

    log(f"counting UNet FLOPs of {spec.id} at {size} ...")
    flops = count_unet_flops(spec, size)
    log(f"  {flops / 1e9:.2f} GFLOP per UNet call")

    runners: list[Any] = [EngineRunner(registry, settings.backend)]
    if settings.compare == "diffusers":
        if runners[0].name != "eager":
            runners.append(EngineRunner(registry, "eager"))
        runners.append(DiffusersRunner())
    try:
        _measure(settings, registry, report, runners, job, steps_list, flops, log)
    finally:
        for runner in runners:  # removes the timing hooks from shared modules
            runner.close()
    return report


def _measure(settings: BenchSettings, registry: Registry, report: BenchReport, runners: list[Any],
             job: Callable[[int, int], Job], steps_list: tuple[int, ...], flops: float, log: Log) -> None:
    """Cold-start every runner, then the interleaved runs, filling ``report``."""
    first = job(steps_list[0], settings.seed)
    loaded = [_cold_start(runner, first, log) for runner in runners]

    others = OtherCpuUse()
    others.start()
    for steps in steps_list:
        for item in loaded:
            for index in range(settings.warmup):
                item.runner.run(job(steps, settings.seed + 10_000 + index))
            item.samples[steps] = []
        images: dict[str, Any] = {}
        for index in range(settings.runs):
            # interleaved, with the order rotated each run so no runner always goes first
            order = loaded[index % len(loaded):] + loaded[:index % len(loaded)]
            for item in order:
                sample, image = item.runner.run(job(steps, settings.seed + index))
                item.samples[steps].append(sample)
                if index == 0:
                    images[item.runner.name] = image
            log(f"steps {steps} run {index + 1}/{settings.runs}: "
                + "  ".join(f"{i.runner.name} {i.samples[steps][-1].seconds:.3f}s" for i in loaded))
        if settings.compare:
            report.comparisons.append(_compare(steps, loaded, images))

    report.machine["process_peak_rss_mb"] = peak_rss_mb()  # since the last cold start's reset
    report.machine["other_cpu_cores"] = others.stop()
    for item in loaded:
        for steps in steps_list:
            report.rows.append(BenchRow(item.runner.name, first.spec.id, first.size, first.spec.dtype, first.sampler,
                                        steps, tuple(item.samples[steps]), item.cold_start_s, item.peak_rss_mb,
                                        item.added_rss_mb, flops, settings.price(), item.load_s))
    if settings.switch_model:
        report.switch = _measure_switch(loaded[0].runner, first, registry, settings.switch_model, settings.runs, log)


def _compare(steps: int, loaded: list[_Loaded], images: dict[str, Any]) -> Comparison:
    baseline = loaded[-1]
    base_times = [s.seconds for s in baseline.samples[steps]]
    ratios, diffs = {}, {}
    for item in loaded[:-1]:
        name = item.runner.name
        ratios[name] = pairwise_ratios([s.seconds for s in item.samples[steps]], base_times)
        diffs[name] = max_pixel_diff(images[name], images[baseline.runner.name])
    return Comparison(steps, baseline.runner.name, ratios, diffs)


def _measure_switch(runner: EngineRunner, job: Job, registry: Registry, other_id: str, runs: int,
                    log: Log) -> SwitchResult:
    """Requests for A alternate with requests for B (both warm) vs follow requests for A."""
    other = registry.get(other_id)
    other_size = job.size if (not runner.backend.fixed_shape or job.size in other.resolutions) else other.default_size
    other_job = replace(job, spec=other, size=other_size)
    runner.run(other_job)  # load and warm B
    runner.run(job)
    same, switch = [], []
    for index in range(runs):
        seeded = replace(job, seed=job.seed + index)
        same.append(runner.run(seeded)[0].seconds)  # previous request: A
        runner.run(replace(other_job, seed=job.seed + index))
        switch.append(runner.run(seeded)[0].seconds)  # previous request: B
    result = SwitchResult(job.spec.id, other.id, tuple(same), tuple(switch))
    log(f"switching {job.spec.id} <-> {other.id}: +{result.added_s * 1000:.1f} ms per request")
    return result


# --- command line ------------------------------------------------------------------------------------------


def _positive_list(what: str, example: str) -> Callable[[str], tuple[int, ...]]:
    """An argparse type for comma-separated positive whole numbers such as ``example``."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            numbers = tuple(int(part) for part in text.split(",") if part.strip())
        except ValueError:
            numbers = ()
        if not numbers or any(n < 1 for n in numbers):
            raise argparse.ArgumentTypeError(f"expected positive {what} such as {example}, found {text!r}")
        return numbers

    return parse


_steps_list = _positive_list("step counts", "20,30,50")
_clients_list = _positive_list("client counts", "1,4,8")


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    from .backends import BACKEND_NAMES
    from .samplers import sampler_names

    p = subparsers.add_parser(
        "bench", help="measure latency, images/s, cost, cold start, memory and UNet FLOP/s",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", type=Path, default=DEFAULT_REGISTRY)
    p.add_argument("--model", help="model id (default: the registry's default model)")
    p.add_argument("--size", type=Size.parse, help="WIDTHxHEIGHT (default: the model's first resolution)")
    p.add_argument("--sampler", choices=sampler_names(), help="default: the model's default sampler")
    p.add_argument("--steps", type=_steps_list, default=(), help="comma-separated step counts, e.g. 20,30,50")
    p.add_argument("--runs", type=int, default=5, help="measured requests per row")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests per row before the runs")
    p.add_argument("--backend", choices=BACKEND_NAMES, default="auto")
    price = p.add_mutually_exclusive_group()
    price.add_argument("--price-per-hour", type=float, help="instance price in $/hour for the cost column")
    price.add_argument("--instance", choices=sorted(INSTANCE_PRICES),
                       help=f"use the built-in us-east-1 on-demand price (checked {PRICES_CHECKED})")
    p.add_argument("--compare", choices=COMPARE_TARGETS,
                   help="also run the eager backend and plain diffusers, interleaved, and print ratios")
    p.add_argument("--switch-model", help="also measure the latency added by alternating with this warm model")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--cfg", type=float, help="CFG scale (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="run i uses seed + i")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, help="write bench.md, bench.csv, bench.png and bench.json here")
    p.add_argument("--concurrency", type=_clients_list, default=(),
                   help="instead: concurrent clients through the engine queue, e.g. 1,4,8, batching off and on "
                        "side by side (concurrency.md/.json/.png with --out)")
    p.add_argument("--requests", type=int, default=16, help="with --concurrency: requests per level")
    p.add_argument("--replicas", type=int, default=1,
                   help="with --concurrency: also run batching on with this many warm copies of the model")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="with --concurrency: how long a free worker waits for company (as the app's flag)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from .bench_report import format_text, write_all

    if args.runs < 1 or args.warmup < 0:
        raise SystemExit("--runs must be at least 1 and --warmup at least 0")
    if args.concurrency:
        return _main_concurrency(args)
    settings = BenchSettings(
        registry=args.registry, model=args.model, size=args.size, sampler=args.sampler, steps=args.steps,
        runs=args.runs, warmup=args.warmup, backend=args.backend, price_per_hour=args.price_per_hour,
        instance=args.instance, compare=args.compare, switch_model=args.switch_model, prompt=args.prompt,
        negative_prompt=args.negative_prompt, cfg_scale=args.cfg, seed=args.seed, threads=args.threads)
    report = run_bench(settings)
    print(format_text(report))
    if args.out:
        for path in write_all(report, args.out):
            print(f"wrote {path}")
    return 0


def _main_concurrency(args: argparse.Namespace) -> int:
    """``--concurrency``: see engine/bench_concurrency.py."""
    from .bench_concurrency import run_concurrency, to_markdown, write_all

    if args.threads:
        torch.set_num_threads(args.threads)
    registry = load_registry(args.registry)
    spec = registry.get(args.model or registry.default_model)
    steps = args.steps[0] if args.steps else spec.defaults.steps
    title = (f"{spec.id} {args.size or spec.default_size}, {steps} steps, batch_sizes {list(spec.batch_sizes)}, "
             f"{torch.get_num_threads()} threads, batch wait {args.batch_wait_ms:g} ms"
             + (f", {args.replicas} replicas in the last rows" if args.replicas > 1 else ""))
    rows = run_concurrency(registry, args.backend, args.concurrency, args.requests, spec.id, args.size, steps,
                           args.prompt, args.seed, _stderr, batch_wait_s=args.batch_wait_ms / 1000,
                           replicas=args.replicas)
    print(to_markdown(rows, title))
    if args.out:
        for path in write_all(rows, title, args.out):
            print(f"wrote {path}")
    return 0
