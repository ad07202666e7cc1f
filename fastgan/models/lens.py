"""The lens of Tempered Adversarial Networks (Sajjadi, Parascandolo, Mehrjou, Schölkopf, ICML 2018).

The lens L sits between the real data and D: D sees L(x) instead of x. It is a small
residual convolutional network, L(x) = x + f(x), whose last convolution starts at zero,
so L is exactly the identity at initialisation. Its training objective and the schedule
that returns it to the identity are in :mod:`fastgan.tempered`.

f is ``depth`` 3×3 convolutions (padding 1: any image size), ``hidden`` channels, ReLU
between them; hidden layers keep PyTorch's default initialisation (a zero last layer
needs non-vanishing hidden activations to get a gradient at the identity). No
normalization layer: L acts on each image alone, the same in training and eval mode.
L(x) is not clamped to D's input range [0, 1]: the reconstruction term keeps it near x.
"""
from __future__ import annotations

from torch import Tensor, nn


class Lens(nn.Module):
    """L(x) = x + f(x) on images (B, channels, H, W); the identity at initialisation."""

    def __init__(self, channels: int = 3, hidden: int = 32, depth: int = 3) -> None:
        super().__init__()
        for name, value, least in (("channels", channels, 1), ("hidden", hidden, 1), ("depth", depth, 2)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"Lens {name} must be an integer of at least {least}, got {value!r}")
        self.channels = channels
        widths = [channels] + [hidden] * (depth - 1) + [channels]
        layers = []
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, 1, padding=1), nn.ReLU()]
        self.residual = nn.Sequential(*layers[:-1])  # no ReLU after the last convolution
        last = self.residual[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"Lens expects images of shape (B, {self.channels}, H, W), got {tuple(x.shape)}")
        return x + self.residual(x)


__all__ = ["Lens"]
