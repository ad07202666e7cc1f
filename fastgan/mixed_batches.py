"""Mixed batches (Lucas, Tallec, Ollivier, Verbeek, ICML 2018): D judges a whole batch.

For each batch a proportion p is drawn; every element is real with probability p and
fake otherwise (a mask β, β_i ~ Bernoulli(p)); a permutation-invariant discriminator
(:mod:`fastgan.models.symmetric`) reads the mixed batch and predicts the proportion of
real elements, p̄ = mean(β). Its loss is the binary cross-entropy between the prediction
σ(ℓ) and that true proportion:

    L_D = −[p̄ log σ(ℓ) + (1 − p̄) log(1 − σ(ℓ))],

minimised at σ(ℓ) = E[p̄ | batch]. *Batch smoothing* draws p ~ U[0, 1] (the number of
real elements is then uniform on {0, …, B}); without it, p is 0 or 1 with probability ½
each, so D only sees pure batches and the loss is the usual GAN cross-entropy applied
to a batch. G's loss is the non-saturating one on a batch of its own samples: it wants
D to say "all real", L_G = −log σ(ℓ).

Which fastgan losses (config key ``loss``) the formulation applies to: it needs D's
output to be a probability of "real", so ``ns`` (the cross-entropy, the paper's) and
``lsgan`` (fastgan's losses apply the squared error to σ(ℓ); with the proportion as
target it is the Brier score, whose minimiser is also E[p̄ | batch]: a fastgan extension,
not in the paper). ``wgan`` and ``hinge`` score with an unbounded critic value that no
proportion can be a target for: :func:`check_loss` rejects them.

Losses take the discriminator's logits of shape () (one prediction for the batch: the
symmetric D's pooled output) or (B,) (one prediction of the same batch proportion per
element, averaged after the loss: the "ensemble" reading, where the batch average and
the loss are swapped). Randomness is separate from the tensor maths: :func:`draw_mask`
draws β from a ``torch.Generator``, :func:`mix` is a pure function of (real, fake, β).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MIXED_BATCH_LOSSES = ("ns", "lsgan")


class MixedBatch(NamedTuple):
    """A mixed batch: ``images[i]`` is ``real[i]`` where ``mask[i]`` and ``fake[i]`` elsewhere;
    ``target`` = mean(mask), the proportion of real elements (0-d, the images' dtype)."""

    images: Tensor
    mask: Tensor
    target: Tensor


def check_loss(kind: str) -> None:
    """Raise ValueError unless mixed batches apply to the GAN loss ``kind`` (config key ``loss``)."""
    if kind in MIXED_BATCH_LOSSES:
        return
    # Imported here: the trainer's step imports this module, and fastgan.train's package imports the trainer.
    from fastgan.train.config import LOSSES

    if kind in LOSSES:
        raise ValueError(
            f"loss={kind!r} does not apply to mixed batches (mixed_batches=true): D predicts the proportion of real "
            f"images as a probability, trained by cross-entropy against the true proportion, and a {kind} critic's "
            f"unbounded score has no proportion to match; use loss=ns (the paper's) or loss=lsgan"
        )
    raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(MIXED_BATCH_LOSSES)} for mixed batches")


def draw_mask(batch_size: int, smoothing: bool = True, p: Optional[float] = None,
              generator: Optional[torch.Generator] = None, device=None) -> Tensor:
    """β of shape (batch_size,), bool: element i is real with probability p.

    p is drawn once for the batch: U[0, 1) with ``smoothing`` (batch smoothing), else 0 or 1
    with probability ½ each (pure batches). A given ``p`` in [0, 1] is used as it is (p = 0:
    all fake, p = 1: all real). Draws come from ``generator`` on its own device (the mask is
    then moved to ``device`` if that is another), or from torch's default generator on ``device``."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer of at least 1, got {batch_size!r}")
    draw_on = generator.device if generator is not None else device
    if p is None:
        u = torch.rand((), generator=generator, device=draw_on)
        p = u if smoothing else (u < 0.5).to(u.dtype)
    elif not 0 <= p <= 1:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    # U[0, 1) < p: never for p = 0, always for p = 1.
    mask = torch.rand(batch_size, generator=generator, device=draw_on) < p
    return mask if device is None else mask.to(device)


def mix(real: Tensor, fake: Tensor, mask: Tensor) -> MixedBatch:
    """The mixed batch of ``real`` and ``fake`` (same shape (B, ...), floating point) under
    ``mask`` (bool, (B,)); gradients flow to the elements taken from each."""
    if not (real.is_floating_point() and fake.is_floating_point()):
        raise ValueError(f"real and fake must be floating point, got {real.dtype} and {fake.dtype}")
    if real.shape != fake.shape or real.dim() < 1:
        raise ValueError(f"real and fake must have the same shape (B, ...), got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.shape[0] == 0:
        raise ValueError("real and fake are an empty batch: a mixed batch needs at least one element for its proportion")
    if mask.dtype != torch.bool or tuple(mask.shape) != (real.shape[0],):
        raise ValueError(f"mask must be a bool tensor of shape ({real.shape[0]},), got {mask.dtype} of shape {tuple(mask.shape)}")
    selector = mask.to(real.device).reshape(-1, *([1] * (real.dim() - 1)))
    images = torch.where(selector, real, fake)
    return MixedBatch(images, mask, mask.to(device=real.device, dtype=real.dtype).mean())


def mixed_batch(real: Tensor, fake: Tensor, smoothing: bool = True, p: Optional[float] = None,
                generator: Optional[torch.Generator] = None) -> MixedBatch:
    """:func:`draw_mask` for ``real``'s batch size and device, then :func:`mix`."""
    mask = draw_mask(real.shape[0], smoothing, p, generator, None if generator is not None else real.device)
    return mix(real, fake, mask)


def _check_logits(logits: Tensor, target: Optional[Tensor] = None) -> None:
    if not logits.is_floating_point() or logits.dim() > 1:
        raise ValueError(f"logits must be a floating-point tensor of shape () or (B,), got {logits.dtype} "
                         f"of shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError("logits are empty (a batch of 0 elements): the loss would be a mean over nothing, NaN")
    if target is not None and target.dim() != 0:
        raise ValueError(f"target must be the batch's proportion of real elements, shape (), got {tuple(target.shape)}")
    # Its value is checked where that costs no device synchronization (every D step would pay it)
    if target is not None and target.device.type == "cpu" and not 0 <= float(target) <= 1:
        raise ValueError(f"target must be the batch's proportion of real elements, in [0, 1], got {float(target)}")


def discriminator_loss(kind: str, logits: Tensor, target: Tensor) -> Tensor:
    """D's loss on a mixed batch: ``ns``: cross-entropy between σ(logits) and the proportion
    ``target`` (a number or a 0-d tensor in [0, 1]; checked on the CPU, not on a GPU, where
    reading it would synchronize every step); ``lsgan``: ½(σ(logits) − target)². Logits of
    shape (B,) average the loss over the elements' predictions. For target 1 / 0 these equal the real / fake terms of
    :func:`fastgan.train.losses.discriminator_loss`."""
    check_loss(kind)
    target = torch.as_tensor(target, device=logits.device) if isinstance(target, (int, float)) else target
    _check_logits(logits, target)
    target = target.to(logits.dtype).expand_as(logits)
    if kind == "ns":
        return F.binary_cross_entropy_with_logits(logits, target)
    return (logits.sigmoid() - target).square().mean() / 2


def generator_loss(kind: str, logits: Tensor) -> Tensor:
    """G's non-saturating loss on D's logits for a batch of G's samples: the target "all
    real" (``ns``: −log σ(logits); ``lsgan``: ½(σ(logits) − 1)²), as
    :func:`fastgan.train.losses.generator_loss` for a single sample."""
    check_loss(kind)
    _check_logits(logits)
    if kind == "ns":
        return F.softplus(-logits).mean()
    return (logits.sigmoid() - 1).square().mean() / 2


__all__ = ["MIXED_BATCH_LOSSES", "MixedBatch", "check_loss", "draw_mask", "mix", "mixed_batch",
           "discriminator_loss", "generator_loss"]
