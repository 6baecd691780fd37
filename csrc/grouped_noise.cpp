// dancegrpo_fast._C: counter-based Gaussian noise shared within GRPO groups.
//
// grouped_noise(seeds, group_size, shape, dtype, device) returns a (P * group_size, *shape) tensor
// whose rows p*group_size .. p*group_size+group_size-1 all equal normal(seeds[p], j),
// j = 0 .. prod(shape)-1 in C order (see philox.h for normal()). Values are computed in float32 and
// then cast to dtype. Each prompt's noise is computed once and written to every row of its group.
//
// The CPU path is here; the CUDA path (grouped_noise_cuda.cu) is compiled when WITH_CUDA is defined.
#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "check.h"
#include "philox.h"

namespace dancegrpo_fast {

#ifdef WITH_CUDA
// Defined in grouped_noise_cuda.cu. seeds: int64, contiguous, on out's device; out: contiguous
// (P * group_size * numel elements) of dtype float32/float64/float16/bfloat16.
void grouped_noise_cuda_out(const at::Tensor& seeds, int64_t group_size, int64_t numel, at::Tensor& out);
#endif

namespace {

constexpr int64_t kMaxNumel = int64_t(1) << 31;  // element index j must fit an int32 offset

bool has_cuda_support() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

int64_t checked_numel(const std::vector<int64_t>& shape) {
  int64_t numel = 1;
  for (size_t d = 0; d < shape.size(); ++d) {
    DGF_CHECK(shape[d] >= 0, "grouped_noise: shape must have non-negative entries, got shape[", d,
                "] = ", shape[d]);
    if (shape[d] == 0) {
      numel = 0;
    } else if (numel != 0) {
      DGF_CHECK(numel <= kMaxNumel / shape[d],
                  "grouped_noise: shape has more than 2^31 elements per prompt (element indices are int32 "
                  "offsets)");
      numel *= shape[d];
    }
  }
  DGF_CHECK(numel <= kMaxNumel, "grouped_noise: shape has more than 2^31 elements per prompt");
  return numel;
}

void check_seeds(const at::Tensor& seeds) {
  DGF_CHECK(seeds.defined(), "grouped_noise: seeds must be a tensor, got None");
  DGF_CHECK(seeds.dim() == 1, "grouped_noise: seeds must be a 1-D int64 tensor of shape (P,), got ",
              seeds.dim(), "-D tensor of shape ", seeds.sizes());
  DGF_CHECK(seeds.scalar_type() == at::kLong, "grouped_noise: seeds must have dtype int64 (torch.long), got ",
              seeds.scalar_type());
}

void check_dtype(at::ScalarType dtype) {
  DGF_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "grouped_noise: dtype must be one of float32, float64, float16, bfloat16, got ", dtype);
}

// Number of elements generated in one go (stack buffer) before being copied to the group rows.
constexpr int64_t kChunk = 512;

template <typename scalar_t>
void grouped_noise_cpu_kernel(const int64_t* seeds, int64_t num_prompts, int64_t group_size, int64_t numel,
                              scalar_t* out) {
  const int64_t total = num_prompts * numel;
  // Each element costs ~50-100 ns (Philox + log/sqrt/cos), so modest grains parallelise well.
  const int64_t grain = 4096;
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    float buf[kChunk];
    float u1[kChunk];
    int64_t idx = begin;
    while (idx < end) {
      const int64_t p = idx / numel;
      const int64_t j0 = idx - p * numel;
      const int64_t n = std::min<int64_t>({kChunk, end - idx, numel - j0});
      const uint64_t seed = static_cast<uint64_t>(seeds[p]);
      // Two passes: the integer Philox rounds (no calls, vectorisable), then log/sqrt/cos.
      const uint32_t k0 = static_cast<uint32_t>(seed & 0xFFFFFFFFull);
      const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
      for (int64_t t = 0; t < n; ++t) {
        const philox::Uint2 r = philox::philox4x32_10_first2(static_cast<uint32_t>(j0 + t), k0, k1);
        u1[t] = philox::uint32_to_uniform(r.x);
        buf[t] = philox::uint32_to_uniform(r.y);
      }
      for (int64_t t = 0; t < n; ++t) {
        buf[t] = philox::box_muller_first(u1[t], buf[t]);
      }
      scalar_t* row0 = out + p * group_size * numel + j0;
      for (int64_t g = 0; g < group_size; ++g) {
        scalar_t* dst = row0 + g * numel;
        for (int64_t t = 0; t < n; ++t) {
          dst[t] = static_cast<scalar_t>(buf[t]);
        }
      }
      idx += n;
    }
  });
}

void grouped_noise_cpu_out(const at::Tensor& seeds, int64_t group_size, int64_t numel, at::Tensor& out) {
  const int64_t num_prompts = seeds.size(0);
  if (num_prompts == 0 || numel == 0 || group_size == 0) return;
  const int64_t* seeds_ptr = seeds.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "grouped_noise_cpu", [&] {
    grouped_noise_cpu_kernel<scalar_t>(seeds_ptr, num_prompts, group_size, numel, out.data_ptr<scalar_t>());
  });
}

}  // namespace

// Writes the grouped noise into `out`, which must be contiguous with P * group_size * prod(shape)
// elements (its shape is not otherwise constrained) on CPU or, when built with CUDA, a CUDA device.
void grouped_noise_out(const at::Tensor& seeds_in, int64_t group_size, at::Tensor& out) {
  check_seeds(seeds_in);
  DGF_CHECK(group_size >= 1, "grouped_noise: group_size must be >= 1, got ", group_size);
  DGF_CHECK(out.defined(), "grouped_noise: out must be a tensor");
  DGF_CHECK(out.is_contiguous(), "grouped_noise: out must be contiguous");
  check_dtype(out.scalar_type());
  const int64_t num_prompts = seeds_in.size(0);
  const int64_t rows = num_prompts * group_size;
  DGF_CHECK(out.dim() >= 1 && out.size(0) == rows, "grouped_noise: out must have first dimension P * group_size = ",
              rows, ", got shape ", out.sizes());
  const int64_t numel = rows == 0 ? 0 : out.numel() / rows;
  DGF_CHECK(numel <= kMaxNumel, "grouped_noise: more than 2^31 elements per prompt");
  if (out.numel() == 0) return;

  if (out.device().is_cpu()) {
    at::Tensor seeds = seeds_in.to(at::kCPU).contiguous();
    grouped_noise_cpu_out(seeds, group_size, numel, out);
  } else if (out.device().is_cuda()) {
#ifdef WITH_CUDA
    at::Tensor seeds = seeds_in.to(out.device()).contiguous();
    grouped_noise_cuda_out(seeds, group_size, numel, out);
#else
    DGF_CHECK(false, "grouped_noise: device='", out.device().str(),
                "' requested but dancegrpo_fast._C was built without CUDA support (torch without CUDA or nvcc "
                "missing at build time); use the PyTorch fallback or rebuild with "
                "`pip install --no-build-isolation -e .` on a machine with a CUDA torch and nvcc");
#endif
  } else {
    DGF_CHECK(false, "grouped_noise: device must be cpu or cuda, got '", out.device().str(), "'");
  }
}

at::Tensor grouped_noise(const at::Tensor& seeds, int64_t group_size, const std::vector<int64_t>& shape,
                         at::ScalarType dtype, at::Device device) {
  check_seeds(seeds);
  DGF_CHECK(group_size >= 1, "grouped_noise: group_size must be >= 1, got ", group_size);
  check_dtype(dtype);
  DGF_CHECK(device.is_cpu() || device.is_cuda(), "grouped_noise: device must be cpu or cuda, got '",
              device.str(), "'");
#ifndef WITH_CUDA
  DGF_CHECK(!device.is_cuda(), "grouped_noise: device='", device.str(),
              "' requested but dancegrpo_fast._C was built without CUDA support (torch without CUDA or nvcc "
              "missing at build time); use the PyTorch fallback or rebuild with "
              "`pip install --no-build-isolation -e .` on a machine with a CUDA torch and nvcc");
#endif
  checked_numel(shape);
  std::vector<int64_t> out_shape;
  out_shape.reserve(shape.size() + 1);
  out_shape.push_back(seeds.size(0) * group_size);
  out_shape.insert(out_shape.end(), shape.begin(), shape.end());
  at::Tensor out = at::empty(out_shape, at::TensorOptions().dtype(dtype).device(device));
  grouped_noise_out(seeds, group_size, out);
  return out;
}

// Scalar reference, for tests: normal(seed, j).
double philox_normal_scalar(int64_t seed, int64_t j) {
  DGF_CHECK(j >= 0 && j < kMaxNumel, "philox_normal_scalar: j must be in [0, 2^31), got ", j);
  return static_cast<double>(philox::normal(static_cast<uint64_t>(seed), static_cast<uint32_t>(j)));
}

}  // namespace dancegrpo_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dancegrpo_fast._C: grouped counter-based Gaussian noise (Philox4x32-10, identical to Triton tl.randn)";
  m.def("grouped_noise", &dancegrpo_fast::grouped_noise, py::arg("seeds"), py::arg("group_size"), py::arg("shape"),
        py::arg("dtype"), py::arg("device"),
        "grouped_noise(seeds: int64 (P,), group_size: int, shape: list[int], dtype: torch.dtype, "
        "device: torch.device) -> Tensor (P*group_size, *shape); rows of a group equal normal(seeds[p], j).");
  m.def("grouped_noise_out", &dancegrpo_fast::grouped_noise_out, py::arg("seeds"), py::arg("group_size"),
        py::arg("out"),
        "grouped_noise_out(seeds, group_size, out): writes the grouped noise into a contiguous `out` whose first "
        "dimension is P*group_size.");
  m.def("philox_normal_scalar", &dancegrpo_fast::philox_normal_scalar, py::arg("seed"), py::arg("j"),
        "normal(seed, j) for one element (float32 value returned as a Python float).");
  m.def("has_cuda", &dancegrpo_fast::has_cuda_support, "True when the extension was compiled with CUDA.");
}
