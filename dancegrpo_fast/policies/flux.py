"""FLUX.1-dev (FluxTransformer2DModel): packed 2x2 latent tokens, guidance embedding, txt/img ids."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from .base import Conditioning, Policy, to_unit_range


# FLUX's token layout, written here rather than taken from FluxPipeline's private
# _prepare_latent_image_ids / _pack_latents / _unpack_latents (private names may change in any
# diffusers release); tests/test_flux_packing.py checks them equal to diffusers' on random inputs.

def latent_image_ids(rows: int, cols: int, device=None) -> Tensor:
    """(rows * cols, 3) float32 position ids of the packed tokens, row-major: (0, row, column)."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device)


def pack_latents(latents: Tensor) -> Tensor:
    """VAE latents (B, C, H, W) -> tokens (B, (H/2)(W/2), 4C): each 2x2 patch one token, its
    features channel-major (c, dy, dx)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of pack_latents: tokens (B, (H/2)(W/2), 4C) -> (B, C, H, W), H and W the latent
    (not pixel) height and width."""
    b, _, d = tokens.shape
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


class FluxPolicy(Policy):
    """Latents in model space are FLUX's packed tokens (B, (H/2)(W/2), 4C) of the VAE latent
    (B, C, H, W). The transformer receives timestep int(sigma*1000)/1000 (it scales by 1000
    itself) and the guidance embedding `guidance_scale` (3.5 for FLUX.1-dev); no CFG."""

    family = "flux"
    pipeline_classes = ("FluxPipeline",)
    timestep_scale = 1.0

    def __init__(self, options, sampling, device="cpu"):
        super().__init__(options, sampling, device)
        vae_scale = self.pipe.vae_scale_factor
        if options.height % (vae_scale * 2) or options.width % (vae_scale * 2):
            raise ValueError(f"FLUX needs height and width divisible by {vae_scale * 2}, got "
                             f"{options.height}x{options.width}")
        self.latent_height = 2 * (options.height // (vae_scale * 2))
        self.latent_width = 2 * (options.width // (vae_scale * 2))
        self.latent_channels = self.model.config.in_channels // 4
        self.image_ids = latent_image_ids(self.latent_height // 2, self.latent_width // 2, self.device)
        self.has_guidance = bool(self.model.config.guidance_embeds)

    def latent_shape(self) -> tuple:
        return ((self.latent_height // 2) * (self.latent_width // 2), self.latent_channels * 4)

    def _encode_uncached(self, prompts: List[str]) -> Conditioning:
        prompt_embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=prompts, device=self.device,
                                                           max_sequence_length=self.options.max_sequence_length)
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def _call_model(self, module: nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.model.dtype
        batch = latents.shape[0]
        txt_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=self.device, dtype=dtype)
        guidance = None
        if self.has_guidance:
            guidance = torch.full((batch,), self.sampling.guidance_scale, device=self.device, dtype=torch.float32)
        return module(hidden_states=latents.to(dtype), timestep=timesteps, guidance=guidance,
                      pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
                      encoder_hidden_states=cond["prompt_embeds"].to(dtype), txt_ids=txt_ids,
                      img_ids=self.image_ids.to(dtype), return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        unpacked = unpack_latents(latents, self.latent_height, self.latent_width)
        unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
        return to_unit_range(vae.decode(unpacked.to(vae.dtype), return_dict=False)[0])
