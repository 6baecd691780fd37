"""Reference math of the sampler steps (SPEC section 1): plain PyTorch, readable, the oracle.

Every stochastic step the project supports is an affine Gaussian policy

    pi(x' | x) = Normal(mu, s^2 I),   mu = a * x + b * v

with per-sample scalars (a, b, s) of shape (B,). The `*_step` functions below compute each sampler
literally as the papers write it (x0 prediction, score, ...); the `*_coefficients` functions
compute the same step as (a, b, s), which is all the fused kernels need. Tests check that the two
forms agree.

All arithmetic is float32 (coefficients are computed in float64 and rounded once), whatever the
dtype of the model output and latents. The log-probability is the element MEAN over one sample,
as DanceGRPO and Flow-GRPO train with it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

# The one definition; the kernels and their PyTorch twins import it from here.
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

ScalarOrTensor = Union[float, Tensor]


@dataclass
class StepCoefficients:
    """Per-sample coefficients of one affine Gaussian step: mu = a * x + b * v, std = s.

    a, b, s: float32 tensors of shape (B,). s == 0 marks a deterministic (ODE) step.

    Whether the step is stochastic is worked out once, while s is on the CPU (where the builders
    make it), and carried through `.to(device)` and `.index(rows)`: asking a CUDA tensor would
    stall the GPU pipeline at every step.
    """

    a: Tensor
    b: Tensor
    s: Tensor
    kind: Optional[str] = field(default=None, repr=False)  # "sde", "ode" or "mixed"; None: unknown

    def __post_init__(self):
        if self.kind is None and self.s.device.type == "cpu":
            self.kind = _step_kind(self.s)

    @property
    def batch_size(self) -> int:
        return self.a.shape[0]

    def step_kind(self) -> str:
        """"sde" (every s > 0), "ode" (every s == 0) or "mixed"; computed on the device (a sync)
        only when it was not known on the CPU."""
        if self.kind is None:
            self.kind = _step_kind(self.s)
        return self.kind

    @property
    def is_deterministic(self) -> bool:
        return self.step_kind() == "ode"

    def to(self, device) -> "StepCoefficients":
        return StepCoefficients(self.a.to(device), self.b.to(device), self.s.to(device), kind=self.kind)

    def index(self, rows) -> "StepCoefficients":
        """The coefficients of a subset of samples (rows: index tensor, slice or list)."""
        kind = self.kind if self.kind in ("sde", "ode") else None
        return StepCoefficients(self.a[rows], self.b[rows], self.s[rows], kind=kind)


def _step_kind(s: Tensor) -> str:
    if bool((s > 0).all()):
        return "sde"
    if bool((s == 0).all()):
        return "ode"
    return "mixed"


@dataclass
class SDEStepOutput:
    """Result of one sampler step, from the reference functions here and from the fused
    `ops.sde_step` alike.

    prev_sample: the next (less noisy) latent, same shape and dtype as the input latents.
    log_prob: (B,) float32 log-probability of prev_sample under the step's Gaussian (element
        mean), differentiable w.r.t. the model output in the reference functions; None for a
        deterministic step.
    std: (B,) float32 standard deviation s.
    mean: the Gaussian mean mu, float32, shape of the latents; None from the fused op, which
        never materialises it (that is what makes it one pass).
    """

    prev_sample: Tensor
    log_prob: Optional[Tensor]
    std: Tensor
    mean: Optional[Tensor] = None


# ----------------------------------------------------------------------------------------------
# Schedules and argument handling
# ----------------------------------------------------------------------------------------------


def flow_sigmas(num_steps: int, shift: float = 1.0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Rectified-flow sigmas: linspace(1, 0, num_steps + 1), shifted as in SD3/FLUX.

    sigma <- shift * sigma / (1 + (shift - 1) * sigma). Returns num_steps + 1 values from 1 to 0.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive finite number, got {shift!r}")
    sigmas = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    sigmas = shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    return sigmas.to(dtype)


def per_sample(value: ScalarOrTensor, batch_size: int, name: str, device=None) -> Tensor:
    """A Python float or a tensor of shape () or (B,) as a float64 tensor of shape (B,)."""
    if isinstance(value, Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(batch_size)
        elif value.shape != (batch_size,):
            raise ValueError(f"{name} must be a float or a tensor of shape ({batch_size},) "
                             f"(one per sample), got shape {tuple(value.shape)}")
        out = value.detach().to(device=device, dtype=torch.float64)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out = torch.full((batch_size,), float(value), dtype=torch.float64, device=device)
    else:
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not torch.isfinite(out).all():
        raise ValueError(f"{name} must be finite, got {out.tolist()}")
    return out


def _check_nonnegative(value: float, name: str) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value)) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_step_shapes(model_output: Tensor, latents: Tensor, prev_sample: Optional[Tensor] = None) -> None:
    """Model output, latents and next latents must share one shape (B, ...)."""
    if not isinstance(model_output, Tensor) or not isinstance(latents, Tensor):
        raise TypeError("model_output and latents must be tensors")
    if latents.dim() < 1 or latents.shape[0] < 1:
        raise ValueError(f"latents must have shape (B, ...) with B >= 1, got {tuple(latents.shape)}")
    if model_output.shape != latents.shape:
        raise ValueError(f"model_output shape {tuple(model_output.shape)} does not match latents "
                         f"shape {tuple(latents.shape)}")
    if prev_sample is not None and prev_sample.shape != latents.shape:
        raise ValueError(f"prev_sample (next latents) shape {tuple(prev_sample.shape)} does not "
                         f"match latents shape {tuple(latents.shape)}")


def _bcast(per_sample_value: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) so it broadcasts against a (B, ...) latent."""
    return per_sample_value.reshape((-1,) + (1,) * (like.dim() - 1))


def _as_coefficients(a: Tensor, b: Tensor, s: Tensor) -> StepCoefficients:
    return StepCoefficients(a.to(torch.float32), b.to(torch.float32), s.to(torch.float32))


# ----------------------------------------------------------------------------------------------
# Coefficients (a, b, s) per sampler
# ----------------------------------------------------------------------------------------------


def _check_flow_sigmas(sigma: Tensor, sigma_next: Tensor) -> None:
    if not ((sigma > 0) & (sigma <= 1)).all():
        raise ValueError(f"sigma must lie in (0, 1], got {sigma.tolist()}")
    if not ((sigma_next >= 0) & (sigma_next < sigma)).all():
        raise ValueError(f"sigma_next must lie in [0, sigma), got sigma_next={sigma_next.tolist()} "
                         f"for sigma={sigma.tolist()}")


def dance_coefficients(sigma: ScalarOrTensor, sigma_next: ScalarOrTensor, eta: float,
                       batch_size: int, device=None) -> StepCoefficients:
    """(a, b, s) of the DanceGRPO rectified-flow SDE step (SPEC 1a)."""
    _check_nonnegative(eta, "eta")
    sigma = per_sample(sigma, batch_size, "sigma", device)
    sigma_next = per_sample(sigma_next, batch_size, "sigma_next", device)
    _check_flow_sigmas(sigma, sigma_next)
    dsigma = sigma_next - sigma
    a = 1.0 + eta**2 * dsigma / (2.0 * sigma)
    b = dsigma * (1.0 + eta**2 * (1.0 - sigma) / (2.0 * sigma))
    s = eta * torch.sqrt(sigma - sigma_next)
    return _as_coefficients(a, b, s)


def _flow_grpo_g(sigma: Tensor, noise_level: float, sigma_max: float) -> Tensor:
    # At sigma == 1 the formula divides by zero; Flow-GRPO uses the schedule's second sigma there.
    denom_sigma = torch.where(sigma == 1.0, torch.full_like(sigma, sigma_max), sigma)
    return noise_level * torch.sqrt(sigma / (1.0 - denom_sigma))


def flow_grpo_coefficients(sigma: ScalarOrTensor, sigma_next: ScalarOrTensor, noise_level: float,
                           sigma_max: float, batch_size: int, device=None) -> StepCoefficients:
    """(a, b, s) of the Flow-GRPO rectified-flow SDE step (SPEC 1b).

    sigma_max is the schedule's second sigma (sigmas[1]), used in place of sigma when sigma == 1.
    """
    _check_nonnegative(noise_level, "noise_level")
    if not (isinstance(sigma_max, (int, float)) and 0 < sigma_max < 1):
        raise ValueError(f"sigma_max must lie in (0, 1) (the schedule's sigmas[1]), got {sigma_max!r}")
    sigma = per_sample(sigma, batch_size, "sigma", device)
    sigma_next = per_sample(sigma_next, batch_size, "sigma_next", device)
    _check_flow_sigmas(sigma, sigma_next)
    g = _flow_grpo_g(sigma, noise_level, float(sigma_max))
    dt = sigma_next - sigma
    a = 1.0 + g**2 * dt / (2.0 * sigma)
    b = (1.0 + g**2 * (1.0 - sigma) / (2.0 * sigma)) * dt
    s = g * torch.sqrt(-dt)
    return _as_coefficients(a, b, s)


def _check_alpha_bars(alpha_bar: Tensor, alpha_bar_prev: Tensor) -> None:
    if not ((alpha_bar > 0) & (alpha_bar < 1)).all():
        raise ValueError(f"alpha_bar must lie in (0, 1), got {alpha_bar.tolist()}")
    if not ((alpha_bar_prev > 0) & (alpha_bar_prev <= 1)).all():
        raise ValueError(f"alpha_bar_prev must lie in (0, 1], got {alpha_bar_prev.tolist()}")


def _ddim_std(alpha_bar: Tensor, alpha_bar_prev: Tensor, eta: float) -> Tensor:
    variance = (1.0 - alpha_bar_prev) / (1.0 - alpha_bar) * (1.0 - alpha_bar / alpha_bar_prev)
    return eta * torch.sqrt(variance.clamp_min(0.0))


def _ddim_direction_coef(alpha_bar_prev: Tensor, std: Tensor, eta: float) -> Tensor:
    remaining = 1.0 - alpha_bar_prev - std**2
    if (remaining < -1e-12).any():
        raise ValueError(f"eta={eta} is too large for this DDIM step: 1 - alpha_bar_prev - s^2 < 0 "
                         f"({remaining.tolist()}); use eta <= 1")
    return torch.sqrt(remaining.clamp_min(0.0))


def ddim_coefficients(alpha_bar: ScalarOrTensor, alpha_bar_prev: ScalarOrTensor, eta: float,
                      batch_size: int, device=None) -> StepCoefficients:
    """(a, b, s) of the DDIM step with eta (SPEC 1c), epsilon prediction."""
    _check_nonnegative(eta, "eta")
    alpha_bar = per_sample(alpha_bar, batch_size, "alpha_bar", device)
    alpha_bar_prev = per_sample(alpha_bar_prev, batch_size, "alpha_bar_prev", device)
    _check_alpha_bars(alpha_bar, alpha_bar_prev)
    s = _ddim_std(alpha_bar, alpha_bar_prev, eta)
    direction = _ddim_direction_coef(alpha_bar_prev, s, eta)
    a = torch.sqrt(alpha_bar_prev / alpha_bar)
    b = direction - torch.sqrt(alpha_bar_prev) * torch.sqrt(1.0 - alpha_bar) / torch.sqrt(alpha_bar)
    return _as_coefficients(a, b, s)


def ode_coefficients(sigma: ScalarOrTensor, sigma_next: ScalarOrTensor, batch_size: int,
                     device=None) -> StepCoefficients:
    """(a, b, s) = (1, sigma_next - sigma, 0): the deterministic Euler step (SPEC 1d)."""
    sigma = per_sample(sigma, batch_size, "sigma", device)
    sigma_next = per_sample(sigma_next, batch_size, "sigma_next", device)
    _check_flow_sigmas(sigma, sigma_next)
    return _as_coefficients(torch.ones_like(sigma), sigma_next - sigma, torch.zeros_like(sigma))


# ----------------------------------------------------------------------------------------------
# Steps, written as the papers write them
# ----------------------------------------------------------------------------------------------


def gaussian_log_prob(prev_sample: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Element-mean Gaussian log-density of each sample, float32, shape (B,).

    log_prob = mean_N(-(x' - mu)^2 / (2 s^2)) - log(s) - 0.5 * log(2 pi). s must be > 0.
    """
    std = std.to(torch.float32)
    if (std <= 0).any():
        raise ValueError("the step is deterministic (std s == 0 for some sample): it has no "
                         "log-prob. This happens for ODE steps and for DDIM steps whose two "
                         "alphas coincide; train only stochastic (SDE) steps")
    diff = prev_sample.to(torch.float32) - mean.to(torch.float32)
    reduce_dims = tuple(range(1, diff.dim()))
    sq = (diff**2).mean(dim=reduce_dims) if reduce_dims else diff**2
    return -sq / (2.0 * std**2) - torch.log(std) - HALF_LOG_2PI


def _finish_step(mean: Tensor, std: Tensor, latents: Tensor, prev_sample: Optional[Tensor],
                 generator: Optional[torch.Generator]) -> SDEStepOutput:
    if (std == 0).all():
        if prev_sample is not None:
            # Scoring a given sample is asking for its log-prob: gaussian_log_prob says why not.
            gaussian_log_prob(prev_sample, mean, std)
        return SDEStepOutput(prev_sample=mean.to(latents.dtype), log_prob=None, mean=mean, std=std)
    if prev_sample is None:
        noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=mean.device)
        # Stored in the latents' dtype; the log-prob scores the stored value so that rescoring
        # the trajectory later reproduces it exactly.
        prev_sample = (mean + _bcast(std, mean) * noise).to(latents.dtype)
    if (std > 0).all():
        log_prob = gaussian_log_prob(prev_sample, mean, std)
    else:
        raise ValueError("std s is zero for some samples and not others: mix of deterministic and "
                         "stochastic steps in one batch is not supported")
    return SDEStepOutput(prev_sample=prev_sample, log_prob=log_prob, mean=mean, std=std)


def dance_step(model_output: Tensor, latents: Tensor, sigma: ScalarOrTensor, sigma_next: ScalarOrTensor,
               eta: float, prev_sample: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None) -> SDEStepOutput:
    """DanceGRPO's rectified-flow SDE step (SPEC 1a), computed via x0 prediction and the score.

    model_output, latents: (B, ...) any float dtype. sigma, sigma_next: float or (B,) tensor.
    Without prev_sample a sample is drawn (from generator); with it, it is scored.
    """
    check_step_shapes(model_output, latents, prev_sample)
    _check_nonnegative(eta, "eta")
    batch = latents.shape[0]
    sig64 = per_sample(sigma, batch, "sigma", latents.device)
    nxt64 = per_sample(sigma_next, batch, "sigma_next", latents.device)
    _check_flow_sigmas(sig64, nxt64)
    x = latents.to(torch.float32)
    v = model_output.to(torch.float32)
    sig = _bcast(sig64.to(torch.float32), x)
    dsigma = _bcast((nxt64 - sig64).to(torch.float32), x)
    x0_hat = x - sig * v
    score = -(x - (1.0 - sig) * x0_hat) / sig**2
    mean = x + dsigma * v + (-0.5 * eta**2 * score) * dsigma
    std = (eta * torch.sqrt(sig64 - nxt64)).to(torch.float32)
    return _finish_step(mean, std, latents, prev_sample, generator)


def flow_grpo_step(model_output: Tensor, latents: Tensor, sigma: ScalarOrTensor,
                   sigma_next: ScalarOrTensor, noise_level: float, sigma_max: float,
                   prev_sample: Optional[Tensor] = None,
                   generator: Optional[torch.Generator] = None) -> SDEStepOutput:
    """Flow-GRPO's rectified-flow SDE step (SPEC 1b). sigma_max: the schedule's sigmas[1]."""
    check_step_shapes(model_output, latents, prev_sample)
    # Building the coefficients validates the arguments (same messages as the fused path).
    flow_grpo_coefficients(sigma, sigma_next, noise_level, sigma_max, latents.shape[0], latents.device)
    batch = latents.shape[0]
    sig64 = per_sample(sigma, batch, "sigma", latents.device)
    nxt64 = per_sample(sigma_next, batch, "sigma_next", latents.device)
    g64 = _flow_grpo_g(sig64, noise_level, float(sigma_max))
    x = latents.to(torch.float32)
    v = model_output.to(torch.float32)
    sig = _bcast(sig64.to(torch.float32), x)
    g = _bcast(g64.to(torch.float32), x)
    dt = _bcast((nxt64 - sig64).to(torch.float32), x)
    mean = x * (1 + g**2 / (2 * sig) * dt) + v * (1 + g**2 * (1 - sig) / (2 * sig)) * dt
    std = (g64 * torch.sqrt(sig64 - nxt64)).to(torch.float32)
    return _finish_step(mean, std, latents, prev_sample, generator)


def ddim_step(model_output: Tensor, latents: Tensor, alpha_bar: ScalarOrTensor,
              alpha_bar_prev: ScalarOrTensor, eta: float, prev_sample: Optional[Tensor] = None,
              generator: Optional[torch.Generator] = None) -> SDEStepOutput:
    """DDIM step with eta (SPEC 1c); model_output is the predicted noise (epsilon).

    alpha_bar = alphas_cumprod[t]; alpha_bar_prev = alphas_cumprod[max(t - 1000 // S, 0)] (the
    previous timestep clamped at 0, as DanceGRPO does; schedules.ddim_schedule).
    """
    check_step_shapes(model_output, latents, prev_sample)
    _check_nonnegative(eta, "eta")
    batch = latents.shape[0]
    ab64 = per_sample(alpha_bar, batch, "alpha_bar", latents.device)
    abp64 = per_sample(alpha_bar_prev, batch, "alpha_bar_prev", latents.device)
    _check_alpha_bars(ab64, abp64)
    std64 = _ddim_std(ab64, abp64, eta)
    direction64 = _ddim_direction_coef(abp64, std64, eta)
    x = latents.to(torch.float32)
    eps = model_output.to(torch.float32)
    ab = _bcast(ab64.to(torch.float32), x)
    x0_hat = (x - torch.sqrt(1 - ab) * eps) / torch.sqrt(ab)
    mean = _bcast(torch.sqrt(abp64).to(torch.float32), x) * x0_hat + _bcast(direction64.to(torch.float32), x) * eps
    return _finish_step(mean, std64.to(torch.float32), latents, prev_sample, generator)


def ode_step(model_output: Tensor, latents: Tensor, sigma: ScalarOrTensor,
             sigma_next: ScalarOrTensor) -> SDEStepOutput:
    """Deterministic Euler step of a rectified flow (SPEC 1d): no noise, no log-prob."""
    check_step_shapes(model_output, latents)
    coeffs = ode_coefficients(sigma, sigma_next, latents.shape[0], latents.device)
    mean = latents.to(torch.float32) + _bcast(coeffs.b, latents) * model_output.to(torch.float32)
    return SDEStepOutput(prev_sample=mean.to(latents.dtype), log_prob=None, mean=mean, std=coeffs.s)


def affine_step(model_output: Tensor, latents: Tensor, coeffs: StepCoefficients,
                prev_sample: Optional[Tensor] = None,
                generator: Optional[torch.Generator] = None) -> SDEStepOutput:
    """Any step in its (a, b, s) form: mu = a x + b v. The reference for the fused kernels."""
    check_step_shapes(model_output, latents, prev_sample)
    if coeffs.batch_size != latents.shape[0]:
        raise ValueError(f"coefficients are for {coeffs.batch_size} samples but latents have "
                         f"batch size {latents.shape[0]}")
    x = latents.to(torch.float32)
    mean = _bcast(coeffs.a, x) * x + _bcast(coeffs.b, x) * model_output.to(torch.float32)
    return _finish_step(mean, coeffs.s.to(torch.float32), latents, prev_sample, generator)
