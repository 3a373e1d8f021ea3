"""Typed engine errors. Every message says what went wrong and what to do about it."""
from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose (the UI shows its message as is)."""


class RegistryError(EngineError):
    """The model registry file is malformed or inconsistent."""


class UnknownModel(EngineError):
    """A request named a model that is not in the registry."""


class UnsupportedResolution(EngineError):
    """A request asked for a size that is not compiled (or not valid) for the model."""


class InvalidRequest(EngineError):
    """A request parameter is out of range or inconsistent."""


class UnknownSampler(InvalidRequest):
    """A request named a sampler the engine does not know."""


class ArtifactMissing(EngineError):
    """Compiled artifacts for a (model, resolution, backend) are not on disk."""


class ArtifactMismatch(EngineError):
    """Compiled artifacts exist but do not match this model, backend or software stack."""


class ArtifactCorrupt(ArtifactMismatch):
    """A compiled file's content no longer matches the sha256 its manifest recorded at compile."""


class BackendUnavailable(EngineError):
    """The requested backend cannot run on this machine (e.g. the Neuron SDK is not installed)."""


class ModelLoadError(EngineError):
    """The model's weights or configs could not be loaded from its source."""


class OutputWriteError(EngineError):
    """A generated image could not be saved (disk full, no permission); nothing partial was left."""


class CompileError(EngineError):
    """Compiling a component failed."""


class Cancelled(EngineError):
    """The request was interrupted by its caller. ``images`` holds the ``GeneratedImage``s it
    finished before the interrupt (A1111 returns those), in order."""

    def __init__(self, message: str = "interrupted", images: tuple = ()):
        super().__init__(message)
        self.images = tuple(images)


class ReplicaUnavailable(BackendUnavailable):
    """The replica running a request went away (Ray Serve restarts it); the request may be retried."""
