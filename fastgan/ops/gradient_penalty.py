"""The gradient-penalty ops: ``torch.library`` registration, the only place they are defined.

* ``fastgan::gp_interpolate(real, fake, alpha?, seed) -> (x_hat, alpha)``: the WGAN-GP
  interpolation x̂ = real + α (fake − real), one α per sample; with ``alpha=None`` α is
  drawn inside the kernel from ``seed`` (fastgan's Philox stream, identical on every
  backend). Differentiable w.r.t. real, fake and a given alpha.
* ``fastgan::dragan_perturb(real, seed) -> x_hat``: clip(real + std(real)·(U − ½), 0, 1)
  with the uniforms drawn inside the kernel; std is the biased (population) standard
  deviation of the whole batch, compare_gan's, so a one-element batch gives std 0.
  Not differentiable: x̂ is a point at which D's input gradient is taken, not a
  function to backprop through.
* ``fastgan::gp_penalty(grad, squared_norm, center, eps, one_sided) -> (penalty, sq)``:
  per-sample Σ g² (``sq``, float32 or float64) and the penalty from it, fused;
  differentiable w.r.t. ``grad`` to any order (its backward is plain torch).

Formulas and conventions: :mod:`fastgan.reference.gradient_penalty`. Dense inputs
with the samples outermost in memory (channels-last included) are read in place by
gp_interpolate and gp_penalty; dragan_perturb reads a contiguous copy of others.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

from fastgan import _backend
from fastgan.reference import gradient_penalty as reference


def _check_batch(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0 or x.numel() == 0:
        raise ValueError(f"{name} must be a non-empty batch (first dimension = samples), got shape {tuple(x.shape)}")


def _check_interpolate(real: Tensor, fake: Tensor, alpha: Optional[Tensor]) -> None:
    _check_batch(real, "real")
    _check_batch(fake, "fake")
    if real.shape != fake.shape or real.dtype != fake.dtype or real.device != fake.device:
        raise ValueError(
            f"real and fake must match: real is {tuple(real.shape)} {real.dtype} on {real.device}, "
            f"fake is {tuple(fake.shape)} {fake.dtype} on {fake.device}"
        )
    if alpha is not None:
        if not alpha.is_floating_point() or tuple(alpha.shape) != (real.shape[0],) or alpha.device != real.device:
            raise ValueError(
                f"alpha must be a floating-point tensor of shape ({real.shape[0]},) on {real.device}, "
                f"got {tuple(alpha.shape)} {alpha.dtype} on {alpha.device}"
            )


def _seed_value(seed: int) -> int:
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def _register(name, reference_fn):
    return _backend.register(
        name,
        {
            "reference": reference_fn,
            "triton": _backend.triton_kernel("gradient_penalty", name),
            "cpp": _backend.extension_op(name),
            "cuda": _backend.extension_op(name),
        },
        {"cpu": ("cpp", "reference"), "cuda": ("cuda", "triton", "reference")},
        "CPU: bench/results/gradient_penalty-cpu-2026-11-23.md, a D step is convolution-bound (cpp 1.04x, "
        "reference 1.05x: equal within noise), cpp first as it reads the images once; CUDA: "
        "bench/results/gradient_penalty-cuda-2026-11-2[78].md (H100, quick), R1 D step cuda 13.06 / 12.92 ms, triton "
        "13.08 / 13.34, reference 13.46 / 11.57 (host-bound: the step's ~530 launches; IQRs 0.5-1.0 ms); WGAN-GP "
        "(2026-11-28) cuda 11.85, triton 11.95, reference 20.75 (its seeded draw of alpha in plain torch ops); "
        "cuda first for its 16-byte vector loads and device-sized grids",
    )


_INTERPOLATE = _register("gp_interpolate", reference.interpolate)
_DRAGAN = _register("dragan_perturb", reference.dragan_perturb)
_PENALTY = _register("gp_penalty", reference.penalty)


def _batch_major(*xs: Tensor) -> Tuple[Tensor, ...]:
    """The tensors themselves when the kernels can read them in place -- dense with the
    samples outermost in memory (contiguous, channels-last, ...) and all laid out alike --
    else contiguous copies. The elementwise and per-sample kernels walk memory linearly, so
    only the sample boundaries matter, not the order of the elements within a sample."""
    if all(x.is_contiguous() and x.stride() == xs[0].stride() for x in xs):
        return xs  # the common case, without memory_order's ~6 us a tensor
    orders = [_backend.memory_order(x) for x in xs]
    in_place = all(o is not None and (x.shape[0] == 1 or o[0] == 0) for x, o in zip(xs, orders))
    in_place = in_place and all(x.stride() == xs[0].stride() for x in xs)
    return xs if in_place else tuple(x.contiguous() for x in xs)


def _interpolate(real: Tensor, fake: Tensor, alpha: Optional[Tensor], seed: int) -> Tuple[Tensor, Tensor]:
    _check_interpolate(real, fake, alpha)
    real, fake = _batch_major(real, fake)
    return _INTERPOLATE(real.device)(real, fake, None if alpha is None else alpha.contiguous(), _seed_value(seed))


gp_interpolate = torch.library.custom_op("fastgan::gp_interpolate", mutates_args=())(_interpolate)


@gp_interpolate.register_fake
def _(real, fake, alpha, seed):
    _check_interpolate(real, fake, alpha)
    return torch.empty_like(_batch_major(real, fake)[0]), real.new_empty((real.shape[0],))


def _interpolate_setup_context(ctx, inputs, output):
    real, fake, alpha, _ = inputs
    _, alpha_used = output
    ctx.save_for_backward(real, fake, alpha_used)
    ctx.alpha_given = alpha is not None
    ctx.alpha_dtype = None if alpha is None else alpha.dtype


def _interpolate_backward(ctx, grad_x, grad_alpha_out):
    real, fake, alpha = ctx.saved_tensors
    a = alpha.reshape((-1,) + (1,) * (real.dim() - 1))
    grad_real = grad_x * (1 - a) if ctx.needs_input_grad[0] else None
    grad_fake = grad_x * a if ctx.needs_input_grad[1] else None
    grad_alpha = None
    if ctx.alpha_given and ctx.needs_input_grad[2]:
        grad_alpha = (grad_x * (fake - real)).reshape(real.shape[0], -1).sum(1)
        if grad_alpha_out is not None:  # the second output is the given alpha itself
            grad_alpha = grad_alpha + grad_alpha_out
        grad_alpha = grad_alpha.to(ctx.alpha_dtype)
    return grad_real, grad_fake, grad_alpha, None


gp_interpolate.register_autograd(_interpolate_backward, setup_context=_interpolate_setup_context)


def _dragan(real: Tensor, seed: int) -> Tensor:
    _check_batch(real, "real")
    # Contiguous, unlike the other ops: element i draws the i-th uniform in logical order,
    # which a kernel walking a channels-last tensor in memory order would not.
    return _DRAGAN(real.device)(real.contiguous(), _seed_value(seed))


dragan_perturb = torch.library.custom_op("fastgan::dragan_perturb", mutates_args=())(_dragan)


@dragan_perturb.register_fake
def _(real, seed):
    _check_batch(real, "real")
    return real.new_empty(real.shape)


def _check_penalty(grad: Tensor, center: float, eps: float) -> None:
    """What the op and its fake check: a NaN or Inf center or eps made every gradient of D non-finite."""
    _check_batch(grad, "the gradient of D")
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be finite and >= 0, got {eps}")
    if not math.isfinite(center):
        raise ValueError(f"center must be finite, got {center}")


def _penalty(grad: Tensor, squared_norm: bool, center: float, eps: float, one_sided: bool) -> Tuple[Tensor, Tensor]:
    _check_penalty(grad, center, eps)
    (grad,) = _batch_major(grad)
    return _PENALTY(grad.device)(grad, squared_norm, center, eps, one_sided)


gp_penalty = torch.library.custom_op("fastgan::gp_penalty", mutates_args=())(_penalty)


@gp_penalty.register_fake
def _(grad, squared_norm, center, eps, one_sided):
    _check_penalty(grad, center, eps)
    return grad.new_empty(()), grad.new_empty((grad.shape[0],), dtype=reference.accumulator_dtype(grad.dtype))


def _penalty_setup_context(ctx, inputs, output):
    grad, squared_norm, center, eps, one_sided = inputs
    ctx.save_for_backward(grad, output[1])
    ctx.options = (squared_norm, center, eps, one_sided)


def _penalty_backward(ctx, grad_penalty, grad_sq):
    grad, sq = ctx.saved_tensors
    squared_norm, center, eps, one_sided = ctx.options
    if torch.is_grad_enabled():
        # Double backward: sq must stay a differentiable function of grad.
        sq = grad.reshape(grad.shape[0], -1).to(sq.dtype).square().sum(1)
    batch = grad.shape[0]
    if squared_norm:
        coeff = torch.full_like(sq, 1.0 / batch)
    else:
        # eps = 0 and g_b = 0: the slope's derivative g/‖g‖ is 0/0 there. Take 0, as the
        # backward of torch.linalg.vector_norm (hand-written WGAN-GP code's norm) does, not a
        # NaN that reaches every parameter of D; masked before the sqrt so that double
        # backward stays finite too.
        degenerate = sq == 0 if eps == 0 else None
        slope = torch.sqrt(eps + sq if degenerate is None else sq.masked_fill(degenerate, 1.0))
        gap = slope - center
        if one_sided:
            gap = gap.clamp(min=0)
        coeff = 2.0 / batch * gap / slope
        if degenerate is not None:
            coeff = coeff.masked_fill(degenerate, 0.0)
    coeff = coeff * grad_penalty
    if grad_sq is not None:  # the second output, sq_b = sum of g_b squared: d sq_b / d g_b = 2 g_b
        coeff = coeff + 2.0 * grad_sq
    coeff = coeff.to(grad.dtype).reshape((-1,) + (1,) * (grad.dim() - 1))
    return grad * coeff, None, None, None, None


gp_penalty.register_autograd(_penalty_backward, setup_context=_penalty_setup_context)


# fastgan.penalties' entry points: the ops without their dispatch in eager mode, same
# autograd (_backend.eager_twin; in a D step the ops' dispatch cost more host time than
# their kernels).
interpolate = _backend.eager_twin(
    gp_interpolate, _backend.autograd_twin(_interpolate, _interpolate_setup_context, _interpolate_backward)
)
dragan = _backend.eager_twin(dragan_perturb, _dragan)
penalty = _backend.eager_twin(
    gp_penalty, _backend.autograd_twin(_penalty, _penalty_setup_context, _penalty_backward)
)
