"""The DDPO baseline's advantages (Black et al., "Training Diffusion Models with Reinforcement
Learning"): per-prompt reward normalisation with a running statistics tracker instead of
DanceGRPO's groups. Selected by `grpo.advantage: ddpo` (docs/training.md, "The DDPO baseline").

DDPO's rule, per reward, for one iteration's batch (the samples of every rank):
- each sample's reward is appended to its prompt's buffer, which keeps the last `buffer_size`
  rewards of that prompt over the iterations so far (a prompt's samples of this batch included);
- a prompt whose buffer holds at least `min_count` rewards is normalised by the buffer's mean and
  population std (ddof 0), otherwise by the mean and population std of the whole batch;
- A = (r - mean) / (std + 1e-6).

The buffers are state carried across iterations: `PerPromptStatTracker.state_dict` goes into the
checkpoint so that a resumed run normalises exactly as the uninterrupted one.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .grpo import check_group_size, combine_advantages

# DDPO's epsilon (added to the std, as in its stat tracker); GRPO's group rule uses 1e-8.
DDPO_EPS = 1e-6


class PerPromptStatTracker:
    """Per-prompt buffers of recent rewards (float64), one tracker per reward.

    update(keys, rewards) -> (advantages, per-prompt mask): keys are the prompts (any hashable,
    normally the prompt text) of the samples, rewards their (N,) rewards; the mask says which
    samples were normalised by their prompt's own buffer (the others by the batch)."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"ddpo_buffer_size must be an integer >= 1, got {buffer_size!r}")
        if isinstance(min_count, bool) or not isinstance(min_count, int) or not 1 <= min_count <= buffer_size:
            raise ValueError(f"ddpo_min_count must be an integer in [1, ddpo_buffer_size={buffer_size}] (a buffer "
                             f"never holds more than ddpo_buffer_size rewards), got {min_count!r}")
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: Dict[str, List[float]] = {}

    def update(self, keys: Sequence[str], rewards: Tensor) -> Tuple[Tensor, Tensor]:
        rewards = torch.as_tensor(rewards).to(torch.float64).flatten()
        if len(keys) != rewards.numel():
            raise ValueError(f"need one prompt per reward, got {len(keys)} prompts and {rewards.numel()} rewards")
        advantages = torch.zeros_like(rewards)
        own = torch.zeros(rewards.numel(), dtype=torch.bool)
        if rewards.numel() == 0:
            return advantages, own
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        rows: Dict[str, List[int]] = {}
        for i, key in enumerate(keys):
            rows.setdefault(key, []).append(i)
        for key, index in rows.items():
            index_t = torch.tensor(index, dtype=torch.int64)
            mine = rewards[index_t]
            # The prompt's samples of this batch go into its buffer first (so they count towards
            # min_count), then the oldest rewards beyond buffer_size drop out.
            buffer = (self.buffers.get(key, []) + mine.tolist())[-self.buffer_size:]
            self.buffers[key] = buffer
            if len(buffer) >= self.min_count:
                stats = torch.tensor(buffer, dtype=torch.float64)
                mean, std = stats.mean(), stats.std(unbiased=False)
                own[index_t] = True
            else:
                mean, std = batch_mean, batch_std
            advantages[index_t] = (mine - mean) / (std + DDPO_EPS)
        return advantages, own

    def state_dict(self) -> Dict:
        """Plain data (what a weights-only checkpoint load accepts)."""
        return {"buffer_size": self.buffer_size, "min_count": self.min_count,
                "buffers": {key: list(values) for key, values in self.buffers.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore the buffers. A run resumed with another buffer_size keeps the newest rewards
        that fit; min_count is the run's current setting."""
        self.buffers = {str(key): [float(v) for v in values][-self.buffer_size:]
                        for key, values in state["buffers"].items()}


class DDPOAdvantages:
    """One tracker per reward (trackers are created as rewards first appear) and the combined
    advantages of an iteration. Calls: `advantages(scores, weights, group_size, sample_keys,
    gather, rank) -> (advantages, valid, per_prompt_fraction)`."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        PerPromptStatTracker(buffer_size, min_count)  # validates the settings up front
        self.buffer_size, self.min_count = buffer_size, min_count
        self.trackers: Dict[str, PerPromptStatTracker] = {}

    def tracker(self, name: str) -> PerPromptStatTracker:
        if name not in self.trackers:
            self.trackers[name] = PerPromptStatTracker(self.buffer_size, self.min_count)
        return self.trackers[name]

    def advantages(self, scores: Mapping[str, Tensor], weights: Mapping[str, float], group_size: int,
                   sample_keys: Sequence[str], gather: Optional[Callable[[Tensor], Tensor]] = None,
                   rank: int = 0) -> Tuple[Tensor, Tensor, float]:
        """scores: {reward: (B,)} of this rank, the group_size samples of a prompt contiguous (as
        the rollout makes them; DDPO itself has no groups, but a group with a NaN/inf score is
        left out as a whole, like in group mode, so the skip counting stays the same).
        sample_keys: the prompt of every sample of every rank, in rank order (B * world size).
        gather: concatenates a (B,) tensor of every rank in rank order (None = one process).
        Every rank updates its trackers with the same gathered batch, so they stay identical.
        Returns this rank's (B,) float32 advantages, its (B,) bool mask of usable samples, and
        the fraction of usable samples (all ranks) normalised by their prompt's own buffer."""
        names = list(scores)
        if not names:
            raise ValueError("DDPO advantages need at least one reward's scores")
        if set(weights) != set(names):
            raise ValueError(f"weights must name the scored rewards {sorted(names)}, got {sorted(weights)}")
        batch = scores[names[0]].shape[0]
        check_group_size(group_size, batch)
        gather = gather or (lambda t: t)
        finite = torch.stack([torch.isfinite(scores[n]) for n in names]).all(dim=0)
        valid = finite.view(-1, group_size).all(dim=1).repeat_interleave(group_size)
        all_valid = gather(valid.to(torch.uint8)).bool().cpu()
        if len(sample_keys) != all_valid.numel():
            raise ValueError(f"need the prompt of every gathered sample: {all_valid.numel()} samples, "
                             f"{len(sample_keys)} prompts")
        keys = [key for key, ok in zip(sample_keys, all_valid.tolist()) if ok]
        per_reward: Dict[str, Tensor] = {}
        own_count = 0
        for name in names:
            filled = torch.where(valid, scores[name], torch.zeros_like(scores[name]))
            gathered = gather(filled).cpu().to(torch.float64)
            full = torch.zeros(all_valid.numel(), dtype=torch.float64)
            adv, own = self.tracker(name).update(keys, gathered[all_valid])
            full[all_valid] = adv
            own_count += int(own.sum())
            mine = full[rank * batch:(rank + 1) * batch].to(torch.float32).to(valid.device)
            per_reward[name] = torch.where(valid, mine, torch.zeros_like(mine))
        usable = int(all_valid.sum())
        fraction = own_count / (usable * len(names)) if usable else 0.0
        return combine_advantages(per_reward, {n: weights[n] for n in names}), valid, fraction

    def state_dict(self) -> Dict:
        return {name: tracker.state_dict() for name, tracker in self.trackers.items()}

    def load_state_dict(self, state: Mapping) -> None:
        for name, tracker_state in state.items():
            self.tracker(str(name)).load_state_dict(tracker_state)
