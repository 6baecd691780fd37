"""Stable Diffusion 1.x (UNet2DConditionModel): DDIM with eta on the scheduler's alphas_cumprod,
classifier-free guidance (default 5.0) in rollout and training."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..schedules import StepSchedule, ddim_schedule
from .base import Conditioning, Policy, to_unit_range


class SDPolicy(Policy):
    family = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)
    model_component = "unet"
    lora_layers_argument = "unet_lora_layers"

    def __init__(self, options, sampling, device="cpu"):
        super().__init__(options, sampling, device)
        scale = self.pipe.vae_scale_factor
        if options.height % scale or options.width % scale:
            raise ValueError(f"SD needs height and width divisible by {scale}, got {options.height}x{options.width}")
        self._shape = (self.model.config.in_channels, options.height // scale, options.width // scale)

    def schedule(self, sde_steps: Optional[Sequence[int]] = None) -> StepSchedule:
        from diffusers import DDIMScheduler

        # The DDIM step of SPEC 1c whatever scheduler the folder ships (SD 1.4 ships PNDM).
        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        c = self.sampling
        return ddim_schedule(scheduler, c.num_steps, c.eta, c.sde_steps() if sde_steps is None else sde_steps)

    def latent_shape(self) -> tuple:
        return self._shape

    def _encode_uncached(self, prompts: List[str]) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        return {"prompt_embeds": embeds}

    def _call_model(self, module: nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.model.dtype
        return module(latents.to(dtype), timesteps, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                      return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        return to_unit_range(vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0])
