"""Step schedules: a sampler (SPEC 1) as per-step (a, b, s) coefficients for the steps of a run.

A `StepSchedule` is what the rollout and the trainer step with: for step i, the timestep the model
receives and the affine-Gaussian coefficients of `dancegrpo_fast.sde`. `flow_schedule` builds it
for rectified flows (DanceGRPO's and Flow-GRPO's SDEs, ODE steps outside an SDE window),
`ddim_schedule` for epsilon-prediction diffusion (DDIM with eta).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .sde import (StepCoefficients, ddim_coefficients, dance_coefficients, flow_grpo_coefficients, flow_sigmas,
                  ode_coefficients)


@dataclass
class StepSchedule:
    """The sampler as per-step tensors (S = number of steps).

    timesteps: (S,) float64, the timestep the model receives at each step, in its own units.
    a, b, s: (S,) float32 affine-Gaussian coefficients (s == 0 for ODE steps).
    sde: (S,) bool, the stochastic (trainable) steps.
    dsigma: (S,) float64 |sigma_i - sigma_{i+1}| of a rectified flow's steps (the KL weight of
        kl_convention flow_grpo); None for DDIM.
    grid_alpha, grid_sigma: (S + 1,) float64, x_t = alpha * x_0 + sigma * noise at the input of
        each step and at the end (rectified flow: 1 - sigma and sigma; DDIM: sqrt(alpha_bar) and
        sqrt(1 - alpha_bar)), for the multistep ODE steps (dancegrpo_fast.multistep); None when
        unknown.
    prediction: what the model predicts, "flow" (velocity, x_0 = x - sigma v) or "epsilon"
        (x_0 = (x - sigma eps) / alpha).
    """

    timesteps: Tensor
    a: Tensor
    b: Tensor
    s: Tensor
    sde: Tensor
    dsigma: Optional[Tensor] = None
    grid_alpha: Optional[Tensor] = None
    grid_sigma: Optional[Tensor] = None
    prediction: str = ""

    @property
    def num_steps(self) -> int:
        return self.timesteps.shape[0]

    def coefficients(self, step_index: Tensor, device) -> StepCoefficients:
        """Per-sample coefficients: step_index (B,) int64 -> StepCoefficients of (B,) each."""
        step_index = step_index.cpu()
        # Built on the CPU first, so that whether the step is stochastic is known without a
        # device sync (StepCoefficients carries it through .to()).
        return StepCoefficients(self.a[step_index], self.b[step_index], self.s[step_index]).to(device)

    def kl_weight(self, step_index: Tensor, convention: str, device) -> Tensor:
        """(B,) float32 factor of each sample's exact step KL in the loss: 1 for "exact",
        the step's |dsigma| for "flow_grpo" (Flow-GRPO's kl_loss divides by its noise scale
        without the sqrt(|dsigma|) of s, so it is the exact KL times |dsigma|)."""
        if convention == "exact":
            return torch.ones(step_index.shape[0], dtype=torch.float32, device=device)
        if convention != "flow_grpo":
            raise ValueError(f"kl_convention must be 'exact' or 'flow_grpo', got {convention!r}")
        if self.dsigma is None:
            raise ValueError("kl_convention 'flow_grpo' needs a rectified-flow schedule (|dsigma| per step); "
                             "this schedule (DDIM) has none: use 'exact'")
        return self.dsigma[step_index.cpu()].to(device=device, dtype=torch.float32)

    def model_timesteps(self, step_index: Tensor, device, dtype=torch.float32) -> Tensor:
        return self.timesteps[step_index.cpu()].to(device=device, dtype=dtype)


def _stack(rows: List[StepCoefficients]) -> tuple:
    return tuple(torch.cat([getattr(c, name) for c in rows]) for name in ("a", "b", "s"))


def flow_schedule(num_steps: int, shift: float, sampler: str, eta: float, sde_steps: Sequence[int],
                  timestep_scale: float) -> StepSchedule:
    """Rectified-flow schedule (SPEC 1a/1b/1d). The model receives int(sigma * 1000) / 1000 times
    `timestep_scale` (1 for FLUX, whose transformer multiplies by 1000 itself; 1000 for SD3,
    HunyuanVideo, Wan), as DanceGRPO feeds it."""
    sigmas = flow_sigmas(num_steps, shift, dtype=torch.float64)
    sde = torch.zeros(num_steps, dtype=torch.bool)
    sde[list(sde_steps)] = True
    rows = []
    for i in range(num_steps):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if not sde[i]:
            rows.append(ode_coefficients(sigma, sigma_next, 1))
        elif sampler == "dance":
            rows.append(dance_coefficients(sigma, sigma_next, eta, 1))
        elif sampler == "flow_grpo":
            rows.append(flow_grpo_coefficients(sigma, sigma_next, eta, float(sigmas[1]), 1))
        else:
            raise ValueError(f"sampler {sampler!r} is not a rectified-flow sampler (dance, flow_grpo)")
    a, b, s = _stack(rows)
    if (s[sde] <= 0).any():
        raise ValueError(f"eta={eta} makes the SDE steps deterministic (s == 0): use eta > 0")
    timesteps = torch.tensor([int(float(sig) * 1000) / 1000 * timestep_scale for sig in sigmas[:-1]],
                             dtype=torch.float64)
    return StepSchedule(timesteps, a, b, s, sde, dsigma=sigmas[:-1] - sigmas[1:], grid_alpha=1.0 - sigmas,
                        grid_sigma=sigmas.clone(), prediction="flow")


def ddim_schedule(scheduler, num_steps: int, eta: float, sde_steps: Sequence[int]) -> StepSchedule:
    """DDIM with eta (SPEC 1c) from a diffusers DDIMScheduler's alphas_cumprod: step i goes from
    t_i to max(t_i - num_train_timesteps // S, 0). Steps outside the SDE window use eta 0
    (deterministic).

    The previous timestep is clamped at 0, as DanceGRPO's (and DDPO's) ddim_step_with_logprob
    does, so the scheduler's final_alpha_cumprod is never used: with set_alpha_to_one=True it is
    1, which would make the last step deterministic (s = 0) and leave it without a log-prob."""
    if getattr(scheduler.config, "clip_sample", False):
        raise ValueError("the scheduler has clip_sample=True, which makes the DDIM step non-affine; "
                         "set clip_sample to false in scheduler/scheduler_config.json")
    if getattr(scheduler.config, "prediction_type", "epsilon") != "epsilon":
        raise ValueError(f"only epsilon prediction is supported for DDIM, got "
                         f"{scheduler.config.prediction_type!r}")
    scheduler.set_timesteps(num_steps)
    timesteps = scheduler.timesteps.to(torch.int64)
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    stride = scheduler.config.num_train_timesteps // num_steps
    sde = torch.zeros(num_steps, dtype=torch.bool)
    sde[list(sde_steps)] = True
    rows, alpha_bars = [], []
    for i, t in enumerate(timesteps.tolist()):
        prev_t = max(t - stride, 0)
        alpha_bar_prev = float(alphas[prev_t])
        alpha_bars.append(float(alphas[t]))
        rows.append(ddim_coefficients(float(alphas[t]), alpha_bar_prev, eta if sde[i] else 0.0, 1))
    alpha_bars.append(alpha_bar_prev)  # the end of the last step
    a, b, s = _stack(rows)
    if (s[sde] <= 0).any():
        bad = [i for i in range(num_steps) if sde[i] and s[i] <= 0]
        raise ValueError(f"DDIM steps {bad} are deterministic (s == 0: the step goes from t = 0 to the clamped "
                         f"previous timestep 0, whose alphas coincide; the scheduler's steps_offset=0 puts the last "
                         f"step at t = 0): set steps_offset to 1 in scheduler/scheduler_config.json (as SD 1.x "
                         f"ships it) or end the SDE window before that step")
    alpha_bars = torch.tensor(alpha_bars, dtype=torch.float64)
    return StepSchedule(timesteps.to(torch.float64), a, b, s, sde, grid_alpha=alpha_bars.sqrt(),
                        grid_sigma=(1.0 - alpha_bars).sqrt(), prediction="epsilon")
