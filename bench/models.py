"""Benchmark models, shapes from SPEC.md §3 (until fastgan.models lands)."""
from torch import nn

SNDCGAN_D_CONVS = [(3, 64, 3, 1), (64, 128, 4, 2), (128, 128, 3, 1), (128, 256, 4, 2), (256, 256, 3, 1), (256, 512, 4, 2), (512, 512, 3, 1)]


def sndcgan_discriminator(image_size: int = 32) -> nn.Sequential:
    """SNDCGAN's D for images in [0, 1]: x·2−1, seven convs with leaky ReLU 0.1, linear to one logit."""
    layers = [_Rescale()]
    for c_in, c_out, k, s in SNDCGAN_D_CONVS:
        layers += [nn.Conv2d(c_in, c_out, k, s, padding=1), nn.LeakyReLU(0.1)]
    side = image_size // 8
    layers += [nn.Flatten(), nn.Linear(512 * side * side, 1)]
    return nn.Sequential(*layers)


class _Rescale(nn.Module):
    def forward(self, x):
        return x * 2 - 1
