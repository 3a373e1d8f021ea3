"""PixArt-Sigma: a diffusion transformer (DiT) denoiser with a T5 text encoder (family ``pixart-sigma``).

What differs from the UNet families, and lives here:

* components: the T5 encoder, called with its **attention mask** (T5 reads 300 tokens for Sigma and
  the padding must not be attended to), the transformer (``encoder_attention_mask`` and a timestep
  per row as inputs), and the VAE decoder. diffusers has no PixArt img2img pipeline, so no VAE
  encoder is compiled and img2img requests are refused (``Engine`` names the model);
* traceable wrappers and fixed-shape example inputs for them;
* stand-ins that put compiled graphs into ``PixArtSigmaPipeline`` (``compiled_components``);
* ``ServingPixArtSigmaPipeline``: the diffusers pipeline with the engine's step callback
  (``callback_on_step_end``, which PixArtSigmaPipeline lacks) mapped onto its legacy ``callback``,
  and resolution binning and caption cleaning off by default (the engine generates at exactly the
  compiled size, and uses the prompt as given, as for the other families).

On Neuron the T5 encoder and the transformer are sharded over ``tp_degree`` NeuronCores with
neuronx-distributed (``engine.backends.neuron_parallel``), as in seed 002 (AWS ML blog, "PixArt-Sigma
inference on AWS Trainium and AWS Inferentia").
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from diffusers import PixArtSigmaPipeline
from diffusers.configuration_utils import FrozenDict
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from .compiled_modules import CompiledVAE, Runner, _StandIn
from .families import (TEXT_ENCODER, TRANSFORMER, VAE_DECODER, Family, ShapeConfigs, VAEDecoderForTrace,
                       vae_scale_factor)

# The transformer is called with the classifier-free-guidance pair; the pipeline passes no resolution /
# aspect-ratio micro-conditions to Sigma (its config has use_additional_conditions false).
_NO_MICRO_CONDITIONS = {"resolution": None, "aspect_ratio": None}


class T5EncoderForTrace(nn.Module):
    """``(input_ids, attention_mask) -> last_hidden_state``: what PixArtSigmaPipeline reads of T5."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, attention_mask=attention_mask, return_dict=False)[0]


class PixArtTransformerForTrace(nn.Module):
    """``(latents, text embeddings, timestep, text mask) -> noise prediction`` (with learned sigma)."""

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                encoder_attention_mask: torch.Tensor) -> torch.Tensor:
        return self.transformer(hidden_states, encoder_hidden_states=encoder_hidden_states, timestep=timestep,
                                encoder_attention_mask=encoder_attention_mask,
                                added_cond_kwargs=_NO_MICRO_CONDITIONS, return_dict=False)[0]


def traceable(component: str, module: nn.Module) -> nn.Module:
    if component == TEXT_ENCODER:
        return T5EncoderForTrace(module).eval()
    if component == TRANSFORMER:
        return PixArtTransformerForTrace(module).eval()
    if component == VAE_DECODER:
        return VAEDecoderForTrace(module).eval()
    raise ValueError(f"pixart-sigma has no component {component!r}")


def text_mask(token_ids: Sequence[int], pad_id: int = 0) -> list[int]:
    """The attention mask of a padded T5 prompt: 1 up to and including its end token, 0 on padding."""
    length = max((i + 1 for i, t in enumerate(token_ids) if t != pad_id), default=1)
    return [1] * length + [0] * (len(token_ids) - length)


def example_inputs(family: Family, component: str, width: int, height: int,
                   configs: ShapeConfigs) -> tuple[torch.Tensor, ...]:
    """Example inputs at the fixed shapes: T5 for one prompt of ``family.text_length`` tokens (a real
    prompt with padding, so the traced mask path is the one real prompts take), the transformer for
    the CFG pair at the latent size of ``width`` x ``height``, the VAE decoder for one latent."""
    batch = family.batch_of(component)
    ids = torch.tensor([list(configs.token_ids)] * batch, dtype=torch.int64)
    mask = torch.tensor([text_mask(configs.token_ids)] * batch, dtype=torch.int64)
    factor = vae_scale_factor(configs.vae)
    latent_hw = (height // factor, width // factor)
    generator = torch.Generator("cpu").manual_seed(0)
    if component == TEXT_ENCODER:
        return ids, mask
    if component == TRANSFORMER:
        transformer = configs.unet
        return (torch.randn(batch, transformer["in_channels"], *latent_hw, generator=generator),
                torch.randn(batch, family.text_length, transformer["caption_channels"], generator=generator),
                torch.full((batch,), 999.0),
                mask)
    if component == VAE_DECODER:
        return (torch.randn(batch, configs.vae["latent_channels"], *latent_hw, generator=generator),)
    raise ValueError(f"pixart-sigma has no component {component!r}")


# --- compiled graphs inside PixArtSigmaPipeline ----------------------------------------------------


class CompiledT5Encoder(_StandIn):
    """T5 from a compiled graph; ``[0]`` of its output is the last hidden state."""

    def __init__(self, runner: Runner, config: Any, batch: int, input_dtype: torch.dtype, device: torch.device):
        super().__init__(runner, batch, input_dtype, device)
        self.config = config

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **_: Any) -> Any:
        if attention_mask is None:  # the pipeline always passes it; a default would change the output
            raise ValueError("the compiled T5 encoder needs the prompt's attention_mask")
        return (self._run(input_ids, attention_mask.to(torch.int64)),)


class CompiledTransformer(_StandIn):
    """The PixArt transformer from a graph compiled for the CFG pair (``batch`` rows per call)."""

    def __init__(self, runner: Runner, config: Mapping[str, Any], batch: int, input_dtype: torch.dtype,
                 device: torch.device):
        super().__init__(runner, batch, input_dtype, device)
        self.config = FrozenDict(config)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: Any = None,
                added_cond_kwargs: Any = None, encoder_attention_mask: Optional[torch.Tensor] = None,
                return_dict: bool = True, **_: Any) -> Any:
        rows = hidden_states.shape[0]
        timesteps = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(rows)
        if encoder_attention_mask is None:
            raise ValueError("the compiled PixArt transformer needs encoder_attention_mask")
        out = self._run(hidden_states, encoder_hidden_states, timesteps, encoder_attention_mask.to(torch.int64))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


def compiled_components(parts: Any, entries: Mapping[str, Any], runner: Callable[[str], Runner],
                        dtype_of: Callable[[str], torch.dtype], device: torch.device) -> dict[str, Any]:
    """The pipeline components from compiled artifacts, loaded one at a time (the transformer first:
    it is most of the bytes; host RAM peaks while each loads), plus the tokenizer."""
    components: dict[str, Any] = {
        TRANSFORMER: CompiledTransformer(runner(TRANSFORMER), parts.unet_config, entries[TRANSFORMER]["batch"],
                                         dtype_of(TRANSFORMER), device),
        TEXT_ENCODER: CompiledT5Encoder(runner(TEXT_ENCODER), parts.text_encoder_configs[TEXT_ENCODER],
                                        entries[TEXT_ENCODER]["batch"], dtype_of(TEXT_ENCODER), device),
        "vae": CompiledVAE(runner(VAE_DECODER), None, parts.vae_config, entries[VAE_DECODER]["batch"],
                           dtype_of(VAE_DECODER), device),
    }
    components.update(parts.tokenizers)
    return components


class ServingPixArtSigmaPipeline(PixArtSigmaPipeline):
    """``PixArtSigmaPipeline`` as the engine drives it (see the module docstring). Generates exactly what
    plain ``PixArtSigmaPipeline`` generates with ``use_resolution_binning=False, clean_caption=False``."""

    def __call__(self, *args: Any, callback_on_step_end: Optional[Callable[..., Any]] = None,
                 use_resolution_binning: bool = False, clean_caption: bool = False, **kwargs: Any) -> Any:
        self._num_timesteps = int(kwargs.get("num_inference_steps", 20))
        if kwargs.get("negative_prompt", "") is None:  # the engine's "no negative prompt"; PixArt's is ""
            kwargs["negative_prompt"] = ""
        if callback_on_step_end is not None:
            # The legacy callback fires once per step (every scheduler-order transformer calls).
            def callback(step: int, timestep: Any, latents: torch.Tensor) -> None:
                callback_on_step_end(self, step, timestep, {"latents": latents})

            kwargs.update(callback=callback, callback_steps=1)
        return super().__call__(*args, use_resolution_binning=use_resolution_binning, clean_caption=clean_caption,
                                **kwargs)

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps


__all__ = ["CompiledT5Encoder", "CompiledTransformer", "ServingPixArtSigmaPipeline", "compiled_components",
           "example_inputs", "text_mask", "traceable"]
