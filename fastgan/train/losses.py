"""The study's GAN losses (SPEC.md §1) on D's logits; every term is a batch mean.

``discriminator_loss(kind, real_logits, fake_logits)`` and
``generator_loss(kind, fake_logits)``. LSGAN follows compare_gan: squares of
sigmoid(D), not of the raw logits.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

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
        return (real_logits.sigmoid() - 1).square().mean() + fake_logits.sigmoid().square().mean()
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def generator_loss(kind: str, fake_logits: Tensor) -> Tensor:
    _check(kind)
    if kind == "ns":
        return F.softplus(-fake_logits).mean()
    if kind == "lsgan":
        return (fake_logits.sigmoid() - 1).square().mean()
    return -fake_logits.mean()


__all__ = ["discriminator_loss", "generator_loss"]
