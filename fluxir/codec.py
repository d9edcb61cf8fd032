"""Image codecs and FLUX token packing: images <-> latents <-> (B, N, C·4) tokens with position ids.

`pixel` codes RGB in [-1, 1] (tiny models); `vae` is FLUX's AutoencoderKL with its scaling and
shift factors. Packing, unpacking and position ids follow diffusers' FluxPipeline.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2·W/2, 4C), 2×2 patches in FluxPipeline's `_pack_latents` order."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent size {h}x{w} must be even for 2x2 packing")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, N, 4C) -> (B, C, height, width) for a latent of that size; the exact inverse of `pack`."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} tokens do not tile a {height}x{width} latent")
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Position ids (N, 3) of the packed tokens of a (height, width) latent: (0, row, col)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(height // 2, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device, dtype=dtype)[None, :]
    return ids.reshape(-1, 3)


class PixelCodec(nn.Module):
    """Identity codec on RGB: latent = image·2 − 1, 3 channels, no downsampling."""
    latent_channels = 3
    downsample = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [-1, 1]."""
        return images * 2 - 1

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 3, H, W) in [0, 1] (clamped)."""
        return ((latents + 1) / 2).clamp(0, 1)


class VaeCodec(nn.Module):
    """FLUX's AutoencoderKL (frozen): latent = (mode(E(2x−1)) − shift)·scale, 16 channels, ÷8."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.latent_channels = cfg.latent_channels
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(cfg.shift_factor if cfg.shift_factor is not None else 0.0)
        self.decode_batch = 4

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "VaeCodec":
        from diffusers import AutoencoderKL

        from fluxir.flux_folder import require_model

        return cls(AutoencoderKL.from_pretrained(require_model(path, "diffusers", "the VAE codec")))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return ((dist.mode() - self.shift_factor) * self.scaling_factor).to(images.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoded in chunks of `decode_batch`: at 1024 px one image's decoder activations are ~1.5 GiB."""
        parts = [self.vae.decode((z / self.scaling_factor + self.shift_factor).to(self.vae.dtype)).sample
                 for z in latents.split(self.decode_batch)]
        return ((torch.cat(parts).to(latents.dtype) + 1) / 2).clamp(0, 1)


def token_channels(codec) -> int:
    """Channels of one packed token: the latent channels of a 2x2 patch."""
    return codec.latent_channels * 4


def build_codec(cfg) -> nn.Module:
    """From a `Config`: the pixel codec, or the VAE at codec.vae_path (default <model.path>/vae)."""
    if cfg.codec.kind == "pixel":
        return PixelCodec()
    path = cfg.codec.vae_path or (Path(cfg.model.path) / "vae" if cfg.model.path else None)
    if path is None:
        raise ValueError("codec.kind=vae needs codec.vae_path or model.path")
    return VaeCodec.from_pretrained(path)
