"""What the policy tests (text- and image-conditioned families) measure on a trainer: training-time
log-probs of given steps, and every component's parameters."""
from __future__ import annotations

import torch

from dancegrpo_fast import ops


def log_probs_at(trainer, trajectory, steps, batch_size=2):
    """(B, T) training-time log-probs of the given per-sample steps, `batch_size` samples per call."""
    cond = trainer.policy.encode(trajectory.prompts)
    out = torch.empty(steps.shape)
    with torch.no_grad():
        for rows in torch.arange(trajectory.batch_size).split(batch_size):
            for j in range(steps.shape[1]):
                step = steps[rows, j]
                v, x, x_next, _ = trainer.updater._forward(trajectory, cond, rows, step)
                out[rows, j] = ops.step_log_prob(v, x, x_next, trainer.schedule.coefficients(step, trainer.device))
    return out


def pipeline_parameters(policy):
    """{component.key: a copy} of every torch module of the policy's pipeline."""
    return {f"{name}.{key}": value.detach().clone()
            for name, module in policy.pipe.components.items() if isinstance(module, torch.nn.Module)
            for key, value in module.state_dict().items()}


def check_on_policy_and_one_update(trainer, trajectory, num_steps: int, use_lora: bool) -> None:
    """The rollout's log-probs equal the training pass's at the same parameters (every step), and
    one update on a fixed batch (advantages +1, -1, -1, +1) changes only trainable parameters of
    the policy's model (only LoRA weights under LoRA), with ratio exactly 1 before its first
    optimizer step, and lowers the surrogate loss."""
    policy = trainer.policy
    all_steps = torch.arange(num_steps).repeat(trajectory.batch_size, 1)
    recomputed = log_probs_at(trainer, trajectory, all_steps)
    assert ((recomputed - trajectory.log_probs).exp() - 1).abs().max() < 1e-6

    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    steps = trainer.trained_steps(trajectory)
    before_lp = log_probs_at(trainer, trajectory, steps)
    before = pipeline_parameters(policy)
    trainable = {n for n, p in policy.model.named_parameters() if p.requires_grad}
    stats = trainer.update(trajectory, advantages)
    assert stats.first_step_ratio_max_dev == 0.0
    after = pipeline_parameters(policy)
    after_lp = log_probs_at(trainer, trajectory, steps)
    prefix = f"{policy.model_component}."
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed, "the update changed nothing"
    assert all(k.startswith(prefix) and k[len(prefix):] in trainable for k in changed), \
        sorted(changed - {prefix + t for t in trainable})[:5]
    if use_lora:
        assert all("lora" in k for k in changed)
    ratio = torch.exp(after_lp - before_lp)
    assert -(advantages[:, None] * ratio).mean() < -(advantages[:, None] * torch.ones_like(ratio)).mean()
