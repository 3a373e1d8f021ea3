"""What each model family (sd15, sd21, sdxl, pixart-sigma) is made of.

For compiling: the components, the wrappers that make each one traceable with plain tensors in and
out, and example inputs of the fixed shapes a (model, resolution) is compiled for.
For serving: the diffusers pipeline classes that the compiled components are plugged into.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
UNET = "unet"
TRANSFORMER = "transformer"  # the PixArt-Sigma denoiser (a diffusion transformer): see engine.pixart
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"

# The UNet is compiled for the classifier-free-guidance pair (unconditional + conditional), the
# batch every denoising step carries; text encoders and the VAE run one prompt / image at a time.
UNET_BATCH = 2
NO_CFG_SUFFIX = "_nocfg"
SINGLE_BATCH = 1
TEXT_LENGTH = 77


@dataclass(frozen=True)
class Family:
    """``txt2img_pipeline`` / ``img2img_pipeline`` / ``inpaint_pipeline``: a diffusers class name, or
    ``module:Class`` for one of ours; an empty ``img2img_pipeline`` means the family has no img2img
    (nor inpaint). ``denoiser``: the UNet or the
    PixArt transformer. ``refused_samplers``: A1111 sampler names this family does not run, with why."""

    name: str
    text_encoders: tuple[str, ...]
    has_added_conditions: bool
    txt2img_pipeline: str
    img2img_pipeline: str
    inpaint_pipeline: str = ""
    denoiser: str = UNET
    text_length: int = TEXT_LENGTH
    refused_samplers: Mapping[str, str] = field(default_factory=dict)

    @property
    def components(self) -> tuple[str, ...]:
        if self.denoiser == TRANSFORMER:  # no img2img pipeline, so no VAE encoder (as seed 002 compiles it)
            return (*self.text_encoders, TRANSFORMER, VAE_DECODER)
        return (*self.text_encoders, UNET, VAE_DECODER, VAE_ENCODER)

    @property
    def has_img2img(self) -> bool:
        return bool(self.img2img_pipeline)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """What the family's pipeline classes take besides the components and the scheduler."""
        if self.denoiser == TRANSFORMER:
            return {}
        if self.has_added_conditions:
            return {"add_watermarker": False}
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def batch_of(self, component: str) -> int:
        if component == TRANSFORMER:
            return UNET_BATCH
        return unet_rows(component) if is_unet(component) else SINGLE_BATCH


def unet_component(batch: int, chunks: int = 1, cfg: bool = True) -> str:
    """The artifact name of the UNet compiled for ``batch`` requests and prompts of ``chunks`` 75-token
    chunks: ``unet``, ``unet_b4``, ``unet_c2``, ``unet_b4_c2``, …; ``cfg`` False: for requests at
    CFG <= 1, one row each instead of a CFG pair (``unet_nocfg``, ``unet_b3_nocfg``)."""
    return (UNET + (f"_b{batch}" if batch != 1 else "") + (f"_c{chunks}" if chunks != 1 else "")
            + ("" if cfg else NO_CFG_SUFFIX))


def is_unet(component: str) -> bool:
    return re.fullmatch(rf"{UNET}(_b\d+)?(_c\d+)?({NO_CFG_SUFFIX})?", component) is not None


def unet_rows(component: str) -> int:
    """Rows one call of a UNet artifact takes: two per request (the CFG pair), one without CFG."""
    return unet_batch_of(component) * (1 if component.endswith(NO_CFG_SUFFIX) else UNET_BATCH)


def unet_batch_of(component: str) -> int:
    """Requests per call of a UNet artifact (``unet_b4`` → 4, ``unet`` → 1)."""
    found = re.search(r"_b(\d+)", component)
    return int(found.group(1)) if found else 1


def unet_chunks_of(component: str) -> int:
    """Prompt chunks (77 tokens each) a UNet artifact reads (``unet_c2`` → 2, ``unet`` → 1)."""
    found = re.search(r"_c(\d+)", component)
    return int(found.group(1)) if found else 1


FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", (TEXT_ENCODER,), False, "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                   "StableDiffusionInpaintPipeline"),
    "sd21": Family("sd21", (TEXT_ENCODER,), False, "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                   "StableDiffusionInpaintPipeline"),
    "sdxl": Family(
        "sdxl", (TEXT_ENCODER, TEXT_ENCODER_2), True,
        "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline",
    ),
}
PIXART_SIGMA = "pixart-sigma"
# T5 reads up to 300 tokens for PixArt-Sigma (PixArtSigmaPipeline's max_sequence_length; seed 002).
PIXART_TEXT_LENGTH = 300
_TWO_CALLS = ("it runs the transformer twice per step (a second-order sampler); PixArt-Sigma is served with "
              "single-evaluation samplers only, so a step costs one call of the tensor-parallel transformer")
FAMILIES[PIXART_SIGMA] = Family(
    PIXART_SIGMA, (TEXT_ENCODER,), False, "engine.pixart:ServingPixArtSigmaPipeline", "",
    denoiser=TRANSFORMER, text_length=PIXART_TEXT_LENGTH,
    refused_samplers={name: _TWO_CALLS for name in ("Heun", "DPM2", "DPM2 Karras", "DPM2 a", "DPM2 a Karras",
                                                     "DPM++ SDE", "DPM++ SDE Karras")},
)


def vae_scale_factor(vae_config: Mapping[str, Any]) -> int:
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


# --- traceable wrappers: tensors in, tensors out -------------------------------------------------


class TextEncoderForTrace(nn.Module):
    """``input_ids -> last_hidden_state`` (SD 1.x / 2.x read only that)."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


class TextEncoderWithHiddenForTrace(nn.Module):
    """``input_ids -> (first output, penultimate hidden state)``, what the SDXL pipeline reads."""

    def __init__(self, text_encoder: nn.Module):
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.text_encoder(input_ids, output_hidden_states=True, return_dict=True)
        return out[0], out.hidden_states[-2]


class UNetForTrace(nn.Module):
    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class SDXLUNetForTrace(nn.Module):
    """SDXL's added conditions (pooled text embeds and size/crop time ids) as explicit inputs."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[0]


class VAEDecoderForTrace(nn.Module):
    """``latents -> image`` through ``post_quant_conv`` and the decoder."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv
        self.decoder = vae.decoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)


class VAEEncoderForTrace(nn.Module):
    """``image -> latent distribution moments`` through the encoder and ``quant_conv``."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        moments = self.encoder(image)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return moments


def traceable(family: Family, component: str, module: nn.Module) -> nn.Module:
    """Wrap a loaded diffusers/transformers module so it can be traced with tensor inputs."""
    if family.denoiser == TRANSFORMER:
        from . import pixart

        return pixart.traceable(component, module)
    if component in (TEXT_ENCODER, TEXT_ENCODER_2):
        wrapper = TextEncoderWithHiddenForTrace if family.name == "sdxl" else TextEncoderForTrace
        return wrapper(module).eval()
    if is_unet(component):
        return (SDXLUNetForTrace if family.has_added_conditions else UNetForTrace)(module).eval()
    if component == VAE_DECODER:
        return VAEDecoderForTrace(module).eval()
    if component == VAE_ENCODER:
        return VAEEncoderForTrace(module).eval()
    raise ValueError(f"unknown component {component!r}")


# --- example inputs of the fixed shapes -------------------------------------------------------------


@dataclass(frozen=True)
class ShapeConfigs:
    """The few config values that decide the compiled input shapes."""

    unet: Mapping[str, Any]  # the denoiser's config (PixArt: the transformer's)
    vae: Mapping[str, Any]
    token_ids: tuple[int, ...]  # a real tokenized prompt padded to the family's text length (embedding lookups)


def example_inputs(
    family: Family, component: str, width: int, height: int, configs: ShapeConfigs
) -> tuple[torch.Tensor, ...]:
    """Example inputs (float32 / int64) for tracing ``component`` at ``width`` x ``height``."""
    if family.denoiser == TRANSFORMER:
        from . import pixart

        return pixart.example_inputs(family, component, width, height, configs)
    factor = vae_scale_factor(configs.vae)
    latent_hw = (height // factor, width // factor)
    batch = family.batch_of(component)
    generator = torch.Generator("cpu").manual_seed(0)
    if component in (TEXT_ENCODER, TEXT_ENCODER_2):
        return (torch.tensor([list(configs.token_ids)] * batch, dtype=torch.int64),)
    if is_unet(component):
        unet = configs.unet
        inputs: tuple[torch.Tensor, ...] = (
            torch.randn(batch, unet["in_channels"], *latent_hw, generator=generator),
            torch.full((batch,), 999.0),
            torch.randn(batch, TEXT_LENGTH * unet_chunks_of(component), _cross_attention_dim(unet), generator=generator),
        )
        if family.has_added_conditions:
            time_ids_dim = 6
            text_embeds_dim = unet["projection_class_embeddings_input_dim"] - time_ids_dim * unet["addition_time_embed_dim"]
            time_ids = torch.tensor([[height, width, 0, 0, height, width]] * batch, dtype=torch.float32)
            inputs += (torch.randn(batch, text_embeds_dim, generator=generator), time_ids)
        return inputs
    if component == VAE_DECODER:
        return (torch.randn(batch, configs.vae["latent_channels"], *latent_hw, generator=generator),)
    if component == VAE_ENCODER:
        return (torch.rand(batch, configs.vae["in_channels"], height, width, generator=generator) * 2 - 1,)
    raise ValueError(f"unknown component {component!r}")


def _cross_attention_dim(unet_config: Mapping[str, Any]) -> int:
    dim = unet_config["cross_attention_dim"]
    return dim if isinstance(dim, int) else dim[0]
