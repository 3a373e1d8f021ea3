"""Write tiny random-weight Stable Diffusion models of every family, plus a registry for them.

    python tests/make_tiny_models.py OUT_DIR

Creates ``OUT_DIR/tiny-sd15``, ``tiny-sd21``, ``tiny-sdxl`` and ``tiny-pixart-sigma`` (diffusers
directories, SD1.5-, SD2.1-, SDXL- and PixArt-Sigma-shaped configs, a few MB each), ``OUT_DIR/tiny-sd15.safetensors`` (the SD1.5
model as one original-layout checkpoint) and ``OUT_DIR/model_registry.yaml`` pointing at them.
No network. The models draw noise, but every loading, compiling and generating path runs.
"""
from __future__ import annotations

import json
import string
import sys
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZE = 64
CHARS = string.ascii_lowercase + string.digits + ".,!?'-()"


def write_tokenizer(directory: Path) -> None:
    """A character-level CLIP BPE tokenizer: any lowercase text tokenizes, nothing is downloaded."""
    from transformers import CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>", *CHARS, *(c + "</w>" for c in CHARS)]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(directory)


def _text_encoder(with_projection: bool, hidden: int, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=2 + 2 * len(CHARS), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            projection_dim=hidden, hidden_act=act, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
                         norm_num_groups=8, sample_size=SIZE)


def _scheduler(prediction_type: str = "epsilon"):
    from diffusers import PNDMScheduler

    return PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                         steps_offset=1, set_alpha_to_one=False, prediction_type=prediction_type)


def _unet(cross_dim: int, sdxl: bool = False, linear_proj: bool = False):
    from diffusers import UNet2DConditionModel

    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=cross_dim // 2 + 6 * 8, transformer_layers_per_block=(1, 2))
    return UNet2DConditionModel(
        sample_size=SIZE // 8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=(2, 4) if not sdxl else 4,
        use_linear_projection=linear_proj or sdxl, **extra,
    ).eval()


def make_sd(out: Path, family: str) -> Path:
    from diffusers import StableDiffusionPipeline

    torch.manual_seed({"sd15": 1, "sd21": 2}[family])
    sd21 = family == "sd21"
    directory = out / f"tiny-{family}"
    write_tokenizer(directory / "tokenizer")
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=_text_encoder(False, 32, "gelu" if sd21 else "quick_gelu"),
        tokenizer=CLIPTokenizer.from_pretrained(directory / "tokenizer"), unet=_unet(32, linear_proj=sd21),
        scheduler=_scheduler("v_prediction" if sd21 else "epsilon"), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def make_sdxl(out: Path) -> Path:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    torch.manual_seed(3)
    directory = out / "tiny-sdxl"
    for name in ("tokenizer", "tokenizer_2"):
        write_tokenizer(directory / name)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_text_encoder(False, 32), text_encoder_2=_text_encoder(True, 32),
        tokenizer=CLIPTokenizer.from_pretrained(directory / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(directory / "tokenizer_2"), unet=_unet(64, sdxl=True),
        scheduler=EulerDiscreteScheduler.from_config(_scheduler().config), add_watermarker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def write_t5_tokenizer(directory: Path) -> None:
    """A character-level T5 (Unigram) tokenizer built in memory: no sentencepiece model, no download."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0),
              *((c, -3.0) for c in CHARS), *(("\u2581" + c, -2.5) for c in CHARS)]
    T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=300).save_pretrained(directory)


def make_pixart_sigma(out: Path) -> Path:
    """PixArt-Sigma-shaped: T5 v1.1 (gated-gelu) encoder, a 2-layer PixArt transformer with learned
    sigma (8 output channels), the tiny VAE, DPM-Solver as the model's scheduler (as the hub model)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(4)
    directory = out / "tiny-pixart-sigma"
    write_t5_tokenizer(directory / "tokenizer")
    tokenizer = T5Tokenizer.from_pretrained(directory / "tokenizer")
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=20,
        pad_token_id=0, eos_token_id=1)).eval()
    transformer = PixArtTransformer2DModel(
        sample_size=SIZE // 8, patch_size=2, in_channels=4, out_channels=8, num_layers=2, num_attention_heads=4,
        attention_head_dim=8, cross_attention_dim=32, caption_channels=32, norm_type="ada_norm_single",
        use_additional_conditions=False, norm_num_groups=8).eval()
    scheduler = DPMSolverMultistepScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
                                            prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
                                            lower_order_final=True, timestep_spacing="linspace", steps_offset=0)
    pipe = PixArtSigmaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=_vae(), transformer=transformer,
                               scheduler=scheduler)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def write_registry(out: Path, extra_models: list[dict] | None = None) -> Path:
    models = [
        {"id": "tiny-sd15", "title": "Tiny SD 1.5", "family": "sd15", "source": {"local": "tiny-sd15"},
         "resolutions": ["64x64", "64x96"], "defaults": {"sampler": "Euler a", "steps": 4, "cfg_scale": 7},
         "batch_sizes": [1, 4]},
        {"id": "tiny-sd21", "title": "Tiny SD 2.1", "family": "sd21", "source": {"local": "tiny-sd21"},
         "resolutions": ["64x64"], "defaults": {"sampler": "DPM++ 2M", "steps": 4, "cfg_scale": 7}},
        {"id": "tiny-sd15-file", "title": "Tiny SD 1.5 (single file)", "family": "sd15",
         "source": {"single_file": "tiny-sd15.safetensors", "config": "tiny-sd15"},
         "resolutions": ["64x64"], "defaults": {"sampler": "Euler a", "steps": 4, "cfg_scale": 7}},
        {"id": "tiny-sdxl", "title": "Tiny SDXL", "family": "sdxl", "source": {"local": "tiny-sdxl"},
         "resolutions": ["64x64"], "defaults": {"sampler": "Euler", "steps": 4, "cfg_scale": 5},
         "batch_sizes": [3]},
        {"id": "tiny-pixart-sigma", "title": "Tiny PixArt-Sigma", "family": "pixart-sigma",
         "source": {"local": "tiny-pixart-sigma"}, "resolutions": ["64x64"], "tp_degree": 2,
         "defaults": {"sampler": "DPM++ 2M", "steps": 4, "cfg_scale": 4.5}},
        *(extra_models or []),
    ]
    path = out / "model_registry.yaml"
    path.write_text(yaml.safe_dump({"artifacts_dir": "artifacts", "default_model": "tiny-sd15", "models": models},
                                   sort_keys=False))
    return path


def make_all(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    from ldm_checkpoint import write_ldm_checkpoint

    write_ldm_checkpoint(make_sd(out, "sd15"), out / "tiny-sd15.safetensors")
    make_sd(out, "sd21")
    make_sdxl(out)
    make_pixart_sigma(out)
    return write_registry(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(make_all(Path(sys.argv[1])))
