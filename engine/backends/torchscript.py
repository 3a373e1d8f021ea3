"""The ``cpu`` backend: TorchScript traces with the same fixed-shape contract as Neuron.

``torch.jit.trace`` records each component for one input shape; ``torch.jit.save`` writes it; the
server ``torch.jit.load``s it without loading the original weights.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from ..errors import CompileError
from ..families import UNET, VAE_DECODER, VAE_ENCODER, Family
from .base import COMPONENT_FILE, Backend, input_specs

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Convolutional components that are traced with channels_last (NHWC) weights in bf16: oneDNN's
# bf16 (AVX512-BF16/AMX) convolutions want NHWC. Measured on SD 1.5 at 256x256, one thread:
# UNet call 1.19 -> 0.99 s, VAE decoder 1.76 -> 0.80 s. In fp32 it buys nothing for the UNet
# (3% slower) and 6% for the VAE decoder, so fp32 stays NCHW and bit-identical to eager.
_CHANNELS_LAST_BF16 = (UNET, VAE_DECODER, VAE_ENCODER)


def uses_channels_last(component: str, dtype: str) -> bool:
    return dtype == "bf16" and component in _CHANNELS_LAST_BF16


class TorchScriptBackend(Backend):
    name = "cpu"
    fixed_shape = True

    def stack_versions(self) -> dict[str, str]:
        import diffusers

        return {"torch": torch.__version__, "diffusers": diffusers.__version__}

    def stack_key(self) -> str:
        # TorchScript archives are tied to the torch release that wrote them.
        return f"torch={torch.__version__.split('+')[0]}"

    def compile_component(
        self, family: Family, component: str, module: nn.Module, example_inputs: Sequence[torch.Tensor],
        out_dir: Path, dtype: str,
    ) -> dict[str, Any]:
        torch_dtype = _DTYPES[dtype]
        module = module.to(torch_dtype)
        inputs = tuple(x.to(torch_dtype) if x.is_floating_point() else x for x in example_inputs)
        channels_last = uses_channels_last(component, dtype)
        if channels_last:
            # The weights keep this layout in the frozen graph, so every convolution runs NHWC even
            # though the pipeline passes ordinary (NCHW) tensors.
            module = module.to(memory_format=torch.channels_last)
            inputs = tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs)
        started = time.perf_counter()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                traced = torch.jit.trace(module, inputs, check_trace=False)
                traced = torch.jit.freeze(traced.eval())
        except Exception as exc:  # tracing errors come in many types; report them as one
            raise CompileError(f"tracing {component} failed: {exc}") from exc
        torch.jit.save(traced, str(out_dir / COMPONENT_FILE))
        return {
            "file": f"{out_dir.name}/{COMPONENT_FILE}",
            "inputs": input_specs(inputs),
            "batch": int(inputs[0].shape[0]),
            "input_dtype": str(torch_dtype).replace("torch.", ""),
            "memory_format": "channels_last" if channels_last else "contiguous",
            "compile_seconds": round(time.perf_counter() - started, 3),
        }

    def load_component(
        self, component: str, path: Path, entry: dict[str, Any], device_ids: Optional[Sequence[int]] = None
    ) -> Callable[..., Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu").eval()
