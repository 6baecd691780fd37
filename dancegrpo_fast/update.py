"""The GRPO update of one iteration (SPEC 2): per-sample timestep subsets, the fused loss over
micro-batches with gradient accumulation, gradient clipping, the optimizer step.

Ratio exactly 1 on-policy. The "old" log-prob of a trained (sample, step) is computed by the
training-time forward pass (same micro-batch, same per-sample timesteps, same autocast) while
the parameters are still the ones that sampled:
- for the training batches of the first optimizer step of an iteration the fused loss is called
  with old_log_prob=None: it uses the detached log-prob of the very forward pass being trained
  (free), so the ratio is exactly 1 on every backend;
- for the training batches of later optimizer steps of the same iteration, a no-grad pass with
  the same inputs runs before the first optimizer step and stores them.
The rollout's own log-probs (batched differently, without grad) are kept for diagnostics: the
logged `log_prob_gap` is their largest difference from the training-time values.

The samples trained are those `training_order` lists: all of the trajectory's, or with bestofn
only the kept ones (the trainer selects them).

Loss scale: each (micro-batch, timestep) loss is the mean over the micro-batch's samples of the
clipped surrogate, multiplied by 1 / (gradient_accumulation_steps * T) before backward, so one
optimizer step's gradient is the mean over its samples and their T trained timesteps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from . import ops
from .config import GRPOConfig, OptimConfig
from .distributed import gradient_sync
from .grpo import step_kl
from .noise import mix_seed
from .policies.base import Policy
from .rollout import autocast_context
from .schedules import StepSchedule
from .trajectory import Trajectory


@dataclass
class UpdateStats:
    loss: float
    ratio_mean: float
    ratio_max_dev: float
    clip_fraction: float
    kl: float
    grad_norm: float
    log_prob_gap: float
    optimizer_steps: int
    first_step_ratio_max_dev: float
    # Model evaluations of this rank's update, one per sample (classifier-free guidance counts two):
    # forwards with and without grad (old log-probs, the KL reference) and backwards.
    forward_passes: int = 0
    backward_passes: int = 0

    def metrics(self) -> dict:
        return {"loss": self.loss, "ratio_mean": self.ratio_mean, "ratio_max_dev": self.ratio_max_dev,
                "first_step_ratio_max_dev": self.first_step_ratio_max_dev, "clip_fraction": self.clip_fraction,
                "kl": self.kl, "grad_norm": self.grad_norm, "log_prob_gap": self.log_prob_gap,
                "optimizer_steps": self.optimizer_steps}


def trained_steps(sample_seeds: Tensor, trainable: List[int], count: int) -> Tensor:
    """(B, T) int64 step indices: per sample, its own permutation of the trainable steps (SDE
    steps without the last transition), seeded by the sample's seed, first T = count kept."""
    trainable = torch.tensor(trainable, dtype=torch.int64)
    rows = []
    for seed in sample_seeds.tolist():
        generator = torch.Generator().manual_seed(mix_seed(seed, 5))
        rows.append(trainable[torch.randperm(len(trainable), generator=generator)[:count]])
    return torch.stack(rows)


class GRPOUpdate:
    """Calls: `update(trajectory, advantages, steps, training_order) -> UpdateStats`.

    reference: the frozen reference model of the KL term (a full fine-tune's copy of the base
    model), or None: under LoRA the reference is the model with its adapters disabled.
    optimizer_step: clips the gradient, steps the optimizer and returns the gradient norm."""

    def __init__(self, policy: Policy, schedule: StepSchedule, grpo: GRPOConfig, optim: OptimConfig,
                 mixed_precision: str, optimizer_step: Callable[[], float], reference: Optional[nn.Module] = None):
        self.policy, self.schedule = policy, schedule
        self.grpo, self.optim = grpo, optim
        self.mixed_precision = mixed_precision
        self.optimizer_step = optimizer_step
        self.reference = reference
        self.device = policy.device

    def _forward(self, trajectory: Trajectory, cond, rows: Tensor, steps: Tensor, module=None):
        at = trajectory.latents.device
        latents = trajectory.latents[rows.to(at), steps.to(at)]
        next_latents = trajectory.latents[rows.to(at), steps.to(at) + 1]
        batch_cond = {k: v[trajectory.prompt_rows[rows].to(v.device)] for k, v in cond.items()}
        with autocast_context(self.device, self.mixed_precision):
            model_output = self.policy.predict(latents, steps, batch_cond, self.schedule, module=module)
        return model_output, latents, next_latents, batch_cond

    def _reference_output(self, latents, steps, batch_cond):
        with torch.no_grad(), autocast_context(self.device, self.mixed_precision):
            if self.reference is None:  # LoRA: the base model is the model without its adapters
                self.policy.model.disable_adapters()
                try:
                    return self.policy.predict(latents, steps, batch_cond, self.schedule, module=self.policy.model)
                finally:
                    self.policy.model.enable_adapters()
            return self.policy.predict(latents, steps, batch_cond, self.schedule, module=self.reference)

    def __call__(self, trajectory: Trajectory, advantages: Tensor, steps: Tensor, training_order: Tensor) -> UpdateStats:
        """steps: (B, T) trained step indices (trained_steps); training_order: (B,) the order in
        which samples are cut into micro-batches."""
        g, o = self.grpo, self.optim
        batch = trajectory.batch_size
        count = steps.shape[1]
        micro_batches = list(training_order.split(o.batch_size))
        accumulation = o.gradient_accumulation_steps
        groups = [micro_batches[i:i + accumulation] for i in range(0, len(micro_batches), accumulation)]
        cond = self.policy.encode(trajectory.prompts)
        advantages = advantages.to(self.device, torch.float32)
        old_log_probs = torch.full((batch, count), float("nan"), dtype=torch.float32, device=self.device)
        per_call = 2 if getattr(self.policy, "uses_cfg", False) else 1
        forwards = backwards = 0
        # Old log-probs of the batches trained after the first optimizer step: training-time forward
        # at the sampling parameters (see the module docstring).
        if len(groups) > 1:
            with torch.no_grad():
                for group in groups[1:]:
                    for rows in group:
                        for j in range(count):
                            v, x, x_next, _ = self._forward(trajectory, cond, rows, steps[rows, j])
                            coeffs = self.schedule.coefficients(steps[rows, j], self.device)
                            old_log_probs[rows.to(self.device), j] = ops.step_log_prob(v, x, x_next, coeffs)
                            forwards += len(rows) * per_call
        scale = 1.0 / (accumulation * count)
        # Statistics stay on the device until the end: a float() per micro-step would stall the
        # GPU pipeline at every step.
        zero = torch.zeros((), dtype=torch.float32, device=self.device)
        totals = {"loss": zero.clone(), "ratio": zero.clone(), "clipped": zero.clone(), "kl": zero.clone()}
        n_trained, grad_norms = 0, []
        ratio_max_dev = first_step_dev = zero.clone()
        module = self.policy.forward_model
        for group_index, group in enumerate(groups):
            for k, rows in enumerate(group):
                device_rows = rows.to(self.device)
                for j in range(count):
                    sync = k == len(group) - 1 and j == count - 1
                    with gradient_sync(module, self.policy.model, sync):
                        step = steps[rows, j]
                        v, x, x_next, batch_cond = self._forward(trajectory, cond, rows, step)
                        coeffs = self.schedule.coefficients(step, self.device)
                        reference = self._reference_output(x, step, batch_cond) if g.kl_beta > 0 else None
                        # Before the first optimizer step the sampling policy is the one being
                        # trained: old_log_prob=None makes the op use its own log-prob (ratio 1).
                        old = None if group_index == 0 else old_log_probs[device_rows, j]
                        if reference is not None and g.kl_convention != "exact":
                            # The fused op weighs every sample's KL by one scalar; here each sample
                            # has its own step's weight (|dsigma|, kl_convention flow_grpo), so
                            # the KL term is added in PyTorch.
                            out = ops.fused_step_loss(v, x, x_next, coeffs, old, advantages[device_rows],
                                                      clip_range=g.clip_range, adv_clip_max=g.adv_clip_max)
                            kl = self.schedule.kl_weight(step, g.kl_convention, self.device) * step_kl(
                                v, reference, coeffs.b, coeffs.s)
                            loss = out.loss + g.kl_beta * kl.mean()
                            out.kl = kl.detach()
                        else:
                            out = ops.fused_step_loss(v, x, x_next, coeffs, old, advantages[device_rows],
                                                      clip_range=g.clip_range, adv_clip_max=g.adv_clip_max,
                                                      ref_model_output=reference, kl_beta=g.kl_beta)
                            loss = out.loss
                        (loss * scale).backward()
                        forwards += len(rows) * per_call * (2 if reference is not None else 1)
                        backwards += len(rows) * per_call
                        if group_index == 0:
                            old_log_probs[device_rows, j] = out.log_prob
                    totals["loss"] += loss.detach() * scale
                    totals["ratio"] += out.ratio.sum()
                    totals["clipped"] += out.clipped.sum()
                    totals["kl"] += out.kl.sum()
                    n_trained += int(out.ratio.numel())
                    ratio_max_dev = torch.maximum(ratio_max_dev, (out.ratio - 1).abs().max())
            if group_index == 0:
                first_step_dev = ratio_max_dev.clone()
            grad_norms.append(self.optimizer_step())
        # Over the trained samples only (with bestofn the others have no training-time log-prob).
        at = trajectory.log_probs.device
        trained = training_order.to(at)
        rollout_lp = trajectory.log_probs[trained[:, None], steps.to(at)[trained]]
        gap = float((rollout_lp.to(self.device) - old_log_probs[training_order.to(self.device)]).abs().max())
        n = max(n_trained, 1)
        return UpdateStats(loss=float(totals["loss"]) / len(groups), ratio_mean=float(totals["ratio"]) / n,
                           ratio_max_dev=float(ratio_max_dev), clip_fraction=float(totals["clipped"]) / n,
                           kl=float(totals["kl"]) / n, grad_norm=sum(grad_norms) / len(grad_norms), log_prob_gap=gap,
                           optimizer_steps=len(groups), first_step_ratio_max_dev=float(first_step_dev),
                           forward_passes=forwards, backward_passes=backwards)
