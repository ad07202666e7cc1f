// CUDA kernels of the spectral-norm power iteration (schedule: ../spectral_norm.h).
//
// What it computes: for every layer, the power-iteration steps of the schedule --
// row passes t = W_mat x (DOT) and s = W_mat^T y (ACCUM), each followed by a
// per-layer finalize that normalizes into u, v and sigma -- for ALL layers of a
// model at once: each pass is one launch of `row_pass_kernel` over the row blocks
// of every layer (plus one of `reduce_kernel` over their columns when the pass sums
// W^T y), and each finalize one launch of `finalize_kernel` with one block per layer.
//
// W^T y without atomics: each row block writes its partial row sum_r W_mat[r, :] y[r]
// to its own slot, and `reduce_kernel` adds a layer's partial rows in block order. So
// s is summed in a fixed order and results are bit-identical from run to run.
//
// Layer shapes, pointers and the block lists live in a small int64 device table,
// built once per set of weights and cached (keyed by the weights' pointers and
// shapes, everything the table holds, so a hit is never stale): a call with the same
// weights does no host->device copy and can be captured in a CUDA graph.
//
// Bytes moved per pass: W is read once from DRAM by the DOT half; the ACCUM half
// re-reads the block's own rows right after, which hits L1/L2 (rows per block are
// capped so a block's rows stay small: kBlockBytes). On top of that O(rows + cols)
// for t, u, v, and numel / R partial sums written and read back once (R rows per
// block, 1 to 8 as kBlockBytes allows: for float weights 1/8 of W's bytes with rows up
// to 16 KB, 1/4 for SNDCGAN's 18 KB rows (512 x 4608); only layers with rows over 64 KB
// and many of them pay a full extra W). The parametrization refresh (u_first, one
// iteration) is therefore about 1.2-1.5 x sizeof(W) of DRAM traffic (~23 MB of weights
// for the SNDCGAN discriminator) in row pass + reduce + finalize, plus the cats of u, v.
//
// Everything else follows the CPU file: float accumulation (double for double),
// u and v rounded to the weight dtype after each normalization, and the finalize
// arithmetic done with IEEE round-to-nearest division and square root (device_math.cuh).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <list>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include "../spectral_norm.h"
#include "device_math.cuh"

namespace fastgan {
namespace {

constexpr int kRowWarps = 8;  // also the most rows one row-pass block handles
constexpr int kRowThreads = kRowWarps * kWarpSize;
constexpr int kFinalizeThreads = 512;
// A row block covers at most this many bytes of W (unless one row is larger):
// small enough that the ACCUM re-read finds the rows in L1/L2 and that blocks spread
// evenly over the SMs, large enough that few partial rows are written (one per R rows).
constexpr int64_t kBlockBytes = 128 * 1024;
// A reduce block sums kReduceColumns columns (one warp-wide run: 128 coalesced bytes per partial
// row in fp32) with kReduceWarps warps, each over its own contiguous run of the partial rows: a
// 512 x 4608 layer's 128 partial rows are 16 per warp, two rounds of kReduceUnroll loads instead
// of sixteen for one thread per column.
constexpr int kReduceColumns = kWarpSize;
constexpr int kReduceWarps = 8;
constexpr int kReduceThreads = kReduceColumns * kReduceWarps;
constexpr int kReduceUnroll = 8;  // partial rows in flight per reduce thread
constexpr int kAccumUnroll = 4;      // columns in flight per thread in the ACCUM loop
constexpr int kFinalizeUnroll = 4;   // elements in flight per thread in the eval finalize's loop
// Bytes of t or s a finalize thread keeps in registers from its norm to its write: in float, the
// whole vector for layers up to 16 * kFinalizeThreads = 8192 rows or columns (SNDCGAN's last
// linear layer), loaded in one round of independent loads and never re-read. (Double keeps 8
// elements: 16, with the division's slow path, spilled.)
constexpr int kFinalizeCachedBytes = 64;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread in the DOT loop

// Device table, int64: per layer {weight pointer, A, M, B, row_offset, col_offset,
// rows per block, partial-row offset, row blocks}, then per row block {layer, first
// row}, then per reduce block {layer, first column}.
constexpr int kLayerCols = 9;
constexpr int kBlockCols = 2;


// ---------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t to_acc(scalar_t x) {
  return static_cast<acc_t>(x);
}



// std::max(x, eps) of the CPU file: a NaN norm stays NaN (fmax would return eps).
template <typename acc_t>
__device__ __forceinline__ acc_t clamp_eps(acc_t x, acc_t eps) {
  return x < eps ? eps : x;
}

// Sum over a kFinalizeThreads block, returned to every thread in a fixed order.
template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t x, acc_t* partial) {
  x = warp_sum(x);
  __syncthreads();  // readers of the previous block_sum are done with `partial`
  if (threadIdx.x % kWarpSize == 0) partial[threadIdx.x / kWarpSize] = x;
  __syncthreads();
  acc_t total = 0;
#pragma unroll
  for (int i = 0; i < kFinalizeThreads / kWarpSize; ++i) total += partial[i];
  return total;
}

// Adds row . x over the elements of a contiguous row (A == 1) that thread g of a
// G-thread group owns. W is loaded 16 bytes at a time from its first 16-byte
// aligned element on (rows of odd length start anywhere); x is small and reused
// by every row, so its scalar loads hit L1.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t dot_contiguous(const scalar_t* __restrict__ w, const scalar_t* __restrict__ x,
                                                int64_t n, int g, int G) {
  constexpr int N = 16 / sizeof(scalar_t);
  const uintptr_t addr = reinterpret_cast<uintptr_t>(w);
  int64_t head = addr % sizeof(scalar_t) == 0 ? static_cast<int64_t>(((16 - (addr & 15)) & 15) / sizeof(scalar_t)) : n;
  head = head < n ? head : n;
  const int64_t nvec = (n - head) / N;
  acc_t acc = 0;
  for (int64_t k = g; k < head; k += G) acc += to_acc<acc_t>(w[k]) * to_acc<acc_t>(x[k]);

  const uint4* wv = reinterpret_cast<const uint4*>(w + head);
  const scalar_t* xv = x + head;
  int64_t i = g;
  // Issue kUnroll independent loads before using any, to keep bytes in flight.
  for (; i + (kUnroll - 1) * static_cast<int64_t>(G) < nvec; i += kUnroll * static_cast<int64_t>(G)) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) raw[j] = __ldg(wv + i + j * static_cast<int64_t>(G));
#pragma unroll
    for (int j = 0; j < kUnroll; ++j) {
      const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw[j]);
      const scalar_t* xj = xv + (i + j * static_cast<int64_t>(G)) * N;
#pragma unroll
      for (int q = 0; q < N; ++q) acc += to_acc<acc_t>(e[q]) * to_acc<acc_t>(xj[q]);
    }
  }
  for (; i < nvec; i += G) {
    const uint4 raw = __ldg(wv + i);
    const scalar_t* e = reinterpret_cast<const scalar_t*>(&raw);
    const scalar_t* xj = xv + i * N;
#pragma unroll
    for (int q = 0; q < N; ++q) acc += to_acc<acc_t>(e[q]) * to_acc<acc_t>(xj[q]);
  }
  for (int64_t k = head + nvec * N + g; k < n; k += G) acc += to_acc<acc_t>(w[k]) * to_acc<acc_t>(x[k]);
  return acc;
}

// The same for a row of A runs of B elements at stride M*B (dim != 0). Column
// k = a*B + b is tracked incrementally, so there is no division per element.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t dot_strided(const scalar_t* __restrict__ w, const scalar_t* __restrict__ x, int64_t K,
                                             int64_t B, int64_t MB, int g, int G) {
  int64_t a = g / B, b = g - (g / B) * B;
  const int64_t da = G / B, db = G - da * B;
  acc_t acc = 0;
#pragma unroll 4
  for (int64_t k = g; k < K; k += G) {
    acc += to_acc<acc_t>(w[a * MB + b]) * to_acc<acc_t>(x[k]);
    a += da;
    b += db;
    if (b >= B) {
      b -= B;
      ++a;
    }
  }
  return acc;
}

// ---------------------------------------------------------------------------
// Kernels
// ---------------------------------------------------------------------------

// One row block of one layer: R rows (R = rows per block of the layer, a power of
// two dividing kRowWarps), each read by a group of kRowWarps / R warps.
//   DOT:   t[row] = W_mat[row, :] . v            (group reduction)
//   ACCUM: p[k] = sum_r W_mat[m0 + r, k] y[r]    (y = t, or u without DOT)
// ACCUM runs over columns with the whole block and writes the block's partial row p
// to its own slot of `partials` (reduce_kernel sums them in block order).
template <typename scalar_t, typename acc_t, bool DOT, bool ACCUM>
__global__ void __launch_bounds__(kRowThreads)
    row_pass_kernel(const int64_t* __restrict__ layers, const int64_t* __restrict__ blocks,
                    const scalar_t* __restrict__ v_all, const scalar_t* __restrict__ u_all, acc_t* __restrict__ t_all,
                    acc_t* __restrict__ partials) {
  __shared__ acc_t partial[kRowWarps];
  __shared__ acc_t y[kRowWarps];

  const int64_t layer = blocks[kBlockCols * static_cast<int64_t>(blockIdx.x)];
  const int64_t m0 = blocks[kBlockCols * static_cast<int64_t>(blockIdx.x) + 1];
  const int64_t* entry = layers + layer * kLayerCols;
  const scalar_t* __restrict__ w = reinterpret_cast<const scalar_t*>(entry[0]);
  const int64_t A = entry[1], M = entry[2], B = entry[3], row_off = entry[4], col_off = entry[5];
  const int rows_per_block = static_cast<int>(entry[6]);
  const int64_t K = A * B, MB = M * B;
  const int rows = static_cast<int>(M - m0 < rows_per_block ? M - m0 : rows_per_block);
  const int tid = threadIdx.x;

  if constexpr (DOT) {
    const int group = kWarpSize * (kRowWarps / rows_per_block);
    const int r = tid / group, g = tid - r * group;
    acc_t acc = 0;
    if (r < rows) {
      const scalar_t* row = w + (m0 + r) * B;
      const scalar_t* x = v_all + col_off;
      acc = A == 1 ? dot_contiguous<scalar_t, acc_t>(row, x, K, g, group)
                   : dot_strided<scalar_t, acc_t>(row, x, K, B, MB, g, group);
    }
    acc = warp_sum(acc);  // a group is whole warps, so each warp holds one row
    if (tid % kWarpSize == 0) partial[tid / kWarpSize] = acc;
    __syncthreads();
    if (tid < rows) {
      const int warps_per_row = kRowWarps / rows_per_block;
      acc_t t = 0;
      for (int j = 0; j < warps_per_row; ++j) t += partial[tid * warps_per_row + j];
      t_all[row_off + m0 + tid] = t;
      y[tid] = t;
    }
  } else {
    if (tid < rows) y[tid] = to_acc<acc_t>(u_all[row_off + m0 + tid]);
  }
  if constexpr (!ACCUM) return;
  __syncthreads();

  acc_t yr[kRowWarps];
#pragma unroll
  for (int r = 0; r < kRowWarps; ++r) yr[r] = r < rows ? y[r] : acc_t(0);
  const scalar_t* __restrict__ wblock = w + m0 * B;
  acc_t* __restrict__ part = partials + entry[7] + (m0 / rows_per_block) * K;
  int64_t a = tid / B, b = tid - (tid / B) * B;
  const int64_t da = kRowThreads / B, db = kRowThreads - da * B;
  // Unrolled so the next columns' loads issue before this column's sum is stored: the rows
  // come back from L2 (the DOT half just read them), one round trip per column otherwise.
#pragma unroll kAccumUnroll
  for (int64_t k = tid; k < K; k += kRowThreads) {
    const scalar_t* p = wblock + a * MB + b;
    acc_t wr[kRowWarps];
#pragma unroll
    for (int r = 0; r < kRowWarps; ++r) wr[r] = r < rows ? to_acc<acc_t>(p[r * B]) : acc_t(0);
    acc_t sum = 0;
#pragma unroll
    for (int r = 0; r < kRowWarps; ++r) sum += wr[r] * yr[r];
    part[k] = sum;
    a += da;
    b += db;
    if (b >= B) {
      b -= B;
      ++a;
    }
  }
}

// s[k] = sum of the layer's partial rows at column k, for kReduceColumns columns of one layer
// per block. Warp w adds the partial rows of its run [w * per_warp, (w + 1) * per_warp) in
// order, then warp 0 adds the warps' sums in warp order: a fixed order, so s is
// bit-identical from run to run.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    reduce_kernel(const int64_t* __restrict__ layers, const int64_t* __restrict__ blocks,
                  const acc_t* __restrict__ partials, acc_t* __restrict__ s_all) {
  __shared__ acc_t run_sums[kReduceWarps][kReduceColumns];
  const int64_t layer = blocks[kBlockCols * static_cast<int64_t>(blockIdx.x)];
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t k = blocks[kBlockCols * static_cast<int64_t>(blockIdx.x) + 1] + lane;
  const int64_t* entry = layers + layer * kLayerCols;
  const int64_t K = entry[1] * entry[3], n_blocks = entry[8];
  const int64_t per_warp = (n_blocks + kReduceWarps - 1) / kReduceWarps;
  const int64_t first = warp * per_warp < n_blocks ? warp * per_warp : n_blocks;
  const int64_t last = first + per_warp < n_blocks ? first + per_warp : n_blocks;
  acc_t total = 0;
  if (k < K) {  // no early return: every thread reaches the barrier below
    const acc_t* __restrict__ p = partials + entry[7] + k;
    int64_t j = first;
    for (; j + kReduceUnroll <= last; j += kReduceUnroll) {
      acc_t rows[kReduceUnroll];
#pragma unroll
      for (int i = 0; i < kReduceUnroll; ++i) rows[i] = p[(j + i) * K];
#pragma unroll
      for (int i = 0; i < kReduceUnroll; ++i) total += rows[i];
    }
    for (; j < last; ++j) total += p[j * K];
  }
  run_sums[warp][lane] = total;
  __syncthreads();
  if (warp == 0 && k < K) {
    acc_t sum = 0;
#pragma unroll
    for (int w = 0; w < kReduceWarps; ++w) sum += run_sums[w][lane];
    s_all[entry[5] + k] = sum;
  }
}

// The elements x[i] of an n-long vector that finalize thread `tid` owns (i = tid, tid + T, ...
// for T = kFinalizeThreads): the first kCached of them (16 floats, 8 doubles) loaded at once into
// registers and kept there, the rest (longer vectors only) read again when written.
template <typename acc_t>
struct OwnedElements {
  static constexpr int kCached = kFinalizeCachedBytes / static_cast<int>(sizeof(acc_t));
  acc_t cached[kCached];

  // Loads them and returns their sum of squares, added in increasing i (the block_sum's input).
  __device__ __forceinline__ acc_t load_squared_sum(const acc_t* __restrict__ x, int64_t n, int tid) {
#pragma unroll
    for (int j = 0; j < kCached; ++j) {
      const int64_t i = tid + static_cast<int64_t>(j) * kFinalizeThreads;
      cached[j] = i < n ? x[i] : acc_t(0);
    }
    acc_t sq = 0;
#pragma unroll
    for (int j = 0; j < kCached; ++j) sq += cached[j] * cached[j];
    for (int64_t i = tid + static_cast<int64_t>(kCached) * kFinalizeThreads; i < n; i += kFinalizeThreads) {
      sq += x[i] * x[i];
    }
    return sq;
  }

  // out[i] = x[i] * scale / norm in the output dtype, for the same elements.
  template <typename scalar_t>
  __device__ __forceinline__ void write_scaled(const acc_t* __restrict__ x, int64_t n, int tid, acc_t scale,
                                               acc_t norm, scalar_t* __restrict__ out) const {
#pragma unroll
    for (int j = 0; j < kCached; ++j) {
      const int64_t i = tid + static_cast<int64_t>(j) * kFinalizeThreads;
      if (i < n) out[i] = static_cast<scalar_t>(div_rn(cached[j] * scale, norm));
    }
    for (int64_t i = tid + static_cast<int64_t>(kCached) * kFinalizeThreads; i < n; i += kFinalizeThreads) {
      out[i] = static_cast<scalar_t>(div_rn(x[i] * scale, norm));
    }
  }
};

// One block per layer: turns the pass results t, s into u, v and sigma, with the
// same formulas as PowerIteration::finalize of the CPU file.
template <typename scalar_t, typename acc_t, Finalize KIND>
__global__ void __launch_bounds__(kFinalizeThreads)
    finalize_kernel(const int64_t* __restrict__ layers, acc_t eps, const acc_t* __restrict__ t_all,
                    const acc_t* __restrict__ s_all, scalar_t* __restrict__ u_all, scalar_t* __restrict__ v_all,
                    scalar_t* __restrict__ sigma) {
  __shared__ acc_t partial[kFinalizeThreads / kWarpSize];
  const int64_t layer = blockIdx.x;
  const int64_t* entry = layers + layer * kLayerCols;
  const int64_t M = entry[2], K = entry[1] * entry[3], row_off = entry[4], col_off = entry[5];
  const acc_t* t = t_all + row_off;
  const acc_t* s = s_all + col_off;
  scalar_t* u = u_all + row_off;
  scalar_t* v = v_all + col_off;
  const int tid = threadIdx.x;

  if constexpr (KIND == Finalize::Eval) {
    acc_t dot_ut = 0;
#pragma unroll kFinalizeUnroll
    for (int64_t m = tid; m < M; m += kFinalizeThreads) dot_ut += to_acc<acc_t>(u[m]) * t[m];
    dot_ut = block_sum(dot_ut, partial);
    if (tid == 0) sigma[layer] = static_cast<scalar_t>(dot_ut);
    return;
  } else {
    acc_t scale = 1;  // turns s into W^T u
    OwnedElements<acc_t> owned;
    if constexpr (KIND != Finalize::V) {
      const acc_t sq = block_sum(owned.load_squared_sum(t, M, tid), partial);
      const acc_t nt = clamp_eps(sqrt_rn(sq), eps);
      owned.write_scaled(t, M, tid, acc_t(1), nt, u);  // t * 1 / nt: the rounding of t / nt
      scale = div_rn(acc_t(1), nt);
      if constexpr (KIND == Finalize::U) {
        if (tid == 0) sigma[layer] = static_cast<scalar_t>(div_rn(sq, nt));
      }
    }
    if constexpr (KIND != Finalize::U) {
      const acc_t sq = block_sum(owned.load_squared_sum(s, K, tid), partial);
      const acc_t nr_exact = sqrt_rn(sq) * scale;
      const acc_t nr = clamp_eps(nr_exact, eps);
      owned.write_scaled(s, K, tid, scale, nr, v);
      if (tid == 0) sigma[layer] = static_cast<scalar_t>(div_rn(nr_exact * nr_exact, nr));
    }
  }
}

// ---------------------------------------------------------------------------
// Host
// ---------------------------------------------------------------------------

// Rows per block for a layer: as many as kBlockBytes allows (at most kRowWarps),
// but no more than the layer needs, so a short layer (M = 1: the last linear)
// puts all warps on its few long rows.
int rows_per_block(const SpectralNormLayerShape& shape, int64_t element_size) {
  const int64_t row_bytes = shape.K() * element_size;
  int r = kRowWarps;
  while (r > 1 && r * row_bytes > kBlockBytes) r /= 2;
  while (r > 1 && r / 2 >= shape.M) r /= 2;
  return r;
}

// The device table of one set of weights (see kLayerCols) and the sizes the launches need.
struct DeviceTable {
  at::Tensor table;
  int64_t num_row_blocks = 0, num_reduce_blocks = 0, partials = 0;
  cudaStream_t built_on = nullptr;  // the stream the caching allocator files the table's memory under
};

template <typename scalar_t>
struct PowerIteration {
  using acc_t = at::opmath_type<scalar_t>;

  cudaStream_t stream;
  int64_t num_layers, num_row_blocks, num_reduce_blocks;
  double eps;
  const int64_t* layers;  // device table
  const int64_t* row_blocks;
  const int64_t* reduce_blocks;
  scalar_t *u, *v, *sigma;  // outputs, in the weight dtype: the rounding the schedule asks for
  acc_t *t, *s, *partials;  // raw pass results

  template <bool DOT, bool ACCUM>
  void launch_pass() {
    row_pass_kernel<scalar_t, acc_t, DOT, ACCUM>
        <<<static_cast<unsigned>(num_row_blocks), kRowThreads, 0, stream>>>(layers, row_blocks, v, u, t, partials);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void pass(bool do_dot, bool do_accum) {
    if (do_dot && do_accum) {
      launch_pass<true, true>();
    } else if (do_dot) {
      launch_pass<true, false>();
    } else {
      launch_pass<false, true>();
    }
    if (do_accum) {
      reduce_kernel<acc_t><<<static_cast<unsigned>(num_reduce_blocks), kReduceThreads, 0, stream>>>(
          layers, reduce_blocks, partials, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  template <Finalize KIND>
  void launch_finalize() {
    finalize_kernel<scalar_t, acc_t, KIND><<<static_cast<unsigned>(num_layers), kFinalizeThreads, 0, stream>>>(
        layers, static_cast<acc_t>(eps), t, s, u, v, sigma);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void finalize(Finalize kind) {
    switch (kind) {
      case Finalize::UV: launch_finalize<Finalize::UV>(); break;
      case Finalize::V: launch_finalize<Finalize::V>(); break;
      case Finalize::U: launch_finalize<Finalize::U>(); break;
      case Finalize::Eval: launch_finalize<Finalize::Eval>(); break;
    }
  }
};

// Builds the layer/block table on the host and copies it to the device. The copy is
// synchronous: a table is built once and then read from whatever stream a later call
// runs on, which an asynchronous copy on this call's stream would not be ordered with.
DeviceTable build_table(const std::vector<at::Tensor>& weights, const std::vector<SpectralNormLayerShape>& shapes) {
  const int64_t element_size = weights[0].element_size();
  DeviceTable out;
  std::vector<int64_t> rpb;
  for (const auto& sh : shapes) {
    rpb.push_back(rows_per_block(sh, element_size));
    out.num_row_blocks += (sh.M + rpb.back() - 1) / rpb.back();
    out.num_reduce_blocks += (sh.K() + kReduceColumns - 1) / kReduceColumns;
  }
  TORCH_CHECK(out.num_row_blocks <= std::numeric_limits<int32_t>::max() &&
                  out.num_reduce_blocks <= std::numeric_limits<int32_t>::max(),
              "spectral norm: too many rows or columns for one launch");
  const int64_t layers_size = static_cast<int64_t>(shapes.size()) * kLayerCols;
  at::Tensor host = at::empty({layers_size + (out.num_row_blocks + out.num_reduce_blocks) * kBlockCols},
                              at::TensorOptions().dtype(at::kLong));
  int64_t* p = host.data_ptr<int64_t>();
  int64_t* q = p + layers_size;
  int64_t* c = q + out.num_row_blocks * kBlockCols;
  for (size_t l = 0; l < shapes.size(); ++l) {
    const auto& sh = shapes[l];
    const int64_t n_blocks = (sh.M + rpb[l] - 1) / rpb[l];
    int64_t* e = p + l * kLayerCols;
    e[0] = static_cast<int64_t>(reinterpret_cast<intptr_t>(weights[l].const_data_ptr()));
    e[1] = sh.A;
    e[2] = sh.M;
    e[3] = sh.B;
    e[4] = sh.row_offset;
    e[5] = sh.col_offset;
    e[6] = rpb[l];
    e[7] = out.partials;
    e[8] = n_blocks;
    out.partials += n_blocks * sh.K();
    for (int64_t m0 = 0; m0 < sh.M; m0 += rpb[l]) {
      *q++ = static_cast<int64_t>(l);
      *q++ = m0;
    }
    for (int64_t k0 = 0; k0 < sh.K(); k0 += kReduceColumns) {
      *c++ = static_cast<int64_t>(l);
      *c++ = k0;
    }
  }
  out.table = at::empty({host.numel()}, weights[0].options().dtype(at::kLong));
  out.table.copy_(host, /*non_blocking=*/false);
  out.built_on = at::cuda::getCurrentCUDAStream().stream();
  return out;
}

// The cached table of these weights: a table holds nothing but what its key holds
// (pointers, shapes, dtype, device), so a hit is never stale; a miss builds it. A
// small LRU, leaked on purpose (no device frees during interpreter teardown). Returned
// by value (a tensor reference), so another thread's eviction cannot pull it away.
// A table used during graph capture is never evicted: replays read it without coming
// here, so its place in the LRU would not show that it is still in use.
DeviceTable cached_table(const std::vector<at::Tensor>& weights,
                                const std::vector<SpectralNormLayerShape>& shapes) {
  constexpr size_t kCacheSize = 16;
  static auto* mutex = new std::mutex;
  struct Entry {
    std::vector<int64_t> key;
    DeviceTable table;
    bool captured = false;
  };
  static auto* cache = new std::list<Entry>;
  std::vector<int64_t> key{weights[0].get_device(), static_cast<int64_t>(weights[0].scalar_type())};
  for (size_t l = 0; l < shapes.size(); ++l) {
    key.insert(key.end(), {static_cast<int64_t>(reinterpret_cast<intptr_t>(weights[l].const_data_ptr())),
                           shapes[l].A, shapes[l].M, shapes[l].B});
  }
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  const std::lock_guard<std::mutex> lock(*mutex);
  for (auto it = cache->begin(); it != cache->end(); ++it) {
    if (it->key == key) {
      it->captured |= capturing;
      cache->splice(cache->begin(), *cache, it);
      return cache->front().table;
    }
  }
  TORCH_CHECK(!capturing,
              "spectral norm: first call with these weights inside CUDA graph capture; run the model once "
              "before capturing (the layer table is built and copied to the device on a first call)");
  cache->push_front(Entry{std::move(key), build_table(weights, shapes)});
  if (cache->size() > kCacheSize) {
    const auto evicted = std::find_if(cache->rbegin(), cache->rend(), [](const Entry& e) { return !e.captured; });
    if (evicted != cache->rend()) cache->erase(std::next(evicted).base());
  }
  return cache->front().table;
}

// Both ops: the single-layer op is this with one layer and a 0-d sigma.
std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_impl(at::TensorList weights_in, at::TensorList us_in,
                                                                    at::TensorList vs_in, at::IntArrayRef dims_in,
                                                                    int64_t n_power_iterations, double eps,
                                                                    bool u_first, bool scalar_sigma) {
  std::vector<at::Tensor> weights, us(us_in.begin(), us_in.end()), vs(vs_in.begin(), vs_in.end());
  // The Python op passes contiguous views of any dense layout (channels-last included),
  // so this copies only when called directly with a non-dense weight.
  for (const auto& w : weights_in) weights.push_back(w.contiguous());
  const auto shapes = spectral_norm_layer_shapes(weights, std::vector<int64_t>(dims_in.begin(), dims_in.end()));
  check_spectral_norm_vectors(shapes, weights, us, vs);
  check_power_iteration_schedule(n_power_iterations, eps);
  TORCH_CHECK(weights[0].is_cuda(), "spectral norm: the CUDA kernel got weights on ", weights[0].device());

  const c10::cuda::CUDAGuard guard(weights[0].device());
  const int64_t num_layers = static_cast<int64_t>(shapes.size());
  const int64_t rows = shapes.back().row_offset + shapes.back().M;
  const int64_t cols = shapes.back().col_offset + shapes.back().K();
  const auto options = weights[0].options();
  // The inputs are left alone: the iteration works in place on these copies (of u only where
  // it is read: one launch less in the parametrization's refresh).
  at::Tensor u_out = power_iteration_reads_u(n_power_iterations, u_first) ? at::cat(us) : at::empty({rows}, options);
  at::Tensor v_out = at::cat(vs);
  at::Tensor sigma_out = scalar_sigma ? at::empty({}, options) : at::empty({num_layers}, options);
  const DeviceTable table = cached_table(weights, shapes);
  at::Tensor scratch =
      at::empty({rows + cols + table.partials}, options.dtype(at::toOpMathType(weights[0].scalar_type())));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "spectral_norm_power_iteration", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    PowerIteration<scalar_t> it;
    const c10::cuda::CUDAStream stream = at::cuda::getCurrentCUDAStream();
    it.stream = stream;
    // An eviction frees the table back to the stream it was built on, whose next allocation
    // may reuse it at once: a launch on another stream must be waited for first.
    if (it.stream != table.built_on) c10::cuda::CUDACachingAllocator::recordStream(table.table.storage().data_ptr(), stream);
    it.num_layers = num_layers;
    it.num_row_blocks = table.num_row_blocks;
    it.num_reduce_blocks = table.num_reduce_blocks;
    it.eps = eps;
    it.layers = table.table.const_data_ptr<int64_t>();
    it.row_blocks = it.layers + num_layers * kLayerCols;
    it.reduce_blocks = it.row_blocks + table.num_row_blocks * kBlockCols;
    it.u = u_out.mutable_data_ptr<scalar_t>();
    it.v = v_out.mutable_data_ptr<scalar_t>();
    it.sigma = sigma_out.mutable_data_ptr<scalar_t>();
    it.t = scratch.mutable_data_ptr<acc_t>();
    it.s = it.t + rows;
    it.partials = it.s + cols;
    run_power_iteration(it, n_power_iterations, u_first);
  });
  return {u_out, v_out, sigma_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_multi_cuda(
    at::TensorList weights, at::TensorList us, at::TensorList vs, at::IntArrayRef dims, int64_t n_power_iterations,
    double eps, bool u_first) {
  return power_iteration_impl(weights, us, vs, dims, n_power_iterations, eps, u_first, /*scalar_sigma=*/false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cuda(const at::Tensor& weight, const at::Tensor& u,
                                                                    const at::Tensor& v, int64_t dim,
                                                                    int64_t n_power_iterations, double eps,
                                                                    bool u_first) {
  return power_iteration_impl({weight}, {u}, {v}, {dim}, n_power_iterations, eps, u_first, /*scalar_sigma=*/true);
}

// ---------------------------------------------------------------------------
// spectral_normalize's backward (../spectral_norm.h): two launches per layer, where the
// ATen formula takes eight. The first sums grad * W into kNormalizeDotBlocks block
// partials (grid-stride, fixed order: the same sum on every run); the second has every
// block add the partials in the same order, so all agree on <grad, W>, and write
// grad / sigma - (<grad, W> / sigma^2) u[m] v[a*B + b] for their elements (a, m, b).
// ---------------------------------------------------------------------------

constexpr int kNormalizeDotBlocks = 256;
constexpr int kNormalizeElementsPerThread = 4;  // what each output-kernel thread writes; sets its grid
constexpr int64_t kNormalizeMaxBlocks = 8192;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    normalize_backward_dot_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ weight, int64_t n,
                                  acc_t* __restrict__ partials) {
  __shared__ acc_t partial[kFinalizeThreads / kWarpSize];
  acc_t sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kFinalizeThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kFinalizeThreads + threadIdx.x; i < n; i += stride)
    sum += to_acc<acc_t>(grad[i]) * to_acc<acc_t>(weight[i]);
  sum = block_sum(sum, partial);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
}

// index_t: uint32_t where every index fits (the divisions by B and M are then 32-bit), else int64_t.
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void __launch_bounds__(kFinalizeThreads)
    normalize_backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ u,
                              const scalar_t* __restrict__ v, const scalar_t* __restrict__ sigma,
                              const acc_t* __restrict__ partials, int num_partials, index_t M, index_t B, index_t n,
                              scalar_t* __restrict__ out) {
  __shared__ acc_t partial[kFinalizeThreads / kWarpSize];
  acc_t dot = 0;
  for (int j = threadIdx.x; j < num_partials; j += kFinalizeThreads) dot += partials[j];
  dot = block_sum(dot, partial);
  const acc_t s = to_acc<acc_t>(*sigma);
  const acc_t coeff = div_rn(dot, s * s);
  const index_t stride = static_cast<index_t>(gridDim.x) * kFinalizeThreads;
  for (index_t i = static_cast<index_t>(blockIdx.x) * kFinalizeThreads + threadIdx.x; i < n; i += stride) {
    const index_t row = i / B, b = i - row * B;
    const index_t a = row / M, m = row - a * M;
    out[i] = static_cast<scalar_t>(div_rn(to_acc<acc_t>(grad[i]), s) -
                                   coeff * to_acc<acc_t>(u[m]) * to_acc<acc_t>(v[a * B + b]));
  }
}

at::Tensor spectral_normalize_backward_cuda(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u,
                                            const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  if (at::Tensor unfused = spectral_normalize_backward_unfused(grad, weight, u, v, sigma, dim); unfused.defined())
    return unfused;
  const c10::cuda::CUDAGuard guard(weight.device());
  at::Tensor out = at::empty_like(grad);
  int64_t A, M, B;
  std::tie(A, M, B) = spectral_norm_view3(weight, dim);
  const int64_t n = weight.numel();
  const int dot_blocks = static_cast<int>(std::min<int64_t>(kNormalizeDotBlocks, (n + kFinalizeThreads - 1) / kFinalizeThreads));
  const int64_t per_block = static_cast<int64_t>(kFinalizeThreads) * kNormalizeElementsPerThread;
  const int blocks = static_cast<int>(std::min<int64_t>(kNormalizeMaxBlocks, (n + per_block - 1) / per_block));
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor partials = at::empty({dot_blocks}, weight.options().dtype(at::toOpMathType(weight.scalar_type())));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "spectral_normalize_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    acc_t* p = partials.mutable_data_ptr<acc_t>();
    normalize_backward_dot_kernel<scalar_t, acc_t>
        <<<dot_blocks, kFinalizeThreads, 0, stream>>>(g, weight.const_data_ptr<scalar_t>(), n, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const scalar_t *u_data = u.const_data_ptr<scalar_t>(), *v_data = v.const_data_ptr<scalar_t>(),
                   *s = sigma.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // Indices up to n plus one grid stride must fit the index type.
    if (n + static_cast<int64_t>(blocks) * kFinalizeThreads <= std::numeric_limits<uint32_t>::max()) {
      normalize_backward_kernel<scalar_t, acc_t, uint32_t><<<blocks, kFinalizeThreads, 0, stream>>>(
          g, u_data, v_data, s, p, dot_blocks, static_cast<uint32_t>(M), static_cast<uint32_t>(B),
          static_cast<uint32_t>(n), o);
    } else {
      normalize_backward_kernel<scalar_t, acc_t, int64_t>
          <<<blocks, kFinalizeThreads, 0, stream>>>(g, u_data, v_data, s, p, dot_blocks, M, B, n, o);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgan_C, CUDA, m) {
  m.impl("spectral_norm_power_iteration", &power_iteration_cuda);
  m.impl("spectral_norm_power_iteration_multi", &power_iteration_multi_cuda);
  m.impl("spectral_normalize_backward", &spectral_normalize_backward_cuda);
}

}  // namespace fastgan
