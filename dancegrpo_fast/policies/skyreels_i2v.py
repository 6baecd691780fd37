"""SkyReels-V1 I2V (HunyuanSkyreelsImageToVideoPipeline): HunyuanVideo's transformer with an input
image. The image's VAE latents fill the first latent frame of a second latent video (zeros after
it), which is concatenated with the noisy latents on the channels: the transformer's in_channels
are twice the VAE's latent channels (16 + 16 for the published model). Text as in HunyuanVideo
(Llama with the prompt template, pooled CLIP); the published model runs true classifier-free
guidance with a negative prompt (cfg_scale 6) and the guidance embedding at 1.

The steps act on the noisy latents only, (C, F', H/8, W/8) with C = out_channels; the image
latents are conditioning, computed once per prompt (with its text embeddings, in the embedding
cache) and shared by every sample of the prompt's group."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..schedules import StepSchedule
from .base import Conditioning, Policy
from .hunyuan_video import HunyuanVideoPolicy

PROMPT_FILE_HINT = ('give a JSON Lines prompt file (*.jsonl) with lines {"prompt": "...", "image": "path"} '
                    '(docs/training.md, "Image-to-video")')


class SkyReelsI2VPolicy(HunyuanVideoPolicy):
    family = "skyreels_i2v"
    pipeline_classes = ("HunyuanSkyreelsImageToVideoPipeline",)
    modality = "video"
    timestep_scale = 1000.0

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

    # --- conditioning ---------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Text embeddings and the image latents (B, C, 1, H/8, W/8) of each prompt's image. Every
        prompt must carry an image (prompts.ImagePrompt), except on the meta device, where the
        plan's dry run encodes a text prompt as if it came with an image of the configured size."""
        prompts = list(prompts)
        if self.device.type != "meta":
            for prompt in prompts:
                if getattr(prompt, "image", None) is None:
                    raise ValueError(f"model_family {self.family!r} generates a video from an input image, but the "
                                     f"prompt {str(prompt)!r} has none: {PROMPT_FILE_HINT}")
        return super().encode(prompts)

    def negative_conditioning(self, batch: int) -> Conditioning:
        """The negative prompt's text only: each sample keeps its own image under guidance."""
        if self._negative is None:
            self._negative = Policy.encode(self, [self.sampling.negative_prompt])
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._negative.items() if k != "image_latents"}

    def _encode_uncached(self, prompts: List[str]) -> Conditioning:
        cond = super()._encode_uncached([str(p) for p in prompts])
        images = [getattr(p, "image", None) for p in prompts]
        if self.device.type == "meta" or all(image is not None for image in images):
            cond["image_latents"] = self.encode_images(images)
        elif any(image is not None for image in images):
            raise ValueError("a batch of prompts mixes prompts with and without an input image")
        # else: text only (the negative prompt of classifier-free guidance)
        return cond

    @torch.no_grad()
    def encode_images(self, images: Sequence[Optional[str]]) -> Tensor:
        """Image files -> (N, C, 1, H/8, W/8) latents, as the pipeline makes them: resized to fill
        height x width and centre-cropped (SkyReels' own resize-crop), the VAE's scaled latents.
        The posterior mean rather than a sample of it: a prompt's conditioning is then the same at
        every encoding (rollout, update, evaluation, after a resume, after a cache eviction)."""
        height, width = self.options.height, self.options.width
        vae = self.pipe.vae
        if self.device.type == "meta":
            pixels = torch.empty((len(images), 3, height, width), device=self.device, dtype=vae.dtype)
        else:
            pixels = torch.cat([self._load_image(path, height, width) for path in images]).to(self.device, vae.dtype)
        posterior = vae.encode(pixels.unsqueeze(2)).latent_dist
        return posterior.mode() * vae.config.scaling_factor

    def _load_image(self, path: str, height: int, width: int) -> Tensor:
        from PIL import Image

        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except Exception as error:
            raise ValueError(f"could not read the input image {path!r}: {type(error).__name__}: {error}") from error
        return self.pipe.video_processor.preprocess(image, height=height, width=width, resize_mode="crop")

    # --- model call -----------------------------------------------------------------------------
    def _call_model(self, module: nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        dtype = self.model.dtype
        image = cond["image_latents"].to(dtype)
        padding = image.new_zeros((image.shape[0], image.shape[1], latents.shape[2] - 1) + tuple(image.shape[3:]))
        hidden = torch.cat([latents.to(dtype), torch.cat([image, padding], dim=2)], dim=1)
        return super()._call_model(module, hidden, timesteps, cond)

    def predict(self, latents: Tensor, step_index: Tensor, cond: Conditioning, schedule: StepSchedule,
                module: Optional[nn.Module] = None) -> Tensor:
        """As Policy.predict; under classifier-free guidance the unconditional half pairs the
        negative prompt with the sample's own image (the pipeline's true CFG)."""
        if not self.uses_cfg:
            return super().predict(latents, step_index, cond, schedule, module)
        module = module if module is not None else self.forward_model
        timesteps = schedule.model_timesteps(step_index, self.device)
        negative = dict(self.negative_conditioning(latents.shape[0]), image_latents=cond["image_latents"])
        both = {k: torch.cat([negative[k], cond[k]]) for k in cond}
        out = self._call_model(module, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both)
        uncond, text = out.chunk(2)
        return uncond + self.sampling.cfg_scale * (text - uncond)
