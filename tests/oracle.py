"""Float64 oracles written straight from the math contract (docs/math.md), independent of the package's code.

Each takes float64 tensors (sigmas/alphas as (B,) float64) and returns float64 results.
"""
import math

import torch

LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))


def bc(t, like):
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


def dance_mean_std(v, x, sigma, sigma_next, eta):
    """SPEC 1a, in the order DanceGRPO's flux_step writes it."""
    sig, nxt = bc(sigma, x), bc(sigma_next, x)
    dsigma = nxt - sig
    prev_mean = x + dsigma * v
    x0 = x - sig * v
    score = -(x - x0 * (1 - sig)) / sig**2
    prev_mean = prev_mean + (-0.5 * eta**2 * score) * dsigma
    return prev_mean, eta * torch.sqrt(sigma - sigma_next)


def flow_grpo_mean_std(v, x, sigma, sigma_next, noise_level, sigma_max):
    """SPEC 1b."""
    denom = torch.where(sigma == 1, torch.full_like(sigma, sigma_max), sigma)
    g = noise_level * torch.sqrt(sigma / (1 - denom))
    sig, gb = bc(sigma, x), bc(g, x)
    dt = bc(sigma_next - sigma, x)
    mean = x * (1 + gb**2 / (2 * sig) * dt) + v * (1 + gb**2 * (1 - sig) / (2 * sig)) * dt
    return mean, g * torch.sqrt(sigma - sigma_next)


def ddim_mean_std(eps, x, alpha_bar, alpha_bar_prev, eta):
    """SPEC 1c."""
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
    std = eta * torch.sqrt(variance)
    ab, abp = bc(alpha_bar, x), bc(alpha_bar_prev, x)
    x0 = (x - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
    mean = torch.sqrt(abp) * x0 + torch.sqrt(1 - abp - bc(std, x) ** 2) * eps
    return mean, std


def log_prob(prev, mean, std):
    """Element-mean Gaussian log-density, (B,)."""
    lp = -((prev - mean) ** 2) / (2 * bc(std, prev) ** 2) - bc(torch.log(std), prev) - LOG_SQRT_2PI
    return lp.flatten(1).mean(1)


def group_advantages(rewards, group_size, eps=1e-8):
    out = torch.empty_like(rewards, dtype=torch.float64)
    for start in range(0, rewards.numel(), group_size):
        group = rewards[start:start + group_size].double()
        mean = group.sum() / group_size
        std = math.sqrt(float(((group - mean) ** 2).sum()) / (group_size - 1))
        out[start:start + group_size] = (group - mean) / (std + eps)
    return out


def grpo_loss(lp, old, adv, clip_range, adv_clip_max):
    adv = adv.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(lp - old)
    return torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()


def step_loss(v, x, xn, a, b, s, old, adv, clip_range, adv_clip_max, vref=None, beta=0.0):
    """The whole fused op in float64: mean -> log-prob -> GRPO (+ beta * KL)."""
    mean = bc(a, x) * x + bc(b, x) * v
    lp = log_prob(xn, mean, s)
    loss = grpo_loss(lp, old, adv, clip_range, adv_clip_max)
    kl = torch.zeros_like(lp)
    if vref is not None:
        mean_ref = bc(a, x) * x + bc(b, x) * vref
        kl = ((mean - mean_ref) ** 2).flatten(1).mean(1) / (2 * s**2)
        loss = loss + beta * kl.mean()
    return loss, lp, kl
