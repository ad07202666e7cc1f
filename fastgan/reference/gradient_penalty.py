"""Gradient penalties in plain torch: the oracle for the fused kernels.

Conventions (compare_gan; docs/losses.md):

* WGAN-GP interpolation: x̂ = x + α (x_fake − x), one α ~ U[0, 1) per sample;
* DRAGAN perturbation: x̂ = clip(x + std(x) · (U[0, 1) − 0.5), 0, 1), std over the
  whole batch, biased (population: divided by the element count, as compare_gan's
  ``tf.nn.moments``), so a one-element batch gives std 0 and x̂ = clip(x, 0, 1);
  one uniform per element;
* norm penalties (wgan-gp, dragan): slope_b = sqrt(eps + Σ g_b²),
  penalty = mean_b (slope_b − center)², or mean_b max(0, slope_b − center)² one-sided;
* squared-norm penalties (r1, r2): penalty = ½ mean_b Σ g_b², so λ·penalty is
  Mescheder's (γ/2)·E‖g‖² with λ = γ.

Random numbers come from a counter-based generator that every backend computes
identically: Philox-4x32-10 with key (seed low 32 bits, seed high 32 bits) and
counter (c, 0, 0, 0) -- triton's ``tl.randint4x(seed, c)``; the i-th uniform is
(word i mod 4 of counter i div 4) >> 8 · 2⁻²⁴, exact in float32. So α and the DRAGAN
noise depend only on the seed, never on the backend; counters are 32 bits wide, so
one call draws at most 2³⁴ numbers.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

_MASK32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57

KINDS = ("wgan-gp", "dragan", "r1", "r2")
SQUARED_NORM_KINDS = ("r1", "r2")


def _mul_hi_lo(a: int, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of a·b for a uint32 constant and uint32 values held in int64."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_lo, hi_lo, lo_hi, hi_hi = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi, a_hi * b_hi
    cross = (lo_lo >> 16) + (hi_lo & 0xFFFF) + (lo_hi & 0xFFFF)
    high = hi_hi + (hi_lo >> 16) + (lo_hi >> 16) + (cross >> 16)
    low = ((cross & 0xFFFF) << 16) | (lo_lo & 0xFFFF)
    return high & _MASK32, low & _MASK32


def philox_uniform(seed: int, n: int, device=None) -> torch.Tensor:
    """The first ``n`` uniforms in [0, 1) (float32) of the stream named by ``seed``:
    uniform i is output word i mod 4 of Philox(counter i div 4), so one Philox
    evaluation serves four consecutive draws."""
    c0 = torch.arange((n + 3) // 4, dtype=torch.int64, device=device)
    c1 = torch.zeros_like(c0)
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    words = torch.stack((c0, c1, c2, c3), dim=1).reshape(-1)[:n]
    return (words >> 8).to(torch.float32) * 2.0**-24


def interpolate(real: torch.Tensor, fake: torch.Tensor, alpha: Optional[torch.Tensor], seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x̂, α used): x̂ = real + α (fake − real), α of shape (B,) cast to real's dtype and
    broadcast over each sample; α = the first B uniforms of ``seed`` when not given."""
    if alpha is None:
        alpha = philox_uniform(seed, real.shape[0], real.device)
    alpha = alpha.to(real.dtype)
    a = alpha.reshape((-1,) + (1,) * (real.dim() - 1))
    return real + a * (fake - real), alpha.clone()


def dragan_perturb(real: torch.Tensor, seed: int) -> torch.Tensor:
    return dragan_with_noise(real, philox_uniform(seed, real.numel(), real.device).reshape(real.shape))


def dragan_with_noise(real: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """clip(real + std(real)·(noise − ½), 0, 1) for uniforms ``noise`` of real's shape."""
    return (real + real.std(correction=0) * (noise.to(real.dtype) - 0.5)).clamp(0, 1)


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def penalty(
    grad: torch.Tensor, squared_norm: bool, center: float, eps: float, one_sided: bool
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(penalty in grad's dtype, per-sample Σ g² in float32/float64) from D's input gradient."""
    sq = grad.reshape(grad.shape[0], -1).to(accumulator_dtype(grad.dtype)).square().sum(1)
    if squared_norm:
        return (0.5 * sq.mean()).to(grad.dtype), sq
    gap = torch.sqrt(eps + sq) - center
    if one_sided:
        gap = gap.clamp(min=0)
    return gap.square().mean().to(grad.dtype), sq
