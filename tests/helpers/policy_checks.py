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
