// Spectral-norm power iteration: the schedule every fastgan backend follows.
//
// A weight W of any rank is read, without a copy, as the matrix W_mat (M x K) with
// rows along `dim`: the contiguous tensor is viewed as (A, M, B) with
// A = prod(shape[:dim]), M = shape[dim], B = prod(shape[dim+1:]), K = A*B, and
// W_mat[m, a*B + b] = W[a, m, b] -- torch's permute(dim first) + flatten order.
//
// The work is a sequence of "row passes" over W_mat. A pass reads each row once:
//   DOT:   t[m] = sum_k W_mat[m, k] x[k]              (x = v)
//   ACCUM: s[k] += W_mat[m, k] y[m], y = t (after DOT) or y = u (v-first start)
// so W_mat v and W_mat^T (W_mat v) cost one read of W, not two. Between passes a
// per-layer "finalize" normalizes with normalize(x) = x / max(||x||, eps):
//   u_first (parametrization), each iteration: pass(DOT+ACCUM) then
//     u = t/max(|t|,eps); r = s/max(|t|,eps); v = r/max(|r|,eps); sigma = |r|^2/max(|r|,eps)
//     (sigma = u^T W v, since W^T u = r and v = r/|r|);
//   v_first (hook): pass(ACCUM, y=u) -> v = s/max(|s|,eps); then each iteration a
//     pass(DOT, +ACCUM unless last) -> u = t/max(|t|,eps), v as above when ACCUM,
//     and after the last sigma = |t|^2/max(|t|,eps);
//   eval (n_power_iterations = 0): pass(DOT) -> sigma = u . t, u and v unchanged.
// So u_first iterations never read the given u (torch's parametrization does not either):
// power_iteration_reads_u says when a backend must load it.
// Sums accumulate in float (double for double weights); u and v are rounded to the
// weight dtype after each normalization, as torch's buffers are.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace fastgan {

// W as (A, M, B) around `dim`, as the power iteration reads it: element (a, m, b) of a
// contiguous W is u v^T's (m, a*B + b).
inline std::tuple<int64_t, int64_t, int64_t> spectral_norm_view3(const at::Tensor& weight, int64_t dim) {
  int64_t A = 1, B = 1;
  for (int64_t j = 0; j < dim; ++j) A *= weight.size(j);
  for (int64_t j = dim + 1; j < weight.dim(); ++j) B *= weight.size(j);
  return {A, weight.size(dim), B};
}

// eps as torch's F.normalize takes it (0 included: a zero vector then gives NaN).
inline void check_power_iteration_schedule(int64_t n_power_iterations, double eps) {
  TORCH_CHECK(n_power_iterations >= 0, "spectral norm: n_power_iterations must be >= 0");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "spectral norm: eps must be a finite number >= 0, got ", eps);
}

// One layer's inputs after validation; a row/column offset locates it in the
// concatenated u/v outputs of the multi-layer op.
struct SpectralNormLayerShape {
  int64_t A, M, B;
  int64_t row_offset, col_offset;
  int64_t K() const { return A * B; }
};

inline std::vector<SpectralNormLayerShape> spectral_norm_layer_shapes(
    const std::vector<at::Tensor>& weights, const std::vector<int64_t>& dims) {
  TORCH_CHECK(weights.size() == dims.size() && !weights.empty(),
              "spectral norm: need one dim per weight and at least one weight");
  std::vector<SpectralNormLayerShape> shapes;
  int64_t rows = 0, cols = 0;
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    TORCH_CHECK(w.dim() >= 2, "spectral norm: layer ", i, " needs a weight with >= 2 dims, got ", w.sizes());
    TORCH_CHECK(w.numel() > 0, "spectral norm: layer ", i, " has a zero-size weight ", w.sizes());
    TORCH_CHECK(w.is_contiguous(), "spectral norm: layer ", i, " weight must be contiguous");
    TORCH_CHECK(w.scalar_type() == weights[0].scalar_type() && w.device() == weights[0].device(),
                "spectral norm: all weights must share dtype and device (layer ", i, ")");
    const int64_t d = dims[i];
    TORCH_CHECK(d >= 0 && d < w.dim(), "spectral norm: layer ", i, " dim ", d, " out of range");
    const auto [A, M, B] = spectral_norm_view3(w, d);
    shapes.push_back({A, M, B, rows, cols});
    rows += w.size(d);
    cols += A * B;
  }
  return shapes;
}

inline void check_spectral_norm_vectors(const std::vector<SpectralNormLayerShape>& shapes,
                                        const std::vector<at::Tensor>& weights,
                                        const std::vector<at::Tensor>& us,
                                        const std::vector<at::Tensor>& vs) {
  TORCH_CHECK(us.size() == shapes.size() && vs.size() == shapes.size(),
              "spectral norm: need one u and one v per weight");
  for (size_t i = 0; i < shapes.size(); ++i) {
    TORCH_CHECK(us[i].dim() == 1 && us[i].size(0) == shapes[i].M, "spectral norm: layer ", i,
                " u must have shape (", shapes[i].M, "), got ", us[i].sizes());
    TORCH_CHECK(vs[i].dim() == 1 && vs[i].size(0) == shapes[i].K(), "spectral norm: layer ", i,
                " v must have shape (", shapes[i].K(), "), got ", vs[i].sizes());
    TORCH_CHECK(us[i].scalar_type() == weights[i].scalar_type() && vs[i].scalar_type() == weights[i].scalar_type() &&
                    us[i].device() == weights[i].device() && vs[i].device() == weights[i].device(),
                "spectral norm: layer ", i, " u and v must match the weight's dtype and device");
  }
}

// spectral_normalize(weight, u, v, sigma, dim): the shapes that make W / sigma meaningful.
inline void check_spectral_normalize_args(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                          const at::Tensor& sigma, int64_t dim) {
  TORCH_CHECK(weight.dim() >= 2 && dim >= -weight.dim() && dim < weight.dim(),
              "spectral_normalize: dim ", dim, " is out of range for a weight of shape ", weight.sizes());
  // As the Python op refuses it; the backward kernels split W into runs of B = 0 elements otherwise.
  TORCH_CHECK(weight.numel() > 0, "spectral_normalize: a zero-size weight ", weight.sizes(), " has no spectral norm");
  const int64_t rows = weight.size(dim);
  TORCH_CHECK(u.dim() == 1 && v.dim() == 1 && u.numel() == rows && v.numel() == weight.numel() / rows,
              "spectral_normalize: u ", u.sizes(), " and v ", v.sizes(), " do not fit a weight of shape ",
              weight.sizes(), " with dim=", dim);
  TORCH_CHECK(sigma.dim() == 0 && sigma.device() == weight.device(),
              "spectral_normalize: sigma must be a 0-d tensor on the weight's device, got shape ", sigma.sizes(),
              " on ", sigma.device());
}

// spectral_normalize_backward(grad, weight, u, v, sigma, dim): dL/dW of W / sigma with u and v
// held constant, grad / sigma - (<grad, W> / sigma^2) u v^T laid out like W (the math:
// fastgan/reference/spectral_norm.py, normalize_weight_backward). The CPU and CUDA kernels
// read grad and W in two passes -- <grad, W>, then the output -- where the same formula in ATen
// ops is eight launches and six passes; they take contiguous grad and W of one dtype with u, v
// and sigma of that dtype (what a layer's backward gets), anything else goes to the ATen
// formula. The result has grad's layout either way.
inline void check_spectral_normalize_backward_args(const at::Tensor& grad, const at::Tensor& weight,
                                                   const at::Tensor& u, const at::Tensor& v,
                                                   const at::Tensor& sigma, int64_t dim) {
  check_spectral_normalize_args(weight, u, v, sigma, dim);
  TORCH_CHECK(grad.sizes() == weight.sizes() && grad.device() == weight.device(),
              "spectral_normalize_backward: grad ", grad.sizes(), " on ", grad.device(),
              " must match the weight's shape ", weight.sizes(), " and device ", weight.device());
  TORCH_CHECK(u.device() == weight.device() && v.device() == weight.device(),
              "spectral_normalize_backward: u (on ", u.device(), ") and v (on ", v.device(),
              ") must be on the weight's device ", weight.device());
}

inline bool spectral_normalize_backward_is_fused(const at::Tensor& grad, const at::Tensor& weight,
                                                 const at::Tensor& u, const at::Tensor& v, const at::Tensor& sigma) {
  const auto dtype = weight.scalar_type();
  return grad.is_contiguous() && weight.is_contiguous() && u.is_contiguous() && v.is_contiguous() &&
         grad.scalar_type() == dtype && u.scalar_type() == dtype && v.scalar_type() == dtype &&
         sigma.scalar_type() == dtype;
}

// The same gradient in ATen ops (spectral_normalize.cpp), differentiable: the double backward
// and the layouts the kernels leave out.
at::Tensor spectral_normalize_backward_aten(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u,
                                            const at::Tensor& v, const at::Tensor& sigma, int64_t dim);

// What every device's spectral_normalize_backward does first: check the arguments, wrap `dim`,
// and compute what the kernels leave out with the ATen formula (in grad's layout); an undefined
// tensor means the kernel takes it.
inline at::Tensor spectral_normalize_backward_unfused(const at::Tensor& grad, const at::Tensor& weight,
                                                      const at::Tensor& u, const at::Tensor& v,
                                                      const at::Tensor& sigma, int64_t& dim) {
  check_spectral_normalize_backward_args(grad, weight, u, v, sigma, dim);
  dim = at::maybe_wrap_dim(dim, weight.dim());
  if (spectral_normalize_backward_is_fused(grad, weight, u, v, sigma)) return at::Tensor();
  return at::empty_like(grad).copy_(spectral_normalize_backward_aten(grad, weight, u, v, sigma, dim));
}

inline bool power_iteration_reads_u(int64_t n_power_iterations, bool u_first) {
  return n_power_iterations == 0 || !u_first;
}

enum class Finalize { UV, V, U, Eval };

// The schedule above, for any backend: `it` provides pass(dot, accum) and finalize(kind).
template <typename PowerIteration>
void run_power_iteration(PowerIteration& it, int64_t n_power_iterations, bool u_first) {
  if (n_power_iterations == 0) {
    it.pass(true, false);
    it.finalize(Finalize::Eval);
  } else if (u_first) {
    for (int64_t i = 0; i < n_power_iterations; ++i) {
      it.pass(true, true);
      it.finalize(Finalize::UV);
    }
  } else {
    it.pass(false, true);
    it.finalize(Finalize::V);
    for (int64_t i = 0; i < n_power_iterations; ++i) {
      const bool last = i + 1 == n_power_iterations;
      it.pass(true, !last);
      it.finalize(last ? Finalize::U : Finalize::UV);
    }
  }
}

}  // namespace fastgan
