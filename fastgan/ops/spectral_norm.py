"""The spectral-normalization ops: ``torch.library`` registration, the only place they are defined.

* ``fastgan::spectral_norm_power_iteration(weight, u, v, dim, n_power_iterations, eps, u_first)
  -> (u, v, sigma)``: one layer's power iteration and σ = uᵀ W_mat v; functional (the
  caller copies u, v into its buffers). ``n_power_iterations=0`` is eval mode.
* ``fastgan::spectral_norm_power_iteration_multi(weights, us, vs, dims, ...)
  -> (u_cat, v_cat, sigmas)``: the same for many layers of different shapes in one
  launch; u's and v's come back concatenated in layer order, σ as a (L,) tensor.
* ``fastgan::spectral_normalize(weight, u, v, sigma, dim) -> weight / sigma``, whose
  backward treats σ = uᵀ W_mat v as a function of W with u, v constant.

See :mod:`fastgan.reference.spectral_norm` for the exact math. The power-iteration
ops run on the backend :mod:`fastgan._backend` picks; they are not differentiable
(torch's spectral norm runs them under ``no_grad`` too).

In ``fastgan._C`` (csrc/spectral_normalize.cpp), with their autograd in C++:
``fastgan_C::spectral_normalize`` (the C++ twin of ``spectral_normalize``) and
``fastgan_C::spectral_norm_weight(weight, u!, v!, dim, n_power_iterations, eps, u_first)
-> weight / sigma``, a layer's whole forward in one call. The modules reach all of these
through :func:`normalized_weight`, :func:`power_iteration_multi` and :func:`normalize`.
"""
from __future__ import annotations

import functools
import math
from typing import List, NamedTuple, Sequence, Tuple

import torch
from torch import Tensor

from fastgan import _backend
from fastgan.reference import spectral_norm as reference


def check_weight(weight: Tensor, dim: int, where: object) -> int:
    """Validate a weight for spectral norm; return ``dim`` made non-negative. ``str(where)`` names the layer in errors."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"{where}: the weight must be a Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{where}: spectral norm needs a floating-point weight, got dtype {weight.dtype}")
    ndim = weight.dim()
    if ndim < 2:
        raise ValueError(
            f"{where}: spectral norm needs a weight with at least 2 dimensions (a matrix or a conv kernel), "
            f"got a {ndim}-D weight of shape {tuple(weight.shape)}"
        )
    if weight.numel() == 0:
        raise ValueError(f"{where}: spectral norm of a zero-size weight (shape {tuple(weight.shape)}) is undefined")
    if not -ndim <= dim < ndim:
        raise IndexError(f"{where}: dim={dim} is out of range for a {ndim}-D weight")
    return dim % ndim


def check_layer(weight: Tensor, u: Tensor, v: Tensor, dim: int, where: object) -> int:
    """Validate one layer's weight and its u, v; return ``dim`` made non-negative."""
    dim = check_weight(weight, dim, where)
    rows = weight.shape[dim]
    cols = weight.numel() // rows
    dtype, device = weight.dtype, weight.device
    for name, vec, size in (("u", u, rows), ("v", v, cols)):
        if not isinstance(vec, Tensor):
            raise TypeError(f"{where}: {name} must be a Tensor, got {type(vec).__name__}")
        if vec.shape != (size,):  # torch.Size compares with a tuple
            raise ValueError(
                f"{where}: {name} must have shape ({size},) for a weight of shape {tuple(weight.shape)} "
                f"with dim={dim}, got {tuple(vec.shape)}"
            )
        if vec.dtype != dtype or vec.device != device:
            raise TypeError(
                f"{where}: {name} is {vec.dtype} on {vec.device} but the weight is {weight.dtype} on {weight.device}"
            )
    return dim


def _check_iteration(n_power_iterations: int, eps: float) -> None:
    if n_power_iterations < 0:
        raise ValueError(f"n_power_iterations must be >= 0 (0 = eval mode), got {n_power_iterations}")
    if not (math.isfinite(eps) and eps >= 0):  # 0 as in torch's F.normalize: a zero vector then gives NaN
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")


class _LayerName:
    """'layer i (weight of shape ...)', formatted only when an error message needs it
    (the checks run for every layer on every forward)."""

    def __init__(self, index: int, weight: Tensor) -> None:
        self.index, self.weight = index, weight

    def __str__(self) -> str:
        return f"layer {self.index} (weight of shape {tuple(self.weight.shape)})"


def _check_multi(weights: Sequence[Tensor], us: Sequence[Tensor], vs: Sequence[Tensor], dims: Sequence[int]) -> List[int]:
    if not (len(weights) == len(us) == len(vs) == len(dims)) or not weights:
        raise ValueError(
            f"spectral_norm_power_iteration_multi needs one u, v and dim per weight and at least one weight; "
            f"got {len(weights)} weights, {len(us)} u, {len(vs)} v, {len(dims)} dims"
        )
    first = weights[0]
    dtype, device = first.dtype, first.device
    checked = []
    for i, (w, u, v, d) in enumerate(zip(weights, us, vs, dims)):
        checked.append(check_layer(w, u, v, d, _LayerName(i, w)))
        if w.dtype != dtype or w.device != device:
            raise TypeError(
                f"{_LayerName(i, w)}: all weights must share dtype and device; layer 0 is {first.dtype} on {first.device}"
            )
    return checked


_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")}
_BASIS = (
    "CPU: bench/results/spectral_norm-cpu-2026-11-27.md, SNDCGAN D refresh cpp 3.47x torch (multi-layer op 2.79x), reference 0.92x; "
    "CUDA: bench/results/spectral_norm-cuda-2026-11-28.md (H100, quick, with Triton's launch configuration "
    "chosen by the run before it), multi-layer op cuda 120 us eager / 41.1 us replayed, triton 220 / 40.1, "
    "reference 2264 / 275: replayed equal, eager cuda's launch cheaper; the runs before: cuda 337 / 41.4 and "
    "313 / 57.8, triton 560 / 58.9 and 271 / 60.6 (eager: host-bound)"
)
_POWER_ITERATION = _backend.register(
    "spectral_norm_power_iteration",
    {
        "reference": reference.power_iteration,
        "triton": _backend.triton_kernel("spectral_norm", "power_iteration"),
        "cpp": _backend.extension_op("spectral_norm_power_iteration"),
        "cuda": _backend.extension_op("spectral_norm_power_iteration"),
    },
    _ORDER,
    _BASIS,
)
_POWER_ITERATION_MULTI = _backend.register(
    "spectral_norm_power_iteration_multi",
    {
        "reference": reference.power_iteration_multi,
        "triton": _backend.triton_kernel("spectral_norm", "power_iteration_multi"),
        "cpp": _backend.extension_op("spectral_norm_power_iteration_multi"),
        "cuda": _backend.extension_op("spectral_norm_power_iteration_multi"),
    },
    _ORDER,
    _BASIS,
)


class _ColumnMove(NamedTuple):
    """W_mat's columns in a weight's memory order, as a permutation of its other dims."""

    sizes: List[int]  # the other dims' sizes in W_mat's order
    to_memory: List[int]  # the permutation of those dims to memory order
    memory_sizes: List[int]  # their sizes in memory order
    back: List[int]  # the permutation from memory order back

    def to_view(self, v: Tensor) -> Tensor:
        return v.reshape(self.sizes).permute(self.to_memory).reshape(-1)

    def from_view(self, v: Tensor) -> Tensor:
        return v.reshape(self.memory_sizes).permute(self.back).reshape(-1)


@functools.lru_cache(maxsize=256)
def _layout(shape: Tuple[int, ...], stride: Tuple[int, ...], dim: int):
    """How the kernels read a weight of this layout in place: (permutation P of its dims with
    W.permute(P) contiguous, the dim's position in it, and the :class:`_ColumnMove`, None when
    the columns keep their order), or None when the weight is not dense and must be copied.
    Only ints: v is reordered by views and one copy, so no index tensor is kept on a device,
    where a cached one would be freed under a queued launch on another stream or a captured graph."""
    order = _backend.memory_order(torch.empty_strided(shape, stride, device="meta"))
    if order is None:
        return None
    others = [i for i in range(len(shape)) if i != dim]
    others_in_memory = [i for i in order if i != dim]
    columns = None
    if others_in_memory != others:
        columns = _ColumnMove(
            [shape[i] for i in others], [others.index(i) for i in others_in_memory],
            [shape[i] for i in others_in_memory], [others_in_memory.index(i) for i in others],
        )
    return order, order.index(dim), columns


def _in_place(weights: Sequence[Tensor], vs: Sequence[Tensor], dims: Sequence[int]):
    """The kernels' view of each layer (contiguous, read in place -- channels-last and other
    dense layouts included), v in that view's column order, and the column moves to undo.
    Only non-dense weights (slices with gaps) are copied: the kernels read rows as runs of a
    dense (A, M, B) block."""
    views, v_views, moves, new_dims = [], [], [], []
    for w, v, d in zip(weights, vs, dims):
        layout = ((), d, None) if w.is_contiguous() else _layout(tuple(w.shape), tuple(w.stride()), d)
        if layout is None:
            views.append(w.contiguous())
            v_views.append(v)
            moves.append(None)
            new_dims.append(d)
            continue
        order, dim_in_view, columns = layout
        views.append(w.permute(order) if order else w)
        new_dims.append(dim_in_view)
        moves.append(columns)
        v_views.append(v if columns is None else columns.to_view(v))
    return views, v_views, new_dims, moves


def _columns_back(v_out: Tensor, moves, sizes: Sequence[int]) -> Tensor:
    """Undo the column moves of :func:`_in_place` on the concatenated v."""
    if all(m is None for m in moves):
        return v_out
    parts = v_out.split(list(sizes))
    return torch.cat([part if m is None else m.from_view(part) for part, m in zip(parts, moves)])


def _power_iteration(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, u_first: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    dim = check_layer(weight, u, v, dim, "spectral_norm_power_iteration")
    _check_iteration(n_power_iterations, eps)
    backend = _POWER_ITERATION.backend(weight.device.type)
    impl = _POWER_ITERATION.impls[backend]
    if backend == "reference":  # plain torch reads any layout
        return impl(weight, u, v, dim, n_power_iterations, eps, u_first)
    (view,), (v_view,), (view_dim,), moves = _in_place([weight], [v.contiguous()], [dim])
    u_out, v_out, sigma = impl(view, u.contiguous(), v_view, view_dim, n_power_iterations, eps, u_first)
    return u_out, _columns_back(v_out, moves, [v.numel()]), sigma


spectral_norm_power_iteration = torch.library.custom_op("fastgan::spectral_norm_power_iteration", mutates_args=())(
    _power_iteration
)


@spectral_norm_power_iteration.register_fake
def _power_iteration_fake(weight, u, v, dim, n_power_iterations, eps, u_first):
    check_layer(weight, u, v, dim, "spectral_norm_power_iteration")
    _check_iteration(n_power_iterations, eps)
    return torch.empty_like(u), torch.empty_like(v), weight.new_empty(())


def _power_iteration_multi(
    weights: List[Tensor],
    us: List[Tensor],
    vs: List[Tensor],
    dims: List[int],
    n_power_iterations: int,
    eps: float,
    u_first: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    dims = _check_multi(weights, us, vs, dims)
    _check_iteration(n_power_iterations, eps)
    backend = _POWER_ITERATION_MULTI.backend(weights[0].device.type)
    impl = _POWER_ITERATION_MULTI.impls[backend]
    us = [u.contiguous() for u in us]
    vs = [v.contiguous() for v in vs]
    if backend == "reference":  # plain torch reads any layout
        return impl(weights, us, vs, dims, n_power_iterations, eps, u_first)
    views, v_views, view_dims, moves = _in_place(weights, vs, dims)
    u_out, v_out, sigma = impl(views, us, v_views, view_dims, n_power_iterations, eps, u_first)
    return u_out, _columns_back(v_out, moves, [v.numel() for v in vs]), sigma


spectral_norm_power_iteration_multi = torch.library.custom_op(
    "fastgan::spectral_norm_power_iteration_multi", mutates_args=()
)(_power_iteration_multi)


@spectral_norm_power_iteration_multi.register_fake
def _(weights, us, vs, dims, n_power_iterations, eps, u_first):
    _check_multi(weights, us, vs, dims)
    _check_iteration(n_power_iterations, eps)
    first = weights[0]
    rows = sum(u.shape[0] for u in us)
    cols = sum(v.shape[0] for v in vs)
    return first.new_empty((rows,)), first.new_empty((cols,)), first.new_empty((len(weights),))


def _check_normalize(weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> None:
    """What the C++ spectral_normalize checks, for the Python op and its fake."""
    dim = check_weight(weight, dim, "spectral_normalize")
    rows = weight.shape[dim]
    if u.dim() != 1 or v.dim() != 1 or u.numel() != rows or rows * v.numel() != weight.numel():
        raise ValueError(f"spectral_normalize: u {tuple(u.shape)} and v {tuple(v.shape)} do not fit a weight of "
                         f"shape {tuple(weight.shape)} with dim={dim}")
    if sigma.dim() != 0 or sigma.device != weight.device:
        raise ValueError(f"spectral_normalize: sigma must be a 0-d tensor on the weight's device, got shape "
                         f"{tuple(sigma.shape)} on {sigma.device}")


@torch.library.custom_op("fastgan::spectral_normalize", mutates_args=())
def spectral_normalize(weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
    _check_normalize(weight, u, v, sigma, dim)
    return weight / sigma


@spectral_normalize.register_fake
def _normalize_fake(weight, u, v, sigma, dim):
    _check_normalize(weight, u, v, sigma, dim)
    return torch.empty_like(weight)


SIGMA_WITH_GRADIENT = ("spectral_normalize: sigma requires grad, but the op differentiates W / σ with σ = uᵀ W v "
                       "taken as a function of W (u, v held) and gives sigma itself no gradient; pass "
                       "sigma.detach() (its value is all the op reads), or divide with plain torch to "
                       "differentiate through sigma")


def _normalize_setup_context(ctx, inputs, output):
    weight, u, v, sigma, dim = inputs
    if sigma.requires_grad:  # else that gradient would be dropped without a word
        raise ValueError(SIGMA_WITH_GRADIENT)
    ctx.save_for_backward(weight, u, v, sigma)
    ctx.dim = dim


def _sigma_of_weight(weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
    """``sigma``'s value, bit for bit, as a differentiable function of W: uᵀ W v with u, v held."""
    recomputed = torch.dot(u, reference.weight_matrix(weight, dim % weight.dim()) @ v)
    return sigma + (recomputed - recomputed.detach())


def _normalize_backward(ctx, grad):
    weight, u, v, sigma = ctx.saved_tensors
    dim = ctx.dim % weight.dim()
    if torch.is_grad_enabled():  # double backward: σ must stay a differentiable function of W
        sigma = _sigma_of_weight(weight, u, v, sigma, dim)
    grad_weight = reference.normalize_weight_backward(grad, weight, u, v, sigma, dim)
    return grad_weight, None, None, None, None


spectral_normalize.register_autograd(_normalize_backward, setup_context=_normalize_setup_context)

_NORMALIZE = _backend.register(
    "spectral_normalize",
    {
        "reference": spectral_normalize,
        "cpp": _backend.extension_op("spectral_normalize"),
        "cuda": _backend.extension_op("spectral_normalize"),
    },
    {"cpu": ("cpp", "reference"), "cuda": ("cuda", "reference")},
    "the same division; the C++ op's autograd skips ~20 us of Python per call (one call per SN layer per forward) "
    "and its backward is one C++ op (spectral_normalize_backward, bench W / sigma backward: SNDCGAN D's layers "
    "2.49 ms on the 2-core CPU against the reference formula's 8.71, 348 us on an H100 against 1159); "
    "bench/results/spectral_norm-cpu-2026-11-27.md: drop-in forward 3.05x torch with it and the one-call layer forward",
)


# The modules' entry points: the ops without their dispatch in eager mode (_backend.eager_twin).
power_iteration = _backend.eager_twin(spectral_norm_power_iteration, _power_iteration)
power_iteration_multi = _backend.eager_twin(spectral_norm_power_iteration_multi, _power_iteration_multi)


def normalize(weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
    """W / σ with the gradient of the op: the registered op under torch.compile; plain torch ops
    under functorch transforms, which run neither the op's autograd nor the C++ one
    (``torch.func.grad`` over ``functional_call`` of an SN layer); elsewhere the backend's op
    (the C++ twin, autograd in C++, where it is built)."""
    if torch.compiler.is_compiling():
        return spectral_normalize(weight, u, v, sigma, dim)
    if torch._C._functorch.peek_interpreter_stack() is not None:
        _check_normalize(weight, u, v, sigma, dim)
        if sigma.requires_grad and torch.is_grad_enabled():
            raise ValueError(SIGMA_WITH_GRADIENT)
        return weight / _sigma_of_weight(weight, u, v, sigma, dim)
    return _NORMALIZE(weight.device)(weight, u, v, sigma, dim)


def normalized_weight(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, u_first: bool
) -> Tensor:
    """A layer's forward: W / σ after ``n_power_iterations`` steps (0: eval mode), with the new
    u, v written into the buffers ``u``, ``v``. Where the power iteration runs on a C++ backend
    and W is contiguous, that is one call, ``torch.ops.fastgan_C.spectral_norm_weight`` (the
    same two ops composed in C++); otherwise the ops one by one (other layouts are read in
    place by the power-iteration op). The result saves fresh copies of u, v for its backward."""
    if (
        not _backend.registered_ops_only()
        and weight.is_contiguous()
        and _POWER_ITERATION.backend(weight.device.type) in ("cpp", "cuda")
    ):
        _check_iteration(n_power_iterations, eps)
        return torch.ops.fastgan_C.spectral_norm_weight(weight, u, v, dim, n_power_iterations, eps, u_first)
    with torch.no_grad():
        u_new, v_new, sigma = power_iteration(weight.detach(), u, v, dim, n_power_iterations, eps, u_first)
        if n_power_iterations > 0:
            u.copy_(u_new)
            v.copy_(v_new)
    return normalize(weight, u_new, v_new, sigma, dim)


def multi_layer_backend(device: torch.device) -> str:
    """The backend the multi-layer op runs on ``device`` now (forced or default)."""
    return _POWER_ITERATION_MULTI.backend(device.type)


def one_launch_pays(device: torch.device) -> bool:
    """Whether ``apply_spectral_norm`` should run its layers' power iterations as one
    multi-layer launch on ``device`` (see :func:`one_launch_pays_on`)."""
    return one_launch_pays_on(multi_layer_backend(device))


def one_launch_pays_on(backend: str) -> bool:
    """Whether one multi-layer launch pays on the multi-layer op's ``backend``: yes, except on
    the CPU C++ backend.
    There a launch is a function call, and each layer's own one-call forward keeps W in
    cache between its power iteration and W / σ: the SNDCGAN discriminator's
    apply_spectral_norm forward measured 1.88-2.07x torch's grouped, 3.26x layer by layer
    (bench/results/spectral_norm-cpu-2026-11-27.md, two threads)."""
    return backend != "cpp"


def _normalize_backward_fake(grad, weight, u, v, sigma, dim):
    if grad.shape != weight.shape:
        raise ValueError(f"spectral_normalize_backward: grad {tuple(grad.shape)} must match the weight's shape {tuple(weight.shape)}")
    return torch.empty_like(grad)


def _fake_extension_ops() -> None:
    torch.library.register_fake("fastgan_C::spectral_normalize", _normalize_fake)
    # the backward of the C++ spectral_normalize, which torch.compile traces
    torch.library.register_fake("fastgan_C::spectral_normalize_backward", _normalize_backward_fake)
    # for spectral_norm_weight, which is made of it and spectral_normalize
    torch.library.register_fake("fastgan_C::spectral_norm_power_iteration", _power_iteration_fake)


_backend.when_extension_loads(_fake_extension_ops)
