"""The steps a rollout takes: the schedule's own steps, or fewer and higher-order ODE steps
outside the SDE window (MixGRPO-Flash).

A `SamplingPlan` walks the grid points 0..S of a `StepSchedule` (point i is the input of step i,
point S the end). Inside the SDE window it takes every step, with the schedule's (a, b, s)
coefficients through `ops.sde_step`: those are the steps that are trained, and their latents and
log-probs are exactly what the first-order sampler produces from the same input. Outside the
window the steps are deterministic and never trained, so they may be taken differently:

- fewer of them (`steps_fraction`): each stretch of n consecutive ODE steps is covered by
  max(1, ceil(n * steps_fraction)) larger steps between grid points (points are never invented,
  so every model call uses a timestep of the schedule);
- second order (`order` 2): DPM-Solver++(2M), the multistep solver of Lu et al. (2022) in its
  data-prediction form, as diffusers' DPMSolverMultistepScheduler takes it
  (algorithm_type "dpmsolver++", solver_type "midpoint"). With x_t = alpha_t x_0 + sigma_t eps,
  lambda = log(alpha / sigma), h = lambda_next - lambda_cur, r = (lambda_cur - lambda_prev) / h:

      x_next = (sigma_next / sigma_cur) x - alpha_next (exp(-h) - 1) (D0 + D1 / 2),
      D0 = x0_cur,  D1 = (x0_cur - x0_prev) / r

  where x0 is the model's data prediction (rectified flow: x - sigma v; epsilon: (x - sigma eps)
  / alpha). Its first-order form (D1 = 0) is exactly the Euler step of a rectified flow and
  DDIM with eta 0. A step is first order where the previous point is unknown or unusable: the
  first step of a stretch (the multistep history restarts after the SDE window, whose steps are
  stochastic), a previous point with alpha = 0 (pure noise, lambda = -inf), and a step to
  sigma = 0 (the last one; diffusers' lower_order_final).

Without either (order 1, steps_fraction 1) the plan is the schedule itself, step for step, and
sampling is bit-identical to the plain first-order loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .schedules import StepSchedule


@dataclass
class PlanStep:
    """One model call: from grid point `start` to grid point `end` (> start).

    fine: a single step of the schedule taken with its (a, b, s) (every SDE step; ODE steps of an
        order-1, uncompressed plan). Otherwise a deterministic step in data-prediction form:
        x_next = cx * x + c0 * x0 + c1 * x0_prev (c1 == 0: first order)."""

    start: int
    end: int
    fine: bool
    cx: float = 1.0
    c0: float = 0.0
    c1: float = 0.0


@dataclass
class SamplingPlan:
    schedule: StepSchedule
    steps: List[PlanStep] = field(default_factory=list)
    order: int = 1

    @property
    def num_evaluations(self) -> int:
        """Model calls per sample (without classifier-free guidance's second half)."""
        return len(self.steps)

    @property
    def points(self) -> List[int]:
        """The grid points the plan visits, 0 ... S."""
        return [self.steps[0].start] + [s.end for s in self.steps] if self.steps else [0]

    def x0_coefficients(self, point: int) -> Tuple[float, float]:
        """(p, q): the data prediction at grid point `point` is x0 = p * x + q * model_output."""
        alpha = float(self.schedule.grid_alpha[point])
        sigma = float(self.schedule.grid_sigma[point])
        if self.schedule.prediction == "flow":
            return 1.0, -sigma
        if self.schedule.prediction == "epsilon":
            return 1.0 / alpha, -sigma / alpha
        raise ValueError(f"the schedule does not say what the model predicts (prediction={self.schedule.prediction!r}): "
                         f"it cannot take multistep ODE steps")


def _stretches(sde: List[bool]) -> List[Tuple[int, int, bool]]:
    """Consecutive runs of ODE steps as (first, end, False) and single SDE steps as (i, i+1, True)."""
    out, i = [], 0
    while i < len(sde):
        if sde[i]:
            out.append((i, i + 1, True))
            i += 1
            continue
        j = i
        while j < len(sde) and not sde[j]:
            j += 1
        out.append((i, j, False))
        i = j
    return out


def _coarse_points(first: int, end: int, fraction: float) -> List[int]:
    n = end - first
    m = max(1, math.ceil(n * fraction - 1e-9))
    points = sorted({round(first + k * n / m) for k in range(m + 1)})
    return points


def first_order(alpha: float, sigma: float, alpha_next: float, sigma_next: float) -> Tuple[float, float]:
    """(cx, c0) of the first-order step x_next = cx x + c0 x0: -alpha_next (exp(-h) - 1) with
    exp(-h) = (sigma_next alpha) / (alpha_next sigma), written without logarithms so that alpha = 0
    (pure noise) and sigma_next = 0 (the end) need no special case."""
    cx = sigma_next / sigma
    return cx, alpha_next - alpha * cx


def second_order(alpha_prev: float, sigma_prev: float, alpha: float, sigma: float, alpha_next: float,
                 sigma_next: float) -> Tuple[float, float, float]:
    """(cx, c0, c1) of the DPM-Solver++(2M) step; first order (c1 = 0) where it is undefined."""
    cx, c_first = first_order(alpha, sigma, alpha_next, sigma_next)
    if alpha_prev <= 0 or sigma_next <= 0 or alpha <= 0:
        return cx, c_first, 0.0
    lam = lambda a, s: math.log(a) - math.log(s)
    h = lam(alpha_next, sigma_next) - lam(alpha, sigma)
    r = (lam(alpha, sigma) - lam(alpha_prev, sigma_prev)) / h
    # x_next = cx x + c_first (D0 + D1 / 2), D1 = (x0 - x0_prev) / r
    return cx, c_first * (1.0 + 0.5 / r), -c_first * 0.5 / r


def sampling_plan(schedule: StepSchedule, order: int = 1, steps_fraction: float = 1.0) -> SamplingPlan:
    """The plan of a rollout on `schedule` (its sde mask is the window): see the module docstring."""
    if order not in (1, 2):
        raise ValueError(f"ode_order must be 1 or 2, got {order!r}")
    if not 0 < steps_fraction <= 1:
        raise ValueError(f"ode_steps_fraction must lie in (0, 1], got {steps_fraction!r}")
    plan = SamplingPlan(schedule, order=order)
    sde = [bool(v) for v in schedule.sde.tolist()]
    if order == 1 and steps_fraction == 1:
        plan.steps = [PlanStep(i, i + 1, True) for i in range(len(sde))]
        return plan
    if schedule.grid_alpha is None or schedule.grid_sigma is None:
        raise ValueError("ode_order 2 / ode_steps_fraction < 1 need the schedule's noise levels (grid_alpha, grid_sigma)")
    alpha = [float(v) for v in schedule.grid_alpha.tolist()]
    sigma = [float(v) for v in schedule.grid_sigma.tolist()]
    for first, end, stochastic in _stretches(sde):
        if stochastic:
            plan.steps.append(PlanStep(first, end, True))
            continue
        points = _coarse_points(first, end, steps_fraction)
        for k in range(len(points) - 1):
            i, j = points[k], points[k + 1]
            if order == 2 and k > 0:
                prev = points[k - 1]
                cx, c0, c1 = second_order(alpha[prev], sigma[prev], alpha[i], sigma[i], alpha[j], sigma[j])
            else:
                (cx, c0), c1 = first_order(alpha[i], sigma[i], alpha[j], sigma[j]), 0.0
            plan.steps.append(PlanStep(i, j, False, cx, c0, c1))
    return plan


def fine_plan(schedule: StepSchedule) -> SamplingPlan:
    """Every step of the schedule with its own coefficients (the first-order sampler)."""
    return sampling_plan(schedule, 1, 1.0)


def ode_step(plan: SamplingPlan, step: PlanStep, model_output: Tensor, latents: Tensor,
             x0_prev: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """A deterministic plan step in data-prediction form, float32 arithmetic (as ops.sde_step).
    Returns (next latents in the latents' dtype, this point's x0 for the next step)."""
    p, q = plan.x0_coefficients(step.start)
    x = latents.to(torch.float32)
    x0 = p * x + q * model_output.to(torch.float32)
    nxt = step.cx * x + step.c0 * x0
    if step.c1 != 0.0:
        if x0_prev is None:
            raise ValueError("a second-order step needs the previous point's data prediction")
        nxt = nxt + step.c1 * x0_prev
    return nxt.to(latents.dtype), x0
