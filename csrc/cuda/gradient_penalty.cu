// CUDA kernels of the gradient-penalty ops (formulas: fastgan/reference/gradient_penalty.py).
//
// What it computes, and the DRAM bytes each op moves (n elements of s bytes, B samples):
//
// * gp_interpolate: x_hat = real + a_b (fake - real) in opmath, a_b = alpha[b] or the
//   b-th Philox uniform, cast to real's dtype; alpha_used = those a_b. One grid-stride
//   launch, 16-byte loads and stores: reads 2 n s, writes n s (+ B alpha values).
// * dragan_perturb: x_hat = clamp(real + std (noise_i - 1/2), 0, 1), noise_i the i-th
//   Philox uniform in real's dtype. std is at::std, biased (the reference's own
//   reduction, so the same value, rounded to real's dtype as there), left on the device
//   and read by the elementwise kernel: no host sync. Reads 2 n s (std pass + perturb
//   pass), writes n s. One Philox evaluation (~10 integer multiply rounds) serves four
//   elements.
// * gp_penalty: sq_b = sum g_b^2 (opmath accumulation) and the penalty from it, in ONE
//   launch: each block sums a chunk of one sample (or a few whole small samples) into
//   a partial, and the last block to finish (atomic ticket) adds each sample's
//   partials in a fixed order, writes sq and reduces the penalty. Reads n s once, plus
//   a few bytes per block; deterministic (no floating-point atomics).
//
// Accumulation is float for float/half/bfloat16 and double for double; the division and
// square root of the penalty go through the IEEE round-to-nearest intrinsics, and the
// build keeps denormals (no --use_fast_math). Random numbers: ../philox.h, bit-identical to the
// reference; its counter is 32 bits, so at most 2^34 draws per call. Batches are read
// in place when dense with the samples outermost (../batch_layout.h), channels-last
// included; every launch goes to the tensors' device (CUDAGuard) on its current stream.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "../batch_layout.h"
#include "../philox.h"
#include "device_math.cuh"

namespace fastgan {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kUnroll = 4;         // 16-byte loads in flight per thread in the penalty loop
constexpr int kMaxRowsPerBlock = 8;  // small samples per penalty block: one warp each at most

// Where alpha comes from: drawn in the kernel, or read from a tensor of this dtype.
enum AlphaKind : int { kAlphaPhilox, kAlphaFloat, kAlphaDouble, kAlphaHalf, kAlphaBFloat16 };

// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

// N elements moved as one load or store (16 bytes when N = 16 / sizeof(T)).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};


// Sum over the block, returned to every thread in a fixed order.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t x, acc_t* partial) {
  x = warp_sum(x);
  __syncthreads();  // earlier readers of `partial` are done with it
  if (threadIdx.x % kWarpSize == 0) partial[threadIdx.x / kWarpSize] = x;
  __syncthreads();
  acc_t total = 0;
#pragma unroll
  for (int i = 0; i < kWarps; ++i) total += partial[i];
  return total;
}


// a_b in real's dtype. A given alpha is cast straight to scalar_t, as the reference's
// .to(real.dtype) does (half and bfloat16 convert through float either way).
template <typename scalar_t>
__device__ __forceinline__ scalar_t sample_alpha(const void* alpha, int kind, uint64_t seed, int64_t b) {
  switch (kind) {
    case kAlphaFloat: return static_cast<scalar_t>(static_cast<const float*>(alpha)[b]);
    case kAlphaDouble: return static_cast<scalar_t>(static_cast<const double*>(alpha)[b]);
    case kAlphaHalf: return static_cast<scalar_t>(static_cast<float>(static_cast<const at::Half*>(alpha)[b]));
    case kAlphaBFloat16:
      return static_cast<scalar_t>(static_cast<float>(static_cast<const at::BFloat16*>(alpha)[b]));
    default: return static_cast<scalar_t>(philox_uniform(seed, b));
  }
}

// A thread meets the same sample for many consecutive elements, so it fetches or
// draws a_b only when b changes.
template <typename scalar_t>
struct AlphaCache {
  using acc_t = at::opmath_type<scalar_t>;
  const void* alpha;
  int kind;
  uint64_t seed;
  int64_t b = -1;
  acc_t a = 0;

  __device__ __forceinline__ acc_t get(int64_t sample) {
    if (sample != b) {
      b = sample;
      a = static_cast<acc_t>(sample_alpha<scalar_t>(alpha, kind, seed, sample));
    }
    return a;
  }
};

// real + a (fake - real), rounded once from opmath.
template <typename scalar_t>
__device__ __forceinline__ scalar_t lerp(scalar_t x, scalar_t y, at::opmath_type<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t xa = static_cast<acc_t>(x);
  return static_cast<scalar_t>(xa + a * (static_cast<acc_t>(y) - xa));
}

// Sum of squares of the elements of x[0, n) that thread g of a G-thread group owns,
// 16 bytes at a time from the first 16-byte aligned element on (a sample or chunk
// may start anywhere), with kUnroll independent loads issued before any is used.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t sum_squares(const scalar_t* __restrict__ x, int64_t n, int g, int G) {
  constexpr int N = 16 / sizeof(scalar_t);
  using P = Pack<scalar_t, N>;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(x);
  int64_t head = addr % sizeof(scalar_t) == 0 ? static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(scalar_t)) : n;
  head = head < n ? head : n;
  const int64_t nvec = (n - head) / N;
  acc_t acc = 0;
  for (int64_t k = g; k < head; k += G) {
    const acc_t e = static_cast<acc_t>(x[k]);
    acc += e * e;
  }
  const P* __restrict__ xv = reinterpret_cast<const P*>(x + head);
  const int64_t stride = G;
  int64_t i = g;
  for (; i + (kUnroll - 1) * stride < nvec; i += kUnroll * stride) {
    P p[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) p[j] = xv[i + j * stride];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
#pragma unroll
      for (int q = 0; q < N; ++q) {
        const acc_t e = static_cast<acc_t>(p[j].v[q]);
        acc += e * e;
      }
    }
  }
  for (; i < nvec; i += stride) {
    const P p = xv[i];
#pragma unroll
    for (int q = 0; q < N; ++q) {
      const acc_t e = static_cast<acc_t>(p.v[q]);
      acc += e * e;
    }
  }
  for (int64_t k = head + nvec * N + g; k < n; k += G) {
    const acc_t e = static_cast<acc_t>(x[k]);
    acc += e * e;
  }
  return acc;
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

// x_hat = real + a_b (fake - real) over VEC-element packs (VEC = 1 when a pointer is
// not 16-byte aligned), plus alpha_used. The sample b of a thread's current element is
// tracked as (b, r) = divmod(index, per_sample) and advanced by the grid stride
// without a 64-bit division per pack.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    interpolate_kernel(const scalar_t* __restrict__ real, const scalar_t* __restrict__ fake,
                       const void* __restrict__ alpha, int alpha_kind, uint64_t seed, scalar_t* __restrict__ out,
                       scalar_t* __restrict__ alpha_out, int64_t numel, int64_t per_sample, int64_t batch) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;

  // Recomputed rather than shared with the loop below, so that every sample gets its
  // alpha_used even when it has no elements.
  for (int64_t b = tid; b < batch; b += nthreads) alpha_out[b] = sample_alpha<scalar_t>(alpha, alpha_kind, seed, b);

  AlphaCache<scalar_t> cache{alpha, alpha_kind, seed};
  const int64_t nvec = numel / VEC;
  const int64_t step = nthreads * VEC, db = step / per_sample, dr = step - db * per_sample;
  int64_t b = tid * VEC / per_sample, r = tid * VEC - b * per_sample;
  const P* __restrict__ rv = reinterpret_cast<const P*>(real);
  const P* __restrict__ fv = reinterpret_cast<const P*>(fake);
  P* __restrict__ ov = reinterpret_cast<P*>(out);
  for (int64_t v = tid; v < nvec; v += nthreads) {
    const P x = rv[v], y = fv[v];
    acc_t a[VEC];
    if (r + VEC <= per_sample) {  // the usual case: the pack lies inside one sample
      const acc_t ab = cache.get(b);
#pragma unroll
      for (int q = 0; q < VEC; ++q) a[q] = ab;
    } else {
      int64_t bb = b, rr = r;
#pragma unroll
      for (int q = 0; q < VEC; ++q) {
        a[q] = cache.get(bb);
        if (++rr == per_sample) {
          rr = 0;
          ++bb;
        }
      }
    }
    P o;
#pragma unroll
    for (int q = 0; q < VEC; ++q) o.v[q] = lerp(x.v[q], y.v[q], a[q]);
    ov[v] = o;
    b += db;
    r += dr;
    if (r >= per_sample) {
      r -= per_sample;
      ++b;
    }
  }
  // The last numel % VEC elements.
  for (int64_t i = nvec * VEC + tid; i < numel; i += nthreads) {
    out[i] = lerp(real[i], fake[i], cache.get(i / per_sample));
  }
}

template <typename scalar_t>
__device__ __forceinline__ scalar_t dragan_element(scalar_t x, at::opmath_type<scalar_t> std_dev, float uniform) {
  using acc_t = at::opmath_type<scalar_t>;
  // Rounded to real's dtype before the shift, as the reference's .to(real.dtype).
  const acc_t noise = static_cast<acc_t>(static_cast<scalar_t>(uniform));
  const acc_t y = static_cast<acc_t>(x) + std_dev * (noise - acc_t(0.5));
  // Written with comparisons so that NaN passes through, as torch.clamp lets it.
  return static_cast<scalar_t>(y < acc_t(0) ? acc_t(0) : (y > acc_t(1) ? acc_t(1) : y));
}

// x_hat = clamp(real + std (noise_i - 1/2), 0, 1) over VEC-element packs; std is the
// 0-d device tensor from at::std, in real's dtype. A pack of VEC >= 4 elements starts
// at a multiple of 4 and takes all four words of each of its VEC / 4 Philox
// evaluations; a pack of 2 takes half of one; the scalar tail draws per element.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    dragan_kernel(const scalar_t* __restrict__ real, const scalar_t* __restrict__ std_dev, uint64_t seed,
                  scalar_t* __restrict__ out, int64_t numel) {
  using acc_t = at::opmath_type<scalar_t>;
  using P = Pack<scalar_t, VEC>;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t nthreads = static_cast<int64_t>(gridDim.x) * kThreads;
  const acc_t sd = static_cast<acc_t>(*std_dev);
  const int64_t nvec = numel / VEC;
  const P* __restrict__ rv = reinterpret_cast<const P*>(real);
  P* __restrict__ ov = reinterpret_cast<P*>(out);
  for (int64_t v = tid; v < nvec; v += nthreads) {
    const P x = rv[v];
    P o;
    const int64_t first = v * VEC;
    if constexpr (VEC >= 4) {
#pragma unroll
      for (int g = 0; g < VEC / 4; ++g) {
        const PhiloxWords words = philox4(seed, static_cast<uint32_t>((first >> 2) + g));
#pragma unroll
        for (int q = 0; q < 4; ++q) o.v[4 * g + q] = dragan_element(x.v[4 * g + q], sd, uniform_from_word(words.w[q]));
      }
    } else if constexpr (VEC == 2) {
      const PhiloxWords words = philox4(seed, static_cast<uint32_t>(first >> 2));
#pragma unroll
      for (int q = 0; q < 2; ++q) o.v[q] = dragan_element(x.v[q], sd, uniform_from_word(philox_word(words, (first & 3) + q)));
    } else {
      o.v[0] = dragan_element(x.v[0], sd, philox_uniform(seed, first));
    }
    ov[v] = o;
  }
  for (int64_t i = nvec * VEC + tid; i < numel; i += nthreads) {
    out[i] = dragan_element(real[i], sd, philox_uniform(seed, i));
  }
}

// Block j covers chunk c = j % chunks of samples [rows * (j / chunks), + rows): with
// rows > 1 (small samples, chunks = 1) each sample gets kThreads / rows threads (whole
// warps); with rows = 1 a sample is split into chunks of chunk_len elements. Each
// (sample, chunk) partial goes to partials[b * chunks + c]; the last block to take a
// ticket adds them per sample in chunk order, writes sq and reduces the penalty.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    penalty_kernel(const scalar_t* __restrict__ grad, int64_t batch, int64_t per_sample, int rows, int64_t chunks,
                   int64_t chunk_len, acc_t* __restrict__ partials, unsigned int* __restrict__ counter,
                   acc_t* __restrict__ sq, scalar_t* __restrict__ penalty, bool squared_norm, acc_t center, acc_t eps,
                   bool one_sided) {
  __shared__ acc_t warp_sums[kWarps];
  __shared__ bool is_last;
  const int tid = threadIdx.x;
  const int64_t group = blockIdx.x / chunks, c = blockIdx.x - group * chunks;
  const int group_threads = kThreads / rows;
  const int r = tid / group_threads, g = tid - r * group_threads;
  const int64_t b = group * rows + r;

  acc_t acc = 0;
  if (b < batch) {
    const int64_t start = c * chunk_len;
    const int64_t len = per_sample - start < chunk_len ? per_sample - start : chunk_len;
    acc = sum_squares<scalar_t, acc_t>(grad + b * per_sample + start, len, g, group_threads);
  }
  acc = warp_sum(acc);  // a group is whole warps, so each warp holds one sample
  if (tid % kWarpSize == 0) warp_sums[tid / kWarpSize] = acc;
  __syncthreads();
  if (tid < rows && group * rows + tid < batch) {
    const int warps_per_row = group_threads / kWarpSize;
    acc_t s = 0;
    for (int j = 0; j < warps_per_row; ++j) s += warp_sums[tid * warps_per_row + j];
    partials[(group * rows + tid) * chunks + c] = s;
    __threadfence();  // the partial is visible device-wide before the ticket is taken
  }
  __syncthreads();
  if (tid == 0) {
    __threadfence();
    is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();

  acc_t total = 0;
  for (int64_t i = tid; i < batch; i += kThreads) {
    acc_t s = 0;
    // L2 loads: the partials were written by other SMs.
    for (int64_t k = 0; k < chunks; ++k) s += __ldcg(partials + i * chunks + k);
    sq[i] = s;
    if (squared_norm) {
      total += s;
    } else {
      acc_t gap = sqrt_rn(eps + s) - center;
      if (one_sided && gap < acc_t(0)) gap = 0;  // clamp(min=0): NaN stays NaN
      total += gap * gap;
    }
  }
  total = block_sum(total, warp_sums);
  if (tid == 0) {
    const acc_t mean = div_rn(total, static_cast<acc_t>(batch));
    *penalty = static_cast<scalar_t>(squared_norm ? acc_t(0.5) * mean : mean);
  }
}

// ---------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks of kThreads that fit on the device at once: the grid of the grid-stride
// kernels, and the penalty's target block count.
int64_t resident_blocks() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  return std::max<int64_t>(1, static_cast<int64_t>(prop->multiProcessorCount) *
                                  (prop->maxThreadsPerMultiProcessor / kThreads));
}

int elementwise_blocks(int64_t work) {
  return static_cast<int>(std::min(resident_blocks(), std::max<int64_t>(1, ceil_div(work, kThreads))));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

void check_batch(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(x.is_cuda(), op, ": the CUDA kernel got ", name, " on ", x.device());
  TORCH_CHECK(x.is_floating_point(), op, ": ", name, " must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(0) >= 1, op, ": ", name,
              " must be a batch with at least one sample (first dimension), got shape ", x.sizes());
}

std::tuple<at::Tensor, at::Tensor> gp_interpolate_cuda(const at::Tensor& real_in, const at::Tensor& fake_in,
                                                       const std::optional<at::Tensor>& alpha_in, int64_t seed) {
  check_batch(real_in, "gp_interpolate", "real");
  check_batch(fake_in, "gp_interpolate", "fake");
  TORCH_CHECK(real_in.sizes() == fake_in.sizes(), "gp_interpolate: real and fake must have the same shape, got ",
              real_in.sizes(), " and ", fake_in.sizes());
  TORCH_CHECK(real_in.scalar_type() == fake_in.scalar_type(),
              "gp_interpolate: real and fake must have the same dtype, got ", real_in.scalar_type(), " and ",
              fake_in.scalar_type());
  TORCH_CHECK(real_in.device() == fake_in.device(), "gp_interpolate: real and fake must be on the same device, got ",
              real_in.device(), " and ", fake_in.device());
  const int64_t batch = real_in.size(0);

  const c10::cuda::CUDAGuard guard(real_in.device());
  at::Tensor real, fake;
  std::tie(real, fake) = batch_major_pair(real_in, fake_in);
  at::Tensor alpha;
  int alpha_kind = kAlphaPhilox;
  if (alpha_in.has_value()) {
    alpha = alpha_in->contiguous();
    TORCH_CHECK(alpha.device() == real.device(), "gp_interpolate: alpha must be on ", real.device(), ", got ",
                alpha.device());
    TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == batch, "gp_interpolate: alpha must have shape (", batch,
                ",), got ", alpha.sizes());
    switch (alpha.scalar_type()) {
      case at::kFloat: alpha_kind = kAlphaFloat; break;
      case at::kDouble: alpha_kind = kAlphaDouble; break;
      case at::kHalf: alpha_kind = kAlphaHalf; break;
      case at::kBFloat16: alpha_kind = kAlphaBFloat16; break;
      default:
        TORCH_CHECK(false, "gp_interpolate: alpha must be float32, float64, float16 or bfloat16, got ",
                    alpha.scalar_type());
    }
  } else {
    TORCH_CHECK(batch <= kMaxPhiloxDraws, "gp_interpolate: drawing alpha supports at most 2^34 samples, got ", batch);
  }

  const int64_t numel = real.numel();
  // Any positive value will do for an empty batch: no element is visited.
  const int64_t per_sample = numel == 0 ? 1 : numel / batch;
  at::Tensor x_hat = at::empty_like(real);
  at::Tensor alpha_used = at::empty({batch}, real.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const void* alpha_ptr = alpha.defined() ? alpha.const_data_ptr() : nullptr;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, real.scalar_type(), "gp_interpolate", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* r = real.const_data_ptr<scalar_t>();
    const scalar_t* f = fake.const_data_ptr<scalar_t>();
    scalar_t* o = x_hat.mutable_data_ptr<scalar_t>();
    scalar_t* a = alpha_used.mutable_data_ptr<scalar_t>();
    const uint64_t s = static_cast<uint64_t>(seed);
    if (aligned16(r) && aligned16(f) && aligned16(o)) {
      const int blocks = elementwise_blocks(std::max(numel / kVec, batch));
      interpolate_kernel<scalar_t, kVec>
          <<<blocks, kThreads, 0, stream>>>(r, f, alpha_ptr, alpha_kind, s, o, a, numel, per_sample, batch);
    } else {
      const int blocks = elementwise_blocks(std::max(numel, batch));
      interpolate_kernel<scalar_t, 1>
          <<<blocks, kThreads, 0, stream>>>(r, f, alpha_ptr, alpha_kind, s, o, a, numel, per_sample, batch);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {x_hat, alpha_used};
}

at::Tensor dragan_perturb_cuda(const at::Tensor& real_in, int64_t seed) {
  check_batch(real_in, "dragan_perturb", "real");
  const int64_t numel = real_in.numel();
  TORCH_CHECK(numel <= kMaxPhiloxDraws, "dragan_perturb: supports at most 2^34 elements (four per Philox counter), got ",
              numel);

  const c10::cuda::CUDAGuard guard(real_in.device());
  // Contiguous: element i draws the i-th uniform in logical order.
  const at::Tensor real = real_in.contiguous();
  // The reference's real.std(): same reduction, same rounding to real's dtype.
  const at::Tensor std_dev = at::std(real, /*unbiased=*/false);  // biased, as compare_gan
  at::Tensor x_hat = at::empty(real.sizes(), real.options());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, real.scalar_type(), "dragan_perturb", [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    const scalar_t* r = real.const_data_ptr<scalar_t>();
    const scalar_t* sd = std_dev.const_data_ptr<scalar_t>();
    scalar_t* o = x_hat.mutable_data_ptr<scalar_t>();
    const uint64_t s = static_cast<uint64_t>(seed);
    if (aligned16(r) && aligned16(o)) {
      dragan_kernel<scalar_t, kVec><<<elementwise_blocks(numel / kVec), kThreads, 0, stream>>>(r, sd, s, o, numel);
    } else {
      dragan_kernel<scalar_t, 1><<<elementwise_blocks(numel), kThreads, 0, stream>>>(r, sd, s, o, numel);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return x_hat;
}

// How gp_penalty splits the batch over blocks (see penalty_kernel).
struct PenaltyPlan {
  int rows;
  int64_t chunks, chunk_len, blocks;
};

PenaltyPlan plan_penalty(int64_t batch, int64_t per_sample, int vec) {
  PenaltyPlan p{kMaxRowsPerBlock, 1, std::max<int64_t>(per_sample, 1), 0};
  // Several samples per block while each group's threads still get a few loads each,
  // and not more rows than the batch has samples.
  while (p.rows > 1 && per_sample > static_cast<int64_t>(kThreads / p.rows) * vec * kUnroll) p.rows /= 2;
  while (p.rows > 1 && p.rows / 2 >= batch) p.rows /= 2;
  if (p.rows == 1) {
    // Split samples until the grid fills the device, but keep a chunk at least
    // kUnroll loads per thread long; chunk_len a multiple of the pack size keeps every
    // chunk of a sample on the same 16-byte phase.
    const int64_t min_len = static_cast<int64_t>(kThreads) * vec * kUnroll;
    const int64_t want_chunks = ceil_div(resident_blocks(), batch);
    p.chunk_len = std::max(min_len, ceil_div(per_sample, want_chunks));
    p.chunk_len = ceil_div(p.chunk_len, vec) * vec;
    p.chunks = std::max<int64_t>(1, ceil_div(per_sample, p.chunk_len));
  }
  p.blocks = ceil_div(batch, p.rows) * p.chunks;
  return p;
}

std::tuple<at::Tensor, at::Tensor> gp_penalty_cuda(const at::Tensor& grad_in, bool squared_norm, double center,
                                                   double eps, bool one_sided) {
  check_batch(grad_in, "gp_penalty", "grad");
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = batch_major_or_copy(grad_in);
  const int64_t batch = grad.size(0);
  const int64_t per_sample = grad.numel() / batch;
  const auto acc_type = at::toOpMathType(grad.scalar_type());
  at::Tensor penalty = at::empty({}, grad.options());
  at::Tensor sq = at::empty({batch}, grad.options().dtype(acc_type));
  at::Tensor counter = at::empty({1}, grad.options().dtype(at::kInt));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gp_penalty", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const PenaltyPlan plan = plan_penalty(batch, per_sample, 16 / sizeof(scalar_t));
    TORCH_CHECK(plan.blocks <= std::numeric_limits<int32_t>::max(), "gp_penalty: batch too large (", batch,
                " samples) for one launch");
    at::Tensor partials = at::empty({batch * plan.chunks}, grad.options().dtype(acc_type));
    unsigned int* ticket = reinterpret_cast<unsigned int*>(counter.mutable_data_ptr<int32_t>());
    C10_CUDA_CHECK(cudaMemsetAsync(ticket, 0, sizeof(unsigned int), stream));
    penalty_kernel<scalar_t, acc_t><<<static_cast<unsigned>(plan.blocks), kThreads, 0, stream>>>(
        grad.const_data_ptr<scalar_t>(), batch, per_sample, plan.rows, plan.chunks, plan.chunk_len,
        partials.mutable_data_ptr<acc_t>(), ticket, sq.mutable_data_ptr<acc_t>(), penalty.mutable_data_ptr<scalar_t>(),
        squared_norm, static_cast<acc_t>(center), static_cast<acc_t>(eps), one_sided);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {penalty, sq};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgan_C, CUDA, m) {
  m.impl("gp_interpolate", &gp_interpolate_cuda);
  m.impl("dragan_perturb", &dragan_perturb_cuda);
  m.impl("gp_penalty", &gp_penalty_cuda);
}

// Compiled for the same architectures as every kernel of the library: it has code for a GPU
// exactly when they do.
__global__ void architecture_probe_kernel() {}

bool cuda_kernels_run_on(int64_t device) {
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  cudaFuncAttributes attributes;
  if (cudaFuncGetAttributes(&attributes, architecture_probe_kernel) == cudaSuccess) return true;
  (void)cudaGetLastError();  // "no kernel image for this device": cleared, so that no later call reports it
  return false;
}

}  // namespace fastgan
