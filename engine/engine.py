"""The Engine facade: the one way to generate images, list models and manage warm pipelines."""
from __future__ import annotations

import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from . import artifacts
from .backends.base import Backend
from .batching import BatchRun, Row, generators, per_row
from .hires import HiresPlan, second_pass_images
from .images import fit_image
from .inpaint import inpaint_infotext, inpaint_kwargs
from .infotext import format_infotext
from .pipelines import WarmPipeline, load_compiled, load_eager, warm_up
from .placement import CorePlan, Footprint, PlacedBackend, footprint_from_manifest
from .pool import WarmPool
from .prompts import strip_extra_networks
from .registry import ModelSpec, Registry, load_registry
from .sources import load_parts
from .resolve import Resolved, Resolver
from .scheduler import Batching, CancelFlag, Job, QueueSnapshot, Scheduler
from .types import GenerateRequest, GenerateResult, Progress, ReplicaKey, Size, VariantKey

log = logging.getLogger(__name__)

DEFAULT_PREVIEW_EVERY = 5  # steps between live previews (A1111's "show progress every N steps")
AUTO_REPLICA_MEMORY_SHARE = 0.5  # cpu ``--replicas auto``: the copies may take this share of the free host memory


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class EngineSettings:
    """``max_warm``: warm pipelines kept at most; ``workers``: generations running at once (each on
    its own long-lived device worker thread; the others wait in the engine's one queue)."""

    max_warm: int = 2
    workers: int = 1
    batching: bool = True  # run compatible waiting requests together (models with batch_sizes)
    batch_wait_s: float = 0.0  # how long a free worker waits for compatible requests to batch
    eager_max_batch: int = 4  # images per call on the any-shape eager backend
    replicas: tuple["ReplicaTarget", ...] = ()  # warm copies per model (default 1 each)
    replicas_auto: bool = False  # fill the free NeuronCore pairs with replicas of the default model
    # live preview every N denoising steps (0: off; None: every 5 steps, off on Neuron)
    preview_every: Optional[int] = None


@dataclass(frozen=True)
class ReplicaTarget:
    """``count`` warm copies of ``model`` (at ``size``; None: at each size it is used at)."""

    model: str
    size: Optional[Size]
    count: int

    def matches(self, key: VariantKey) -> bool:
        return self.model == key.model and self.size in (None, key.size)

    def __str__(self) -> str:
        return f"{self.model}{'@' + str(self.size) if self.size else ''}={self.count}"


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
    compiled: dict[Size, str]  # size -> "compiled" | "missing" | "stale" | "broken" ("n/a" on eager)
    warm: tuple[Size, ...]
    batch_sizes: tuple[int, ...] = (1,)  # compiled batch sizes (requests per device call)
    max_batch: int = 1  # images one device call makes on this backend
    loras: tuple[str, ...] = ()  # fused LoRAs as a prompt selects them: "<lora:name:scale>"
    prompt_chunks: tuple[int, ...] = (1,)  # compiled prompt lengths, in 75-token chunks
    cfg_free_unet: bool = False  # CFG <= 1 runs its own one-row-per-request UNet graphs

    def compiled_sizes(self) -> list[Size]:
        return [s for s, state in self.compiled.items() if state in ("compiled", "n/a")]


@dataclass(frozen=True)
class LoraInfo:
    """A LoRA fused into ``models`` at ``scale``; ``<lora:name:scale>`` in a prompt selects it."""

    name: str
    path: str
    scale: float
    models: tuple[str, ...]
    short_hash: str
    metadata: dict[str, str]


@dataclass(frozen=True)
class _Work:
    """What a queued job carries: the request, its validated values and the caller's progress hook."""

    request: GenerateRequest
    resolved: Resolved
    on_progress: Optional[ProgressCallback]


@dataclass(frozen=True)
class _Load:
    """A queued job that warms one pipeline (``replicas`` copies of it)."""

    key: VariantKey
    replicas: int = 1


class Engine:
    """Turns ``GenerateRequest``s into images with warm pipelines on one backend.

    Thread-safe. Every generation is a job in the engine's one admission queue (``scheduler``),
    run by a long-lived device worker thread; ``submit`` queues one, ``generate`` queues one and
    waits for it. Requests for the same warm pipeline take turns on its lock.
    """

    def __init__(self, registry: Registry, backend: Backend, settings: EngineSettings = EngineSettings()):
        self.registry = registry
        self.backend = backend
        self.settings = settings
        self.preview_every = (settings.preview_every if settings.preview_every is not None
                              else default_preview_every(backend.name))
        # On NeuronCores a warm model also needs device memory on a core pair: the plan says where
        # each one sits, and the pool evicts by it as well as by count.
        self.core_plan: Optional[CorePlan] = (
            CorePlan(backend.core_inventory(), self._footprint) if isinstance(backend, PlacedBackend) else None)
        for target in settings.replicas:
            self._check_size(registry.get(target.model), target.size or registry.get(target.model).default_size)
        self._auto_replicas: dict[VariantKey, int] = {}
        if self.core_plan is None:
            self.pool = WarmPool(self._load_variant, settings.max_warm, replicas=self._replica_target)
        else:
            self.pool = WarmPool(self._load_variant, settings.max_warm, on_evict=_release_device_memory,
                                 core_plan=self.core_plan, replicas=self._replica_target)
        self._default_model = registry.default_model
        self._tokenizers: dict[tuple[Any, ...], Any] = {}
        batching = Batching(key=self._batch_key, rows=lambda work: work.request.num_images,
                            limit=self._batch_limit, wait_s=settings.batch_wait_s)
        workers = max(settings.workers, sum(t.count for t in settings.replicas))
        self.scheduler: Scheduler[Any] = Scheduler(self._execute, workers=workers,
                                                   batching=batching if settings.batching else None)

    @property
    def default_model(self) -> str:
        """The model a request without ``model`` uses (the registry's default until changed)."""
        return self._default_model

    def set_default_model(self, model: str) -> str:
        """Make ``model`` (an id) the default for requests that name none; returns its id."""
        self._default_model = self.registry.get(model).id
        return self._default_model

    def reload_registry(self) -> Registry:
        """Re-read the registry file (A1111's refresh-checkpoints). Idle warm pipelines of models no
        longer listed are dropped; a broken file raises ``RegistryError`` and changes nothing."""
        registry = load_registry(self.registry.path, self.registry.allow_unsafe_pickle)
        self.registry = registry
        listed = {spec.id for spec in registry.models}
        if self._default_model not in listed:
            self._default_model = registry.default_model
        for info in self.pool.snapshot():
            if info.key.model not in listed:
                self.pool.unload(info.key)
        return registry

    def close(self) -> None:
        """Stop the device workers (queued jobs are cancelled; running ones finish)."""
        self.scheduler.close()

    def queue(self) -> QueueSnapshot:
        """The jobs running and waiting in the engine's queue."""
        return self.scheduler.snapshot()

    # --- models and warm pipelines -------------------------------------------------------------

    def models(self) -> list[ModelInfo]:
        warm = self._warm_keys()
        return [self._model_info(spec, warm) for spec in self.registry.models]

    def loras(self) -> list[LoraInfo]:
        """The LoRAs fused into registry models, one entry per file and scale (A1111's
        ``/sdapi/v1/loras``), each with the models that have it."""
        found: dict[tuple[str, str, float], list[str]] = {}
        files = {}
        for spec in self.registry.models:
            for lora in spec.loras:
                found.setdefault((lora.name, lora.path, lora.scale), []).append(spec.id)
                files[lora.path] = lora
        return [LoraInfo(name, path, scale, tuple(models), files[path].short_hash, dict(files[path].metadata))
                for (name, path, scale), models in found.items()]

    def _warm_keys(self) -> set[VariantKey]:
        return {info.key for info in self.pool.snapshot()}

    def _model_info(self, spec: ModelSpec, warm: set[VariantKey]) -> ModelInfo:
        if self.backend.fixed_shape:
            compiled = {size: self._variant_state(spec, size) for size in spec.resolutions}
            warm_sizes = tuple(s for s in spec.resolutions if VariantKey(spec.id, s) in warm)
        else:
            compiled = {size: "n/a" for size in spec.resolutions}
            warm_sizes = spec.resolutions if VariantKey(spec.id, None) in warm else ()
        return ModelInfo(spec.id, spec.title, spec.family, spec.source.describe(), spec.dtype, spec.defaults,
                         spec.resolutions, compiled, warm_sizes, spec.batch_sizes, self._rows_per_call(spec),
                         tuple(f"<lora:{lora.name}:{lora.scale:g}>" for lora in spec.loras), spec.prompt_chunks,
                         spec.cfg_free_unet)

    def _variant_state(self, spec: ModelSpec, size: Size) -> str:
        return self._resolver().variant_state(spec, size)

    def _resolver(self) -> Resolver:
        return Resolver(self.registry, self.backend, self._tokenizer)

    def _tokenizer(self, spec: ModelSpec) -> Any:
        """``spec``'s (first) tokenizer, loaded once: counting a prompt's chunks needs no warm model."""
        key = (spec.source.config_ref, spec.source.revision)
        if key not in self._tokenizers:
            self._tokenizers[key] = load_parts(spec).tokenizers["tokenizer"]
        return self._tokenizers[key]

    def _resolve(self, request: GenerateRequest) -> Resolved:
        return self._resolver().resolve(request, self.default_model)

    def _check_size(self, spec: ModelSpec, size: Size) -> Size:
        return self._resolver().check_size(spec, size)

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
                {"model": i.key.model, "size": str(i.key.size or "any"), "replica": i.replica, "in_use": i.in_use,
                 "load_seconds": round(i.load_seconds, 3), "device_ids": list(i.device_ids),
                 "peak_rss_mb": round(i.peak_rss_bytes / 2**20, 1), "warmup_seconds": round(i.warmup_seconds, 3),
                 **({"physical_cores": list(inventory.physical_ids(i.device_ids))} if inventory else {})}
                for i in self.pool.snapshot()
            ],
            "loading": [
                {"model": i.key.model, "size": str(i.key.size or "any"), "replica": i.replica,
                 "seconds": round(time.time() - i.since, 1),
                 "device_ids": list(i.device_ids)}
                for i in self.pool.loading()
            ],
        }
        if self.core_plan is not None:
            status["neuron"] = self.core_plan.describe()
        return status

    def is_warm(self, model: str, size: Optional[Size] = None) -> bool:
        """Whether ``model`` at ``size`` (default: its first resolution) is loaded and ready."""
        spec = self.registry.get(model)
        return self.pool.is_warm(self._key(spec, size or spec.default_size))

    def load(self, model: str, size: Optional[Size] = None) -> WarmPipeline:
        """Warm ``model`` at ``size`` (default: its first resolution) without generating, and wait."""
        return self.submit_load(model, size).result()

    def submit_load(self, model: str, size: Optional[Size] = None, owner: str = "") -> Job[Any]:
        """Queue loading ``model`` at ``size``: a load uses the device, so it waits its turn in the
        engine's queue and runs on a device worker like a generation. Bad names raise at once."""
        spec = self.registry.get(model)
        key = self._key(spec, self._check_size(spec, size or spec.default_size))
        return self.scheduler.submit(_Load(key), owner=owner)

    def start_replicas(self) -> dict[str, int]:
        """Warm the configured replicas (``EngineSettings.replicas``, and with ``replicas_auto`` as
        many copies of the default model as free NeuronCore pairs take, on the cpu backend one per
        group of ``torch.get_num_threads()`` cores, on a GPU one) and wait. Returns the warm copies
        per variant. A replica that fails to load is logged; the others serve."""
        wanted: dict[VariantKey, int] = {}
        for target in self.settings.replicas:
            spec = self.registry.get(target.model)
            wanted[self._key(spec, target.size or spec.default_size)] = target.count
        if self.settings.replicas_auto:
            spec = self.registry.get(self.default_model)
            key = self._key(spec, spec.default_size)
            self._auto_replicas[key] = self._auto_replica_count(key)
            wanted.setdefault(key, self._auto_replicas[key])
        self.scheduler.ensure_workers(sum(wanted.values()))
        jobs = {key: self.scheduler.submit(_Load(key, count), owner="startup") for key, count in wanted.items()}
        for job in jobs.values():
            job.wait()
        warm = [info.key for info in self.pool.snapshot()]
        return {str(key): warm.count(key) for key in jobs}

    def _auto_replica_count(self, key: VariantKey) -> int:
        """``--replicas auto``: every free NeuronCore pair; on the cpu backend one copy per
        ``torch.get_num_threads()`` cores (each replica's device worker runs its calls on its own
        cores: on 2 cores with 1 thread, 8 API clients got 14.7-16.4 images/s with 2 replicas
        against 9.5-9.9 with one, docs/performance.md); one on a GPU."""
        if self.core_plan is not None:
            return len(self.core_plan.inventory.pairs())
        if self.backend.name == "cpu":
            return min(max(1, usable_cores() // max(1, torch.get_num_threads())), self._copies_in_memory(key))
        return 1

    def _copies_in_memory(self, key: VariantKey) -> int:
        """How many copies of ``key`` fit in half of the host memory free now (a copy takes about its
        artifacts' size in RAM); at least 1, unlimited when either figure is unknown."""
        if key.size is None:
            return 1 << 30
        directory = artifacts.variant_dir(self.registry.artifacts_dir, key.model, key.size, self.backend.name)
        manifest = artifacts.read_manifest(directory) or {}
        copy_bytes = sum(int(entry.get("bytes", 0)) for entry in (manifest.get("components") or {}).values())
        free = available_memory_bytes()
        if not copy_bytes or free is None:
            return 1 << 30
        return max(1, int(free * AUTO_REPLICA_MEMORY_SHARE) // copy_bytes)

    def _replica_target(self, key: VariantKey) -> int:
        """How many warm copies of ``key`` the pool keeps when requests keep them all busy."""
        for target in self.settings.replicas:
            if target.matches(key):
                return target.count
        return self._auto_replicas.get(key, 1)

    def unload(self, model: str, size: Optional[Size] = None) -> int:
        """Drop the warm pipelines of ``model`` (one size or all) that are not in use; returns how many."""
        spec = self.registry.get(model)
        keys = {i.key for i in self.pool.snapshot() if i.key.model == spec.id and (size is None or i.key.size in (size, None))}
        return sum(self.pool.unload(key) for key in keys)

    def _key(self, spec: ModelSpec, size: Size) -> VariantKey:
        return VariantKey(spec.id, size if self.backend.fixed_shape else None)

    def _load_variant(self, key: ReplicaKey) -> WarmPipeline:
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

    def _footprint(self, key: ReplicaKey) -> Footprint:
        """Device memory of a compiled variant, from its manifest (zero if absent: loading will say why)."""
        assert key.size is not None
        directory = artifacts.variant_dir(self.registry.artifacts_dir, key.model, key.size, self.backend.name)
        return footprint_from_manifest(artifacts.read_manifest(directory) or {})

    # --- generation ---------------------------------------------------------------------------

    def generate(
        self, request: GenerateRequest, on_progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelFlag] = None, owner: str = "",
    ) -> GenerateResult:
        """Generate ``request.num_images`` images and wait for them (``submit`` + ``result``);
        raises EngineError subclasses on bad input, ``Cancelled`` when ``cancel`` is set at a step
        boundary or the job is interrupted."""
        return self.submit(request, on_progress=on_progress, cancel=cancel, owner=owner).result()

    def submit(
        self, request: GenerateRequest, owner: str = "", on_progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelFlag] = None,
    ) -> Job[GenerateResult]:
        """Validate ``request`` (raising EngineError subclasses at once) and queue it for a device
        worker. ``owner`` names who may interrupt or skip it (``Engine.interrupt(owner)``);
        ``on_progress`` is called on the worker thread at every step."""
        work = _Work(request, self._resolve(request), on_progress)
        return self.scheduler.submit(work, owner=owner, cancel=cancel)

    def add_job_listener(self, listener: Callable[[Job[Any], Any], None]) -> None:
        """Call ``listener(job, outcome)`` when each queued job (generation or load) ends, just before
        its caller sees the outcome (a result, or the exception it ends with)."""
        self.scheduler.add_listener(listener)

    @staticmethod
    def job_model(job: Job[Any]) -> str:
        """The model id a queued job is for (its request's, or the one it loads)."""
        payload = job.payload
        return payload.resolved.spec.id if isinstance(payload, _Work) else payload.key.model

    @staticmethod
    def is_load_job(job: Job[Any]) -> bool:
        """Whether a queued job warms a model (``load``) rather than generating."""
        return isinstance(job.payload, _Load)

    def interrupt(self, owner: str) -> int:
        """Interrupt ``owner``'s running and queued jobs; returns how many."""
        return self.scheduler.interrupt(owner)

    def skip(self, owner: str) -> int:
        """Skip the image ``owner``'s running jobs are making; returns how many."""
        return self.scheduler.skip(owner)

    def _execute(self, jobs: list[Job[Any]]) -> list[Any]:
        """Run a batch from the queue (on a device worker thread): a load, or generation jobs that
        share model, size, mode, sampler, steps, CFG and strength (``_batch_key``)."""
        if isinstance(jobs[0].payload, _Load):
            load: _Load = jobs[0].payload
            self.pool.ensure_replicas(load.key, load.replicas)
            return [self.pool.ensure(load.key)]
        resolved: Resolved = jobs[0].payload.resolved
        started = time.perf_counter()
        describe = self._describe if resolved.hires is None else None  # a hires first pass keeps its outputs
        run = self._run_pass(jobs, resolved.size, describe, self._call_kwargs)
        runs = [run] if resolved.hires is None else [run, self._second_pass(run, resolved.hires)]
        timings = {
            "load_s": sum(r.load_s for r in runs),
            "total_s": time.perf_counter() - started,
            "denoise_s": sum(r.clock.denoise_s for r in runs),
            "decode_s": sum(r.clock.decode_s for r in runs),
            "steps_run": float(sum(r.clock.steps for r in runs)),
        }
        return [(run if job in run.left else runs[-1]).outcome(job, timings) for job in jobs]

    def _run_pass(self, jobs: list[Job[Any]], size: Size, describe: Optional[Callable[..., str]],
                  kwargs: Callable[[list[Row]], dict[str, Any]], **overrides: Any) -> BatchRun:
        """One pipeline pass over ``jobs`` on the warm variant at ``size`` (leased; loaded first if
        it is not warm). ``overrides``: BatchRun's ``mode`` / ``rows`` for a second pass."""
        spec = jobs[0].payload.resolved.spec
        key = self._key(spec, size)
        started = time.perf_counter()
        was_warm = self.pool.is_warm(key)
        with self.pool.lease(key) as warm:
            run = BatchRun(jobs, warm, self._rows_per_call(spec), describe, kwargs, self.preview_every, size=size,
                           **overrides)
            run.load_s = 0.0 if was_warm else time.perf_counter() - started
            if len(jobs) > 1:
                log.info("running %d requests in one batch (%d images) on %s", len(jobs), len(run.rows), key)
            with warm.lock:
                run.run()
        return run

    def _second_pass(self, first: BatchRun, plan: HiresPlan) -> BatchRun:
        """Hires fix: the rows the first pass finished, upscaled, denoised again at ``plan.size``."""
        jobs = [job for job in first.jobs if job not in first.left]
        if not jobs:
            return first

        def kwargs(rows: list[Row]) -> dict[str, Any]:
            args = self._call_kwargs(rows)
            del args["width"], args["height"]
            args.update(image=second_pass_images([first.outputs[row] for row in rows], plan), strength=plan.strength,
                        num_inference_steps=plan.steps, output_type="pil")
            return args

        rows = [row for row in first.rows if row in first.outputs]
        return self._run_pass(jobs, plan.size, self._describe, kwargs, mode="img2img", rows=rows)

    def batch_limit(self, model: Optional[str] = None) -> int:
        """Images one device call makes for ``model`` (default: the default model) on this backend."""
        return self._rows_per_call(self.registry.get(model or self.default_model))

    def _rows_per_call(self, spec: ModelSpec) -> int:
        """Images per pipeline call: the largest compiled batch (any number on eager, up to a setting)."""
        return spec.max_batch if self.backend.fixed_shape else self.settings.eager_max_batch

    def _batch_key(self, payload: Any) -> Optional[tuple[Any, ...]]:
        """What queued jobs must share to run in one call (None: a load, always alone)."""
        if not isinstance(payload, _Work):
            return None
        r, request = payload.resolved, payload.request
        strength = request.strength if request.init_image is not None else None
        fill = request.inpaint.fill if request.inpaint is not None else None
        return (r.spec.id, r.size, request.mode, r.sampler, r.steps, r.cfg_scale, strength, r.hires, fill,
                r.prompt_chunks)

    def _batch_limit(self, payload: Any) -> int:
        return self._rows_per_call(payload.resolved.spec) if isinstance(payload, _Work) else 1

    def _describe(self, work: "_Work", seed: int) -> str:
        return _infotext(work.request, work.resolved, seed, self.backend.name)

    def _call_kwargs(self, rows: list[Row]) -> dict[str, Any]:
        """Pipeline arguments for ``rows`` of one batch: per-row prompts, generators, init images."""
        works = [row.job.payload for row in rows]
        first: _Work = works[0]
        resolved = first.resolved
        negatives = [w.request.negative_prompt or "" for w in works]
        kwargs: dict[str, Any] = {
            "prompt": per_row([strip_extra_networks(w.request.prompt) for w in works]),  # A1111 drops <lora:…>
            "negative_prompt": per_row(negatives) if any(negatives) else None,
            "num_inference_steps": resolved.steps,
            "guidance_scale": resolved.cfg_scale,
            # row i of a request is what plain diffusers makes with Generator("cpu").manual_seed(seed + i)
            "generator": generators(rows),
            # a hires first pass upscaling latents is not decoded
            "output_type": "latent" if resolved.hires is not None and resolved.hires.on_latents else "pil",
        }
        if first.resolved.inpaint is not None:
            kwargs.update(inpaint_kwargs([w.resolved.inpaint for w in works], first.request.inpaint.fill, resolved.size),
                          strength=first.request.strength)
        elif first.request.init_image is not None:
            images = [fit_image(w.request.init_image, resolved.size, w.request.resize_mode) for w in works]
            kwargs.update(image=per_row(images), strength=first.request.strength)
        else:
            kwargs.update(width=resolved.size.width, height=resolved.size.height)
        return kwargs


def available_memory_bytes() -> Optional[int]:
    """The host memory available to new allocations (Linux ``MemAvailable``; None elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_preview_every(backend: str) -> int:
    """Live previews every 5 steps, but off on Neuron: a step there takes tens of milliseconds and the
    host work between steps bounds throughput, so nothing is added to it unless asked for
    (``--preview-every N``)."""
    return 0 if backend == "neuron" else DEFAULT_PREVIEW_EVERY


def _release_device_memory(warm: WarmPipeline) -> None:
    """Evicted from NeuronCores: drop the compiled modules now so the runtime unloads their NEFFs
    before the next model is loaded into the freed memory."""
    warm.components.clear()
    gc.collect()


def _infotext(request: GenerateRequest, resolved: Resolved, seed: int, backend: str) -> str:
    params = {
        "Steps": resolved.steps,
        "Sampler": resolved.sampler,
        "CFG scale": resolved.cfg_scale,
        "Seed": seed,
        "Size": str(resolved.size),
        "Model": resolved.spec.id,
        # A1111's Lora hashes (name: short hash); the fused LoRAs shape every image of the model
        "Lora hashes": ", ".join(f"{lora.name}: {lora.short_hash}" for lora in resolved.spec.loras) or None,
        "Denoising strength": request.strength if request.init_image is not None else None,
        **(resolved.hires.infotext() if resolved.hires is not None else {}),
        **(inpaint_infotext(request.inpaint) if request.inpaint is not None else {}),
        "Backend": backend,
    }
    return format_infotext(request.prompt, request.negative_prompt, params)


__all__ = ["Engine", "EngineSettings", "LoraInfo", "ModelInfo", "ReplicaTarget"]
