"""HunyuanVideo T2V (HunyuanVideoTransformer3DModel): latents (C, F', H/8, W/8), a Llama text
encoder with the pipeline's prompt template plus a pooled CLIP, the guidance embedding. With
num_frames 1 it is the paper's HunyuanVideo-T2I: single-frame latents, decoded as images
(B, 3, H, W) that image rewards score directly (preset hunyuan_video_t2i)."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor, nn

from .base import Conditioning, Policy, to_unit_range


class HunyuanVideoPolicy(Policy):
    family = "hunyuan_video"
    pipeline_classes = ("HunyuanVideoPipeline",)
    modality = "video"
    timestep_scale = 1000.0
    masked_attention = True  # its text tokens are padded: key-padding masks in every block

    def __init__(self, options, sampling, device="cpu"):
        super().__init__(options, sampling, device)
        spatial = self.pipe.vae_scale_factor_spatial
        temporal = self.pipe.vae_scale_factor_temporal
        if options.height % spatial or options.width % spatial:
            raise ValueError(f"HunyuanVideo needs height and width divisible by {spatial}, got {options.height}x{options.width}")
        if (options.num_frames - 1) % temporal:
            raise ValueError(f"HunyuanVideo needs num_frames = {temporal} k + 1, got {options.num_frames}")
        # One frame: a text-to-image model (image rewards, image grids), not a one-frame video.
        self.modality = "image" if options.num_frames == 1 else "video"
        self._shape = (self.model.config.in_channels, (options.num_frames - 1) // temporal + 1,
                       options.height // spatial, options.width // spatial)

    def latent_shape(self) -> tuple:
        return self._shape

    def _encode_uncached(self, prompts: List[str]) -> Conditioning:
        embeds, pooled, mask = self.pipe.encode_prompt(prompts, prompt_2=prompts, device=self.device,
                                                       max_sequence_length=self.options.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "prompt_attention_mask": mask}

    def _call_model(self, module: nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.model.dtype
        batch = latents.shape[0]
        guidance = None
        if self.model.config.guidance_embeds:
            guidance = torch.full((batch,), self.sampling.guidance_scale * 1000.0, device=self.device, dtype=dtype)
        return module(hidden_states=latents.to(dtype), timestep=timesteps,
                      encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                      encoder_attention_mask=cond["prompt_attention_mask"],
                      pooled_projections=cond["pooled_prompt_embeds"].to(dtype), guidance=guidance,
                      return_dict=False)[0]

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        video = vae.decode((latents / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
        video = to_unit_range(video).permute(0, 2, 1, 3, 4).contiguous()  # (B, T, 3, H, W)
        return video[:, 0] if self.modality == "image" else video
