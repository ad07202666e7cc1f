// CPU kernels of the gradient penalties (semantics: fastgan/reference/gradient_penalty.py).
//
//   gp_interpolate  x_hat = real + a_b (fake - real), a_b given or philox_uniform(seed, b);
//                   reads real and fake once, writes x_hat: 3 * numel * sizeof(T).
//   dragan_perturb  x_hat = clamp(real + std(real) (philox_uniform(seed, i) - 0.5), 0, 1),
//                   std biased (population) over all elements, at::std's as the reference's
//                   (the same bits; a two-pass sum of its own was 3 ulp off in double), then
//                   one pass: one Philox evaluation per four elements.
//   gp_penalty      sq_b = sum of g^2 over sample b (float, double for double), then
//                   0.5 mean_b sq_b, or mean_b gap_b^2 with gap_b = sqrt(eps + sq_b) - center
//                   (clamped at 0 when one-sided): reads grad once, numel * sizeof(T),
//                   and writes B sums.
//
// Reductions cut the data into fixed blocks of kBlock elements whose partial sums
// are combined in a fixed order, so results do not depend on the thread count.
// Random numbers are Philox (../philox.h), a pure function of (seed, index), so
// every thread draws its own elements and the values match the reference exactly.
// Batches are read in place when dense with the samples outermost (../batch_layout.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "../batch_layout.h"
#include "../philox.h"

namespace fastgan {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTGAN_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
// GCC fuses a*b + c into an FMA across statements (-ffp-contract=fast); the
// reference rounds the product and the sum separately, and the elementwise
// kernels reproduce it bit for bit in float and double only without fusion.
#define FASTGAN_NO_FMA __attribute__((optimize("fp-contract=off")))
#else
#define FASTGAN_MULTIVERSION
#define FASTGAN_NO_FMA
#endif

// kLanes independent partial sums let the compiler vectorize a reduction
// without reassociating it; kBlock is the unit of parallel work of a reduction.
constexpr int kLanes = 16;
constexpr int64_t kBlock = 8192;

int64_t grain_in_blocks(int64_t block_elems) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(block_elems, 1));
}


template <typename acc_t, typename scalar_t>
FASTGAN_MULTIVERSION acc_t sum_squares(const scalar_t* x, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const acc_t v = static_cast<acc_t>(x[i + j]);
      lanes[j] += v * v;
    }
  acc_t total = 0;
  for (; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i]);
    total += v * v;
  }
  for (int j = 0; j < kLanes; ++j) total += lanes[j];
  return total;
}

template <typename scalar_t, typename acc_t>
FASTGAN_MULTIVERSION FASTGAN_NO_FMA void interpolate_segment(const scalar_t* real, const scalar_t* fake,
                                                             scalar_t* out, int64_t n, acc_t a) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t r = static_cast<acc_t>(real[i]);
    const acc_t diff = static_cast<acc_t>(fake[i]) - r;
    const acc_t step = a * diff;
    out[i] = static_cast<scalar_t>(r + step);
  }
}

template <typename scalar_t, typename acc_t>
FASTGAN_MULTIVERSION FASTGAN_NO_FMA void perturb_range(const scalar_t* real, scalar_t* out, int64_t begin,
                                                       int64_t end, uint64_t seed, acc_t std_dev) {
  PhiloxWords words = philox4(seed, static_cast<uint32_t>(begin >> 2));
  for (int64_t i = begin; i < end; ++i) {
    if ((i & 3) == 0 && i != begin) words = philox4(seed, static_cast<uint32_t>(i >> 2));
    // The reference casts the noise to real's dtype before subtracting 0.5.
    const acc_t noise = static_cast<acc_t>(static_cast<scalar_t>(uniform_from_word(philox_word(words, i & 3))));
    const acc_t shift = std_dev * (noise - acc_t(0.5));
    const acc_t y = static_cast<acc_t>(real[i]) + shift;
    // max/min with y first keep a NaN, as torch's clamp does.
    out[i] = static_cast<scalar_t>(std::min(std::max(y, acc_t(0)), acc_t(1)));
  }
}

void check_floating_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
              t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> gp_interpolate_cpu(const at::Tensor& real_in, const at::Tensor& fake_in,
                                                      const std::optional<at::Tensor>& alpha_in, int64_t seed) {
  check_floating_cpu(real_in, "gp_interpolate", "real");
  check_floating_cpu(fake_in, "gp_interpolate", "fake");
  TORCH_CHECK(real_in.dim() >= 1, "gp_interpolate: real must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(real_in.sizes() == fake_in.sizes(), "gp_interpolate: real and fake must have the same shape, got ",
              real_in.sizes(), " and ", fake_in.sizes());
  TORCH_CHECK(real_in.scalar_type() == fake_in.scalar_type(),
              "gp_interpolate: real and fake must have the same dtype, got ", real_in.scalar_type(), " and ",
              fake_in.scalar_type());
  const int64_t batch = real_in.size(0);
  TORCH_CHECK(batch >= 1, "gp_interpolate: the batch (size(0)) must be at least 1");
  at::Tensor real, fake;
  std::tie(real, fake) = batch_major_pair(real_in, fake_in);

  at::Tensor alpha;
  if (alpha_in.has_value() && alpha_in->defined()) {
    check_floating_cpu(*alpha_in, "gp_interpolate", "alpha");
    TORCH_CHECK(alpha_in->dim() == 1 && alpha_in->size(0) == batch, "gp_interpolate: alpha must have shape (",
                batch, ",), got ", alpha_in->sizes());
    // Always a fresh tensor: alpha_used must not alias the caller's alpha.
    alpha = alpha_in->to(real.scalar_type(), /*non_blocking=*/false, /*copy=*/true).contiguous();
  } else {
    TORCH_CHECK(batch <= kMaxPhiloxDraws, "gp_interpolate: at most 2^34 samples can draw a random alpha, got ",
                batch);
    alpha = at::empty({batch}, real.options());
  }
  at::Tensor x_hat = at::empty_like(real);
  const int64_t numel = real.numel(), per_sample = numel / batch;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, real.scalar_type(), "gp_interpolate", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* a = alpha.data_ptr<scalar_t>();
    if (!(alpha_in.has_value() && alpha_in->defined()))
      for (int64_t b = 0; b < batch; ++b) a[b] = static_cast<scalar_t>(philox_uniform(static_cast<uint64_t>(seed), b));
    if (numel == 0) return;
    const scalar_t* r = real.data_ptr<scalar_t>();
    const scalar_t* f = fake.data_ptr<scalar_t>();
    scalar_t* out = x_hat.data_ptr<scalar_t>();
    at::parallel_for(0, numel, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      // A range may span several samples; each piece has one alpha.
      for (int64_t pos = begin; pos < end;) {
        const int64_t b = pos / per_sample;
        const int64_t stop = std::min(end, (b + 1) * per_sample);
        interpolate_segment<scalar_t, acc_t>(r + pos, f + pos, out + pos, stop - pos, static_cast<acc_t>(a[b]));
        pos = stop;
      }
    });
  });
  return {x_hat, alpha};
}

at::Tensor dragan_perturb_cpu(const at::Tensor& real_in, int64_t seed) {
  check_floating_cpu(real_in, "dragan_perturb", "real");
  const int64_t numel = real_in.numel();
  TORCH_CHECK(numel >= 1, "dragan_perturb: real must not be empty");
  TORCH_CHECK(numel <= kMaxPhiloxDraws, "dragan_perturb: at most 2^34 elements are supported, got ", numel);
  // Contiguous: element i draws the i-th uniform in logical order.
  const at::Tensor real = real_in.contiguous();
  at::Tensor out = at::empty(real.sizes(), real.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, real.scalar_type(), "dragan_perturb", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = real.data_ptr<scalar_t>();
    const acc_t std_dev = static_cast<acc_t>(at::std(real, /*unbiased=*/false).item<scalar_t>());
    scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, numel, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      perturb_range<scalar_t, acc_t>(x, y, begin, end, static_cast<uint64_t>(seed), std_dev);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> gp_penalty_cpu(const at::Tensor& grad_in, bool squared_norm, double center,
                                                  double eps, bool one_sided) {
  check_floating_cpu(grad_in, "gp_penalty", "grad");
  TORCH_CHECK(grad_in.dim() >= 1, "gp_penalty: grad must have a batch dimension, got a 0-d tensor");
  const int64_t batch = grad_in.size(0);
  TORCH_CHECK(batch >= 1, "gp_penalty: the batch (size(0)) must be at least 1");
  const at::Tensor grad = batch_major_or_copy(grad_in);
  const int64_t per_sample = grad.numel() / batch;
  at::Tensor penalty = at::empty({}, grad.options());
  at::Tensor sq;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "gp_penalty", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    sq = at::empty({batch}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const scalar_t* g = grad.data_ptr<scalar_t>();
    acc_t* s = sq.data_ptr<acc_t>();
    // Samples larger than a block are split so that a small batch of large
    // images still uses every thread; block sums are combined in double.
    const int64_t blocks_per_sample = std::max<int64_t>(1, (per_sample + kBlock - 1) / kBlock);
    const int64_t block_len = std::min(per_sample, kBlock);
    std::vector<double> partial(blocks_per_sample > 1 ? batch * blocks_per_sample : 0);
    at::parallel_for(0, batch * blocks_per_sample, grain_in_blocks(block_len), [&](int64_t first, int64_t last) {
      for (int64_t k = first; k < last; ++k) {
        const int64_t b = k / blocks_per_sample, begin = (k % blocks_per_sample) * kBlock;
        const acc_t block = sum_squares<acc_t>(g + b * per_sample + begin, std::min(kBlock, per_sample - begin));
        if (blocks_per_sample > 1)
          partial[k] = static_cast<double>(block);
        else
          s[b] = block;
      }
    });
    if (blocks_per_sample > 1)
      for (int64_t b = 0; b < batch; ++b) {
        double total = 0;
        for (int64_t k = 0; k < blocks_per_sample; ++k) total += partial[b * blocks_per_sample + k];
        s[b] = static_cast<acc_t>(total);
      }
    // B values: summed serially in double, in order, for a reproducible mean.
    double total = 0;
    for (int64_t b = 0; b < batch; ++b) {
      const double sq_b = static_cast<double>(s[b]);
      if (squared_norm) {
        total += sq_b;
      } else {
        double gap = std::sqrt(eps + sq_b) - center;
        if (one_sided) gap = std::max(gap, 0.0);  // NaN stays NaN
        total += gap * gap;
      }
    }
    const double mean = total / static_cast<double>(batch);
    // A plain cast, not fill_: fill_ refuses values that overflow half, the
    // reference gives inf.
    *penalty.data_ptr<scalar_t>() = static_cast<scalar_t>(squared_norm ? 0.5 * mean : mean);
  });
  return {penalty, sq};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastgan_C, CPU, m) {
  m.impl("gp_interpolate", &gp_interpolate_cpu);
  m.impl("dragan_perturb", &dragan_perturb_cpu);
  m.impl("gp_penalty", &gp_penalty_cpu);
}

}  // namespace fastgan
