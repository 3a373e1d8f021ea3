"""The Engine facade: the one way to generate images, list models and manage warm pipelines."""
from __future__ import annotations

import gc
import logging
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

import torch

from . import artifacts
from .backends.base import Backend
from .compile import expected_fingerprint
from .errors import Cancelled, InvalidRequest, UnsupportedResolution
from .images import fit_image
from .infotext import format_infotext, png_with_parameters
from .pipelines import WarmPipeline, load_compiled, load_eager, warm_up
from .placement import CorePlan, Footprint, PlacedBackend, footprint_from_manifest
from .pool import WarmPool
from .registry import ModelSpec, Registry
from .samplers import check_sampler
from .types import GeneratedImage, GenerateRequest, GenerateResult, Progress, Size, VariantKey

log = logging.getLogger(__name__)

MAX_STEPS = 150
MAX_IMAGES = 16
MAX_SEED = 2**32 - 1
EAGER_MAX_SIDE = 2048


class CancelFlag(Protocol):
    def is_set(self) -> bool: ...


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class EngineSettings:
    max_warm: int = 2


@dataclass(frozen=True)
class ModelInfo:
    """What the UI needs to know about one registry model on this engine's backend."""

    id: str
    title: str
    family: str
    source: str
    dtype: str
    defaults: Any
    resolutions: tuple[Size, ...]
    compiled: dict[Size, str]  # size -> "compiled" | "missing" | "stale" ("n/a" on eager)
    warm: tuple[Size, ...]

    def compiled_sizes(self) -> list[Size]:
        return [s for s, state in self.compiled.items() if state in ("compiled", "n/a")]


@dataclass(frozen=True)
class _Resolved:
    spec: ModelSpec
    sampler: str
    steps: int
    cfg_scale: float
    size: Size
    seed: int


class Engine:
    """Turns ``GenerateRequest``s into images with warm pipelines on one backend.

    Thread-safe: concurrent requests for different warm pipelines run in parallel; requests for
    the same pipeline take turns on its lock.
    """

    def __init__(self, registry: Registry, backend: Backend, settings: EngineSettings = EngineSettings()):
        self.registry = registry
        self.backend = backend
        self.settings = settings
        # On NeuronCores a warm model also needs device memory on a core pair: the plan says where
        # each one sits, and the pool evicts by it as well as by count.
        self.core_plan: Optional[CorePlan] = (
            CorePlan(backend.core_inventory(), self._footprint) if isinstance(backend, PlacedBackend) else None)
        if self.core_plan is None:
            self.pool = WarmPool(self._load_variant, settings.max_warm)
        else:
            self.pool = WarmPool(self._load_variant, settings.max_warm, on_evict=_release_device_memory,
                                 core_plan=self.core_plan)

    # --- models and warm pipelines -------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        warm = {info.key for info in self.pool.snapshot()}
        return [self._model_info(spec, warm) for spec in self.registry.models]

    def _model_info(self, spec: ModelSpec, warm: set[VariantKey]) -> ModelInfo:
        if self.backend.fixed_shape:
            compiled = {size: self._variant_state(spec, size) for size in spec.resolutions}
            warm_sizes = tuple(s for s in spec.resolutions if VariantKey(spec.id, s) in warm)
        else:
            compiled = {size: "n/a" for size in spec.resolutions}
            warm_sizes = spec.resolutions if VariantKey(spec.id, None) in warm else ()
        return ModelInfo(spec.id, spec.title, spec.family, spec.source.describe(), spec.dtype, spec.defaults,
                         spec.resolutions, compiled, warm_sizes)

    def _variant_state(self, spec: ModelSpec, size: Size) -> str:
        directory = artifacts.variant_dir(self.registry.artifacts_dir, spec.id, size, self.backend.name)
        return artifacts.variant_status(directory, expected_fingerprint(spec, size, self.backend)).state

    def status(self) -> dict[str, Any]:
        """Backend, versions and the warm pipelines: load time, peak host RSS while loading, cores.

        On neuron also ``neuron``: the visible cores and, per core pair, which models sit on it and
        the device memory used / left per core; ``loading`` lists models not ready yet.
        """
        inventory = self.core_plan.inventory if self.core_plan is not None else None
        status: dict[str, Any] = {
            "backend": self.backend.name,
            "device": str(self.backend.device),
            "versions": self.backend.stack_versions(),
            "max_warm": self.pool.max_warm,
            "warm": [
                {"model": i.key.model, "size": str(i.key.size or "any"), "in_use": i.in_use,
                 "load_seconds": round(i.load_seconds, 3), "device_ids": list(i.device_ids),
                 "peak_rss_mb": round(i.peak_rss_bytes / 2**20, 1), "warmup_seconds": round(i.warmup_seconds, 3),
                 **({"physical_cores": list(inventory.physical_ids(i.device_ids))} if inventory else {})}
                for i in self.pool.snapshot()
            ],
            "loading": [
                {"model": i.key.model, "size": str(i.key.size or "any"), "seconds": round(time.time() - i.since, 1),
                 "device_ids": list(i.device_ids)}
                for i in self.pool.loading()
            ],
        }
        if self.core_plan is not None:
            status["neuron"] = self.core_plan.describe()
        return status

    def load(self, model: str, size: Optional[Size] = None) -> WarmPipeline:
        """Warm ``model`` at ``size`` (default: its first resolution) without generating."""
        spec = self.registry.get(model)
        return self.pool.ensure(self._key(spec, self._check_size(spec, size or spec.default_size)))

    def unload(self, model: str, size: Optional[Size] = None) -> int:
        """Drop the warm pipelines of ``model`` (one size or all) that are not in use; returns how many."""
        spec = self.registry.get(model)
        keys = [i.key for i in self.pool.snapshot() if i.key.model == spec.id and (size is None or i.key.size in (size, None))]
        return sum(self.pool.unload(key) for key in keys)

    def _key(self, spec: ModelSpec, size: Size) -> VariantKey:
        return VariantKey(spec.id, size if self.backend.fixed_shape else None)

    def _load_variant(self, key: VariantKey) -> WarmPipeline:
        spec = self.registry.get(key.model)
        log.info("loading %s on %s", key, self.backend.name)
        if self.backend.fixed_shape:
            assert key.size is not None
            if self.core_plan is None:
                return load_compiled(self.registry, spec, key.size, self.backend)
            placement = self.core_plan.placement(key)  # reserved by the pool before this load
            device_ids = placement.device_ids if placement is not None else ()
            warm = load_compiled(self.registry, spec, key.size, self.backend, device_ids)
            seconds = warm_up(warm)  # the first Neuron inference is 3-4x slower: pay it before "ready"
            log.info("%s ready on NeuronCores %s (load %.1fs, warm-up %.1fs)", key, list(device_ids),
                     warm.load_seconds, seconds)
            return warm
        return load_eager(spec, self.backend)

    def _footprint(self, key: VariantKey) -> Footprint:
        """Device memory of a compiled variant, from its manifest (zero if absent: loading will say why)."""
        assert key.size is not None
        directory = artifacts.variant_dir(self.registry.artifacts_dir, key.model, key.size, self.backend.name)
        return footprint_from_manifest(artifacts.read_manifest(directory) or {})

    # --- generation ---------------------------------------------------------------------------

    def generate(
        self, request: GenerateRequest, on_progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelFlag] = None,
    ) -> GenerateResult:
        """Generate ``request.num_images`` images; raises EngineError subclasses on bad input,
        ``Cancelled`` when ``cancel`` is set at a step boundary."""
        resolved = self._resolve(request)
        spec, size = resolved.spec, resolved.size
        started = time.perf_counter()
        was_warm = self.pool.is_warm(self._key(spec, size))
        with self.pool.lease(self._key(spec, size)) as warm:
            leased = time.perf_counter()
            init_image = fit_image(request.init_image, size, request.resize_mode) if request.init_image is not None else None
            with warm.lock:
                images, clock = self._run_images(warm, request, resolved, init_image, on_progress, cancel)
        timings = {
            "load_s": 0.0 if was_warm else leased - started,
            "total_s": time.perf_counter() - started,
            "denoise_s": clock.denoise_s,
            "decode_s": clock.decode_s,
            "steps_run": float(clock.steps),
        }
        return GenerateResult(request, spec.id, size, resolved.sampler, resolved.steps, resolved.cfg_scale,
                              resolved.seed, tuple(images), timings)

    def _resolve(self, request: GenerateRequest) -> _Resolved:
        spec = self.registry.get(request.model or self.registry.default_model)
        sampler = request.sampler or spec.defaults.sampler
        check_sampler(sampler)
        steps = spec.defaults.steps if request.steps is None else request.steps
        cfg = spec.defaults.cfg_scale if request.cfg_scale is None else float(request.cfg_scale)
        _check_range("steps", steps, 1, MAX_STEPS)
        _check_range("CFG scale", cfg, 1.0, 30.0)
        _check_range("number of images", request.num_images, 1, MAX_IMAGES)
        if request.init_image is not None:
            _check_range("denoising strength", request.strength, 0.0, 1.0)
        if not request.prompt.strip():
            raise InvalidRequest("the prompt is empty; describe the image you want")
        seed = request.seed if request.seed not in (-1, None) else random.SystemRandom().randrange(MAX_SEED)
        _check_range("seed", seed, 0, MAX_SEED)
        size = self._check_size(spec, request.size or spec.default_size)
        return _Resolved(spec, sampler, int(steps), cfg, size, int(seed))

    def _check_size(self, spec: ModelSpec, size: Size) -> Size:
        if not self.backend.fixed_shape:
            if size.width % 8 or size.height % 8 or not (64 <= min(size.width, size.height)) or max(size.width, size.height) > EAGER_MAX_SIDE:
                raise UnsupportedResolution(
                    f"{size} is not a valid size: width and height must be multiples of 8 between 64 and {EAGER_MAX_SIDE}")
            return size
        if size not in spec.resolutions:
            compiled = [str(s) for s in spec.resolutions if self._variant_state(spec, s) == "compiled"]
            raise UnsupportedResolution(
                f"{size} is not compiled for {spec.id}; compiled: {', '.join(compiled) or 'none'}. To add it, "
                f"list {size} under resolutions of {spec.id} in {self.registry.path} and run "
                f"`{artifacts.compile_command(spec.id, size, self.backend.name, self.registry.path)}`")
        return size

    def _run_images(self, warm: WarmPipeline, request: GenerateRequest, resolved: _Resolved, init_image: Any,
                    on_progress: Optional[ProgressCallback], cancel: Optional[CancelFlag]) -> tuple[list[GeneratedImage], "_Clock"]:
        clock = _Clock()
        images = []
        for index in range(request.num_images):
            seed = resolved.seed + index
            pipe = warm.view(request.mode, resolved.sampler)
            callback = _StepCallback(clock, index, request.num_images, on_progress, cancel)
            kwargs = _call_kwargs(request, resolved, init_image, seed, pipe.device)
            clock.start()
            output = pipe(**kwargs, callback_on_step_end=callback)
            clock.finish()
            image = output.images[0]
            infotext = _infotext(request, resolved, seed, self.backend.name)
            images.append(GeneratedImage(image, seed, infotext, png_with_parameters(image, infotext)))
        return images, clock


def _release_device_memory(warm: WarmPipeline) -> None:
    """Evicted from NeuronCores: drop the compiled modules now so the runtime unloads their NEFFs
    before the next model is loaded into the freed memory."""
    warm.components.clear()
    gc.collect()


def _call_kwargs(request: GenerateRequest, resolved: _Resolved, init_image: Any, seed: int, device: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt or None,
        "num_inference_steps": resolved.steps,
        "guidance_scale": resolved.cfg_scale,
        # image i of a request is what plain diffusers makes with this generator
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": "pil",
    }
    if init_image is not None:
        kwargs.update(image=init_image, strength=request.strength)
    else:
        kwargs.update(width=resolved.size.width, height=resolved.size.height)
    return kwargs


def _infotext(request: GenerateRequest, resolved: _Resolved, seed: int, backend: str) -> str:
    params = {
        "Steps": resolved.steps,
        "Sampler": resolved.sampler,
        "CFG scale": resolved.cfg_scale,
        "Seed": seed,
        "Size": str(resolved.size),
        "Model": resolved.spec.id,
        "Denoising strength": request.strength if request.init_image is not None else None,
        "Backend": backend,
    }
    return format_infotext(request.prompt, request.negative_prompt, params)


def _check_range(name: str, value: Any, low: float, high: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low:g} and {high:g}, got {value!r}")


class _Clock:
    """Splits each image's time into denoising (up to the last step) and decoding."""

    def __init__(self) -> None:
        self.denoise_s = 0.0
        self.decode_s = 0.0
        self.steps = 0
        self._start = 0.0
        self._last_step = 0.0

    def start(self) -> None:
        self._start = self._last_step = time.perf_counter()

    def step(self) -> None:
        self._last_step = time.perf_counter()
        self.steps += 1

    def finish(self) -> None:
        self.denoise_s += self._last_step - self._start
        self.decode_s += time.perf_counter() - self._last_step


class _StepCallback:
    """``callback_on_step_end`` for one image: reports progress, stops at a step boundary on cancel."""

    def __init__(self, clock: _Clock, index: int, num_images: int,
                 on_progress: Optional[ProgressCallback], cancel: Optional[CancelFlag]):
        self.clock, self.index, self.num_images = clock, index, num_images
        self.on_progress, self.cancel = on_progress, cancel
        self.started = time.perf_counter()

    def __call__(self, pipe: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        self.clock.step()
        if self.on_progress is not None:
            elapsed = time.perf_counter() - self.started
            self.on_progress(Progress(step + 1, pipe.num_timesteps, self.index, self.num_images,
                                      elapsed, (step + 1) / elapsed if elapsed > 0 else 0.0))
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled("interrupted")
        return callback_kwargs


__all__ = ["Engine", "EngineSettings", "ModelInfo"]
