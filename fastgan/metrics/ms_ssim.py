"""MS-SSIM (Wang, Simoncelli & Bovik, 2003) and the MS-SSIM diversity score of GAN samples.

The diversity score (Odena et al. 2017; Fedus, Rosca et al. 2018, Sec. 5.3; the GAN
Landscape) is the mean MS-SSIM over pairs of generated images: lower = more diverse.
It is meaningful on single-class data (CelebA, one ImageNet class), where real image
pairs give a reference level.

MS-SSIM conventions (Wang et al., as in TF's ``tf.image.ssim_multiscale`` and
compare_gan's ``image_similarity.py``):

- images (N, C, H, W), floating, values in [0, data_range] (data_range = 1.0 by
  default; tanh outputs must be mapped with (x + 1) / 2 first), checked on update;
- 5 scales with exponents (0.0448, 0.2856, 0.3001, 0.2363, 0.1333); contrast-structure
  cs at the 4 finer scales, full SSIM (luminance * cs) at the coarsest;
- Gaussian window 11x11, sigma 1.5, normalized to sum 1, "valid" filtering (no
  padding); K1 = 0.01, K2 = 0.03, C1 = (K1 L)^2, C2 = (K2 L)^2, no covariance
  compensation (as MATLAB);
- between scales: 2x2 average pooling; an odd height or width is first padded by
  repeating its last row / column (MATLAB's 'symmetric' filtering), so a side s
  becomes ceil(s / 2);
- small images: at every scale the window is min(11, height, width) taps on each side
  (a sigma-1.5 Gaussian over that many taps, renormalized), as compare_gan does.
  Images of at least 161 px on each side keep the 11-tap window at all five scales
  (TF's ``ssim_multiscale`` and pytorch-msssim refuse anything smaller); below that the
  coarse scales use a smaller window, e.g. 32x32 images give scales 32, 16, 8, 4, 2 px
  with windows 11, 11, 8, 4, 2. Scores of small images are therefore comparable with
  compare_gan, not with implementations that pad or refuse;
- per channel: cs and SSIM are averaged over the positions, negative values are
  clipped to 0 (ReLU, as TF), the clipped values are raised to the exponents and
  multiplied; the result is then averaged over the channels.

Pairs for the diversity score (compare_gan's ``ms_ssim_score.py`` draws 5 shuffled
batches of 64 generated images and averages MS-SSIM over all pairs of distinct
images within each batch): ``MSSSIM`` stores the images it is given and, in
``compute()``, draws ``subsets`` subsets of ``subset_size`` distinct images
(``g = torch.Generator().manual_seed(seed)`` created afresh per compute, one
``torch.randperm(N, generator=g)[:subset_size]`` per subset, subset_size capped at N,
at least 2 images needed) and scores all subset_size * (subset_size - 1) / 2 unordered
pairs of each (MS-SSIM is symmetric, so this equals compare_gan's mean over ordered
pairs). ``compute()`` returns (mean, std) of the per-subset means, std with 1/subsets,
as float64 0-dim tensors on the images' device. With ``subset_size >= N`` and
``subsets=1`` the score is the exact mean over all pairs of the sample.

All math is in float64. Images are stored in the dtype they arrive in; under
``torch.distributed`` they are concatenated in rank order, and every rank computes
the same value.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastgan.metrics.base import Metric, check_floating_finite

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

# Pair products are filtered this many elements at a time (float64: 128 MiB per temporary).
_ELEMENTS_PER_CHUNK = 2 ** 24


def _gaussian_window(taps: int, sigma: float, dtype: torch.dtype, device) -> Tensor:
    """1-D Gaussian of ``taps`` taps centred at (taps - 1) / 2, summing to 1; the 2-D
    window is its outer product with itself (the 2-D Gaussian is separable)."""
    coords = torch.arange(taps, dtype=dtype, device=device) - (taps - 1) / 2.0
    window = torch.exp(-0.5 * coords ** 2 / sigma ** 2)
    return window / window.sum()


# Sides up to this length are filtered by banded matmuls, longer ones by convolution: a
# matmul does length/taps times the arithmetic but runs far faster than a float64
# convolution on CPU at GAN image sizes; at 1024 px the extra arithmetic would dominate.
_MATMUL_MAX_SIDE = 128


def _band_matrix(length: int, window: Tensor) -> Tensor:
    """(length - taps + 1, length) matrix whose row i holds the window at columns
    i .. i + taps - 1: multiplying by it is a "valid" correlation along one axis."""
    taps = window.shape[0]
    band = window.new_zeros(length - taps + 1, length)
    rows = torch.arange(length - taps + 1, device=window.device)[:, None]
    band[rows, rows + torch.arange(taps, device=window.device)] = window
    return band


def _filter_valid(images: Tensor, window: Tensor) -> Tensor:
    """Correlate every channel of (B, C, H, W) images with the separable window, no padding."""
    batch, channels, height, width = images.shape
    if max(height, width) <= _MATMUL_MAX_SIDE:
        return _band_matrix(height, window) @ images @ _band_matrix(width, window).T
    flat = images.reshape(batch * channels, 1, height, width)
    flat = F.conv2d(flat, window.view(1, 1, -1, 1))
    flat = F.conv2d(flat, window.view(1, 1, 1, -1))
    return flat.reshape(batch, channels, flat.shape[-2], flat.shape[-1])


def _halve(images: Tensor) -> Tensor:
    """2x2 average pooling; an odd side is padded by repeating its last row / column."""
    height, width = images.shape[-2:]
    if height % 2 or width % 2:
        images = F.pad(images, (0, width % 2, 0, height % 2), mode="replicate")
    return F.avg_pool2d(images, 2)


def _pairwise_ms_ssim(images: Tensor, first: Tensor, second: Tensor, weights: Sequence[float],
                      window_size: int, sigma: float, k1: float, k2: float, data_range: float) -> Tensor:
    """MS-SSIM of images[first[p]] against images[second[p]] for every pair p -> (P,).

    The per-image local means and second moments are filtered once per scale; only the
    cross moment E[xy] is filtered per pair, in chunks that bound the memory."""
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    num_pairs, channels = first.shape[0], images.shape[1]
    factors = images.new_ones(num_pairs, channels)
    level = images
    for scale, weight in enumerate(weights):
        if scale > 0:
            level = _halve(level)
        height, width = level.shape[-2:]
        window = _gaussian_window(min(window_size, height, width), sigma, level.dtype, level.device)
        means = _filter_valid(level, window)
        second_moments = _filter_valid(level * level, window)
        coarsest = scale == len(weights) - 1
        chunk = max(1, _ELEMENTS_PER_CHUNK // level[0].numel())
        for start in range(0, num_pairs, chunk):
            a, b = first[start:start + chunk], second[start:start + chunk]
            mean_a, mean_b = means[a], means[b]
            cross_moment = _filter_valid(level[a] * level[b], window)
            mean_product = mean_a * mean_b
            mean_squares = mean_a * mean_a + mean_b * mean_b
            contrast_structure = (2.0 * (cross_moment - mean_product) + c2) / (
                second_moments[a] + second_moments[b] - mean_squares + c2)
            if coarsest:
                luminance = (2.0 * mean_product + c1) / (mean_squares + c1)
                term = (luminance * contrast_structure).mean(dim=(-2, -1))
            else:
                term = contrast_structure.mean(dim=(-2, -1))
            factors[start:start + chunk] *= term.clamp_min(0.0) ** weight
    return factors.mean(dim=1)


def ms_ssim(x: Tensor, y: Tensor, *, data_range: float = 1.0, weights: Sequence[float] = MS_SSIM_WEIGHTS,
            window_size: int = 11, sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """MS-SSIM of x[i] against y[i], (N, C, H, W) each -> (N,) in float64 (conventions: module docstring)."""
    for name, images in (("x", x), ("y", y)):
        check_floating_finite(name, images)
        if images.dim() != 4:
            raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(images.shape)}")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    images = torch.cat([x, y]).to(torch.float64)
    first = torch.arange(x.shape[0], device=images.device)
    return _pairwise_ms_ssim(images, first, first + x.shape[0], weights, window_size, sigma, k1, k2, data_range)


class MSSSIM(Metric):
    """MS-SSIM diversity: mean MS-SSIM over all pairs within random subsets of the images.

    ``update(images)`` with (N, C, H, W) images in [0, data_range]; ``compute()`` ->
    (mean, std) over the subsets' mean pairwise MS-SSIM, float64. Lower = more diverse.
    Defaults follow compare_gan: 5 subsets of 64 images.
    """

    def __init__(self, subsets: int = 5, subset_size: int = 64, seed: int = 0, data_range: float = 1.0,
                 weights: Sequence[float] = MS_SSIM_WEIGHTS, window_size: int = 11, sigma: float = 1.5,
                 k1: float = 0.01, k2: float = 0.03) -> None:
        super().__init__()
        if not isinstance(subsets, int) or subsets < 1:
            raise ValueError(f"subsets must be a positive int, got {subsets!r}")
        if not isinstance(subset_size, int) or subset_size < 2:
            raise ValueError(f"subset_size must be an int >= 2, got {subset_size!r}")
        if not data_range > 0:
            raise ValueError(f"data_range must be positive, got {data_range!r}")
        if len(weights) < 1:
            raise ValueError("weights needs one exponent per scale, got none")
        if not isinstance(window_size, int) or window_size < 1:
            raise ValueError(f"window_size must be a positive int, got {window_size!r}")
        self.subsets = subsets
        self.subset_size = subset_size
        self.seed = seed
        self.data_range = float(data_range)
        self.weights = tuple(float(w) for w in weights)
        self.window_size = window_size
        self.sigma = float(sigma)
        self.k1, self.k2 = float(k1), float(k2)
        self.add_state("images", [], "cat")
        self._batches_seen = 0
        self._image_shape = None

    def reset(self) -> None:
        super().reset()
        self._batches_seen = 0
        self._image_shape = None

    def update(self, images: Tensor) -> None:
        self._batches_seen += 1
        check_floating_finite("images", images, self._batches_seen)
        if images.dim() != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)} "
                             f"(batch {self._batches_seen})")
        if self._image_shape is not None and tuple(images.shape[1:]) != self._image_shape:
            raise ValueError(f"images of batch {self._batches_seen} have shape (C, H, W) = "
                             f"{tuple(images.shape[1:])}, earlier batches {self._image_shape}")
        if images.numel() and (images.min() < 0 or images.max() > self.data_range):
            raise ValueError(
                f"images of batch {self._batches_seen} have values in [{images.min().item():.4g}, "
                f"{images.max().item():.4g}], outside [0, data_range={self.data_range:g}]; "
                "map tanh outputs with (x + 1) / 2, or clamp")
        self._image_shape = tuple(images.shape[1:])
        self.images.append(images.detach())

    def compute(self) -> Tuple[Tensor, Tensor]:
        images = self.reduced_states()["images"]
        num_images = images.shape[0]
        if num_images < 2:
            raise ValueError(f"MSSSIM needs at least 2 images to form a pair, got {num_images}")
        size = min(self.subset_size, num_images)
        first, second = torch.triu_indices(size, size, offset=1, device=images.device)
        generator = torch.Generator().manual_seed(self.seed)
        subset_means = []
        for _ in range(self.subsets):
            index = torch.randperm(num_images, generator=generator)[:size].to(images.device)
            scores = _pairwise_ms_ssim(images[index].to(torch.float64), first, second, self.weights,
                                       self.window_size, self.sigma, self.k1, self.k2, self.data_range)
            subset_means.append(scores.mean())
        subset_means = torch.stack(subset_means)
        return subset_means.mean(), subset_means.std(unbiased=False)
