"""The study's GAN losses on D's logits; every term is a batch mean.

``discriminator_loss(kind, real_logits, fake_logits)`` and
``generator_loss(kind, fake_logits)``, with x the logits of real and y of fake samples:

* ``ns`` (non-saturating): L_D = softplus(-x) + softplus(y), L_G = softplus(-y).
* ``wgan``: L_D = y - x, L_G = -y.
* ``lsgan``: compare_gan's least squares, on sigmoid(D) (not on the raw logits) and
  halved: L_D = ½[(σ(x) - 1)² + σ(y)²], L_G = ½(σ(y) - 1)².
* ``hinge``: L_D = relu(1 - x) + relu(1 + y), L_G = -y.

The losses keep the logits' dtype (float64 logits give float64 losses).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fastgan.train.config import LOSSES


def _check(kind: str) -> None:
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSSES)}")


def discriminator_loss(kind: str, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    _check(kind)
    if kind == "ns":
        return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
    if kind == "wgan":
        return fake_logits.mean() - real_logits.mean()
    if kind == "lsgan":
        return ((real_logits.sigmoid() - 1).square().mean() + fake_logits.sigmoid().square().mean()) / 2
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_loss(kind: str, fake_logits: Tensor) -> Tensor:
    _check(kind)
    if kind == "ns":
        return F.softplus(-fake_logits).mean()
    if kind == "lsgan":
        return (fake_logits.sigmoid() - 1).square().mean() / 2
    return -fake_logits.mean()


def l2_penalty(discriminator: nn.Module) -> Tensor:
    """compare_gan's L2 penalty: the *mean* over D's kernels of ``tf.nn.l2_loss(W)`` = ½‖W‖².

    Kernels are the conv and linear weights, i.e. D's parameters of two or more dimensions
    (under spectral norm the raw, unnormalized W); biases and normalization scales are
    excluded, as compare_gan penalizes only variables named ``kernel``."""
    kernels = [p for p in discriminator.parameters() if p.dim() > 1]
    if not kernels:
        raise ValueError(f"l2_penalty: {type(discriminator).__name__} has no weight of 2+ dimensions")
    return sum(w.square().sum() for w in kernels) / (2 * len(kernels))


__all__ = ["discriminator_loss", "generator_loss", "l2_penalty"]
