"""The trainer's own math against independent, hand-written expectations (SPEC 2), fast:

- the gradient of an optimizer step equals a per-sample, per-timestep reference loop of the
  clipped surrogate, scaled by 1 / (samples of the step * T): the loss scale across gradient
  accumulation and timesteps, whatever the micro-batching;
- gradient clipping is applied before the optimizer step, and the logged norm is the raw one;
- the advantages handed to the update are the group-normalised rewards, with their sign, the
  weights of several rewards, the global variant, and a NaN group left out;
- an SDE window trains only its steps.

The model is a tiny FLUX (real diffusers classes); the step ops run on the PyTorch backend (the
kernels are tested against the same math in test_fused_ops.py).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers.fixtures import _single_thread, flux_folder, torch_backend  # noqa: E402,F401  (fixtures)
from helpers.tiny_models import flux_train_config  # noqa: E402

from dancegrpo_fast.grpo import compute_advantages  # noqa: E402
from dancegrpo_fast.sde import gaussian_log_prob  # noqa: E402
from dancegrpo_fast.train import Trainer  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _torch_ops(torch_backend):
    """This file tests the trainer's loop, not the kernels."""


def brightness(images, prompts):
    return images.float().mean(dim=tuple(range(1, images.dim())))


def make_trainer(folder, tmp_path, **overrides) -> Trainer:
    config = flux_train_config(folder, tmp_path, **{"clip_range": 1e-4, "adv_clip_max": 5.0, **overrides})
    return Trainer(config, rewards={"brightness": (brightness, 1.0)})


def reference_gradient(trainer, trajectory, advantages, steps, samples):
    """The gradient of the first optimizer step by SPEC 2, written out: for each sample i of the
    step and each of its trained steps t, the Gaussian step log-prob (mean a x + b v, std s,
    element mean) of the rollout's next latent, the ratio to its detached self (on-policy: 1),
    the clipped surrogate max(-A rho, -A clip(rho)) with A clamped; summed and divided by the
    number of (sample, timestep) terms of the step."""
    config, policy, schedule = trainer.config, trainer.policy, trainer.schedule
    g = config.grpo
    params = [p for p in policy.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    cond = policy.encode(trajectory.prompts)
    total = torch.zeros(())
    count = 0
    for i in samples.tolist():
        row_cond = {k: v[trajectory.prompt_rows[i:i + 1]] for k, v in cond.items()}
        for t in steps[i].tolist():
            x, x_next = trajectory.latents[i:i + 1, t], trajectory.latents[i:i + 1, t + 1]
            v = policy.predict(x, torch.tensor([t]), row_cond, schedule, module=policy.model)
            a, b, s = schedule.a[t], schedule.b[t], schedule.s[t]
            log_prob = gaussian_log_prob(x_next, a * x + b * v.float(), s.reshape(1))
            ratio = torch.exp(log_prob - log_prob.detach())
            adv = advantages[i].clamp(-g.adv_clip_max, g.adv_clip_max)
            clipped = torch.clamp(ratio, 1 - g.clip_range, 1 + g.clip_range)
            total = total + torch.maximum(-adv * ratio, -adv * clipped).sum()
            count += 1
    (total / count).backward()
    grads = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return grads


def capture_first_step(trainer):
    """Record (raw gradients, gradients as the optimizer saw them) at each optimizer step."""
    seen = []
    params = trainer.setup.parameters

    def before_step(optimizer, args, kwargs):
        seen[-1]["clipped"] = [p.grad.detach().clone() for p in params]

    original_clip = torch.nn.utils.clip_grad_norm_

    def clip(parameters, bound, *args, **kwargs):
        seen.append({"raw": [p.grad.detach().clone() for p in params], "bound": bound})
        return original_clip(parameters, bound, *args, **kwargs)

    trainer.setup.optimizer.register_step_pre_hook(before_step)
    return seen, clip


def run_update(trainer, trajectory, advantages, order, monkeypatch):
    seen, clip = capture_first_step(trainer)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    stats = trainer.update(trajectory, advantages, training_order=order)
    return seen, stats


def _close(actual, expected, rtol=2e-4):
    scale = max(float(e.abs().max()) for e in expected)
    assert scale > 0, "the reference gradient is zero: the test would prove nothing"
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=rtol * scale)


# ----------------------------------------------------------------------------------------------
# Loss scale
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train_batch_size, accumulation", [(2, 2), (1, 4), (4, 1)])
def test_gradient_of_a_step_is_the_per_sample_per_timestep_reference(flux_folder, tmp_path, monkeypatch,
                                                                     train_batch_size, accumulation):
    trainer = make_trainer(flux_folder, tmp_path, train_batch_size=train_batch_size,
                           gradient_accumulation_steps=accumulation, max_grad_norm=0.0)
    trajectory = trainer.collect()
    advantages = torch.tensor([1.5, -0.5, 0.25, -1.25])
    order = torch.tensor([2, 0, 3, 1])
    steps = trainer.trained_steps(trajectory)
    assert steps.shape == (4, 3)  # T = 3 trainable steps of 4 (the last transition is not trained)
    expected = reference_gradient(trainer, trajectory, advantages, steps, order)
    seen, stats = run_update(trainer, trajectory, advantages, order, monkeypatch)
    assert stats.optimizer_steps == 1 and len(seen) == 1
    _close(seen[0]["raw"], expected)
    # No clipping asked (max_grad_norm 0): the optimizer sees the raw gradient.
    _close(seen[0]["clipped"], expected)


def test_each_optimizer_step_averages_its_own_samples(flux_folder, tmp_path, monkeypatch):
    """Two optimizer steps per iteration: the first step's gradient is the reference over its two
    samples alone (scale 1 / (2 samples * T)), not over the iteration."""
    trainer = make_trainer(flux_folder, tmp_path, train_batch_size=1, gradient_accumulation_steps=2,
                           max_grad_norm=0.0)
    trajectory = trainer.collect()
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    order = torch.tensor([3, 0, 1, 2])
    steps = trainer.trained_steps(trajectory)
    expected = reference_gradient(trainer, trajectory, advantages, steps, order[:2])
    seen, stats = run_update(trainer, trajectory, advantages, order, monkeypatch)
    assert stats.optimizer_steps == 2
    _close(seen[0]["raw"], expected)


# ----------------------------------------------------------------------------------------------
# Gradient clipping
# ----------------------------------------------------------------------------------------------


def test_gradient_clipping_is_applied_before_the_step(flux_folder, tmp_path, monkeypatch):
    trainer = make_trainer(flux_folder, tmp_path, max_grad_norm=1e-4)
    trajectory = trainer.collect()
    advantages = torch.tensor([1.0, -1.0, 1.0, -1.0])
    order = torch.arange(4)
    steps = trainer.trained_steps(trajectory)
    expected = reference_gradient(trainer, trajectory, advantages, steps, order)
    raw_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in expected])))
    assert raw_norm > 1e-3  # well above the bound, or the test shows nothing
    seen, stats = run_update(trainer, trajectory, advantages, order, monkeypatch)
    assert seen[0]["bound"] == 1e-4
    clipped_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen[0]["clipped"]])))
    assert clipped_norm == pytest.approx(1e-4, rel=1e-3)
    # The direction is kept, and the logged norm is the raw one.
    _close([g * (raw_norm / clipped_norm) for g in seen[0]["clipped"]], expected, rtol=1e-3)
    assert stats.grad_norm == pytest.approx(raw_norm, rel=1e-3)


# ----------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------


def _group_normalised(rewards, group_size):
    """(r - mean) / (std + 1e-8) per group, unbiased std, in float64 by hand."""
    out = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start:start + group_size]]
        mean = sum(group) / len(group)
        std = (sum((r - mean) ** 2 for r in group) / (len(group) - 1)) ** 0.5
        out += [(r - mean) / (std + 1e-8) for r in group]
    return torch.tensor(out, dtype=torch.float32)


def test_advantages_sign_normalisation_weights_and_nan_groups():
    scores = {"a": torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0]),
              "b": torch.tensor([0.0, 1.0, 0.0, 1.0, 2.0, 0.0, 1.0, 1.0])}
    adv, valid = compute_advantages(scores, {"a": 1.0, "b": 0.5}, group_size=4)
    expected = _group_normalised(scores["a"], 4) + 0.5 * _group_normalised(scores["b"], 4)
    torch.testing.assert_close(adv, expected)
    assert valid.all()
    only_a, _ = compute_advantages({"a": scores["a"]}, {"a": 1.0}, group_size=4)
    assert only_a[3] > 0 > only_a[0]  # the best sample of a group is pushed up, the worst down
    assert torch.equal(only_a[4:], torch.zeros(4))  # equal rewards: nothing to learn
    # A NaN in any reward makes its whole group unusable: zero advantage, left out of the stats.
    broken = {"a": scores["a"].clone(), "b": scores["b"].clone()}
    broken["b"][5] = float("nan")
    adv, valid = compute_advantages(broken, {"a": 1.0, "b": 0.5}, group_size=4)
    assert valid.tolist() == [True] * 4 + [False] * 4
    torch.testing.assert_close(adv[:4], expected[:4])
    assert torch.equal(adv[4:], torch.zeros(4))


def test_global_advantages_use_every_ranks_rewards():
    rank_scores = [torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 0.0, float("nan"), 1.0])]
    everything = torch.cat(rank_scores)

    def gather(t):  # rank 1 sees rank 0's values before its own
        other = torch.tensor([1.0, 2.0, 3.0, 4.0]) if t.dtype != torch.uint8 else torch.ones(4, dtype=torch.uint8)
        return torch.cat([other, t])

    adv, valid = compute_advantages({"r": rank_scores[1]}, {"r": 2.0}, group_size=2, mode="global",
                                    gather=gather, rank=1)
    assert valid.tolist() == [True, True, False, False]
    usable = torch.cat([everything[:4], everything[4:6]]).double()
    expected = 2.0 * (usable[4:6] - usable.mean()) / (usable.std() + 1e-8)
    torch.testing.assert_close(adv[:2], expected.float())
    assert torch.equal(adv[2:], torch.zeros(2))


def test_the_iteration_hands_the_update_the_rewards_advantages(flux_folder, tmp_path, monkeypatch):
    """Through train_iteration: the advantages the update receives are the group-normalised
    rewards of the samples (sign included), computed here by hand from the logged scores."""
    trainer = make_trainer(flux_folder, tmp_path)
    seen = {}
    original_collect = trainer.collect_and_score

    def collect_and_score():
        result = original_collect()
        seen["scores"] = result[2]["brightness"].clone()
        return result

    def update(trajectory, advantages, training_order=None):
        seen["advantages"] = advantages.clone()
        return original_update(trajectory, advantages, training_order)

    original_update = trainer.update
    monkeypatch.setattr(trainer, "collect_and_score", collect_and_score)
    monkeypatch.setattr(trainer, "update", update)
    trainer.train_iteration()
    expected = _group_normalised(seen["scores"], 2)
    assert expected.abs().max() > 0.5
    torch.testing.assert_close(seen["advantages"], expected)


# ----------------------------------------------------------------------------------------------
# SDE window
# ----------------------------------------------------------------------------------------------


def test_an_sde_window_trains_only_its_steps(flux_folder, tmp_path, monkeypatch):
    trainer = make_trainer(flux_folder, tmp_path, sde_window_start=1, sde_window_size=2, max_grad_norm=0.0)
    trajectory = trainer.collect()
    assert torch.isnan(trajectory.log_probs[:, [0, 3]]).all() and torch.isfinite(trajectory.log_probs[:, [1, 2]]).all()
    steps = trainer.trained_steps(trajectory)
    assert sorted(steps.unique().tolist()) == [1, 2]  # window [1, 3); step 2 is not the last transition
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    order = torch.arange(4)
    expected = reference_gradient(trainer, trajectory, advantages, steps, order)
    predicted = []
    original = trainer.policy.predict
    monkeypatch.setattr(trainer.policy, "predict",
                        lambda latents, step, *a, **k: (predicted.extend(step.tolist()), original(latents, step, *a, **k))[1])
    seen, _ = run_update(trainer, trajectory, advantages, order, monkeypatch)
    assert set(predicted) == {1, 2}  # the model is only run (and trained) at the window's steps
    _close(seen[0]["raw"], expected)
