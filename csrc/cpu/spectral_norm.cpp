// CPU kernels of the spectral-norm power iteration (schedule: ../spectral_norm.h).
//
// All rows of all layers form one index space split across threads with
// at::parallel_for. Each thread accumulates W^T y into its own slice of a
// (threads x sum K) buffer, reduced after the pass, so a pass reads W exactly
// once and needs no atomics. The dot/axpy inner loops are compiled for several
// instruction sets (target_clones) and picked at load time.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../spectral_norm.h"

namespace fastgan {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTGAN_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTGAN_MULTIVERSION
#endif

// Inlined into each target_clones variant of row_pass so they vectorize for its
// instruction set; the independent lanes let the compiler vectorize without
// reassociating one sum.
constexpr int kLanes = 16;

template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline acc_t dot(const scalar_t* w, const acc_t* x, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<acc_t>(w[i + j]) * x[i + j];
  acc_t acc = 0;
  for (; i < n; ++i) acc += static_cast<acc_t>(w[i]) * x[i];
  for (int j = 0; j < kLanes; ++j) acc += lanes[j];
  return acc;
}

template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void axpy(const scalar_t* w, acc_t y, acc_t* s, int64_t n) {
  for (int64_t i = 0; i < n; ++i) s[i] += static_cast<acc_t>(w[i]) * y;
}

// One row of a pass: DOT (t = row . x) and/or ACCUM (s += row * y); the row is
// B-contiguous runs of length B at stride M*B.
template <typename scalar_t, typename acc_t>
FASTGAN_MULTIVERSION acc_t row_pass(const scalar_t* row, const SpectralNormLayerShape& shape, const acc_t* x,
                                    acc_t y, acc_t* s, bool do_dot, bool do_accum) {
  const int64_t stride = shape.M * shape.B;
  acc_t t = 0;
  if (do_dot) {
    for (int64_t a = 0; a < shape.A; ++a) t += dot(row + a * stride, x + a * shape.B, shape.B);
    y = t;
  }
  if (do_accum) {
    for (int64_t a = 0; a < shape.A; ++a) axpy(row + a * stride, y, s + a * shape.B, shape.B);
  }
  return t;
}

template <typename acc_t>
acc_t squared_norm(const acc_t* x, int64_t n) {
  acc_t acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += x[i] * x[i];
  return acc;
}

enum class Finalize { UV, V, U, Eval };

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
    const int threads = at::get_num_threads();
    if (do_accum) partial.assign(static_cast<size_t>(threads) * cols, acc_t(0));
    int64_t max_k = 1;
    for (const auto& sh : shapes) max_k = std::max(max_k, sh.K());
    const int64_t grain = std::max<int64_t>(1, 32768 / max_k);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      acc_t* mine = do_accum ? partial.data() + static_cast<size_t>(at::get_thread_num()) * cols : nullptr;
      size_t l = std::upper_bound(shapes.begin(), shapes.end(), begin,
                                  [](int64_t r, const SpectralNormLayerShape& sh) { return r < sh.row_offset; }) -
                 shapes.begin() - 1;
      for (int64_t r = begin; r < end; ++r) {
        while (r >= shapes[l].row_offset + shapes[l].M) ++l;
        const auto& sh = shapes[l];
        const int64_t m = r - sh.row_offset;
        const acc_t value = row_pass<scalar_t, acc_t>(weights[l] + m * sh.B, sh, v.data() + sh.col_offset, u[r],
                                                      do_accum ? mine + sh.col_offset : nullptr, do_dot, do_accum);
        if (do_dot) t[r] = value;
      }
    });
    if (do_accum) {
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

  void run(int64_t n_power_iterations, bool u_first) {
    if (n_power_iterations == 0) {
      pass(true, false);
      finalize(Finalize::Eval);
    } else if (u_first) {
      for (int64_t i = 0; i < n_power_iterations; ++i) {
        pass(true, true);
        finalize(Finalize::UV);
      }
    } else {
      pass(false, true);
      finalize(Finalize::V);
      for (int64_t i = 0; i < n_power_iterations; ++i) {
        const bool last = i + 1 == n_power_iterations;
        pass(true, !last);
        finalize(last ? Finalize::U : Finalize::UV);
      }
    }
  }
};

template <typename scalar_t>
void load(const std::vector<at::Tensor>& vectors, std::vector<at::opmath_type<scalar_t>>& out) {
  size_t i = 0;
  for (const auto& vec : vectors) {
    const auto c = vec.contiguous();
    const scalar_t* p = c.data_ptr<scalar_t>();
    for (int64_t k = 0; k < c.numel(); ++k) out[i++] = static_cast<at::opmath_type<scalar_t>>(p[k]);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> power_iteration_multi_cpu(
    at::TensorList weights_in, at::TensorList us_in, at::TensorList vs_in, at::IntArrayRef dims_in,
    int64_t n_power_iterations, double eps, bool u_first) {
  std::vector<at::Tensor> weights, us(us_in.begin(), us_in.end()), vs(vs_in.begin(), vs_in.end());
  for (const auto& w : weights_in) weights.push_back(w.contiguous());
  const auto shapes = spectral_norm_layer_shapes(weights, std::vector<int64_t>(dims_in.begin(), dims_in.end()));
  check_spectral_norm_vectors(shapes, weights, us, vs);
  TORCH_CHECK(n_power_iterations >= 0, "spectral norm: n_power_iterations must be >= 0");
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
    load<scalar_t>(us, it.u);
    load<scalar_t>(vs, it.v);
    it.run(n_power_iterations, u_first);
    scalar_t* up = u_out.data_ptr<scalar_t>();
    scalar_t* vp = v_out.data_ptr<scalar_t>();
    scalar_t* sp = sigma_out.data_ptr<scalar_t>();
    for (int64_t r = 0; r < rows; ++r) up[r] = static_cast<scalar_t>(it.u[r]);
    for (int64_t k = 0; k < cols; ++k) vp[k] = static_cast<scalar_t>(it.v[k]);
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

}  // namespace

TORCH_LIBRARY_IMPL(fastgan_C, CPU, m) {
  m.impl("spectral_norm_power_iteration", &power_iteration_cpu);
  m.impl("spectral_norm_power_iteration_multi", &power_iteration_multi_cpu);
}

}  // namespace fastgan
