"""The interface every backend implements.

A fixed-shape backend (cpu TorchScript, neuron) compiles components into artifacts and loads them
back as callables; the eager backend runs diffusers modules directly and compiles nothing.
"""
from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional, Sequence

import torch
from torch import nn

from ..families import Family

COMPONENT_FILE = "model.pt"


class Backend(ABC):
    """One way of running Stable Diffusion components."""

    name: str = ""
    fixed_shape: bool = True

    @property
    def device(self) -> torch.device:
        """Where pipeline-side tensors (latents, embeddings) live."""
        return torch.device("cpu")

    @abstractmethod
    def stack_versions(self) -> dict[str, str]:
        """Versions of the software that produced / will load artifacts (for manifests)."""

    def stack_key(self) -> str:
        """The part of ``stack_versions`` that must match between compile and load."""
        return ",".join(f"{k}={v}" for k, v in sorted(self.stack_versions().items()))

    def target(self) -> dict[str, Any]:
        """What compiled artifacts are built for (core counts, batch layout...)."""
        return {}

    def check_target(self, manifest: dict[str, Any], command: str) -> None:
        """Raise ArtifactMismatch when a manifest's target cannot run here."""

    def tracing(self, family: Family, component: str) -> ContextManager[Any]:
        """Context active while tracing ``component`` of ``family`` (e.g. attention patches)."""
        return contextlib.nullcontext()

    def compile_component(
        self, family: Family, component: str, module: nn.Module, example_inputs: Sequence[torch.Tensor],
        out_dir: Path, dtype: str,
    ) -> dict[str, Any]:
        """Compile ``module`` for ``example_inputs`` into ``out_dir``; returns manifest details."""
        raise NotImplementedError(f"the {self.name} backend compiles nothing")

    def tensor_parallel_degree(self, spec: Any) -> int:
        """NeuronCores the sharded components of ``spec`` (a ModelSpec) span on this backend: 1 (none)."""
        return 1

    def sharded_components(self, family: Family) -> tuple[str, ...]:
        """The components of ``family`` this backend compiles sharded (``compile_sharded``)."""
        return ()

    def compile_sharded(
        self, family: Family, component: str, spec: Any, example_inputs: Sequence[torch.Tensor], out_dir: Path,
        tp_degree: int,
    ) -> dict[str, Any]:
        """Compile ``component`` of ``spec`` sharded over ``tp_degree`` cores into ``out_dir``; each rank
        loads its own shard of the weights from the model source."""
        raise NotImplementedError(f"the {self.name} backend compiles nothing sharded")

    def load_component(
        self, component: str, path: Path, entry: dict[str, Any], device_ids: Optional[Sequence[int]] = None
    ) -> Callable[..., Any]:
        """Load a compiled component; ``entry`` is its manifest entry."""
        raise NotImplementedError(f"the {self.name} backend loads no artifacts")


def input_specs(example_inputs: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
    return [{"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", "")} for x in example_inputs]
