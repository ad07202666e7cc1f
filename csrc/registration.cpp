// The fastgan_C operator library: schemas here, kernels in cpu/*.cpp and cuda/*.cu
// (TORCH_LIBRARY_IMPL per device) or, for ops made of ATen calls, one implementation for
// every device (frechet.cpp, spectral_normalize.cpp). Python wraps these as the fastgan::*
// ops, which add validation, fake tensors and autograd (fastgan/ops/); spectral_normalize
// and spectral_norm_weight, run once per layer per forward, carry their autograd in C++.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(fastgan_C, m) {
  m.def(
      "spectral_norm_power_iteration(Tensor weight, Tensor u, Tensor v, int dim, int n_power_iterations, "
      "float eps, bool u_first) -> (Tensor, Tensor, Tensor)");
  m.def(
      "spectral_norm_power_iteration_multi(Tensor[] weights, Tensor[] us, Tensor[] vs, int[] dims, "
      "int n_power_iterations, float eps, bool u_first) -> (Tensor, Tensor, Tensor)");
  m.def("spectral_normalize(Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim) -> Tensor");
  m.def("spectral_normalize_backward(Tensor grad, Tensor weight, Tensor u, Tensor v, Tensor sigma, int dim) -> Tensor");
  m.def(
      "spectral_norm_weight(Tensor weight, Tensor(a!) u, Tensor(b!) v, int dim, int n_power_iterations, float eps, "
      "bool u_first) -> Tensor");
  m.def("gp_interpolate(Tensor real, Tensor fake, Tensor? alpha, int seed) -> (Tensor, Tensor)");
  m.def("dragan_perturb(Tensor real, int seed) -> Tensor");
  m.def(
      "gp_penalty(Tensor grad, bool squared_norm, float center, float eps, bool one_sided) -> (Tensor, Tensor)");
  m.def("newton_schulz_steps(Tensor y, Tensor z, int iterations) -> (Tensor, Tensor)");
  m.def("feature_moments(Tensor features) -> (Tensor, Tensor)");
}

#ifdef FASTGAN_WITH_CUDA
namespace fastgan {
bool cuda_kernels_run_on(int64_t device);  // csrc/cuda/gradient_penalty.cu
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.def(
      "built_with_cuda",
      []() {
#ifdef FASTGAN_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels were compiled into this build.");
#ifdef FASTGAN_WITH_CUDA
  module.def("cuda_kernels_run_on", &fastgan::cuda_kernels_run_on, pybind11::arg("device"),
             "Whether this build holds code that GPU `device` runs (SASS of its architecture, or PTX it compiles): "
             "the kernels are built for the architectures of TORCH_CUDA_ARCH_LIST only.");
#endif
}
