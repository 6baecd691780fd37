"""Triton: the fused step log-prob + GRPO clipped loss (+ KL), forward and backward.

Per sample i (row of N elements), with mu = a x + b v and d = x' - mu:

    log_prob_i = -sum(d^2) / (2 N s^2) - log s - 0.5 log(2 pi)
    kl_i       = b^2 sum((v - v_ref)^2) / (2 N s^2)          (mu - mu_ref = b (v - v_ref))
    loss       = mean_i(max(-A rho, -A clip(rho, 1-eps, 1+eps))) + beta * mean_i(kl_i)

Forward: one pass over the latents (`_partials_kernel`, per-chunk sums of d^2 and (v-v_ref)^2 in
float32), then one tiny program (`_finish_kernel`) that reduces the chunks, computes the per-sample
terms and the loss, and the per-sample gradient coefficients. Backward: one pass
(`_grad_kernel`) that recomputes d instead of storing it: dL/dv = c_i * d + k_i * (v - v_ref).
Three launches in all; the only memory beyond inputs and the gradient is O(B * chunks).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import BLOCK, HALF_LOG_2PI, chunking, target_programs

FINISH_BLOCK_B = 64
FINISH_BLOCK_C = 16


# Arguments read or written once per program (per-row coefficients and scales, the per-chunk
# partial sums, the tiny per-row outputs) and the chunk count that only indexes them are not
# specialized: their alignment (views of one small buffer shift with B) or divisibility (by
# resolution) would only multiply compiled variants; the streamed tensors, N and CHUNK are, which
# is what gives 128-bit loads (tests/test_kernels_compile.py).
@triton.jit(do_not_specialize=["a_ptr", "b_ptr", "sq_ptr", "klsq_ptr", "NUM_CHUNKS"])
def _partials_kernel(v_ptr, x_ptr, xn_ptr, vref_ptr, a_ptr, b_ptr, sq_ptr, klsq_ptr,
                     N, CHUNK, NUM_CHUNKS,
                     HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    base = row.to(tl.int64) * N
    start = chunk * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_kl = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < N
        v = tl.load(v_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(xn_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        d = xn - (a * x + b * v)
        acc += d * d
        if HAS_REF:
            vr = tl.load(vref_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            e = v - vr
            acc_kl += e * e
    tl.store(sq_ptr + row * NUM_CHUNKS + chunk, tl.sum(acc, axis=0))
    if HAS_REF:
        tl.store(klsq_ptr + row * NUM_CHUNKS + chunk, tl.sum(acc_kl, axis=0))


@triton.jit(do_not_specialize=["b_ptr", "s_ptr", "old_ptr", "adv_ptr", "logp_ptr", "ratio_ptr",
                               "clipped_ptr", "kl_ptr", "coef_d_ptr", "coef_kl_ptr", "loss_ptr"])
def _finish_kernel(sq_ptr, klsq_ptr, b_ptr, s_ptr, old_ptr, adv_ptr,
                   logp_ptr, ratio_ptr, clipped_ptr, kl_ptr, coef_d_ptr, coef_kl_ptr, loss_ptr,
                   B, NUM_CHUNKS, inv_n, clip_range, adv_clip_max, kl_beta,
                   HALF_LOG_2PI: tl.constexpr, HAS_REF: tl.constexpr, ON_POLICY: tl.constexpr,
                   BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    inv_b = 1.0 / B
    total = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        row_mask = rows < B
        # 2-D running sums, reduced once after the loop. Reducing in every iteration let Triton 3.9
        # order the two loop-carried sums differently from run to run, and ptxas spilled with one
        # order on sm_90; 16-column tiles keep the variant with NUM_CHUNKS % 16 != 0 (per-element
        # addresses) near 100 registers instead of 200 (tests/test_kernels_compile.py).
        sq_acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        klsq_acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
        for c0 in range(0, NUM_CHUNKS, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            tile_mask = row_mask[:, None] & (cols[None, :] < NUM_CHUNKS)
            offs = rows[:, None] * NUM_CHUNKS + cols[None, :]
            sq_acc += tl.load(sq_ptr + offs, mask=tile_mask, other=0.0)
            if HAS_REF:
                klsq_acc += tl.load(klsq_ptr + offs, mask=tile_mask, other=0.0)
        sq = tl.sum(sq_acc, axis=1)
        klsq = tl.sum(klsq_acc, axis=1)
        s = tl.load(s_ptr + rows, mask=row_mask, other=1.0)
        bcoef = tl.load(b_ptr + rows, mask=row_mask, other=0.0)
        adv = tl.load(adv_ptr + rows, mask=row_mask, other=0.0)
        adv = tl.minimum(tl.maximum(adv, -adv_clip_max), adv_clip_max)
        inv_var = 1.0 / (s * s)
        logp = -0.5 * sq * inv_n * inv_var - tl.log(s) - HALF_LOG_2PI
        if ON_POLICY:
            old = logp  # the sampling policy is the one being trained: ratio exactly 1
        else:
            old = tl.load(old_ptr + rows, mask=row_mask, other=0.0)
        ratio = tl.exp(logp - old)
        lo = 1.0 - clip_range
        hi = 1.0 + clip_range
        inside = (ratio >= lo) & (ratio <= hi)
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
        loss_i = tl.maximum(unclipped, clipped)
        # d loss_i / d log_prob_i, matching autograd of the reference: torch.maximum sends the
        # gradient to the larger branch and splits it on ties; clamp passes it only inside.
        g_unclipped = -adv * ratio
        g_clipped = tl.where(inside, g_unclipped, 0.0)
        g = tl.where(unclipped > clipped, g_unclipped,
                     tl.where(clipped > unclipped, g_clipped, 0.5 * (g_unclipped + g_clipped)))
        tl.store(coef_d_ptr + rows, g * inv_b * bcoef * inv_n * inv_var, mask=row_mask)
        tl.store(logp_ptr + rows, logp, mask=row_mask)
        tl.store(ratio_ptr + rows, ratio, mask=row_mask)
        tl.store(clipped_ptr + rows, tl.where(inside, 0.0, 1.0), mask=row_mask)
        if HAS_REF:
            kl = 0.5 * bcoef * bcoef * klsq * inv_n * inv_var
            tl.store(kl_ptr + rows, kl, mask=row_mask)
            tl.store(coef_kl_ptr + rows, kl_beta * inv_b * bcoef * bcoef * inv_n * inv_var, mask=row_mask)
            loss_i += kl_beta * kl
        total += tl.where(row_mask, loss_i, 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) * inv_b)


@triton.jit(do_not_specialize=["scale_ptr", "a_ptr", "b_ptr", "coef_d_ptr", "coef_kl_ptr"])
def _grad_kernel(scale_ptr, v_ptr, x_ptr, xn_ptr, vref_ptr, a_ptr, b_ptr, coef_d_ptr, coef_kl_ptr,
                 grad_ptr, N, CHUNK,
                 HAS_REF: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    scale = tl.load(scale_ptr)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    coef_d = tl.load(coef_d_ptr + row) * scale
    if HAS_REF:
        coef_kl = tl.load(coef_kl_ptr + row) * scale
    base = row.to(tl.int64) * N
    start = chunk * CHUNK
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < N
        v = tl.load(v_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(xn_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        grad = coef_d * (xn - (a * x + b * v))
        if HAS_REF:
            vr = tl.load(vref_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            grad += coef_kl * (v - vr)
        tl.store(grad_ptr + base + idx, grad.to(grad_ptr.dtype.element_ty), mask=mask)


def _rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if t is None:
        return None
    return t.reshape(t.shape[0], -1).contiguous()


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


def _partials(v2, x2, xn2, vref2, a, b):
    batch, n = v2.shape
    chunk, num_chunks = chunking(batch, n, BLOCK, target_programs(v2.device, batch))
    sq = torch.empty((batch, num_chunks), dtype=torch.float32, device=v2.device)
    klsq = torch.empty_like(sq) if vref2 is not None else sq
    _partials_kernel[(batch, num_chunks)](
        v2, x2, xn2, vref2 if vref2 is not None else v2, a, b, sq, klsq, n, chunk, num_chunks,
        HAS_REF=vref2 is not None, BLOCK=BLOCK)
    return sq, klsq, chunk, num_chunks


def _grad(scale, v2, x2, xn2, vref2, a, b, coef_d, coef_kl, chunk, num_chunks):
    batch, n = v2.shape
    grad = torch.empty_like(v2)
    _grad_kernel[(batch, num_chunks)](
        scale, v2, x2, xn2, vref2 if vref2 is not None else v2, a, b, coef_d,
        coef_kl if coef_kl is not None else coef_d, grad, n, chunk,
        HAS_REF=vref2 is not None, BLOCK=BLOCK)
    return grad


class TritonStepLoss(torch.autograd.Function):
    """loss, log_prob, ratio, clipped, kl = f(v, x, x', v_ref, a, b, s, old_log_prob, A, ...).

    Only `loss` is differentiable, and only w.r.t. v (the model output).
    """

    @staticmethod
    def forward(ctx, model_output, latents, next_latents, ref_model_output, a, b, s,
                old_log_prob, advantages, clip_range, adv_clip_max, kl_beta):
        shape = model_output.shape
        v2, x2, xn2 = _rows(model_output), _rows(latents), _rows(next_latents)
        vref2 = _rows(ref_model_output.detach()) if ref_model_output is not None else None
        a, b, s = _f32(a), _f32(b), _f32(s)
        batch, n = v2.shape
        sq, klsq, chunk, num_chunks = _partials(v2, x2, xn2, vref2, a, b)
        # One allocation for all the small outputs (launch-bound at FLUX size: fewer host calls).
        small = torch.zeros(6 * batch + 1, dtype=torch.float32, device=v2.device)
        log_prob, ratio, clipped, kl, coef_d, coef_kl = small[:6 * batch].view(6, batch).unbind(0)
        loss = small[6 * batch]
        on_policy = old_log_prob is None
        _finish_kernel[(1,)](
            sq, klsq, b, s, a if on_policy else _f32(old_log_prob), _f32(advantages),
            log_prob, ratio, clipped, kl, coef_d, coef_kl, loss,
            batch, num_chunks, 1.0 / n, float(clip_range), float(adv_clip_max), float(kl_beta),
            HALF_LOG_2PI=HALF_LOG_2PI, HAS_REF=vref2 is not None, ON_POLICY=on_policy,
            BLOCK_B=FINISH_BLOCK_B, BLOCK_C=FINISH_BLOCK_C)
        ctx.save_for_backward(v2, x2, xn2, vref2, a, b, coef_d, coef_kl)
        ctx.shape, ctx.chunk, ctx.num_chunks = shape, chunk, num_chunks
        ctx.mark_non_differentiable(log_prob, ratio, clipped, kl)
        return loss, log_prob, ratio, clipped, kl

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        v2, x2, xn2, vref2, a, b, coef_d, coef_kl = ctx.saved_tensors
        scale = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
        grad = _grad(scale, v2, x2, xn2, vref2, a, b, coef_d, coef_kl, ctx.chunk, ctx.num_chunks)
        return (grad.view(ctx.shape),) + (None,) * 11


class TritonStepLogProb(torch.autograd.Function):
    """log_prob (B,) of x' under Normal(a x + b v, s^2), differentiable w.r.t. v.

    The forward reduces with the same kernels as TritonStepLoss (partials, then the finishing
    program), so its log-probs are bit-identical to the ones the loss computes: an "old" log-prob
    taken from here gives a ratio of exactly 1 at the same parameters.
    """

    @staticmethod
    def forward(ctx, model_output, latents, next_latents, a, b, s):
        shape = model_output.shape
        v2, x2, xn2 = _rows(model_output), _rows(latents), _rows(next_latents)
        a, b, s = _f32(a), _f32(b), _f32(s)
        batch, n = v2.shape
        sq, _, chunk, num_chunks = _partials(v2, x2, xn2, None, a, b)
        small = torch.zeros(6 * batch + 1, dtype=torch.float32, device=v2.device)
        log_prob, ratio, clipped, kl, coef_d, _ = small[:6 * batch].view(6, batch).unbind(0)
        zero_advantages = small[5 * batch:6 * batch]
        _finish_kernel[(1,)](
            sq, sq, b, s, a, zero_advantages, log_prob, ratio, clipped, kl, coef_d, coef_d,
            small[6 * batch], batch, num_chunks, 1.0 / n, 0.0, 1.0, 0.0,
            HALF_LOG_2PI=HALF_LOG_2PI, HAS_REF=False, ON_POLICY=True,
            BLOCK_B=FINISH_BLOCK_B, BLOCK_C=FINISH_BLOCK_C)
        ctx.save_for_backward(v2, x2, xn2, a, b, s)
        ctx.shape, ctx.chunk, ctx.num_chunks = shape, chunk, num_chunks
        return log_prob.clone()

    @staticmethod
    def backward(ctx, grad_log_prob):
        v2, x2, xn2, a, b, s = ctx.saved_tensors
        n = v2.shape[1]
        coef_d = (grad_log_prob.to(torch.float32) * b / (n * s * s)).contiguous()
        scale = torch.ones(1, dtype=torch.float32, device=v2.device)
        grad = _grad(scale, v2, x2, xn2, None, a, b, coef_d, None, ctx.chunk, ctx.num_chunks)
        return grad.view(ctx.shape), None, None, None, None, None
