"""Stable Diffusion serving engine: registry, compile, warm pool and one ``generate`` facade."""
from .engine import Engine, EngineSettings, ModelInfo, ReplicaTarget
from .errors import (ArtifactMismatch, ArtifactMissing, BackendUnavailable, Cancelled, CompileError, EngineError,
                     InvalidRequest, ModelLoadError, RegistryError, UnknownModel, UnknownSampler,
                     ReplicaUnavailable, UnsupportedResolution)
from .outputs import OutputStore
from .registry import Registry, load_registry
from .scheduler import Job, QueueSnapshot
from .types import GeneratedImage, GenerateRequest, GenerateResult, Progress, Size, VariantKey

__all__ = [
    "Engine", "EngineSettings", "ModelInfo", "ReplicaTarget", "Registry", "load_registry", "Job", "QueueSnapshot", "OutputStore",
    "GenerateRequest", "GenerateResult", "GeneratedImage", "Progress", "Size", "VariantKey",
    "EngineError", "RegistryError", "UnknownModel", "UnsupportedResolution", "InvalidRequest", "UnknownSampler",
    "ArtifactMissing", "ArtifactMismatch", "BackendUnavailable", "ReplicaUnavailable", "ModelLoadError", "CompileError", "Cancelled",
]
