"""The ``eager`` backend: plain diffusers modules on CPU or CUDA, any size, nothing compiled."""
from __future__ import annotations

import torch

from .base import Backend


class EagerBackend(Backend):
    name = "eager"
    fixed_shape = False

    def __init__(self, device: str = "auto"):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device

    def stack_versions(self) -> dict[str, str]:
        import diffusers

        return {"torch": torch.__version__, "diffusers": diffusers.__version__, "device": str(self._device)}
