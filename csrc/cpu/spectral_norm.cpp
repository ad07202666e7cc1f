// CPU kernels of the spectral-norm power iteration (schedule: ../spectral_norm.h).
//
// The rows of all layers are cut into ranges of about equal weight count, split
// across threads with at::parallel_for. Each thread accumulates W^T y into its own slice of a
// (threads x sum K) buffer, reduced after the pass, so a pass reads W exactly
// once and needs no atomics. The inner loops are compiled for several
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

// Rows are processed kRows at a time, so each load of x (DOT) and each
// load/store of s (ACCUM) serves kRows rows; kLanes independent partial sums per
// row let the compiler vectorize the dot products without reassociating a sum.
constexpr int kRows = 4;
constexpr int kLanes = 16;

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

template <typename acc_t>
acc_t squared_norm(const acc_t* x, int64_t n) {
  acc_t acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += x[i] * x[i];
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
    const int threads = at::get_num_threads();
    if (do_accum) partial.assign(static_cast<size_t>(threads) * cols, acc_t(0));
    const auto ranges = balanced_ranges(shapes, 1 << 16);
    at::parallel_for(0, static_cast<int64_t>(ranges.size()), 1, [&](int64_t first, int64_t last) {
      acc_t* mine = do_accum ? partial.data() + static_cast<size_t>(at::get_thread_num()) * cols : nullptr;
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
    run_power_iteration(it, n_power_iterations, u_first);
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
