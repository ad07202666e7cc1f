"""A convolutional VAE seen through rate and distortion (Alemi et al. 2018, "Fixing a Broken ELBO").

For data x, an encoder e(z|x), a marginal m(z) and a decoder d(x|z), all in nats per image:

* rate        R = E_x KL(e(z|x) ‖ m(z)),
* distortion  D = −E_x E_{z~e(z|x)} log d(x|z),
* ELBO        = −(D + R).

For any such model the mutual information of the encoder's joint satisfies
H − D ≤ I(X; Z) ≤ R, where H is the entropy of the data distribution. fastgan's
decoders are *discrete* distributions over the 256 levels of 8-bit pixels (or over
{0, 1} for the Bernoulli decoder), so D ≥ 0 and H is a plain Shannon entropy: for a
training set taken as the data distribution (each image drawn with its share of the set),
H = −Σ p log p over its distinct images, log N when all N are distinct
(:func:`empirical_entropy`). The β-VAE objective is D + β·R.

The encoder is SNDCGAN's discriminator trunk ending in a linear layer to the posterior's
mean and log standard deviation (a diagonal Gaussian); the decoder is SNDCGAN's generator
trunk whose last deconvolution outputs the decoder's parameters per pixel.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgan.models.layers import init_weights
from fastgan.models.sndcgan import discriminator_trunk, generator_trunk

LIKELIHOODS = ("logistic", "gaussian", "bernoulli")
MARGINALS = ("gaussian", "vamp")
PIXEL_LEVELS = 256
_LOG_2PI = math.log(2 * math.pi)


class RateDistortion(NamedTuple):
    """Per-sample rate and distortion, shape (B,), in nats."""

    rate: Tensor
    distortion: Tensor

    def elbo(self) -> Tensor:
        return -(self.rate + self.distortion)

    def objective(self, beta: float) -> Tensor:
        """The β-VAE loss D + β·R, averaged over the batch."""
        return (self.distortion + beta * self.rate).mean()


def empirical_entropy(counts: Sequence[int]) -> float:
    """H in nats of a training set drawn uniformly, entry by entry, from the number of times
    ``counts`` each distinct image occurs: −Σ (c/N) log(c/N) with N = Σ c; log N when every
    image is distinct (duplicates weigh as often as they are drawn)."""
    if not counts or min(counts) < 1:
        raise ValueError(f"the data set needs at least one image, and counts of at least 1, got {list(counts)[:8]}")
    total = sum(counts)
    return math.log(total) - sum(c * math.log(c) for c in counts) / total


def gaussian_log_density(x: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(x; mean, exp(log_std)²) elementwise."""
    return -0.5 * (((x - mean) * torch.exp(-log_std)) ** 2 + _LOG_2PI) - log_std


def kl_diagonal_gaussians(mean_q: Tensor, log_std_q: Tensor, mean_p: Tensor, log_std_p: Tensor) -> Tensor:
    """KL(N(mean_q, σ_q²) ‖ N(mean_p, σ_p²)) elementwise (sum over the last axis for a diagonal Gaussian)."""
    variance_ratio = torch.exp(2 * (log_std_q - log_std_p))
    mean_term = ((mean_q - mean_p) * torch.exp(-log_std_p)) ** 2
    return 0.5 * (variance_ratio + mean_term - 1) - (log_std_q - log_std_p)


def _log_difference_of_cdfs(upper: Tensor, lower: Tensor, cdf_log: callable) -> Tensor:
    """log(F(upper) − F(lower)) for a standardized CDF F given through ``cdf_log(t) = log F(t)``,
    evaluated on the side of the distribution where it does not cancel."""
    # By symmetry F(b) − F(a) = F(−a) − F(−b); use the tail with the smaller values.
    flip = (upper + lower) > 0
    hi = torch.where(flip, -lower, upper)
    lo = torch.where(flip, -upper, lower)
    log_hi, log_lo = cdf_log(hi), cdf_log(lo)
    return log_hi + torch.log1p(-torch.exp(torch.clamp(log_lo - log_hi, max=0.0)).clamp(max=1 - 1e-12))


def discretized_log_prob(x: Tensor, mean: Tensor, log_scale: Tensor, family: str, levels: int = PIXEL_LEVELS) -> Tensor:
    """log P(x) for pixels x in [0, 1] on ``levels`` equally spaced values, under a logistic or
    Gaussian of ``mean``, scale exp(log_scale) discretized into bins of width 1/(levels − 1)
    (the outermost bins extend to ±∞, so the probabilities sum to 1)."""
    if family not in ("logistic", "gaussian"):
        raise ValueError(f"discretized_log_prob: family must be 'logistic' or 'gaussian', got {family!r}")
    half_bin = 0.5 / (levels - 1)
    inv_scale = torch.exp(-log_scale)
    upper = torch.where(x >= 1 - half_bin, torch.full_like(x, math.inf), (x + half_bin - mean) * inv_scale)
    lower = torch.where(x <= half_bin, torch.full_like(x, -math.inf), (x - half_bin - mean) * inv_scale)
    if family == "logistic":
        cdf_log = F.logsigmoid
    else:
        cdf_log = torch.special.log_ndtr
    return _log_difference_of_cdfs(upper, lower, cdf_log)


class DiagonalGaussianMarginal(nn.Module):
    """m(z) = N(μ, diag σ²) with learned μ, log σ (initialised to N(0, I))."""

    def __init__(self, z_dim: int) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.zeros(z_dim))
        self.log_std = nn.Parameter(torch.zeros(z_dim))

    def log_prob(self, z: Tensor) -> Tensor:
        return gaussian_log_density(z, self.mean, self.log_std).sum(-1)

    def sample(self, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
        noise = torch.randn(count, self.mean.numel(), generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + noise * torch.exp(self.log_std)


class VampMarginal(nn.Module):
    """m(z) = (1/K) Σ_k e(z | u_k): a mixture of the encoder's posteriors at K learned
    pseudo-images u_k (VampPrior, Tomczak & Welling 2018)."""

    def __init__(self, vae: "VAE", components: int) -> None:
        super().__init__()
        if components < 1:
            raise ValueError(f"the vamp marginal needs at least 1 component, got {components}")
        size = vae.image_size
        self.pseudo_images = nn.Parameter(torch.rand(components, 3, size, size))
        # Not a submodule: the encoder is registered on the VAE already.
        self._posterior = vae.posterior

    def _components(self):
        return self._posterior(self.pseudo_images.clamp(0, 1))

    def log_prob(self, z: Tensor) -> Tensor:
        mean, log_std = self._components()
        per_component = gaussian_log_density(z.unsqueeze(1), mean, log_std).sum(-1)  # (B, K)
        return torch.logsumexp(per_component, dim=1) - math.log(mean.shape[0])

    def sample(self, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
        mean, log_std = self._components()
        pick = torch.randint(mean.shape[0], (count,), generator=generator, device=mean.device)
        noise = torch.randn(count, mean.shape[1], generator=generator, device=mean.device, dtype=mean.dtype)
        return mean[pick] + noise * torch.exp(log_std[pick])


class VAE(nn.Module):
    """A convolutional VAE on (B, 3, S, S) images in [0, 1] (S a multiple of 8).

    ``likelihood``: "logistic" (discretized logistic, 256 levels), "gaussian" (discretized
    Gaussian, 256 levels) or "bernoulli" (binary images; other values are rejected).
    ``marginal``: "gaussian" (learned diagonal Gaussian; the rate is the analytic KL) or
    "vamp" (mixture of ``components`` posteriors; the rate is a one-sample Monte Carlo estimate).
    ``forward(x)`` returns per-sample :class:`RateDistortion` with a reparameterized z.
    """

    def __init__(self, image_size: int = 32, z_dim: int = 64, width: float = 1.0, likelihood: str = "logistic",
                 marginal: str = "gaussian", components: int = 16) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"unknown VAE likelihood {likelihood!r}; choose one of {LIKELIHOODS}")
        if marginal not in MARGINALS:
            raise ValueError(f"unknown VAE marginal {marginal!r}; choose one of {MARGINALS}")
        if not isinstance(image_size, int) or image_size < 8 or image_size % 8:
            raise ValueError(f"the VAE needs image_size a positive multiple of 8, got {image_size!r}")
        if not isinstance(z_dim, int) or z_dim < 1:
            raise ValueError(f"z_dim must be an integer of at least 1, got {z_dim!r}")
        self.image_size = image_size
        self.z_dim = z_dim
        self.likelihood = likelihood
        trunk, features = discriminator_trunk(image_size, "none", width)
        self.encoder = nn.Sequential(*trunk, nn.Linear(features, 2 * z_dim))
        parameters_per_pixel = 1 if likelihood == "bernoulli" else 2
        self.decoder = nn.Sequential(*generator_trunk(z_dim, image_size, width, out_channels=3 * parameters_per_pixel))
        init_weights(self)
        self.marginal = DiagonalGaussianMarginal(z_dim) if marginal == "gaussian" else VampMarginal(self, components)

    def _check_images(self, x: Tensor) -> None:
        expected = (3, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"VAE expects images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("VAE got an empty batch: the rate and distortion need at least one image")
        # The decoders put their mass on the levels of [0, 1]: outside it (images in [-1, 1], NaN) the
        # distortion would be finite but meaningless, so refuse rather than mislead.
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(f"VAE expects pixel values in [0, 1], got values from {x.min().item():.4g} to "
                             f"{x.max().item():.4g} (or NaN); scale 8-bit images by 1/255")
        if self.likelihood == "bernoulli" and not bool(((x == 0) | (x == 1)).all()):
            raise ValueError("the bernoulli likelihood needs binary images (every pixel 0 or 1); "
                             "use likelihood 'logistic' or 'gaussian' for 8-bit images")

    def posterior(self, x: Tensor):
        """The encoder's diagonal Gaussian e(z|x): (mean, log_std), each (B, z_dim)."""
        mean, log_std = self.encoder(x).chunk(2, dim=1)
        return mean, log_std

    def decoder_log_prob(self, x: Tensor, z: Tensor) -> Tensor:
        """log d(x|z) summed over pixels, (B,)."""
        params = self.decoder(z)
        if self.likelihood == "bernoulli":
            return -F.binary_cross_entropy_with_logits(params, x, reduction="none").flatten(1).sum(1)
        mean, log_scale = params.chunk(2, dim=1)
        return discretized_log_prob(x, torch.sigmoid(mean), log_scale, self.likelihood).flatten(1).sum(1)

    def forward(self, x: Tensor, generator: Optional[torch.Generator] = None) -> RateDistortion:
        self._check_images(x)
        mean, log_std = self.posterior(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + noise * torch.exp(log_std)
        if isinstance(self.marginal, DiagonalGaussianMarginal):
            rate = kl_diagonal_gaussians(mean, log_std, self.marginal.mean, self.marginal.log_std).sum(1)
        else:
            rate = gaussian_log_density(z, mean, log_std).sum(1) - self.marginal.log_prob(z)
        return RateDistortion(rate, -self.decoder_log_prob(x, z))

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The decoder's mean image at the posterior mean."""
        self._check_images(x)
        return self.decode_mean(self.posterior(x)[0])

    def decode_mean(self, z: Tensor) -> Tensor:
        """d(x|z)'s location per pixel, in [0, 1] (the Bernoulli probability for "bernoulli")."""
        params = self.decoder(z)
        if self.likelihood != "bernoulli":
            params = params.chunk(2, dim=1)[0]
        return torch.sigmoid(params)

    @torch.no_grad()
    def sample(self, count: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """``count`` images decoded (as means) from z ~ m(z)."""
        return self.decode_mean(self.marginal.sample(count, generator))
