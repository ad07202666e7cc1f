// W / sigma with spectral normalization's gradient (math: fastgan/reference/spectral_norm.py):
// dL/dW = G / sigma - (<G, W> / sigma^2) u v^T, the outer product laid out like W, u and v
// held constant (sigma = u^T W_mat v is linear in W, so the second derivative is zero).
//
// This runs once per spectral-normalized layer per forward, so its autograd lives in C++:
// the same function registered from Python (torch.library.register_autograd) cost ~20 us
// more per call, about a third of a small layer's whole forward. The forward kernels: CUDA
// here (ATen's division), CPU in cpu/spectral_norm.cpp. The backward is the
// spectral_normalize_backward op (kernels beside the forward's: two passes over W instead of
// the ATen formula's eight launches), except in a double backward, which needs the ATen
// formula's own graph. Fake tensors: fastgan/ops/spectral_norm.py.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "spectral_norm.h"

namespace fastgan {
namespace {

// CUDA: ATen's division is already one bandwidth-bound launch. CPU: cpu/spectral_norm.cpp.
at::Tensor normalize_forward_cuda(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                                  const at::Tensor& sigma, int64_t dim) {
  check_spectral_normalize_args(weight, u, v, sigma, dim);
  return weight / sigma;
}

// u v^T in W's layout: rows along `dim`, the other dims in their order. Symbolic sizes:
// torch.compile traces this backward with shapes that are not yet numbers.
at::Tensor outer_like(const at::Tensor& u, const at::Tensor& v, const at::Tensor& weight, int64_t dim) {
  std::vector<c10::SymInt> moved{weight.sym_size(dim)};
  for (int64_t j = 0; j < weight.dim(); ++j)
    if (j != dim) moved.push_back(weight.sym_size(j));
  return at::outer(u, v).reshape_symint(moved).movedim(0, dim);
}

}  // namespace

at::Tensor spectral_normalize_backward_aten(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& u,
                                            const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
  dim = at::maybe_wrap_dim(dim, weight.dim());
  const at::Tensor coeff = (grad * weight).sum() / (sigma * sigma);
  return grad / sigma - coeff * outer_like(u, v, weight, dim);
}

namespace {

class SpectralNormalize : public torch::autograd::Function<SpectralNormalize> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& weight, const at::Tensor& u,
                            const at::Tensor& v, const at::Tensor& sigma, int64_t dim) {
    ctx->save_for_backward({weight, u, v, sigma});
    ctx->saved_data["dim"] = dim;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fastgan_C::spectral_normalize", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(weight, u, v, sigma, dim);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &weight = saved[0], &u = saved[1], &v = saved[2];
    at::Tensor sigma = saved[3];
    const int64_t dim = at::maybe_wrap_dim(ctx->saved_data["dim"].toInt(), weight.dim());
    const at::Tensor& grad = grads[0];
    at::Tensor grad_weight;
    if (at::GradMode::is_enabled()) {
      // Double backward: sigma must depend on W (same value) for the second-order terms.
      const at::Tensor recomputed = at::dot(u, at::mv(weight.movedim(dim, 0).flatten(1), v));
      sigma = sigma + (recomputed - recomputed.detach());
      grad_weight = spectral_normalize_backward_aten(grad, weight, u, v, sigma, dim);
    } else {
      static auto fused = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("fastgan_C::spectral_normalize_backward", "")
                              .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const at::Tensor&, int64_t)>();
      grad_weight = fused.call(grad, weight, u, v, sigma, dim);
    }
    return {grad_weight, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor normalize_autograd(const at::Tensor& weight, const at::Tensor& u, const at::Tensor& v,
                              const at::Tensor& sigma, int64_t dim) {
  // Here, not in forward: Function::apply runs forward with grad mode off.
  // The message of fastgan/ops/spectral_norm.py's SIGMA_WITH_GRADIENT.
  TORCH_CHECK_VALUE(!(sigma.requires_grad() && at::GradMode::is_enabled()),
                    "spectral_normalize: sigma requires grad, but the op differentiates W / σ with σ = uᵀ W v taken "
                    "as a function of W (u, v held) and gives sigma itself no gradient; pass sigma.detach() (its "
                    "value is all the op reads), or divide with plain torch to differentiate through sigma");
  return SpectralNormalize::apply(weight, u, v, sigma, dim);
}

// A spectral-norm layer's whole forward in one call: the power iteration (no gradient),
// the new u, v written into the buffers, and W / sigma with its gradient. The same two
// ops the Python path calls, composed here so that a layer crosses from Python once.
at::Tensor spectral_norm_weight(const at::Tensor& weight, at::Tensor& u, at::Tensor& v, int64_t dim,
                                int64_t n_power_iterations, double eps, bool u_first) {
  static auto iterate =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastgan_C::spectral_norm_power_iteration", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, int64_t, int64_t, double, bool)>();
  dim = at::maybe_wrap_dim(dim, weight.dim());
  at::Tensor u_new, v_new, sigma;
  {
    at::NoGradGuard no_grad;
    std::tie(u_new, v_new, sigma) = iterate.call(weight.detach(), u, v, dim, n_power_iterations, eps, u_first);
    if (n_power_iterations > 0) {
      u.copy_(u_new);
      v.copy_(v_new);
    }
  }
  return normalize_autograd(weight, u_new, v_new, sigma, dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgan_C, CUDA, m) { m.impl("spectral_normalize", &normalize_forward_cuda); }

TORCH_LIBRARY_IMPL(fastgan_C, Autograd, m) { m.impl("spectral_normalize", &normalize_autograd); }

TORCH_LIBRARY_IMPL(fastgan_C, CompositeImplicitAutograd, m) { m.impl("spectral_norm_weight", &spectral_norm_weight); }

}  // namespace fastgan
