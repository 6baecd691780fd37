"""Held-out evaluation: fixed prompts, fixed noise, the training rewards.

`sample_fixed` draws one sample per entry of a prompt list with the rollout's sampler (the
policy's schedule: SDE steps with per-sample seeded noise, ODE steps outside an SDE window),
entry k starting from the initial noise of seed `mix_seed(seed, k, 1)` with step noise seeded
by `mix_seed(seed, k, 2)`. The same (prompts, seed) therefore give the same noise at every
evaluation, at any batch size and on any number of ranks: curves compare models, not noise.

`evaluate_policy` splits the (prompt, sample) entries over the ranks, samples, scores them with
every reward (and per criterion when a reward has `criteria(images, prompts)`, like the tiny
task's tiny_geneval), and reduces the means over the ranks, so every rank gets the same metrics:

    eval/<reward>/mean            mean score (finite scores only)
    eval/<reward>/<criterion>     per-criterion means, NaN-aware (rewards with `criteria` only)
    eval/<reward>/fully_correct   fraction of samples whose criteria score is > 0.99 (idem; for a
                                  binary wrapper its "inner_score", the wrapped reward's score)
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops
from .distributed import DistributedState, all_reduce_sum
from .noise import grouped_noise
from .rollout import autocast_context, mix_seed

FULLY_CORRECT_THRESHOLD = 0.99


@torch.no_grad()
def sample_fixed(policy, schedule, prompts: Sequence[str], seed: int, batch_size: int,
                 mixed_precision: str = "no", indices: Optional[Sequence[int]] = None) -> Tensor:
    """One sample per entry of `prompts`, decoded with `policy.decode`: images (B, 3, H, W) (or
    videos) float32 in [0, 1], on the policy's device.

    Entry k (its position in `prompts`, or `indices[k]` when given: the entry's number in a
    larger list split over ranks) starts from `grouped_noise` of seed `mix_seed(seed, k, 1)` and
    draws its step noise from `mix_seed(seed, k, 2)` through `ops.sde_step`, exactly as the
    rollout does (model in eval mode, the rollout's autocast; ODE steps draw no noise)."""
    prompts = list(prompts)
    indices = list(range(len(prompts))) if indices is None else [int(k) for k in indices]
    if len(indices) != len(prompts):
        raise ValueError(f"indices has {len(indices)} entries for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    device = policy.device
    shape = tuple(policy.latent_shape())
    images = []
    was_training = policy.model.training
    policy.model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            ids = indices[start:start + batch_size]
            noise_seeds = torch.tensor([mix_seed(seed, k, 1) for k in ids], dtype=torch.int64)
            step_seeds = torch.tensor([mix_seed(seed, k, 2) for k in ids], dtype=torch.int64)
            x = grouped_noise(noise_seeds, 1, shape, torch.float32, device)
            cond = policy.encode(chunk)
            for i in range(schedule.num_steps):
                step = torch.full((len(chunk),), i, dtype=torch.int64)
                with autocast_context(device, mixed_precision):
                    v = policy.predict(x, step, cond, schedule)
                x = ops.sde_step(v, x, schedule.coefficients(step, device), seeds=step_seeds,
                                 step_index=i).prev_sample
            images.append(policy.decode(x))
    finally:
        policy.model.train(was_training)
    if not images:
        return torch.zeros((0, 3, 0, 0))
    return torch.cat(images)


def _reward_entries(rewards) -> List[Tuple[str, object]]:
    """[(name, callable)] from RewardEntry objects, {name: callable} or {name: (callable, weight)}."""
    if isinstance(rewards, dict):
        return [(name, value[0] if isinstance(value, tuple) else value) for name, value in rewards.items()]
    return [(entry.name, entry.function) for entry in rewards]


def eval_entries(prompts: Sequence[str], samples_per_prompt: int) -> List[str]:
    """The evaluated (prompt, sample) list: each prompt repeated samples_per_prompt times, in
    order; entry k = prompt k // samples_per_prompt."""
    return [p for p in prompts for _ in range(samples_per_prompt)]


def rank_entries(total: int, state: DistributedState) -> List[int]:
    """Global entry numbers of this rank: rank r takes r, r + W, r + 2W, ..."""
    return list(range(state.rank, total, state.world_size))


@torch.no_grad()
def evaluate_policy(policy, schedule, prompts: Sequence[str], rewards, samples_per_prompt: int = 1, seed: int = 0,
                    batch_size: int = 16, mixed_precision: str = "no", state: Optional[DistributedState] = None,
                    return_details: bool = False):
    """Sample `samples_per_prompt` fixed-noise samples of every prompt and score them.

    rewards: RewardEntry objects (name, function), {name: callable} or {name: (callable, weight)}.
    Rank r samples the entries r::world_size; every rank runs the same number of model calls
    (a short share is padded with a repeat whose result is dropped: DDP/FSDP forwards are
    collectives). Returns (metrics, images): metrics identical on every rank (module docstring),
    images this rank's samples in entry order on the CPU. With return_details, a third value
    {"indices": (n,) global entry numbers, "prompts": their prompts, "scores": {name or
    name/criterion: (n,)}} for this rank's entries.
    """
    from .train import RewardEntry, score_rewards  # the trainer's scoring (errors name the reward)

    state = state or DistributedState()
    entries = _reward_entries(rewards)
    if not entries:
        raise ValueError("evaluate_policy needs at least one reward")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt!r}")
    all_prompts = eval_entries(prompts, samples_per_prompt)
    if not all_prompts:
        raise ValueError("evaluate_policy needs at least one prompt")
    mine = rank_entries(len(all_prompts), state)
    per_rank = math.ceil(len(all_prompts) / state.world_size)
    padded = mine + [mine[0] if mine else 0] * (per_rank - len(mine))
    reward_list = [RewardEntry(name, fn, 1.0) for name, fn in entries]  # weights do not enter the eval
    images, scores = [], []
    for start in range(0, per_rank, batch_size):
        ids = padded[start:start + batch_size]
        chunk_prompts = [all_prompts[k] for k in ids]
        chunk = sample_fixed(policy, schedule, chunk_prompts, seed, batch_size, mixed_precision, indices=ids)
        scores.append(score_rewards(reward_list, chunk, chunk_prompts, criteria=True))
        images.append(chunk.detach().cpu())
    real = len(mine)
    images = torch.cat(images)[:real]
    scores = {key: torch.cat([s[key] for s in scores])[:real] for key in scores[0]}

    # Sums and counts of the finite values, reduced over the ranks in one collective.
    names = [name for name, _ in entries]
    keys, values = [], []
    for name in names:
        keys.append(f"eval/{name}/mean")
        values.append(scores[name])
        criteria = [key for key in scores if key.startswith(f"{name}/")]
        for key in criteria:
            criterion = key[len(name) + 1:]
            if criterion == "score":
                continue  # the reward's score: eval/<name>/mean already
            keys.append(f"eval/{name}/{criterion}")
            values.append(scores[key])
        if f"{name}/score" in scores:
            # Every criterion met; for a binary wrapper judged on the wrapped reward's score.
            graded = scores.get(f"{name}/inner_score", scores[f"{name}/score"])
            keys.append(f"eval/{name}/fully_correct")
            values.append((graded > FULLY_CORRECT_THRESHOLD).to(torch.float32))
    totals = torch.zeros(2, len(keys), dtype=torch.float64)
    for j, value in enumerate(values):
        value = value.to(torch.float64)
        finite = torch.isfinite(value)
        totals[0, j] = value[finite].sum()
        totals[1, j] = finite.sum()
    totals = all_reduce_sum(totals.to(state.device), state).cpu()
    metrics = {key: float(totals[0, j] / totals[1, j]) if totals[1, j] > 0 else float("nan")
               for j, key in enumerate(keys)}
    if not return_details:
        return metrics, images
    details = {"indices": torch.tensor(mine, dtype=torch.int64), "prompts": [all_prompts[k] for k in mine],
               "scores": scores}
    return metrics, images, details


__all__ = ["sample_fixed", "evaluate_policy", "eval_entries", "rank_entries", "FULLY_CORRECT_THRESHOLD"]
