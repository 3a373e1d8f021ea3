"""A RECORDING STAND-IN for ``torch_neuronx``, for contract tests on machines without Neuron hardware.

``RecordingTorchNeuronx`` is not the Neuron SDK and compiles nothing. It records how the engine
calls the SDK and does just enough for the engine to run end to end on CPU:

* ``trace()`` records the module class, example input shapes, compiler arguments, compiler work
  directory, whether weights are inlined, the attention implementation active at that moment and
  the ops of the traced graph; it writes a compiler log into the work directory as neuronx-cc does,
  and returns ``torch.jit.trace`` of the module, so the artifacts are real TorchScript that
  ``torch.jit.load`` reads back and that runs on CPU;
* ``DataParallel(module, device_ids, set_dynamic_batching=...)`` records its arguments and runs the
  module once per "core" on an equal slice of the batch (dim 0), as Neuron does with dynamic
  batching off, refusing batches that do not split evenly;
* ``async_load`` / ``lazy_load`` / ``experimental.neuron_cores_context`` record their calls.

Install it with ``install(monkeypatch)``: it goes into ``sys.modules`` as ``torch_neuronx`` (plus
``torch_neuronx.experimental`` and a ``neuronxcc`` carrying a compiler version) for one test or
fixture only. Tests that use it say so in their names and docstrings.
"""
from __future__ import annotations

import contextlib
import importlib.machinery
import os
import sys
import threading
import time
import types
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch

RECORDED_TORCH_NEURONX_VERSION = "2.8.0.2.10+recorded"
RECORDED_NEURONX_CC_VERSION = "2.21.0+recorded"


@dataclass
class TraceCall:
    """One ``torch_neuronx.trace`` call as the engine made it."""

    module_class: str
    input_shapes: list[tuple[int, ...]]
    compiler_args: list[str]
    compiler_workdir: Path
    inline_weights_to_neff: Optional[bool]
    attention_scores: Any  # diffusers Attention.get_attention_scores at trace time
    sdpa_processor_call: Any  # diffusers AttnProcessor2_0.__call__ at trace time
    fuse_softmax: Optional[str]  # NEURON_FUSE_SOFTMAX at trace time
    graph_ops: frozenset[str]
    traced: Any = field(repr=False)
    trace_kwargs: dict[str, Any] = field(default_factory=dict)  # further keyword arguments, e.g. cpu_backend
    weight_dtypes: frozenset[str] = frozenset()  # dtypes of the traced module's floating parameters
    async_loaded: bool = False
    lazy_loaded: bool = False

    @property
    def component(self) -> str:
        """The engine puts each component's work directory under ``<variant tmp>/<component>/``."""
        return self.compiler_workdir.parent.name


@dataclass
class DataParallelCall:
    device_ids: list[int]
    set_dynamic_batching: bool
    dim: int
    chunk_shapes: list[list[tuple[int, ...]]] = field(default_factory=list)  # per call, per input


class RecordingDataParallel:
    """Runs ``module`` once per device id on an equal share of the batch and concatenates."""

    def __init__(self, module: Any, record: DataParallelCall):
        self.module = module
        self.record = record

    def __call__(self, *inputs: torch.Tensor) -> Any:
        cores = len(self.record.device_ids)
        rows = inputs[0].shape[self.record.dim]
        if rows % cores:
            raise RuntimeError(f"recorded DataParallel: batch {rows} does not split over {cores} cores "
                               "with dynamic batching disabled")
        per_core = rows // cores
        outputs = []
        for core in range(cores):
            chunk = [x.narrow(self.record.dim, core * per_core, per_core) for x in inputs]
            if core == 0:
                self.record.chunk_shapes.append([tuple(x.shape) for x in chunk])
            outputs.append(self.module(*chunk))
        if isinstance(outputs[0], (tuple, list)):
            return tuple(torch.cat([o[i] for o in outputs], self.record.dim) for i in range(len(outputs[0])))
        return torch.cat(outputs, self.record.dim)


class RecordingTorchNeuronx(types.ModuleType):
    """Stand-in for the ``torch_neuronx`` module (see the module docstring). NOT the Neuron SDK."""

    def __init__(self, version: str = RECORDED_TORCH_NEURONX_VERSION):
        super().__init__("torch_neuronx")
        # A spec, so importlib.util.find_spec("torch_neuronx") (which libraries call to probe for the SDK)
        # answers instead of raising on a module without one.
        self.__spec__ = importlib.machinery.ModuleSpec("torch_neuronx", None)
        self.__version__ = version
        self.traces: list[TraceCall] = []
        self.data_parallels: list[DataParallelCall] = []
        self.core_contexts: list[tuple[int, int]] = []
        self._context_lock = threading.Lock()
        self._open_contexts = 0
        self.max_open_contexts = 0
        self.untracked_loads: list[str] = []
        self.fail_components: set[str] = set()
        self.experimental = types.ModuleType("torch_neuronx.experimental")
        self.experimental.__spec__ = importlib.machinery.ModuleSpec("torch_neuronx.experimental", None)
        self.experimental.neuron_cores_context = self.neuron_cores_context  # type: ignore[attr-defined]

    # --- compiling ---------------------------------------------------------------------------------

    def trace(self, func: Any, example_inputs: Any, *_: Any, compiler_workdir: Optional[str] = None,
              compiler_args: Optional[Sequence[str]] = None, inline_weights_to_neff: Optional[bool] = None,
              **kwargs: Any) -> Any:
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0

        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        workdir = Path(compiler_workdir) if compiler_workdir else Path(".")
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "log-neuron-cc.txt").write_text(
            f"recorded stand-in: no compiler ran\nargs: {' '.join(compiler_args or [])}\n")
        call = TraceCall(
            module_class=type(func).__name__,
            input_shapes=[tuple(x.shape) for x in inputs],
            compiler_args=list(compiler_args or []),
            compiler_workdir=workdir,
            inline_weights_to_neff=inline_weights_to_neff,
            attention_scores=Attention.__dict__["get_attention_scores"],
            sdpa_processor_call=AttnProcessor2_0.__dict__["__call__"],
            fuse_softmax=os.environ.get("NEURON_FUSE_SOFTMAX"),
            graph_ops=frozenset(),
            traced=None,
            trace_kwargs=dict(kwargs),
            weight_dtypes=frozenset(str(p.dtype).replace("torch.", "") for p in func.parameters()
                                    if p.is_floating_point()) if hasattr(func, "parameters") else frozenset(),
        )
        self.traces.append(call)
        if call.component in self.fail_components:
            raise RuntimeError(f"recorded stand-in: simulated compiler failure on {call.component}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(func, inputs, check_trace=False)
        call.traced = traced
        call.graph_ops = frozenset(node.kind() for node in traced.inlined_graph.nodes())
        return traced

    def async_load(self, module: Any) -> None:
        self._call_of(module, "async_load").async_loaded = True

    def lazy_load(self, module: Any) -> None:
        self._call_of(module, "lazy_load").lazy_loaded = True

    def _call_of(self, module: Any, what: str) -> TraceCall:
        for call in self.traces:
            if call.traced is module:
                return call
        raise AssertionError(f"recorded stand-in: {what}() on a module trace() did not return")

    # --- loading -----------------------------------------------------------------------------------

    def DataParallel(self, module: Any, device_ids: Optional[Sequence[int]] = None, dim: int = 0,  # noqa: N802
                     set_dynamic_batching: bool = True) -> RecordingDataParallel:
        record = DataParallelCall(list(device_ids or []), set_dynamic_batching, dim)
        self.data_parallels.append(record)
        return RecordingDataParallel(module, record)

    @contextlib.contextmanager
    def neuron_cores_context(self, start_nc: int = -1, nc_count: int = -1) -> Iterator[None]:
        """Records the cores asked for, and how many of these contexts were ever open at once (the
        SDK documents the context as not thread-safe); it stays open a moment to let overlaps show."""
        self.core_contexts.append((start_nc, nc_count))
        with self._context_lock:
            self._open_contexts += 1
            self.max_open_contexts = max(self.max_open_contexts, self._open_contexts)
        try:
            time.sleep(0.02)
            yield
        finally:
            with self._context_lock:
                self._open_contexts -= 1

    # --- helpers for tests ---------------------------------------------------------------------------

    def traces_of(self, component: str) -> list[TraceCall]:
        return [t for t in self.traces if t.component == component]

    def reset(self) -> None:
        self.traces.clear()
        self.data_parallels.clear()
        self.core_contexts.clear()
        self.max_open_contexts = 0


def install(monkeypatch: Any, torch_neuronx_version: str = RECORDED_TORCH_NEURONX_VERSION,
            neuronx_cc_version: str = RECORDED_NEURONX_CC_VERSION) -> RecordingTorchNeuronx:
    """Put a fresh recorder in ``sys.modules`` as ``torch_neuronx`` for the lifetime of ``monkeypatch``.

    Also restores ``NEURON_FUSE_SOFTMAX`` afterwards (the backend sets it).
    """
    recorder = RecordingTorchNeuronx(torch_neuronx_version)
    compiler = types.ModuleType("neuronxcc")
    compiler.__spec__ = importlib.machinery.ModuleSpec("neuronxcc", None)
    compiler.__version__ = neuronx_cc_version  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch_neuronx", recorder)
    monkeypatch.setitem(sys.modules, "torch_neuronx.experimental", recorder.experimental)
    monkeypatch.setitem(sys.modules, "neuronxcc", compiler)
    monkeypatch.delenv("NEURON_FUSE_SOFTMAX", raising=False)
    return recorder


@dataclass
class KernelCall:
    """One call of the stand-in NKI flash-attention kernel."""

    shapes: list[tuple[int, ...]]
    scale: float
    kernel_name: str


def install_nki_flash_attention(monkeypatch: Any) -> list[KernelCall]:
    """A RECORDING STAND-IN for the SDK's NKI flash-attention kernel (``neuronxcc.nki`` +
    ``torch_neuronx.xla_impl.ops.nki_jit``): the "kernel" records its calls and computes attention
    with torch ops in the layout the engine hands it (q, k: [B*H, D, S]; v: [B*H, S, D]) into the
    output tensor, so traced UNets stay correct on CPU. Install after ``install``."""
    calls: list[KernelCall] = []

    def attention_isa_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out: torch.Tensor,
                             kernel_name: str = "") -> None:
        calls.append(KernelCall([tuple(q.shape), tuple(k.shape), tuple(v.shape), tuple(out.shape)], scale, kernel_name))
        probs = (torch.bmm(q.transpose(1, 2).float(), k.float()) * scale).softmax(dim=-1)
        out.copy_(torch.bmm(probs, v.float()).to(out.dtype))

    def nki_jit(*_: Any, **__: Any) -> Any:
        return lambda kernel: kernel

    modules = {
        "neuronxcc.nki": types.ModuleType("neuronxcc.nki"),
        "neuronxcc.nki._private_kernels": types.ModuleType("neuronxcc.nki._private_kernels"),
        "neuronxcc.nki._private_kernels.attention": types.ModuleType("neuronxcc.nki._private_kernels.attention"),
        "torch_neuronx.xla_impl": types.ModuleType("torch_neuronx.xla_impl"),
        "torch_neuronx.xla_impl.ops": types.ModuleType("torch_neuronx.xla_impl.ops"),
    }
    modules["neuronxcc.nki._private_kernels.attention"].attention_isa_kernel = attention_isa_kernel  # type: ignore[attr-defined]
    modules["torch_neuronx.xla_impl.ops"].nki_jit = nki_jit  # type: ignore[attr-defined]
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    return calls
