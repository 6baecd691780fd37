"""`python -m dancegrpo_fast.info`: which backends are active on this machine."""
from __future__ import annotations

import json
import platform
import sys

import torch

from . import kernels
from .noise import extension_status
from .ops import resolve_backend


def backend_info() -> dict:
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


if __name__ == "__main__":
    main()
