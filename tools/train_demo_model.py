"""Train the shipped demo model: a tiny Stable Diffusion 1.5-architecture pipeline.

It learns the procedural scenes of :mod:`tools.demo_scenes` ("a small red circle on
a blue background") and is saved as an ordinary diffusers ``StableDiffusionPipeline``
directory (safetensors) that loads and runs offline.

Stages, all seeded:

1. tokenizer: a CLIP BPE tokenizer whose merges turn every caption word into one token;
2. VAE (``AutoencoderKL``, 4 latent channels, 8x downsampling: 64x64 -> 8x8 latents);
3. latents of the whole data set, and the VAE ``scaling_factor`` that gives them unit variance;
4. UNet (``UNet2DConditionModel``) trained jointly with a tiny ``CLIPTextModel``, with
   caption dropout for classifier-free guidance, unrelated captions on some low-noise
   samples (faithful low-strength img2img), min-SNR loss weighting and EMA weights;
5. save the pipeline with an SD 1.5-style scheduler config.

Usage (the defaults reproduce the shipped model; about 28 minutes on 2 CPU cores)::

    python -m tools.train_demo_model --out models/demo-shapes

``--threads 2`` is faster on an idle machine but sums floats in another order, so its
weights are not bit-identical to the shipped ones.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import diffusers
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from tools.demo_scenes import VOCABULARY, Scene, caption, random_caption, render_batch, sample_scenes
from tools.scene_eval import score

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
LATENT_CHANNELS = 4
TEXT_HIDDEN = 64

SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "clip_sample": False,
    "set_alpha_to_one": False,
}
"""The Stable Diffusion 1.5 noise schedule (shared by every sampler built from it)."""


# --------------------------------------------------------------------------- tokenizer


def word_symbols(word: str) -> list[str]:
    """Initial BPE symbols of a word: its characters, the last one with the ``</w>`` suffix."""
    return list(word[:-1]) + [word[-1] + "</w>"]


def merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace every adjacent occurrence of ``pair`` in ``symbols`` by its concatenation."""
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_merges(words: tuple[str, ...]) -> list[tuple[str, str]]:
    """BPE merges (most frequent pair first) until every word is a single symbol."""
    seqs = [word_symbols(w) for w in words]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        counts = Counter(pair for s in seqs for pair in zip(s, s[1:]))
        pair = max(sorted(counts), key=lambda p: counts[p])
        merges.append(pair)
        seqs = [merge_pair(s, pair) for s in seqs]
    return merges


def build_vocab(words: tuple[str, ...], merges: list[tuple[str, str]]) -> dict[str, int]:
    """Special tokens, then every symbol the merges start from or produce."""
    symbols = [BOS, EOS]
    symbols += sorted({sym for w in words for sym in word_symbols(w)})
    symbols += [a + b for a, b in merges]
    return {sym: i for i, sym in enumerate(dict.fromkeys(symbols))}


def build_tokenizer(words: tuple[str, ...] = VOCABULARY) -> CLIPTokenizer:
    """A CLIP tokenizer that maps each caption word to one token; unknown characters -> EOS."""
    merges = learn_merges(words)
    return CLIPTokenizer(
        vocab=build_vocab(words, merges),
        merges=merges,
        model_max_length=MAX_LENGTH,
    )


def save_tokenizer(tokenizer: CLIPTokenizer, directory: Path) -> None:
    """``save_pretrained`` plus the classic ``vocab.json``/``merges.txt`` pair."""
    tokenizer.save_pretrained(directory)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"], indent=1) + "\n")
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def tokenize(tokenizer: CLIPTokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionPipeline`` makes them (padded to 77)."""
    return tokenizer(
        texts, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


def word_token_ids(tokenizer: CLIPTokenizer) -> list[int]:
    """Ids of the whole-word tokens (plus BOS/EOS): the only ones the text encoder ever sees."""
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    ids |= set(tokenizer.convert_tokens_to_ids([f"{w}</w>" for w in VOCABULARY]))
    return sorted(ids)


# --------------------------------------------------------------------------- models


def build_vae(
    channels: tuple[int, ...], norm_groups: int = 4, initial_logvar: float = -6.0
) -> AutoencoderKL:
    """SD-style ``AutoencoderKL`` with ``len(channels) - 1`` halvings of the resolution.

    The posterior log-variance starts at ``initial_logvar`` (nearly deterministic
    latents) so that reconstruction is learned quickly; the KL term then shapes it.
    """
    n = len(channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=norm_groups,
        sample_size=64,
    )
    with torch.no_grad():
        vae.quant_conv.bias[LATENT_CHANNELS:] = initial_logvar
    return vae


def build_text_encoder(tokenizer: CLIPTokenizer, layers: int) -> CLIPTextModel:
    """A tiny CLIP text transformer over the tokenizer's vocabulary."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_unet(channels: tuple[int, ...], norm_groups: int, latent_size: int) -> UNet2DConditionModel:
    """SD 1.5-style UNet: cross-attention blocks on the higher resolutions, plain block last."""
    n = len(channels)
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=channels,
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=4,
        norm_num_groups=norm_groups,
    )


# --------------------------------------------------------------------------- training helpers


@dataclass
class Schedule:
    """Linear warm-up then cosine decay of the learning rate."""

    lr: float
    steps: int
    warmup: int = 100

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(self.steps - self.warmup, 1)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of a module's parameters."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = list(module.parameters())
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for p, s in zip(self.params, self.shadow):
            p.copy_(s)


def batches(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Endless random mini-batches of indices into a data set of size ``n``."""
    while True:
        yield rng.integers(0, n, size=batch_size)


def train_loop(
    name: str,
    params: list[torch.nn.Parameter],
    loss_fn: Callable[[np.ndarray], torch.Tensor],
    index_stream: Iterator[np.ndarray],
    schedule: Schedule,
    on_step: Callable[[int], None] | None = None,
    log_every: int = 100,
) -> None:
    """AdamW over ``params`` for ``schedule.steps`` steps, printing progress."""
    optimizer = torch.optim.AdamW(params, lr=schedule.lr, weight_decay=1e-2)
    start, running = time.time(), 0.0
    for step in range(schedule.steps):
        for group in optimizer.param_groups:
            group["lr"] = schedule(step)
        loss = loss_fn(next(index_stream))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if on_step is not None:
            on_step(step)
        running += loss.item()
        if (step + 1) % log_every == 0 or step + 1 == schedule.steps:
            print(
                f"[{name}] step {step + 1}/{schedule.steps} loss {running / log_every:.5f} "
                f"lr {schedule(step):.2e} {time.time() - start:.0f}s",
                flush=True,
            )
            running = 0.0


# --------------------------------------------------------------------------- stages


def edge_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 distance between horizontal and vertical image gradients (sharpens edges)."""
    dy = F.l1_loss(recon.diff(dim=-2), target.diff(dim=-2))
    dx = F.l1_loss(recon.diff(dim=-1), target.diff(dim=-1))
    return dx + dy


def train_vae(
    vae: AutoencoderKL, images: torch.Tensor, args: argparse.Namespace, rng: np.random.Generator
) -> None:
    """Reconstruction (MSE + L1 + edge L1) plus a small per-latent-element KL term."""

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        x = images[idx]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        pixel = F.mse_loss(recon, x) + 0.1 * F.l1_loss(recon, x)
        return pixel + args.edge_weight * edge_loss(recon, x) + args.kl_weight * kl

    vae.train()
    index_stream = batches(len(images), args.vae_batch, rng)
    schedule = Schedule(args.vae_lr, args.vae_steps, warmup=args.vae_steps // 10)
    train_loop("vae", list(vae.parameters()), loss_fn, index_stream, schedule, log_every=args.log_every)
    vae.eval()


@torch.no_grad()
def reconstruction_report(vae: AutoencoderKL, n: int = 200, seed: int = 12345) -> dict[str, float]:
    """Evaluator accuracies on VAE reconstructions of ``n`` held-out scenes."""
    scenes = sample_scenes(n, seed=seed)
    x = torch.from_numpy(render_batch(scenes))
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    pixels = ((recon.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    result = score([caption(s) for s in scenes], list(pixels))
    result["mse"] = float(F.mse_loss(recon, x))
    return result


@torch.no_grad()
def encode_dataset(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image's latent."""
    means, stds = [], []
    for chunk in images.split(256):
        dist = vae.encode(chunk).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction."""
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    return torch.clamp(snr, max=gamma) / snr


def train_unet(
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    latents: tuple[torch.Tensor, torch.Tensor],
    captions: Callable[[np.ndarray], list[str]],
    args: argparse.Namespace,
    rng: np.random.Generator,
) -> None:
    """Epsilon-prediction training of UNet + text encoder; the EMA weights are kept.

    Low-noise samples (``t < args.swap_below_t``) get an unrelated scene's caption with
    probability ``args.swap_prob``: a nearly clean latent must be denoised from the image
    itself, so img2img at low strength keeps the picture even when the prompt disagrees.
    """
    mean, std = latents
    alphas_cumprod = torch.cumprod(1 - betas(), dim=0)

    def loss_fn(idx: np.ndarray) -> torch.Tensor:
        x0 = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * args.scaling_factor
        noise = torch.randn_like(x0) + args.offset_noise * torch.randn(len(idx), x0.shape[1], 1, 1)
        t = torch.randint(0, len(alphas_cumprod), (len(idx),))
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        swap = (t.numpy() < args.swap_below_t) & (rng.random(len(idx)) < args.swap_prob)
        texts = captions(np.where(swap, rng.integers(0, len(mean), len(idx)), idx))
        context = text_encoder(tokenize(tokenizer, texts))[0]
        pred = unet(noisy, t, context).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        return (per_sample * min_snr_weights(alphas_cumprod, t, args.snr_gamma)).mean()

    modules = torch.nn.ModuleList([unet, text_encoder])
    modules.train()
    ema = EMA(modules, args.ema_decay)
    index_stream = batches(len(mean), args.unet_batch, rng)
    schedule = Schedule(args.unet_lr, args.unet_steps)
    params = list(modules.parameters())
    train_loop("unet", params, loss_fn, index_stream, schedule, ema.update, args.log_every)
    ema.copy_to_model()
    modules.eval()


def betas() -> torch.Tensor:
    """The scaled-linear beta schedule of :data:`SCHEDULER_CONFIG`."""
    c = SCHEDULER_CONFIG
    root = torch.linspace(c["beta_start"] ** 0.5, c["beta_end"] ** 0.5, c["num_train_timesteps"])
    return root**2


def caption_sampler(scenes: list[Scene], rng: np.random.Generator, dropout: float) -> Callable[[np.ndarray], list[str]]:
    """Random training captions for scene indices, empty with probability ``dropout``."""

    def captions(idx: np.ndarray) -> list[str]:
        return ["" if rng.random() < dropout else random_caption(scenes[i], rng) for i in idx]

    return captions


@torch.no_grad()
def tie_unused_embeddings(text_encoder: CLIPTextModel, used_ids: list[int], eos_id: int) -> None:
    """Give every never-trained token (BPE pieces of unknown words) the EOS embedding."""
    table = text_encoder.get_input_embeddings().weight
    unused = torch.ones(len(table), dtype=torch.bool)
    unused[used_ids] = False
    table[unused] = table[eos_id].clone()


def save_pipeline(
    out: Path,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    unet: UNet2DConditionModel,
    scheduler_class: str,
) -> None:
    """Write a complete diffusers ``StableDiffusionPipeline`` directory (safetensors)."""
    scheduler = getattr(diffusers, scheduler_class).from_config(SCHEDULER_CONFIG)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    save_tokenizer(tokenizer, out / "tokenizer")


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the defaults reproduce the shipped model."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/demo-shapes"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the shipped model: 1)")
    p.add_argument("--num-images", type=int, default=10000)
    p.add_argument("--vae-channels", type=int, nargs="+", default=[16, 32, 64, 64])
    p.add_argument("--vae-groups", type=int, default=4)
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=2e-4)
    p.add_argument("--vae-init-logvar", type=float, default=-4.6)
    p.add_argument("--edge-weight", type=float, default=0.5)
    p.add_argument("--unet-channels", type=int, nargs="+", default=[32, 64, 64])
    p.add_argument("--unet-groups", type=int, default=8)
    p.add_argument("--text-layers", type=int, default=2)
    p.add_argument("--unet-steps", type=int, default=5500)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--unet-lr", type=float, default=1e-3)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--offset-noise", type=float, default=0.1)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--swap-below-t", type=int, default=200)
    p.add_argument("--swap-prob", type=float, default=0.5)
    p.add_argument("--scheduler", default="DPMSolverMultistepScheduler", help="default sampler saved with the model")
    p.add_argument("--vae-from", type=Path, help="reuse this trained VAE directory instead of training one")
    p.add_argument("--log-every", type=int, default=100)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Run every stage and save the pipeline to ``--out``."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    start = time.time()

    scenes = sample_scenes(args.num_images, seed=args.seed)
    images = torch.from_numpy(render_batch(scenes))
    print(f"rendered {len(scenes)} scenes in {time.time() - start:.0f}s", flush=True)

    if args.vae_from:
        vae = AutoencoderKL.from_pretrained(args.vae_from)
    else:
        vae = build_vae(tuple(args.vae_channels), args.vae_groups, args.vae_init_logvar)
        train_vae(vae, images, args, rng)
    print(f"VAE reconstructions: {reconstruction_report(vae)}", flush=True)
    mean, std = encode_dataset(vae, images)
    args.scaling_factor = float(1 / mean.std())
    vae.register_to_config(scaling_factor=args.scaling_factor)
    print(f"latents {tuple(mean.shape[1:])}, scaling_factor {args.scaling_factor:.4f}", flush=True)

    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(tokenizer, args.text_layers)
    unet = build_unet(tuple(args.unet_channels), args.unet_groups, latent_size=mean.shape[-1])
    captions = caption_sampler(scenes, rng, args.caption_dropout)
    train_unet(unet, text_encoder, tokenizer, (mean, std), captions, args, rng)
    tie_unused_embeddings(text_encoder, word_token_ids(tokenizer), tokenizer.eos_token_id)

    save_pipeline(args.out, vae, text_encoder, tokenizer, unet, args.scheduler)
    print(f"saved {args.out} after {(time.time() - start) / 60:.1f} min total", flush=True)


if __name__ == "__main__":
    main()
