"""Compile one (model, resolution, backend) variant into artifacts, and plan a whole registry.

Components are loaded, wrapped, traced and saved one at a time, so only one component's weights
sit in host memory. Everything is written into a temporary directory and published atomically.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from . import artifacts
from .backends.base import Backend
from .errors import EngineError
from .families import (FAMILIES, UNET, VAE_DECODER, VAE_ENCODER, Family, ShapeConfigs, example_inputs, is_unet,
                       traceable, unet_component, unet_rows)
from .registry import ModelSpec, Registry
from .sources import ComponentLoader, ModelParts, load_parts
from .types import Size

Log = Callable[[str], None]


@dataclass(frozen=True)
class VariantPlan:
    spec: ModelSpec
    size: Size
    status: artifacts.VariantStatus


@dataclass(frozen=True)
class CompileOutcome:
    model: str
    size: Size
    state: str  # "compiled" | "skipped" | "failed"
    seconds: float = 0.0
    error: str = ""


def expected_fingerprint(spec: ModelSpec, size: Size, backend: Backend) -> str:
    stack = backend.stack_key()
    tp_degree = backend.tensor_parallel_degree(spec)
    if tp_degree > 1:  # sharded over another core count: another artifact
        stack += f",tp_degree={tp_degree}"
    return artifacts.fingerprint(spec, size, backend.name, stack)


def plan(
    registry: Registry, backend: Backend, models: Optional[Iterable[str]] = None,
    resolutions: Optional[Iterable[Size]] = None,
) -> list[VariantPlan]:
    """Every selected model x resolution with its current status (compiled / missing / stale)."""
    wanted_models = list(models) if models else list(registry.ids)
    for model_id in wanted_models:
        registry.get(model_id)  # raises UnknownModel with the list of known ids
    wanted_sizes = set(resolutions) if resolutions else None
    rows = []
    for spec in registry.models:
        if spec.id not in wanted_models:
            continue
        for size in spec.resolutions:
            if wanted_sizes is not None and size not in wanted_sizes:
                continue
            directory = artifacts.variant_dir(registry.artifacts_dir, spec.id, size, backend.name)
            status = artifacts.variant_status(directory, expected_fingerprint(spec, size, backend))
            rows.append(VariantPlan(spec, size, status))
    return rows


def compile_variant(registry: Registry, spec: ModelSpec, size: Size, backend: Backend, log: Log = print) -> float:
    """Compile every component of ``spec`` at ``size``; returns seconds. Raises EngineError on failure."""
    family = FAMILIES[spec.family]
    final = artifacts.variant_dir(registry.artifacts_dir, spec.id, size, backend.name)
    started = time.perf_counter()
    parts = load_parts(spec)
    shapes = ShapeConfigs(unet=parts.unet_config, vae=parts.vae_config,
                          token_ids=parts.prompt_token_ids(family.text_length))
    partial = artifacts.PartialVariant(final)
    loader = ComponentLoader(spec)
    tp_degree = backend.tensor_parallel_degree(spec)
    try:
        for module_name, components in _load_order(_components(family, spec)):
            if tp_degree > 1 and module_name in backend.sharded_components(family):
                # Never loaded here: each tensor-parallel rank loads and shards the weights itself.
                _compile_sharded(backend, family, spec, module_name, size, shapes, tp_degree, partial, log)
                continue
            module = loader.module(module_name)
            for component in components:
                _compile_one(backend, family, component, module, size, shapes, spec.dtype, partial, log)
            del module
            gc.collect()
        seconds = time.perf_counter() - started
        partial.publish(_manifest(spec, size, backend, parts, seconds))
    except BaseException:
        partial.discard()
        raise
    finally:
        loader.close()
    return seconds


def _components(family: Family, spec: ModelSpec) -> tuple[str, ...]:
    """The family's components, with one UNet artifact per compiled batch size and prompt length
    (``unet``, ``unet_b4``, ``unet_c2``, ``unet_b4_c2``)."""
    unets = tuple(name for chunks in spec.prompt_chunks for name in _unets(spec, chunks))
    return tuple(c for name in family.components for c in (unets if name == UNET else (name,)))


def _unets(spec: ModelSpec, chunks: int) -> list[str]:
    """The UNets of one prompt length: one per batch size (CFG pairs), and with ``cfg_free_unet`` one
    per batch size at CFG <= 1 whose row count no CFG graph already has (a graph takes any rows)."""
    with_cfg = [unet_component(batch, chunks) for batch in spec.batch_sizes]
    rows = {unet_rows(name) for name in with_cfg}
    without = [unet_component(batch, chunks, cfg=False) for batch in spec.batch_sizes
               if spec.cfg_free_unet and batch not in rows]
    return with_cfg + without


def _load_order(components: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """Group components by the module whose weights they need (the VAE serves two, the UNet one
    artifact per batch size)."""
    groups: dict[str, list[str]] = {}
    for component in components:
        module = "vae" if component in (VAE_DECODER, VAE_ENCODER) else UNET if is_unet(component) else component
        groups.setdefault(module, []).append(component)
    return list(groups.items())


def _compile_one(backend, family, component, module, size, shapes, dtype, partial, log: Log) -> None:
    started = time.perf_counter()
    log(f"  {component:<15} compiling ...")
    inputs = example_inputs(family, component, size.width, size.height, shapes)
    kind = UNET if is_unet(component) else component  # every UNet artifact is compiled as the UNet
    wrapped = traceable(family, kind, module)
    with backend.tracing(family, kind):
        entry = backend.compile_component(family, kind, wrapped, inputs, partial.component_dir(component), dtype)
    partial.record(component, entry)
    log(f"  {component:<15} done in {time.perf_counter() - started:.1f}s")


def _compile_sharded(backend: Backend, family: Family, spec: ModelSpec, component: str, size: Size,
                     shapes: ShapeConfigs, tp_degree: int, partial: artifacts.PartialVariant, log: Log) -> None:
    started = time.perf_counter()
    log(f"  {component:<15} compiling, sharded over {tp_degree} cores ...")
    inputs = example_inputs(family, component, size.width, size.height, shapes)
    entry = backend.compile_sharded(family, component, spec, inputs, partial.component_dir(component), tp_degree)
    partial.record(component, entry)
    log(f"  {component:<15} done in {time.perf_counter() - started:.1f}s")


def _manifest(spec: ModelSpec, size: Size, backend: Backend, parts: ModelParts, seconds: float) -> dict:
    return {
        "model": spec.id,
        "family": spec.family,
        "size": str(size),
        "backend": backend.name,
        "dtype": spec.dtype,
        "batch_sizes": list(spec.batch_sizes),
        "prompt_chunks": list(spec.prompt_chunks),
        "cfg_free_unet": spec.cfg_free_unet,
        "tp_degree": backend.tensor_parallel_degree(spec),
        "source": {"kind": spec.source.kind, "ref": spec.source.ref, "revision": spec.source.revision,
                   "config": spec.source.config},
        "loras": [{"name": lora.name, "path": lora.path, "scale": lora.scale, "sha256": lora.sha256}
                  for lora in spec.loras],
        "fingerprint": expected_fingerprint(spec, size, backend),
        "versions": backend.stack_versions(),
        "target": backend.target(),
        "compile_seconds": round(seconds, 3),
        "torch_threads": torch.get_num_threads(),
    }


def compile_all(
    registry: Registry, backend: Backend, models: Optional[Iterable[str]] = None,
    resolutions: Optional[Iterable[Size]] = None, force: bool = False, log: Log = print,
) -> list[CompileOutcome]:
    """Compile what is missing or stale (everything with ``force``); never stops at the first failure."""
    outcomes = []
    for row in plan(registry, backend, models, resolutions):
        label = f"{row.spec.id} {row.size} [{backend.name}]"
        if row.status.state == "compiled" and not force:
            log(f"{label}: up to date, skipped")
            outcomes.append(CompileOutcome(row.spec.id, row.size, "skipped"))
            continue
        log(f"{label}: compiling ({row.status.state}{': ' + row.status.reason if row.status.reason else ''})")
        try:
            seconds = compile_variant(registry, row.spec, row.size, backend, log)
        except EngineError as exc:
            log(f"{label}: FAILED: {exc}")
            outcomes.append(CompileOutcome(row.spec.id, row.size, "failed", error=str(exc)))
            continue
        log(f"{label}: compiled in {seconds:.1f}s")
        outcomes.append(CompileOutcome(row.spec.id, row.size, "compiled", seconds))
    return outcomes


def ensure_compiled(registry: Registry, backend: Backend, model: str, sizes: Optional[Iterable[Size]] = None,
                    log: Log = print) -> list[CompileOutcome]:
    """On a fixed-shape backend, compile ``model``'s missing or stale resolutions (``sizes``: only
    those), printing progress, so a fresh checkout serves or generates its first image without a
    separate ``compile_all.py`` step. Nothing to do on eager or when everything is compiled."""
    if not backend.fixed_shape:
        return []
    wanted = list(sizes) if sizes is not None else None
    todo = [row for row in plan(registry, backend, models=[model], resolutions=wanted) if row.status.state != "compiled"]
    if not todo:
        return []
    log(f"Compiling {model} ({', '.join(str(row.size) for row in todo)}) for the {backend.name} backend: its "
        f"artifacts are missing or stale. This runs once; artifacts go to {registry.artifacts_dir}.")
    started = time.perf_counter()
    outcomes = compile_all(registry, backend, models=[model], resolutions=[row.size for row in todo], log=log)
    failed = [o for o in outcomes if o.state == "failed"]
    if failed:
        log(f"Compiling {model} failed for {', '.join(str(o.size) for o in failed)}; "
            f"`{artifacts.compile_command(model, failed[0].size, backend.name, registry.path)}` retries it.")
    else:
        log(f"Compiled {model} in {time.perf_counter() - started:.1f}s.")
    return outcomes
