"""Stable Diffusion 3 / 3.5 (SD3Transformer2DModel): rectified flow on (C, H/8, W/8) latents."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from .base import Conditioning, Policy, to_unit_range


class SD3Policy(Policy):
    """Three text encoders (two CLIPs, one T5) through the pipeline's own encode_prompt; the
    transformer receives timestep int(sigma*1000)/1000 * 1000."""

    family = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    timestep_scale = 1000.0

    def __init__(self, options, sampling, device="cpu"):
        super().__init__(options, sampling, device)
        scale = self.pipe.vae_scale_factor
        patch = self.model.config.patch_size
        if options.height % (scale * patch) or options.width % (scale * patch):
            raise ValueError(f"SD3 needs height and width divisible by {scale * patch}, got {options.height}x{options.width}")
        self._shape = (self.model.config.in_channels, options.height // scale, options.width // scale)

    def latent_shape(self) -> tuple:
        return self._shape

    def _encode_uncached(self, prompts: List[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, prompt_2=prompts, prompt_3=prompts, device=self.device,
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.options.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _call_model(self, module: nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.model.dtype
        return module(hidden_states=latents.to(dtype), timestep=timesteps,
                      encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                      pooled_projections=cond["pooled_prompt_embeds"].to(dtype), return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        return to_unit_range(vae.decode(latents.to(vae.dtype), return_dict=False)[0])
