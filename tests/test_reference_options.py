"""Options of the reference DanceGRPO code, against hand-written expectations:

- bestofn: the kept samples of each group (the k/2 lowest and k/2 highest advantages, as the
  reference's HunyuanVideo trainer keeps sorted[:k/2] and sorted[-k/2:]), and an update that
  trains exactly those (its gradient is the per-sample reference over them, not over all);
- kl_convention: the KL term of the loss for "exact" and "flow_grpo" (the exact KL times the
  step's |dsigma|), value and gradient against a float64 formula written from the sigmas;
- DDIM under set_alpha_to_one=True: the previous timestep clamped at 0 as the reference does, so
  the last step is stochastic, with the reference's coefficients.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread, flux_folder, torch_backend  # noqa: E402,F401  (fixtures)
from helpers.tiny_models import flux_train_config  # noqa: E402
from test_trainer_math import _close, make_trainer, reference_gradient, run_update  # noqa: E402

from dancegrpo_fast.grpo import best_of_n, step_kl  # noqa: E402
from dancegrpo_fast.schedules import ddim_schedule, flow_schedule  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _torch_ops(torch_backend):
    """This file tests the trainer's options, not the kernels."""


# ----------------------------------------------------------------------------------------------
# bestofn
# ----------------------------------------------------------------------------------------------


def test_best_of_n_keeps_the_lowest_and_highest_of_each_group():
    advantages = torch.tensor([0.5, -1.0, 2.0, 0.1, -0.3, 1.2,    # group 0
                               -2.0, 0.0, 0.7, 3.0, -0.5, 0.2])   # group 1
    # Written out: group 0 sorted is 1 (-1.0), 4 (-0.3), 3, 0, 5 (1.2), 2 (2.0);
    # group 1 sorted is 6 (-2.0), 10 (-0.5), 7, 11, 8 (0.7), 9 (3.0).
    assert best_of_n(advantages, 6, 4).tolist() == [1, 2, 4, 5, 6, 8, 9, 10]
    assert best_of_n(advantages, 6, 2).tolist() == [1, 2, 6, 9]
    assert best_of_n(advantages, 6, 6).tolist() == list(range(12))
    # Ties rank by position: the first of equal values counts as the lower.
    assert best_of_n(torch.zeros(4), 4, 2).tolist() == [0, 3]


@pytest.mark.parametrize("keep", [0, 3, 8, True])
def test_best_of_n_refuses_bad_counts(keep):
    with pytest.raises(ValueError, match="bestofn"):
        best_of_n(torch.randn(6), 6, keep)


@pytest.mark.parametrize("value, message", [
    (3, "bestofn must be 0 .* or an even number"),
    (6, r"bestofn must be .*\[2, group_size=4\]"),
    (-2, "bestofn must be"),
])
def test_bestofn_config_errors_name_the_setting(flux_folder, tmp_path, value, message):
    with pytest.raises(ValueError, match=message):
        flux_train_config(flux_folder, tmp_path, group_size=4, prompts_per_rank=1, bestofn=value).validate()


def test_bestofn_accumulation_counts_the_trained_samples(flux_folder, tmp_path):
    values = dict(group_size=4, prompts_per_rank=1, rollout_batch_size=4, bestofn=2, train_batch_size=1)
    config = flux_train_config(flux_folder, tmp_path, gradient_accumulation_steps=2, **values).validate()
    assert config.trained_samples_per_rank == 2 and config.optimizer_steps_per_iteration == 1
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4 must divide the 2 training batches"):
        flux_train_config(flux_folder, tmp_path, gradient_accumulation_steps=4, **values).validate()


def test_bestofn_update_trains_only_the_kept_samples(flux_folder, tmp_path, monkeypatch):
    trainer = make_trainer(flux_folder, tmp_path, group_size=4, prompts_per_rank=1, rollout_batch_size=4,
                           bestofn=2, train_batch_size=1, gradient_accumulation_steps=2, max_grad_norm=0.0)
    trajectory = trainer.collect()
    advantages = torch.tensor([0.3, -1.2, 1.5, -0.1])  # lowest: sample 1, highest: sample 2
    steps = trainer.trained_steps(trajectory)
    expected = reference_gradient(trainer, trajectory, advantages, steps, torch.tensor([1, 2]))
    everyone = reference_gradient(trainer, trajectory, advantages, steps, torch.arange(4))
    others = reference_gradient(trainer, trajectory, advantages, steps, torch.tensor([0, 3]))
    seen, stats = run_update(trainer, trajectory, advantages, None, monkeypatch)
    assert stats.optimizer_steps == 1 and len(seen) == 1
    _close(seen[0]["raw"], expected)
    # The test tells the kept samples from all of them and from the wrong ones.
    for wrong in (everyone, others):
        difference = max(float((a - e).abs().max()) for a, e in zip(seen[0]["raw"], wrong))
        assert difference > 1e-2 * max(float(e.abs().max()) for e in expected)
    assert stats.ratio_mean == 1.0 and stats.log_prob_gap < 1e-3


def test_hunyuan_preset_keeps_8_of_24_as_the_reference():
    from dancegrpo_fast.config import parse_config

    config = parse_config(["--preset", "hunyuan_video"])
    assert (config.grpo.group_size, config.grpo.bestofn) == (24, 8)
    # The reference steps the optimizer every 4 of the 8 kept samples.
    assert config.optimizer_steps_per_iteration == 2


# ----------------------------------------------------------------------------------------------
# KL convention
# ----------------------------------------------------------------------------------------------


def _hand_sigmas(num_steps, shift):
    sigmas = [1.0 - i / num_steps for i in range(num_steps + 1)]
    return [shift * s / (1.0 + (shift - 1.0) * s) for s in sigmas]


def _hand_dance(sigma, sigma_next, eta):
    """b and s of DanceGRPO's step, written from the paper's formula (float64)."""
    dsigma = sigma_next - sigma
    return dsigma * (1.0 + eta**2 * (1.0 - sigma) / (2.0 * sigma)), eta * (sigma - sigma_next) ** 0.5


def _hand_kl(v, v_ref, sigma, sigma_next, eta, convention):
    """float64: the KL of the two step Gaussians, times |dsigma| for Flow-GRPO's convention
    (its kl_loss = mean((mu - mu_ref)^2) / (2 std_dev_t^2) with s = std_dev_t sqrt(|dsigma|))."""
    b, s = _hand_dance(sigma, sigma_next, eta)
    mu, mu_ref = b * v.double(), b * v_ref.double()
    kl = ((mu - mu_ref) ** 2).flatten(1).mean(dim=1) / (2.0 * s**2)
    return kl * (sigma - sigma_next) if convention == "flow_grpo" else kl


@pytest.mark.parametrize("convention", ["exact", "flow_grpo"])
def test_kl_term_of_each_convention_matches_the_float64_formula(convention):
    num_steps, shift, eta = 8, 3.0, 0.4
    schedule = flow_schedule(num_steps, shift, "dance", eta, range(num_steps), 1.0)
    sigmas = _hand_sigmas(num_steps, shift)
    steps = torch.tensor([0, 3, 6])
    v = torch.randn(3, 4, 5, requires_grad=True)
    v_ref = torch.randn(3, 4, 5)
    coeffs = schedule.coefficients(steps, "cpu")
    ours = schedule.kl_weight(steps, convention, "cpu") * step_kl(v, v_ref, coeffs.b, coeffs.s)
    expected = torch.cat([_hand_kl(v[i:i + 1], v_ref[i:i + 1], sigmas[t], sigmas[t + 1], eta, convention)
                          for i, t in enumerate(steps.tolist())])
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=0)
    ours.sum().backward()
    v_64 = v.detach().double().requires_grad_(True)
    torch.cat([_hand_kl(v_64[i:i + 1], v_ref[i:i + 1], sigmas[t], sigmas[t + 1], eta, convention)
               for i, t in enumerate(steps.tolist())]).sum().backward()
    torch.testing.assert_close(v.grad.double(), v_64.grad, rtol=1e-5, atol=1e-12)


def test_flow_grpo_convention_is_refused_for_ddim(flux_folder, tmp_path):
    with pytest.raises(ValueError, match="kl_convention 'flow_grpo'.*ddim"):
        flux_train_config(flux_folder, tmp_path, model_family="sd", sampler="ddim",
                          kl_convention="flow_grpo").validate()
    with pytest.raises(ValueError, match="kl_convention must be one of"):
        flux_train_config(flux_folder, tmp_path, kl_convention="flowgrpo").validate()


@pytest.mark.parametrize("convention", ["exact", "flow_grpo"])
def test_update_gradient_of_the_kl_term(flux_folder, tmp_path, monkeypatch, convention):
    """Zero advantages leave only the KL term: the first optimizer step's gradient is kl_beta
    times the mean over its (sample, timestep) terms of the hand-written KL of the convention,
    the policy moved away from its frozen reference first (at the start the KL is 0)."""
    kl_beta = 0.5
    trainer = make_trainer(flux_folder, tmp_path, kl_beta=kl_beta, kl_convention=convention, max_grad_norm=0.0,
                           train_batch_size=2, gradient_accumulation_steps=2)
    assert trainer.setup.reference is not None
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in trainer.setup.parameters:
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    trajectory = trainer.collect()
    advantages = torch.zeros(4)
    order = torch.tensor([2, 0, 3, 1])
    steps = trainer.trained_steps(trajectory)
    c, policy = trainer.config, trainer.policy
    sigmas = _hand_sigmas(c.sampler.num_steps, c.sampler.shift)
    params = trainer.setup.parameters
    for p in params:
        p.grad = None
    cond = policy.encode(trajectory.prompts)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for i in order.tolist():
        row_cond = {k: v[trajectory.prompt_rows[i:i + 1]] for k, v in cond.items()}
        for t in steps[i].tolist():
            x = trajectory.latents[i:i + 1, t]
            v = policy.predict(x, torch.tensor([t]), row_cond, trainer.schedule, module=policy.model)
            with torch.no_grad():
                v_ref = policy.predict(x, torch.tensor([t]), row_cond, trainer.schedule, module=trainer.setup.reference)
            total = total + _hand_kl(v, v_ref, sigmas[t], sigmas[t + 1], c.sampler.eta, convention).sum()
            count += 1
    assert float(total.detach()) > 0
    (kl_beta * total / count).backward()
    expected = [p.grad.detach().float().clone() for p in params]
    for p in params:
        p.grad = None
    seen, stats = run_update(trainer, trajectory, advantages, order, monkeypatch)
    _close(seen[0]["raw"], expected, rtol=1e-3)
    assert stats.kl > 0


def test_flow_grpo_kl_weight_is_the_step_dsigma():
    schedule = flow_schedule(4, 1.0, "flow_grpo", 0.7, range(4), 1.0)
    steps = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(schedule.kl_weight(steps, "flow_grpo", "cpu"), torch.full((4,), 0.25))
    torch.testing.assert_close(schedule.kl_weight(steps, "exact", "cpu"), torch.ones(4))


# ----------------------------------------------------------------------------------------------
# DDIM's last step
# ----------------------------------------------------------------------------------------------


def _ddim_scheduler(**overrides):
    diffusers = pytest.importorskip("diffusers")
    values = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1)
    values.update(overrides)
    return diffusers.DDIMScheduler(**values)


def test_ddim_set_alpha_to_one_clamps_the_previous_timestep_as_the_reference():
    num_steps, eta = 10, 1.0
    scheduler = _ddim_scheduler(set_alpha_to_one=True)
    assert float(scheduler.final_alpha_cumprod) == 1.0  # what would make the last step deterministic
    schedule = ddim_schedule(scheduler, num_steps, eta, range(num_steps))
    assert bool((schedule.s > 0).all())
    # The reference's ddim_step_with_logprob, written out in float64: prev = clamp(t - 1000 // S,
    # 0, 999), variance = (1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev), std = eta sqrt(.),
    # mean = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - std^2) eps.
    alphas = scheduler.alphas_cumprod.double()
    x, eps = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for i, t in enumerate(schedule.timesteps.long().tolist()):
        prev = min(max(t - 1000 // num_steps, 0), 999)
        abar, abar_prev = alphas[t], alphas[prev]
        std = eta * ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()
        x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
        mean = abar_prev.sqrt() * x0 + (1 - abar_prev - std**2).sqrt() * eps
        ours = schedule.a[i].double() * x + schedule.b[i].double() * eps
        torch.testing.assert_close(ours, mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(schedule.s[i].double(), std, rtol=1e-5, atol=0)
    assert schedule.timesteps[-1] == 1  # steps_offset 1: the last step goes from t = 1 to t = 0
    # set_alpha_to_one no longer matters: the same schedule as with it off.
    other = ddim_schedule(_ddim_scheduler(set_alpha_to_one=False), num_steps, eta, range(num_steps))
    for name in ("a", "b", "s"):
        assert torch.equal(getattr(schedule, name), getattr(other, name))


def test_ddim_last_step_at_t0_names_steps_offset():
    scheduler = _ddim_scheduler(set_alpha_to_one=True, steps_offset=0)
    with pytest.raises(ValueError, match=r"DDIM steps \[9\] are deterministic.*steps_offset to 1"):
        ddim_schedule(scheduler, 10, 1.0, range(10))
    # Outside the SDE window that step is a deterministic step, as intended.
    schedule = ddim_schedule(scheduler, 10, 1.0, range(9))
    assert schedule.s[-1] == 0 and bool((schedule.s[:-1] > 0).all())
