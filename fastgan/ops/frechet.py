"""The Fréchet-distance ops behind FID: ``torch.library`` registration.

* ``fastgan::trace_sqrt_product(sigma1, sigma2, method, factor1?) -> tr sqrt(Σ1 Σ2)``
  (0-d float64), differentiable w.r.t. Σ2;
* :func:`frechet_distance` (mu1, sigma1, mu2, sigma2) -> FID, composed of it;
* ``fastgan::feature_moments(features) -> (Σx, Σ x xᵀ)`` in float64, the sums a
  streaming mean/covariance accumulator adds across batches and processes.

Methods (math in :mod:`fastgan.reference.frechet`); each meets FID's accuracy bound
(|ΔFID| ≤ 1e-3 + 1e-6·FID against scipy in float64, tests/test_frechet.py) or notices
that it cannot and falls back to ``"symmetric"``:

* ``"symmetric"``: float64 Cholesky of Σ1 (eigh when Σ1 is singular), the congruence
  Rᵀ Σ2 R, and its eigvalsh -- LAPACK on the CPU, cuSOLVER on CUDA. Exact for singular
  and ill-conditioned covariances (5e-11 of FID at condition 1e12); never falls back.
  ``factor1`` (a cached factor of Σ1, see
  :func:`fastgan.reference.frechet.symmetric_factor`) skips the factorization.
* ``"newton-schulz"``: the coupled iteration in float64 on Σ1 Σ2 scaled by its largest
  eigenvalue (estimated by power iteration), its first steps scaled from the smallest one
  (:func:`scaled_schedule`; skipped at once for a covariance that is not positive
  definite), then plain steps checked every 4 iterations
  (one host sync per check, none per iteration) until the gap ‖I − Z Y‖_F falls below 1;
  from there the gap at least squares each step (:func:`iterations_to_close`), so the
  next check comes exactly when the gap is due to be closed. The check is the gap ≤ 1e-8, which bounds the relative error of the
  trace for every eigenvalue (the residual ‖Y² − A‖ used before did not, and reported
  convergence 2e-2 of FID off at condition 1e12). Each run of steps starts from the
  product Z Y already at hand (Y at the start, the check's product after), so N
  iterations and their checks cost 3N − 1 products. Singular covariances (no Cholesky
  factor) fall back at once; a gap not closed after 50 iterations (Σ1 Σ2 conditioned
  far beyond 1e13) falls back then.
  Kernels by the op's backend table below: cuBLAS on CUDA (C++ or torch), BLAS on the
  CPU, Triton (float64 ``tl.dot``, untuned) only when forced.
* ``"newton-schulz-mixed"``: the same iteration in IEEE float32 (TF32 is switched off
  for it: with TF32's 10-bit mantissa the iteration diverges before it converges), then
  float64 steps until Y and Z are float64 inverses of each other, and one Newton
  correction of the trace, tr Y − ½ tr(Z (Y² − A)) = ½ (tr Y + tr(Z A)) (no product
  needed). The error it leaves is second order in the float32 error, estimated at
  ⅛ |tr(Z (Z R)²)| with R = Y² − A (three float64 products; within 2× of the true
  error on the cases tried); the result is accepted when 4× that estimate is ≤ 1e-7·(tr Σ1 +
  tr Σ2) in FID units, else it falls back (as it does wherever the float32 stage fails:
  Σ1 Σ2 conditioned beyond ~1e7, as Inception statistics of real images often are). Worth it only where float32 products are
  much faster than float64 ones (consumer GPUs; not an H100, whose float64 tensor cores
  match its float32 rate).
* ``"auto"``: the per-device default of :data:`AUTO_METHOD`: ``"symmetric"`` on the CPU
  (measured: bench/results/fid-cpu-*.md), ``"newton-schulz"`` on CUDA (an H100 at
  d = 2048: 15.8 and 16.8 ms in two runs against ``"symmetric"``'s 28 ms,
  bench/results/fid-cuda-2026-11-2[78].md).

:func:`frechet_distance` validates the statistics first (finite, symmetric and positive
semi-definite within :data:`SYMMETRY_TOLERANCE` / :data:`PSD_TOLERANCE`), returns
exactly 0 for identical statistics, clamps at 0 only a negative result that round-off
and the methods' accepted error explain (|FID| ≤ :data:`ROUND_OFF` · (‖μ1 − μ2‖² +
tr Σ1 + tr Σ2)) and raises on a more negative one. Results are never complex.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from fastgan import _backend
from fastgan.reference import frechet as reference

METHODS = ("auto", "symmetric", "newton-schulz", "newton-schulz-mixed")
AUTO_METHOD = {"cpu": "symmetric", "cuda": "newton-schulz"}
NEWTON_SCHULZ_CHUNK = 4  # iterations between checks while the gap is >= 1
NEWTON_SCHULZ_MAX_ITERATIONS = 50
NEWTON_SCHULZ_TOLERANCE = 1e-8  # on ‖I − Z Y‖_F; float64 stalls at 3e-10..1e-9 at condition 1e12 (d = 512)
SCALED_UNTIL = 0.3  # the scaled steps' lower bound on x at which the plain steps take over
NEWTON_SCHULZ_CLOSING = 6  # plain steps left for closing the gap from x >= SCALED_UNTIL (0.3 -> 1e-8 takes 5-6)
MIXED_FLOAT32_CHUNK = 5
MIXED_FLOAT32_MAX_ITERATIONS = 50
MIXED_FLOAT32_GAP = 1e-3  # switch to float64 here (float32 stalls near 1e-4 at d = 256)
MIXED_REFINEMENT_CHUNK = 2
MIXED_REFINEMENT_MAX_STEPS = 6
MIXED_TOLERANCE = 1e-7  # accepted estimated error in FID, relative to tr Σ1 + tr Σ2
MIXED_ERROR_MARGIN = 4  # times the estimate (it came within 2x of the true error, from below or above)
SYMMETRY_TOLERANCE = 1e-6  # max |Σ − Σᵀ| relative to max |Σ|
PSD_TOLERANCE = 1e-6  # most negative eigenvalue accepted, relative to tr Σ + ‖μ‖² (float64 Σ; 8 ε for coarser dtypes)
ROUND_OFF = 1e-6  # negative FID clamped to 0 up to this, relative to ‖μ1 − μ2‖² + tr Σ1 + tr Σ2


def _check_covariances(sigma1: Tensor, sigma2: Tensor, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if not s.is_floating_point() or s.dim() != 2 or s.shape[0] != s.shape[1] or s.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty square floating-point matrix, got {tuple(s.shape)} {s.dtype}")
    if sigma1.shape != sigma2.shape or sigma1.device != sigma2.device:
        raise ValueError(f"sigma1 {tuple(sigma1.shape)} on {sigma1.device} and sigma2 {tuple(sigma2.shape)} on {sigma2.device} must match")


_NEWTON_SCHULZ = _backend.register(  # (steps, matmul for the residual)
    "newton_schulz_steps",
    {
        "reference": (reference.newton_schulz_steps, torch.matmul),
        "triton": (_backend.triton_kernel("frechet", "newton_schulz_steps"), _backend.triton_kernel("frechet", "matmul")),
        "cpp": (_backend.extension_op("newton_schulz_steps"), torch.matmul),
        "cuda": (_backend.extension_op("newton_schulz_steps"), torch.matmul),
    },
    {"cpu": ("cpp", "reference"), "cuda": ("cuda", "reference", "triton")},
    "CPU: bench/results/fid-cpu-2026-11-27.md, d=2048 cpp 1.52x scipy, reference 1.45x; CUDA: "
    "bench/results/fid-cuda-2026-11-2[78].md (H100, quick), d=2048 cuda 16.5 / 17.7 ms, reference 17.1 / 18.1 "
    "(equal within noise: both are cuBLAS float64 products), triton 18.2 / 18.9 (its untuned float64 matmul)",
)
_FEATURE_MOMENTS = _backend.register(
    "feature_moments",
    {
        "reference": reference.feature_moments,
        "cpp": _backend.extension_op("feature_moments"),
        "cuda": _backend.extension_op("feature_moments"),
    },
    {"cpu": ("cpp", "reference"), "cuda": ("cuda", "reference")},
    "not measured; the C++ op is one float64 ATen product, the same work as the reference in one call",
)


def iterations_to_close(gap: float, tolerance: float) -> Optional[int]:
    """Iterations after which a gap of ``gap`` < 1 is certainly ≤ ``tolerance`` (None while gap ≥ 1).

    With E = I − Z Y, one coupled step gives I − Z' Y' = ¾ E² + ¼ E³ exactly (Y' = Y T and
    Z' = T Z with T = I + E/2, a polynomial in Z Y), so the gap g goes to at most g² once
    below 1, and k steps take it to at most g^(2^k)."""
    if gap >= 1:
        return None
    return max(1, math.ceil(math.log2(math.log(tolerance) / math.log(gap))))


def _iterate(steps, matmul, y: Tensor, z: Optional[Tensor], chunk: int, max_iterations: int, tolerance: float):
    """Coupled steps until the gap ‖I − Z Y‖_F ≤ ``tolerance``: (Y, Z, gap, closed). While the
    gap is ≥ 1 the steps run ``chunk`` at a time between checks; once below 1 the next run
    is as long as :func:`iterations_to_close` says, at most ``chunk`` (one more check, unless
    round-off stalls the gap). A run that ends non-finite (the iteration diverges once round-off dominates,
    as it does for singular or too ill-conditioned input) is discarded and ends the loop.

    ``z`` None is the identity (the iteration's start). Each run's first step reuses the
    product Z Y that is already known -- Y at the start, the check's product after it
    (:func:`fastgan.reference.frechet.newton_schulz_step_from`) -- so N iterations cost
    3N − 1 products with their checks (3N + 1 from a given Z) instead of 3N plus one per
    check."""
    gap, done, run = math.inf, 0, chunk
    product = y if z is None else None  # Z Y where known without a product
    while done < max_iterations:
        run = min(run, max_iterations - done)
        if product is None:
            y_next, z_next = steps(y, z, run)
        else:
            y_next, z_next = steps(*reference.newton_schulz_step_from(product, y, z, matmul), run - 1)
        done += run
        next_product = matmul(z_next, y_next)
        next_gap = float(reference.newton_schulz_gap_of(next_product))
        if not math.isfinite(next_gap):
            break
        y, z, gap, product = y_next, z_next, next_gap, next_product
        if gap <= tolerance:
            return y, z, gap, True
        run = min(iterations_to_close(gap, tolerance) or chunk, chunk)  # the bound is loose near 1
    if z is None:  # the first run already diverged: the start, whose Z is the identity
        z = torch.eye(y.shape[0], dtype=y.dtype, device=y.device)
    return y, z, gap, False


def scaled_schedule(smallest: float) -> List[float]:
    """The scalings α of the steps after the first plain one, for A's smallest eigenvalue
    estimated at ``smallest`` (Chen & Chow's scaled Newton–Schulz, 2014).

    In x = √(eigenvalue of Z Y), a step maps x to ½αx(3 − α²x²). The plain first step leaves
    every x in [l, 1]; α = √(3 / (1 + l + l²)) maps that interval into [l', 1] with
    l' = ½αl(3 − α²l²), about 2.6 l for small l where the plain step gives 1.5 l -- so the
    smallest eigenvalues, which set the iteration count, climb in about half the steps. The
    schedule stops once l ≥ SCALED_UNTIL (the plain steps and their gap checks take over) or
    when it alone would use every iteration allowed. An estimate from above (see
    :func:`fastgan.reference.frechet.smallest_eigenvalue_estimate`) only makes the first
    steps less aggressive: eigenvalues below l still grow at least 1.5-fold a step."""
    bound = math.sqrt(smallest)
    bound = 0.5 * bound * (3 - bound * bound)
    alphas: List[float] = []
    while bound < SCALED_UNTIL and len(alphas) < NEWTON_SCHULZ_MAX_ITERATIONS:
        alpha = math.sqrt(3 / (1 + bound + bound * bound))
        alphas.append(alpha)
        bound = 0.5 * alpha * bound * (3 - alpha * alpha * bound * bound)
    return alphas


def newton_schulz(sigma1: Tensor, sigma2: Tensor) -> Tuple[Tensor, bool]:
    """(tr sqrt(Σ1 Σ2), converged) by float64 Newton–Schulz on the selected backend;
    ``converged`` means the gap ‖I − Z Y‖_F reached :data:`NEWTON_SCHULZ_TOLERANCE`. The
    first steps are scaled by :func:`scaled_schedule` from the estimated smallest eigenvalue;
    a covariance that is not positive definite, or a schedule that would leave fewer than
    :data:`NEWTON_SCHULZ_CLOSING` plain steps, returns at once unconverged (the caller falls
    back to the symmetric method instead of spending 50 iterations on it)."""
    steps, matmul = _NEWTON_SCHULZ(sigma1.device)
    sigma1, sigma2 = sigma1.double(), sigma2.double()
    normalized, scale = reference.newton_schulz_start(sigma1, sigma2)
    smallest = reference.smallest_eigenvalue_estimate(sigma1, sigma2, scale)
    alphas = scaled_schedule(smallest) if smallest is not None else None
    if alphas is None or 1 + len(alphas) + NEWTON_SCHULZ_CLOSING > NEWTON_SCHULZ_MAX_ITERATIONS:
        return scale.new_full((), math.nan), False
    y, z = reference.newton_schulz_step_from(normalized, normalized, None, matmul)  # the plain first step
    for alpha in alphas:
        y, z = reference.newton_schulz_step_from(matmul(z, y), y, z, matmul, alpha)
    y, _, _, converged = _iterate(steps, matmul, y, z, NEWTON_SCHULZ_CHUNK,
                                  NEWTON_SCHULZ_MAX_ITERATIONS - 1 - len(alphas), NEWTON_SCHULZ_TOLERANCE)
    return scale.sqrt() * torch.trace(y), converged


@contextlib.contextmanager
def _ieee_float32(device: torch.device):
    """float32 products in full IEEE precision on CUDA (no TF32), whatever the user set.

    torch has two APIs for this flag and raises when code reads one after the other was
    set, so the flag is switched through the family the user's setting is readable in
    (the legacy ``allow_tf32`` unless the new ``fp32_precision`` was used) and restored there."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    try:
        name, previous, ieee = "allow_tf32", matmul.allow_tf32, False
    except RuntimeError:  # the user set the new API: reading the legacy flag is refused
        name, previous, ieee = "fp32_precision", matmul.fp32_precision, "ieee"
    setattr(matmul, name, ieee)
    try:
        yield
    finally:
        setattr(matmul, name, previous)


def newton_schulz_mixed(sigma1: Tensor, sigma2: Tensor) -> Tuple[Tensor, bool]:
    """(tr sqrt(Σ1 Σ2), converged) by float32 Newton–Schulz, float64 refinement steps and a
    Newton correction of the trace (see the module docstring); ``converged`` means the
    float64 steps closed the gap and the correction is within :data:`MIXED_TOLERANCE`."""
    steps, matmul = _NEWTON_SCHULZ(sigma1.device)
    normalized, scale = reference.newton_schulz_start(sigma1.double(), sigma2.double())
    with _ieee_float32(sigma1.device):
        y, z, _, _ = _iterate(steps, matmul, normalized.float(), None, MIXED_FLOAT32_CHUNK,
                              MIXED_FLOAT32_MAX_ITERATIONS, MIXED_FLOAT32_GAP)
    # In float64 the steps make Y and Z exact inverses, but of a square root of a float32
    # neighbour of A (the iteration keeps any fixed point with Z Y = I): hence the correction.
    y, z, _, closed = _iterate(steps, matmul, y.double(), z.double(), MIXED_REFINEMENT_CHUNK,
                               MIXED_REFINEMENT_MAX_STEPS, NEWTON_SCHULZ_TOLERANCE)
    if not closed:
        return scale.new_full((), math.nan), False
    trace, error = reference.newton_corrected_trace(y, z, normalized, matmul)
    allowed = MIXED_TOLERANCE * float(torch.trace(sigma1.double()) + torch.trace(sigma2.double()))
    return scale.sqrt() * trace, 2 * MIXED_ERROR_MARGIN * float(scale.sqrt() * error) <= allowed


ITERATIVE_METHODS = {"newton-schulz": newton_schulz, "newton-schulz-mixed": newton_schulz_mixed}


@torch.library.custom_op("fastgan::trace_sqrt_product", mutates_args=())
def trace_sqrt_product(sigma1: Tensor, sigma2: Tensor, method: str = "auto", factor1: Optional[Tensor] = None) -> Tensor:
    _check_covariances(sigma1, sigma2, method)
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):  # else LAPACK reports "failed to converge"
        if not bool(torch.isfinite(sigma).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    if method == "auto":
        method = AUTO_METHOD.get(sigma1.device.type, "symmetric")
    if method in ITERATIVE_METHODS and factor1 is None:
        value, converged = ITERATIVE_METHODS[method](sigma1, sigma2)
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
    to tracing (its factorization branches on the data). tr sqrt(Σ1 Σ2) = tr sqrt(Σ2 Σ1), so
    the arguments swapped give ∂/∂Σ1."""
    return reference.trace_sqrt_product_grad_sigma2(sigma1, sigma2)


@trace_sqrt_product_grad.register_fake
def _(sigma1, sigma2):
    return sigma2.new_empty(sigma2.shape, dtype=torch.float64)


def _trace_setup_context(ctx, inputs, output):
    sigma1, sigma2, _, _ = inputs
    ctx.save_for_backward(sigma1, sigma2)


def _trace_backward(ctx, grad):
    sigma1, sigma2 = ctx.saved_tensors
    grad_sigma1 = grad_sigma2 = None
    if ctx.needs_input_grad[0]:
        grad_sigma1 = (grad * trace_sqrt_product_grad(sigma2, sigma1)).to(sigma1.dtype)
    if ctx.needs_input_grad[1]:
        grad_sigma2 = (grad * trace_sqrt_product_grad(sigma1, sigma2)).to(sigma2.dtype)
    return grad_sigma1, grad_sigma2, None, None


trace_sqrt_product.register_autograd(_trace_backward, setup_context=_trace_setup_context)


def check_statistics(mean: Tensor, sigma: Tensor, name: str = "statistics") -> None:
    """Raise ValueError, naming ``name``, unless (μ, Σ) are finite FID statistics: μ of
    shape (d,), Σ (d, d), symmetric within :data:`SYMMETRY_TOLERANCE` (relative to the
    largest |Σ_ij|) and positive semi-definite up to round-off: no eigenvalue below
    −max(:data:`PSD_TOLERANCE`, 8 ε of Σ's dtype) · (tr Σ + ‖μ‖²). That scale is the features'
    mean square E‖x‖², which bounds the round-off of a covariance computed from them (in one
    pass its error grows with ‖μ‖², not with the spread), so a collapsed generator's Σ ≈ 0
    and float32 covariances of fewer samples than dimensions pass. Costs one Cholesky
    factorization."""
    if sigma.dim() != 2 or sigma.shape[0] != sigma.shape[1] or sigma.shape[0] == 0:
        raise ValueError(f"{name}: the covariance must be a non-empty square matrix, got shape {tuple(sigma.shape)}")
    if mean.shape != (sigma.shape[0],):
        raise ValueError(f"{name}: the mean has shape {tuple(mean.shape)}, the covariance {tuple(sigma.shape)}")
    tolerance = max(PSD_TOLERANCE, 8 * torch.finfo(sigma.dtype).eps) if sigma.is_floating_point() else PSD_TOLERANCE
    with torch.no_grad():
        mean, sigma = mean.detach().double(), sigma.detach().double()
        for what, value in (("mean", mean), ("covariance", sigma)):
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name}: the {what} contains NaN or Inf")
        largest = float(sigma.abs().max())
        asymmetry = float((sigma - sigma.T).abs().max())
        if asymmetry > SYMMETRY_TOLERANCE * largest:
            raise ValueError(f"{name}: the covariance is not symmetric (max |Σ − Σᵀ| = {asymmetry:.3g}, "
                             f"max |Σ| = {largest:.3g}); a covariance matrix is symmetric")
        # Σ + t·I is positive definite (Cholesky succeeds) iff no eigenvalue of Σ is below −t:
        # one Cholesky instead of an eigendecomposition for singular Σ; t > 0 even for Σ = 0
        mean_square = float(sigma.diagonal().clamp(min=0).sum() + mean @ mean)
        shift = max(tolerance * mean_square, torch.finfo(torch.float64).tiny)
        shifted = (sigma + sigma.T) / 2 + shift * torch.eye(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
        if int(torch.linalg.cholesky_ex(shifted)[1]) != 0:
            eigenvalues = torch.linalg.eigvalsh((sigma + sigma.T) / 2)  # only to say what is wrong
            raise ValueError(f"{name}: the covariance is not positive semi-definite (eigenvalues from "
                             f"{float(eigenvalues[0]):.3g} to {float(eigenvalues[-1]):.3g}); a covariance matrix "
                             "has none below 0 beyond round-off")


def frechet_distance(
    mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor, method: str = "auto", factor1: Optional[Tensor] = None,
    *, names: Tuple[str, str] = ("the first statistics", "the second statistics"), validate: bool = True,
) -> Tensor:
    """FID = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr sqrt(Σ1 Σ2) as a 0-d float64 tensor,
    differentiable w.r.t. (μ2, Σ2).

    Both sides are checked first (:func:`check_statistics`; ``names`` name them in the
    errors; ``validate=False`` skips the check for callers that made it already).
    Identical statistics give exactly 0; a negative result within :data:`ROUND_OFF` is
    clamped to 0, a more negative one raises RuntimeError."""
    if sigma1.shape != sigma2.shape:
        raise ValueError(f"{names[0]} and {names[1]} are of different dimensions: covariances "
                         f"{tuple(sigma1.shape)} and {tuple(sigma2.shape)}; FID compares statistics of the same features")
    if validate:
        check_statistics(mu1, sigma1, names[0])
        check_statistics(mu2, sigma2, names[1])
    elif mu1.shape != (sigma1.shape[0],) or mu2.shape != (sigma2.shape[0],):
        raise ValueError(f"means must match the covariances: mu1 {tuple(mu1.shape)}, sigma1 {tuple(sigma1.shape)}, mu2 {tuple(mu2.shape)}, sigma2 {tuple(sigma2.shape)}")
    diff = mu1.double() - mu2.double()
    terms = diff @ diff + torch.trace(sigma1.double()) + torch.trace(sigma2.double())
    if torch.equal(mu1, mu2) and torch.equal(sigma1, sigma2):
        return 0 * terms  # exactly 0, still connected to (μ2, Σ2) for autograd (the gradient is 0 there)
    distance = terms - 2 * trace_sqrt_product(sigma1, sigma2, method, factor1)
    allowed = ROUND_OFF * float(terms.detach())
    if float(distance.detach()) < -allowed:
        raise RuntimeError(f"FID between {names[0]} and {names[1]} came out at {float(distance.detach()):.6g}, more negative "
                           f"than round-off explains ({-allowed:.3g}); this is a bug, please report it with the statistics")
    return distance.clamp(min=0)


def _check_features(features: Tensor) -> None:
    if not features.is_floating_point() or features.dim() != 2 or features.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, d) floating-point batch, got {tuple(features.shape)} {features.dtype}")


@torch.library.custom_op("fastgan::feature_moments", mutates_args=())
def feature_moments(features: Tensor) -> Tuple[Tensor, Tensor]:
    _check_features(features)
    return _FEATURE_MOMENTS(features.device)(features.contiguous())


@feature_moments.register_fake
def _(features):
    _check_features(features)  # as the op does: under torch.compile the error comes at tracing, not at run time
    d = features.shape[1]
    return features.new_empty((d,), dtype=torch.float64), features.new_empty((d, d), dtype=torch.float64)
