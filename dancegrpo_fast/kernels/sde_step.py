"""Triton: one fused rollout step. (v, x, a, b, s, noise) -> x' and its log-prob, in one pass.

    mu = a x + b v;   x' = mu + s * eps   (stored in the latents' dtype)
    log_prob = -sum((x'_stored - mu)^2) / (2 N s^2) - log s - 0.5 log(2 pi)

The log-prob scores the value actually stored (after rounding to the latents' dtype), so that
rescoring the trajectory in the training pass reproduces it exactly.

eps is read from memory, or generated in the kernel: row i uses Triton's Philox `tl.randn(seed_i,
j)` for element j, the same numbers `dancegrpo_fast.noise` produces on any device, so a sample's
noise depends only on its seed (see noise.py for the per-step seed derivation).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import BLOCK, chunking, target_programs

NOISE_GIVEN = 0
NOISE_SEEDED = 1
NOISE_NONE = 2  # deterministic step: x' = mu


# Per-row scalars, the partial sums and the chunk count are not specialized (see step_loss.py).
@triton.jit(do_not_specialize=["seed_ptr", "a_ptr", "b_ptr", "s_ptr", "sq_ptr", "NUM_CHUNKS"])
def _sde_step_kernel(v_ptr, x_ptr, noise_ptr, seed_ptr, a_ptr, b_ptr, s_ptr, out_ptr, sq_ptr,
                     N, CHUNK, NUM_CHUNKS,
                     NOISE_MODE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    s = tl.load(s_ptr + row)
    base = row.to(tl.int64) * N
    start = chunk * CHUNK
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    if NOISE_MODE == 1:
        seed = tl.load(seed_ptr + row)
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < N
        v = tl.load(v_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
        mu = a * x + b * v
        if NOISE_MODE == 0:
            eps = tl.load(noise_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
            prev = mu + s * eps
        elif NOISE_MODE == 1:
            eps = tl.randn(seed, idx)
            prev = mu + s * eps
        else:
            prev = mu
        stored = prev.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + base + idx, stored, mask=mask)
        d = stored.to(tl.float32) - mu
        acc += tl.where(mask, d * d, 0.0)
    tl.store(sq_ptr + row * NUM_CHUNKS + chunk, tl.sum(acc, axis=0))


def sde_step_triton(model_output: torch.Tensor, latents: torch.Tensor, a: torch.Tensor,
                    b: torch.Tensor, s: torch.Tensor, noise=None, seeds=None):
    """Returns (prev_sample shaped like latents, sum of squared residuals per row (B,))."""
    shape = latents.shape
    v2 = model_output.detach().reshape(shape[0], -1).contiguous()
    x2 = latents.detach().reshape(shape[0], -1).contiguous()
    batch, n = x2.shape
    a, b, s = (t.detach().to(torch.float32).contiguous() for t in (a, b, s))
    if noise is not None:
        mode, noise2, seed_arg = NOISE_GIVEN, noise.detach().reshape(batch, -1).contiguous(), a
    elif seeds is not None:
        mode, noise2, seed_arg = NOISE_SEEDED, x2, seeds.to(device=x2.device, dtype=torch.int64).contiguous()
    else:
        mode, noise2, seed_arg = NOISE_NONE, x2, a
    chunk, num_chunks = chunking(batch, n, BLOCK, target_programs(x2.device, batch))
    out = torch.empty_like(x2)
    sq = torch.empty((batch, num_chunks), dtype=torch.float32, device=x2.device)
    _sde_step_kernel[(batch, num_chunks)](
        v2, x2, noise2, seed_arg, a, b, s, out, sq, n, chunk, num_chunks,
        NOISE_MODE=mode, BLOCK=BLOCK)
    return out.view(shape), sq.sum(dim=1)


__all__ = ["sde_step_triton"]
