"""dancegrpo_fast: DanceGRPO (GRPO for diffusion and rectified-flow generators) with fused kernels.

Layers (bottom up): the reference math (`sde`, `grpo`), the fast paths (`kernels`, the compiled
extension `_C`), the dispatch layer (`ops`, `noise`) that the rest of the package calls.
"""
from .grpo import (combine_advantages, gaussian_mean_kl, global_advantages, group_advantages,
                   grpo_loss, grpo_per_sample_loss)
from .noise import grouped_noise, seed_for_step
from .ops import StepLossOutput, fused_step_loss, sde_step, step_log_prob
from .sde import (SDEStepOutput, StepCoefficients, affine_step, ddim_coefficients, ddim_step,
                  dance_coefficients, dance_step, flow_grpo_coefficients, flow_grpo_step,
                  flow_sigmas, gaussian_log_prob, ode_coefficients, ode_step)

__version__ = "0.1.0"

__all__ = [
    "flow_sigmas", "dance_step", "flow_grpo_step", "ddim_step", "ode_step", "affine_step",
    "StepCoefficients", "SDEStepOutput", "dance_coefficients", "flow_grpo_coefficients",
    "ddim_coefficients", "ode_coefficients", "gaussian_log_prob",
    "group_advantages", "global_advantages", "combine_advantages", "grpo_loss",
    "grpo_per_sample_loss", "gaussian_mean_kl",
    "fused_step_loss", "step_log_prob", "sde_step", "StepLossOutput",
    "grouped_noise", "seed_for_step",
]
