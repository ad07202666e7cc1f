"""The GAN Landscape (compare_gan) reference models: SNDCGAN, ResNet CIFAR and ResNet19.

Images live in [0, 1], as in compare_gan: G ends in (tanh + 1)/2 or a sigmoid, and
D takes [0, 1] images (SNDCGAN's D rescales them to [-1, 1] itself). D returns
one logit per sample, shape (B,). G always uses batch norm; D uses the
normalization picked by ``d_norm`` (see :data:`D_NORMALIZATIONS`).
"""
from __future__ import annotations

from typing import Tuple, Union

from fastgan.models.layers import D_NORMALIZATIONS, Discriminator, Generator, check_normalization
from fastgan.models.lens import Lens
from fastgan.models.resnet import ResNet19Discriminator, ResNet19Generator, ResNetCifarDiscriminator, ResNetCifarGenerator
from fastgan.models.sndcgan import SNDCGANDiscriminator, SNDCGANGenerator
from fastgan.models.symmetric import SymmetricDiscriminator, make_symmetric

# architecture -> (generator class, discriminator class, image_size must be a multiple of this)
_MODELS = {
    "sndcgan": (SNDCGANGenerator, SNDCGANDiscriminator, 8),
    "resnet_cifar": (ResNetCifarGenerator, ResNetCifarDiscriminator, 8),
    "resnet19": (ResNet19Generator, ResNet19Discriminator, 64),
}
ARCHITECTURES = tuple(_MODELS)

__all__ = ["build_models", "check_model_shape", "ARCHITECTURES", "D_NORMALIZATIONS", "Generator", "Discriminator",
           "Lens", "SymmetricDiscriminator", "make_symmetric"]


def build_models(architecture: str, image_size: int = 32, z_dim: int = 128, d_norm: str = "spectral",
                 width: float = 1.0, symmetric: bool = False) -> Tuple[Generator, Union[Discriminator, SymmetricDiscriminator]]:
    """A freshly initialised (G, D) pair of ``architecture`` for image_size × image_size RGB images.

    image_size must be a positive multiple of 8 for "sndcgan" and "resnet_cifar"
    (G's seed is image_size/8 square, 4×4 at 32) and of 64 for "resnet19" (its seed
    is image_size/32 square, 4×4 at 128, and D halves the size six times).
    ``d_norm`` is one of :data:`D_NORMALIZATIONS`. ``width`` multiplies every channel
    count: 1 (the default) is the paper's model; narrower ones train in minutes on a
    CPU (``make demo``). ``symmetric`` gives D as a permutation-invariant discriminator of
    mixed batches (:func:`make_symmetric`: one logit per batch). Raises ValueError otherwise.
    """
    check_model_shape(architecture, image_size, z_dim)
    check_normalization(d_norm)
    generator_class, discriminator_class, _ = _MODELS[architecture]
    generator, discriminator = generator_class(z_dim, image_size, width), discriminator_class(image_size, d_norm, width)
    return generator, make_symmetric(discriminator) if symmetric else discriminator


def check_model_shape(architecture: str, image_size: int, z_dim: int) -> None:
    """Raise ValueError unless ``architecture`` exists and takes ``image_size`` and ``z_dim``
    (what :func:`build_models` checks, without building anything)."""
    if architecture not in _MODELS:
        raise ValueError(f"unknown architecture {architecture!r}; choose one of {ARCHITECTURES}")
    multiple = _MODELS[architecture][2]
    if not isinstance(image_size, int) or image_size < multiple or image_size % multiple:
        raise ValueError(f"{architecture} needs image_size a positive multiple of {multiple}, got {image_size!r}")
    if not isinstance(z_dim, int) or z_dim < 1:
        raise ValueError(f"z_dim must be an integer of at least 1, got {z_dim!r}")
