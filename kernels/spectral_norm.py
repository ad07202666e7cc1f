"""Spectral-norm power iteration in Triton: one layer, or every layer of a model in one launch.

What it computes (the schedule of ``csrc/spectral_norm.h``, shared by every backend):
a weight W is read in place as the matrix W_mat (M x K) with rows along ``dim`` --
the contiguous tensor viewed as (A, M, B), W_mat[m, a*B + b] = W[a, m, b]. A *row
pass* reads each row once and computes

    DOT:    t[m]  = W_mat[m, :] . x                (x = v)
    ACCUM:  s[k] += W_mat[m, k] * y[m]             (y = t after DOT, else y = u)

so one pass yields both W v and W^T (W v). A *finalize* per layer turns t and s
into u = t/max(|t|, eps), v = (W^T u)/max(|W^T u|, eps) and sigma = u^T W v
(|W^T u|, or |W v| for the hook order, or u . t in eval mode).

Bytes moved: each pass reads W once (the ACCUM half re-reads the same rows from
L1/L2), plus O(M + K) for the vectors. One power iteration of the parametrization
is one pass; the hook order needs one extra pass at the start. The SNDCGAN
discriminator (23 MB of fp32 weights) therefore needs ~23 MB of DRAM reads per
refresh, versus ~46 MB (two matrix-vector products) for torch.

Kernels: ``_row_pass_kernel`` / ``_finalize_kernel`` take one layer's pointers;
``_row_pass_multi_kernel`` / ``_finalize_multi_kernel`` read per-layer pointers and
shapes from a device table, so all layers of a model share one launch per step.
Both pairs use the same ``@triton.jit`` block routines. The launchers below work on
CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.

Block sizes are fixed, not autotuned; sums of W^T y use atomics, so results may
differ in the last bits from run to run on a GPU.
"""
from __future__ import annotations

from typing import Iterator, List, Sequence, Tuple

import torch
import triton
import triton.language as tl

# Finalize kinds, as in csrc/spectral_norm.h.
FINALIZE_UV, FINALIZE_V, FINALIZE_U, FINALIZE_EVAL = 0, 1, 2, 3
_META_COLUMNS = 6  # weight pointer, A, M, B, row offset, column offset


@triton.jit
def _load_rows(w_ptr, a, M, B, b0, offs_m, mask_m, ACC: tl.constexpr, BLOCK_B: tl.constexpr):
    """The (BLOCK_M, BLOCK_B) tile of W_mat rows offs_m, columns a*B + b0 ..., as ACC."""
    offs_b = b0 + tl.arange(0, BLOCK_B)
    mask_b = offs_b < B
    w = tl.load(
        w_ptr + a * M * B + offs_m[:, None] * B + offs_b[None, :],
        mask=mask_m[:, None] & mask_b[None, :], other=0.0,
    ).to(ACC)
    return w, offs_b, mask_b


@triton.jit
def _row_pass_block(
    w_ptr, A, M, B, row_off, col_off, m0,
    x_ptr, y_ptr, t_ptr, s_ptr,
    DOT: tl.constexpr, ACCUM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    if DOT:
        t = tl.zeros([BLOCK_M], dtype=ACC)
        for a in range(0, A):
            for b0 in range(0, B, BLOCK_B):
                w, offs_b, mask_b = _load_rows(w_ptr, a, M, B, b0, offs_m, mask_m, ACC, BLOCK_B)
                x = tl.load(x_ptr + col_off + a * B + offs_b, mask=mask_b, other=0.0).to(ACC)
                t += tl.sum(w * x[None, :], axis=1)
        tl.store(t_ptr + row_off + offs_m, t, mask=mask_m)
        y = t
    else:
        y = tl.load(y_ptr + row_off + offs_m, mask=mask_m, other=0.0).to(ACC)
    if ACCUM:
        for a in range(0, A):
            for b0 in range(0, B, BLOCK_B):
                w, offs_b, mask_b = _load_rows(w_ptr, a, M, B, b0, offs_m, mask_m, ACC, BLOCK_B)
                tl.atomic_add(s_ptr + col_off + a * B + offs_b, tl.sum(w * y[:, None], axis=0), mask=mask_b)


@triton.jit
def _squared_norm(ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.zeros([BLOCK], dtype=ACC)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        x = tl.load(ptr + offs, mask=offs < n, other=0.0).to(ACC)
        total += x * x
    return tl.sum(total, axis=0)


@triton.jit
def _finalize_layer(
    M, K, row_off, col_off, layer, eps,
    t_ptr, s_ptr, u_ptr, v_ptr, sigma_ptr,
    KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    t_ptr += row_off
    u_ptr += row_off
    s_ptr += col_off
    v_ptr += col_off
    if KIND == 3:  # eval: sigma = u . (W v)
        total = tl.zeros([BLOCK], dtype=ACC)
        for i0 in range(0, M, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            mask = offs < M
            total += tl.load(u_ptr + offs, mask=mask, other=0.0).to(ACC) * tl.load(t_ptr + offs, mask=mask, other=0.0)
        tl.store(sigma_ptr + layer, tl.sum(total, axis=0))
    else:
        scale = 1.0  # turns s into W^T u
        if KIND != 1:
            t_sq = _squared_norm(t_ptr, M, ACC, BLOCK)
            t_norm = tl.maximum(tl.sqrt(t_sq), eps)
            for i0 in range(0, M, BLOCK):
                offs = i0 + tl.arange(0, BLOCK)
                mask = offs < M
                tl.store(u_ptr + offs, tl.load(t_ptr + offs, mask=mask, other=0.0) / t_norm, mask=mask)
            scale = 1.0 / t_norm
            if KIND == 2:
                tl.store(sigma_ptr + layer, t_sq / t_norm)
        if KIND != 2:
            r_exact = tl.sqrt(_squared_norm(s_ptr, K, ACC, BLOCK)) * scale
            r_norm = tl.maximum(r_exact, eps)
            for i0 in range(0, K, BLOCK):
                offs = i0 + tl.arange(0, BLOCK)
                mask = offs < K
                tl.store(v_ptr + offs, tl.load(s_ptr + offs, mask=mask, other=0.0) * (scale / r_norm), mask=mask)
            tl.store(sigma_ptr + layer, r_exact * r_exact / r_norm)


@triton.jit
def _row_pass_kernel(
    w_ptr, A, M, B, x_ptr, y_ptr, t_ptr, s_ptr,
    DOT: tl.constexpr, ACCUM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    _row_pass_block(w_ptr, A, M, B, 0, 0, m0, x_ptr, y_ptr, t_ptr, s_ptr, DOT, ACCUM, ACC, BLOCK_M, BLOCK_B)


@triton.jit
def _finalize_kernel(
    M, K, eps, t_ptr, s_ptr, u_ptr, v_ptr, sigma_ptr, KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    _finalize_layer(M, K, 0, 0, 0, eps, t_ptr, s_ptr, u_ptr, v_ptr, sigma_ptr, KIND, ACC, BLOCK)


@triton.jit
def _row_pass_multi_kernel(
    meta_ptr, blocks_ptr, w_typed_ptr, x_ptr, y_ptr, t_ptr, s_ptr,
    DOT: tl.constexpr, ACCUM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    layer = tl.load(blocks_ptr + 2 * pid)
    m0 = tl.load(blocks_ptr + 2 * pid + 1)
    row = meta_ptr + layer * 6
    w_ptr = tl.load(row).to(w_typed_ptr.dtype)
    A = tl.load(row + 1)
    M = tl.load(row + 2)
    B = tl.load(row + 3)
    _row_pass_block(
        w_ptr, A, M, B, tl.load(row + 4), tl.load(row + 5), m0,
        x_ptr, y_ptr, t_ptr, s_ptr, DOT, ACCUM, ACC, BLOCK_M, BLOCK_B,
    )


@triton.jit
def _finalize_multi_kernel(
    meta_ptr, eps, t_ptr, s_ptr, u_ptr, v_ptr, sigma_ptr, KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr
):
    layer = tl.program_id(0)
    row = meta_ptr + layer * 6
    M = tl.load(row + 2)
    K = tl.load(row + 1) * tl.load(row + 3)
    _finalize_layer(M, K, tl.load(row + 4), tl.load(row + 5), layer, eps, t_ptr, s_ptr, u_ptr, v_ptr, sigma_ptr, KIND, ACC, BLOCK)


def schedule(n_power_iterations: int, u_first: bool) -> Iterator[Tuple[bool, bool, int]]:
    """The (DOT, ACCUM, finalize kind) steps of one refresh, as in csrc/spectral_norm.h."""
    if n_power_iterations == 0:
        yield True, False, FINALIZE_EVAL
    elif u_first:
        for _ in range(n_power_iterations):
            yield True, True, FINALIZE_UV
    else:
        yield False, True, FINALIZE_V
        for i in range(n_power_iterations):
            last = i + 1 == n_power_iterations
            yield True, not last, FINALIZE_U if last else FINALIZE_UV


def _view3(weight: torch.Tensor, dim: int) -> Tuple[int, int, int]:
    shape = weight.shape
    return shape[:dim].numel(), shape[dim], shape[dim + 1:].numel()


def _launch_config(weight: torch.Tensor, max_b: int):
    """(accumulator dtype, BLOCK_M, BLOCK_B, finalize BLOCK). The interpreter favours
    big blocks (fewer Python steps); a GPU favours many small row blocks."""
    acc = tl.float64 if weight.dtype == torch.float64 else tl.float32
    interpreted = weight.device.type == "cpu"
    block_m = 32 if interpreted else 8
    block_b = min(128 if interpreted else 256, triton.next_power_of_2(max_b))
    return acc, block_m, max(block_b, 16), 1024


def _scratch_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


def power_iteration(
    weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int, n_power_iterations: int, eps: float, u_first: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer; returns (u, v, sigma) like ``fastgan.reference.spectral_norm.power_iteration``."""
    A, M, B = _view3(weight, dim)
    acc, block_m, block_b, block = _launch_config(weight, B)
    u_out, v_out = u.clone(), v.clone()
    t = torch.empty(M, dtype=_scratch_dtype(weight), device=weight.device)
    sigma = torch.empty((), dtype=weight.dtype, device=weight.device)
    for dot, accum, kind in schedule(n_power_iterations, u_first):
        s = torch.zeros(A * B if accum else 1, dtype=t.dtype, device=weight.device)
        _row_pass_kernel[(triton.cdiv(M, block_m),)](
            weight, A, M, B, v_out, u_out, t, s, DOT=dot, ACCUM=accum, ACC=acc, BLOCK_M=block_m, BLOCK_B=block_b
        )
        _finalize_kernel[(1,)](M, A * B, eps, t, s, u_out, v_out, sigma, KIND=kind, ACC=acc, BLOCK=block)
    return u_out, v_out, sigma


def power_iteration_multi(
    weights: Sequence[torch.Tensor],
    us: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    dims: Sequence[int],
    n_power_iterations: int,
    eps: float,
    u_first: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All layers at once; returns (cat of u's, cat of v's, sigma per layer)."""
    first = weights[0]
    views = [_view3(w, d) for w, d in zip(weights, dims)]
    acc, block_m, block_b, block = _launch_config(first, max(b for _, _, b in views))
    meta: List[int] = []
    blocks: List[int] = []
    rows = cols = 0
    for layer, (w, (A, M, B)) in enumerate(zip(weights, views)):
        meta += [w.data_ptr(), A, M, B, rows, cols]
        for m0 in range(0, M, block_m):
            blocks += [layer, m0]
        rows += M
        cols += A * B
    table = torch.tensor(meta + blocks, dtype=torch.int64).to(first.device, non_blocking=True)
    meta_t, blocks_t = table[: len(meta)], table[len(meta):]
    u_out, v_out = torch.cat(list(us)), torch.cat(list(vs))
    t = torch.empty(rows, dtype=_scratch_dtype(first), device=first.device)
    sigma = torch.empty(len(weights), dtype=first.dtype, device=first.device)
    for dot, accum, kind in schedule(n_power_iterations, u_first):
        s = torch.zeros(cols if accum else 1, dtype=t.dtype, device=first.device)
        _row_pass_multi_kernel[(len(blocks) // 2,)](
            meta_t, blocks_t, first, v_out, u_out, t, s,
            DOT=dot, ACCUM=accum, ACC=acc, BLOCK_M=block_m, BLOCK_B=block_b,
        )
        _finalize_multi_kernel[(len(weights),)](meta_t, eps, t, s, u_out, v_out, sigma, KIND=kind, ACC=acc, BLOCK=block)
    return u_out, v_out, sigma
