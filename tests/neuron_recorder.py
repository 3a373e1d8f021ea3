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


# --- neuronx_distributed (tensor parallelism) ---------------------------------------------------------
#
# A RECORDING STAND-IN for ``neuronx_distributed``, NOT the library: ``parallel_model_trace`` calls the
# engine's builder once per rank (the rank is what ``parallel_state`` answers while it runs), records
# which submodules became ColumnParallelLinear / RowParallelLinear with which weight shapes, the example
# input shapes, compiler arguments and tp_degree, and returns the ranks' eager modules. Running that
# model runs every rank on its own thread; RowParallelLinear sums its partial outputs across the ranks
# through a barrier (the all-reduce the Neuron collectives do), so a correctly sharded model computes
# what the unsharded one does. ``parallel_model_save`` / ``parallel_model_load`` write and read one
# ``tp_<rank>.pt`` per rank (pickled modules here; NEFF-backed TorchScript on Neuron).


class _Collective:
    """The ranks of one parallel call: ``all_reduce`` sums a tensor over them, in rank order."""

    def __init__(self, size: int):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list[Any] = [None] * size

    def all_reduce(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = tensor
        self.barrier.wait()
        total = self.slots[0]
        for other in self.slots[1:]:
            total = total + other
        self.barrier.wait()  # every rank has read the slots before the next all-reduce writes them
        return total


class _ParallelState(types.ModuleType):
    """``neuronx_distributed.parallel_layers.parallel_state``: rank and size of the running rank."""

    def __init__(self) -> None:
        super().__init__("neuronx_distributed.parallel_layers.parallel_state")
        self.__spec__ = importlib.machinery.ModuleSpec(self.__name__, None)
        self.local = threading.local()

    def get_tensor_model_parallel_rank(self) -> int:
        return self.local.rank

    def get_tensor_model_parallel_size(self) -> int:
        return self.local.size


_STATE = _ParallelState()


class ColumnParallelLinear(torch.nn.Linear):
    """Stand-in: this rank's ``out_features / tp`` outputs (``gather_output=False`` only)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = True,
                 dtype: torch.dtype = torch.float32, **_: Any):
        size = _STATE.get_tensor_model_parallel_size()
        super().__init__(in_features, out_features // size, bias=bias, dtype=dtype)
        self.full_features = (in_features, out_features)
        self.gather_output = gather_output
        if gather_output:
            raise NotImplementedError("recorded stand-in: gather_output=True is not used by the engine")


class RowParallelLinear(torch.nn.Linear):
    """Stand-in: this rank's ``in_features / tp`` inputs; partial outputs summed over the ranks, then the bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = False,
                 dtype: torch.dtype = torch.float32, **_: Any):
        size = _STATE.get_tensor_model_parallel_size()
        super().__init__(in_features // size, out_features, bias=bias, dtype=dtype)
        self.full_features = (in_features, out_features)
        self.input_is_parallel = input_is_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = torch.nn.functional.linear(x, self.weight)
        total = _STATE.local.collective.all_reduce(_STATE.local.rank, partial)
        return total + self.bias if self.bias is not None else total


@dataclass
class ShardRecord:
    """One sharded linear layer of one rank: its path in the module, kind and weight shape."""

    path: str
    kind: str  # "column" | "row"
    weight_shape: tuple[int, ...]
    full_features: tuple[int, int]
    bias: bool


@dataclass
class ParallelTraceCall:
    """One ``parallel_model_trace`` call as the engine made it."""

    builder: Any
    input_shapes: list[tuple[int, ...]]
    input_dtypes: list[str]
    compiler_args: Any
    compiler_workdir: Path
    tp_degree: int
    kwargs: dict[str, Any]
    shards: list[list[ShardRecord]] = field(default_factory=list)  # per rank
    devices_seen: set[str] = field(default_factory=set)  # device types of every parameter and input
    builder_pickles: bool = False

    @property
    def component(self) -> str:
        return self.compiler_workdir.parent.name


class RecordedParallelModel:
    """What ``parallel_model_trace`` / ``parallel_model_load`` return: every rank run on its own thread."""

    def __init__(self, ranks: list[torch.nn.Module]):
        self.ranks = ranks

    def __call__(self, *inputs: torch.Tensor) -> Any:
        size = len(self.ranks)
        collective = _Collective(size)
        results: list[Any] = [None] * size
        errors: list[BaseException] = []

        def run(rank: int) -> None:
            _STATE.local.rank, _STATE.local.size, _STATE.local.collective = rank, size, collective
            try:
                with torch.inference_mode():
                    results[rank] = self.ranks[rank](*inputs)
            except BaseException as exc:  # reported on the calling thread
                errors.append(exc)
                collective.barrier.abort()

        threads = [threading.Thread(target=run, args=(rank,)) for rank in range(size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results[0]  # every rank holds the full (replicated) output


class RecordingNeuronxDistributed:
    """The recorder behind the ``neuronx_distributed`` stand-in modules (see ``install_neuronx_distributed``)."""

    def __init__(self) -> None:
        self.traces: list[ParallelTraceCall] = []
        self.saves: list[tuple[Path, int]] = []
        self.loads: list[tuple[Path, list[str]]] = []

    def parallel_model_trace(self, func: Any, example_inputs: Any, compiler_workdir: Optional[str] = None,
                             compiler_args: Any = None, tp_degree: int = 1, **kwargs: Any) -> RecordedParallelModel:
        import pickle

        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        workdir = Path(compiler_workdir) if compiler_workdir else Path(".")
        workdir.mkdir(parents=True, exist_ok=True)
        call = ParallelTraceCall(func, [tuple(x.shape) for x in inputs], [str(x.dtype).replace("torch.", "")
                                                                           for x in inputs],
                                 compiler_args, workdir, tp_degree, dict(kwargs))
        try:  # the real library calls func in one spawned process per rank
            pickle.dumps(func)
            call.builder_pickles = True
        except Exception:  # recorded, the test asserts on it
            call.builder_pickles = False
        self.traces.append(call)
        ranks = []
        for rank in range(tp_degree):
            _STATE.local.rank, _STATE.local.size = rank, tp_degree
            module, _aliases = func()
            call.shards.append([ShardRecord(name, "column" if isinstance(m, ColumnParallelLinear) else "row",
                                            tuple(m.weight.shape), m.full_features, m.bias is not None)
                                for name, m in module.named_modules()
                                if isinstance(m, (ColumnParallelLinear, RowParallelLinear))])
            call.devices_seen |= {p.device.type for p in module.parameters()} | {x.device.type for x in inputs}
            ranks.append(module.eval())
        model = RecordedParallelModel(ranks)
        model(*inputs)  # as tracing runs the model once
        return model

    def parallel_model_save(self, model: RecordedParallelModel, save_dir: str) -> None:
        directory = Path(save_dir)
        directory.mkdir(parents=True, exist_ok=True)
        for rank, module in enumerate(model.ranks):
            torch.save(module, directory / f"tp_{rank}.pt")
        self.saves.append((directory, len(model.ranks)))

    def parallel_model_load(self, model_dir: str) -> RecordedParallelModel:
        directory = Path(model_dir)
        files = sorted(os.listdir(directory), key=lambda name: int(name.replace("tp_", "").replace(".pt", "")))
        self.loads.append((directory, files))
        return RecordedParallelModel([torch.load(directory / name, weights_only=False).eval() for name in files])

    def traces_of(self, component: str) -> list[ParallelTraceCall]:
        return [t for t in self.traces if t.component == component]


def install_neuronx_distributed(monkeypatch: Any) -> RecordingNeuronxDistributed:
    """Put the ``neuronx_distributed`` RECORDING STAND-IN into ``sys.modules`` (``.trace``,
    ``.parallel_layers.layers``, ``.parallel_layers.parallel_state``) for the lifetime of ``monkeypatch``."""
    recorder = RecordingNeuronxDistributed()
    modules = {name: types.ModuleType(name) for name in (
        "neuronx_distributed", "neuronx_distributed.trace", "neuronx_distributed.parallel_layers",
        "neuronx_distributed.parallel_layers.layers")}
    modules["neuronx_distributed.parallel_layers.parallel_state"] = _STATE
    trace = modules["neuronx_distributed.trace"]
    trace.parallel_model_trace = recorder.parallel_model_trace  # type: ignore[attr-defined]
    trace.parallel_model_save = recorder.parallel_model_save  # type: ignore[attr-defined]
    trace.parallel_model_load = recorder.parallel_model_load  # type: ignore[attr-defined]
    layers = modules["neuronx_distributed.parallel_layers.layers"]
    layers.ColumnParallelLinear = ColumnParallelLinear  # type: ignore[attr-defined]
    layers.RowParallelLinear = RowParallelLinear  # type: ignore[attr-defined]
    modules["neuronx_distributed"].trace = trace  # type: ignore[attr-defined]
    modules["neuronx_distributed"].parallel_layers = modules["neuronx_distributed.parallel_layers"]  # type: ignore[attr-defined]
    modules["neuronx_distributed.parallel_layers"].layers = layers  # type: ignore[attr-defined]
    modules["neuronx_distributed.parallel_layers"].parallel_state = _STATE  # type: ignore[attr-defined]
    for name, module in modules.items():
        if module is not _STATE:
            module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        monkeypatch.setitem(sys.modules, name, module)
    return recorder
