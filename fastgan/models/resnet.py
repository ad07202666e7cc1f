"""ResNet models of compare_gan: ``resnet_cifar`` (Miyato et al. 2018, Table 4) and
``resnet19`` (compare_gan's ``resnet5``, the GAN Landscape paper's "ResNet19").

Both use one residual block per network (compare_gan's ``resnet_ops.ResNetBlock``):
the shortcut is always a 3×3 conv, re-sampled like the main path. G up-samples by
zero insertion ("unpool": each value goes to the top-left of a 2×2 block of
zeros) before its first conv; D average-pools 2×2 after its second conv. D
applies no [0, 1] → [-1, 1] rescale: compare_gan feeds its ResNet D the [0, 1]
images as they are.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from fastgan.models.layers import Discriminator, Generator, batch_norm_2d, d_norm_layer, scale_channels


def conv3x3(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, 1, padding=1)


class Unpool(nn.Module):
    """×2 up-sampling by zero insertion: x[i, j] goes to (2i, 2j), zeros elsewhere."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        spread = F.pad(x.reshape(b, c, h, 1, w, 1), (0, 1, 0, 0, 0, 1))
        return spread.reshape(b, c, 2 * h, 2 * w)


class _Residual(nn.Module):
    def __init__(self, main: nn.Sequential, shortcut: nn.Sequential) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x) + self.shortcut(x)


class GeneratorBlock(_Residual):
    """BN → ReLU → unpool → conv3×3 → BN → ReLU → conv3×3, plus unpool → conv3×3."""

    def __init__(self, c_in: int, c_out: int) -> None:
        main = nn.Sequential(
            batch_norm_2d(c_in), nn.ReLU(), Unpool(), conv3x3(c_in, c_out), batch_norm_2d(c_out), nn.ReLU(), conv3x3(c_out, c_out)
        )
        super().__init__(main, nn.Sequential(Unpool(), conv3x3(c_in, c_out)))


class DiscriminatorBlock(_Residual):
    """norm → ReLU → conv3×3 → norm → ReLU → conv3×3 (→ avgpool 2×2), plus
    conv3×3 (→ avgpool 2×2). The norms (see ``d_norm_layer``) sit before both
    ReLUs of every block, the first block's input included, as in compare_gan."""

    def __init__(self, c_in: int, c_out: int, normalization: str, downsample: bool) -> None:
        pool = [nn.AvgPool2d(2)] if downsample else []
        main = nn.Sequential(
            d_norm_layer(normalization, c_in),
            nn.ReLU(),
            conv3x3(c_in, c_out),
            d_norm_layer(normalization, c_out),
            nn.ReLU(),
            conv3x3(c_out, c_out),
            *pool,
        )
        super().__init__(main, nn.Sequential(conv3x3(c_in, c_out), *pool))


class ResNetGenerator(Generator):
    """linear → (channels[0], S/2^n, S/2^n); n = len(channels) − 1 up-blocks through
    ``channels``; BN → ReLU → conv3×3 → 3 → sigmoid. Output (B, 3, S, S) in [0, 1]."""

    def __init__(self, z_dim: int, image_size: int, channels: Sequence[int], width: float) -> None:
        channels = scale_channels(channels, width)
        base = image_size // 2 ** (len(channels) - 1)
        layers = [nn.Linear(z_dim, channels[0] * base * base), nn.Unflatten(1, (channels[0], base, base))]
        layers += [GeneratorBlock(c_in, c_out) for c_in, c_out in zip(channels, channels[1:])]
        layers += [batch_norm_2d(channels[-1]), nn.ReLU(), conv3x3(channels[-1], 3), nn.Sigmoid()]
        super().__init__(z_dim, image_size, nn.Sequential(*layers))


class ResNetDiscriminator(Discriminator):
    """Blocks from 3 channels through ``channels`` (block i down-samples iff
    ``downsample[i]``); ReLU; mean over H, W (compare_gan's reduce_mean); linear → 1.
    Output: logits (B,)."""

    def __init__(self, image_size: int, normalization: str, channels: Sequence[int], downsample: Sequence[bool],
                 width: float) -> None:
        channels = scale_channels(channels, width)
        layers = [
            DiscriminatorBlock(c_in, c_out, normalization, down)
            for c_in, c_out, down in zip((3, *channels[:-1]), channels, downsample, strict=True)
        ]
        layers += [nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], 1)]
        super().__init__(image_size, normalization, nn.Sequential(*layers))


class ResNetCifarGenerator(ResNetGenerator):
    """ResNet CIFAR generator; image_size S a multiple of 8 (32 in compare_gan).

    z → linear to (256, S/8, S/8); three up-blocks of 256; BN; ReLU; conv3×3 → 3;
    sigmoid. Output (B, 3, S, S) in [0, 1].

    Trainable parameters at S = 32, z_dim 128: 5,849,603.
    """

    def __init__(self, z_dim: int = 128, image_size: int = 32, width: float = 1.0) -> None:
        super().__init__(z_dim, image_size, (256, 256, 256, 256), width)


class ResNetCifarDiscriminator(ResNetDiscriminator):
    """ResNet CIFAR discriminator; image_size S a multiple of 8 (32 in compare_gan).

    Four blocks of 128 channels (down, down, none, none); ReLU; global mean pool;
    linear → 1. Output: logits (B,).

    Trainable parameters at S = 32: 1,483,137 for "none" and "spectral"; "batch" and
    "layer" add 1,798 (1,484,935).
    """

    def __init__(self, image_size: int = 32, normalization: str = "spectral", width: float = 1.0) -> None:
        super().__init__(image_size, normalization, (128, 128, 128, 128), (True, True, False, False), width)


class ResNet19Generator(ResNetGenerator):
    """ResNet19 generator; image_size S a multiple of 64 (128 in compare_gan).

    z → linear to (512, S/32, S/32); five up-blocks to 512, 256, 256, 128, 64; BN;
    ReLU; conv3×3 → 3; sigmoid. Output (B, 3, S, S) in [0, 1]. compare_gan's seed is
    always 4×4 (with fewer up-blocks below 128); here it scales with S, equal at 128.

    Trainable parameters at S = 128, z_dim 128: 13,786,115.
    """

    def __init__(self, z_dim: int = 128, image_size: int = 128, width: float = 1.0) -> None:
        super().__init__(z_dim, image_size, (512, 512, 256, 256, 128, 64), width)


class ResNet19Discriminator(ResNetDiscriminator):
    """ResNet19 discriminator; image_size S a multiple of 64 (128 in compare_gan).

    A down-block 3 → 64, then five down-blocks 64 → 128 → 256 → 256 → 512 → 512;
    ReLU; global mean pool; linear → 1. Output: logits (B,).

    Trainable parameters at S = 128: 15,086,529 for "none" and "spectral"; "batch" and
    "layer" add 5,894 (15,092,423).
    """

    def __init__(self, image_size: int = 128, normalization: str = "spectral", width: float = 1.0) -> None:
        super().__init__(image_size, normalization, (64, 128, 256, 256, 512, 512), (True,) * 6, width)
