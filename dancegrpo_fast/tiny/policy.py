"""The built-in tiny text-to-image flow (dancegrpo_fast.tiny): a small FluxTransformer2DModel over
the latents of a small AutoencoderKL, for 32x32 images, with its own word-level text encoder,
served like FLUX.

Model space: the VAE's 8x8x4 latents, scaled and shifted, packed in 2x2 patches as FLUX packs
its latents: (B, 16, 16); `decode` runs the VAE decoder (a weights folder without a vae/ is a
pixel-space model: packed pixel patches of x0 = 2 * image - 1). The transformer receives int(sigma * 1000) / 1000 (it scales by 1000 itself), no guidance embedding;
classifier-free guidance works (the model was pretrained with 10% empty prompts) but is off by
default. An empty model_path loads the weights shipped in the package (dancegrpo_fast/tiny/weights).
"""
from __future__ import annotations

import dataclasses
from typing import List

import torch
from torch import Tensor, nn

from ..policies.base import Conditioning, ModelLoadError, Policy
from . import WEIGHTS_DIR
from .model import TinyFlowPipeline


class TinyPolicy(Policy):
    family = "tiny"
    pipeline_classes = ("TinyFlowPipeline",)
    timestep_scale = 1.0

    def __init__(self, options, sampling, device="cpu"):
        if not options.path:
            options = dataclasses.replace(options, path=str(WEIGHTS_DIR))
        super().__init__(options, sampling, device)
        size = self.pipe.image_size
        if (options.height, options.width) != (size, size):
            raise ValueError(f"the tiny model generates {size}x{size} images: set height={size} and width={size} "
                             f"(got {options.height}x{options.width})")

    def _load_pipeline(self):
        if self.device.type == "meta":
            return self._build_on_meta(TinyFlowPipeline)
        try:
            return TinyFlowPipeline.from_pretrained(self.model_path, torch_dtype=self.dtype)
        except Exception as error:
            raise ModelLoadError(f"could not load the tiny model from {self.model_path!r}: "
                                 f"{type(error).__name__}: {error}") from error

    def latent_shape(self) -> tuple:
        return tuple(self.pipe.latent_shape)

    def _encode_uncached(self, prompts: List[str]) -> Conditioning:
        return self.pipe.encode_prompt(prompts)

    def _call_model(self, module: nn.Module, latents: Tensor, timesteps: Tensor, cond: Conditioning) -> Tensor:
        return self.pipe.velocity(module, latents, timesteps, cond)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        return self.pipe.latents_to_images(latents)

    def save_lora(self, folder, state_dict) -> None:
        """FLUX's LoRA file format (pytorch_lora_weights.safetensors, "transformer." keys)."""
        from diffusers import FluxPipeline

        FluxPipeline.save_lora_weights(str(folder), transformer_lora_layers=state_dict)
