"""`python -m dancegrpo_fast.info`: which backends are active on this machine, including the
attention backend each model family's published architecture gets with the default
attention_backend=auto (its trainable module built on the meta device: every attention layer
counted, nothing loaded)."""
from __future__ import annotations

import json
import platform
import sys

import torch

from . import kernels
from .noise import extension_status
from .ops import resolve_backend

# family -> the published architecture (dancegrpo_fast/architectures) info counts layers of
ARCHITECTURES = {"flux": "flux1_dev", "sd3": "sd35_medium", "sd": "sd14", "hunyuan_video": "hunyuan_video_t2v",
                 "wan": "wan21_t2v_14b"}


def attention_info(device: torch.device, setting: str = "auto") -> dict:
    """{family: {"architecture", "backend", "layers", "using"} or {"error"}}: the backend
    `setting` resolves to on `device` for each family and how many attention layers of its
    published architecture take it."""
    import importlib
    from pathlib import Path

    import diffusers

    from .policies import POLICIES
    from .policies.attention import AttentionBackendError, resolve_backend as resolve_attention, set_backend

    root = Path(__file__).parent / "architectures"
    out = {}
    for family, folder in ARCHITECTURES.items():
        module_name, class_name = POLICIES[family]
        policy = getattr(importlib.import_module(module_name), class_name)
        backend = resolve_attention(setting, device, policy.masked_attention)
        index = json.loads((root / folder / "model_index.json").read_text())
        cls = getattr(diffusers, index[policy.model_component][1])
        with torch.device("meta"):
            model = cls.from_config(cls.load_config(str(root / folder / policy.model_component)))
        try:
            report = set_backend(model, backend, policy.model_component)
            out[family] = {"architecture": folder, "backend": report.backend, "layers": report.total,
                           "using": report.using}
        except AttentionBackendError as error:
            out[family] = {"architecture": folder, "backend": backend, "error": str(error)}
    return out


def backend_info(attention: bool = True) -> dict:
    """What `python -m dancegrpo_fast.info` reports. attention=False leaves out the per-family
    attention table (it builds five published architectures on the meta device, ~8 s)."""
    cuda = torch.cuda.is_available()
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cuda_available": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "triton": kernels.triton_mode(),
        "triton_error": kernels.TRITON_ERROR,
        "extension": extension_status(),
        "fused_ops_backend": {"cpu": resolve_backend(torch.device("cpu"))},
    }
    if kernels.TRITON_AVAILABLE:
        import triton

        info["triton_version"] = triton.__version__
    if cuda:
        info["fused_ops_backend"]["cuda"] = resolve_backend(torch.device("cuda"))
    if attention:
        info["attention_device"] = "cuda" if cuda else "cpu"
        info["attention"] = attention_info(torch.device(info["attention_device"]))
    return info


def main() -> None:
    info = backend_info()
    if "--json" in sys.argv:
        print(json.dumps(info, indent=2))
        return
    ext = info["extension"]
    print("dancegrpo_fast backends")
    print(f"  torch           {info['torch']} (CUDA build: {info['torch_cuda_build'] or 'no'}, "
          f"CUDA available: {info['cuda_available']})")
    print(f"  device          {info['device']}")
    print(f"  triton          {info['triton']}" + (f" {info.get('triton_version')}" if info['triton'] != 'unavailable' else f" ({info['triton_error']})"))
    print(f"  extension _C    {'built' if ext['built'] else 'NOT built (PyTorch fallback): ' + str(ext['error'])}"
          + (f", CUDA kernels: {'yes' if ext['cuda'] else 'no'}" if ext['built'] else ""))
    for device, backend in info["fused_ops_backend"].items():
        print(f"  fused ops on {device:4s} {backend}")
    print(f"attention (attention_backend=auto on {info['attention_device']}; published architectures, layers built on meta)")
    for family, entry in info["attention"].items():
        state = entry.get("error") or f"{entry['backend']} ({entry['using']}/{entry['layers']} layers)"
        print(f"  {family:15s} {state}  [{entry['architecture']}]")


if __name__ == "__main__":
    main()
