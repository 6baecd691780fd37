"""Advantages and the GRPO loss (dancegrpo_fast.grpo) against float64 oracles."""
import math

import pytest
import torch

import oracle
from dancegrpo_fast import (combine_advantages, global_advantages, group_advantages, grpo_loss,
                            grpo_per_sample_loss)


@pytest.mark.parametrize("batch,group", [(2, 2), (12, 12), (24, 4), (48, 16)])
def test_group_advantages_against_oracle(batch, group):
    rewards = torch.randn(batch) * 3 + 1
    adv = group_advantages(rewards, group)
    assert adv.shape == (batch,) and adv.dtype == torch.float32
    assert torch.allclose(adv.double(), oracle.group_advantages(rewards, group), atol=1e-6)
    # each group is centred with unit unbiased std
    g = adv.view(-1, group).double()
    assert torch.allclose(g.mean(1), torch.zeros(batch // group, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(g.std(1, unbiased=True), torch.ones(batch // group, dtype=torch.float64), atol=1e-5)


def test_constant_group_gets_zero_advantage():
    rewards = torch.tensor([0.5, 0.5, 0.5, 1.0, 2.0, 3.0])
    adv = group_advantages(rewards, 3)
    assert torch.equal(adv[:3], torch.zeros(3))
    assert adv[3] < 0 < adv[5]


def test_global_advantages():
    rewards = torch.randn(16)
    adv = global_advantages(rewards)
    expect = (rewards.double() - rewards.double().mean()) / (rewards.double().std() + 1e-8)
    assert torch.allclose(adv.double(), expect, atol=1e-6)


def test_combine_advantages_is_weighted_sum():
    a, b = torch.randn(8), torch.randn(8)
    out = combine_advantages({"hps": a, "clip": b}, {"hps": 0.7, "clip": 1.4})
    assert torch.allclose(out, 0.7 * a + 1.4 * b)
    assert torch.allclose(combine_advantages([a, b], [1.0, -2.0]), a - 2 * b)
    with pytest.raises(ValueError, match="weights must name the same rewards"):
        combine_advantages({"hps": a}, {"clip": 1.0})
    with pytest.raises(ValueError, match="one weight per advantage"):
        combine_advantages([a, b], [1.0])


@pytest.mark.parametrize("group", [1, 0, -2, 2.0])
def test_group_size_below_two_is_an_error(group):
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        group_advantages(torch.randn(8), group)


def test_group_size_must_divide_batch():
    with pytest.raises(ValueError, match="group_size=3 does not divide the batch of 8"):
        group_advantages(torch.randn(8), 3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rewards_are_an_error(bad):
    rewards = torch.randn(8)
    rewards[5] = bad
    with pytest.raises(ValueError, match=r"rewards must be finite: NaN or infinite values at samples \[5\]"):
        group_advantages(rewards, 4)
    with pytest.raises(ValueError, match="rewards must be finite"):
        global_advantages(rewards)


def test_rewards_must_be_one_dimensional():
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.randn(4, 2), 2)


@pytest.mark.parametrize("clip_range", [1e-4, 0.2])
def test_grpo_loss_against_oracle(clip_range):
    batch = 32
    lp = torch.randn(batch) * 0.1
    old = lp + torch.randn(batch) * 0.05
    adv = torch.randn(batch) * 4
    loss = grpo_loss(lp, old, adv, clip_range=clip_range, adv_clip_max=5.0)
    expect = oracle.grpo_loss(lp.double(), old.double(), adv.double(), clip_range, 5.0)
    assert loss.shape == () and math.isclose(float(loss), float(expect), rel_tol=1e-5, abs_tol=1e-6)
    assert grpo_per_sample_loss(lp, old, adv, clip_range).shape == (batch,)


def test_on_policy_loss_is_minus_mean_clamped_advantage():
    lp = torch.randn(10)
    adv = torch.randn(10) * 6
    loss = grpo_loss(lp, lp.clone(), adv, clip_range=1e-4, adv_clip_max=5.0)
    assert math.isclose(float(loss), float(-adv.clamp(-5, 5).mean()), rel_tol=1e-6, abs_tol=1e-6)


def test_grpo_loss_shape_errors():
    with pytest.raises(ValueError, match="old_log_prob must have shape"):
        grpo_loss(torch.randn(4), torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="advantages must have shape"):
        grpo_loss(torch.randn(4), torch.randn(4), torch.randn(4, 1))
