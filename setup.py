"""Builds the compiled extension `dancegrpo_fast._C` (grouped noise).

The CPU part is always built; the CUDA part is added when the installed torch is a CUDA build and
nvcc is found (CUDA_HOME). Install with `pip install --no-build-isolation .` so that the extension
is compiled against the torch already installed. If torch is missing at build time the package
installs without the extension and falls back to PyTorch at run time (with a warning).
"""
import os
import warnings

from setuptools import setup


def _extension_kwargs():
    if os.environ.get("DANCEGRPO_FAST_NO_EXTENSION") == "1":
        return {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("torch is not installed at build time: dancegrpo_fast._C is not built; "
                      "the PyTorch fallback will be used. Install torch first and reinstall with "
                      "--no-build-isolation to build it.")
        return {}

    here = os.path.dirname(os.path.abspath(__file__))
    sources = ["csrc/grouped_noise.cpp"]
    # No -std flag: torch's BuildExtension adds the standard its headers need (C++20 for torch 2.13,
    # whose headers warn under C++17)
    cxx_flags = ["-O3"]
    want_cuda = os.environ.get("DANCEGRPO_FAST_CUDA", "auto")
    has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda == "1" and not has_cuda:
        raise RuntimeError("DANCEGRPO_FAST_CUDA=1 but torch has no CUDA or nvcc (CUDA_HOME) is missing")
    # Without TORCH_CUDA_ARCH_LIST torch compiles for the visible GPUs; with none it fails with an
    # IndexError (PyPI's default torch is a CUDA build, so this happens on CPU-only machines too).
    if (has_cuda and want_cuda != "0" and os.environ.get("TORCH_CUDA_ARCH_LIST", "") in ("", "native")
            and torch.cuda.device_count() == 0):
        if want_cuda == "1":
            raise RuntimeError("DANCEGRPO_FAST_CUDA=1 without a visible GPU needs TORCH_CUDA_ARCH_LIST, "
                               "e.g. TORCH_CUDA_ARCH_LIST='8.0;9.0' (A100, H100/H200)")
        warnings.warn("no GPU visible and TORCH_CUDA_ARCH_LIST unset: dancegrpo_fast._C is built without "
                      "its CUDA kernel; set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0') to build it")
        has_cuda = False
    if has_cuda and want_cuda != "0":
        ext = CUDAExtension(
            "dancegrpo_fast._C",
            sources + ["csrc/grouped_noise_cuda.cu"],
            define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
        )
    else:
        ext = CppExtension("dancegrpo_fast._C", sources, extra_compile_args={"cxx": cxx_flags})
    ext.include_dirs.append(os.path.join(here, "csrc"))
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension}}


setup(**_extension_kwargs())
