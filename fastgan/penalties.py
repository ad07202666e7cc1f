"""Gradient penalties for discriminators, in one call, on fastgan's fused ops.

>>> gp = fastgan.penalties.gradient_penalty(D, real, fake, "wgan-gp")
>>> (d_loss + 10.0 * gp).backward()

Kinds (formulas and compare_gan's conventions: docs/losses.md,
:mod:`fastgan.reference.gradient_penalty`):

* ``"wgan-gp"``: at x̂ = real + α (fake − real), α ~ U[0, 1) per sample;
  mean((sqrt(eps + ‖g‖²) − center)²), g = ∂D(x̂)/∂x̂.
* ``"dragan"``: the same at x̂ = clip(real + std(real)·(U − ½), 0, 1).
* ``"r1"`` / ``"r2"``: ½ mean ‖g‖² at the real / fake samples, so ``λ·penalty`` is
  Mescheder's (γ/2)·E‖g‖² with λ = γ.

``eps=0`` gives the plain ‖g‖; ``one_sided=True`` gives max(0, ‖g‖ − center)².
The penalty only trains D: real and fake are detached. Random draws (α, DRAGAN
noise) happen inside the kernels from a seed: ``generator`` may be an int seed or a
``torch.Generator``; by default the seed comes from torch's global CPU generator, so
``torch.manual_seed`` makes runs reproducible (identically on every backend). While a CUDA
graph records the call (:class:`fastgan.graphs.GraphedStep`), a host seed would be read
once for every replay: there they come from ``torch.rand`` on the device instead, unless
``generator`` is an int (its fixed draw, as eagerly).

:func:`jacobian_clamping` is a generator regularizer (Odena et al. 2018, Algorithm 1):
it keeps the finite-difference gain ‖G(z+δ) − G(z)‖/‖δ‖ within [λ_min, λ_max].
"""
from __future__ import annotations

import math
import sys
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from fastgan import graphs
from fastgan.diagnostics import check_latent
from fastgan.ops import gradient_penalty as ops
from fastgan.reference import gradient_penalty as reference
from fastgan.reference.gradient_penalty import KINDS, SQUARED_NORM_KINDS

_NEEDS_FAKE = ("wgan-gp", "r2")


def _check_generator(generator: Union[None, int, torch.Generator]) -> None:
    # bool is an int to Python: generator=True would silently be seed 1
    if isinstance(generator, bool) or not (generator is None or isinstance(generator, (int, torch.Generator))):
        raise TypeError(f"generator must be None, an int seed or a torch.Generator, got {generator!r}")


def _seed(generator: Union[None, int, torch.Generator]) -> int:
    _check_generator(generator)
    if isinstance(generator, int):
        return generator
    if generator is None:
        return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, generator=generator, device=generator.device).item())


def _draws_on_device(real: Tensor, kind: str, alpha: Optional[Tensor], generator) -> bool:
    """Whether this penalty's random draw (α, DRAGAN's noise) comes from torch's generator on
    the device: while a CUDA graph records the call, where a seed drawn on the host would be
    read once and every replay would reuse its draw. An int seed keeps its fixed draw, as it
    does eagerly; a torch.Generator, read on the host, cannot be replayed."""
    _check_generator(generator)
    if kind not in ("wgan-gp", "dragan") or alpha is not None or isinstance(generator, int):
        return False
    if not graphs.is_capturing(real.device):
        return False
    if generator is not None:
        raise ValueError(f"gradient_penalty({kind!r}) is being captured in a CUDA graph: a torch.Generator is read on "
                         "the host once, at capture, so every replay would reuse its draw; pass generator=None (drawn "
                         "on the GPU, anew at each replay), an int seed (the same draw every call) or alpha")
    return True


def _check_inputs(real: Tensor, fake: Optional[Tensor], kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown gradient penalty kind {kind!r}; choose one of {', '.join(KINDS)}")
    for name, samples in (("real", real), ("fake", fake)):
        if samples is not None and not isinstance(samples, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(samples).__module__}.{type(samples).__name__} "
                             f"(convert NumPy arrays with torch.from_numpy)")
    if not real.is_floating_point():
        raise ValueError(f"real must be a floating-point tensor, got {real.dtype}")
    if real.dim() == 0:
        raise ValueError("real must be a batch of samples, shape (B, ...); got a 0-d tensor")
    if fake is None:
        if kind in _NEEDS_FAKE:
            raise ValueError(f"the {kind!r} penalty needs fake samples; got fake=None")
        return
    if not fake.is_floating_point():
        raise ValueError(f"fake must be a floating-point tensor, got {fake.dtype}")
    if fake.shape != real.shape or fake.dtype != real.dtype:
        raise ValueError(
            f"real and fake must have the same shape and dtype: real {tuple(real.shape)} {real.dtype}, "
            f"fake {tuple(fake.shape)} {fake.dtype}"
        )


def _per_sample_alpha(alpha: Tensor, real: Tensor) -> Tensor:
    """``alpha`` as the (B,) tensor the interpolation op takes. Accepted: one value per
    sample in any shape that broadcasts against the images sample-wise, i.e. (B,) or B
    followed by ones, up to the images' rank ((B, 1), (B, 1, 1, 1) for NCHW images)."""
    batch = real.shape[0]
    if not isinstance(alpha, Tensor):
        raise TypeError(f"alpha must be a Tensor of {batch} interpolation weights, got {type(alpha).__name__}")
    shape = tuple(alpha.shape)
    if alpha.dim() == 0 or shape[0] != batch or any(s != 1 for s in shape[1:]) or alpha.dim() > real.dim():
        raise ValueError(
            f"alpha must be one value per sample, of shape ({batch},) or ({batch}, 1, ...) with at most "
            f"{real.dim()} dimensions (e.g. ({batch}, {', '.join(['1'] * (real.dim() - 1))}) for images "
            f"of shape {tuple(real.shape)}); got {shape}"
        )
    return alpha.reshape(batch)


def _evaluate_eagerly(discriminator: Callable[[Tensor], Tensor], point: Tensor) -> Tensor:
    """D(x̂) with any compiled code in D run eagerly, same parameters: torch cannot
    double-backward through a compiled graph. ``_orig_mod`` unwraps ``torch.compile(D)``;
    the force_eager stance covers the rest (``D.compile()``, compiled submodules, DDP
    around a compiled D)."""
    discriminator = getattr(discriminator, "_orig_mod", discriminator)
    # Nothing is compiled before torch.compile imports torch._dynamo: skip the stance (~10 us,
    # and the seconds of importing dynamo). Dynamo refuses to trace set_stance itself.
    if torch.compiler.is_compiling() or "torch._dynamo" not in sys.modules:
        return discriminator(point)
    with torch.compiler.set_stance("force_eager"):
        return discriminator(point)


def gradient_penalty(
    discriminator: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Optional[Tensor] = None,
    kind: str = "wgan-gp",
    *,
    alpha: Optional[Tensor] = None,
    generator: Union[None, int, torch.Generator] = None,
    center: float = 1.0,
    eps: float = 1e-4,
    one_sided: bool = False,
) -> Tensor:
    """The unweighted penalty of ``discriminator`` (a 0-d tensor with its graph).

    ``discriminator`` maps a batch to one value per sample (shape (B,) or (B, 1)).
    ``alpha`` fixes the WGAN-GP interpolation weights: one per sample, shape (B,) or
    (B, 1, ..., 1) up to the images' rank (e.g. (B, 1, 1, 1), as WGAN-GP code writes it);
    it is only used by ``"wgan-gp"``. A compiled discriminator (``torch.compile(D)``,
    ``D.compile()``, compiled submodules) is evaluated eagerly here, same parameters.
    Under DistributedDataParallel pass the DDP-wrapped model: its gradients are
    all-reduced by the backward of the total loss.

    D is evaluated once more, at x̂, in the mode it is in: in train mode its batch norm
    normalizes x̂ with x̂'s own batch statistics and updates its running statistics, as
    any forward does (and spectral norm takes a power-iteration step). DRAGAN's clip
    to [0, 1] assumes images in [0, 1].
    """
    _check_inputs(real, fake, kind)
    if not torch.is_grad_enabled():
        raise RuntimeError("gradient_penalty differentiates D with respect to its input, which needs autograd: call it "
                           "outside torch.no_grad() / torch.inference_mode() (or inside torch.enable_grad())")
    if alpha is not None and kind != "wgan-gp":
        raise ValueError(f"alpha (the interpolation weights) is only used by the 'wgan-gp' penalty, not by {kind!r}")
    draws_on_device = _draws_on_device(real, kind, alpha, generator)
    if kind == "wgan-gp":
        if alpha is not None:
            alpha = _per_sample_alpha(alpha, real)
        elif draws_on_device:
            alpha = torch.rand(real.shape[0], device=real.device)
        # a given α needs no seed: drawing one anyway would advance the caller's global generator
        point, _ = ops.interpolate(real.detach(), fake.detach(), alpha, 0 if alpha is not None else _seed(generator))
    elif kind == "dragan":
        point = (reference.dragan_with_noise(real.detach(), torch.rand(real.shape, device=real.device))
                 if draws_on_device else ops.dragan(real.detach(), _seed(generator)))
    else:
        point = (real if kind == "r1" else fake).detach()
        # Made under torch.inference_mode, it cannot require grad; a copy can. (Dynamo cannot
        # trace is_inference; a traced call fails at autograd.grad anyway, as documented.)
        if not torch.compiler.is_compiling() and point.is_inference():
            point = point.clone()
    point.requires_grad_(True)
    scores = _evaluate_eagerly(discriminator, point)
    batch = real.shape[0]
    # () is one value for a batch of 1 (a D ending in .squeeze())
    if not isinstance(scores, Tensor) or scores.numel() != batch or (scores.dim() and scores.shape[0] != batch):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"the discriminator must return one value per sample, shape ({batch},) or ({batch}, 1); got {shape}")
    grad = None
    if scores.requires_grad:
        (grad,) = torch.autograd.grad(scores.sum(), point, create_graph=True, allow_unused=True)
    if grad is None:
        # torch's own error here would ask for allow_unused=True, which the caller cannot pass.
        raise ValueError("the discriminator's output does not depend on its input, so it has no input gradient to "
                         "penalize: does D detach its input, or run it under torch.no_grad()?")
    penalty, _ = ops.penalty(grad, kind in SQUARED_NORM_KINDS, center, eps, one_sided)
    return penalty


def _couples_samples(G: Callable[[Tensor], Tensor]) -> bool:
    """Whether one sample's output may depend on the other samples of its batch: batch
    norm that normalizes with batch statistics (train mode, or no running statistics),
    or a plain callable, about which nothing is known."""
    if not isinstance(G, nn.Module):
        return True
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None) for m in G.modules()
    )


def _perturbation(z: Tensor, eps: float, generator: Union[None, int, torch.Generator]) -> Tensor:
    """δ ~ N(0, I) per sample, rescaled to ‖δ‖ = eps."""
    _check_generator(generator)
    if isinstance(generator, int):
        generator = torch.Generator(device=z.device).manual_seed(generator)
    if generator is not None and generator.device.type != z.device.type:
        raise ValueError(f"the generator is on {generator.device} but z is on {z.device}")
    direction = torch.randn(z.shape, dtype=z.dtype, device=z.device, generator=generator)
    return eps * direction / direction.norm(dim=1, keepdim=True)


def jacobian_clamping(
    G: Callable[[Tensor], Tensor],
    z: Tensor,
    eps: float = 1.0,
    lambda_min: float = 1.0,
    lambda_max: float = 20.0,
    delta: Optional[Tensor] = None,
    generator: Union[None, int, torch.Generator] = None,
    *,
    output: Optional[Tensor] = None,
) -> Tensor:
    """Jacobian clamping (Odena et al. 2018, Algorithm 1), a penalty for the generator:
    the batch mean of (max(Q, λ_max) − λ_max)² + (min(Q, λ_min) − λ_min)² with
    Q = ‖G(z+δ) − G(z)‖ / ‖δ‖ per sample (norms over all of a sample's elements).
    Returns a 0-d tensor with its graph; add ``weight · penalty`` to G's loss.

    ``delta``: the perturbations, shape of ``z``, used as given; by default drawn as
    δ ~ N(0, I) rescaled to ‖δ‖ = ``eps`` per sample, from ``generator`` (None: torch's
    global RNG; an int seed; or a ``torch.Generator`` on z's device).

    ``output``: G(z) if the caller already has it -- the generator step computed it for
    its adversarial loss -- so that only G(z+δ) is evaluated here (same graph, same
    batch-norm statistics as that step).

    Without ``output``, G(z) and G(z+δ) are computed in one forward of the
    concatenated batch when G cannot couple samples (an ``nn.Module`` with no batch
    norm using batch statistics), and as two forwards otherwise: in train mode batch
    norm would normalize the concatenated batch with the statistics of both halves,
    which changes G(z). Each forward of a train-mode G updates batch norm's running
    statistics, as any forward does.
    """
    where = "jacobian_clamping"
    check_latent(z, where)
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{where}: eps must be a positive number, got {eps}")
    if not (0 <= lambda_min <= lambda_max and math.isfinite(lambda_max)):
        raise ValueError(f"{where}: need 0 <= lambda_min <= lambda_max < inf, got lambda_min={lambda_min}, lambda_max={lambda_max}")
    if delta is None:
        delta = _perturbation(z, eps, generator)
    else:
        if not isinstance(delta, Tensor) or delta.shape != z.shape or delta.dtype != z.dtype or delta.device != z.device:
            described = f"{tuple(delta.shape)} {delta.dtype} on {delta.device}" if isinstance(delta, Tensor) else type(delta).__name__
            raise ValueError(f"{where}: delta must match z ({tuple(z.shape)} {z.dtype} on {z.device}), got {described}")
        if not torch.isfinite(delta).all() or (delta.norm(dim=1) == 0).any():
            raise ValueError(f"{where}: delta must be finite with a non-zero norm for every sample")
    delta = delta.detach()
    z = z.detach()
    batch = z.shape[0]
    if output is not None:
        perturbed = G(z + delta)
    elif _couples_samples(G):
        output, perturbed = G(z), G(z + delta)
    else:
        output, perturbed = G(torch.cat([z, z + delta])).split(batch)
    for name, value in (("output", output), ("G(z + delta)", perturbed)):
        if not isinstance(value, Tensor) or value.dim() < 1 or value.shape[0] != batch:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{where}: {name} must be a batch of {batch} outputs, got {shape}")
    if output.shape != perturbed.shape:
        raise ValueError(f"{where}: output {tuple(output.shape)} and G(z + delta) {tuple(perturbed.shape)} differ in shape")
    gain = (perturbed - output).flatten(1).norm(dim=1) / delta.norm(dim=1)
    above = (gain.clamp(min=lambda_max) - lambda_max).square()
    below = (gain.clamp(max=lambda_min) - lambda_min).square()
    return (above + below).mean()
