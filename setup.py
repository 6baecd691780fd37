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
    cxx_flags = ["-O3", "-std=c++17"]
    want_cuda = os.environ.get("DANCEGRPO_FAST_CUDA", "auto")
    has_cuda = torch.version.cuda is not None and CUDA_HOME is not None
    if want_cuda == "1" and not has_cuda:
        raise RuntimeError("DANCEGRPO_FAST_CUDA=1 but torch has no CUDA or nvcc (CUDA_HOME) is missing")
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
