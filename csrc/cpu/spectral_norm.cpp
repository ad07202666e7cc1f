// CPU kernels of spectral norm: the power iteration (schedule: ../spectral_norm.h) and
// the W / sigma forward of spectral_normalize (at the end of this file).
//
// The rows of all layers are cut into ranges of about equal weight count, split
// across threads with at::parallel_for. Each thread accumulates W^T y into its own slice of a
// (threads x sum K) buffer, reduced after the pass (one thread accumulates into s
// directly), so a pass reads W exactly once and needs no atomics. The inner loops are
// compiled for several instruction sets (target_clones) and picked at load time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../spectral_norm.h"

namespace fastgan {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTGAN_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTGAN_MULTIVERSION
#endif

// Rows are processed kRows at a time, so each load of x (DOT) and each
// load/store of s (ACCUM) serves kRows rows; kLanes independent partial sums per
// row let the compiler vectorize the dot products without reassociating a sum.
// 8 x 32 keeps 32 vector accumulators in flight: on the SNDCGAN discriminator (one
// thread, AVX-512 and AVX2 alike) a DOT+ACCUM pass ran at ~28 GB/s against ~20 GB/s
// for 4 x 16 (which is latency-bound on the FMA chains), close to a plain sum's ~45 GB/s.
constexpr int kRows = 8;
constexpr int kLanes = 32;

// One block of R rows (R <= kRows), each B-contiguous runs of length B at stride
// M*B: DOT writes t[r] = row_r . x, ACCUM adds sum_r row_r * y[r] to s, with
// y = t after DOT. Compiled per instruction set (target_clones).
template <typename scalar_t, typename acc_t, int R>
FASTGAN_MULTIVERSION void row_block_pass(const scalar_t* rows, const SpectralNormLayerShape& shape, const acc_t* x,
                                         acc_t* y, acc_t* s, bool do_dot, bool do_accum) {
  const int64_t B = shape.B, stride = shape.M * B;
  if (do_dot) {
    acc_t lanes[R][kLanes] = {};
    acc_t tail[R] = {};
    for (int64_t a = 0; a < shape.A; ++a) {
      const scalar_t* w = rows + a * stride;
      const acc_t* xa = x + a * B;
      int64_t i = 0;
      for (; i + kLanes <= B; i += kLanes)
        for (int r = 0; r < R; ++r)
          for (int j = 0; j < kLanes; ++j) lanes[r][j] += static_cast<acc_t>(w[r * B + i + j]) * xa[i + j];
      for (; i < B; ++i)
        for (int r = 0; r < R; ++r) tail[r] += static_cast<acc_t>(w[r * B + i]) * xa[i];
    }
    for (int r = 0; r < R; ++r) {
      acc_t t = tail[r];
      for (int j = 0; j < kLanes; ++j) t += lanes[r][j];
      y[r] = t;
    }
  }
  if (do_accum) {
    for (int64_t a = 0; a < shape.A; ++a) {
      const scalar_t* w = rows + a * stride;
      acc_t* sa = s + a * B;
      for (int64_t i = 0; i < B; ++i) {
        acc_t sum = sa[i];
        for (int r = 0; r < R; ++r) sum += static_cast<acc_t>(w[r * B + i]) * y[r];
        sa[i] = sum;
      }
    }
  }
}

// A contiguous range of rows of one layer: the unit of parallel work, sized so
// all units hold about the same number of weights whatever the layer shapes.
struct RowRange {
  int64_t layer, begin, end;
};

inline std::vector<RowRange> balanced_ranges(const std::vector<SpectralNormLayerShape>& shapes, int64_t target) {
  std::vector<RowRange> ranges;
  for (size_t l = 0; l < shapes.size(); ++l) {
    const int64_t rows_per = std::max<int64_t>(kRows, (target / std::max<int64_t>(shapes[l].K(), 1)) / kRows * kRows);
    for (int64_t m = 0; m < shapes[l].M; m += rows_per)
      ranges.push_back({static_cast<int64_t>(l), m, std::min(m + rows_per, shapes[l].M)});
  }
  return ranges;
}

// kLanes partial sums, like the dot products: one running sum is a chain of
// dependent adds (4 cycles each), which made the norms of long v's cost as much as the pass.
template <typename acc_t>
acc_t squared_norm(const acc_t* x, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += x[i + j] * x[i + j];
  acc_t acc = 0;
  for (; i < n; ++i) acc += x[i] * x[i];
  for (int j = 0; j < kLanes; ++j) acc += lanes[j];
  return acc;
}


template <typename scalar_t>
struct PowerIteration {
  using acc_t = at::opmath_type<scalar_t>;

  std::vector<const scalar_t*> weights;
  std::vector<SpectralNormLayerShape> shapes;
  int64_t rows, cols;
  double eps;
  std::vector<acc_t> u, v, t, s;  // u, v rounded to scalar_t; t, s raw pass results
  std::vector<acc_t> sigma;
  std::vector<acc_t> partial;     // threads x cols

  static acc_t rounded(acc_t x) { return static_cast<acc_t>(static_cast<scalar_t>(x)); }

  void pass(bool do_dot, bool do_accum) {
    const auto ranges = balanced_ranges(shapes, 1 << 16);
    // One thread (or one range) accumulates straight into s: no partial rows to clear and reduce.
    const int threads = ranges.size() > 1 ? at::get_num_threads() : 1;
    if (do_accum) {
      if (threads > 1)
        partial.assign(static_cast<size_t>(threads) * cols, acc_t(0));
      else
        std::fill(s.begin(), s.end(), acc_t(0));
    }
    at::parallel_for(0, static_cast<int64_t>(ranges.size()), 1, [&](int64_t first, int64_t last) {
      acc_t* mine = !do_accum ? nullptr
                    : threads > 1 ? partial.data() + static_cast<size_t>(at::get_thread_num()) * cols
                                  : s.data();
      for (int64_t i = first; i < last; ++i) {
        const auto& range = ranges[i];
        const auto& sh = shapes[range.layer];
        const acc_t* x = v.data() + sh.col_offset;
        acc_t* s_layer = do_accum ? mine + sh.col_offset : nullptr;
        for (int64_t m = range.begin; m < range.end; m += kRows) {
          const int64_t r = sh.row_offset + m;
          // y holds t after DOT, else u (the v-first start)
          acc_t* y = do_dot ? t.data() + r : u.data() + r;
          const scalar_t* rows_ptr = weights[range.layer] + m * sh.B;
          if (m + kRows <= range.end)
            row_block_pass<scalar_t, acc_t, kRows>(rows_ptr, sh, x, y, s_layer, do_dot, do_accum);
          else
            for (int64_t mm = m; mm < range.end; ++mm)
              row_block_pass<scalar_t, acc_t, 1>(weights[range.layer] + mm * sh.B, sh, x, y + (mm - m), s_layer,
                                                 do_dot, do_accum);
        }
      }
    });
    if (do_accum && threads > 1) {
      std::fill(s.begin(), s.end(), acc_t(0));
      for (int th = 0; th < threads; ++th) {
        const acc_t* p = partial.data() + static_cast<size_t>(th) * cols;
        for (int64_t k = 0; k < cols; ++k) s[k] += p[k];
      }
    }
  }

  void finalize(Finalize kind) {
    const acc_t e = static_cast<acc_t>(eps);
    for (size_t l = 0; l < shapes.size(); ++l) {
      const auto& sh = shapes[l];
      acc_t* ul = u.data() + sh.row_offset;
      acc_t* vl = v.data() + sh.col_offset;
      const acc_t* tl = t.data() + sh.row_offset;
      const acc_t* sl = s.data() + sh.col_offset;
      if (kind == Finalize::Eval) {
        acc_t dot_ut = 0;
        for (int64_t m = 0; m < sh.M; ++m) dot_ut += ul[m] * tl[m];
        sigma[l] = dot_ut;
        continue;
      }
      acc_t scale = 1;  // turns s into W^T u
      if (kind != Finalize::V) {
        const acc_t nt = std::max(std::sqrt(squared_norm(tl, sh.M)), e);
        for (int64_t m = 0; m < sh.M; ++m) ul[m] = rounded(tl[m] / nt);
        scale = 1 / nt;
        if (kind == Finalize::U) sigma[l] = squared_norm(tl, sh.M) / nt;
      }
      if (kind != Finalize::U) {
        const acc_t nr_exact = std::sqrt(squared_norm(sl, sh.K())) * scale;
        const acc_t nr = std::max(nr_exact, e);
        for (int64_t k = 0; k < sh.K(); ++k) vl[k] = rounded(sl[k] * scale / nr);
        sigma[l] = nr_exact * nr_exact / nr;
      }
    }
  }

};

template <typename scalar_t>
void load(const std::vector<at::Tensor>& vectors, std::vector<at::opmath_type<scalar_t>>& out) {
  // Raw pointers: indexing through the vector reference kept the loop scalar.
  at::opmath_type<scalar_t>* dst = out.data();
  for (const auto& vec : vectors) {
    const auto c = vec.contiguous();
    const scalar_t* p = c.data_ptr<scalar_t>();
    const int64_t n = c.numel();
    for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<at::opmath_type<scalar_t>>(p[k]);
    dst += n;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_multi_cpu(
    at::TensorList weights_in, at::TensorList us_in, at::TensorList vs_in, at::IntArrayRef dims_in,
    int64_t n_power_iterations, double eps, bool u_first) {
  std::vector<at::Tensor> weights, us(us_in.begin(), us_in.end()), vs(vs_in.begin(), vs_in.end());
  for (const auto& w : weights_in) weights.push_back(w.contiguous());
  const auto shapes = spectral_norm_layer_shapes(weights, std::vector<int64_t>(dims_in.begin(), dims_in.end()));
  check_spectral_norm_vectors(shapes, weights, us, vs);
  check_power_iteration_schedule(n_power_iterations, eps);
  const int64_t rows = shapes.back().row_offset + shapes.back().M;
  const int64_t cols = shapes.back().col_offset + shapes.back().K();
  const auto options = weights[0].options();
  at::Tensor u_out = at::empty({rows}, options), v_out = at::empty({cols}, options);
  at::Tensor sigma_out = at::empty({static_cast<int64_t>(shapes.size())}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weights[0].scalar_type(), "spectral_norm_power_iteration", [&] {
    PowerIteration<scalar_t> it;
    for (const auto& w : weights) it.weights.push_back(w.data_ptr<scalar_t>());
    it.shapes = shapes;
    it.rows = rows;
    it.cols = cols;
    it.eps = eps;
    it.u.resize(rows);
    it.v.resize(cols);
    it.t.resize(rows);
    it.s.resize(cols);
    it.sigma.resize(shapes.size());
    if (power_iteration_reads_u(n_power_iterations, u_first)) load<scalar_t>(us, it.u);
    load<scalar_t>(vs, it.v);
    run_power_iteration(it, n_power_iterations, u_first);
    scalar_t* up = u_out.data_ptr<scalar_t>();
    scalar_t* vp = v_out.data_ptr<scalar_t>();
    scalar_t* sp = sigma_out.data_ptr<scalar_t>();
    const auto* u_acc = it.u.data();
    const auto* v_acc = it.v.data();
    for (int64_t r = 0; r < rows; ++r) up[r] = static_cast<scalar_t>(u_acc[r]);
    for (int64_t k = 0; k < cols; ++k) vp[k] = static_cast<scalar_t>(v_acc[k]);
    for (size_t l = 0; l < shapes.size(); ++l) sp[l] = static_cast<scalar_t>(it.sigma[l]);
  });
  return {u_out, v_out, sigma_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_cpu(const at::Tensor& weight, const at::Tensor& u,
                                                                   const at::Tensor& v, int64_t dim,
                                                                   int64_t n_power_iterations, double eps,
                                                                   bool u_first) {
  auto [u_out, v_out, sigma] =
      power_iteration_multi_cpu({weight}, {u}, {v}, {dim}, n_power_iterations, eps, u_first);
  return {u_out, v_out, sigma.reshape({}).clone()};
}

// W / sigma for spectral_normalize (autograd: ../spectral_normalize.cpp). The division is
// a pure stream -- read W, write W / sigma -- and for a large float32 weight the write is
// what costs: a normal store first reads each output line into the cache. Streaming
// (non-temporal) stores skip that read: 1.6 ms instead of 2.4 ms for the SNDCGAN
// discriminator's 5.9 M weights on one thread, which is what brings the drop-in forward
// under half of torch's. Outputs that fit in the L2 cache keep normal stores, so a small
// layer's W / sigma stays cached for the convolution that reads it next.
constexpr int64_t kStreamingBytes = 1 << 20;

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx512f"))) void divide_streaming_avx512(const float* w, float* out, float sigma, int64_t n) {
  const __m512 d = _mm512_set1_ps(sigma);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_stream_ps(out + i, _mm512_div_ps(_mm512_loadu_ps(w + i), d));
  for (; i < n; ++i) out[i] = w[i] / sigma;
}

__attribute__((target("avx"))) void divide_streaming_avx(const float* w, float* out, float sigma, int64_t n) {
  const __m256 d = _mm256_set1_ps(sigma);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_stream_ps(out + i, _mm256_div_ps(_mm256_loadu_ps(w + i), d));
  for (; i < n; ++i) out[i] = w[i] / sigma;
}

// Streaming stores need 64-byte aligned outputs (CPU tensors are), chunks of 16 floats keep them so.
bool divide_streaming(const at::Tensor& weight, const at::Tensor& sigma, at::Tensor& out) {
  if (weight.scalar_type() != at::kFloat || weight.nbytes() < kStreamingBytes || !weight.is_non_overlapping_and_dense())
    return false;
  const bool avx512 = __builtin_cpu_supports("avx512f");
  if (!avx512 && !__builtin_cpu_supports("avx")) return false;
  out = at::empty_like(weight);
  // Same memory order as the weight (empty_like keeps dense strides), so element i of
  // storage maps to element i.
  const float* w = weight.data_ptr<float>();
  float* o = out.data_ptr<float>();
  if (reinterpret_cast<uintptr_t>(o) % 64 != 0) return false;
  const float s = sigma.item<float>();
  at::parallel_for(0, weight.numel() / 16 + 1, 4096, [&](int64_t first, int64_t last) {
    const int64_t begin = first * 16, end = std::min(last * 16, weight.numel());
    if (begin >= end) return;
    if (avx512)
      divide_streaming_avx512(w + begin, o + begin, s, end - begin);
    else
      divide_streaming_avx(w + begin, o + begin, s, end - begin);
    _mm_sfence();
  });
  return true;
}
#else
bool divide_streaming(const at::Tensor&, const at::Tensor&, at::Tensor&) { return false; }
#endif

at::Tensor spectral_normalize_cpu(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                  const at::Tensor& sigma, int64_t dim) {
  check_spectral_normalize_args(weight, u, v, sigma, dim);
  at::Tensor out;
  if (divide_streaming(weight, sigma, out)) return out;
  return weight / sigma;
}

// spectral_normalize's backward (../spectral_norm.h): <grad, W> summed over fixed chunks whose
// partial sums are added in order, so the result is the same for any thread count; then each
// of W's rows (a, m) written as one run of B elements.
constexpr int64_t kDotChunk = 1 << 14;

template <typename scalar_t, typename acc_t>
FASTGAN_MULTIVERSION acc_t chunk_dot(const scalar_t* g, const scalar_t* w, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<acc_t>(g[i + j]) * static_cast<acc_t>(w[i + j]);
  acc_t total = 0;
  for (; i < n; ++i) total += static_cast<acc_t>(g[i]) * static_cast<acc_t>(w[i]);
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

template <typename scalar_t, typename acc_t>
FASTGAN_MULTIVERSION void normalize_backward_rows(const scalar_t* g, const scalar_t* u, const scalar_t* v, acc_t sigma,
                                                  acc_t coeff, int64_t M, int64_t B, int64_t first, int64_t last,
                                                  scalar_t* out) {
  for (int64_t r = first; r < last; ++r) {
    const acc_t scaled_u = coeff * static_cast<acc_t>(u[r % M]);
    const scalar_t* v_row = v + (r / M) * B;
    const scalar_t* g_row = g + r * B;
    scalar_t* out_row = out + r * B;
    for (int64_t b = 0; b < B; ++b)
      out_row[b] = static_cast<scalar_t>(static_cast<acc_t>(g_row[b]) / sigma - scaled_u * static_cast<acc_t>(v_row[b]));
  }
}

at::Tensor spectral_normalize_backward_cpu(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u,
                                           const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  if (at::Tensor unfused = spectral_normalize_backward_unfused(grad, weight, u, v, sigma, dim); unfused.defined())
    return unfused;
  at::Tensor out = at::empty_like(grad);
  int64_t A, M, B;  // not a structured binding: C++17 lambdas cannot capture one
  std::tie(A, M, B) = spectral_norm_view3(weight, dim);
  const int64_t n = weight.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "spectral_normalize_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    std::vector<acc_t> partials((n + kDotChunk - 1) / kDotChunk);
    at::parallel_for(0, static_cast<int64_t>(partials.size()), 1, [&](int64_t first, int64_t last) {
      for (int64_t c = first; c < last; ++c)
        partials[c] = chunk_dot<scalar_t, acc_t>(g + c * kDotChunk, w + c * kDotChunk, std::min(kDotChunk, n - c * kDotChunk));
    });
    acc_t dot = 0;
    for (const acc_t p : partials) dot += p;
    const acc_t s = static_cast<acc_t>(*sigma.const_data_ptr<scalar_t>());
    const acc_t coeff = dot / (s * s);
    const scalar_t* u_data = u.const_data_ptr<scalar_t>();
    const scalar_t* v_data = v.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, A * M, std::max<int64_t>(1, kDotChunk / B), [&](int64_t first, int64_t last) {
      normalize_backward_rows<scalar_t, acc_t>(g, u_data, v_data, s, coeff, M, B, first, last, o);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgan_C, CPU, m) {
  m.impl("spectral_norm_power_iteration", &power_iteration_cpu);
  m.impl("spectral_norm_power_iteration_multi", &power_iteration_multi_cpu);
  m.impl("spectral_normalize", &spectral_normalize_cpu);
  m.impl("spectral_normalize_backward", &spectral_normalize_backward_cpu);
}

}  // namespace fastgan
