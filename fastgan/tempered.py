"""The lens objective of Tempered Adversarial Networks (Sajjadi et al., ICML 2018).

The lens L (:class:`fastgan.models.lens.Lens`) is trained against D: it tries to raise
D's loss on the lensed real images, while a reconstruction term keeps it near the
identity. Its loss at training step t is

    L_lens = λ(t) · (−L_D) + ‖L(x) − x‖²,

with L_D the discriminator's loss computed on the lensed reals (any fastgan loss, the
mixed-batch one included: the lens only enters through it), ‖·‖² the squared Euclidean
norm of each image's difference, averaged over the batch, and the paper's schedule for
the adversarial weight

    λ(t) = λ₀ · (1 − sin(π t / (2K)))  for t ≤ K,  0 after,

falling smoothly from λ₀ (1 in the paper) to 0 over K steps. Past K only the
reconstruction term is left, so the lens is trained back to the identity and D then sees
the real data as it is.
"""
from __future__ import annotations

import math
from typing import Optional, Union

from torch import Tensor


def lens_weight(step: int, steps: int, initial: float = 1.0) -> float:
    """λ(step): the weight of the lens's adversarial term, ``initial`` at step 0 and 0 from
    ``steps`` (K) on, following 1 − sin(π·step / (2K))."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"lens steps (K) must be an integer of at least 1, got {steps!r}")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an integer >= 0, got {step!r}")
    if not initial >= 0:
        raise ValueError(f"the lens's initial adversarial weight must be >= 0, got {initial!r}")
    if step >= steps:
        return 0.0
    return initial * (1.0 - math.sin(math.pi * step / (2 * steps)))


def reconstruction_error(lensed: Tensor, real: Tensor) -> Tensor:
    """‖L(x) − x‖²: the squared norm of each image's difference, averaged over the batch (0-d)."""
    if lensed.shape != real.shape or lensed.dim() < 2:
        raise ValueError(f"lensed and real must have the same shape (B, ...), got {tuple(lensed.shape)} and {tuple(real.shape)}")
    if lensed.shape[0] == 0:
        raise ValueError("lensed and real are an empty batch: the reconstruction error needs at least one image")
    return (lensed - real.detach()).square().flatten(1).sum(1).mean()


def lens_loss(discriminator_loss: Optional[Tensor], lensed: Tensor, real: Tensor,
              adversarial_weight: Union[float, Tensor]) -> Tensor:
    """The lens's loss: −adversarial_weight · ``discriminator_loss`` (D's loss on a batch whose
    real part is ``lensed`` = L(real), still attached to the lens) plus the reconstruction
    error. A float weight of 0 (past the schedule) lets ``discriminator_loss`` be None: D's
    forward on the lensed reals is then not needed for the lens. A 0-d tensor weight (a
    CUDA graph's input, updated in place) always takes D's loss: no branch on its value."""
    reconstruction = reconstruction_error(lensed, real)
    if not isinstance(adversarial_weight, Tensor):
        if not adversarial_weight >= 0:
            raise ValueError(f"adversarial_weight must be >= 0, got {adversarial_weight!r}")
        if adversarial_weight == 0:
            return reconstruction
    elif adversarial_weight.dim() != 0:
        raise ValueError(f"a tensor adversarial_weight must be 0-d, got shape {tuple(adversarial_weight.shape)}")
    if discriminator_loss is None or discriminator_loss.dim() != 0:
        got = "None" if discriminator_loss is None else f"shape {tuple(discriminator_loss.shape)}"
        raise ValueError(f"discriminator_loss must be D's scalar (0-d) loss while adversarial_weight > 0, got {got}")
    return reconstruction - adversarial_weight * discriminator_loss.to(reconstruction.dtype)


__all__ = ["lens_weight", "reconstruction_error", "lens_loss"]
