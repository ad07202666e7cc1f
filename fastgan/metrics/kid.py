"""Kernel Inception Distance (Binkowski et al., 2018, "Demystifying MMD GANs").

Conventions (those of the authors' ``polynomial_mmd_averages``, also used by
torch-fidelity and torchmetrics):

- input: features of real and generated images, shape (N, d) (d = 2048 for the pool
  features of the TF FID Inception), accumulated over ``update`` calls;
- kernel k(x, y) = (gamma * x.y + coef0) ** degree, gamma = 1/d by default, so the
  default is (x.y/d + 1)^3;
- per subset: m real and n fake samples drawn without replacement, and the unbiased
  estimate MMD^2 = sum_{i!=j} k(r_i, r_j) / (m(m-1)) + sum_{i!=j} k(f_i, f_j) / (n(n-1))
  - 2 mean_{i,j} k(r_i, f_j) (the cross term keeps its "diagonal", as the authors' code);
  it can be negative when the two distributions are close;
- m = n = subset_size samples per side and subset; a side with fewer samples than
  ``subset_size`` raises ValueError (as torch-fidelity and torchmetrics do) rather
  than silently using the whole set in every subset, which makes all subsets identical
  and the reported std 0; pass ``subset_size`` <= the smaller side explicitly;
- the draws: ``g = torch.Generator().manual_seed(seed)`` is created afresh in every
  ``compute()``, and for each subset ``torch.randperm(N_real, generator=g)[:m]`` then
  ``torch.randperm(N_fake, generator=g)[:n]``; the generator is on the CPU, so the
  same seed picks the same subsets on any device and on every rank;
- ``compute()`` returns (mean, std) of MMD^2 over the subsets, std with 1/subsets
  (numpy's ``np.std``), as float64 0-dim tensors on the features' device; all math in
  float64.

Features are stored in the dtype they arrive in (float32 features of 50k images take
400 MB per side) and converted to float64 subset by subset. Under ``torch.distributed``
the features are concatenated in rank order, so every rank computes the same value.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastgan.metrics.base import FeatureSets


class KID(FeatureSets):
    """Unbiased MMD^2 with a polynomial kernel, averaged over random subsets.

    ``update(real_features=None, fake_features=None)`` with (N, d) tensors (either or
    both per call); ``compute()`` -> (mean, std) over ``subsets`` subsets, float64.
    """

    def __init__(self, subsets: int = 100, subset_size: int = 1000, degree: int = 3,
                 gamma: Optional[float] = None, coef0: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(subsets, int) or subsets < 1:
            raise ValueError(f"subsets must be a positive int, got {subsets!r}")
        if not isinstance(subset_size, int) or subset_size < 2:
            raise ValueError(f"subset_size must be an int >= 2, got {subset_size!r}")
        if not isinstance(degree, int) or degree < 1:
            raise ValueError(f"degree must be a positive int, got {degree!r}")
        if gamma is not None and not gamma > 0:
            raise ValueError(f"gamma must be positive or None (1/d), got {gamma!r}")
        self.subsets = subsets
        self.subset_size = subset_size
        self.degree = degree
        self.gamma = gamma
        self.coef0 = float(coef0)
        self.seed = seed

    def _kernel(self, x: Tensor, y: Tensor) -> Tensor:
        gamma = 1.0 / x.shape[1] if self.gamma is None else self.gamma
        return (gamma * (x @ y.T) + self.coef0) ** self.degree

    def check_counts(self, num_real: int, num_fake: int) -> None:
        """Raise ValueError unless these sample counts allow this KID: ``compute`` checks what it
        got, the command line the image counts before any feature is extracted."""
        if num_real < 2 or num_fake < 2:
            raise ValueError(f"KID needs at least 2 real and 2 fake samples, got {num_real} real and {num_fake} fake")
        if self.subset_size > min(num_real, num_fake):
            raise ValueError(
                f"KID subset_size={self.subset_size} exceeds the samples available ({num_real} real, {num_fake} fake): "
                f"every subset would hold the whole set and the std would be 0; use subset_size <= "
                f"{min(num_real, num_fake)} (CLI: --subset-size), or more samples")

    def compute(self) -> Tuple[Tensor, Tensor]:
        states = self.reduced_states()
        real, fake = states["real_features"], states["fake_features"]
        num_real, num_fake = real.shape[0], fake.shape[0]
        self.check_counts(num_real, num_fake)
        if real.shape[1] != fake.shape[1]:
            raise ValueError(f"real features have {real.shape[1]} dimensions, fake features {fake.shape[1]}")
        m = n = self.subset_size
        generator = torch.Generator().manual_seed(self.seed)
        estimates = []
        for _ in range(self.subsets):
            real_index = torch.randperm(num_real, generator=generator)[:m].to(real.device)
            fake_index = torch.randperm(num_fake, generator=generator)[:n].to(fake.device)
            r = real[real_index].to(torch.float64)
            f = fake[fake_index].to(torch.float64)
            k_rr, k_ff, k_rf = self._kernel(r, r), self._kernel(f, f), self._kernel(r, f)
            estimates.append(
                (k_rr.sum() - k_rr.diagonal().sum()) / (m * (m - 1))
                + (k_ff.sum() - k_ff.diagonal().sum()) / (n * (n - 1))
                - 2.0 * k_rf.mean())
        estimates = torch.stack(estimates)
        return estimates.mean(), estimates.std(unbiased=False)
