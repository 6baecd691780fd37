"""The reward interface, input validation and the registry of rewards by name.

A reward maps a batch of images (or videos) and their prompts to one float score per sample:

    images  (B, 3, H, W) float in [0, 1]      (the decoded VAE output after (x + 1) / 2 and clamp)
    videos  (B, T, 3, H, W) float in [0, 1]
    prompts list of B strings, prompts[i] belongs to images[i]
    ->      scores (B,) float32 on the CPU (NaN where a sample cannot be scored)

Every reward validates its inputs the same way, splits the batch into chunks of `batch_size` and
moves the chunks to its device; a subclass only implements `_score` on one valid chunk.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch

__all__ = [
    "Reward",
    "RewardInputError",
    "validate_inputs",
    "validate_layout",
    "register_reward",
    "build_reward",
    "available_rewards",
    "reward_factory",
    "import_reward_modules",
]

# Decoded VAE output is clamped to [0, 1], but a resize or a half-precision round trip on the way
# may overshoot by a hair; beyond this it is a bug upstream (e.g. images still in [-1, 1]).
RANGE_TOLERANCE = 1e-3


class RewardInputError(ValueError):
    """Bad images or prompts given to a reward (wrong rank, shape, count, range, NaN)."""


def validate_layout(shape: Sequence[int], prompts: Any, modality: str = "image") -> None:
    """Check the shape of a reward's images and their prompts, without looking at the values
    (the reward server checks requests this way before it converts them to float).

    modality "image" expects (B, 3, H, W); "video" (B, T, 3, H, W) with T >= 1; H and W >= 1
    when B >= 1; `prompts` a list of B strings (None skips the prompt checks). Raises
    `RewardInputError` (or TypeError) naming the bad argument.
    """
    shape = tuple(int(n) for n in shape)
    if modality == "image":
        if len(shape) != 4 or shape[1] != 3:
            hint = ""
            if len(shape) == 5:
                hint = " (this is a video batch: wrap the image reward in FrameMeanReward)"
            raise RewardInputError(f"images must have shape (B, 3, H, W), got {shape}{hint}")
    elif modality == "video":
        if len(shape) != 5 or shape[2] != 3:
            raise RewardInputError(f"videos must have shape (B, T, 3, H, W), got images of shape {shape}")
        if shape[1] == 0:
            raise RewardInputError("videos must have at least one frame (T >= 1), got T = 0")
    else:
        raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
    # An empty side gives every model reward a division by zero or an empty resize deep inside;
    # it is the caller's input that is wrong, so say so here.
    if shape[0] > 0 and (shape[-2] < 1 or shape[-1] < 1):
        raise RewardInputError(f"images must have H >= 1 and W >= 1, got shape {shape}")
    if prompts is not None:
        if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
        if len(prompts) != shape[0]:
            raise RewardInputError(
                f"len(prompts) must equal the batch size B = images.shape[0] = {shape[0]}, "
                f"got {len(prompts)} prompts"
            )
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompts[{index}] must be a str, got {type(prompt).__name__}")


def validate_inputs(images: Any, prompts: Any, modality: str = "image") -> None:
    """Check a reward's inputs; raise `RewardInputError` (or TypeError) naming the bad argument.

    modality "image" expects images (B, 3, H, W); "video" expects (B, T, 3, H, W); both float with
    values in [0, 1] (up to a 1e-3 tolerance), no NaN/Inf, H and W >= 1, and `prompts` a list of B
    strings (None skips the prompt checks).
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(
            f"images must be a floating-point tensor with values in [0, 1], got dtype {images.dtype}"
        )
    validate_layout(images.shape, prompts, modality)
    if images.numel() == 0:
        return
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise RewardInputError(f"images contain {bad} NaN/Inf values")
    low, high = float(images.min()), float(images.max())
    if low < -RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise RewardInputError(
            f"images must have values in [0, 1] (decoded VAE output after (x + 1) / 2 and clamp), "
            f"got min {low:.4g} and max {high:.4g}"
        )


class Reward(abc.ABC):
    """A batched reward: `reward(images, prompts) -> scores (B,) float32 on the CPU`.

    Subclasses set `name` and `modality` ("image" or "video") and implement `_score(images,
    prompts)`, which receives one chunk of at most `batch_size` samples, already validated,
    clamped to [0, 1] and moved to `self.device`, and returns a (b,) tensor. `__call__` is the
    public entry point and is the same for every reward: validate, chunk, score, concatenate.

    Calls run under `torch.no_grad()`: rewards are not differentiated in GRPO.
    """

    name: str = "reward"
    modality: str = "image"

    def __init__(self, device: Union[str, torch.device, None] = "cpu", batch_size: Optional[int] = None):
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self.device = torch.device(device if device is not None else "cpu")
        self.batch_size = batch_size

    @abc.abstractmethod
    def _score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score one valid chunk: images on `self.device` in [0, 1] -> (b,) tensor."""

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Score a batch. images (B, 3, H, W) or, for video rewards, (B, T, 3, H, W), float in
        [0, 1]; prompts: B strings. Returns (B,) float32 on the CPU; a sample the reward cannot
        score may be NaN (or +-inf)."""
        validate_inputs(images, prompts, self.modality)
        prompts = list(prompts)
        batch = images.shape[0]
        if batch == 0:
            return torch.zeros(0, dtype=torch.float32)
        images = images.clamp(0.0, 1.0)
        chunk = self.batch_size or batch
        outputs = []
        with torch.no_grad():
            for start in range(0, batch, chunk):
                part = images[start : start + chunk].to(self.device, non_blocking=True)
                scores = self._score(part, prompts[start : start + chunk])
                scores = torch.as_tensor(scores).detach().reshape(-1)
                if scores.shape[0] != part.shape[0]:
                    raise RuntimeError(
                        f"reward {self.name!r} returned {scores.shape[0]} scores for "
                        f"{part.shape[0]} samples"
                    )
                outputs.append(scores.to(device="cpu", dtype=torch.float32))
        # NaN or +-inf scores are returned as they are: a judge that cannot score one sample
        # should not throw away the batch. The trainer skips the groups that hold them (and
        # stops when too many do: TrainConfig.max_skipped_group_fraction).
        return torch.cat(outputs)

    def describe(self) -> Dict[str, Any]:
        """A small JSON-able description (used by the reward server's health endpoint)."""
        return {
            "name": self.name,
            "modality": self.modality,
            "device": str(self.device),
            "batch_size": self.batch_size,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={str(self.device)!r}, batch_size={self.batch_size})"


# ----------------------------------------------------------------------------------------------
# Registry

RewardFactory = Callable[..., Reward]
_REGISTRY: Dict[str, RewardFactory] = {}


def register_reward(name: str) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator: register a Reward subclass (or a factory returning a Reward) under `name`.

        @register_reward("my_reward")
        class MyReward(Reward): ...

    After that `build_reward("my_reward", **kwargs)` calls `MyReward(**kwargs)`.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty str, got {name!r}")

    def decorator(factory: RewardFactory) -> RewardFactory:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(f"a reward is already registered as {name!r}: {existing!r}")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available_rewards() -> list:
    """Sorted names of the registered rewards."""
    return sorted(_REGISTRY)


def reward_factory(name: str) -> Optional[RewardFactory]:
    """The factory registered as `name`, or None."""
    return _REGISTRY.get(name)


def import_reward_modules(modules: Sequence[str]) -> None:
    """Import modules that register rewards (a task's own reward module, named in its config:
    the registry never imports a task itself). A module that does not import is a one-line
    error naming it."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise ValueError(f"reward_modules: could not import {module!r} ({type(error).__name__}: {error}); "
                             f"give an importable module that registers rewards with register_reward") from None


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Build the reward registered as `name` with keyword arguments `kwargs`."""
    if name not in _REGISTRY:
        raise KeyError(
            f"unknown reward {name!r}; available rewards: {', '.join(available_rewards())}"
        )
    reward = _REGISTRY[name](**kwargs)
    if not isinstance(reward, Reward):
        raise TypeError(f"the factory registered as {name!r} returned {type(reward).__name__}, not a Reward")
    return reward
