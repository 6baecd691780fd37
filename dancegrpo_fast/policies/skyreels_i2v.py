"""SkyReels-V1 I2V (HunyuanSkyreelsImageToVideoPipeline): HunyuanVideo's transformer with an input
image. The image's VAE latents fill the first latent frame of a second latent video (zeros after
it), which is concatenated with the noisy latents on the channels: the transformer's in_channels
are twice the VAE's latent channels (16 + 16 for the published model). Text as in HunyuanVideo
(Llama with the prompt template, pooled CLIP); the published model runs true classifier-free
guidance with a negative prompt (cfg_scale 6) and the guidance embedding at 1.

The steps act on the noisy latents only, (C, F', H/8, W/8) with C = out_channels; the image
latents are conditioning (image_to_video.ImageToVideo: once per prompt, shared by its group)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import Conditioning
from .hunyuan_video import HunyuanVideoPolicy
from .image_to_video import ImageToVideo


class SkyReelsI2VPolicy(ImageToVideo, HunyuanVideoPolicy):
    family = "skyreels_i2v"
    pipeline_classes = ("HunyuanSkyreelsImageToVideoPipeline",)
    modality = "video"
    timestep_scale = 1000.0
    image_keys = ("image_latents",)

    def __init__(self, options, sampling, device="cpu"):
        super().__init__(options, sampling, device)
        config = self.model.config
        latent_channels = self.pipe.vae.config.latent_channels
        if config.in_channels != 2 * latent_channels or config.out_channels != latent_channels:
            raise ValueError(f"{self.model_path!r}: a SkyReels I2V transformer takes the noisy latents and the image "
                             f"latents ({latent_channels} + {latent_channels} channels) and predicts "
                             f"{latent_channels}; its config has in_channels={config.in_channels}, "
                             f"out_channels={config.out_channels}")
        self._shape = (latent_channels,) + tuple(self._shape[1:])

    @torch.no_grad()
    def encode_images(self, images: Sequence[Optional[str]]) -> Dict[str, Tensor]:
        """Image files -> {"image_latents": (N, C, 1, H/8, W/8)}, as the pipeline makes them:
        resized to fill height x width and centre-cropped (SkyReels' own resize-crop), the VAE's
        scaled latents. The posterior mean rather than a sample of it: a prompt's conditioning is
        then the same at every encoding (rollout, update, evaluation, after a resume, after a
        cache eviction)."""
        height, width = self.options.height, self.options.width
        vae = self.pipe.vae
        if self.device.type == "meta":
            pixels = torch.empty((len(images), 3, height, width), device=self.device, dtype=vae.dtype)
        else:
            pixels = torch.cat([self.pipe.video_processor.preprocess(self.load_image(path), height=height, width=width,
                                                                     resize_mode="crop")
                                for path in images]).to(self.device, vae.dtype)
        posterior = vae.encode(pixels.unsqueeze(2)).latent_dist
        return {"image_latents": posterior.mode() * vae.config.scaling_factor}

    def _call_model(self, module: nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.model.dtype
        image = cond["image_latents"].to(dtype)
        padding = image.new_zeros((image.shape[0], image.shape[1], latents.shape[2] - 1) + tuple(image.shape[3:]))
        hidden = torch.cat([latents.to(dtype), torch.cat([image, padding], dim=2)], dim=1)
        return super()._call_model(module, hidden, timesteps, cond)
