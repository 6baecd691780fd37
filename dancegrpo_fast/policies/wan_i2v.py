"""Wan 2.1 I2V (WanImageToVideoPipeline): Wan's transformer with an input image, two ways. (1) A
condition video: the image followed by black frames, VAE-encoded and normalised, behind a 4-channel
mask of which latent frames are given (the first), concatenated with the noisy latents on the
channels (in_channels = 2 x z_dim + 4: 16 + 4 + 16 for the published models). (2) When the
transformer has an image embedder (`image_dim`), the CLIP vision encoder's penultimate hidden
states, cross-attended next to the text. Both come from the pipeline's own methods
(`prepare_latents`, `encode_image`), once per prompt (image_to_video.ImageToVideo); the steps act
on the noisy latents (z_dim, F', H/8, W/8). CFG with a negative prompt, as Wan T2V.

Wan 2.2's image-to-video pipelines (two expert transformers switched at a boundary timestep, or
per-token timesteps) are not supported: loading one stops with an error."""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
from torch import Tensor, nn

from .base import Conditioning
from .image_to_video import ImageToVideo
from .wan import WanPolicy


class WanI2VPolicy(ImageToVideo, WanPolicy):
    family = "wan_i2v"
    pipeline_classes = ("WanImageToVideoPipeline",)
    modality = "video"
    timestep_scale = 1000.0

    def __init__(self, options, sampling, device="cpu"):
        super().__init__(options, sampling, device)
        pipe = self.pipe
        if getattr(pipe, "transformer_2", None) is not None or pipe.config.get("boundary_ratio") is not None \
                or pipe.config.get("expand_timesteps"):
            raise ValueError(f"{self.model_path!r} is a Wan 2.2 image-to-video pipeline (two expert transformers or "
                             f"per-token timesteps); model_family 'wan_i2v' trains Wan 2.1 I2V")
        z_dim = pipe.vae.config.z_dim
        mask_channels = pipe.vae_scale_factor_temporal
        config = self.model.config
        if config.in_channels != 2 * z_dim + mask_channels or config.out_channels != z_dim:
            raise ValueError(f"{self.model_path!r}: a Wan I2V transformer takes the noisy latents, a {mask_channels}-channel "
                             f"mask and the condition latents ({z_dim} + {mask_channels} + {z_dim} channels) and predicts "
                             f"{z_dim}; its config has in_channels={config.in_channels}, out_channels={config.out_channels}")
        self.uses_image_embeds = config.image_dim is not None
        if self.uses_image_embeds and pipe.image_encoder is None:
            raise ValueError(f"{self.model_path!r}: the transformer has an image embedder (image_dim={config.image_dim}) "
                             f"but the pipeline has no image_encoder")
        self.image_keys = ("image_condition", "image_embeds") if self.uses_image_embeds else ("image_condition",)
        self._shape = (z_dim,) + tuple(self._shape[1:])
        # A prompt's condition latents hold every latent frame ((2 z_dim + 4) x F' x H/8 x W/8: ~5 MB
        # in bf16 at 480x832x81): a smaller cache than the text-only families' 4096 prompts.
        self.embedding_cache_size = 256

    @torch.no_grad()
    def encode_images(self, images: Sequence[Optional[str]]) -> Dict[str, Tensor]:
        """Image files -> {"image_condition": (N, 4 + z_dim, F', H/8, W/8): the mask and the
        condition latents, "image_embeds": (N, tokens, image_dim) when the transformer takes
        them}, by the pipeline's prepare_latents and encode_image. The image is resized to fill
        height x width and centre-cropped (the aspect ratio kept); the CLIP encoder gets the image
        as loaded, as in the pipeline."""
        o, pipe = self.options, self.pipe
        z_dim = pipe.vae.config.z_dim
        meta = self.device.type == "meta"
        conditions, embeds = [], []
        for path in images:
            if meta:
                pixels, image = torch.empty((1, 3, o.height, o.width), device=self.device), None
            else:
                image = self.load_image(path)
                pixels = pipe.video_processor.preprocess(image, height=o.height, width=o.width, resize_mode="crop")
            noise = torch.zeros((1,) + tuple(self.latent_shape()), device=self.device)  # unused: only its shape counts
            _, condition = pipe.prepare_latents(pixels.to(self.device, torch.float32), 1, z_dim, o.height, o.width,
                                                o.num_frames, torch.float32, self.device, None, noise)
            conditions.append(condition)
            if self.uses_image_embeds:
                embeds.append(self._image_embeds(image))
        out = {"image_condition": torch.cat(conditions)}
        if self.uses_image_embeds:
            out["image_embeds"] = torch.cat(embeds)
        return out

    def _image_embeds(self, image) -> Tensor:
        if image is not None:
            return self.pipe.encode_image(image, self.device)
        # The meta device (the plan's dry run): the CLIP encoder on a meta image of its input size.
        size = self.pipe.image_processor.crop_size
        pixels = torch.empty((1, 3, size["height"], size["width"]), device=self.device, dtype=self.pipe.image_encoder.dtype)
        return self.pipe.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]

    def _call_model(self, module: nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.model.dtype
        hidden = torch.cat([latents.to(dtype), cond["image_condition"].to(dtype)], dim=1)
        image_embeds = cond["image_embeds"].to(dtype) if self.uses_image_embeds else None
        return module(hidden_states=hidden, timestep=timesteps, encoder_hidden_states=cond["prompt_embeds"].to(dtype),
                      encoder_hidden_states_image=image_embeds, return_dict=False)[0]
