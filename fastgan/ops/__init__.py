"""fastgan's custom ops (``torch.ops.fastgan.*``); importing this package registers them."""
from fastgan.ops.frechet import feature_moments, frechet_distance, trace_sqrt_product
from fastgan.ops.gradient_penalty import dragan_perturb, gp_interpolate, gp_penalty
from fastgan.ops.spectral_norm import (
    spectral_norm_power_iteration,
    spectral_norm_power_iteration_multi,
    spectral_normalize,
)

__all__ = [
    "dragan_perturb",
    "feature_moments",
    "frechet_distance",
    "gp_interpolate",
    "gp_penalty",
    "spectral_norm_power_iteration",
    "spectral_norm_power_iteration_multi",
    "spectral_normalize",
    "trace_sqrt_product",
]
