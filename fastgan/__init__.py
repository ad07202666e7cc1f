"""fastgan: fused kernels for training and evaluating GANs in PyTorch.

``import fastgan`` registers the ``fastgan::*`` ops with ``torch.library``.
``fastgan.backends()`` reports which kernels are built and usable here;
``fastgan.use_backend(name)`` (or ``FASTGAN_BACKEND``) forces one.
"""
from fastgan._backend import BACKENDS, backends, use_backend
from fastgan import ops, nn, penalties

__version__ = "0.1.0"
__all__ = ["BACKENDS", "backends", "use_backend", "ops", "nn", "penalties", "__version__"]
