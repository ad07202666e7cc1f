"""The Fréchet-distance ops behind FID: ``torch.library`` registration.

* ``fastgan::trace_sqrt_product(sigma1, sigma2, method, factor1?) -> tr sqrt(Σ1 Σ2)``
  (0-d float64), differentiable w.r.t. Σ2;
* :func:`frechet_distance` (mu1, sigma1, mu2, sigma2) -> FID, composed of it;
* ``fastgan::feature_moments(features) -> (Σx, Σ x xᵀ)`` in float64, the sums a
  streaming mean/covariance accumulator adds across batches and processes.

Methods (math in :mod:`fastgan.reference.frechet`):

* ``"symmetric"``: float64 Cholesky (or eigh for singular Σ1) + eigvalsh; exact for
  singular covariances; the CPU default. ``factor1`` (a cached factor of Σ1, see
  :func:`fastgan.reference.frechet.symmetric_factor`) skips the factorization.
* ``"newton-schulz"``: the coupled iteration in float64 (in float32 it stalls near a
  relative residual of 1e-5, far from FID's 1e-3 accuracy), run in chunks of 10
  iterations with one residual check per chunk (one host sync per chunk, none per
  iteration); when the residual has not reached 1e-10 after 50 iterations -- as happens
  for singular covariances -- it falls back to ``"symmetric"``. The CUDA default.
  Kernels: Triton (``fastgan.kernels.frechet``), C++ (``csrc/frechet.cpp``: the
  iteration folded into BLAS/cuBLAS GEMM epilogues, CPU and CUDA) or the torch reference.
* ``"auto"``: ``"newton-schulz"`` on CUDA, ``"symmetric"`` elsewhere.

Results are never complex; an FID that is negative only by round-off is clamped to 0.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastgan import _backend
from fastgan.reference import frechet as reference

METHODS = ("auto", "symmetric", "newton-schulz")
NEWTON_SCHULZ_CHUNK = 10
NEWTON_SCHULZ_MAX_ITERATIONS = 50
NEWTON_SCHULZ_TOLERANCE = 1e-10


def _check_covariances(sigma1: Tensor, sigma2: Tensor, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if not s.is_floating_point() or s.dim() != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty square floating-point matrix, got {tuple(s.shape)} {s.dtype}")
    if sigma1.shape != sigma2.shape or sigma1.device != sigma2.device:
        raise ValueError(f"sigma1 {tuple(sigma1.shape)} on {sigma1.device} and sigma2 {tuple(sigma2.shape)} on {sigma2.device} must match")


_NEWTON_SCHULZ = {  # (steps, matmul for the residual)
    "reference": (reference.newton_schulz_steps, torch.matmul),
    "triton": (_backend.triton_kernel("frechet", "newton_schulz_steps"), _backend.triton_kernel("frechet", "matmul")),
    "cpp": (_backend.extension_op("newton_schulz_steps"), torch.matmul),
    "cuda": (_backend.extension_op("newton_schulz_steps"), torch.matmul),
}
_FEATURE_MOMENTS = {
    "reference": reference.feature_moments,
    "cpp": _backend.extension_op("feature_moments"),
    "cuda": _backend.extension_op("feature_moments"),
}


def newton_schulz(sigma1: Tensor, sigma2: Tensor) -> Tuple[Tensor, bool]:
    """(tr sqrt(Σ1 Σ2), converged) by float64 Newton–Schulz on the selected backend."""
    steps, matmul = _backend.dispatch(_NEWTON_SCHULZ, sigma1.device)
    normalized, scale, z = reference.newton_schulz_start(sigma1.double(), sigma2.double())
    y = normalized
    for _ in range(0, NEWTON_SCHULZ_MAX_ITERATIONS, NEWTON_SCHULZ_CHUNK):
        y, z = steps(y, z, NEWTON_SCHULZ_CHUNK)
        residual = reference.newton_schulz_residual(y, normalized, matmul)
        if float(residual) <= NEWTON_SCHULZ_TOLERANCE:
            return scale.sqrt() * torch.trace(y), True
    return scale.sqrt() * torch.trace(y), False


@torch.library.custom_op("fastgan::trace_sqrt_product", mutates_args=())
def trace_sqrt_product(sigma1: Tensor, sigma2: Tensor, method: str = "auto", factor1: Optional[Tensor] = None) -> Tensor:
    _check_covariances(sigma1, sigma2, method)
    if method == "auto":
        method = "newton-schulz" if sigma1.device.type == "cuda" else "symmetric"
    if method == "newton-schulz" and factor1 is None:
        value, converged = newton_schulz(sigma1, sigma2)
        if converged:
            return value
    return reference.trace_sqrt_product_symmetric(sigma1, sigma2, factor1)


@trace_sqrt_product.register_fake
def _(sigma1, sigma2, method="auto", factor1=None):
    _check_covariances(sigma1, sigma2, method)
    return sigma1.new_empty((), dtype=torch.float64)


@torch.library.custom_op("fastgan::trace_sqrt_product_grad", mutates_args=())
def trace_sqrt_product_grad(sigma1: Tensor, sigma2: Tensor) -> Tensor:
    """∂ tr sqrt(Σ1 Σ2) / ∂Σ2 (float64); an op of its own so the backward stays opaque
    to tracing (its factorization branches on the data)."""
    return reference.trace_sqrt_product_grad_sigma2(sigma1, sigma2)


@trace_sqrt_product_grad.register_fake
def _(sigma1, sigma2):
    return sigma2.new_empty(sigma2.shape, dtype=torch.float64)


def _trace_setup_context(ctx, inputs, output):
    sigma1, sigma2, _, _ = inputs
    ctx.save_for_backward(sigma1, sigma2)


def _trace_backward(ctx, grad):
    sigma1, sigma2 = ctx.saved_tensors
    grad_sigma2 = None
    if ctx.needs_input_grad[1]:
        grad_sigma2 = (grad * trace_sqrt_product_grad(sigma1, sigma2)).to(sigma2.dtype)
    return None, grad_sigma2, None, None


trace_sqrt_product.register_autograd(_trace_backward, setup_context=_trace_setup_context)


def frechet_distance(
    mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor, method: str = "auto", factor1: Optional[Tensor] = None
) -> Tensor:
    """FID = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr sqrt(Σ1 Σ2) as a 0-d float64 tensor,
    differentiable w.r.t. (μ2, Σ2); round-off negatives are clamped to 0."""
    if mu1.shape != (sigma1.shape[0],) or mu2.shape != (sigma2.shape[0],):
        raise ValueError(f"means must match the covariances: mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}")
    diff = mu1.double() - mu2.double()
    distance = diff @ diff + torch.trace(sigma1.double()) + torch.trace(sigma2.double())
    return (distance - 2 * trace_sqrt_product(sigma1, sigma2, method, factor1)).clamp(min=0)


@torch.library.custom_op("fastgan::feature_moments", mutates_args=())
def feature_moments(features: Tensor) -> Tuple[Tensor, Tensor]:
    if not features.is_floating_point() or features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, d) floating-point batch, got {tuple(features.shape)} {features.dtype}")
    return _backend.dispatch(_FEATURE_MOMENTS, features.device)(features.contiguous())


@feature_moments.register_fake
def _(features):
    d = features.shape[1]
    return features.new_empty((d,), dtype=torch.float64), features.new_empty((d, d), dtype=torch.float64)
