"""Modules users put in their models."""
from fastgan.nn.spectral_norm import SpectralNorm, apply_spectral_norm, spectral_norm
from fastgan.nn import utils

__all__ = ["SpectralNorm", "apply_spectral_norm", "spectral_norm", "utils"]
