"""The ``neuron`` backend: Stable Diffusion on AWS Inferentia2 / Trainium NeuronCores via torch-neuronx.

The compile recipe follows the aws-neuron-samples Stable Diffusion notebooks (SD 1.5, SD 2.1, SDXL):

* every component is traced with ``torch_neuronx.trace`` from the same traceable wrappers the cpu
  backend uses (``engine.families``), weights inlined into the NEFF;
* while tracing, ``neuron_attention(family)`` swaps diffusers' attention scores for a plain
  ``bmm * scale -> softmax`` that neuronx-cc fuses (``NEURON_FUSE_SOFTMAX=1``), and restores the
  original afterwards, even on error;
* compiler arguments per component come from ``compiler_args``;
* the UNet is compiled for one row per core (batch 1) and served with ``torch_neuronx.DataParallel``
  over a core pair, so the classifier-free-guidance pair of every step runs one row per core; the
  manifest records that layout and ``CompiledUNet`` is fed batches of two;
* ``async_load`` on every component and ``lazy_load`` on the UNet, as the samples do, so loading
  overlaps and the UNet reaches its cores only at the first call (the pool's warm-up generation).

``torch_neuronx`` is imported when a ``NeuronBackend`` is created, never at module import, so the
rest of the engine runs where the Neuron SDK is absent; a missing or placeholder SDK raises
``BackendUnavailable``. ``apply_neuron_environment`` is the one function in the project that
writes ``os.environ`` (the Neuron variables the compiler must see); ``visible_cores_setting``
reads the runtime's ``NEURON_RT_VISIBLE_CORES``. See docs/inferentia.md.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import shutil
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Optional, Sequence

import psutil
import torch
from torch import nn

from ..errors import ArtifactMismatch, BackendUnavailable, CompileError, ModelLoadError
from ..families import FAMILIES, TEXT_ENCODER, TEXT_ENCODER_2, TRANSFORMER, UNET, VAE_DECODER, VAE_ENCODER, Family
from ..placement import (CoreInventory, core_owners, device_nodes, discover_cores, footprint_from_manifest,
                         owners_message, run_neuron_ls)
from . import NEURON_TARGETS
from .base import COMPONENT_FILE, Backend, input_specs

log = logging.getLogger(__name__)

# Neuron variables the compile recipe depends on (set before torch_neuronx is imported).
NEURON_ENVIRONMENT = {"NEURON_FUSE_SOFTMAX": "1"}
VISIBLE_CORES_VARIABLE = "NEURON_RT_VISIBLE_CORES"

# The UNet runs DataParallel over this many cores, one row of the CFG pair on each.
UNET_CORES = 2
DEFAULT_TARGET = NEURON_TARGETS[0]
# Host RAM a load takes per byte of Neuron binaries (the file is read, then handed to the runtime):
# an estimate with margin, not a measurement.
HOST_RAM_PER_ARTIFACT_BYTE = 1.5
INSTANCE_HOST_RAM_GIB = {"inf2.xlarge": 16, "inf2.8xlarge": 128, "inf2.24xlarge": 384, "inf2.48xlarge": 768}
# With dtype bf16 these are traced with bf16 weights (the SD2.1 sample casts the UNet and the text
# encoder); the VAE keeps fp32 weights (decoding in bf16 bands colours) with bf16 matmuls.
BF16_WEIGHTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)
COMPILER_WORKDIR = "compiler_workdir"
COMPILER_LOG = "log-neuron-cc.txt"

SDK_HINT = (
    "The neuron backend needs the AWS Neuron SDK (torch-neuronx and neuronx-cc), which only installs from "
    "https://pip.repos.neuron.amazonaws.com: on an inf2/trn1 instance run "
    "`source /opt/aws_neuronx_venv_pytorch_2_9/bin/activate` (Neuron DLAMI, SDK 2.31) before starting. "
    "PyPI's torch-neuronx and neuronx-cc are empty placeholders. Use --backend cpu elsewhere; see docs/inferentia.md.")


def apply_neuron_environment() -> dict[str, str]:
    """Set the Neuron variables the compile recipe needs; the one place this project writes ``os.environ``.

    ``NEURON_FUSE_SOFTMAX=1`` lets neuronx-cc fuse the softmax of the patched attention (see
    ``neuron_attention``). It must be in the environment before ``torch_neuronx`` is imported and
    before the compiler subprocess starts, so ``NeuronBackend`` calls this first. Returns what was set.
    """
    for name, value in NEURON_ENVIRONMENT.items():
        os.environ[name] = value
    return dict(NEURON_ENVIRONMENT)


def visible_cores_setting() -> Optional[str]:
    """``NEURON_RT_VISIBLE_CORES`` as the Neuron runtime reads it (read-only), or None when unset."""
    return os.environ.get(VISIBLE_CORES_VARIABLE) or None


def num_cores_setting() -> Optional[str]:
    """``NEURON_RT_NUM_CORES`` (read-only), or None when unset."""
    return os.environ.get("NEURON_RT_NUM_CORES") or None


def import_sdk() -> ModuleType:
    """``torch_neuronx`` (after ``apply_neuron_environment``); ``BackendUnavailable`` if it cannot be used."""
    apply_neuron_environment()
    try:
        sdk = importlib.import_module("torch_neuronx")
    except ImportError as exc:
        raise BackendUnavailable(f"torch_neuronx is not installed ({exc}). {SDK_HINT}") from None
    except Exception as exc:  # the PyPI placeholder raises on import; report it as unavailable
        raise BackendUnavailable(f"torch_neuronx cannot be imported ({type(exc).__name__}: {exc}). {SDK_HINT}") from None
    if not callable(getattr(sdk, "trace", None)):
        raise BackendUnavailable(f"torch_neuronx has no trace() (a placeholder package?). {SDK_HINT}")
    return sdk


def _version_of(module_name: str, distribution: str) -> str:
    try:
        version = getattr(importlib.import_module(module_name), "__version__", None)
    except Exception:  # an absent compiler is reported as "unknown", not fatal for serving
        version = None
    if version:
        return str(version)
    try:
        from importlib.metadata import version as dist_version

        return dist_version(distribution)
    except Exception:
        return "unknown"


# --- compiler arguments ---------------------------------------------------------------------------


def compiler_args(family: Family, component: str, dtype: str, optlevel: Optional[int] = None,
                  target: str = DEFAULT_TARGET) -> list[str]:
    """neuronx-cc arguments for one component.

    * ``--target=inf2`` (or trn1/trn2) always: without it torch-neuronx 2.x asks the local device what
      to compile for and fails on a build box without one (aws-neuron-sdk issue 910; optimum-neuron
      adopted the same fix in PR 961);
    * ``--model-type=unet-inference`` for the UNet and the VAE decoder and encoder (U-Net shaped
      convolution graphs), ``--model-type=transformer`` for the text encoders (as optimum-neuron's
      exporter passes them); for PixArt-Sigma ``unet-inference`` on every component, T5 included, as
      seed 002's compile scripts pass it;
    * ``--enable-fast-loading-neuron-binaries`` everywhere except the SDXL UNet, which the
      aws-neuron-samples SDXL notebook compiles without it (the sample gives no reason; we follow
      the recipe that was validated on hardware rather than guess at one);
    * precision from the registry dtype: fp32 is ``--auto-cast none`` (neuronx-cc otherwise casts
      matrix multiplications to bf16 by default), bf16 is ``--auto-cast matmult --auto-cast-type bf16``;
    * ``-O1``/``-O2``/``-O3`` when ``optlevel`` is given (the compiler's default is 2).
    """
    if target not in NEURON_TARGETS:
        raise CompileError(f"unknown Neuron compile target {target!r}; use one of {', '.join(NEURON_TARGETS)}")
    args = [f"--target={target}"]
    if component in (UNET, VAE_DECODER, VAE_ENCODER) or family.denoiser == TRANSFORMER:
        args.append("--model-type=unet-inference")
    elif component in (TEXT_ENCODER, TEXT_ENCODER_2):
        args.append("--model-type=transformer")
    if not (family.name == "sdxl" and component == UNET):
        args.append("--enable-fast-loading-neuron-binaries")
    if dtype == "bf16":
        args += ["--auto-cast", "matmult", "--auto-cast-type", "bf16"]
    elif dtype == "fp32":
        args += ["--auto-cast", "none"]
    else:
        raise CompileError(f"the neuron backend compiles fp32 or bf16, not {dtype!r}")
    if optlevel is not None:
        if optlevel not in (1, 2, 3):
            raise CompileError(f"neuronx-cc optimization level must be 1, 2 or 3, got {optlevel!r}")
        args.append(f"-O{optlevel}")
    return args


# --- the attention patch --------------------------------------------------------------------------


def _bmm_softmax(query: torch.Tensor, key: torch.Tensor, scale: float, upcast: bool) -> torch.Tensor:
    """``softmax(q @ k^T * scale)`` as one bmm, a multiply and a softmax neuronx-cc can fuse.

    For self-attention (square scores) the samples compute ``k @ q^T``, soft-max over dim 1 and
    transpose back: the same probabilities in the layout the compiler handles best.
    """
    if query.shape == key.shape:
        scores = torch.bmm(key, query.transpose(-1, -2)) * scale
        if upcast:
            scores = scores.float()
        return scores.softmax(dim=1).permute(0, 2, 1)
    scores = torch.bmm(query, key.transpose(-1, -2)) * scale
    if upcast:
        scores = scores.float()
    return scores.softmax(dim=-1)


def _sd_attention_scores(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """SD 1.x / 2.x: honour ``upcast_attention`` / ``upcast_softmax`` (SD 2.1-768 sets them)."""

    def get_attention_scores(self: Any, query: torch.Tensor, key: torch.Tensor,
                             attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is not None:  # never the case in SD UNets/VAEs; keep the exact path anyway
            return original(self, query, key, attention_mask)
        dtype = query.dtype
        if self.upcast_attention:
            query, key = query.float(), key.float()
        return _bmm_softmax(query, key, self.scale, bool(self.upcast_softmax)).to(dtype)

    return get_attention_scores


def _sdxl_attention_scores(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """SDXL: no upcasting (as in the SDXL sample), same scale rule."""

    def get_attention_scores(self: Any, query: torch.Tensor, key: torch.Tensor,
                             attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is not None:
            return original(self, query, key, attention_mask)
        return _bmm_softmax(query, key, self.scale, upcast=False)

    return get_attention_scores


@contextlib.contextmanager
def neuron_attention(family: Family) -> Iterator[None]:
    """While active, diffusers attention computes its scores with ``_bmm_softmax``.

    The scale is always the layer's own ``attn.scale`` (``dim_head ** -0.5``): 0.125 for the 64-wide
    heads of SD 2.x and SDXL (the SD 2 sample hard-codes it), 1/sqrt(40|80|160) for SD 1.5's heads,
    where a constant would be wrong. Under torch 2 diffusers' default processor
    (``AttnProcessor2_0``) calls ``scaled_dot_product_attention`` and never ``get_attention_scores``,
    so it is routed through the classic ``AttnProcessor`` path for the duration as well. Both class
    attributes are restored on exit, error or not.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    original_scores = Attention.__dict__["get_attention_scores"]
    original_call = AttnProcessor2_0.__dict__["__call__"]
    make = _sdxl_attention_scores if family.name == "sdxl" else _sd_attention_scores
    Attention.get_attention_scores = make(original_scores)
    AttnProcessor2_0.__call__ = AttnProcessor.__call__
    try:
        yield
    finally:
        Attention.get_attention_scores = original_scores
        AttnProcessor2_0.__call__ = original_call


# --- NKI flash attention (where the installed SDK has it) ----------------------------------------


def nki_flash_attention() -> Optional[Callable[..., Any]]:
    """The SDK's NKI flash-attention kernel, jitted for torch-neuronx, or None when this SDK has
    none (older neuronx-cc; the recording stand-in) — then the bmm/softmax patch is used alone."""
    try:
        try:
            from neuronxcc.nki._private_kernels.attention import attention_isa_kernel
        except ImportError:
            from neuronxcc.nki.kernels.attention import attention_isa_kernel
        from torch_neuronx.xla_impl.ops import nki_jit
    except ImportError:
        return None
    return nki_jit()(attention_isa_kernel)


def _nki_sdpa(kernel: Callable[..., Any], fallback: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``scaled_dot_product_attention`` for tracing the UNet: self-attention (square, unmasked) runs
    the NKI kernel in the layout the samples give it (q and k as [B*H, D, S], v as [B*H, S, D],
    kernel "AttentionMMSoftmaxMMWithoutSwap"); anything else goes to ``fallback``."""

    def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
             dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
             **extra: Any) -> torch.Tensor:
        if attn_mask is not None or is_causal or dropout_p or extra or query.shape != key.shape:
            return fallback(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, **extra)
        batch, heads, length, dim = query.shape
        q = query.permute(0, 1, 3, 2).reshape(batch * heads, dim, length)
        k = key.permute(0, 1, 3, 2).reshape(batch * heads, dim, length)
        v = value.reshape(batch * heads, length, dim)
        out = torch.zeros((batch * heads, length, dim), dtype=torch.bfloat16, device=query.device)
        kernel(q, k, v, scale if scale is not None else dim ** -0.5, out, kernel_name="AttentionMMSoftmaxMMWithoutSwap")
        return out.reshape(batch, heads, length, dim).to(query.dtype)

    return sdpa


@contextlib.contextmanager
def unet_attention(family: Family, kernel: Optional[Callable[..., Any]]) -> Iterator[str]:
    """Attention while tracing a UNet: with ``kernel``, diffusers' SDPA processor stays and its
    ``scaled_dot_product_attention`` runs self-attention on the NKI kernel (cross-attention on the
    bmm/softmax patch, as the samples do); without, the bmm/softmax patch throughout. Yields what
    was used ("nki-flash" or "bmm-softmax") for the manifest; everything is restored on exit."""
    if kernel is None:
        with neuron_attention(family):
            yield "bmm-softmax"
        return
    import torch.nn.functional as functional

    try:
        from diffusers.models import attention_dispatch
    except ImportError:  # diffusers releases without the dispatcher
        attention_dispatch = None
    original = functional.scaled_dot_product_attention

    def bmm_fallback(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            return original(query, key, value, **kwargs)
        scale = kwargs.get("scale") or query.shape[-1] ** -0.5
        flat = [x.reshape(-1, *x.shape[-2:]) for x in (query, key, value)]
        probs = _bmm_softmax(flat[0], flat[1], scale, upcast=False)
        return torch.bmm(probs, flat[2]).reshape(query.shape[:-1] + (value.shape[-1],))

    patched = _nki_sdpa(kernel, bmm_fallback)
    functional.scaled_dot_product_attention = patched
    dispatch_sdpa = getattr(attention_dispatch, "scaled_dot_product_attention", None) if attention_dispatch else None
    if dispatch_sdpa is not None:
        attention_dispatch.scaled_dot_product_attention = patched
    try:
        yield "nki-flash"
    finally:
        functional.scaled_dot_product_attention = original
        if dispatch_sdpa is not None:
            attention_dispatch.scaled_dot_product_attention = dispatch_sdpa


# --- the backend ----------------------------------------------------------------------------------


class NeuronBackend(Backend):
    """Compiles with neuronx-cc, loads NEFF-backed TorchScript onto NeuronCores.

    ``inventory`` fixes the cores (tests, or a caller that discovered them); by default they are
    discovered on first use, honouring ``NEURON_RT_VISIBLE_CORES``. ``optlevel`` is passed to the
    compiler as ``-O<n>``. ``keep_compiler_workdirs`` keeps each component's neuronx-cc work
    directory (HLO, NEFF, logs) inside the published artifact for debugging; by default it is
    deleted after a successful compile (it holds another copy of the weights).
    """

    name = "neuron"
    fixed_shape = True
    # One Neuron load at a time in this process: the pool loads replicas and models on several
    # worker threads, and torch-neuronx's core-selection context is documented as not thread-safe.
    _load_lock = threading.Lock()

    def __init__(self, inventory: Optional[CoreInventory] = None, optlevel: Optional[int] = None,
                 keep_compiler_workdirs: bool = False, target: str = DEFAULT_TARGET,
                 device_present: Optional[bool] = None,
                 neuron_ls: Callable[[], Optional[list[dict[str, Any]]]] = run_neuron_ls,
                 available_ram: Callable[[], int] = lambda: psutil.virtual_memory().available,
                 nki_attention: bool = True):
        self._sdk = import_sdk()
        self._inventory = inventory
        self.optlevel = optlevel
        self.compile_target = target
        # No /dev/neuron* here (a build box): trace on the CPU backend (cpu_backend=True)
        self.device_present = bool(device_nodes()) if device_present is None else device_present
        self._neuron_ls = neuron_ls
        self._available_ram = available_ram
        self._nki_kernel = nki_flash_attention() if nki_attention else None
        self.keep_compiler_workdirs = keep_compiler_workdirs
        self._versions: Optional[dict[str, str]] = None

    # --- identity ---------------------------------------------------------------------------------

    def stack_versions(self) -> dict[str, str]:
        if self._versions is None:
            import diffusers

            self._versions = {
                "torch": torch.__version__,
                "torch-neuronx": _version_of("torch_neuronx", "torch-neuronx"),
                "neuronx-cc": _version_of("neuronxcc", "neuronx-cc"),
                "diffusers": diffusers.__version__,
            }
        return dict(self._versions)

    def stack_key(self) -> str:
        # A NEFF loads only on the compiler / runtime release that wrote it.
        versions = self.stack_versions()
        return (f"neuronx-cc={versions['neuronx-cc']},torch-neuronx={versions['torch-neuronx']},"
                f"target={self.compile_target}")

    def core_inventory(self) -> CoreInventory:
        """The NeuronCores this process may use (discovered once)."""
        if self._inventory is None:
            self._inventory = discover_cores(visible_cores_setting(), num_cores=num_cores_setting())
            log.info("neuron backend: %s", self._inventory.describe())
        return self._inventory

    def target(self) -> dict[str, Any]:
        return {
            "platform": "neuron",
            "neuron_core": "v2 (inf2, trn1)",
            "compiler_target": self.compile_target,
            "cores_per_model": UNET_CORES,
            "unet": {"batch_per_core": 1, "cores": UNET_CORES, "batch_per_call": UNET_CORES,
                     "data_parallel": "torch_neuronx.DataParallel, set_dynamic_batching=False"},
            "other_components": "one core (the pair's home core)",
        }

    def check_target(self, manifest: dict[str, Any], command: str) -> None:
        """Refuse artifacts from another compiler release, or ones the visible cores cannot hold."""
        where = manifest.get("model", "this model")
        recompile = f"recompile here with `{command} --force`"
        built = manifest.get("versions") or {}
        here = self.stack_versions()
        for name in ("neuronx-cc", "torch-neuronx"):
            if built.get(name) != here[name]:
                raise ArtifactMismatch(
                    f"{where} {manifest.get('size', '')} was compiled with {name} {built.get(name, 'unknown')}, "
                    f"this machine has {name} {here[name]}; Neuron binaries load only on the release that built "
                    f"them: {recompile}")
        if manifest.get("family") in FAMILIES and FAMILIES[manifest["family"]].denoiser == TRANSFORMER:
            self._check_parallel_target(manifest, where, recompile)
            return
        target = manifest.get("target") or {}
        layout = target.get("unet") or {}
        unet_entry = (manifest.get("components") or {}).get(UNET, {})
        per_core, cores = layout.get("batch_per_core"), layout.get("cores")
        if (target.get("platform") != "neuron" or not per_core or not cores
                or per_core * cores != layout.get("batch_per_call") or unet_entry.get("batch") != per_core * cores):
            raise ArtifactMismatch(
                f"{where} {manifest.get('size', '')} has no Neuron UNet batch layout this backend can run "
                f"(target {target or 'missing'}); {recompile}")
        self._require_cores(manifest, where, int(target.get("cores_per_model", cores)),
                            f"its UNet runs DataParallel over {cores} cores, batch {per_core} each",
                            f"{recompile} for this layout once it is supported")
        self._check_memory(manifest, where, f"set dtype: bf16 for it in the registry and {recompile}")

    def _check_parallel_target(self, manifest: dict[str, Any], where: str, recompile: str) -> None:
        """PixArt-Sigma: its T5 and transformer span ``tp_degree`` cores (one shard each)."""
        from ..placement import INSTANCES_BY_CORES

        needed = max(int(manifest.get("tp_degree") or 1), 1)
        fits = [name for count, name in sorted(INSTANCES_BY_CORES.items()) if count >= needed]
        self._require_cores(manifest, where, needed,
                            f"sharded over them: tp_degree {needed}, one shard of its T5 encoder and transformer "
                            f"per core; instances with enough: {', '.join(fits) or 'none listed'}",
                            f"set a smaller tp_degree in the registry and {recompile}")
        self._check_memory(manifest, where, f"raise tp_degree or use dtype: bf16 in the registry and {recompile}")

    def _require_cores(self, manifest: dict[str, Any], where: str, needed: int, why: str, remedy: str) -> None:
        inventory = self.core_inventory()
        if inventory.count < needed:
            raise ArtifactMismatch(
                f"{where} {manifest.get('size', '')} needs {needed} NeuronCores ({why}) but this process sees "
                f"{inventory.describe()}. Make at least {needed} cores visible (e.g. NEURON_RT_VISIBLE_CORES=0-"
                f"{needed - 1}), or {remedy}")

    def _check_memory(self, manifest: dict[str, Any], where: str, remedy: str) -> None:
        """Host RAM to load the binaries, and device memory on the fullest core (``remedy``: what to do)."""
        self._check_host_ram(manifest, where)
        footprint = footprint_from_manifest(manifest)
        capacity = self.core_inventory().hbm_bytes_per_core
        if footprint.home_core_bytes > capacity:
            raise ArtifactMismatch(
                f"{where} {manifest.get('size', '')} needs {footprint.home_core_bytes / 2**30:.1f} GiB on one "
                f"NeuronCore, more than its {capacity / 2**30:.1f} GiB; {remedy}")

    def _check_host_ram(self, manifest: dict[str, Any], where: str) -> None:
        """Loading reads every Neuron binary of the variant into host memory before the device takes
        it: refuse up front, naming the instance types that fit, rather than be killed for memory."""
        needed = int(sum(int(e.get("bytes", 0)) + sum(int(s.get("bytes", 0)) for s in e.get("shards") or ())
                         for e in (manifest.get("components") or {}).values()) * HOST_RAM_PER_ARTIFACT_BYTE)
        available = self._available_ram()
        if needed <= available:
            return
        fits = [name for name, ram in INSTANCE_HOST_RAM_GIB.items() if ram * 2**30 * 0.8 >= needed]
        raise ModelLoadError(
            f"{where} {manifest.get('size', '')} needs about {needed / 2**30:.1f} GiB of free host RAM to load its "
            f"Neuron binaries, and {available / 2**30:.1f} GiB is free. Free memory (fewer warm models: --max-warm) "
            f"or use an instance with more RAM: {', '.join(fits) or 'none of the inf2 sizes'}"
            f"{' (SDXL on inf2.xlarge is unsupported upstream, aws-neuron-sdk issue 753)' if 'inf2.xlarge' not in fits else ''}")

    # --- compiling --------------------------------------------------------------------------------

    def tensor_parallel_degree(self, spec: Any) -> int:
        return int(getattr(spec, "tp_degree", 1) or 1)

    def sharded_components(self, family: Family) -> tuple[str, ...]:
        from .neuron_parallel import SHARDED_COMPONENTS

        return SHARDED_COMPONENTS if family.denoiser == TRANSFORMER else ()

    def compile_sharded(
        self, family: Family, component: str, spec: Any, example_inputs: Sequence[torch.Tensor], out_dir: Path,
        tp_degree: int,
    ) -> dict[str, Any]:
        """``neuronx_distributed.trace.parallel_model_trace`` over ``tp_degree`` ranks, each building its
        own shard (``ShardBuilder``), then ``parallel_model_save``: one ``tp_<rank>.pt`` per core. Weights
        stay outside the NEFFs (``inline_weights_to_neff=False``, as seed 002 traces the transformer)."""
        from .neuron_parallel import SHARDS_DIR, ShardBuilder

        nxd_trace = _import_nxd_trace()
        args = compiler_args(family, component, spec.dtype, self.optlevel, self.compile_target)
        # bf16: the ranks load bf16 weights (as the seed's pipeline), so the graphs take bf16 inputs.
        weights_dtype = torch.bfloat16 if spec.dtype == "bf16" else torch.float32
        inputs = tuple(x.to(weights_dtype) if x.is_floating_point() else x for x in example_inputs)
        workdir = out_dir / COMPILER_WORKDIR
        started = time.perf_counter()
        try:
            with torch.no_grad():
                traced = nxd_trace.parallel_model_trace(
                    ShardBuilder(spec, component, tp_degree), inputs, compiler_workdir=str(workdir),
                    compiler_args=args, tp_degree=tp_degree, inline_weights_to_neff=False)
            nxd_trace.parallel_model_save(traced, str(out_dir / SHARDS_DIR))
        except (CompileError, BackendUnavailable):
            raise
        except Exception as exc:  # compiler failures come in many types; report them as one
            raise CompileError(f"neuronx-cc failed on {component} sharded over {tp_degree} cores "
                               f"({' '.join(args)}): {exc}{_log_tail(workdir)}") from exc
        seconds = time.perf_counter() - started
        if not self.keep_compiler_workdirs:
            shutil.rmtree(workdir, ignore_errors=True)
        from .. import artifacts

        ranks = [out_dir / SHARDS_DIR / f"tp_{rank}.pt" for rank in range(tp_degree)]
        missing = [p.name for p in ranks if not p.is_file()]
        if missing:
            raise CompileError(f"parallel_model_save wrote no {', '.join(missing)} for {component}")
        return {
            # rank 0 is the component's file (checksummed with the others); the other ranks are listed in "shards"
            "file": f"{out_dir.name}/{SHARDS_DIR}/{ranks[0].name}",
            "shards": [{"file": f"{out_dir.name}/{SHARDS_DIR}/{p.name}", "bytes": p.stat().st_size,
                        "sha256": artifacts.sha256_file(p)} for p in ranks[1:]],
            "tp_degree": tp_degree,
            "inputs": input_specs(inputs),
            "batch": int(inputs[0].shape[0]),
            "input_dtype": str(weights_dtype).replace("torch.", ""),
            "compiler_args": args,
            "attention": "diffusers AttnProcessor (bmm, softmax)" if component == TRANSFORMER else "transformers T5",
            "compile_seconds": round(seconds, 3),
        }

    def tracing(self, family: Family, component: str) -> contextlib.AbstractContextManager[Any]:
        if component == UNET:
            return unet_attention(family, self._nki_kernel)
        return neuron_attention(family)

    def attention_of(self, component: str) -> str:
        """What the traced ``component``'s attention runs on (recorded in the manifest)."""
        return "nki-flash" if component == UNET and self._nki_kernel is not None else "bmm-softmax"

    def compile_component(
        self, family: Family, component: str, module: nn.Module, example_inputs: Sequence[torch.Tensor],
        out_dir: Path, dtype: str,
    ) -> dict[str, Any]:
        args = compiler_args(family, component, dtype, self.optlevel, self.compile_target)
        inputs = tuple(example_inputs)
        weights_dtype = torch.bfloat16 if dtype == "bf16" and component in BF16_WEIGHTS else torch.float32
        if weights_dtype != torch.float32:
            # As the SD2.1 sample: bf16 weights halve the NEFF and the device memory it takes.
            module = module.to(weights_dtype)
            inputs = tuple(x.to(weights_dtype) if x.is_floating_point() else x for x in inputs)
        layout: Optional[dict[str, int]] = None
        if component == UNET:
            # Compile one core's share of the CFG pair; DataParallel splits each call across the pair.
            # An odd row count (a CFG-free UNet for one request: no unconditional half) runs on one core.
            per_call = int(inputs[0].shape[0])
            cores = UNET_CORES if per_call % UNET_CORES == 0 else 1
            per_core = per_call // cores
            inputs = tuple(x[:per_core] for x in inputs)
            layout = {"batch_per_core": per_core, "cores": cores, "batch_per_call": per_call}
        workdir = out_dir / COMPILER_WORKDIR
        started = time.perf_counter()
        try:
            with torch.no_grad():
                traced = self._sdk.trace(module.eval(), inputs, compiler_workdir=str(workdir),
                                         compiler_args=args, inline_weights_to_neff=True, **self._trace_options())
        except Exception as exc:  # compiler failures come in many types; report them as one
            raise CompileError(
                f"neuronx-cc failed on {component} ({' '.join(args)}): {exc}{_log_tail(workdir)}") from exc
        # As in the samples: load NEFFs in the background, and the UNet only at its first call (which
        # is when DataParallel has put a replica on each core of its pair).
        self._sdk.async_load(traced)
        if component == UNET:
            self._sdk.lazy_load(traced)
        torch.jit.save(traced, str(out_dir / COMPONENT_FILE))
        seconds = time.perf_counter() - started
        if not self.keep_compiler_workdirs:
            shutil.rmtree(workdir, ignore_errors=True)
        entry: dict[str, Any] = {
            "file": f"{out_dir.name}/{COMPONENT_FILE}",
            "inputs": input_specs(inputs),
            # What one call of the loaded runner takes: CompiledUNet / run_fixed_batch feed exactly this.
            "batch": layout["batch_per_call"] if layout else int(inputs[0].shape[0]),
            "input_dtype": str(weights_dtype).replace("torch.", ""),
            "compiler_args": args,
            "attention": self.attention_of(component),
            "compiler_workdir": f"{out_dir.name}/{COMPILER_WORKDIR}" if self.keep_compiler_workdirs else None,
            "compile_seconds": round(seconds, 3),
        }
        if layout:
            entry["layout"] = layout
        return entry

    def _trace_options(self) -> dict[str, Any]:
        """``cpu_backend=True`` where tracing must not start the Neuron runtime: no device here, or
        another process (e.g. the serving app) holds the NeuronCores — a core belongs to one process."""
        if not self.device_present:
            return {"cpu_backend": True}
        listing = self._neuron_ls()
        every_core = [int(c) for d in listing or () for c in d.get("neuroncore_ids") or ()]
        owners = core_owners(listing, every_core)
        if owners:
            log.warning("compiling without the Neuron device (cpu_backend=True): %s", owners_message(owners))
            return {"cpu_backend": True}
        return {}

    # --- loading ----------------------------------------------------------------------------------

    def load_component(
        self, component: str, path: Path, entry: dict[str, Any], device_ids: Optional[Sequence[int]] = None
    ) -> Callable[..., Any]:
        """The UNet as ``DataParallel`` over ``device_ids``; anything else on ``device_ids[0]``."""
        with self._load_lock:
            return self._load_component(component, path, entry, device_ids)

    def _load_component(
        self, component: str, path: Path, entry: dict[str, Any], device_ids: Optional[Sequence[int]]
    ) -> Callable[..., Any]:
        ids = list(device_ids) if device_ids else list(self.core_inventory().pairs()[0])
        tp_degree = int(entry.get("tp_degree", 1))
        if tp_degree > 1:
            # The shards go to tp_degree consecutive cores from the group's first (rank r on core ids[0] + r).
            if len(ids) < tp_degree:
                raise ArtifactMismatch(f"{component} is sharded over {tp_degree} NeuronCores; it was given {ids}")
            experimental = importlib.import_module("torch_neuronx.experimental")
            with experimental.neuron_cores_context(start_nc=ids[0], nc_count=tp_degree):
                return _import_nxd_trace().parallel_model_load(str(path.parent))
        if component == UNET:
            cores = int((entry.get("layout") or {}).get("cores", UNET_CORES))
            if len(ids) < cores:
                raise ArtifactMismatch(f"the UNet runs on {cores} NeuronCores; it was given {ids}")
            module = _jit_load(path)
            return self._sdk.DataParallel(module, ids[:cores], set_dynamic_batching=False)
        experimental = importlib.import_module("torch_neuronx.experimental")
        with experimental.neuron_cores_context(start_nc=ids[0], nc_count=1):
            return _jit_load(path)


def _import_nxd_trace() -> ModuleType:
    """``neuronx_distributed.trace`` (tensor parallelism); ``BackendUnavailable`` when it is absent."""
    try:
        return importlib.import_module("neuronx_distributed.trace")
    except ImportError as exc:
        raise BackendUnavailable(
            f"neuronx_distributed is not installed ({exc}); PixArt-Sigma is sharded over NeuronCores with it "
            f"(tp_degree in the registry). It comes with the Neuron DLAMI's PyTorch venv. {SDK_HINT}") from None


def _jit_load(path: Path) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path))


def _log_tail(workdir: Path, lines: int = 20) -> str:
    """The end of the compiler's log, for error messages (the work directory is discarded after)."""
    logs = sorted(workdir.rglob(COMPILER_LOG)) if workdir.is_dir() else []
    if not logs:
        return ""
    try:
        tail = logs[-1].read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "\n--- neuronx-cc log (last lines) ---\n" + "\n".join(tail)
