"""Stable Diffusion serving engine: registry, compile, warm pool and one ``generate`` facade."""
from .engine import Engine, EngineSettings, LoraInfo, ModelInfo, ReplicaTarget
from .errors import (ArtifactCorrupt, ArtifactMismatch, ArtifactMissing, BackendUnavailable, Cancelled, CompileError,
                     EngineError, InvalidRequest, ModelLoadError, OutputWriteError, RegistryError, UnknownModel,
                     UnknownSampler, ReplicaUnavailable, UnsupportedResolution)
from .hires import UPSCALERS as HIRES_UPSCALERS
from .outputs import OutputStore
from .ratelimit import RateLimited, RateLimiter, client_key
from .registry import Registry, load_registry
from .scheduler import Job, QueueSnapshot
from .types import INPAINT_FILLS, GeneratedImage, GenerateRequest, GenerateResult, HiresFix, Inpaint, Progress, Size, VariantKey

__all__ = [
    "Engine", "EngineSettings", "LoraInfo", "ModelInfo", "ReplicaTarget", "Registry", "load_registry", "Job", "QueueSnapshot", "OutputStore",
    "GenerateRequest", "GenerateResult", "GeneratedImage", "HiresFix", "Inpaint", "INPAINT_FILLS", "Progress", "Size", "VariantKey",
    "EngineError", "RegistryError", "UnknownModel", "UnsupportedResolution", "InvalidRequest", "UnknownSampler",
    "ArtifactMissing", "ArtifactMismatch", "ArtifactCorrupt", "BackendUnavailable", "ReplicaUnavailable", "ModelLoadError",
    "CompileError", "HIRES_UPSCALERS", "OutputWriteError", "Cancelled", "RateLimited", "RateLimiter", "client_key",
]
