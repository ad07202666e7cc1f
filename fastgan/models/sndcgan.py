"""SNDCGAN (Miyato et al. 2018, as in compare_gan's ``architectures/sndcgan.py``)."""
from __future__ import annotations

from torch import nn

from fastgan.models.layers import (BN_EPS, BN_MOMENTUM, Discriminator, Generator, SignedRange, batch_norm_2d, d_norm_layer,
                                   scale_channels)

# (out channels, kernel, stride) of D's convs; padding 1 is TF's SAME for all of them.
D_CONVS = ((64, 3, 1), (128, 4, 2), (128, 3, 1), (256, 4, 2), (256, 3, 1), (512, 4, 2), (512, 3, 1))
G_CHANNELS = (512, 256, 128, 64)
LEAK = 0.1


class SNDCGANGenerator(Generator):
    """SNDCGAN's generator; image_size S a multiple of 8.

    z → linear to S/8·S/8·512 → BN → ReLU → reshape (512, S/8, S/8); three
    ConvTranspose 4×4 stride 2 (padding 1, TF's SAME) to 256, 128, 64 channels,
    each BN + ReLU; ConvTranspose 3×3 stride 1 to 3; tanh; (x+1)/2.
    Output (B, 3, S, S) in [0, 1].

    Trainable parameters (z_dim 128): 3,828,739 at S = 32; 19,926,019 at S = 128.
    """

    def __init__(self, z_dim: int = 128, image_size: int = 32, width: float = 1.0) -> None:
        layers = generator_trunk(z_dim, image_size, width, out_channels=3) + [nn.Tanh(), _UnitRange()]
        super().__init__(z_dim, image_size, nn.Sequential(*layers))


def generator_trunk(z_dim: int, image_size: int, width: float, out_channels: int) -> list:
    """SNDCGAN G's layers up to its last deconvolution (to ``out_channels``), before the output
    nonlinearity; shared with the VAE decoder, which outputs distribution parameters instead of pixels."""
    channels = scale_channels(G_CHANNELS, width)
    base = image_size // 8
    features = channels[0] * base * base
    layers = [
        nn.Linear(z_dim, features),
        # Per feature, as compare_gan normalizes the flat linear output before the reshape.
        nn.BatchNorm1d(features, eps=BN_EPS, momentum=BN_MOMENTUM),
        nn.ReLU(),
        nn.Unflatten(1, (channels[0], base, base)),
    ]
    for c_in, c_out in zip(channels, channels[1:]):
        layers += [nn.ConvTranspose2d(c_in, c_out, 4, 2, padding=1), batch_norm_2d(c_out), nn.ReLU()]
    layers.append(nn.ConvTranspose2d(channels[-1], out_channels, 3, 1, padding=1))
    return layers


class SNDCGANDiscriminator(Discriminator):
    """SNDCGAN's discriminator; image_size S a multiple of 8.

    x·2−1; convs 3×3 s1 64, 4×4 s2 128, 3×3 s1 128, 4×4 s2 256, 3×3 s1 256,
    4×4 s2 512, 3×3 s1 512 (padding 1), each followed by leaky ReLU 0.1;
    flatten; linear → 1. Output: logits (B,).

    Normalization: "spectral" normalizes every conv and the linear layer, as
    compare_gan does. compare_gan's SNDCGAN D has no batch or layer norm at all: the
    paper-era code asserts ``discriminator_normalization`` in (none, spectral_norm)
    for SNDCGAN, and the later ``architectures/sndcgan.py`` only switches SN on or off.
    "batch" / "layer" are therefore fastgan's extension (no paper number to compare
    with): BatchNorm2d / GroupNorm(1, C) between every conv but the first and its
    leaky ReLU, the placement of compare_gan's DCGAN D (norm after every conv but the
    first, before the activation).

    Trainable parameters: 5,860,865 at S = 32 and 5,983,745 at S = 128 for "none"
    and "spectral"; "batch" and "layer" add 3,584 affine parameters (5,864,449 and
    5,987,329).
    """

    def __init__(self, image_size: int = 32, normalization: str = "spectral", width: float = 1.0) -> None:
        layers, features = discriminator_trunk(image_size, normalization, width)
        super().__init__(image_size, normalization, nn.Sequential(*layers, nn.Linear(features, 1)))


def discriminator_trunk(image_size: int, normalization: str, width: float):
    """SNDCGAN D's layers up to the flattened features, and their count; shared with the VAE encoder."""
    channels = scale_channels([c for c, _, _ in D_CONVS], width)
    layers = [SignedRange()]
    for index, (c_in, c_out, (_, kernel, stride)) in enumerate(zip((3, *channels), channels, D_CONVS)):
        norm = [d_norm_layer(normalization, c_out)] if index > 0 else []
        layers += [nn.Conv2d(c_in, c_out, kernel, stride, padding=1), *norm, nn.LeakyReLU(LEAK)]
    side = image_size // 8
    layers.append(nn.Flatten())
    return layers, channels[-1] * side * side


class _UnitRange(nn.Module):
    """Maps tanh's [-1, 1] to the [0, 1] images compare_gan works with."""

    def forward(self, x):
        return (x + 1) / 2
