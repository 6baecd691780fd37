"""A run's rewards as one object: named reward callables with weights, scored together.

    rewards = RewardSet.from_specs("hps:1.0,clip:0.5", device="cuda")
    rewards = RewardSet.from_specs([{"name": "hps", "weight": 1.0, "kwargs": {"checkpoint_path": ...}},
                                    {"name": "hps_binary", "type": "binary", "weight": 0.0,
                                     "kwargs": {"reward": "hps", "threshold": 0.28}}])
    rewards = RewardSet.of({"brightness": (my_function, 1.0)})     # callables you already have
    scores = rewards(images, prompts)                # {name: (B,) float32 CPU}
    scores = rewards(images, prompts, criteria=True) # + "<name>/<criterion>" for rewards that have
                                                     #   a criteria(images, prompts) method

The trainer, the held-out evaluation and the tiny task all score through this class. GRPO turns
each reward's scores into its own advantages and sums them with `weights` (grpo.compute_advantages:
a weighted sum of advantages, not of raw scores). A weight of 0 keeps a reward for logging only.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Sequence, Union

import torch
from torch import Tensor

from ..config import parse_rewards
from .base import build_reward, import_reward_modules, reward_factory

RewardFunction = Callable[[Tensor, List[str]], Tensor]


class RewardError(RuntimeError):
    """A reward raised or returned the wrong number of scores; the message names the reward."""


@dataclass
class RewardEntry:
    name: str
    function: RewardFunction
    weight: float = 1.0


class RewardSet:
    """Named rewards with weights (see the module docstring)."""

    def __init__(self, entries: Iterable[RewardEntry]):
        self.entries: List[RewardEntry] = list(entries)
        if not self.entries:
            raise ValueError("no reward configured: pass --rewards name:weight[,name:weight] (or a rewards list in YAML)")
        names = [entry.name for entry in self.entries]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"rewards: each name may appear once, {repeated} appear more than once")
        for entry in self.entries:
            if not callable(entry.function):
                raise TypeError(f"reward {entry.name!r} must be callable, got {type(entry.function).__name__}")
            if isinstance(entry.weight, bool) or not isinstance(entry.weight, (int, float)) or not math.isfinite(entry.weight):
                raise ValueError(f"the weight of reward {entry.name!r} must be a finite number, got {entry.weight!r}")

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_specs(cls, specs, modules: Sequence[str] = (), device: Union[str, torch.device] = "cpu") -> "RewardSet":
        """Build registered rewards. specs: "name:weight,..." or a list of RewardSpec /
        {name, weight, kwargs, type} (type: the registered reward to build, the name by default).
        modules: imported first (they register a task's own rewards). A reward whose factory
        takes `device` gets this one unless its kwargs say otherwise."""
        import_reward_modules(modules)
        entries = []
        for spec in parse_rewards(specs):
            kind = spec.type or spec.name
            kwargs = dict(spec.kwargs)
            factory = reward_factory(kind)
            if factory is not None and "device" in inspect.signature(factory).parameters:
                kwargs.setdefault("device", str(device))
            try:
                function = build_reward(kind, **kwargs)
            except KeyError as error:
                raise ValueError(f"rewards: {error.args[0]} (a reward of your own is registered with "
                                 f"dancegrpo_fast.rewards.register_reward in a module named in reward_modules)") from None
            entries.append(RewardEntry(spec.name, function, float(spec.weight)))
        return cls(entries)

    @classmethod
    def of(cls, rewards: Union["RewardSet", Mapping[str, Any], Sequence[RewardEntry]]) -> "RewardSet":
        """A RewardSet from one (returned as is), a list of RewardEntry, or {name: callable} /
        {name: (callable, weight)}."""
        if isinstance(rewards, RewardSet):
            return rewards
        if isinstance(rewards, Mapping):
            return cls(RewardEntry(name, *(value if isinstance(value, tuple) else (value, 1.0)))
                       for name, value in rewards.items())
        return cls(rewards)

    # --- use ----------------------------------------------------------------------------------
    @property
    def names(self) -> List[str]:
        return [entry.name for entry in self.entries]

    @property
    def weights(self) -> Dict[str, float]:
        return {entry.name: float(entry.weight) for entry in self.entries}

    def describe(self) -> List[str]:
        """["name:weight", ...] for people; a reward that runs on one of several models (HPS:
        open_clip or builtin) adds which one, e.g. "hps:1 (open_clip)"."""
        described = []
        for entry in self.entries:
            function = entry.function
            while getattr(function, "backend", None) is None and getattr(function, "inner", None) is not None:
                function = function.inner  # a wrapper (frame_mean, binary): the reward it wraps
            backend = getattr(function, "backend", None)
            described.append(f"{entry.name}:{entry.weight:g}" + (f" ({backend})" if isinstance(backend, str) else ""))
        return described

    def __call__(self, images: Tensor, prompts: Sequence[str], criteria: bool = False) -> Dict[str, Tensor]:
        """{name: (B,) float32 CPU}. A reward that raises becomes a RewardError naming it.

        criteria: also, for every reward with a `criteria(images, prompts)` method (e.g. the tiny
        task's tiny_geneval), its per-criterion scores as "<name>/<criterion>" keys (for logging:
        the "<name>" entry is always the reward's own call, what the advantages use)."""
        prompts = list(prompts)
        batch = images.shape[0]
        scores = {}
        for entry in self.entries:
            scores[entry.name] = _as_scores(self._call(entry, entry.function, images, prompts, "on"), entry.name, batch)
            method = getattr(entry.function, "criteria", None) if criteria else None
            if callable(method):
                parts = self._call(entry, method, images, prompts, "computing its criteria on")
                for criterion, part in parts.items():
                    scores[f"{entry.name}/{criterion}"] = _as_scores(part, entry.name, batch)
        return scores

    @staticmethod
    def _call(entry: RewardEntry, function, images: Tensor, prompts: List[str], doing: str):
        try:
            return function(images, prompts)
        except Exception as error:
            raise RewardError(f"reward {entry.name!r} failed {doing} a batch of {images.shape[0]} samples: "
                              f"{type(error).__name__}: {error}") from error

    def __repr__(self) -> str:
        return f"RewardSet({', '.join(self.describe())})"


def _as_scores(value, name: str, batch: int) -> Tensor:
    value = torch.as_tensor(value).detach().to(torch.float32).cpu().reshape(-1)
    if value.shape[0] != batch:
        raise RewardError(f"reward {name!r} returned {value.shape[0]} scores for {batch} samples")
    return value


__all__ = ["RewardSet", "RewardEntry", "RewardError"]
