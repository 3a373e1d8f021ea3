"""Live preview: a rough picture of the latents while a request is denoising, without the VAE.

A1111's "Approx cheap": each latent channel contributes linearly to R, G and B. The 4x3 factors are
the published ones for the SD 1.x/2.x VAE and for the SDXL VAE (which PixArt-Sigma shares); a
preview costs one tiny matrix product per image, so it never slows the device down. The picture has
the latents' size (1/8 of the image) and is scaled up for display.
"""
from __future__ import annotations

import torch
from PIL import Image

# latent channel -> (R, G, B), for latents as the denoiser sees them (already scaled).
_SD_FACTORS = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))
_SDXL_FACTORS = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
                 (-0.3730, -0.2499, -0.2088))
_FACTORS = {"sdxl": _SDXL_FACTORS, "pixart-sigma": _SDXL_FACTORS}


def latent_preview(latents: torch.Tensor, family: str, size: tuple[int, int]) -> Image.Image:
    """The RGB approximation of one image's latents (channels, h, w), scaled to ``size`` (width, height)."""
    factors = torch.tensor(_FACTORS.get(family, _SD_FACTORS), dtype=torch.float32)
    rgb = torch.einsum("chw,cr->hwr", latents.detach().float().cpu(), factors)
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB").resize(size, Image.Resampling.BILINEAR)


__all__ = ["latent_preview"]
