// Device helpers shared by fastgan's CUDA kernels.
#pragma once

#include <cuda_runtime.h>

namespace fastgan {

constexpr int kWarpSize = 32;

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Correctly rounded whatever flags a build passes (--use_fast_math would approximate / and sqrt),
// so GPU results round like the CPU's.
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ float sqrt_rn(float a) { return __fsqrt_rn(a); }
__device__ __forceinline__ double sqrt_rn(double a) { return __dsqrt_rn(a); }

}  // namespace fastgan
