"""What the image-to-video policies share: every prompt carries an input image
(prompts.ImagePrompt); the image's conditioning is encoded with the prompt's text, once per
prompt, and kept with it in the embedding cache, so every sample of a prompt's group sees the same
image; under classifier-free guidance the unconditional half pairs the negative prompt's text with
the sample's own image (the pipelines' CFG).

A family mixes `ImageToVideo` in before its text-to-video policy and implements
`encode_images(paths) -> {key: (N, ...)}`, naming the keys in `image_keys`, and the model call."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..schedules import StepSchedule
from .base import Conditioning, Policy

PROMPT_FILE_HINT = ('give a JSON Lines prompt file (*.jsonl) with lines {"prompt": "...", "image": "path"} '
                    '(docs/training.md, "Image-to-video")')


class ImageToVideo:
    """Mixin for a Policy subclass: image conditioning next to the text conditioning."""

    image_keys: Sequence[str] = ()

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> Conditioning:
        """Text and image conditioning of each prompt. Every prompt must carry an image, except on
        the meta device, where the plan's dry run encodes a text prompt as if it came with an image
        of the configured size."""
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
        return {k: v.expand(batch, *v.shape[1:]) for k, v in self._negative.items() if k not in self.image_keys}

    def _encode_uncached(self, prompts: List[str]) -> Conditioning:
        cond = super()._encode_uncached([str(p) for p in prompts])
        images = [getattr(p, "image", None) for p in prompts]
        if self.device.type == "meta" or all(image is not None for image in images):
            cond.update(self.encode_images(images))
        elif any(image is not None for image in images):
            raise ValueError("a batch of prompts mixes prompts with and without an input image")
        # else: text only (the negative prompt of classifier-free guidance)
        return cond

    def encode_images(self, images: Sequence[Optional[str]]) -> Dict[str, Tensor]:
        """Image files (None on the meta device) -> {key in image_keys: (N, ...)}."""
        raise NotImplementedError

    @staticmethod
    def load_image(path: str):
        """The image file as an RGB PIL image; an unreadable file stops with its path."""
        from PIL import Image

        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except Exception as error:
            raise ValueError(f"could not read the input image {path!r}: {type(error).__name__}: {error}") from error

    def predict(self, latents: Tensor, step_index: Tensor, cond: Conditioning, schedule: StepSchedule,
                module: Optional[nn.Module] = None) -> Tensor:
        """As Policy.predict; under classifier-free guidance the unconditional half pairs the
        negative prompt with the sample's own image."""
        if not self.uses_cfg:
            return super().predict(latents, step_index, cond, schedule, module)
        module = module if module is not None else self.forward_model
        timesteps = schedule.model_timesteps(step_index, self.device)
        negative = dict(self.negative_conditioning(latents.shape[0]), **{k: cond[k] for k in self.image_keys})
        both = {k: torch.cat([negative[k], cond[k]]) for k in cond}
        out = self._call_model(module, torch.cat([latents, latents]), torch.cat([timesteps, timesteps]), both)
        uncond, text = out.chunk(2)
        return uncond + self.sampling.cfg_scale * (text - uncond)
