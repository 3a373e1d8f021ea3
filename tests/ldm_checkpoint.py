"""Write a diffusers SD 1.x/2.x model as one original-layout (CompVis/A1111) checkpoint.

Only for tests: it lets the single-file loading path (``from_single_file``) run on tiny models.
The key mapping is the inverse of the one diffusers applies when it reads such a checkpoint.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

_RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
           ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]


def _unet_key(key: str, layers: int) -> str:
    rules = [
        (r"^time_embedding\.linear_1\.", "time_embed.0."), (r"^time_embedding\.linear_2\.", "time_embed.2."),
        (r"^conv_in\.", "input_blocks.0.0."), (r"^conv_norm_out\.", "out.0."), (r"^conv_out\.", "out.2."),
        (r"^mid_block\.resnets\.(\d)\.", lambda m: f"middle_block.{2 * int(m[1])}."),
        (r"^mid_block\.attentions\.0\.", "middle_block.1."),
        (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"input_blocks.{1 + int(m[1]) * (layers + 1) + int(m[2])}.0."),
        (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"input_blocks.{1 + int(m[1]) * (layers + 1) + int(m[2])}.1."),
        (r"^down_blocks\.(\d+)\.downsamplers\.0\.conv\.", lambda m: f"input_blocks.{(int(m[1]) + 1) * (layers + 1)}.0.op."),
        (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"output_blocks.{int(m[1]) * (layers + 1) + int(m[2])}.0."),
        (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.", lambda m: f"output_blocks.{int(m[1]) * (layers + 1) + int(m[2])}.1."),
    ]
    for pattern, repl in rules:
        match = re.match(pattern, key)
        if match:
            prefix = re.sub(pattern, repl, match.group(0))
            rest = key[match.end():]
            if ".resnets." in key:
                for diffusers_name, ldm_name in _RESNET:
                    if rest.startswith(diffusers_name + "."):
                        rest = ldm_name + rest[len(diffusers_name):]
            return prefix + rest
    raise KeyError(key)


def _unet_state(unet) -> dict[str, torch.Tensor]:
    layers = unet.config.layers_per_block
    state = {}
    for key, value in unet.state_dict().items():
        match = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)$", key)
        if match:
            block = int(match[1])
            has_attention = hasattr(unet.up_blocks[block], "attentions")
            index = block * (layers + 1) + layers
            new = f"output_blocks.{index}.{2 if has_attention else 1}.conv.{match[2]}"
        else:
            new = _unet_key(key, layers)
        state["model.diffusion_model." + new] = value
    return state


def _vae_key(key: str, num_blocks: int) -> str:
    key = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.block.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}.", key)
    key = re.sub(r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1.", key)
    for old, new in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]:
        key = key.replace(f"attn_1.{old}.", f"attn_1.{new}.")
    return key.replace(".conv_shortcut.", ".nin_shortcut.")


def _vae_state(vae) -> dict[str, torch.Tensor]:
    blocks = len(vae.config.block_out_channels)
    state = {}
    for key, value in vae.state_dict().items():
        new = _vae_key(key, blocks)
        if ".attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # attention projections are 1x1 convs in the original layout
        state["first_stage_model." + new] = value
    return state


def write_ldm_checkpoint(diffusers_dir: Path, out_file: Path) -> Path:
    """Save ``diffusers_dir`` (an SD 1.x pipeline) as one ``.safetensors`` in the original layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(diffusers_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(diffusers_dir, subfolder="vae")
    text = CLIPTextModel.from_pretrained(diffusers_dir, subfolder="text_encoder")
    state = {**_unet_state(unet), **_vae_state(vae)}
    # The original layout keeps transformers' classic "text_model." prefix (transformers 5 drops it).
    state.update({"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
                  for k, v in text.state_dict().items()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_file))
    return out_file
