"""Reference GRPO math (SPEC section 2): advantages and the clipped surrogate loss.

Plain PyTorch on per-sample (B,) tensors. The fused op (`dancegrpo_fast.ops.fused_step_loss`)
computes the same loss in one pass over the latents and is tested against these functions.
"""
from __future__ import annotations

from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor


def check_rewards(rewards: Tensor, name: str = "rewards") -> Tensor:
    """A 1-D tensor of finite rewards, as float64 for the statistics."""
    if not isinstance(rewards, Tensor):
        rewards = torch.as_tensor(rewards)
    if rewards.dim() != 1 or rewards.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor (one reward per sample), got "
                         f"shape {tuple(rewards.shape)}")
    rewards = rewards.to(torch.float64)
    bad = ~torch.isfinite(rewards)
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise ValueError(f"{name} must be finite: NaN or infinite values at samples {rows}")
    return rewards


def too_many_unusable(unusable: int, total: int, max_fraction: float) -> bool:
    """Whether `unusable` of `total` groups (NaN/inf rewards) reach `max_fraction` of them, with a
    little slack for float rounding (0.3 of 10 groups is 3 groups, not 3.0000000000000004)."""
    if total < 1:
        raise ValueError(f"total must be >= 1 group, got {total!r}")
    return unusable > 0 and unusable >= max_fraction * total - 1e-9


def check_group_size(group_size: int, batch_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an integer >= 2 (GRPO compares samples of one "
                         f"prompt), got {group_size!r}")
    if batch_size % group_size != 0:
        raise ValueError(f"group_size={group_size} does not divide the batch of {batch_size} "
                         f"samples: each prompt's group must be complete and contiguous")


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-8) -> Tensor:
    """Per-group normalised advantages A_i = (r_i - mean_g) / (std_g + eps), unbiased std.

    rewards: (B,) with the group_size samples of one prompt contiguous. Returns float32 (B,).
    A group whose rewards are all equal gets zero advantages (nothing to learn from it).
    """
    rewards = check_rewards(rewards)
    check_group_size(group_size, rewards.shape[0])
    grouped = rewards.view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, unbiased=True, keepdim=True)
    return ((grouped - mean) / (std + eps)).flatten().to(torch.float32)


def global_advantages(rewards: Tensor, eps: float = 1e-8) -> Tensor:
    """Advantages normalised by the mean and unbiased std of the whole batch (pass the rewards
    gathered from every rank to get the global variant of SPEC 2)."""
    rewards = check_rewards(rewards)
    if rewards.numel() < 2:
        raise ValueError("global_advantages needs at least 2 rewards")
    return ((rewards - rewards.mean()) / (rewards.std(unbiased=True) + eps)).to(torch.float32)


def combine_advantages(advantages: Union[Mapping[str, Tensor], Sequence[Tensor]],
                       weights: Union[Mapping[str, float], Sequence[float]]) -> Tensor:
    """Several rewards: one advantage per reward, combined as a weighted sum (SPEC 2)."""
    if isinstance(advantages, Mapping):
        if not isinstance(weights, Mapping) or set(weights) != set(advantages):
            raise ValueError(f"weights must name the same rewards as advantages: "
                             f"{sorted(advantages)} vs {sorted(weights) if isinstance(weights, Mapping) else weights}")
        names = sorted(advantages)
        advantages = [advantages[n] for n in names]
        weights = [weights[n] for n in names]
    if len(advantages) == 0 or len(advantages) != len(weights):
        raise ValueError(f"need one weight per advantage tensor, got {len(advantages)} tensors and "
                         f"{len(weights)} weights")
    total = torch.zeros_like(advantages[0], dtype=torch.float32)
    for adv, weight in zip(advantages, weights):
        if adv.shape != total.shape:
            raise ValueError(f"advantage tensors must share a shape, got {tuple(adv.shape)} and "
                             f"{tuple(total.shape)}")
        total = total + float(weight) * adv.to(torch.float32)
    return total


def compute_advantages(scores: Mapping[str, Tensor], weights: Mapping[str, float], group_size: int,
                       mode: str = "group", gather: Optional[Callable[[Tensor], Tensor]] = None, rank: int = 0,
                       eps: float = 1e-8) -> Tuple[Tensor, Tensor]:
    """The advantages of one iteration (SPEC 2): each reward's own normalised advantages, summed
    with the rewards' weights. Returns ((B,) float32 advantages, (B,) bool mask of usable samples).

    scores: {reward name: (B,)} with the group_size samples of a prompt contiguous. A group with a
    non-finite score (NaN/inf) in any reward is unusable: its advantages are 0 (no gradient) and
    it is left out of the statistics. mode "group": per-prompt normalisation; "global": the mean
    and std of the usable scores of every rank, which `gather` concatenates in rank order (each
    rank holding B samples; None = a single process), this rank being `rank`.
    """
    names = list(scores)
    if not names:
        raise ValueError("compute_advantages needs at least one reward's scores")
    if set(weights) != set(names):
        raise ValueError(f"weights must name the scored rewards {sorted(names)}, got {sorted(weights)}")
    if mode not in ("group", "global"):
        raise ValueError(f"mode must be 'group' or 'global', got {mode!r}")
    batch = scores[names[0]].shape[0]
    check_group_size(group_size, batch)
    finite = torch.stack([torch.isfinite(scores[n]) for n in names]).all(dim=0)
    valid = finite.view(-1, group_size).all(dim=1).repeat_interleave(group_size)
    gather = gather or (lambda t: t)
    per_reward: Dict[str, Tensor] = {}
    for name in names:
        filled = torch.where(valid, scores[name], torch.zeros_like(scores[name]))
        if mode == "group":
            adv = group_advantages(filled, group_size, eps)
        else:
            gathered = gather(filled)
            gathered_valid = gather(valid.to(torch.uint8)).bool()
            if int(gathered_valid.sum()) < 2:
                adv = torch.zeros(batch)
            else:
                full = torch.zeros_like(gathered, dtype=torch.float32)
                full[gathered_valid] = global_advantages(gathered[gathered_valid], eps)
                adv = full[rank * batch:(rank + 1) * batch]
        per_reward[name] = torch.where(valid, adv, torch.zeros_like(adv))
    return combine_advantages(per_reward, {n: weights[n] for n in names}), valid


def best_of_n(advantages: Tensor, group_size: int, keep: int) -> Tensor:
    """The samples the update trains under `bestofn` (SPEC 2 option, the reference's HunyuanVideo
    trainer): in each group, the keep/2 samples with the lowest and the keep/2 with the highest
    advantage, ranked on the advantages of the full group. Returns the kept sample indices (into
    the batch), ascending. Ties rank by position (a stable sort), so the choice is reproducible.

    The reference sorts the combined advantages of its one group per GPU and keeps
    sorted[:k/2] and sorted[-k/2:]; this does the same within each group of the batch."""
    if advantages.dim() != 1:
        raise ValueError(f"advantages must have shape (B,), got {tuple(advantages.shape)}")
    check_group_size(group_size, advantages.shape[0])
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 2 or keep % 2 or keep > group_size:
        raise ValueError(f"bestofn must be an even number of samples in [2, group_size={group_size}], got {keep!r}")
    order = torch.argsort(advantages.detach().cpu().view(-1, group_size), dim=1, stable=True)
    half = keep // 2
    kept = torch.cat([order[:, :half], order[:, group_size - half:]], dim=1)
    starts = torch.arange(0, advantages.shape[0], group_size).unsqueeze(1)
    return (kept + starts).flatten().sort().values


def _check_loss_inputs(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                       clip_range: float, adv_clip_max: float) -> None:
    if log_prob.dim() != 1:
        raise ValueError(f"log_prob must have shape (B,), got {tuple(log_prob.shape)}")
    for name, t in (("old_log_prob", old_log_prob), ("advantages", advantages)):
        if t.shape != log_prob.shape:
            raise ValueError(f"{name} must have shape {tuple(log_prob.shape)} like log_prob, got "
                             f"{tuple(t.shape)}")
    if not (clip_range >= 0):
        raise ValueError(f"clip_range must be >= 0, got {clip_range!r}")
    if not (adv_clip_max > 0):
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max!r}")


def grpo_per_sample_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
                         clip_range: float = 1e-4, adv_clip_max: float = 5.0) -> Tensor:
    """max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)) per sample, float32 (B,)."""
    _check_loss_inputs(log_prob, old_log_prob, advantages, clip_range, adv_clip_max)
    adv = torch.clamp(advantages.to(torch.float32), -adv_clip_max, adv_clip_max)
    ratio = torch.exp(log_prob.to(torch.float32) - old_log_prob.to(torch.float32))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


def grpo_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor,
              clip_range: float = 1e-4, adv_clip_max: float = 5.0) -> Tensor:
    """The clipped GRPO surrogate, mean over samples (scalar). The trainer divides it by
    gradient_accumulation_steps * trained_timesteps."""
    return grpo_per_sample_loss(log_prob, old_log_prob, advantages, clip_range, adv_clip_max).mean()


def gaussian_mean_kl(mean: Tensor, ref_mean: Tensor, std: Tensor) -> Tensor:
    """KL between two Gaussian steps of equal std: mean_N((mu - mu_ref)^2) / (2 s^2), (B,)."""
    diff = mean.to(torch.float32) - ref_mean.to(torch.float32)
    sq = (diff**2).flatten(1).mean(dim=1)
    return sq / (2.0 * std.to(torch.float32) ** 2)


def step_kl(model_output: Tensor, ref_model_output: Tensor, b: Tensor, s: Tensor) -> Tensor:
    """The exact KL of two steps that share a x and s, from the model outputs: the means differ
    by b (v - v_ref), so KL = b^2 mean_N((v - v_ref)^2) / (2 s^2). (B,) float32, differentiable
    w.r.t. model_output (the reference output is a constant)."""
    diff = (model_output.to(torch.float32) - ref_model_output.detach().to(torch.float32)).flatten(1)
    return b.to(torch.float32) ** 2 * (diff**2).mean(dim=1) / (2.0 * s.to(torch.float32) ** 2)
