"""Higher-order and fewer ODE steps outside the SDE window (dancegrpo_fast.multistep), through the
rollout's own sampling loop, on a model whose probability-flow ODE is solved exactly: data
N(mu, s^2) per element, for which the denoiser E[x0 | x_t] is affine and the ODE keeps the
standardised coordinate z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2) fixed, so
x_T = z ends at mu + s z.

- the first-order data-prediction step is the schedule's own Euler / DDIM (eta 0) step;
- both orders converge to the exact sample; the first order's error halves when the steps
  double, the second order's quarters (rectified flow and DDIM);
- the plan's points, and which steps are first or second order;
- the same seed gives bit-identical samples.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dancegrpo_fast.multistep import first_order, sampling_plan, second_order
from dancegrpo_fast.rollout import sampling_loop
from dancegrpo_fast.schedules import ddim_schedule, flow_schedule

MU, S = 0.7, 0.5


class GaussianDataPolicy:
    """The exact model of data N(MU, S^2): velocity (flow) or epsilon, from the schedule's noise
    level of the step; float64 so that the solvers' errors, not the model's, are measured."""

    device = torch.device("cpu")

    def __init__(self):
        self.model = nn.Linear(1, 1)
        self.calls = 0

    def predict(self, x, step, cond, schedule):
        self.calls += 1
        alpha = schedule.grid_alpha[step].reshape(-1, *([1] * (x.dim() - 1)))
        sigma = schedule.grid_sigma[step].reshape(-1, *([1] * (x.dim() - 1)))
        x = x.to(torch.float64)
        x0 = MU + alpha * S**2 / (alpha**2 * S**2 + sigma**2) * (x - alpha * MU)
        if schedule.prediction == "flow":
            return (x - x0) / sigma  # v, with x0 = x - sigma v
        return (x - alpha * x0) / sigma  # eps, with x0 = (x - sigma eps) / alpha


def flow(num_steps, sde=()):
    return flow_schedule(num_steps, 3.0, "dance", 0.5, list(sde), 1.0)


def ddim(num_steps, sde=()):
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=True, steps_offset=1)
    return ddim_schedule(scheduler, num_steps, 0.5, list(sde))


def exact(schedule, point, z):
    alpha, sigma = float(schedule.grid_alpha[point]), float(schedule.grid_sigma[point])
    return alpha * MU + math.sqrt(alpha**2 * S**2 + sigma**2) * z


def sample(schedule, order, fraction=1.0, z=None, seed=0, point=None):
    """Samples from x_T = the point of standardised coordinate z at the schedule's start, at the
    end (or at grid point `point`), and the exact solution there."""
    z = torch.linspace(-2.0, 2.0, 6, dtype=torch.float64).reshape(2, 3) if z is None else z
    point = schedule.num_steps if point is None else point
    out = {}
    sampling_loop(GaussianDataPolicy(), schedule, {}, torch.zeros(2, dtype=torch.int64), exact(schedule, 0, z),
                  torch.tensor([seed, seed + 1]), 2, "no", plan=sampling_plan(schedule, order, fraction),
                  on_step=lambda rows, start, end, result: out.__setitem__(end, result.prev_sample))
    return out[point], exact(schedule, point, z)


@pytest.mark.parametrize("make", [flow, ddim], ids=["flow", "ddim"])
def test_first_order_data_prediction_is_the_schedules_own_step(make):
    schedule = make(12)
    fine, _ = sample(schedule, 1, 1.0)          # ops.sde_step with the schedule's (a, b, s)
    coarse, _ = sample(schedule, 1, 0.999)      # every step kept, taken in data-prediction form
    assert sampling_plan(schedule, 1, 0.999).num_evaluations == 12
    torch.testing.assert_close(coarse, fine, rtol=0, atol=2e-6)  # both float32 arithmetic


@pytest.mark.parametrize("make", [flow, ddim], ids=["flow", "ddim"])
def test_second_order_converges_quadratically_first_order_linearly(make):
    """Errors half-way (grid point S/2): near sigma = 0 the steps of a grid uniform in sigma stay
    O(1) long in log-SNR, so the end converges later, and float32 arithmetic floors it."""
    errors = {1: [], 2: []}
    steps = [8, 16, 32, 64, 128]
    for n in steps:
        for order in (1, 2):
            x, want = sample(make(n), order, point=n // 2)
            errors[order].append(float((x - want).abs().max()))
    ratios = {o: [errors[o][k] / errors[o][k + 1] for k in range(len(steps) - 1)] for o in (1, 2)}
    assert all(1.7 < r < 2.6 for r in ratios[1][1:]), (errors, ratios)   # O(h)
    assert all(3.2 < r < 5.0 for r in ratios[2][1:]), (errors, ratios)   # O(h^2)
    assert errors[2][-1] < errors[1][-1] / 10


@pytest.mark.parametrize("make, many_steps", [(flow, 2000), (ddim, 500)], ids=["flow", "ddim"])
def test_both_orders_reach_the_first_order_sample_at_many_steps(make, many_steps):
    many, want = sample(make(many_steps), 1)
    assert float((many - want).abs().max()) < 1e-2
    gaps = [float((sample(make(n), 2)[0] - many).abs().max()) for n in (20, 80, 320)]
    assert gaps[0] > gaps[1] > gaps[2] and gaps[2] < 1e-2 and gaps[2] < gaps[0] / 8, gaps


def test_fewer_steps_cover_each_ode_stretch_and_keep_the_window():
    schedule = flow(10, sde=[3, 4])
    plan = sampling_plan(schedule, 2, 0.4)
    # Before the window 3 steps -> ceil(1.2) = 2, after it 5 -> 2; the window's 2 steps as they are.
    assert plan.points == [0, 2, 3, 4, 5, 8, 10]
    assert [(s.start, s.fine) for s in plan.steps] == [(0, False), (2, False), (3, True), (4, True), (5, False), (8, False)]
    # Second order where the previous point is usable: not the first step of a stretch, not from
    # sigma = 1 (alpha = 0), not to sigma = 0.
    assert [s.c1 != 0 for s in plan.steps if not s.fine] == [False, False, False, False]
    plan = sampling_plan(flow(10, sde=[3, 4]), 2, 1.0)
    orders = [(s.start, s.c1 != 0) for s in plan.steps if not s.fine]
    assert orders == [(0, False), (1, False), (2, True), (5, False), (6, True), (7, True), (8, True), (9, False)]
    assert plan.num_evaluations == 10
    # Without either option the plan is the schedule, step for step.
    assert all(s.fine and s.end == s.start + 1 for s in sampling_plan(schedule, 1, 1.0).steps)


def test_step_coefficients_against_the_dpm_solver_formula():
    # Flow grid points (alpha, sigma) = (1 - sigma, sigma).
    prev, cur, nxt = 0.8, 0.6, 0.35
    cx, c0, c1 = second_order(1 - prev, prev, 1 - cur, cur, 1 - nxt, nxt)
    lam = lambda s: math.log((1 - s) / s)
    h, h0 = lam(nxt) - lam(cur), lam(cur) - lam(prev)
    phi = -(1 - nxt) * (math.exp(-h) - 1)
    assert cx == pytest.approx(nxt / cur, rel=1e-12)
    assert c0 == pytest.approx(phi * (1 + 0.5 * h / h0), rel=1e-12)
    assert c1 == pytest.approx(-phi * 0.5 * h / h0, rel=1e-12)
    # First order at the ends: from pure noise (alpha = 0) and to sigma = 0.
    assert first_order(0.0, 1.0, 0.3, 0.7) == pytest.approx((0.7, 0.3))
    assert second_order(0.5, 0.5, 0.9, 0.1, 1.0, 0.0) == pytest.approx((0.0, 1.0, 0.0))


def test_same_seed_same_samples_bit_for_bit():
    schedule = flow(8, sde=[2, 3])
    a, _ = sample(schedule, 2, 0.5, seed=5)
    b, _ = sample(schedule, 2, 0.5, seed=5)
    c, _ = sample(schedule, 2, 0.5, seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_plan_needs_the_schedules_noise_levels():
    schedule = flow(4)
    schedule.grid_alpha = None
    with pytest.raises(ValueError, match="noise levels"):
        sampling_plan(schedule, 2, 1.0)
    with pytest.raises(ValueError, match="ode_order must be 1 or 2"):
        sampling_plan(flow(4), 3)
