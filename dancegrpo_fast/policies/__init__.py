"""Policy adapters, one per model family: the only place that knows model details."""
from __future__ import annotations

from .base import ModelLoadError, Policy, StepSchedule, check_model_folder, ddim_schedule, flow_schedule

POLICIES = {
    "flux": ("dancegrpo_fast.policies.flux", "FluxPolicy"),
    "sd3": ("dancegrpo_fast.policies.sd3", "SD3Policy"),
    "sd": ("dancegrpo_fast.policies.sd", "SDPolicy"),
    "hunyuan_video": ("dancegrpo_fast.policies.hunyuan_video", "HunyuanVideoPolicy"),
    "wan": ("dancegrpo_fast.policies.wan", "WanPolicy"),
    "tiny": ("dancegrpo_fast.policies.tiny", "TinyPolicy"),
}


def build_policy(config, device="cpu") -> Policy:
    """The policy of config.model_family, loaded from config.model_path."""
    import importlib

    if config.model_family not in POLICIES:
        raise ValueError(f"model_family must be one of {sorted(POLICIES)}, got {config.model_family!r}")
    module_name, class_name = POLICIES[config.model_family]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(config.model_path, config, device)


__all__ = ["Policy", "StepSchedule", "ModelLoadError", "build_policy", "check_model_folder", "flow_schedule",
           "ddim_schedule", "POLICIES"]
