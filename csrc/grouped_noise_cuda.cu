// CUDA path of dancegrpo_fast._C grouped_noise: one thread per (prompt, element), grid-stride.
// Each thread computes normal(seeds[p], j) once (philox.h, identical to Triton tl.randn) and writes
// it, cast to the output dtype, to the group_size rows of prompt p (coalesced across threads).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
// Not <ATen/cuda/CUDAContext.h>: it includes the cuBLAS/cuSPARSE/cuSOLVER headers, which a CUDA
// toolkit with only nvcc and the runtime (enough for this file) does not have.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "check.h"
#include "philox.h"

namespace dancegrpo_fast {

namespace {

template <typename scalar_t>
__global__ void grouped_noise_kernel(const int64_t* __restrict__ seeds, int64_t total, int64_t group_size,
                                     int64_t numel, scalar_t* __restrict__ out) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total; idx += stride) {
    const int64_t p = idx / numel;
    const int64_t j = idx - p * numel;
    const float v = philox::normal(static_cast<uint64_t>(seeds[p]), static_cast<uint32_t>(j));
    const scalar_t cv = static_cast<scalar_t>(v);
    scalar_t* dst = out + p * group_size * numel + j;
    for (int64_t g = 0; g < group_size; ++g) {
      dst[g * numel] = cv;
    }
  }
}

}  // namespace

void grouped_noise_cuda_out(const at::Tensor& seeds, int64_t group_size, int64_t numel, at::Tensor& out) {
  DGF_CHECK(seeds.is_cuda() && seeds.device() == out.device(),
              "grouped_noise: seeds must be on the output device ", out.device(), ", got ", seeds.device());
  DGF_CHECK(seeds.scalar_type() == at::kLong && seeds.is_contiguous(),
              "grouped_noise: seeds must be a contiguous int64 tensor");
  DGF_CHECK(out.is_contiguous(), "grouped_noise: out must be contiguous");
  const int64_t num_prompts = seeds.size(0);
  const int64_t total = num_prompts * numel;
  if (total == 0 || group_size == 0) return;

  const c10::cuda::CUDAGuard device_guard(out.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  constexpr int kThreads = 256;
  const int64_t blocks_needed = (total + kThreads - 1) / kThreads;
  int num_sms = 0;
  DGF_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, out.device().index()));
  const int64_t max_blocks = static_cast<int64_t>(num_sms) * 32;
  const unsigned int blocks = static_cast<unsigned int>(std::max<int64_t>(1, std::min(blocks_needed, max_blocks)));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "grouped_noise_cuda", [&] {
    grouped_noise_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(seeds.data_ptr<int64_t>(), total, group_size,
                                                                    numel, out.data_ptr<scalar_t>());
    DGF_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace dancegrpo_fast
