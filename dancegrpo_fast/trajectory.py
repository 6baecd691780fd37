"""The rollout's output as one typed object (no dict of loose tensors)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import List

import torch
from torch import Tensor


@dataclass
class Trajectory:
    """B samples (the G samples of a prompt contiguous) through S sampler steps.

    latents: (B, S + 1, *latent_shape) float32, latents[:, i] is the input of step i and
        latents[:, i + 1] its output (model space, e.g. FLUX's packed tokens).
    log_probs: (B, S) float32 rollout log-probs; NaN at ODE (deterministic) steps.
    step_indices: (S,) int64, 0..S-1 (steps as indices into the policy's StepSchedule).
    timesteps: (S,) float64, the timestep the model received at each step (its own units).
    sde: (S,) bool, the stochastic steps.
    prompt_ids: (B,) int64, the global position of each sample's prompt in the prompt stream.
    prompt_rows: (B,) int64, index of each sample's prompt among this rank's prompts.
    sample_seeds: (B,) int64 per-sample seeds (step noise and timestep subsets derive from them).
    prompts: the rank's P prompts (text), prompts[prompt_rows[i]] belongs to sample i.
    """

    latents: Tensor
    log_probs: Tensor
    step_indices: Tensor
    timesteps: Tensor
    sde: Tensor
    prompt_ids: Tensor
    prompt_rows: Tensor
    sample_seeds: Tensor
    prompts: List[str]

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.latents.shape[1] - 1

    @property
    def final_latents(self) -> Tensor:
        return self.latents[:, -1]

    def sample_prompts(self) -> List[str]:
        return [self.prompts[i] for i in self.prompt_rows.tolist()]

    def validate(self) -> "Trajectory":
        b, s = self.batch_size, self.num_steps
        checks = {"log_probs": (b, s), "step_indices": (s,), "timesteps": (s,), "sde": (s,), "prompt_ids": (b,), "prompt_rows": (b,),
                  "sample_seeds": (b,)}
        for name, shape in checks.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(f"trajectory.{name} must have shape {shape}, got {tuple(getattr(self, name).shape)}")
        if torch.isnan(self.log_probs[:, self.sde]).any():
            raise ValueError("trajectory has NaN log-probs at SDE steps")
        return self

    def to(self, device) -> "Trajectory":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Trajectory(**{k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in values.items()})
