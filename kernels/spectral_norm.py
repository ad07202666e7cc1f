"""Spectral-norm power iteration in Triton: every layer of a model (or one layer) per launch.

What it computes (the schedule of ``csrc/spectral_norm.h``, shared by every backend):
a weight W is read in place as the matrix W_mat (M x K) with rows along ``dim`` --
the contiguous tensor viewed as (A, M, B), W_mat[m, a*B + b] = W[a, m, b]. A *row
pass* reads each row once and computes

    DOT:    t[m]  = W_mat[m, :] . x                (x = v)
    ACCUM:  s[k]  = sum_m W_mat[m, k] * y[m]       (y = t after DOT, else y = u)

so one pass yields both W v and W^T (W v). W^T y is summed without atomics, in a
fixed order: each row block of BLOCK_M rows writes its partial row
sum_{m in block} W_mat[m, :] y[m] to its own slot, and a *reduce* pass adds a
layer's partial rows in a fixed order (Triton tutorial 05's scheme). So results are
bit-identical from run to run. A *finalize* per layer turns t and s into
u = t/max(|t|, eps), v = (W^T u)/max(|W^T u|, eps) and sigma = u^T W v
(|W^T u|, or |W v| for the hook order, or u . t in eval mode).

Bytes moved per pass: W once (the ACCUM half re-reads the block's rows from L1/L2),
numel/BLOCK_M partial sums written and read once (1/16 of W's bytes in fp32 on a
GPU), plus O(M + K) for the vectors. One power iteration of the parametrization is
one pass; the hook order needs one extra pass at the start.

Per-layer pointers and shapes live in a small int64 device table, built once per
set of weights (keyed by their storage pointers, shapes and strides) and cached:
a call with the same weights does no host->device copy, so it can be captured in a
CUDA graph. The launch configurations are the tables below; the launchers and the
Hopper compile check (``tests/test_hopper_compile.py``) both read them. The
launchers work on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from fastgan.kernels import device_guard, triton_dtype

# Finalize kinds, as in csrc/spectral_norm.h.
FINALIZE_UV, FINALIZE_V, FINALIZE_U, FINALIZE_EVAL = 0, 1, 2, 3
# Device table columns: per layer, then per row block, then per column block.
LAYER_COLS = 8  # weight pointer, A, M, B, row offset, column offset, partial-row offset, row blocks
BLOCK_COLS = 2  # layer, first row (row blocks) or first column (column blocks)


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    block_m: int        # rows per row-pass program
    block_b_max: int    # widest column tile; the launcher uses min(this, next_pow2(max B)) >= 16
    block_k: int        # columns per reduce program
    block_j: int        # partial rows per load of a reduce program
    block_final: int    # vector tile of the finalize programs
    num_warps: int

    def label(self) -> str:
        return (f"block_m {self.block_m}, block_b {self.block_b_max}, block_k {self.block_k}, block_j {self.block_j}, "
                f"block_final {self.block_final}, {self.num_warps} warps")


# The interpreter favours big tiles (fewer Python steps); a GPU favours many programs with
# wide tiles. GPU is the fastest of the last H100 sweep (bench/results/spectral_norm-cuda-2026-11-28.md,
# "triton launch configs": SNDCGAN's D replayed from a CUDA graph, 39.5 µs against 58.9 µs for
# the previous block_m 16, block_b 256, 4 warps): 4 rows a program gives ~470 programs, more
# loads in flight on 132 SMs, and a 4096-wide finalize tile covers the last layer's 8192-long v in two.
GPU = LaunchConfig(block_m=4, block_b_max=1024, block_k=512, block_j=16, block_final=4096, num_warps=8)
INTERPRETER = LaunchConfig(block_m=32, block_b_max=1024, block_k=1024, block_j=4, block_final=1024, num_warps=4)
# What the GPU benchmark times beside GPU on SNDCGAN's discriminator, replayed from a CUDA graph
# (bench/bench_spectral_norm.py, "triton launch configs"), so that GPU stays chosen by measurement:
# the previous default (the baseline of the sweep above), and GPU pushed further the way that
# sweep went -- fewer rows a program, wider column tiles -- and with fewer warps.
# Three, as each costs the benchmark phase a few seconds of compiling on a fresh machine.
GPU_CANDIDATES = (
    LaunchConfig(block_m=16, block_b_max=256, block_k=256, block_j=8, block_final=1024, num_warps=4),
    LaunchConfig(block_m=2, block_b_max=2048, block_k=512, block_j=16, block_final=4096, num_warps=8),
    LaunchConfig(block_m=4, block_b_max=1024, block_k=512, block_j=16, block_final=4096, num_warps=4),
)
MIN_BLOCK_B = 16
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _row_pass_kernel(
    meta_ptr, blocks_ptr, w_typed_ptr, x_ptr, y_ptr, t_ptr, part_ptr,
    DOT: tl.constexpr, ACCUM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """One row block: t = W_mat[rows] x (DOT) and this block's partial row of W_mat^T y (ACCUM)."""
    pid = tl.program_id(0)
    layer = tl.load(blocks_ptr + 2 * pid)
    m0 = tl.load(blocks_ptr + 2 * pid + 1)
    row = meta_ptr + layer * 8
    w_ptr = tl.load(row).to(w_typed_ptr.dtype)
    # 32-bit sizes and offsets (a weight has < 2^31 elements, see _table): 64-bit ones
    # cost registers, and ptxas spilled them in some tile shapes.
    A = tl.load(row + 1).to(tl.int32)
    M = tl.load(row + 2).to(tl.int32)
    B = tl.load(row + 3).to(tl.int32)
    row_off = tl.load(row + 4)
    col_off = tl.load(row + 5)
    m0 = m0.to(tl.int32)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # The (BLOCK_M, BLOCK_B) tile of W_mat rows offs_m, columns a*B + b0 + [0, BLOCK_B) is
    # w_ptr + a*M*B + offs_m*B + b0 + [0, BLOCK_B): loaded as ACC in both loops below (written
    # out twice: a @triton.jit helper costs the interpreter a re-patch per call).
    if DOT:
        t = tl.zeros([BLOCK_M], dtype=ACC)
        for a in range(0, A):
            for b0 in range(0, B, BLOCK_B):
                offs_b = b0 + tl.arange(0, BLOCK_B)
                mask_b = offs_b < B
                w = tl.load(
                    w_ptr + a * M * B + offs_m[:, None] * B + offs_b[None, :],
                    mask=mask_m[:, None] & mask_b[None, :], other=0.0,
                ).to(ACC)
                x = tl.load(x_ptr + col_off + a * B + offs_b, mask=mask_b, other=0.0).to(ACC)
                t += tl.sum(w * x[None, :], axis=1)
        tl.store(t_ptr + row_off + offs_m, t, mask=mask_m)
        y = t
    else:
        y = tl.load(y_ptr + row_off + offs_m, mask=mask_m, other=0.0).to(ACC)
    if ACCUM:
        # This block's slot: partial row (m0 / BLOCK_M) of the layer's (row blocks x K) partials.
        part = part_ptr + tl.load(row + 6) + (m0 // BLOCK_M) * (A * B)
        for a in range(0, A):
            for b0 in range(0, B, BLOCK_B):
                offs_b = b0 + tl.arange(0, BLOCK_B)
                mask_b = offs_b < B
                w = tl.load(
                    w_ptr + a * M * B + offs_m[:, None] * B + offs_b[None, :],
                    mask=mask_m[:, None] & mask_b[None, :], other=0.0,
                ).to(ACC)
                tl.store(part + a * B + offs_b, tl.sum(w * y[:, None], axis=0), mask=mask_b)


@triton.jit
def _reduce_kernel(
    meta_ptr, blocks_ptr, part_ptr, s_ptr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr
):
    """s[k] = sum of the layer's partial rows (one column block), BLOCK_J rows per load so
    that many are in flight rather than one L2 round trip per row; a fixed order all the same."""
    pid = tl.program_id(0)
    layer = tl.load(blocks_ptr + 2 * pid)
    k0 = tl.load(blocks_ptr + 2 * pid + 1)
    row = meta_ptr + layer * 8
    K = tl.load(row + 1) * tl.load(row + 3)
    part = part_ptr + tl.load(row + 6)
    n_blocks = tl.load(row + 7)
    offs = k0 + tl.arange(0, BLOCK_K)
    mask = offs < K
    offs_j = tl.arange(0, BLOCK_J)
    total = tl.zeros([BLOCK_K], dtype=ACC)
    for j0 in range(0, n_blocks, BLOCK_J):
        rows = j0 + offs_j
        tile = tl.load(part + rows[:, None] * K + offs[None, :], mask=(rows < n_blocks)[:, None] & mask[None, :], other=0.0)
        total += tl.sum(tile, axis=0)
    tl.store(s_ptr + tl.load(row + 5) + offs, total, mask=mask)


@triton.jit
def _squared_norm(ptr, n, ACC: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.zeros([BLOCK], dtype=ACC)
    for i0 in range(0, n, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        x = tl.load(ptr + offs, mask=offs < n, other=0.0).to(ACC)
        total += x * x
    return tl.sum(total, axis=0)


@triton.jit
def _finalize_kernel(
    meta_ptr, eps: tl.float64, t_ptr, s_ptr, u_ptr, v_ptr, sigma_ptr,
    KIND: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    """One layer: u, v and sigma from the pass results t, s (formulas: csrc/spectral_norm.h).
    ``eps`` arrives as float64 (a Python float is passed as float32 unless annotated: a float64
    weight's eps of 1e-50 became 0) and is used in the accumulator's dtype."""
    eps = tl.cast(eps, ACC)
    layer = tl.program_id(0)
    row = meta_ptr + layer * 8
    M = tl.load(row + 2)
    K = tl.load(row + 1) * tl.load(row + 3)
    row_off = tl.load(row + 4)
    col_off = tl.load(row + 5)
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
        # propagate_nan: a NaN norm stays NaN, as torch's F.normalize and the C++ backends keep it;
        # the default (fmax) would return eps, scaling the finite entries by 1/eps.
        if KIND != 1:
            t_sq = _squared_norm(t_ptr, M, ACC, BLOCK)
            t_norm = tl.maximum(tl.sqrt(t_sq), eps, propagate_nan=tl.PropagateNan.ALL)
            for i0 in range(0, M, BLOCK):
                offs = i0 + tl.arange(0, BLOCK)
                mask = offs < M
                tl.store(u_ptr + offs, tl.load(t_ptr + offs, mask=mask, other=0.0) / t_norm, mask=mask)
            scale = 1.0 / t_norm
            if KIND == 2:
                tl.store(sigma_ptr + layer, t_sq / t_norm)
        if KIND != 2:
            r_exact = tl.sqrt(_squared_norm(s_ptr, K, ACC, BLOCK)) * scale
            r_norm = tl.maximum(r_exact, eps, propagate_nan=tl.PropagateNan.ALL)
            for i0 in range(0, K, BLOCK):
                offs = i0 + tl.arange(0, BLOCK)
                mask = offs < K
                tl.store(v_ptr + offs, tl.load(s_ptr + offs, mask=mask, other=0.0) * (scale / r_norm), mask=mask)
            tl.store(sigma_ptr + layer, r_exact * r_exact / r_norm)


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


def reads_u(n_power_iterations: int, u_first: bool) -> bool:
    """Whether the schedule reads the given u: u-first iterations compute it from W v."""
    return n_power_iterations == 0 or not u_first


def config_for(device: torch.device) -> LaunchConfig:
    return INTERPRETER if device.type == "cpu" else GPU


def block_b_for(config: LaunchConfig, max_b: int) -> int:
    """The column tile for layers whose widest contiguous run is ``max_b`` elements."""
    return max(MIN_BLOCK_B, min(config.block_b_max, triton.next_power_of_2(max_b)))


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class _Table:
    """The device table of one set of weights, and the sizes the launches need."""

    table: torch.Tensor
    meta: torch.Tensor
    row_blocks: torch.Tensor
    col_blocks: torch.Tensor
    rows: int
    cols: int
    partials: int
    block_b: int
    built_on: Optional[int]  # the CUDA stream the allocator files the table's memory under (None on the CPU)


_TABLES: "collections.OrderedDict[tuple, _Table]" = collections.OrderedDict()
_TABLE_CACHE_SIZE = 16
# Keys of tables used while a CUDA graph was captured: its replays read them without coming back
# here, so their place in the LRU says nothing; they are never evicted.
_CAPTURED: set = set()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _view3(shape: torch.Size, dim: int) -> Tuple[int, int, int]:
    return shape[:dim].numel(), shape[dim], shape[dim + 1:].numel()


def _table(weights: Sequence[torch.Tensor], dims: Sequence[int], config: LaunchConfig) -> _Table:
    """The cached table for these weights; built (one host->device copy) only for weights not seen
    recently. The key holds everything the table is made of, so a hit can never be stale."""
    first = weights[0]
    key = (first.device, first.dtype, config) + tuple(
        (w.data_ptr(), tuple(w.shape), tuple(w.stride()), d) for w, d in zip(weights, dims)
    )
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        if _capturing(first.device):
            _CAPTURED.add(key)
        if hit.built_on is not None:
            # An evicted table's memory goes back to the stream it was built on, whose next
            # allocation may take it at once: a launch on another stream must be waited for first.
            stream = torch.cuda.current_stream(first.device)
            if stream.cuda_stream != hit.built_on:
                hit.table.record_stream(stream)
        return hit
    if _capturing(first.device):
        raise RuntimeError(
            "spectral norm: first call with these weights inside CUDA graph capture; run the model once before "
            "capturing (the layer table is built and copied to the device on a first call)"
        )
    views = [_view3(w.shape, d) for w, d in zip(weights, dims)]
    block_b = block_b_for(config, max(b for _, _, b in views))
    meta: List[int] = []
    row_blocks: List[int] = []
    col_blocks: List[int] = []
    rows = cols = partials = 0
    for layer, (w, (A, M, B)) in enumerate(zip(weights, views)):
        if w.numel() >= 2**31:
            raise ValueError(f"spectral norm: layer {layer} has {w.numel()} elements; the Triton kernels index weights with 32 bits")
        n_row_blocks = triton.cdiv(M, config.block_m)
        meta += [w.data_ptr(), A, M, B, rows, cols, partials, n_row_blocks]
        for m0 in range(0, M, config.block_m):
            row_blocks += [layer, m0]
        for k0 in range(0, A * B, config.block_k):
            col_blocks += [layer, k0]
        rows += M
        cols += A * B
        partials += n_row_blocks * A * B
    table = torch.tensor(meta + row_blocks + col_blocks, dtype=torch.int64).to(first.device)
    n_meta, n_rows = len(meta), len(row_blocks)
    entry = _Table(
        table, table[:n_meta], table[n_meta:n_meta + n_rows], table[n_meta + n_rows:], rows, cols, partials, block_b,
        torch.cuda.current_stream(first.device).cuda_stream if first.is_cuda else None,
    )
    _TABLES[key] = entry
    if len(_TABLES) > _TABLE_CACHE_SIZE:
        evicted = next((k for k in _TABLES if k not in _CAPTURED), None)
        if evicted is not None:
            del _TABLES[evicted]
    return entry


def power_iteration_multi(
    weights: Sequence[torch.Tensor],
    us: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    dims: Sequence[int],
    n_power_iterations: int,
    eps: float,
    u_first: bool,
    config: Optional[LaunchConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All layers at once; returns (cat of u's, cat of v's, sigma per layer).
    Each weight must be contiguous (the op layer passes permuted views, see fastgan/ops/spectral_norm.py).
    ``config``: the launch configuration (default: :func:`config_for` the device; the benchmark
    passes each of :data:`GPU_CANDIDATES`)."""
    first = weights[0]
    config = config or config_for(first.device)
    with device_guard(first):
        tab = _table(weights, dims, config)
        acc = triton_dtype(_acc(first.dtype))
        u_out = torch.cat(list(us)) if reads_u(n_power_iterations, u_first) else first.new_empty(tab.rows)
        v_out = torch.cat(list(vs))
        t = torch.empty(tab.rows, dtype=_acc(first.dtype), device=first.device)
        s = torch.empty(tab.cols, dtype=t.dtype, device=first.device)
        part = torch.empty(max(tab.partials, 1), dtype=t.dtype, device=first.device)
        sigma = torch.empty(len(weights), dtype=first.dtype, device=first.device)
        n_row_blocks = tab.row_blocks.numel() // BLOCK_COLS
        n_col_blocks = tab.col_blocks.numel() // BLOCK_COLS
        for dot, accum, kind in schedule(n_power_iterations, u_first):
            # w_typed_ptr only types the weights' pointers: v_out has their dtype and, unlike a
            # weight (a view at any offset), is always 16-byte aligned -- one specialization, not two.
            _row_pass_kernel[(n_row_blocks,)](
                tab.meta, tab.row_blocks, v_out, v_out, u_out, t, part,
                DOT=dot, ACCUM=accum, ACC=acc, BLOCK_M=config.block_m, BLOCK_B=tab.block_b, num_warps=config.num_warps,
            )
            if accum:
                _reduce_kernel[(n_col_blocks,)](
                    tab.meta, tab.col_blocks, part, s, ACC=acc, BLOCK_K=config.block_k, BLOCK_J=config.block_j,
                    num_warps=config.num_warps,
                )
            _finalize_kernel[(len(weights),)](
                tab.meta, float(eps), t, s, u_out, v_out, sigma,  # an int eps would be a kernel of its own
                KIND=kind, ACC=acc, BLOCK=config.block_final, num_warps=config.num_warps,
            )
    return u_out, v_out, sigma


def power_iteration(
    weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int, n_power_iterations: int, eps: float, u_first: bool
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer; returns (u, v, sigma) like ``fastgan.reference.spectral_norm.power_iteration``."""
    u_out, v_out, sigma = power_iteration_multi([weight], [u], [v], [dim], n_power_iterations, eps, u_first)
    return u_out, v_out, sigma.reshape(())


def _launches(config: LaunchConfig, dtype: torch.dtype, steps, block_bs: Sequence[int]):
    """(kernel, signature, constexprs) of the launches ``config`` makes for ``steps`` of :func:`schedule`."""
    w, a, acc = triton_dtype(dtype).name, triton_dtype(_acc(dtype)).name, triton_dtype(_acc(dtype))
    for dot, accum in sorted({(d, c) for d, c, _ in steps}):
        for block_b in block_bs:
            yield _row_pass_kernel, {
                "meta_ptr": "*i64", "blocks_ptr": "*i64", "w_typed_ptr": f"*{w}", "x_ptr": f"*{w}",
                "y_ptr": f"*{w}", "t_ptr": f"*{a}", "part_ptr": f"*{a}",
                "DOT": "constexpr", "ACCUM": "constexpr", "ACC": "constexpr", "BLOCK_M": "constexpr",
                "BLOCK_B": "constexpr",
            }, dict(DOT=dot, ACCUM=accum, ACC=acc, BLOCK_M=config.block_m, BLOCK_B=block_b)
    if any(accum for _, accum, _ in steps):
        yield _reduce_kernel, {
            "meta_ptr": "*i64", "blocks_ptr": "*i64", "part_ptr": f"*{a}", "s_ptr": f"*{a}",
            "ACC": "constexpr", "BLOCK_K": "constexpr", "BLOCK_J": "constexpr",
        }, dict(ACC=acc, BLOCK_K=config.block_k, BLOCK_J=config.block_j)
    for kind in sorted({k for _, _, k in steps}):
        yield _finalize_kernel, {
            "meta_ptr": "*i64", "eps": "fp64", "t_ptr": f"*{a}", "s_ptr": f"*{a}", "u_ptr": f"*{w}",
            "v_ptr": f"*{w}", "sigma_ptr": f"*{w}", "KIND": "constexpr", "ACC": "constexpr", "BLOCK": "constexpr",
        }, dict(KIND=kind, ACC=acc, BLOCK=config.block_final)


def gpu_specializations() -> Iterator[Tuple[object, Dict[str, str], Dict[str, object], int, FrozenSet[str]]]:
    """Every (kernel, signature, constexprs, num_warps, arguments divisible by 16: every pointer,
    all allocated here) the launchers above can emit on a GPU with
    :data:`GPU` -- each dtype, each step of :func:`schedule`, each column tile :func:`block_b_for`
    gives -- and what the benchmark launches with each of :data:`GPU_CANDIDATES` (float32, the
    parametrization's refresh, SNDCGAN's widest tile), for the Hopper compile check."""
    steps = {step for n in (0, 1, 2) for u_first in (True, False) for step in schedule(n, u_first)}
    block_bs = sorted({block_b_for(GPU, 1 << i) for i in range(16)})
    aligned = lambda signature: frozenset(k for k, v in signature.items() if v.startswith("*"))  # noqa: E731
    for dtype in WEIGHT_DTYPES:
        for kernel, signature, constexprs in _launches(GPU, dtype, steps, block_bs):
            yield kernel, signature, constexprs, GPU.num_warps, aligned(signature)
    for config in GPU_CANDIDATES:
        for kernel, signature, constexprs in _launches(config, torch.float32, set(schedule(1, True)), [config.block_b_max]):
            yield kernel, signature, constexprs, config.num_warps, aligned(signature)
