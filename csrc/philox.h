// fastgan's counter-based random numbers, identical on every backend (see
// fastgan/reference/gradient_penalty.py): Philox-4x32-10 with key (seed low,
// seed high) and counter (c, 0, 0, 0), triton's tl.randint4x(seed, c). One
// evaluation yields four 32-bit words; the i-th uniform in [0, 1) is
// (word i % 4 of counter i / 4 >> 8) * 2^-24, exact in float. Counters are 32 bits,
// so a call draws at most 2^34 numbers (kMaxPhiloxDraws).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTGAN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTGAN_HOST_DEVICE inline
#endif

namespace fastgan {

constexpr int64_t kMaxPhiloxDraws = int64_t{1} << 34;

struct PhiloxWords {
  uint32_t w[4];
};

FASTGAN_HOST_DEVICE PhiloxWords philox4(uint64_t seed, uint32_t counter) {
  uint32_t c0 = counter, c1 = 0, c2 = 0, c3 = 0;
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
  return {{c0, c1, c2, c3}};
}

FASTGAN_HOST_DEVICE float uniform_from_word(uint32_t word) {
  return static_cast<float>(word >> 8) * (1.0f / 16777216.0f);
}

// Word j (0-3) chosen with selects: indexing the array with a run-time j would put
// it in local memory on a GPU.
FASTGAN_HOST_DEVICE uint32_t philox_word(const PhiloxWords& words, int64_t j) {
  return j == 0 ? words.w[0] : j == 1 ? words.w[1] : j == 2 ? words.w[2] : words.w[3];
}

// The index-th uniform of the stream (one Philox evaluation; when consecutive
// indices are needed, call philox4 once per four of them instead).
FASTGAN_HOST_DEVICE float philox_uniform(uint64_t seed, int64_t index) {
  return uniform_from_word(philox_word(philox4(seed, static_cast<uint32_t>(index >> 2)), index & 3));
}

}  // namespace fastgan
