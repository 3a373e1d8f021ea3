"""Read a model from its source: a hub repo id, a local diffusers directory or one checkpoint file.

Two kinds of reads, so that compiled serving never holds weights it does not run:
``load_parts`` reads configs, tokenizers and the scheduler config only (kilobytes);
``ComponentLoader`` reads the full weights of one component at a time (for compiling and eager).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .errors import ModelLoadError
from .families import FAMILIES, TEXT_ENCODER, TEXT_ENCODER_2, UNET
from .registry import ModelSpec

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelParts:
    """Everything about a model except its big weights."""

    scheduler_config: dict[str, Any]
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_encoder_configs: dict[str, Any]  # component name -> transformers config
    tokenizers: dict[str, Any]  # "tokenizer" / "tokenizer_2" -> tokenizer

    def prompt_token_ids(self, length: int) -> tuple[int, ...]:
        """A real tokenized prompt padded to ``length``: safe example ids for embedding lookups."""
        ids = self.tokenizers["tokenizer"]("a photo", padding="max_length", max_length=length, truncation=True)
        return tuple(ids["input_ids"])


def _hub_kwargs(spec: ModelSpec) -> dict[str, Any]:
    return {"revision": spec.source.revision} if spec.source.revision else {}


def _wrap_errors(spec: ModelSpec, what: str, exc: Exception) -> ModelLoadError:
    hint = ""
    if spec.source.kind == "hub":
        hint = (" (a hub model must be downloaded once: run `huggingface-cli download "
                f"{spec.source.ref}` on a machine with network, or point the registry at a local copy)")
    return ModelLoadError(f"model {spec.id!r}: cannot load {what} from {spec.source.describe()}: {exc}{hint}")


def load_parts(spec: ModelSpec) -> ModelParts:
    """Configs, tokenizers and scheduler config of ``spec`` (for single files: of its config repo)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers import PNDMScheduler
    from transformers import AutoConfig, AutoTokenizer

    ref = spec.source.config_ref
    kwargs = _hub_kwargs(spec) if spec.source.kind == "hub" else {}
    family = FAMILIES[spec.family]
    try:
        tokenizers = {"tokenizer": AutoTokenizer.from_pretrained(ref, subfolder="tokenizer", **kwargs)}
        if TEXT_ENCODER_2 in family.text_encoders:
            tokenizers["tokenizer_2"] = AutoTokenizer.from_pretrained(ref, subfolder="tokenizer_2", **kwargs)
        return ModelParts(
            scheduler_config=dict(PNDMScheduler.load_config(ref, subfolder="scheduler", **kwargs)),
            unet_config=dict(UNet2DConditionModel.load_config(ref, subfolder=family.denoiser, **kwargs)),
            vae_config=dict(AutoencoderKL.load_config(ref, subfolder="vae", **kwargs)),
            text_encoder_configs={
                name: AutoConfig.from_pretrained(ref, subfolder=name, **kwargs) for name in family.text_encoders
            },
            tokenizers=tokenizers,
        )
    except (OSError, ValueError, KeyError) as exc:
        raise _wrap_errors(spec, "configs and tokenizers", exc) from exc


class ComponentLoader:
    """Loads full-weight modules of one model, one component at a time.

    Diffusers directories and hub repos load each component on its own. A single-file checkpoint
    can only be split by loading it whole once; the loader keeps it until ``close()``.
    """

    def __init__(self, spec: ModelSpec, torch_dtype: torch.dtype = torch.float32):
        self.spec = spec
        self.torch_dtype = torch_dtype
        self._single_file_pipe: Optional[Any] = None

    def module(self, name: str) -> nn.Module:
        """``name`` is a pipeline attribute: text_encoder, text_encoder_2, unet, transformer or vae."""
        try:
            if self.spec.source.kind == "single_file":
                return getattr(self._single_file_pipeline(), name)  # LoRAs fused when it was loaded
            module = self._from_directory(name)
        except (OSError, ValueError, KeyError) as exc:
            raise _wrap_errors(self.spec, name, exc) from exc
        if any(name in lora.components for lora in self.spec.loras):
            self._fuse_loras({name: module})
        return module

    def _fuse_loras(self, modules: dict[str, nn.Module]) -> None:
        """The registry entry's LoRAs, fused into ``modules`` before anyone traces or runs them."""
        from .lora import fuse_loras

        unet_config = None
        if self.spec.family == "sdxl":  # diffusers maps SDXL kohya UNet names with the UNet's config
            unet = modules.get(UNET)
            unet_config = dict(unet.config) if unet is not None else self._unet_config()
        fuse_loras(self.spec.family, modules, self.spec.loras, unet_config, self.spec.id)

    def _unet_config(self) -> dict[str, Any]:
        from diffusers import UNet2DConditionModel

        kwargs = _hub_kwargs(self.spec) if self.spec.source.kind == "hub" else {}
        return dict(UNet2DConditionModel.load_config(self.spec.source.config_ref, subfolder=UNET, **kwargs))

    def _from_directory(self, name: str) -> nn.Module:
        from diffusers import AutoencoderKL, PixArtTransformer2DModel, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

        pixart = FAMILIES[self.spec.family].denoiser == "transformer"
        classes = {
            "unet": UNet2DConditionModel,
            "transformer": PixArtTransformer2DModel,
            "vae": AutoencoderKL,
            TEXT_ENCODER: T5EncoderModel if pixart else CLIPTextModel,
            TEXT_ENCODER_2: CLIPTextModelWithProjection,
        }
        dtype_kw = "dtype" if name.startswith("text_encoder") else "torch_dtype"
        module = classes[name].from_pretrained(
            self.spec.source.ref, subfolder=name, **{dtype_kw: self.torch_dtype}, **_hub_kwargs(self.spec)
        )
        return module.eval()

    def _single_file_pipeline(self) -> Any:
        source = self.spec.source
        if source.is_pickle and not source.unpickle_allowed:
            raise ModelLoadError(
                f"model {self.spec.id!r}: {source.ref} is a pickle checkpoint (.ckpt), and unpickling a file "
                "can run code hidden in it. Convert it to .safetensors once (e.g. with diffusers' "
                "scripts/convert_original_stable_diffusion_to_diffusers.py --to_safetensors, or "
                "safetensors.torch.save_file on its state_dict) and point the registry at that file; or, "
                "if you trust the file, pass --allow-unsafe-pickle (it is then read with torch's "
                "weights_only unpickler)")
        if self._single_file_pipe is None:
            pipeline_class = pipeline_class_for(self.spec.family, "txt2img")
            self._single_file_pipe = pipeline_class.from_single_file(
                self.spec.source.ref, config=self.spec.source.config, torch_dtype=self.torch_dtype,
                safety_checker=None, requires_safety_checker=False,
            )
            if self.spec.loras:  # the whole pipeline is in memory: fuse into every component at once
                names = (UNET, *FAMILIES[self.spec.family].text_encoders)
                self._fuse_loras({name: getattr(self._single_file_pipe, name) for name in names})
        return self._single_file_pipe

    def close(self) -> None:
        self._single_file_pipe = None
        gc.collect()


def pipeline_class_for(family: str, mode: str) -> Any:
    import diffusers

    fam = FAMILIES[family]
    name = {"txt2img": fam.txt2img_pipeline, "img2img": fam.img2img_pipeline, "inpaint": fam.inpaint_pipeline}[mode]
    if mode == "inpaint":  # with A1111's latent noise / latent nothing fills
        from .inpaint import fill_pipeline

        return fill_pipeline(getattr(diffusers, name))
    if ":" in name:  # one of ours, "module:Class" (e.g. PixArt-Sigma's serving pipeline)
        import importlib

        module, _, attribute = name.partition(":")
        return getattr(importlib.import_module(module), attribute)
    return getattr(diffusers, name)
