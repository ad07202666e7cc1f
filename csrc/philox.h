// fastgan's counter-based random numbers, identical on every backend (see
// fastgan/reference/gradient_penalty.py): Philox-4x32-10 with key (seed low,
// seed high) and counter (i, 0, 0, 0); the i-th uniform in [0, 1) is
// (first output word >> 8) * 2^-24, exact in float.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTGAN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTGAN_HOST_DEVICE inline
#endif

namespace fastgan {

FASTGAN_HOST_DEVICE float philox_uniform(uint64_t seed, uint32_t index) {
  uint32_t c0 = index, c1 = 0, c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint64_t pb = static_cast<uint64_t>(0xCD9E8D57u) * c2;
    const uint64_t pa = static_cast<uint64_t>(0xD2511F53u) * c0;
    const uint32_t n0 = static_cast<uint32_t>(pb >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(pa >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(pb);
    c3 = static_cast<uint32_t>(pa);
    c0 = n0;
    c2 = n2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return static_cast<float>(c0 >> 8) * (1.0f / 16777216.0f);
}

}  // namespace fastgan
