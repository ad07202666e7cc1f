"""Pieces every compare_gan model shares: the Generator / Discriminator bases
(input checks, initialisation, spectral norm), D's normalization layers, BN
settings and the [0, 1] -> [-1, 1] input rescale."""
from __future__ import annotations

from torch import Tensor, nn

from fastgan.nn import apply_spectral_norm

D_NORMALIZATIONS = ("none", "batch", "layer", "spectral")

# compare_gan's GAN Landscape configs: BN decay 0.9 (torch momentum = 1 - decay), eps 1e-5.
BN_MOMENTUM = 0.1
BN_EPS = 1e-5
# compare_gan's D layer norm is tf.contrib.layers.layer_norm, whose variance epsilon is fixed
# at 1e-12; torch's default 1e-5 would damp low-contrast inputs (the first ResNet block
# normalizes the raw image).
LN_EPS = 1e-12
INIT_STD = 0.02


def batch_norm_2d(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def scale_channels(channels, width: float) -> tuple:
    """Channel counts times ``width`` (at least 1 each): narrower models for quick runs; 1 is the paper's."""
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    return tuple(max(1, round(c * width)) for c in channels)


def check_normalization(normalization: str) -> None:
    if normalization not in D_NORMALIZATIONS:
        raise ValueError(f"unknown discriminator normalization {normalization!r}; choose one of {D_NORMALIZATIONS}")


def d_norm_layer(normalization: str, channels: int) -> nn.Module:
    """D's feature normalization for ``channels`` channels: BatchNorm2d for "batch";
    GroupNorm(1, C) for "layer" (statistics over C, H, W of each sample, affine per
    channel, eps 1e-12, like tf.contrib's layer_norm); Identity for "none" and "spectral"
    (spectral norm acts on the weights, see :class:`Discriminator`)."""
    check_normalization(normalization)
    if normalization == "batch":
        return batch_norm_2d(channels)
    if normalization == "layer":
        return nn.GroupNorm(1, channels, eps=LN_EPS)
    return nn.Identity()


def init_weights(model: nn.Module) -> None:
    """compare_gan's initialisation: conv / linear weights N(0, 0.02), biases 0.
    Norm layers keep torch's own init, which is compare_gan's (weight 1, bias 0)."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(module.weight, 0.0, INIT_STD)
            nn.init.zeros_(module.bias)


class SignedRange(nn.Module):
    """Maps images from [0, 1] to [-1, 1] (x·2 − 1)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 2 - 1


class Generator(nn.Module):
    """Base of the generators: ``G(z)`` maps z of shape (B, z_dim) to images
    (B, 3, image_size, image_size) in [0, 1] through ``layers``."""

    def __init__(self, z_dim: int, image_size: int, layers: nn.Sequential) -> None:
        super().__init__()
        self.z_dim = z_dim
        self.image_size = image_size
        self.layers = layers
        init_weights(self)

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() != 2 or z.shape[1] != self.z_dim:
            raise ValueError(f"{type(self).__name__} expects z of shape (B, {self.z_dim}), got {tuple(z.shape)}")
        return self.layers(z)


class Discriminator(nn.Module):
    """Base of the discriminators: ``D(x)`` maps images (B, 3, image_size, image_size)
    in [0, 1] to logits of shape (B,) through ``layers`` (which end in a linear
    layer to one unit). With ``normalization="spectral"`` every conv and linear
    weight is spectrally normalized by :func:`fastgan.nn.apply_spectral_norm`."""

    def __init__(self, image_size: int, normalization: str, layers: nn.Sequential) -> None:
        super().__init__()
        check_normalization(normalization)
        self.image_size = image_size
        self.normalization = normalization
        self.layers = layers
        init_weights(self)
        if normalization == "spectral":
            # After init: spectral norm's warm-up power iterations run on the initial weights.
            apply_spectral_norm(self)

    def forward(self, x: Tensor) -> Tensor:
        expected = (3, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"{type(self).__name__} expects images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        return self.layers(x).squeeze(1)
