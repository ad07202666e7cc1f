"""Permutation-invariant ("symmetric") discriminators for mixed batches (Lucas et al., ICML 2018).

:func:`make_symmetric` turns any fastgan discriminator into one that judges a batch as a
set. Every ``Conv2d`` of its layer stack becomes a :class:`BatchPooledConv2d`:

    y_i = W ∗ x_i + b + Γ ∗ ρ(x),     ρ(x) = (1/B) Σ_j x_j,

the layer's own convolution of element i plus a second convolution Γ (same geometry, no
bias) of the batch mean of the layer's input, the same for every element. Each such layer
is permutation-equivariant (permuting the batch permutes the outputs), so the whole stack
is; it builds up batch statistics layer by layer. The per-element logits are then
averaged over the batch to one logit per batch (invariant). This is the Deep Sets form
of an equivariant layer (Zaheer et al. 2017) applied to convolutions; the paper proves
such networks universal for symmetric functions.

One mechanism serves SNDCGAN's and the ResNets' D: the conversion walks the module tree
(residual main paths and shortcuts included). D's final linear layer stays per-element:
a pooled term there would be redundant, since the mean over the batch of
``w·h_i + b + γ·mean(h)`` is ``(w + γ)·mean(h) + b``.

Spectral norm composes: when D is spectrally normalized, the Γ convolutions are too
(:func:`fastgan.nn.apply_spectral_norm`, one grouped power iteration for them beside D's
own), so each equivariant layer has Lipschitz constant at most ‖W‖ + ‖Γ‖ = 2 in its input
batch. Γ is initialised like every other kernel (N(0, 0.02)).

Invariance is exact in real arithmetic; in floating point the batch means are sums whose
order follows the batch's, so a permuted batch gives the same logit up to round-off
(in float64 within 1e-12 relative; the tests measure it).
"""
from __future__ import annotations

from torch import Tensor, nn

from fastgan.models.layers import INIT_STD
from fastgan.nn import apply_spectral_norm


class BatchPooledConv2d(nn.Module):
    """``conv(x)`` plus a bias-free convolution ``pooled`` of the batch mean of x, added to
    every element (a permutation-equivariant layer). ``conv`` is the original layer, kept
    as it is (with its parametrizations); ``pooled`` has its geometry."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"BatchPooledConv2d takes plain convolutions (groups=1, zero padding), got {conv}")
        self.conv = conv
        # A parameter, not conv.weight: under spectral norm reading the weight runs a power iteration.
        like = next(conv.parameters())
        self.pooled = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                                conv.dilation, bias=False, device=like.device, dtype=like.dtype)
        nn.init.normal_(self.pooled.weight, 0.0, INIT_STD)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.pooled(x.mean(0, keepdim=True))


class SymmetricDiscriminator(nn.Module):
    """A discriminator over batches: ``D(x)`` maps a batch (B, 3, S, S) to one logit, shape (),
    invariant to the order of the batch; ``D(x, pool=False)`` gives the equivariant
    per-element logits (B,) whose mean that is. Built by :func:`make_symmetric`."""

    def __init__(self, discriminator: nn.Module) -> None:
        super().__init__()
        self.discriminator = discriminator
        self.image_size = discriminator.image_size
        self.normalization = discriminator.normalization

    def forward(self, x: Tensor, pool: bool = True) -> Tensor:
        if x.dim() >= 1 and x.shape[0] == 0:
            raise ValueError("the symmetric discriminator got an empty batch: its batch means (and logit) would be NaN")
        logits = self.discriminator(x)
        return logits.mean(0) if pool else logits


def make_symmetric(discriminator: nn.Module) -> SymmetricDiscriminator:
    """Convert ``discriminator`` (a :class:`fastgan.models.Discriminator`: SNDCGAN's, ResNet
    CIFAR's, ResNet19's) in place, every ``Conv2d`` becoming a :class:`BatchPooledConv2d`,
    and return the :class:`SymmetricDiscriminator` that owns it. Its existing weights are
    kept; the new Γ kernels are spectrally normalized when D is (``normalization="spectral"``)."""
    for attribute in ("image_size", "normalization"):
        if not hasattr(discriminator, attribute):
            raise ValueError(f"make_symmetric takes a fastgan discriminator (with .{attribute}), got {type(discriminator).__name__}")
    if any(isinstance(m, BatchPooledConv2d) for m in discriminator.modules()):
        raise ValueError(f"{type(discriminator).__name__} is already symmetric (it has BatchPooledConv2d layers)")
    converted = _convert(discriminator)
    if not converted:
        raise ValueError(f"{type(discriminator).__name__} has no Conv2d layer to make permutation-equivariant")
    symmetric = SymmetricDiscriminator(discriminator)
    if discriminator.normalization == "spectral":
        # D's own layers are parametrized already; this adds the Γ kernels, as one more group.
        apply_spectral_norm(symmetric)
    return symmetric


def _convert(module: nn.Module) -> int:
    """Replace the Conv2d children of ``module`` (recursively) by BatchPooledConv2d; their count."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            setattr(module, name, BatchPooledConv2d(child))
            count += 1
        else:
            count += _convert(child)
    return count


__all__ = ["BatchPooledConv2d", "SymmetricDiscriminator", "make_symmetric"]
