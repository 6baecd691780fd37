"""Policy adapters, one per model family: the only place that knows model details."""
from __future__ import annotations

import importlib

from ..config import ModelConfig, SamplerConfig
from .base import ModelLoadError, Policy, check_model_folder

POLICIES = {
    "flux": ("dancegrpo_fast.policies.flux", "FluxPolicy"),
    "sd3": ("dancegrpo_fast.policies.sd3", "SD3Policy"),
    "sd": ("dancegrpo_fast.policies.sd", "SDPolicy"),
    "hunyuan_video": ("dancegrpo_fast.policies.hunyuan_video", "HunyuanVideoPolicy"),
    "wan": ("dancegrpo_fast.policies.wan", "WanPolicy"),
    "skyreels_i2v": ("dancegrpo_fast.policies.skyreels_i2v", "SkyReelsI2VPolicy"),
    "wan_i2v": ("dancegrpo_fast.policies.wan_i2v", "WanI2VPolicy"),
    # The built-in tiny task keeps its policy with the rest of the task.
    "tiny": ("dancegrpo_fast.tiny.policy", "TinyPolicy"),
}


def build_policy(options: ModelConfig, sampling: SamplerConfig, device="cpu") -> Policy:
    """The policy of options.family, loaded from options.path (each family's module is imported
    only when asked for: it pulls in its diffusers classes)."""
    if options.family not in POLICIES:
        raise ValueError(f"model_family must be one of {sorted(POLICIES)}, got {options.family!r}")
    module_name, class_name = POLICIES[options.family]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(options, sampling, device)


__all__ = ["Policy", "ModelLoadError", "build_policy", "check_model_folder", "POLICIES"]
