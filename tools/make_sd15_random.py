"""Write random-weight Stable Diffusion models for benchmarking, plus a registry for them.

    python tools/make_sd15_random.py /tmp/bench-models            # both architectures
    python tools/make_sd15_random.py /tmp/bench-models --arch sd15

Architectures (random weights: the images are noise, the arithmetic is the real thing):

``sd15``
    Full-size SD 1.5: ``UNet2DConditionModel(cross_attention_dim=768)`` (otherwise the default
    config, which is SD 1.5's; 860M parameters), the SD 1.5 VAE (128/256/512/512, 2 layers per block) and a CLIP ViT-L/14-sized
    text encoder (768 hidden, 12 layers, 49408-token vocabulary). About 4.3 GB of fp32
    safetensors. Registry ids ``sd15-random`` (fp32) and ``sd15-random-bf16`` (bf16), 256x256.
``demo-shapes``
    The architecture of the shipped ``models/demo-shapes`` (``tools/train_demo_model.py``
    defaults: UNet 64/128/128, VAE 16/32/64/64, 64-wide 2-layer text encoder, 64x64 images)
    with random weights, for benchmarking before the trained model exists. Registry ids
    ``demo-shapes-random`` and ``demo-shapes-random-b`` (a second copy, for model switching).

The tokenizer is character-level (no vocabulary download); prompts of lowercase words tokenize to
one token per character, which is all the benchmark needs. Nothing is written inside the repo
unless you ask for it: weights are never committed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import string
from pathlib import Path

import torch
import yaml

CHARS = string.ascii_lowercase + string.digits + ".,!?'-() "
SD15_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "timestep_spacing": "leading", "steps_offset": 1, "clip_sample": False,
    "set_alpha_to_one": False, "skip_prk_steps": True,
}


def write_tokenizer(directory: Path):
    """A character-level CLIP BPE tokenizer (ids 0/1 are start/end of text)."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *CHARS.strip(), *(c + "</w>" for c in CHARS.strip())]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(directory)
    return CLIPTokenizer.from_pretrained(directory)


def build(arch: str):
    """(unet, vae, text_encoder) with random weights for ``arch``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch == "sd15":
        # The default config is SD 1.5's except the cross-attention width (1280 there, CLIP ViT-L's 768 here).
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
            sample_size=512, scaling_factor=0.18215)
        text = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                              hidden_act="quick_gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1)
    elif arch == "demo-shapes":
        channels = (64, 128, 128)
        n = len(channels)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
            block_out_channels=channels, layers_per_block=1, cross_attention_dim=64, attention_head_dim=8,
            norm_num_groups=32)
        vae = AutoencoderKL(
            block_out_channels=(16, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=16,
            sample_size=64)
        text = CLIPTextConfig(vocab_size=2 + 2 * len(CHARS), hidden_size=64, intermediate_size=256,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                              projection_dim=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    else:
        raise ValueError(f"unknown architecture {arch!r}")
    return unet.eval(), vae.eval(), CLIPTextModel(text).eval()


def make_model(out: Path, arch: str, name: str, seed: int) -> Path:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    directory = out / name
    if (directory / "model_index.json").is_file():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    torch.manual_seed(seed)
    tokenizer = write_tokenizer(directory / "tokenizer")
    unet, vae, text_encoder = build(arch)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def registry_entries(arch: str) -> list[dict]:
    if arch == "sd15":
        base = {"family": "sd15", "source": {"local": "sd15-random"}, "resolutions": ["256x256"],
                "defaults": {"sampler": "Euler a", "steps": 4, "cfg_scale": 7}}
        return [{"id": "sd15-random", "title": "SD 1.5 architecture, random weights", **base},
                {"id": "sd15-random-bf16", "title": "SD 1.5 architecture, random weights, bf16", "dtype": "bf16",
                 **base}]
    base = {"family": "sd15", "resolutions": ["64x64"], "defaults": {"sampler": "Euler a", "steps": 20, "cfg_scale": 7}}
    return [{"id": "demo-shapes-random", "title": "demo-shapes architecture, random weights",
             "source": {"local": "demo-shapes-random"}, **base},
            {"id": "demo-shapes-random-b", "title": "demo-shapes architecture, random weights (copy b)",
             "source": {"local": "demo-shapes-random-b"}, **base}]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--arch", choices=("sd15", "demo-shapes", "all"), default="all")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    arches = ("demo-shapes", "sd15") if args.arch == "all" else (args.arch,)
    models = []
    for arch in arches:
        for seed, entry in enumerate(registry_entries(arch)):
            ref = entry["source"]["local"]
            if not (args.out / ref / "model_index.json").is_file():
                print(f"writing {args.out / ref} ...", flush=True)
            make_model(args.out, arch, ref, seed)
        models += registry_entries(arch)
    registry = args.out / "model_registry.yaml"
    models = json.loads(json.dumps(models))  # no YAML anchors for the shared sub-dicts
    registry.write_text(yaml.safe_dump({"artifacts_dir": "artifacts", "default_model": models[0]["id"],
                                        "models": models}, sort_keys=False))
    print(registry)


if __name__ == "__main__":
    main()
