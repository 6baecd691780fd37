"""Sampling: prompts -> samples through the policy's SDE sampler. One loop, two uses.

- `rollout`: the training rollout. G samples per prompt, every step's latents and log-probs kept
  as a Trajectory.
- `sample_fixed`: the held-out evaluation. One sample per entry of a prompt list, with fixed noise
  (the same at every evaluation), decoded to images.

Randomness is keyed per sample, never per batch: the initial noise comes from `grouped_noise`
with one seed per prompt (shared by its G samples) or per sample, and the noise of step i of
sample k from `seed_for_step(step_seed_k, i)` inside `ops.sde_step`. So the samples are the same
at any batch size and on any number of ranks.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import Tensor

from . import ops
from .noise import eval_seeds, grouped_noise
from .policies.base import Policy
from .multistep import SamplingPlan, fine_plan, ode_step
from .schedules import StepSchedule
from .sde import SDEStepOutput
from .trajectory import Trajectory

# on_step(rows, start point, end point, step result) and on_batch(rows, final latents) of the
# sampling loop (a step goes from grid point start to end: end == start + 1 unless a
# SamplingPlan takes larger ODE steps).
StepHook = Callable[[slice, int, int, SDEStepOutput], None]
BatchHook = Callable[[slice, Tensor], None]


def autocast_context(device: torch.device, mixed_precision: str):
    """bf16 autocast on CUDA when asked; a null context elsewhere (torch.autocast refuses device
    types it has no autocast for, even disabled: the meta device of dancegrpo_fast.plan's dry run)."""
    if mixed_precision == "bf16" and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def sampling_loop(policy: Policy, schedule: StepSchedule, cond_of_prompts: Dict[str, Tensor], prompt_rows: Tensor,
                  initial: Tensor, step_seeds: Tensor, batch_size: int, mixed_precision: str,
                  on_step: Optional[StepHook] = None, on_batch: Optional[BatchHook] = None,
                  plan: Optional[SamplingPlan] = None) -> None:
    """Sample every row of `initial` through all of the schedule's steps, `batch_size` rows per
    model call (the last batch may be smaller), with the model in eval mode. plan: the steps to
    take (multistep.sampling_plan: fewer / second-order ODE steps outside the SDE window); None:
    every step of the schedule.

    cond_of_prompts: the policy's conditioning of the distinct prompts; prompt_rows (N,): the
    prompt of each row; initial (N, *latent_shape): x_T; step_seeds (N,) int64."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    plan = fine_plan(schedule) if plan is None else plan
    if plan.schedule is not schedule:
        raise ValueError("the sampling plan was made for another schedule")
    device = policy.device
    total = initial.shape[0]
    was_training = policy.model.training
    policy.model.eval()
    try:
        for start in range(0, total, batch_size):
            rows = slice(start, min(start + batch_size, total))
            cond = {k: v[prompt_rows[rows].to(v.device)] for k, v in cond_of_prompts.items()}
            x = initial[rows]
            seeds = step_seeds[rows]
            x0_prev = None  # the multistep history: the data prediction at the previous point
            for planned in plan.steps:
                i = planned.start
                step = torch.full((x.shape[0],), i, dtype=torch.int64)
                with autocast_context(device, mixed_precision):
                    model_output = policy.predict(x, step, cond, schedule)
                if planned.fine:
                    result = ops.sde_step(model_output, x, schedule.coefficients(step, device), seeds=seeds, step_index=i)
                    x0_prev = None
                else:
                    prev_sample, x0_prev = ode_step(plan, planned, model_output, x, x0_prev)
                    result = SDEStepOutput(prev_sample=prev_sample, log_prob=None,
                                           std=torch.zeros(x.shape[0], device=x.device))
                x = result.prev_sample
                if on_step is not None:
                    on_step(rows, i, planned.end, result)
            if on_batch is not None:
                on_batch(rows, x)
    finally:
        policy.model.train(was_training)


@torch.no_grad()
def rollout(policy: Policy, schedule: StepSchedule, prompts: Sequence[str], group_size: int,
            prompt_ids: Tensor, seeds_of_prompts: Tensor, seeds_of_samples: Tensor, batch_size: int,
            shared_noise: bool = True, mixed_precision: str = "bf16",
            on_batch: Optional[Callable[[Tensor, List[str]], None]] = None,
            plan: Optional[SamplingPlan] = None) -> Trajectory:
    """Sample len(prompts) * group_size trajectories, `batch_size` samples per model call.

    prompts: the rank's P prompts; prompt_ids (P,) their global positions; seeds_of_prompts (P,)
    int64 initial-noise seeds (used when shared_noise); seeds_of_samples (P*G,) int64.
    on_batch(final_latents, batch_prompts): called as soon as a batch of samples is finished, in
    order (the trainer decodes it and hands it to the reward pool while the next batch samples).
    plan: see sampling_loop; the latents of grid points a plan steps over stay NaN (they are
    never trained: only SDE steps are, and the plan takes each of them).
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
    prompt_rows = torch.arange(num_prompts).repeat_interleave(group_size)
    steps = schedule.num_steps
    latents = torch.full((total, steps + 1) + shape, float("nan"), dtype=torch.float32, device=device)
    log_probs = torch.full((total, steps), float("nan"), dtype=torch.float32, device=device)
    latents[:, 0] = initial

    def keep(rows: slice, i: int, end: int, result: SDEStepOutput) -> None:
        latents[rows, end] = result.prev_sample
        if result.log_prob is not None:
            log_probs[rows, i] = result.log_prob

    def finished(rows: slice, final: Tensor) -> None:
        if on_batch is not None:
            on_batch(final, [prompts[p] for p in prompt_rows[rows].tolist()])

    sampling_loop(policy, schedule, policy.encode(list(prompts)), prompt_rows, initial, seeds_of_samples,
                  batch_size, mixed_precision, on_step=keep, on_batch=finished, plan=plan)
    return Trajectory(latents=latents, log_probs=log_probs, step_indices=torch.arange(steps),
                      timesteps=schedule.timesteps.clone(), sde=schedule.sde.clone(),
                      prompt_ids=prompt_ids.repeat_interleave(group_size).to(torch.int64), prompt_rows=prompt_rows,
                      sample_seeds=seeds_of_samples.clone(), prompts=list(prompts)).validate()


@torch.no_grad()
def sample_fixed(policy: Policy, schedule: StepSchedule, prompts: Sequence[str], seed: int, batch_size: int,
                 mixed_precision: str = "no", indices: Optional[Sequence[int]] = None) -> Tensor:
    """One sample per entry of `prompts`, decoded with `policy.decode`: images (B, 3, H, W) (or
    videos) float32 in [0, 1], on the policy's device.

    Entry k (its position in `prompts`, or `indices[k]` when given: the entry's number in a
    larger list split over ranks) starts from `grouped_noise` of its initial-noise seed and draws
    its step noise from its step seed (`noise.eval_seeds(seed, k)`), through the rollout's loop:
    the same (prompts, seed) give the same samples at every evaluation, at any batch size and on
    any number of ranks, so curves compare models, not noise."""
    prompts = list(prompts)
    indices = list(range(len(prompts))) if indices is None else [int(k) for k in indices]
    if len(indices) != len(prompts):
        raise ValueError(f"indices has {len(indices)} entries for {len(prompts)} prompts")
    if not prompts:
        return torch.zeros((0, 3, 0, 0))
    noise_seeds, step_seeds = eval_seeds(seed, indices)
    initial = grouped_noise(noise_seeds, 1, tuple(policy.latent_shape()), torch.float32, policy.device)
    images: List[Tensor] = []
    sampling_loop(policy, schedule, policy.encode(prompts), torch.arange(len(prompts)), initial, step_seeds,
                  batch_size, mixed_precision, on_batch=lambda rows, final: images.append(policy.decode(final)))
    return torch.cat(images)


@torch.no_grad()
def decode_trajectory(policy: Policy, trajectory: Trajectory, batch_size: int) -> Tensor:
    """Decoded final samples, float32 in [0, 1]: images (B, 3, H, W) or videos (B, T, 3, H, W)."""
    outputs = [policy.decode(trajectory.final_latents[i:i + batch_size]) for i in range(0, trajectory.batch_size, batch_size)]
    return torch.cat(outputs)
