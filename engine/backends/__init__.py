"""Backend selection: ``neuron`` (Inferentia/Trainium), ``cpu`` (TorchScript) or ``eager`` (diffusers)."""
from __future__ import annotations

import glob
import importlib.util

from ..errors import BackendUnavailable
from .base import Backend

BACKEND_NAMES = ("auto", "neuron", "cpu", "eager")


def neuron_available() -> bool:
    """True when the Neuron SDK's torch_neuronx is importable and a Neuron device is present."""
    return importlib.util.find_spec("torch_neuronx") is not None and bool(glob.glob("/dev/neuron*"))


def resolve_backend_name(name: str = "auto") -> str:
    """``auto`` picks neuron if present, else eager on CUDA, else the cpu TorchScript backend."""
    if name not in BACKEND_NAMES:
        raise BackendUnavailable(f"unknown backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")
    if name != "auto":
        return name
    if neuron_available():
        return "neuron"
    import torch

    return "eager" if torch.cuda.is_available() else "cpu"


NEURON_TARGETS = ("inf2", "trn1", "trn2")  # what neuronx-cc compiles for (--target)


def make_backend(name: str = "auto", neuron_target: str = "inf2") -> Backend:
    """Instantiate a backend by name (importing heavy SDKs only for the one chosen). ``neuron_target``
    is the Neuron compile target (part of the artifacts' fingerprint: serve with the one compiled for)."""
    name = resolve_backend_name(name)
    if name == "neuron":
        from .neuron import NeuronBackend

        return NeuronBackend(target=neuron_target)
    if name == "eager":
        from .eager import EagerBackend

        return EagerBackend()
    from .torchscript import TorchScriptBackend

    return TorchScriptBackend()
