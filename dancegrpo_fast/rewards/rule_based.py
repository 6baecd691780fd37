"""Rule-based rewards and reward wrappers: JPEG (in)compressibility, thresholded (binary)
rewards, and frame-averaged image rewards for videos."""

from __future__ import annotations

import io
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .base import Reward, build_reward, register_reward

__all__ = [
    "jpeg_size_kb",
    "JpegCompressibilityReward",
    "JpegIncompressibilityReward",
    "BinaryReward",
    "FrameMeanReward",
    "evenly_spaced_frames",
]


def _to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounding as DDPO does."""
    return (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Encoded JPEG size in kB (1000 bytes) of every image of (B, 3, H, W) in [0, 1] -> (B,) float32."""
    from PIL import Image

    sizes = []
    for array in _to_uint8_hwc(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes, dtype=torch.float32)


@register_reward("jpeg_incompressibility")
class JpegIncompressibilityReward(Reward):
    """DDPO's incompressibility: the JPEG size in kB at quality 95 (larger = more detail)."""

    name = "jpeg_incompressibility"
    sign = 1.0

    def __init__(self, quality: int = 95, batch_size: Optional[int] = None):
        super().__init__(device="cpu", batch_size=batch_size)
        if not 1 <= int(quality) <= 100:
            raise ValueError(f"quality must be in [1, 100], got {quality}")
        self.quality = int(quality)

    def _score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)


@register_reward("jpeg_compressibility")
class JpegCompressibilityReward(JpegIncompressibilityReward):
    """DDPO's compressibility: minus the JPEG size in kB at quality 95 (larger = simpler image)."""

    name = "jpeg_compressibility"
    sign = -1.0


def _resolve_inner(reward: Union[str, Reward], reward_kwargs: Optional[Mapping[str, Any]], what: str) -> Reward:
    if isinstance(reward, Reward):
        if reward_kwargs:
            raise ValueError(f"{what}: reward_kwargs only apply when reward is a registered name")
        return reward
    if isinstance(reward, str):
        return build_reward(reward, **dict(reward_kwargs or {}))
    raise TypeError(f"{what}: reward must be a Reward or a registered reward name, got {type(reward).__name__}")


@register_reward("binary")
class BinaryReward(Reward):
    """1.0 where the wrapped reward's score > threshold, else 0.0 (DanceGRPO's binary-reward runs);
    NaN where the wrapped reward has no finite score.

    reward: a Reward, or the registered name of one built with reward_kwargs."""

    def __init__(self, reward: Union[str, Reward], threshold: float,
                 reward_kwargs: Optional[Mapping[str, Any]] = None):
        self.inner = _resolve_inner(reward, reward_kwargs, "BinaryReward")
        super().__init__(device=self.inner.device, batch_size=None)
        self.threshold = float(threshold)
        self.name = f"binary_{self.inner.name}"
        self.modality = self.inner.modality

    def _binarize(self, scores: torch.Tensor) -> torch.Tensor:
        # A sample the wrapped reward could not score (NaN/inf) stays NaN: turning it into a 0
        # (or a 1 for +inf) would look like a real judgement, and the trainer skips NaN groups.
        binary = (scores > self.threshold).to(torch.float32)
        return torch.where(torch.isfinite(scores), binary, torch.full_like(binary, float("nan")))

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return self._binarize(self.inner(images, prompts))

    def _score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:  # pragma: no cover
        return self(images, prompts)

    @property
    def criteria(self):
        """When the wrapped reward has `criteria(images, prompts)` (per-criterion scores, e.g.
        tiny_geneval): the same criteria with "score" the binary score and "inner_score" the
        wrapped reward's score; None otherwise."""
        inner = getattr(self.inner, "criteria", None)
        if not callable(inner):
            return None

        def criteria(images: torch.Tensor, prompts: Sequence[str]) -> Dict[str, torch.Tensor]:
            parts = dict(inner(images, prompts))
            score = parts["score"]
            parts["inner_score"] = score
            parts["score"] = self._binarize(score)
            return parts

        return criteria

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "threshold": self.threshold, "inner": self.inner.describe()}


def evenly_spaced_frames(num_available: int, num_frames: Optional[int]) -> torch.Tensor:
    """Indices of `num_frames` frames evenly spaced over [0, num_available - 1], first and last
    included (all frames when num_frames is None or >= num_available)."""
    if num_frames is None or num_frames >= num_available:
        return torch.arange(num_available)
    if num_frames == 1:
        return torch.tensor([(num_available - 1) // 2])
    return torch.linspace(0, num_available - 1, num_frames).round().long()


@register_reward("frame_mean")
class FrameMeanReward(Reward):
    """A video reward from an image reward: the mean of the image reward over `num_frames`
    evenly spaced frames (all frames when None), every frame scored against its video's prompt.

    Input videos (B, T, 3, H, W) in [0, 1]; the frames go to the image reward in one batch of
    B * num_frames (set the image reward's batch_size to bound memory)."""

    modality = "video"

    def __init__(self, reward: Union[str, Reward], num_frames: Optional[int] = 8,
                 reward_kwargs: Optional[Mapping[str, Any]] = None):
        self.inner = _resolve_inner(reward, reward_kwargs, "FrameMeanReward")
        if self.inner.modality != "image":
            raise ValueError(f"FrameMeanReward wraps an image reward, got the {self.inner.modality} reward {self.inner.name!r}")
        if num_frames is not None and (not isinstance(num_frames, int) or num_frames < 1):
            raise ValueError(f"num_frames must be a positive int or None, got {num_frames!r}")
        super().__init__(device=self.inner.device, batch_size=None)
        self.num_frames = num_frames
        self.name = f"{self.inner.name}_frame_mean"

    def _score(self, videos: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        batch, length = videos.shape[:2]
        indices = evenly_spaced_frames(length, self.num_frames).to(videos.device)
        frames = videos.index_select(1, indices)  # (B, k, 3, H, W)
        count = frames.shape[1]
        frame_prompts = [prompt for prompt in prompts for _ in range(count)]
        scores = self.inner(frames.reshape(batch * count, *frames.shape[2:]), frame_prompts)
        return scores.view(batch, count).mean(dim=1)

    def describe(self) -> Dict[str, Any]:
        return {**super().describe(), "num_frames": self.num_frames, "inner": self.inner.describe()}
