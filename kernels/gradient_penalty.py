"""Gradient-penalty kernels in Triton: interpolation, DRAGAN perturbation, fused penalty.

What they compute (conventions: ``fastgan/reference/gradient_penalty.py``):

* interpolation  x̂ = real + α_b (fake − real), α_b drawn in-kernel (Philox, counter b)
  or read from a given tensor; reads real and fake once, writes x̂ once (3 x numel).
* DRAGAN         x̂ = clip(real + std·(U_i − ½), 0, 1), U_i drawn in-kernel (counter i);
  std is one torch reduction beforehand (kept on the device, no sync); reads real
  once, writes x̂ once, and never materialises the noise tensor.
* penalty        one program per sample: sq_b = Σ g², then its share of the mean
  (½ sq_b or (sqrt(eps + sq_b) − center)², optionally one-sided) added atomically
  to the penalty; reads the gradient once.

Random numbers: fastgan's Philox-4x32-10 stream, the same on every backend, so a
seed gives the same α and noise on CPU, CUDA, Triton and the reference.
The launchers run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

_BLOCK = 1024


@triton.jit
def _philox_uniform(seed_lo, seed_hi, index):
    """The index-th uniform in [0, 1) of the stream (seed_hi << 32 | seed_lo), as float32."""
    c0 = index.to(tl.uint32)
    c1 = tl.zeros_like(c0)
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    k0 = tl.zeros_like(c0) + seed_lo.to(tl.uint32)
    k1 = tl.zeros_like(c0) + seed_hi.to(tl.uint32)
    for _ in tl.static_range(10):
        round_b = tl.full(c0.shape, 0xCD9E8D57, tl.uint32)
        round_a = tl.full(c0.shape, 0xD2511F53, tl.uint32)
        n0 = tl.umulhi(round_b, c2) ^ c1 ^ k0
        n2 = tl.umulhi(round_a, c0) ^ c3 ^ k1
        c1 = round_b * c2
        c3 = round_a * c0
        c0 = n0
        c2 = n2
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return (c0 >> 8).to(tl.float32) * (1.0 / 16777216.0)


@triton.jit
def _interpolate_kernel(
    real_ptr, fake_ptr, alpha_ptr, out_ptr, alpha_out_ptr, numel, per_sample, seed_lo, seed_hi,
    RANDOM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    sample = offs // per_sample
    if RANDOM:
        alpha = _philox_uniform(seed_lo, seed_hi, sample).to(alpha_out_ptr.dtype.element_ty)
        tl.store(alpha_out_ptr + sample, alpha, mask=mask & (offs % per_sample == 0))
    else:
        alpha = tl.load(alpha_ptr + sample, mask=mask, other=0.0)
    real = tl.load(real_ptr + offs, mask=mask, other=0.0).to(ACC)
    fake = tl.load(fake_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + offs, real + alpha.to(ACC) * (fake - real), mask=mask)


@triton.jit
def _dragan_kernel(real_ptr, std_ptr, out_ptr, numel, seed_lo, seed_hi, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    noise = _philox_uniform(seed_lo, seed_hi, offs).to(out_ptr.dtype.element_ty).to(ACC)
    std = tl.load(std_ptr).to(ACC)
    real = tl.load(real_ptr + offs, mask=mask, other=0.0).to(ACC)
    perturbed = tl.minimum(tl.maximum(real + std * (noise - 0.5), 0.0), 1.0)
    tl.store(out_ptr + offs, perturbed, mask=mask)


@triton.jit
def _penalty_kernel(
    grad_ptr, sq_ptr, penalty_ptr, per_sample, batch, center, eps,
    SQUARED_NORM: tl.constexpr, ONE_SIDED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    sample = tl.program_id(0)
    base = grad_ptr + sample.to(tl.int64) * per_sample
    total = tl.zeros([BLOCK], dtype=ACC)
    for i0 in range(0, per_sample, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        g = tl.load(base + offs, mask=offs < per_sample, other=0.0).to(ACC)
        total += g * g
    sq = tl.sum(total, axis=0)
    tl.store(sq_ptr + sample, sq)
    if SQUARED_NORM:
        term = 0.5 * sq
    else:
        gap = tl.sqrt(eps + sq) - center
        if ONE_SIDED:
            gap = tl.maximum(gap, 0.0)
        term = gap * gap
    tl.atomic_add(penalty_ptr, term / batch)


def _acc(dtype: torch.dtype):
    return (tl.float64, torch.float64) if dtype == torch.float64 else (tl.float32, torch.float32)


def _seed_words(seed: int) -> Tuple[int, int]:
    return seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF


def gp_interpolate(real: torch.Tensor, fake: torch.Tensor, alpha: Optional[torch.Tensor], seed: int):
    out = torch.empty_like(real)
    batch = real.shape[0]
    alpha_out = torch.empty(batch, dtype=real.dtype, device=real.device) if alpha is None else alpha.to(real.dtype, copy=True)
    seed_lo, seed_hi = _seed_words(seed)
    acc, _ = _acc(real.dtype)
    _interpolate_kernel[(triton.cdiv(real.numel(), _BLOCK),)](
        real, fake, alpha_out, out, alpha_out, real.numel(), real.numel() // batch, seed_lo, seed_hi,
        RANDOM=alpha is None, ACC=acc, BLOCK=_BLOCK,
    )
    return out, alpha_out


def dragan_perturb(real: torch.Tensor, seed: int) -> torch.Tensor:
    out = torch.empty_like(real)
    seed_lo, seed_hi = _seed_words(seed)
    acc, _ = _acc(real.dtype)
    _dragan_kernel[(triton.cdiv(real.numel(), _BLOCK),)](
        real, real.std(), out, real.numel(), seed_lo, seed_hi, ACC=acc, BLOCK=_BLOCK
    )
    return out


def gp_penalty(grad: torch.Tensor, squared_norm: bool, center: float, eps: float, one_sided: bool):
    batch = grad.shape[0]
    acc, acc_dtype = _acc(grad.dtype)
    sq = torch.empty(batch, dtype=acc_dtype, device=grad.device)
    penalty = torch.zeros((), dtype=acc_dtype, device=grad.device)
    block = min(_BLOCK, triton.next_power_of_2(max(grad.numel() // batch, 16)))
    _penalty_kernel[(batch,)](
        grad, sq, penalty, grad.numel() // batch, batch, center, eps,
        SQUARED_NORM=squared_norm, ONE_SIDED=one_sided, ACC=acc, BLOCK=block,
    )
    return penalty.to(grad.dtype), sq
