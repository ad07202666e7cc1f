"""Gradient-penalty kernels in Triton: interpolation, DRAGAN perturbation, fused penalty.

What they compute (conventions: ``fastgan/reference/gradient_penalty.py``):

* interpolation  x̂ = real + α_b (fake − real). One program per (sample, chunk): α_b is
  drawn (Philox) or loaded once per program, so no element pays for a random draw or
  a division by the sample size. Reads real and fake once, writes x̂ once.
* DRAGAN         x̂ = clip(real + std·(U_i − ½), 0, 1); one Philox evaluation gives the
  uniforms of four consecutive elements. std (biased) is one torch reduction
  beforehand, kept on the device (no sync); reads real once more, writes x̂ once,
  and never materialises the noise tensor.
* penalty        one program per sample writes sq_b = Σ g² (reads the gradient once);
  a one-program second pass adds the batch's terms (½ sq_b or (sqrt(eps + sq_b) −
  center)², optionally one-sided) in sample order. No atomics: bit-reproducible.

Loads are converted to the accumulator type (float32, float64 for float64) before
any arithmetic: half and bfloat16 inputs compute in float32 (the interpreter's own
bfloat16 arithmetic is not IEEE). Inputs are dense with the samples outermost in
memory (contiguous or channels-last, see fastgan/ops/gradient_penalty.py); the
kernels walk them linearly. Random numbers: fastgan's Philox stream
(``tl.randint4x``), the same on every backend. Launch configurations are the tables
below, read by the launchers and by the Hopper compile check. The launchers run on
CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Dict, FrozenSet, Iterator, Optional, Tuple

import torch
import triton
import triton.language as tl

from fastgan.kernels import device_guard, int_forms, triton_dtype


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block: int           # elements per program of the elementwise kernels (a multiple of 4)
    block_sq_max: int    # widest tile of the per-sample sum; the launcher uses min(this, next_pow2(sample)) >= 16
    block_batch: int     # tile of the batch reduction
    max_chunks: int      # programs per sample along grid axis 1 (CUDA's limit is 65535)
    num_warps: int


GPU = LaunchConfig(block=1024, block_sq_max=2048, block_batch=1024, max_chunks=65535, num_warps=4)
INTERPRETER = LaunchConfig(block=1024, block_sq_max=1024, block_batch=1024, max_chunks=65535, num_warps=4)
MIN_BLOCK_SQ = 16
# Counters are 32 bits: past 2**34 elements the DRAGAN noise would repeat (csrc/philox.h's
# kMaxPhiloxDraws, which the C++ backends check too).
MAX_DRAWS = 2**34
IMAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _uniform(word):
    """A Philox output word as a uniform in [0, 1): its top 24 bits, exact in float32."""
    return (word.to(tl.uint32, bitcast=True) >> 8).to(tl.float32) * (1.0 / 16777216.0)


# The seed is not specialized: Triton would make a seed of 1 a constant and mark one divisible
# by 16 -- kernels of their own, compiled anew at a launch, that no code here benefits from.
@triton.jit(do_not_specialize=["seed"])
def _interpolate_kernel(
    real_ptr, fake_ptr, alpha_ptr, out_ptr, alpha_out_ptr, per_sample, seed,
    RANDOM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    sample = tl.program_id(0)
    if RANDOM:
        w0, w1, w2, w3 = tl.randint4x(seed, (sample // 4).to(tl.uint32))
        j = sample % 4
        alpha = _uniform(tl.where(j == 0, w0, tl.where(j == 1, w1, tl.where(j == 2, w2, w3))))
        alpha = alpha.to(alpha_out_ptr.dtype.element_ty)
        if tl.program_id(1) == 0:
            tl.store(alpha_out_ptr + sample, alpha)
    else:
        alpha = tl.load(alpha_ptr + sample)
    alpha = alpha.to(ACC)
    base = sample.to(tl.int64) * per_sample
    # A 64-bit counter: in 32 bits, a sample near 2**31 elements made i0 + the grid's stride wrap
    # negative, which passed the mask and addressed memory before the sample.
    for i0 in range(tl.program_id(1).to(tl.int64) * BLOCK, per_sample, tl.num_programs(1).to(tl.int64) * BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        mask = offs < per_sample
        real = tl.load(real_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        fake = tl.load(fake_ptr + base + offs, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + base + offs, real + alpha * (fake - real), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _dragan_kernel(real_ptr, std_ptr, out_ptr, numel, seed, ACC: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < numel
    counters = (start // 4).to(tl.uint32) + tl.arange(0, BLOCK // 4).to(tl.uint32)
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    # Element 4c + j takes word j of counter c.
    words = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    noise = _uniform(words).to(out_ptr.dtype.element_ty).to(ACC)  # rounded to real's dtype, as the reference
    std = tl.load(std_ptr).to(ACC)
    real = tl.load(real_ptr + offs, mask=mask, other=0.0).to(ACC)
    perturbed = real + std * (noise - 0.5)
    # Comparisons, not min/max, so that NaN passes through as torch.clamp lets it.
    perturbed = tl.where(perturbed < 0.0, 0.0, tl.where(perturbed > 1.0, 1.0, perturbed))
    tl.store(out_ptr + offs, perturbed, mask=mask)


@triton.jit
def _squared_norm_kernel(grad_ptr, sq_ptr, per_sample, ACC: tl.constexpr, BLOCK: tl.constexpr):
    sample = tl.program_id(0)
    base = grad_ptr + sample.to(tl.int64) * per_sample
    total = tl.zeros([BLOCK], dtype=ACC)
    # Counted in blocks, offsets in 64 bits: i0 + BLOCK in 32 bits wraps negative for a sample within
    # BLOCK of 2**31 elements (the mask then passes it, and the loop never ends).
    for block in range(0, tl.cdiv(per_sample, BLOCK)):
        i0 = tl.cast(block, tl.int64) * BLOCK
        offs = tl.arange(0, BLOCK)
        g = tl.load(base + i0 + offs, mask=offs < per_sample - i0, other=0.0).to(ACC)
        total += g * g
    tl.store(sq_ptr + sample, tl.sum(total, axis=0))


@triton.jit
def _penalty_kernel(
    sq_ptr, penalty_ptr, batch, center: tl.float64, eps: tl.float64,
    SQUARED_NORM: tl.constexpr, ONE_SIDED: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: the mean over the batch of each sample's term, in a fixed order. ``center``
    and ``eps`` arrive as float64 (a Python float is passed as float32 unless annotated, which
    cost a float64 penalty with center 0.3 seven digits) and are used in the accumulator's dtype."""
    center, eps = tl.cast(center, ACC), tl.cast(eps, ACC)
    total = tl.zeros([BLOCK], dtype=ACC)
    for i0 in range(0, batch, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        mask = offs < batch
        sq = tl.load(sq_ptr + offs, mask=mask, other=0.0)
        if SQUARED_NORM:
            term = sq
        else:
            gap = tl.sqrt(eps + sq) - center
            if ONE_SIDED:
                gap = tl.where(gap < 0.0, 0.0, gap)  # clamp(min=0); NaN stays NaN
            term = gap * gap
        total += tl.where(mask, term, 0.0)
    mean = tl.sum(total, axis=0) / batch
    if SQUARED_NORM:
        mean = 0.5 * mean
    tl.store(penalty_ptr, mean)


def config_for(device: torch.device) -> LaunchConfig:
    return INTERPRETER if device.type == "cpu" else GPU


def block_sq_for(config: LaunchConfig, per_sample: int) -> int:
    return max(MIN_BLOCK_SQ, min(config.block_sq_max, triton.next_power_of_2(per_sample)))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def gp_interpolate(real: torch.Tensor, fake: torch.Tensor, alpha: Optional[torch.Tensor], seed: int):
    config = config_for(real.device)
    batch = real.shape[0]
    per_sample = real.numel() // batch
    with device_guard(real):
        out = torch.empty_like(real)
        alpha_out = torch.empty(batch, dtype=real.dtype, device=real.device) if alpha is None else alpha.to(real.dtype, copy=True)
        chunks = max(1, min(config.max_chunks, triton.cdiv(per_sample, config.block)))
        _interpolate_kernel[(batch, chunks)](
            real, fake, alpha_out, out, alpha_out, per_sample, seed,
            RANDOM=alpha is None, ACC=triton_dtype(_acc(real.dtype)), BLOCK=config.block, num_warps=config.num_warps,
        )
    return out, alpha_out


def dragan_perturb(real: torch.Tensor, seed: int) -> torch.Tensor:
    if real.numel() > MAX_DRAWS:
        raise ValueError(f"dragan_perturb: at most 2**34 elements are supported (four uniforms per 32-bit Philox "
                         f"counter), got {real.numel()}")
    config = config_for(real.device)
    with device_guard(real):
        out = torch.empty_like(real)
        _dragan_kernel[(triton.cdiv(real.numel(), config.block),)](
            real, real.std(correction=0), out, real.numel(), seed,
            ACC=triton_dtype(_acc(real.dtype)), BLOCK=config.block, num_warps=config.num_warps,
        )
    return out


def gp_penalty(grad: torch.Tensor, squared_norm: bool, center: float, eps: float, one_sided: bool):
    config = config_for(grad.device)
    batch = grad.shape[0]
    per_sample = grad.numel() // batch
    acc = triton_dtype(_acc(grad.dtype))
    with device_guard(grad):
        sq = torch.empty(batch, dtype=_acc(grad.dtype), device=grad.device)
        penalty = torch.empty((), dtype=grad.dtype, device=grad.device)
        _squared_norm_kernel[(batch,)](
            grad, sq, per_sample, ACC=acc, BLOCK=block_sq_for(config, per_sample), num_warps=config.num_warps
        )
        _penalty_kernel[(1,)](
            # floats whatever the caller passed: an int center of 1 would be a kernel of its own
            sq, penalty, batch, float(center), float(eps),
            SQUARED_NORM=squared_norm, ONE_SIDED=one_sided, ACC=acc, BLOCK=config.block_batch, num_warps=config.num_warps,
        )
    return penalty, sq


def gpu_specializations() -> Iterator[Tuple[object, Dict[str, str], Dict[str, object], int, FrozenSet[str]]]:
    """Every (kernel, signature, constexprs, num_warps, arguments divisible by 16) the launchers
    above can emit on a GPU, derived from :data:`GPU` and :func:`block_sq_for` (for the Hopper
    compile check): each dtype, and each form Triton gives the sizes (:func:`int_forms`) and the
    seed. Inputs may be views at any offset (unaligned, each independently); the buffers
    allocated here are aligned."""
    largest = 2**63 - 1
    batches = int_forms(1, 2**31 - 1)  # one program per sample on grid axis 0
    seeds = int_forms(0, largest, specialize=False)
    sizes = int_forms(0, largest)
    for dtype in IMAGE_DTYPES:
        x, a = triton_dtype(dtype).name, triton_dtype(_acc(dtype)).name
        acc = triton_dtype(_acc(dtype))
        # alpha_ptr is the launcher's alpha_out, in real's dtype, whichever alpha was given
        signature = {
            "real_ptr": f"*{x}", "fake_ptr": f"*{x}", "alpha_ptr": f"*{x}", "out_ptr": f"*{x}", "alpha_out_ptr": f"*{x}",
            "per_sample": None, "seed": None, "RANDOM": "constexpr", "ACC": "constexpr", "BLOCK": "constexpr",
        }
        for random in (True, False):
            for inputs in _alignments(("real_ptr", "fake_ptr")):
                yield from _with_ints(_interpolate_kernel, signature, dict(RANDOM=random, ACC=acc, BLOCK=GPU.block),
                                      inputs | {"alpha_ptr", "out_ptr", "alpha_out_ptr"}, per_sample=sizes, seed=seeds)
        signature = {"real_ptr": f"*{x}", "std_ptr": f"*{x}", "out_ptr": f"*{x}", "numel": None, "seed": None,
                     "ACC": "constexpr", "BLOCK": "constexpr"}
        for inputs in _alignments(("real_ptr",)):
            yield from _with_ints(_dragan_kernel, signature, dict(ACC=acc, BLOCK=GPU.block),
                                  inputs | {"std_ptr", "out_ptr"}, numel=sizes, seed=seeds)
        signature = {"grad_ptr": f"*{x}", "sq_ptr": f"*{a}", "per_sample": None, "ACC": "constexpr", "BLOCK": "constexpr"}
        for block, per_sample in _blocks_sq():
            for inputs in _alignments(("grad_ptr",)):
                yield from _with_ints(_squared_norm_kernel, signature, dict(ACC=acc, BLOCK=block), inputs | {"sq_ptr"},
                                      per_sample=per_sample)
        signature = {"sq_ptr": f"*{a}", "penalty_ptr": f"*{x}", "batch": None, "center": "fp64", "eps": "fp64",
                     "SQUARED_NORM": "constexpr", "ONE_SIDED": "constexpr", "ACC": "constexpr", "BLOCK": "constexpr"}
        for squared_norm, one_sided in ((True, False), (False, False), (False, True)):
            yield from _with_ints(_penalty_kernel, signature,
                                  dict(SQUARED_NORM=squared_norm, ONE_SIDED=one_sided, ACC=acc, BLOCK=GPU.block_batch),
                                  {"sq_ptr", "penalty_ptr"}, batch=batches)


def _alignments(inputs):
    """Each subset of ``inputs`` as the 16-byte aligned ones."""
    return [frozenset(c) for r in range(len(inputs) + 1) for c in itertools.combinations(inputs, r)]


def _blocks_sq():
    """(BLOCK, forms of per_sample) of the per-sample sum: the sample sizes each tile of
    :func:`block_sq_for` is launched for."""
    for i in range(MIN_BLOCK_SQ.bit_length() - 1, GPU.block_sq_max.bit_length()):
        block = 1 << i
        low = 0 if block == MIN_BLOCK_SQ else block // 2 + 1
        high = block if block < GPU.block_sq_max else 2**63 - 1
        assert block_sq_for(GPU, low) == block_sq_for(GPU, high) == block
        yield block, int_forms(low, high)


def _with_ints(kernel, signature, constexprs, divisible, **ints):
    """The specializations of ``kernel`` over every combination of the forms of its int arguments."""
    for combination in itertools.product(*ints.values()):
        sig, const, div = dict(signature), dict(constexprs), set(divisible)
        for name, (kind, value, divisible_by_16) in zip(ints, combination):
            sig[name] = kind
            if value is not None:
                const[name] = value
            if divisible_by_16:
                div.add(name)
        yield kernel, sig, const, GPU.num_warps, frozenset(div)
