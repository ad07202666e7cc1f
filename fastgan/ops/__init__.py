"""fastgan's custom ops (``torch.ops.fastgan.*``); importing this package registers them."""
from fastgan.ops.gradient_penalty import dragan_perturb, gp_interpolate, gp_penalty
from fastgan.ops.spectral_norm import (
    spectral_norm_power_iteration,
    spectral_norm_power_iteration_multi,
    spectral_normalize,
)

__all__ = [
    "dragan_perturb",
    "gp_interpolate",
    "gp_penalty",
    "spectral_norm_power_iteration",
    "spectral_norm_power_iteration_multi",
    "spectral_normalize",
]
