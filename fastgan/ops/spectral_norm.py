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
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from fastgan import _backend
from fastgan.reference import spectral_norm as reference


def check_weight(weight: Tensor, dim: int, where: str) -> int:
    """Validate a weight for spectral norm; return ``dim`` made non-negative. ``where`` names the layer in errors."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"{where}: the weight must be a Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{where}: spectral norm needs a floating-point weight, got dtype {weight.dtype}")
    if weight.dim() < 2:
        raise ValueError(
            f"{where}: spectral norm needs a weight with at least 2 dimensions (a matrix or a conv kernel), "
            f"got a {weight.dim()}-D weight of shape {tuple(weight.shape)}"
        )
    if weight.numel() == 0:
        raise ValueError(f"{where}: spectral norm of a zero-size weight (shape {tuple(weight.shape)}) is undefined")
    if not -weight.dim() <= dim < weight.dim():
        raise IndexError(f"{where}: dim={dim} is out of range for a {weight.dim()}-D weight")
    return dim % weight.dim()


def check_layer(weight: Tensor, u: Tensor, v: Tensor, dim: int, where: str) -> int:
    """Validate one layer's weight and its u, v; return ``dim`` made non-negative."""
    dim = check_weight(weight, dim, where)
    rows = weight.shape[dim]
    cols = weight.numel() // rows
    for name, vec, size in (("u", u, rows), ("v", v, cols)):
        if not isinstance(vec, Tensor):
            raise TypeError(f"{where}: {name} must be a Tensor, got {type(vec).__name__}")
        if tuple(vec.shape) != (size,):
            raise ValueError(
                f"{where}: {name} must have shape ({size},) for a weight of shape {tuple(weight.shape)} "
                f"with dim={dim}, got {tuple(vec.shape)}"
            )
        if vec.dtype != weight.dtype or vec.device != weight.device:
            raise TypeError(
                f"{where}: {name} is {vec.dtype} on {vec.device} but the weight is {weight.dtype} on {weight.device}"
            )
    return dim


def _check_iteration(n_power_iterations: int, eps: float) -> None:
    if n_power_iterations < 0:
        raise ValueError(f"n_power_iterations must be >= 0 (0 = eval mode), got {n_power_iterations}")
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")


def _check_multi(weights: Sequence[Tensor], us: Sequence[Tensor], vs: Sequence[Tensor], dims: Sequence[int]) -> List[int]:
    if not (len(weights) == len(us) == len(vs) == len(dims)) or not weights:
        raise ValueError(
            f"spectral_norm_power_iteration_multi needs one u, v and dim per weight and at least one weight; "
            f"got {len(weights)} weights, {len(us)} u, {len(vs)} v, {len(dims)} dims"
        )
    first = weights[0]
    checked = []
    for i, (w, u, v, d) in enumerate(zip(weights, us, vs, dims)):
        where = f"layer {i} (weight of shape {tuple(w.shape)})"
        checked.append(check_layer(w, u, v, d, where))
        if w.dtype != first.dtype or w.device != first.device:
            raise TypeError(f"{where}: all weights must share dtype and device; layer 0 is {first.dtype} on {first.device}")
    return checked


_POWER_ITERATION = {
    "reference": reference.power_iteration,
    "triton": _backend.triton_kernel("spectral_norm", "power_iteration"),
    "cpp": _backend.extension_op("spectral_norm_power_iteration"),
    "cuda": _backend.extension_op("spectral_norm_power_iteration"),
}
_POWER_ITERATION_MULTI = {
    "reference": reference.power_iteration_multi,
    "triton": _backend.triton_kernel("spectral_norm", "power_iteration_multi"),
    "cpp": _backend.extension_op("spectral_norm_power_iteration_multi"),
    "cuda": _backend.extension_op("spectral_norm_power_iteration_multi"),
}


@torch.library.custom_op("fastgan::spectral_norm_power_iteration", mutates_args=())
def spectral_norm_power_iteration(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, u_first: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    dim = check_layer(weight, u, v, dim, "spectral_norm_power_iteration")
    _check_iteration(n_power_iterations, eps)
    impl = _backend.dispatch(_POWER_ITERATION, weight.device)
    return impl(weight.contiguous(), u.contiguous(), v.contiguous(), dim, n_power_iterations, eps, u_first)


@spectral_norm_power_iteration.register_fake
def _(weight, u, v, dim, n_power_iterations, eps, u_first):
    check_layer(weight, u, v, dim, "spectral_norm_power_iteration")
    _check_iteration(n_power_iterations, eps)
    return torch.empty_like(u), torch.empty_like(v), weight.new_empty(())


@torch.library.custom_op("fastgan::spectral_norm_power_iteration_multi", mutates_args=())
def spectral_norm_power_iteration_multi(
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
    impl = _backend.dispatch(_POWER_ITERATION_MULTI, weights[0].device)
    return impl(
        [w.contiguous() for w in weights],
        [u.contiguous() for u in us],
        [v.contiguous() for v in vs],
        dims,
        n_power_iterations,
        eps,
        u_first,
    )


@spectral_norm_power_iteration_multi.register_fake
def _(weights, us, vs, dims, n_power_iterations, eps, u_first):
    _check_multi(weights, us, vs, dims)
    _check_iteration(n_power_iterations, eps)
    first = weights[0]
    rows = sum(u.shape[0] for u in us)
    cols = sum(v.shape[0] for v in vs)
    return first.new_empty((rows,)), first.new_empty((cols,)), first.new_empty((len(weights),))


@torch.library.custom_op("fastgan::spectral_normalize", mutates_args=())
def spectral_normalize(weight: Tensor, u: Tensor, v: Tensor, sigma: Tensor, dim: int) -> Tensor:
    return weight / sigma


@spectral_normalize.register_fake
def _(weight, u, v, sigma, dim):
    return torch.empty_like(weight)


def _normalize_setup_context(ctx, inputs, output):
    weight, u, v, sigma, dim = inputs
    ctx.save_for_backward(weight, u, v, sigma)
    ctx.dim = dim


def _normalize_backward(ctx, grad):
    weight, u, v, sigma = ctx.saved_tensors
    dim = ctx.dim % weight.dim()
    if torch.is_grad_enabled():
        # Double backward: σ must stay a differentiable function of W (same value).
        recomputed = torch.dot(u, reference.weight_matrix(weight, dim) @ v)
        sigma = sigma + (recomputed - recomputed.detach())
    grad_weight = reference.normalize_weight_backward(grad, weight, u, v, sigma, dim)
    return grad_weight, None, None, None, None


spectral_normalize.register_autograd(_normalize_backward, setup_context=_normalize_setup_context)
