// Argument and CUDA-error checks that throw std::runtime_error from this library (pybind11 turns it
// into a Python RuntimeError), not c10::Error through TORCH_CHECK.
//
// Why: on a GPU image whose compiler differs from the one torch was built with (seen: H200 image,
// gcc 13.3, torch 2.11.0+cu130), a c10::Error thrown by TORCH_CHECK from an extension crashed the
// interpreter with a segmentation fault, while a plain std::runtime_error thrown and caught in the
// same extension did not (a one-line load_inline extension showed both). Errors must never crash.
#pragma once

#include <c10/util/StringUtil.h>

#include <stdexcept>

#define DGF_CHECK(cond, ...)                                         \
  do {                                                               \
    if (!(cond)) {                                                   \
      throw std::runtime_error(::c10::str(__VA_ARGS__));             \
    }                                                                \
  } while (0)

#ifdef __CUDACC__
#define DGF_CUDA_CHECK(expr)                                                                  \
  do {                                                                                        \
    const cudaError_t dgf_status = (expr);                                                    \
    DGF_CHECK(dgf_status == cudaSuccess, "dancegrpo_fast._C: CUDA error: ",                   \
              cudaGetErrorString(dgf_status), " (", #expr, ")");                              \
  } while (0)
#endif
