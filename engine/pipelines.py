"""Warm pipelines: the shared components of one (model, size), and per-request pipeline views.

A warm pipeline holds components only. Each request gets its own scheduler (``make_scheduler``)
and its own diffusers pipeline object built around the shared components, so no request ever
mutates state another request sees.
"""
from __future__ import annotations

import os
import resource
import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from . import artifacts
from .backends.base import Backend
from .compiled_modules import CompiledTextEncoder, CompiledUNet, CompiledVAE
from .families import FAMILIES, UNET, VAE_DECODER, VAE_ENCODER, Family, is_unet, unet_chunks_of
from .inpaint import is_inpainting_unet, whole_image_kwargs
from .prompt_embeds import with_prompt_embeds
from .registry import ModelSpec, Registry
from .samplers import make_scheduler
from .sources import TORCH_DTYPES, ComponentLoader, load_parts, pipeline_class_for
from .types import Size, VariantKey


@dataclass
class WarmPipeline:
    key: VariantKey
    spec: ModelSpec
    components: dict[str, Any]
    scheduler_config: dict[str, Any]
    load_seconds: float
    device_ids: tuple[int, ...] = ()
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _prototypes: dict[str, Any] = field(default_factory=dict, repr=False)
    peak_rss_bytes: int = 0  # the process's peak resident memory seen while this pipeline loaded
    warmup_seconds: float = 0.0  # the warm-up generation run before it was marked ready (neuron)

    @property
    def family(self) -> Family:
        return FAMILIES[self.spec.family]

    @property
    def inpainting(self) -> bool:
        """Whether the UNet is an inpainting one (9 input channels): every mode then runs as inpaint."""
        return UNET in self.components and is_inpainting_unet(self.components[UNET])

    def view(self, mode: str, sampler: str) -> Any:
        """A fresh diffusers pipeline for one request: shared components, a scheduler of its own."""
        pipeline_class = pipeline_class_for(self.spec.family, mode)
        extra = self.family.pipeline_kwargs()
        pipe = pipeline_class(**self.components, scheduler=self.new_scheduler(sampler), **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def new_scheduler(self, sampler: str) -> Any:
        """A scheduler of its own for one request: a deep copy of a never-used prototype.

        Building with ``from_config`` costs 4-6 ms (about 100 ms for DPM++ SDE) in config
        introspection; copying the untouched prototype gives an identical fresh scheduler in under 1 ms.
        """
        prototype = self._prototypes.get(sampler)
        if prototype is None:
            prototype = self._prototypes.setdefault(sampler, make_scheduler(sampler, self.scheduler_config))
        return copy.deepcopy(prototype)


def load_compiled(
    registry: Registry, spec: ModelSpec, size: Size, backend: Backend, device_ids: Sequence[int] = ()
) -> WarmPipeline:
    """Configs and tokenizers from the source, every network from the compiled artifacts."""
    with PeakRss() as rss:
        warm = _load_compiled(registry, spec, size, backend, device_ids)
    warm.peak_rss_bytes = rss.peak
    return warm


def _load_compiled(registry: Registry, spec: ModelSpec, size: Size, backend: Backend,
                   device_ids: Sequence[int]) -> WarmPipeline:
    started = time.perf_counter()
    family = FAMILIES[spec.family]
    directory = artifacts.variant_dir(registry.artifacts_dir, spec.id, size, backend.name)
    command = artifacts.compile_command(spec.id, size, backend.name, registry.path)
    from .compile import expected_fingerprint

    written = artifacts.read_manifest(directory)
    if written is not None:
        # The backend's own reasons first (another compiler release, too few cores): they say more
        # than the generic fingerprint mismatch below.
        backend.check_target(written, command)
    manifest = artifacts.verified_manifest(directory, expected_fingerprint(spec, size, backend), command)
    artifacts.check_content(directory, manifest, f"{spec.id}@{size}", command)
    parts = load_parts(spec)
    entries = manifest["components"]

    def runner(component: str) -> Any:
        spans_cores = is_unet(component) or entries[component].get("tp_degree", 1) > 1  # DataParallel / sharded
        ids = device_ids if spans_cores else device_ids[:1]
        kind = UNET if is_unet(component) else component  # every batch size's UNet loads as the UNet
        return backend.load_component(kind, directory / entries[component]["file"], entries[component], ids)

    def dtype_of(component: str) -> torch.dtype:
        return getattr(torch, entries[component]["input_dtype"])

    device = backend.device
    if family.denoiser != UNET:
        from .pixart import compiled_components

        return WarmPipeline(VariantKey(spec.id, size), spec,
                            compiled_components(parts, entries, runner, dtype_of, device), parts.scheduler_config,
                            time.perf_counter() - started, tuple(device_ids))
    components: dict[str, Any] = {}
    # The UNet first and alone: it is most of the bytes, and host RAM peaks while it loads.
    unets = {(entries[name]["batch"], unet_chunks_of(name)): runner(name) for name in entries if is_unet(name)}
    components[UNET] = CompiledUNet(unets, parts.unet_config, dtype_of(UNET), device, family.has_added_conditions)
    for name in family.text_encoders:
        components[name] = CompiledTextEncoder(
            runner(name), parts.text_encoder_configs[name], entries[name]["batch"], dtype_of(name), device,
            returns_hidden=family.name == "sdxl")
    components["vae"] = CompiledVAE(runner(VAE_DECODER), runner(VAE_ENCODER), parts.vae_config,
                                    entries[VAE_DECODER]["batch"], dtype_of(VAE_DECODER), device)
    components.update(parts.tokenizers)
    return WarmPipeline(VariantKey(spec.id, size), spec, components, parts.scheduler_config,
                        time.perf_counter() - started, tuple(device_ids))


def load_eager(spec: ModelSpec, backend: Backend) -> WarmPipeline:
    """Full diffusers modules on the backend's device (any size)."""
    with PeakRss() as rss:
        warm = _load_eager(spec, backend)
    warm.peak_rss_bytes = rss.peak
    return warm


def _load_eager(spec: ModelSpec, backend: Backend) -> WarmPipeline:
    started = time.perf_counter()
    family = FAMILIES[spec.family]
    parts = load_parts(spec)
    loader = ComponentLoader(spec, TORCH_DTYPES[spec.dtype])
    try:
        components = {name: loader.module(name).to(backend.device)
                      for name in (*family.text_encoders, family.denoiser, "vae")}
    finally:
        loader.close()
    components.update(parts.tokenizers)
    return WarmPipeline(VariantKey(spec.id, None), spec, components, parts.scheduler_config,
                        time.perf_counter() - started)


def warm_up(warm: WarmPipeline, steps: int = 2) -> float:
    """Run every compiled graph once before the pipeline serves requests; returns the seconds taken.

    On Neuron the first inference of a loaded model is 3-4x slower (lazily loaded NEFFs reach their
    cores, the runtime allocates): a short txt2img generation with guidance (text encoders, the UNet
    on both cores of its pair, the VAE decoder), one step at each other compiled batch size and
    prompt length, and one VAE encode (img2img's first graph) pay that cost here instead of in the
    first users' requests.
    """
    started = time.perf_counter()
    size = warm.key.size
    assert size is not None, "warm-up is for fixed-shape (compiled) pipelines"
    with warm.lock:
        # every compiled UNet graph once: the smallest with the full warm-up, the others a step each;
        # an even row count as CFG pairs, an odd one (a CFG-free graph) as requests at CFG 0
        graphs = warm.components[UNET].graphs if UNET in warm.components else [(2, 1)]  # PixArt: one transformer
        for index, (rows, chunks) in enumerate(graphs):
            pairs = rows % 2 == 0
            kwargs = dict(prompt=[" BREAK ".join(["warm-up"] * chunks)] * (rows // 2 if pairs else rows),
                          num_inference_steps=steps if index == 0 else 1,
                          guidance_scale=max(2.0, warm.spec.defaults.cfg_scale) if pairs else 0.0,
                          width=size.width, height=size.height, generator=torch.Generator("cpu").manual_seed(0),
                          output_type="np")
            _warm_up_call(warm, size, kwargs, chunks)
        if warm.family.has_img2img:
            warm.components["vae"].encode(torch.zeros(1, 3, size.height, size.width))
    warm.warmup_seconds = time.perf_counter() - started
    return warm.warmup_seconds


def _warm_up_call(warm: WarmPipeline, size: Size, kwargs: dict[str, Any], chunks: int) -> None:
    mode = "inpaint" if warm.inpainting else "txt2img"
    pipe = warm.view(mode, warm.spec.defaults.sampler)
    kwargs = whole_image_kwargs(kwargs, size) if warm.inpainting else kwargs
    pipe(**with_prompt_embeds(warm.components, warm.spec.family, kwargs, chunks,
                              bool(pipe.config.get("force_zeros_for_empty_prompt", False))))


class PeakRss:
    """Samples this process's resident set size while the block runs; ``peak`` is the largest seen.

    Reads ``/proc/self/statm`` every ``interval`` seconds from a daemon thread (Linux); elsewhere
    falls back to ``getrusage``'s lifetime peak.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakRss":
        self.peak = current_rss()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, current_rss())

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss())


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
