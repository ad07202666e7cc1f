// How the gradient-penalty kernels read a batch in place: they walk memory linearly
// and only need each sample's elements to be one contiguous run (the order of the
// elements inside a sample does not matter to them). That holds for any dense tensor
// whose first (batch) dimension is outermost in memory: contiguous and channels-last
// batches alike, so those are never copied.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace fastgan {

inline bool batch_major(const at::Tensor& x) {
  return x.is_non_overlapping_and_dense() && (x.size(0) == 1 || x.stride(0) * x.size(0) == x.numel());
}

// The tensors themselves when all are batch-major and laid out alike, else contiguous copies.
inline std::pair<at::Tensor, at::Tensor> batch_major_pair(const at::Tensor& a, const at::Tensor& b) {
  if (batch_major(a) && batch_major(b) && a.strides() == b.strides()) return {a, b};
  return {a.contiguous(), b.contiguous()};
}

inline at::Tensor batch_major_or_copy(const at::Tensor& x) { return batch_major(x) ? x : x.contiguous(); }

}  // namespace fastgan
