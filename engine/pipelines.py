"""Warm pipelines: the shared components of one (model, size), and per-request pipeline views.

A warm pipeline holds components only. Each request gets its own scheduler (``make_scheduler``)
and its own diffusers pipeline object built around the shared components, so no request ever
mutates state another request sees.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from . import artifacts
from .backends.base import Backend
from .compiled_modules import CompiledTextEncoder, CompiledUNet, CompiledVAE
from .families import FAMILIES, UNET, VAE_DECODER, VAE_ENCODER, Family
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

    @property
    def family(self) -> Family:
        return FAMILIES[self.spec.family]

    def view(self, mode: str, sampler: str) -> Any:
        """A fresh diffusers pipeline for one request: shared components, a scheduler of its own."""
        pipeline_class = pipeline_class_for(self.spec.family, mode)
        extra: dict[str, Any] = {"add_watermarker": False} if self.spec.family == "sdxl" else {
            "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        pipe = pipeline_class(**self.components, scheduler=make_scheduler(sampler, self.scheduler_config), **extra)
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load_compiled(
    registry: Registry, spec: ModelSpec, size: Size, backend: Backend, device_ids: Sequence[int] = ()
) -> WarmPipeline:
    """Configs and tokenizers from the source, every network from the compiled artifacts."""
    started = time.perf_counter()
    family = FAMILIES[spec.family]
    directory = artifacts.variant_dir(registry.artifacts_dir, spec.id, size, backend.name)
    command = artifacts.compile_command(spec.id, size, backend.name, registry.path)
    from .compile import expected_fingerprint

    manifest = artifacts.verified_manifest(directory, expected_fingerprint(spec, size, backend), command)
    backend.check_target(manifest, command)
    parts = load_parts(spec)
    entries = manifest["components"]

    def runner(component: str) -> Any:
        ids = device_ids if component == UNET else device_ids[:1]
        return backend.load_component(component, directory / entries[component]["file"], entries[component], ids)

    def dtype_of(component: str) -> torch.dtype:
        return getattr(torch, entries[component]["input_dtype"])

    device = backend.device
    components: dict[str, Any] = {}
    for name in family.text_encoders:
        components[name] = CompiledTextEncoder(
            runner(name), parts.text_encoder_configs[name], entries[name]["batch"], dtype_of(name), device,
            returns_hidden=family.name == "sdxl")
    components[UNET] = CompiledUNet(runner(UNET), parts.unet_config, entries[UNET]["batch"], dtype_of(UNET),
                                    device, family.has_added_conditions)
    components["vae"] = CompiledVAE(runner(VAE_DECODER), runner(VAE_ENCODER), parts.vae_config,
                                    entries[VAE_DECODER]["batch"], dtype_of(VAE_DECODER), device)
    components.update(parts.tokenizers)
    return WarmPipeline(VariantKey(spec.id, size), spec, components, parts.scheduler_config,
                        time.perf_counter() - started, tuple(device_ids))


def load_eager(spec: ModelSpec, backend: Backend) -> WarmPipeline:
    """Full diffusers modules on the backend's device (any size)."""
    started = time.perf_counter()
    family = FAMILIES[spec.family]
    parts = load_parts(spec)
    loader = ComponentLoader(spec, TORCH_DTYPES[spec.dtype])
    try:
        components = {name: loader.module(name).to(backend.device) for name in (*family.text_encoders, "unet", "vae")}
    finally:
        loader.close()
    components.update(parts.tokenizers)
    return WarmPipeline(VariantKey(spec.id, None), spec, components, parts.scheduler_config,
                        time.perf_counter() - started)
