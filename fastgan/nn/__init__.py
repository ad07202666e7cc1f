"""Modules users put in their models."""
from fastgan.nn.batch_norm import CrossProcessBatchNorm, convert_batch_norm
from fastgan.nn.spectral_norm import SpectralNorm, apply_spectral_norm, spectral_norm
from fastgan.nn import utils

__all__ = ["CrossProcessBatchNorm", "convert_batch_norm", "SpectralNorm", "apply_spectral_norm", "spectral_norm", "utils"]
