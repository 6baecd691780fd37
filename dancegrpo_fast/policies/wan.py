"""Wan 2.1 T2V (WanTransformer3DModel): UMT5 text encoder, latents (C, F', H/8, W/8) normalised by
the VAE's latents_mean / latents_std; classifier-free guidance with a negative prompt."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from .base import Conditioning, Policy, to_unit_range


class WanPolicy(Policy):
    family = "wan"
    pipeline_classes = ("WanPipeline",)
    modality = "video"
    timestep_scale = 1000.0

    def __init__(self, options, sampling, device="cpu"):
        super().__init__(options, sampling, device)
        spatial = self.pipe.vae_scale_factor_spatial
        temporal = self.pipe.vae_scale_factor_temporal
        patch = self.model.config.patch_size
        if options.height % (spatial * patch[1]) or options.width % (spatial * patch[2]):
            raise ValueError(f"Wan needs height and width divisible by {spatial * patch[1]}, got {options.height}x{options.width}")
        if (options.num_frames - 1) % temporal:
            raise ValueError(f"Wan needs num_frames = {temporal} k + 1, got {options.num_frames}")
        self._shape = (self.model.config.in_channels, (options.num_frames - 1) // temporal + 1,
                       options.height // spatial, options.width // spatial)

    def latent_shape(self) -> tuple:
        return self._shape

    def _encode_uncached(self, prompts: List[str]) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=self.device,
                                            max_sequence_length=self.options.max_sequence_length)
        return {"prompt_embeds": embeds}

    def _call_model(self, module: nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.model.dtype
        return module(hidden_states=latents.to(dtype), timestep=timesteps,
                      encoder_hidden_states=cond["prompt_embeds"].to(dtype), return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        z_dim = vae.config.z_dim
        mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, torch.float32)
        std = torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(latents.device, torch.float32)
        latents = latents.float() * std + mean
        video = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return to_unit_range(video).permute(0, 2, 1, 3, 4).contiguous()  # (B, T, 3, H, W)
