// Philox4x32-10 + Box-Muller, bit-compatible with Triton 3.x `tl.randn(seed, offset)` for an int32
// offset. No torch dependency: usable from plain C++, from the CPU extension and from CUDA device
// code (the functions are __host__ __device__ when compiled by nvcc).
//
//   normal(seed, j), seed a 64-bit integer (an int64 reinterpreted as uint64), 0 <= j < 2^31:
//     key (k0, k1) = (low 32 bits of seed, high 32 bits); counter (c0, c1, c2, c3) = (j, 0, 0, 0)
//     10 rounds of
//       (c0, c1, c2, c3) = (umulhi(0xCD9E8D57, c2) ^ c1 ^ k0, 0xCD9E8D57 * c2,
//                           umulhi(0xD2511F53, c0) ^ c3 ^ k1, 0xD2511F53 * c0)   (mod 2^32)
//       k0 += 0x9E3779B9; k1 += 0xBB67AE85
//     u(x) = float32(x' ) * 4.6566127342e-10f with x' = int32(x), or ~int32(x) when negative
//     u1 = max(1e-7f, u(c0)); u2 = u(c1)
//     normal = sqrtf(-2 * logf(u1)) * cosf(6.2831855f * u2)        (all float32)
#pragma once

#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DGF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DGF_HOST_DEVICE inline
#endif

#if !(defined(__CUDACC__) || defined(__HIPCC__))
#include <cmath>
#endif

namespace dancegrpo_fast {
namespace philox {

constexpr uint32_t kRoundA = 0xD2511F53u;  // multiplies c0
constexpr uint32_t kRoundB = 0xCD9E8D57u;  // multiplies c2
constexpr uint32_t kKeyA = 0x9E3779B9u;    // added to k0 after each round
constexpr uint32_t kKeyB = 0xBB67AE85u;    // added to k1 after each round
constexpr int kRounds = 10;

// Largest float32 such that (2^31 - 1) * scale < 1 after rounding; Triton's constant.
constexpr float kUniformScale = 4.6566127342e-10f;
// Triton multiplies a float32 tensor by the Python float 6.283185307179586, i.e. by this float32.
constexpr float kTwoPi = 6.283185307179586f;
constexpr float kMinUniform = 1.0e-7f;

DGF_HOST_DEVICE uint32_t umulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
#endif
}

struct Uint2 {
  uint32_t x;
  uint32_t y;
};

// First two 32-bit outputs of Philox4x32-10 for counter (c0, 0, 0, 0) and key (k0, k1).
DGF_HOST_DEVICE Uint2 philox4x32_10_first2(uint32_t c0, uint32_t k0, uint32_t k1) {
  uint32_t c1 = 0u, c2 = 0u, c3 = 0u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kRounds; ++r) {
    const uint32_t hi_b = umulhi32(kRoundB, c2);
    const uint32_t lo_b = kRoundB * c2;
    const uint32_t hi_a = umulhi32(kRoundA, c0);
    const uint32_t lo_a = kRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  Uint2 out;
  out.x = c0;
  out.y = c1;
  return out;
}

// Triton's uint_to_uniform_float for 32-bit inputs: [0, 1).
DGF_HOST_DEVICE float uint32_to_uniform(uint32_t x) {
  int32_t v = static_cast<int32_t>(x);
  if (v < 0) v = ~v;  // == -v - 1, without overflow
  return static_cast<float>(v) * kUniformScale;
}

DGF_HOST_DEVICE float box_muller_first(float u1, float u2) {
  u1 = u1 > kMinUniform ? u1 : kMinUniform;  // tl.maximum(1e-7, u1)
  const float th = kTwoPi * u2;
#if defined(__CUDA_ARCH__)
  const float r = sqrtf(-2.0f * logf(u1));
  return r * cosf(th);
#else
  const float r = std::sqrt(-2.0f * std::log(u1));
  return r * std::cos(th);
#endif
}

// normal(seed, j): Triton's tl.randn(seed, j) for a 64-bit seed and an int32 offset j >= 0.
DGF_HOST_DEVICE float normal(uint64_t seed, uint32_t j) {
  const uint32_t k0 = static_cast<uint32_t>(seed & 0xFFFFFFFFull);
  const uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  const Uint2 r = philox4x32_10_first2(j, k0, k1);
  return box_muller_first(uint32_to_uniform(r.x), uint32_to_uniform(r.y));
}

}  // namespace philox
}  // namespace dancegrpo_fast
