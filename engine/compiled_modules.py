"""Stand-ins that let compiled (fixed-shape) components sit inside ordinary diffusers pipelines.

Each stand-in exposes what diffusers reads from the module it replaces (``config``, ``dtype``,
``device``, the call signature and the output type) and feeds a compiled callable with the exact
batch it was compiled for, splitting or padding the pipeline's batch as needed. The pipeline side
stays float32; a stand-in casts to and from the compiled input dtype.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn
from transformers.utils import ModelOutput

Runner = Callable[..., Any]
TOKENS_PER_CHUNK = 77  # a prompt chunk as the text encoder reads it: 75 tokens between start and end


def run_fixed_batch(runner: Runner, batch: int, inputs: Sequence[torch.Tensor], dtype: torch.dtype) -> Any:
    """Call ``runner`` on chunks of exactly ``batch`` rows; pad the last chunk, trim the output.

    Floating inputs are cast to ``dtype`` and floating outputs back to float32. Returns a tensor or
    a tuple of tensors, whatever the runner returns.
    """
    rows = inputs[0].shape[0]
    outputs: list[Any] = []
    for start in range(0, rows, batch):
        chunk = [_pad_rows(x[start:start + batch], batch) for x in inputs]
        chunk = [x.to(dtype) if x.is_floating_point() else x for x in chunk]
        with torch.inference_mode():
            outputs.append(runner(*chunk))
    return _join(outputs, rows)


def run_best_batch(runners: Mapping[int, Runner], inputs: Sequence[torch.Tensor], dtype: torch.dtype) -> Any:
    """Like ``run_fixed_batch`` with several compiled batch sizes (``rows -> runner``): full chunks of
    the largest, then the remainder on the smallest batch that holds it (padded)."""
    rows = inputs[0].shape[0]
    largest = max(runners)
    outputs: list[Any] = []
    start = 0
    while start < rows:
        left = rows - start
        batch = largest if left >= largest else min(b for b in runners if b >= left)
        outputs.append(run_fixed_batch(runners[batch], batch, [x[start:start + batch] for x in inputs], dtype))
        start += batch
    return _join(outputs, rows) if len(outputs) > 1 else outputs[0]


def _pad_rows(x: torch.Tensor, batch: int) -> torch.Tensor:
    missing = batch - x.shape[0]
    return x if missing == 0 else torch.cat([x, x[-1:].expand(missing, *x.shape[1:])])


def _join(outputs: list[Any], rows: int) -> Any:
    if isinstance(outputs[0], (tuple, list)):
        return tuple(_join([o[i] for o in outputs], rows) for i in range(len(outputs[0])))
    return torch.cat(outputs)[:rows].float()


class _StandIn(nn.Module):
    """Common surface: a config, a float32 dtype, a device, and a runner that ``.to()`` never touches."""

    def __init__(self, runner: Runner, batch: int, input_dtype: torch.dtype, device: torch.device):
        super().__init__()
        # Stored outside nn.Module's registry: pipelines call ``.to(dtype)`` on some components,
        # and that must not convert a compiled graph.
        object.__setattr__(self, "_runner", runner)
        self._batch = batch
        self._input_dtype = input_dtype
        self._device = device

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def _run(self, *inputs: torch.Tensor) -> Any:
        return run_fixed_batch(self._runner, self._batch, inputs, self._input_dtype)


@dataclass
class EncodedText(ModelOutput):
    """Mimics a CLIP output: ``[0]`` is the first output, ``hidden_states[-2]`` the penultimate."""

    first: Optional[torch.Tensor] = None
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None


class CompiledTextEncoder(_StandIn):
    def __init__(self, runner: Runner, config: Any, batch: int, input_dtype: torch.dtype,
                 device: torch.device, returns_hidden: bool):
        super().__init__(runner, batch, input_dtype, device)
        self.config = config
        self._returns_hidden = returns_hidden

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                output_hidden_states: Optional[bool] = None, return_dict: bool = True, **_: Any) -> Any:
        out = self._run(input_ids)
        if self._returns_hidden:
            first, penultimate = out
            return EncodedText(first=first, hidden_states=(penultimate, first))
        return EncodedText(first=out)


class CompiledUNet(_StandIn):
    """The UNet from one compiled graph per batch size and prompt length (``runners``: (rows per call,
    77-token chunks) -> graph); a call runs on the graphs of its prompt length, with more rows on
    the fewest graph calls that hold them (see ``run_best_batch``)."""

    def __init__(self, runners: Mapping[tuple[int, int], Runner], config: Mapping[str, Any],
                 input_dtype: torch.dtype, device: torch.device, added_conditions: bool):
        smallest = min(runners)
        super().__init__(runners[smallest], smallest[0], input_dtype, device)
        by_chunks: dict[int, dict[int, Runner]] = {}
        for (rows, chunks), runner in runners.items():
            by_chunks.setdefault(chunks, {})[rows] = runner
        object.__setattr__(self, "_runners", by_chunks)
        self.config = FrozenDict(config)
        self._added_conditions = added_conditions
        if added_conditions:
            # The SDXL pipeline checks the size of the added embedding against its time ids.
            in_features = config["projection_class_embeddings_input_dim"]
            self.add_embedding = SimpleNamespace(linear_1=SimpleNamespace(in_features=in_features))

    @property
    def graphs(self) -> list[tuple[int, int]]:
        """(rows per call, prompt chunks) of every compiled graph."""
        return sorted((rows, chunks) for chunks, by_rows in self._runners.items() for rows in by_rows)

    def forward(self, sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor,
                timestep_cond: Any = None, cross_attention_kwargs: Any = None,
                added_cond_kwargs: Optional[dict[str, torch.Tensor]] = None, return_dict: bool = True,
                **_: Any) -> Any:
        timesteps = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(sample.shape[0])
        inputs = [sample, timesteps, encoder_hidden_states]
        if self._added_conditions:
            if not added_cond_kwargs:
                raise ValueError("the SDXL UNet needs added_cond_kwargs with text_embeds and time_ids")
            inputs += [added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]]
        chunks = encoder_hidden_states.shape[1] // TOKENS_PER_CHUNK
        if chunks not in self._runners or encoder_hidden_states.shape[1] % TOKENS_PER_CHUNK:
            raise ValueError(f"no UNet is compiled for prompts of {encoder_hidden_states.shape[1]} tokens; compiled: "
                             f"{', '.join(str(c * TOKENS_PER_CHUNK) for c in sorted(self._runners))}")
        out = run_best_batch(self._runners[chunks], inputs, self._input_dtype)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


class CompiledVAE(_StandIn):
    """``decode`` and ``encode`` backed by two compiled graphs (decoder and encoder)."""

    def __init__(self, decoder: Runner, encoder: Optional[Runner], config: Mapping[str, Any], batch: int,
                 input_dtype: torch.dtype, device: torch.device):
        super().__init__(decoder, batch, input_dtype, device)
        object.__setattr__(self, "_encoder", encoder)
        self.config = FrozenDict(config)

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator: Any = None) -> Any:
        image = self._run(z)
        return DecoderOutput(sample=image) if return_dict else (image,)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> Any:
        if self._encoder is None:  # a family without img2img (PixArt-Sigma) compiles no encoder
            raise TypeError("this VAE has no compiled encoder (the model's family has no img2img)")
        moments = run_fixed_batch(self._encoder, self._batch, (x,), self._input_dtype)
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover - pipelines never call it
        raise TypeError("CompiledVAE is used through encode() and decode()")
