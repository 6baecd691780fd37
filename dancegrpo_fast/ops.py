"""Dispatch: the fused ops the rest of the package calls.

Backend choice (`backend="auto"`): Triton compiled for CUDA tensors; the Triton interpreter for
CPU tensors when TRITON_INTERPRET=1 (how CI tests the kernels); the PyTorch twins otherwise. The
environment variable DANCEGRPO_FAST_BACKEND (auto | triton | torch) sets the default; each op also
takes `backend=` to force one.

- `fused_step_loss`: step log-prob + GRPO clipped loss (+ KL), one pass forward, one backward.
- `step_log_prob`: the (B,) log-prob alone, differentiable w.r.t. the model output.
- `sde_step`: a rollout step (next latents and their log-prob), noise given or from seeds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import kernels
from .kernels import step_loss_torch
from .kernels.sde_step_torch import sde_step_torch
from .noise import grouped_noise, seed_for_step
from .sde import SDEStepOutput, StepCoefficients, check_step_shapes

BACKENDS = ("auto", "triton", "torch")


def _default_backend() -> str:
    value = os.environ.get("DANCEGRPO_FAST_BACKEND", "auto").lower()
    if value not in BACKENDS:
        raise ValueError(f"DANCEGRPO_FAST_BACKEND must be one of {BACKENDS}, got {value!r}")
    return value


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """'triton' or 'torch' for tensors on `device`."""
    backend = (backend or _default_backend()).lower()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    mode = kernels.triton_mode()
    if backend == "torch":
        return "torch"
    usable = (mode == "compiled" and device.type == "cuda") or (mode == "interpreted" and device.type == "cpu")
    if backend == "triton" and not usable:
        raise RuntimeError(f"backend='triton' asked for {device.type} tensors but Triton is {mode}"
                           + (f" ({kernels.TRITON_ERROR})" if kernels.TRITON_ERROR else "")
                           + "; CPU tensors need TRITON_INTERPRET=1 set before import")
    return "triton" if usable else "torch"


@dataclass
class StepLossOutput:
    """loss: differentiable scalar. The rest are detached float32 (B,) tensors for logging:
    log_prob (new), ratio exp(log_prob - old_log_prob), clipped (1.0 where |ratio - 1| >
    clip_range, so the clipped branch can take over), kl (0 without a reference output)."""

    loss: Tensor
    log_prob: Tensor
    ratio: Tensor
    clipped: Tensor
    kl: Tensor


def _check_coefficients(coeffs: StepCoefficients, batch: int, device: torch.device,
                        need_log_prob: bool) -> None:
    if not isinstance(coeffs, StepCoefficients):
        raise TypeError(f"coeffs must be a StepCoefficients (see dancegrpo_fast.sde "
                        f"*_coefficients), got {type(coeffs).__name__}")
    for name in ("a", "b", "s"):
        t = getattr(coeffs, name)
        if t.shape != (batch,):
            raise ValueError(f"coeffs.{name} must have shape ({batch},) (one per sample), got "
                             f"{tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"coeffs.{name} is on {t.device} but the latents are on {device}")
    if need_log_prob and coeffs.step_kind() != "sde":
        raise ValueError("the step is deterministic (coeffs.s == 0 for some sample): it has no "
                         "log-prob. ODE steps (outside the SDE window) are never trained")


def _check_per_sample(t: Tensor, name: str, batch: int) -> None:
    if not isinstance(t, Tensor) or t.shape != (batch,):
        raise ValueError(f"{name} must be a tensor of shape ({batch},), got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    # Values are checked only where it costs no device sync; on a GPU the producers check them
    # (group_advantages refuses non-finite rewards).
    if t.device.type == "cpu" and not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite (found NaN or inf)")


def fused_step_loss(model_output: Tensor, latents: Tensor, next_latents: Tensor,
                    coeffs: StepCoefficients, old_log_prob: Optional[Tensor], advantages: Tensor,
                    clip_range: float = 1e-4, adv_clip_max: float = 5.0,
                    ref_model_output: Optional[Tensor] = None, kl_beta: float = 0.0,
                    backend: Optional[str] = None) -> StepLossOutput:
    """GRPO loss of one sampler step, fused: equals

        grpo_loss(log_prob(x' | a x + b v, s), old_log_prob, advantages, clip_range, adv_clip_max)
        + kl_beta * mean(b^2 mean_N((v - v_ref)^2) / (2 s^2))

    model_output v (B, ...) requires grad (any float dtype); latents x and next_latents x' match
    its shape; coeffs from the `*_coefficients` builders; old_log_prob, advantages (B,). The
    gradient flows to model_output only.

    old_log_prob=None means on-policy (the parameters are those that sampled, as before the first
    optimizer step of an iteration): the op uses its own detached log-prob, so the ratio is
    exactly 1 on every backend and no separate log-prob pass is needed. Never materialises latent-sized float32 temporaries on
    the Triton path (and at most row blocks of them on the PyTorch path).
    """
    check_step_shapes(model_output, latents, next_latents)
    batch = latents.shape[0]
    _check_coefficients(coeffs, batch, latents.device, need_log_prob=True)
    if old_log_prob is not None:
        _check_per_sample(old_log_prob, "old_log_prob", batch)
    _check_per_sample(advantages, "advantages", batch)
    if not clip_range >= 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range!r}")
    if not adv_clip_max > 0:
        raise ValueError(f"adv_clip_max must be > 0, got {adv_clip_max!r}")
    if not kl_beta >= 0:
        raise ValueError(f"kl_beta must be >= 0, got {kl_beta!r}")
    if kl_beta > 0 and ref_model_output is None:
        raise ValueError("kl_beta > 0 needs ref_model_output (the reference policy's output)")
    if ref_model_output is not None and ref_model_output.shape != model_output.shape:
        raise ValueError(f"ref_model_output shape {tuple(ref_model_output.shape)} does not match "
                         f"model_output shape {tuple(model_output.shape)}")
    if resolve_backend(latents.device, backend) == "triton":
        from .kernels.step_loss import TritonStepLoss as fn
    else:
        fn = step_loss_torch.TorchStepLoss
    loss, log_prob, ratio, clipped, kl = fn.apply(
        model_output, latents, next_latents, ref_model_output, coeffs.a, coeffs.b, coeffs.s,
        old_log_prob, advantages, clip_range, adv_clip_max, kl_beta)
    return StepLossOutput(loss=loss, log_prob=log_prob, ratio=ratio, clipped=clipped, kl=kl)


def step_log_prob(model_output: Tensor, latents: Tensor, next_latents: Tensor,
                  coeffs: StepCoefficients, backend: Optional[str] = None) -> Tensor:
    """(B,) float32 log-prob of next_latents under Normal(a x + b v, s^2) (element mean),
    differentiable w.r.t. model_output; one pass forward, one backward. Bit-identical to the
    log_prob that `fused_step_loss` computes on the same backend, so it can serve as the "old"
    log-prob of a later update."""
    check_step_shapes(model_output, latents, next_latents)
    _check_coefficients(coeffs, latents.shape[0], latents.device, need_log_prob=True)
    if resolve_backend(latents.device, backend) == "triton":
        from .kernels.step_loss import TritonStepLogProb as fn
    else:
        fn = step_loss_torch.TorchStepLogProb
    return fn.apply(model_output, latents, next_latents, coeffs.a, coeffs.b, coeffs.s)


def _step_seeds(seeds, step_index: Optional[int], batch: int, device: torch.device) -> Tensor:
    seeds = torch.as_tensor(seeds)
    if seeds.shape != (batch,) or seeds.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"seeds must be an integer tensor of shape ({batch},) (one per sample), "
                         f"got {seeds.dtype} {tuple(seeds.shape)}")
    if step_index is None:
        return seeds.to(device=device, dtype=torch.int64)
    return seed_for_step(seeds.to(torch.int64), int(step_index)).to(device)


@torch.no_grad()
def sde_step(model_output: Tensor, latents: Tensor, coeffs: StepCoefficients,
             noise: Optional[Tensor] = None, seeds: Optional[Tensor] = None,
             step_index: Optional[int] = None, backend: Optional[str] = None) -> SDEStepOutput:
    """One rollout step in one pass: x' = a x + b v + s * eps and log_prob(x').

    noise: eps of the latents' shape; or seeds: (B,) int64 per-sample seeds, with step_index
    mixed in by `noise.seed_for_step` so that every (sample, step) gets its own reproducible
    stream (the same numbers on CPU and GPU, in any batch). With s == 0 for every sample (an ODE
    step) no noise is drawn and log_prob is None.
    """
    check_step_shapes(model_output, latents)
    batch = latents.shape[0]
    _check_coefficients(coeffs, batch, latents.device, need_log_prob=False)
    kind = coeffs.step_kind()
    if kind == "mixed":
        raise ValueError("coeffs.s must be > 0 for every sample of a stochastic step (or 0 for all "
                         "samples of an ODE step)")
    deterministic = kind == "ode"
    if noise is not None and seeds is not None:
        raise ValueError("give either noise or seeds, not both")
    if noise is not None and noise.shape != latents.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} does not match latents shape "
                         f"{tuple(latents.shape)}")
    if not deterministic and noise is None and seeds is None:
        raise ValueError("a stochastic step needs noise or seeds")
    use_triton = resolve_backend(latents.device, backend) == "triton"
    if deterministic:
        noise = seeds = None
    elif seeds is not None:
        seeds = _step_seeds(seeds, step_index, batch, latents.device)
        if not use_triton:
            noise = grouped_noise(seeds, 1, tuple(latents.shape[1:]), torch.float32, latents.device)
            seeds = None
    if use_triton:
        from .kernels.sde_step import sde_step_triton

        prev_sample, sq = sde_step_triton(model_output, latents, coeffs.a, coeffs.b, coeffs.s,
                                          noise=noise, seeds=seeds)
    else:
        prev_sample, sq = sde_step_torch(model_output, latents, coeffs.a, coeffs.b, coeffs.s, noise=noise)
    if deterministic:
        return SDEStepOutput(prev_sample=prev_sample, log_prob=None, std=coeffs.s)
    n = latents[0].numel()
    std = coeffs.s.to(torch.float32)
    return SDEStepOutput(prev_sample=prev_sample, log_prob=step_loss_torch.log_prob_from_sums(sq, std, n), std=std)
