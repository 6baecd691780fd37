"""Rollout: prompts -> G samples each through the SDE sampler, batched, as one Trajectory.

Randomness is keyed per sample, never per batch: the initial noise comes from `grouped_noise`
with one seed per prompt (shared by its G samples) or per sample, and the noise of step i of
sample k from `seed_for_step(sample_seed_k, i)` inside `ops.sde_step`. So a rollout gives the
same trajectories at any rollout batch size and on any number of ranks.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .noise import grouped_noise, splitmix64
from .policies.base import Policy, StepSchedule
from .trajectory import Trajectory

_MASK63 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (SplitMix64 chained), e.g. (base seed, iteration, sample)."""
    value = 0x2545F4914F6CDD1D
    for part in parts:
        value = splitmix64((value ^ (int(part) & ((1 << 64) - 1))) & ((1 << 64) - 1))
    return value & _MASK63


def sample_seeds(base_seed: int, iteration: int, first_sample: int, count: int) -> Tensor:
    """(count,) int64 seeds of global samples first_sample .. first_sample + count - 1."""
    return torch.tensor([mix_seed(base_seed, iteration, 1, first_sample + k) for k in range(count)], dtype=torch.int64)


def prompt_seeds(base_seed: int, iteration: int, first_prompt: int, count: int) -> Tensor:
    return torch.tensor([mix_seed(base_seed, iteration, 2, first_prompt + k) for k in range(count)], dtype=torch.int64)


def autocast_context(device: torch.device, mixed_precision: str):
    """bf16 autocast on CUDA when asked; a no-op elsewhere."""
    enabled = mixed_precision == "bf16" and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def rollout(policy: Policy, schedule: StepSchedule, prompts: Sequence[str], group_size: int,
            prompt_ids: Tensor, seeds_of_prompts: Tensor, seeds_of_samples: Tensor, batch_size: int,
            shared_noise: bool = True, mixed_precision: str = "bf16",
            on_batch: Optional[Callable[[Tensor, List[str]], None]] = None) -> Trajectory:
    """Sample len(prompts) * group_size trajectories, `batch_size` samples per model call.

    prompts: the rank's P prompts; prompt_ids (P,) their global positions; seeds_of_prompts (P,)
    int64 initial-noise seeds (used when shared_noise); seeds_of_samples (P*G,) int64.
    on_batch(final_latents, batch_prompts): called as soon as a batch of samples is finished, in
    order (the trainer decodes it and hands it to the reward pool while the next batch samples).
    """
    device = policy.device
    num_prompts = len(prompts)
    total = num_prompts * group_size
    if total % batch_size:
        raise ValueError(f"rollout batch_size={batch_size} must divide the {total} samples "
                         f"({num_prompts} prompts x group_size {group_size})")
    shape = tuple(policy.latent_shape())
    if shared_noise:
        initial = grouped_noise(seeds_of_prompts, group_size, shape, torch.float32, device)
    else:
        initial = grouped_noise(seeds_of_samples, 1, shape, torch.float32, device)
    cond_of_prompts = policy.encode(list(prompts))
    prompt_rows = torch.arange(num_prompts).repeat_interleave(group_size)
    steps = schedule.num_steps
    latents = torch.empty((total, steps + 1) + shape, dtype=torch.float32, device=device)
    log_probs = torch.full((total, steps), float("nan"), dtype=torch.float32, device=device)
    latents[:, 0] = initial
    was_training = policy.model.training
    policy.model.eval()
    try:
        for start in range(0, total, batch_size):
            rows = slice(start, start + batch_size)
            cond = {k: v[prompt_rows[rows].to(v.device)] for k, v in cond_of_prompts.items()}
            x = latents[rows, 0]
            seeds = seeds_of_samples[rows]
            for i in range(steps):
                step = torch.full((batch_size,), i, dtype=torch.int64)
                with autocast_context(device, mixed_precision):
                    model_output = policy.predict(x, step, cond, schedule)
                result = ops.sde_step(model_output, x, schedule.coefficients(step, device), seeds=seeds, step_index=i)
                x = result.prev_sample
                latents[rows, i + 1] = x
                if result.log_prob is not None:
                    log_probs[rows, i] = result.log_prob
            if on_batch is not None:
                on_batch(x, [prompts[p] for p in prompt_rows[rows].tolist()])
    finally:
        policy.model.train(was_training)
    return Trajectory(latents=latents, log_probs=log_probs, step_indices=torch.arange(steps),
                      timesteps=schedule.timesteps.clone(), sde=schedule.sde.clone(),
                      prompt_ids=prompt_ids.repeat_interleave(group_size).to(torch.int64), prompt_rows=prompt_rows,
                      sample_seeds=seeds_of_samples.clone(), prompts=list(prompts)).validate()


@torch.no_grad()
def decode_trajectory(policy: Policy, trajectory: Trajectory, batch_size: int) -> Tensor:
    """Decoded final samples, float32 in [0, 1]: images (B, 3, H, W) or videos (B, T, 3, H, W)."""
    outputs = [policy.decode(trajectory.final_latents[i:i + batch_size]) for i in range(0, trajectory.batch_size, batch_size)]
    return torch.cat(outputs)
