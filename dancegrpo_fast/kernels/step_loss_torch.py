"""PyTorch twin of `step_loss.py`: the same fused op with its own backward, for the CPU.

Same math (see step_loss.py). Works on blocks of rows so that the float32 temporaries are at most
about ROW_BLOCK_ELEMENTS elements, however large the latents: the only latent-sized buffer it
creates is the gradient itself. Autograd through the reference would keep the float32 casts of
v, x, x' and the mean alive for the backward; this recomputes them instead.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import HALF_LOG_2PI

ROW_BLOCK_ELEMENTS = 1 << 18  # 1 MiB of float32 per temporary


def row_blocks(batch: int, n: int):
    """(rows, cols) slices tiling a (batch, n) matrix in blocks of about ROW_BLOCK_ELEMENTS:
    several whole rows when rows are short, column pieces of one row when they are long."""
    if n <= ROW_BLOCK_ELEMENTS:
        rows = max(1, ROW_BLOCK_ELEMENTS // max(n, 1))
        for start in range(0, batch, rows):
            yield slice(start, min(batch, start + rows)), slice(None)
        return
    for row in range(batch):
        for col in range(0, n, ROW_BLOCK_ELEMENTS):
            yield slice(row, row + 1), slice(col, min(n, col + ROW_BLOCK_ELEMENTS))


def compute_dtype(t: Tensor) -> torch.dtype:
    """float32 arithmetic, except float64 inputs stay float64 (gradcheck, oracles)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _residual(v2: Tensor, x2: Tensor, xn2: Tensor, a: Tensor, b: Tensor, rs: slice, cs: slice) -> Tensor:
    """d = x' - (a x + b v) on block (rs, cs), in a's dtype (float32), one new buffer."""
    d = v2[rs, cs].to(a.dtype, copy=True)
    d.mul_(-b[rs, None])
    d.addcmul_(x2[rs, cs], -a[rs, None])
    d.add_(xn2[rs, cs])
    return d


def row_sums(v2: Tensor, x2: Tensor, xn2: Tensor, vref2: Optional[Tensor], a: Tensor, b: Tensor):
    """Per-row sum(d^2) and, with a reference output, sum((v - v_ref)^2), float32 (B,)."""
    batch, n = v2.shape
    sq = torch.zeros(batch, dtype=a.dtype, device=v2.device)
    klsq = torch.zeros(batch, dtype=a.dtype, device=v2.device)
    for rs, cs in row_blocks(batch, n):
        d = _residual(v2, x2, xn2, a, b, rs, cs)
        sq[rs] += torch.linalg.vecdot(d, d, dim=1)
        if vref2 is not None:
            torch.sub(v2[rs, cs], vref2[rs, cs], out=d)
            klsq[rs] += torch.linalg.vecdot(d, d, dim=1)
    return sq, klsq


def log_prob_from_sums(sq: Tensor, s: Tensor, n: int) -> Tensor:
    return -0.5 * sq / (n * s * s) - torch.log(s) - HALF_LOG_2PI


def finish_terms(sq: Tensor, klsq: Tensor, b: Tensor, s: Tensor, n: int, old_log_prob: Tensor,
                 advantages: Tensor, clip_range: float, adv_clip_max: float, kl_beta: float):
    """Per-sample GRPO terms from the row sums, and the gradient coefficients of the loss.

    old_log_prob None means on-policy: the ratio is exactly 1.
    Returns loss (scalar), log_prob, ratio, clipped, kl, coef_d, coef_kl (all float32 (B,)), where
    dloss/dv = coef_d * d + coef_kl * (v - v_ref) row by row.
    """
    batch = sq.shape[0]
    inv_var = 1.0 / (s * s)
    log_prob = log_prob_from_sums(sq, s, n)
    adv = advantages.to(sq.dtype).clamp(-adv_clip_max, adv_clip_max)
    # old_log_prob None: on-policy (the sampling policy is the one being trained), ratio exactly 1
    ratio = torch.exp(log_prob - (log_prob if old_log_prob is None else old_log_prob.to(sq.dtype)))
    lo, hi = 1.0 - clip_range, 1.0 + clip_range
    inside = (ratio >= lo) & (ratio <= hi)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(lo, hi)
    loss_i = torch.maximum(unclipped, clipped)
    # d loss_i / d log_prob_i as autograd of the reference computes it (ties split in half).
    g_unclipped = -adv * ratio
    g_clipped = torch.where(inside, g_unclipped, torch.zeros_like(g_unclipped))
    g = torch.where(unclipped > clipped, g_unclipped,
                    torch.where(clipped > unclipped, g_clipped, 0.5 * (g_unclipped + g_clipped)))
    coef_d = g / batch * b / n * inv_var
    kl = 0.5 * b * b * klsq / n * inv_var
    coef_kl = kl_beta / batch * b * b / n * inv_var
    loss = (loss_i + kl_beta * kl).sum() / batch
    return loss, log_prob, ratio, (~inside).to(sq.dtype), kl, coef_d, coef_kl


def grad_rows(v2: Tensor, x2: Tensor, xn2: Tensor, vref2: Optional[Tensor], a: Tensor, b: Tensor,
              coef_d: Tensor, coef_kl: Optional[Tensor]) -> Tensor:
    """dL/dv = coef_d * d + coef_kl * (v - v_ref), in v's dtype."""
    batch, n = v2.shape
    grad = torch.empty_like(v2)
    for rs, cs in row_blocks(batch, n):
        d = _residual(v2, x2, xn2, a, b, rs, cs)
        d.mul_(coef_d[rs, None])
        if vref2 is not None:
            d.add_((v2[rs, cs].to(d.dtype) - vref2[rs, cs].to(d.dtype)).mul_(coef_kl[rs, None]))
        grad[rs, cs] = d
    return grad


def _rows(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.detach().reshape(t.shape[0], -1)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.detach().to(dtype)


class TorchStepLoss(torch.autograd.Function):
    """The fused step loss on PyTorch ops; same interface as kernels.step_loss.TritonStepLoss."""

    @staticmethod
    def forward(ctx, model_output, latents, next_latents, ref_model_output, a, b, s,
                old_log_prob, advantages, clip_range, adv_clip_max, kl_beta):
        v2, x2, xn2, vref2 = _rows(model_output), _rows(latents), _rows(next_latents), _rows(ref_model_output)
        dtype = compute_dtype(model_output)
        a, b, s = _cast(a, dtype), _cast(b, dtype), _cast(s, dtype)
        sq, klsq = row_sums(v2, x2, xn2, vref2, a, b)
        loss, log_prob, ratio, clipped, kl, coef_d, coef_kl = finish_terms(
            sq, klsq, b, s, v2.shape[1], None if old_log_prob is None else _cast(old_log_prob, dtype),
            _cast(advantages, dtype),
            float(clip_range), float(adv_clip_max), float(kl_beta))
        ctx.save_for_backward(v2, x2, xn2, vref2, a, b, coef_d, coef_kl)
        ctx.shape = model_output.shape
        ctx.mark_non_differentiable(log_prob, ratio, clipped, kl)
        return loss, log_prob, ratio, clipped, kl

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        v2, x2, xn2, vref2, a, b, coef_d, coef_kl = ctx.saved_tensors
        scale = grad_loss.detach().to(a.dtype)
        grad = grad_rows(v2, x2, xn2, vref2, a, b, coef_d * scale, coef_kl * scale)
        return (grad.view(ctx.shape),) + (None,) * 11


class TorchStepLogProb(torch.autograd.Function):
    """log_prob (B,) of x' under Normal(a x + b v, s^2), differentiable w.r.t. v."""

    @staticmethod
    def forward(ctx, model_output, latents, next_latents, a, b, s):
        v2, x2, xn2 = _rows(model_output), _rows(latents), _rows(next_latents)
        dtype = compute_dtype(model_output)
        a, b, s = _cast(a, dtype), _cast(b, dtype), _cast(s, dtype)
        sq, _ = row_sums(v2, x2, xn2, None, a, b)
        ctx.save_for_backward(v2, x2, xn2, a, b, s)
        ctx.shape = model_output.shape
        return log_prob_from_sums(sq, s, v2.shape[1])

    @staticmethod
    def backward(ctx, grad_log_prob):
        v2, x2, xn2, a, b, s = ctx.saved_tensors
        coef_d = grad_log_prob.to(b.dtype) * b / (v2.shape[1] * s * s)
        grad = grad_rows(v2, x2, xn2, None, a, b, coef_d, None)
        return grad.view(ctx.shape), None, None, None, None, None
