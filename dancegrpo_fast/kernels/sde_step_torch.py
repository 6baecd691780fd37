"""PyTorch twin of `sde_step.py` (the fused rollout step), for the CPU. Same math, row blocks."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .step_loss_torch import row_blocks


def sde_step_torch(model_output: Tensor, latents: Tensor, a: Tensor, b: Tensor, s: Tensor,
                   noise: Optional[Tensor] = None):
    """Returns (prev_sample shaped like latents, sum of squared residuals per row (B,))."""
    shape = latents.shape
    v2 = model_output.detach().reshape(shape[0], -1)
    x2 = latents.detach().reshape(shape[0], -1)
    noise2 = None if noise is None else noise.detach().reshape(shape[0], -1)
    batch, n = x2.shape
    a, b, s = (t.detach().to(torch.float32) for t in (a, b, s))
    out = torch.empty_like(x2)
    sq = torch.zeros(batch, dtype=torch.float32, device=x2.device)
    for rs, cs in row_blocks(batch, n):
        mean = v2[rs, cs].to(torch.float32, copy=True)
        mean.mul_(b[rs, None]).addcmul_(x2[rs, cs], a[rs, None])
        if noise2 is None:
            out[rs, cs] = mean
        else:
            out[rs, cs] = torch.addcmul(mean, noise2[rs, cs].to(torch.float32), s[rs, None])
        residual = out[rs, cs].to(torch.float32) - mean
        sq[rs] += torch.linalg.vecdot(residual, residual, dim=1)
    return out.view(shape), sq
