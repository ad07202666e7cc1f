"""Newton–Schulz matrix square root for FID in Triton: matmuls with the iteration fused in.

What it computes: tr sqrt(Σ1 Σ2) by the coupled Newton–Schulz iteration of
``fastgan/reference/frechet.py`` on A = Σ1 Σ2 / ‖Σ1 Σ2‖_F:

    T = 1.5 I − 0.5 Z Y          one matmul whose epilogue scales and adds the identity
    Y ← Y T,  Z ← T Z            both products in ONE launch (grid axis 2 picks the pair)

so an iteration is two launches and no host synchronisation; the residual
‖Y² − A‖_F / ‖A‖_F is checked by the caller once per chunk of iterations.

Bytes and flops: each iteration does three d×d×d products (6d³ flops, 3·3·d²·4 bytes
of operands per pass through L2); at d = 2048 that is 51 GFLOP per iteration in
IEEE arithmetic (``input_precision="ieee"``; TF32 would break FID's 1e-3 accuracy),
in float64 by default (see fastgan/ops/frechet.py for why).
Block sizes are fixed, not autotuned. The launchers run on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

from typing import Dict, FrozenSet, Iterator, Tuple

import torch
import triton
import triton.language as tl

from fastgan.kernels import device_guard, int_forms, triton_dtype


@triton.jit
def _matmul_epilogue_kernel(
    a0_ptr, b0_ptr, c0_ptr, a1_ptr, b1_ptr, c1_ptr, n, alpha: tl.float64, beta: tl.float64,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C = alpha · A B + beta · I for n×n row-major matrices; program_id(2) picks (A0, B0, C0) or (A1, B1, C1).
    alpha and beta arrive as float64 (unannotated, a Python float is passed as float32) and are
    used in the accumulator's dtype."""
    alpha, beta = tl.cast(alpha, ACC), tl.cast(beta, ACC)
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if tl.program_id(2) == 0:
        a_ptr, b_ptr, c_ptr = a0_ptr, b0_ptr, c0_ptr
    else:
        a_ptr, b_ptr, c_ptr = a1_ptr, b1_ptr, c1_ptr
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
    for k0 in range(0, n, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None] * n + ks[None, :], mask=(rows[:, None] < n) & (ks[None, :] < n), other=0.0)
        b = tl.load(b_ptr + ks[:, None] * n + cols[None, :], mask=(ks[:, None] < n) & (cols[None, :] < n), other=0.0)
        # out_dtype named: Triton 3.6 takes float32 for it whatever acc is, and refuses a float64 acc
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)
    out = alpha * acc + tl.where(rows[:, None] == cols[None, :], beta, 0.0)
    tl.store(c_ptr + rows[:, None] * n + cols[None, :], out, mask=(rows[:, None] < n) & (cols[None, :] < n))


def _blocks(device: torch.device) -> Tuple[int, int, int]:
    return (32, 32, 32) if device.type == "cpu" else (64, 64, 32)


def _dense_aligned(x: torch.Tensor) -> bool:
    return x.is_contiguous() and x.data_ptr() % 16 == 0


def matmul(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0, beta: float = 0.0, out: torch.Tensor = None) -> torch.Tensor:
    """alpha · a @ b + beta · I for square float32 or float64 matrices, of any layout."""
    # The kernel reads and writes row-major matrices (a transposed view would read as its
    # transpose), and is compiled for 16-byte aligned ones only: float64 tiles at unaligned
    # addresses spill (Triton 3.8, sm_90). A copy is n² next to the product's n³.
    a, b = (x if _dense_aligned(x) else x.contiguous().clone() for x in (a, b))
    result = out if out is not None and _dense_aligned(out) else torch.empty_like(a)
    _launch((a, b, result), (a, b, result), alpha, beta, pairs=1)
    if out is not None and out is not result:
        out.copy_(result)
        return out
    return result


MAX_N = 46340  # the kernel's offsets row * n + column are 32-bit: n * n < 2**31


def _launch(first, second, alpha, beta, pairs):
    n = first[0].shape[0]
    if n > MAX_N:
        raise ValueError(f"frechet: {n} x {n} matrices have over 2**31 elements; the Triton kernel indexes them with 32 bits")
    bm, bn, bk = _blocks(first[0].device)
    acc = tl.float64 if first[0].dtype == torch.float64 else tl.float32
    grid = (triton.cdiv(n, bm), triton.cdiv(n, bn), pairs)
    with device_guard(first[0]):
        # floats whatever the caller passed: an int alpha of 1 would be a kernel of its own
        _matmul_epilogue_kernel[grid](*first, *second, n, float(alpha), float(beta), ACC=acc, BLOCK_M=bm, BLOCK_N=bn,
                                      BLOCK_K=bk)


def gpu_specializations() -> Iterator[Tuple[object, Dict[str, str], Dict[str, object], int, FrozenSet[str]]]:
    """Every (kernel, signature, constexprs, num_warps, arguments divisible by 16) the launchers
    above can emit on a GPU, for the Hopper compile check: float32 and float64, and each form
    Triton gives n (:func:`fastgan.kernels.int_forms`); the matrices are always 16-byte aligned."""
    bm, bn, bk = _blocks(torch.device("cuda"))
    pointers = ("a0_ptr", "b0_ptr", "c0_ptr", "a1_ptr", "b1_ptr", "c1_ptr")
    for dtype in (torch.float32, torch.float64):
        t = triton_dtype(dtype).name
        for kind, value, divisible in int_forms(1, MAX_N):
            signature = {name: f"*{t}" for name in pointers}
            signature.update(n=kind, alpha="fp64", beta="fp64", ACC="constexpr", BLOCK_M="constexpr",
                             BLOCK_N="constexpr", BLOCK_K="constexpr")
            constexprs = dict(ACC=triton_dtype(dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
            if value is not None:
                constexprs["n"] = value
            yield _matmul_epilogue_kernel, signature, constexprs, 4, frozenset(pointers) | ({"n"} if divisible else set())


def newton_schulz_steps(y: torch.Tensor, z: torch.Tensor, iterations: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``iterations`` coupled steps from (Y, Z): two launches each, no host synchronisation.
    The inputs are left untouched (the buffers below are swapped between steps)."""
    y, z = y.contiguous().clone(), z.contiguous().clone()
    t, y_next, z_next = torch.empty_like(y), torch.empty_like(y), torch.empty_like(z)
    for _ in range(iterations):
        matmul(z, y, alpha=-0.5, beta=1.5, out=t)
        _launch((y, t, y_next), (t, z, z_next), 1.0, 0.0, pairs=2)
        y, y_next = y_next, y
        z, z_next = z_next, z
    return y, z
