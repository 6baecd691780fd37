"""Image preprocessing for reward models, in torch on batched [0, 1] tensors (no PIL round trip).

Two resize modes cover the published preprocessors:

- "crop": resize the SHORTEST side to `size` then center-crop `crop_size` (CLIP's
  CLIPImageProcessor, PickScore; open_clip's default eval transform);
- "pad": resize the LONGEST side to `size` then pad to a square with black (HPSv2's eval
  transform, open_clip `resize_longest_max=True`, its `ResizeMaxSize(fill=0)`).

Resizing is bicubic with antialiasing, which is what PIL's bicubic resize does on downscaling,
then clamped to [0, 1] as a uint8 PIL image would be. Normalisation uses the model's mean/std.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# PIL resample codes as stored in preprocessor_config.json
_PIL_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize + crop/pad + normalise. Call on (B, 3, H, W) float in [0, 1] -> (B, 3, S, S)."""

    size: int
    crop_size: Tuple[int, int]
    mean: Tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: Tuple[float, float, float] = OPENAI_CLIP_STD
    mode: str = "crop"
    interpolation: str = "bicubic"

    def __post_init__(self):
        if self.mode not in ("crop", "pad"):
            raise ValueError(f"mode must be 'crop' or 'pad', got {self.mode!r}")
        if self.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise ValueError(f"interpolation must be bicubic, bilinear or nearest, got {self.interpolation!r}")

    def __call__(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        images = images.float()
        if self.mode == "crop":
            images = _resize_shortest_side(images, self.size, self.interpolation)
            images = _center_crop(images, self.crop_size)
        else:
            images = _resize_longest_side_and_pad(images, self.size, self.interpolation)
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return ((images - mean) / std).to(dtype)

    @classmethod
    def from_hf_config(cls, path: str) -> "ImagePreprocess":
        """Read a transformers `preprocessor_config.json` (CLIPImageProcessor) from a folder."""
        config_file = os.path.join(path, "preprocessor_config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"processor folder {path} lacks preprocessor_config.json")
        try:
            with open(config_file) as handle:
                config = json.load(handle)
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {config_file}: {error}") from error
        return cls.from_hf_dict(config, source=config_file)

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any], source: str = "preprocessor config") -> "ImagePreprocess":
        size = config.get("size", 224)
        if isinstance(size, Mapping):
            if "shortest_edge" in size:
                size = size["shortest_edge"]
            elif "height" in size and "width" in size and size["height"] == size["width"]:
                size = size["height"]
            else:
                raise ValueError(f"{source}: unsupported 'size' {size!r}")
        crop = config.get("crop_size", size)
        if isinstance(crop, Mapping):
            crop = (int(crop["height"]), int(crop["width"]))
        else:
            crop = (int(crop), int(crop))
        if not config.get("do_center_crop", True):
            crop = (int(size), int(size))
        mean = tuple(config.get("image_mean", OPENAI_CLIP_MEAN)) if config.get("do_normalize", True) else (0.0,) * 3
        std = tuple(config.get("image_std", OPENAI_CLIP_STD)) if config.get("do_normalize", True) else (1.0,) * 3
        interpolation = _PIL_RESAMPLE.get(int(config.get("resample", 3)), "bicubic")
        return cls(size=int(size), crop_size=crop, mean=mean, std=std, mode="crop", interpolation=interpolation)


def _interpolate(images: torch.Tensor, size: Sequence[int], interpolation: str) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    if interpolation == "nearest":
        return F.interpolate(images, size=tuple(size), mode="nearest")
    resized = F.interpolate(images, size=tuple(size), mode=interpolation, align_corners=False, antialias=True)
    return resized.clamp_(0.0, 1.0)


def _resize_shortest_side(images: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    height, width = images.shape[-2:]
    short, long = (height, width) if height <= width else (width, height)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if height <= width else (new_long, new_short)
    return _interpolate(images, new_size, interpolation)


def _center_crop(images: torch.Tensor, crop_size: Tuple[int, int]) -> torch.Tensor:
    crop_height, crop_width = crop_size
    height, width = images.shape[-2:]
    if crop_height > height or crop_width > width:
        pad_h, pad_w = max(crop_height - height, 0), max(crop_width - width, 0)
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        height, width = images.shape[-2:]
    top = int(round((height - crop_height) / 2.0))
    left = int(round((width - crop_width) / 2.0))
    return images[..., top : top + crop_height, left : left + crop_width]


def _resize_longest_side_and_pad(images: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    height, width = images.shape[-2:]
    scale = size / float(max(height, width))
    if scale == 1.0 and height == width:
        return images
    new_height, new_width = round(height * scale), round(width * scale)
    images = _interpolate(images, (new_height, new_width), interpolation)
    pad_h, pad_w = size - new_height, size - new_width
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)
