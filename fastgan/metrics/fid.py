"""FID: streaming feature statistics and the Fréchet distance between two sets of them.

:class:`FeatureStatistics` accumulates n, Σx and Σ x xᵀ of feature batches in float64
(mergeable by addition, across batches and processes), gives μ and the unbiased Σ,
caches the factor of Σ used by the symmetric square root (reference statistics are
reused across evaluations), and saves/loads pytorch-fid-compatible ``.npz`` files
(keys ``mu`` and ``sigma``).

:class:`FID` is a metric object (``update`` / ``compute`` / ``reset``, reduced across
processes): ``update(features, real=...)`` with Inception pool features (N, 2048), or
images when it was built with a feature extractor.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from fastgan.metrics.base import Metric, check_floating_finite
from fastgan.ops import frechet as ops
from fastgan.reference import frechet as reference


class FeatureStatistics:
    """μ and Σ of a feature set, accumulated batch by batch."""

    def __init__(self, mean: Optional[Tensor] = None, covariance: Optional[Tensor] = None, count: int = 0) -> None:
        self.count = count
        self.batches = 0
        self._total: Optional[Tensor] = None
        self._outer: Optional[Tensor] = None
        self._mean, self._covariance = mean, covariance
        self._factor: Optional[Tensor] = None

    def update(self, features: Tensor) -> "FeatureStatistics":
        if self._total is None and self._mean is not None:
            raise ValueError("these statistics were loaded as (mu, sigma); they cannot be updated with features")
        if features.dim() != 2:
            raise ValueError(f"features must be (N, d), got shape {tuple(features.shape)} in batch {self.batches + 1}")
        check_floating_finite("features", features, self.batches + 1)
        total, outer = ops.feature_moments(features)
        if self._total is None:
            self._total, self._outer = total, outer
        else:
            self._total, self._outer = self._total + total, self._outer + outer
        self.count += features.shape[0]
        self.batches += 1
        self._mean = self._covariance = self._factor = None
        return self

    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        """Add another accumulator's batches (e.g. another process's) to this one."""
        merged = FeatureStatistics()
        merged.count, merged.batches = self.count + other.count, self.batches + other.batches
        merged._total, merged._outer = self._total + other._total, self._outer + other._outer
        return merged

    @property
    def mean(self) -> Tensor:
        self._materialize()
        return self._mean

    @property
    def covariance(self) -> Tensor:
        self._materialize()
        return self._covariance

    def factor(self) -> Tensor:
        """R with R Rᵀ = Σ, computed once and reused by every FID against these statistics."""
        if self._factor is None:
            self._factor = reference.symmetric_factor(self.covariance.double())
        return self._factor

    def _materialize(self) -> None:
        if self._mean is not None:
            return
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 feature vectors, got {self.count}")
        self._mean, self._covariance = reference.statistics_from_moments(self.count, self._total, self._outer)

    def save(self, path: str) -> None:
        """Write ``mu`` and ``sigma`` (float64) to ``path`` (.npz), atomically."""
        tmp = f"{path}.tmp-{os.getpid()}.npz"
        np.savez(tmp, mu=self.mean.cpu().numpy(), sigma=self.covariance.cpu().numpy(), count=self.count)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> "FeatureStatistics":
        if not os.path.exists(path):
            raise FileNotFoundError(f"no statistics file at {path}")
        with np.load(path) as data:
            if "mu" not in data or "sigma" not in data:
                raise ValueError(f"{path} is not an FID statistics file: it needs arrays 'mu' and 'sigma', has {list(data.keys())}")
            mean, covariance = torch.from_numpy(data["mu"]).double(), torch.from_numpy(data["sigma"]).double()
            count = int(data["count"]) if "count" in data else 0
        if mean.dim() != 1 or covariance.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"{path}: mu {tuple(mean.shape)} and sigma {tuple(covariance.shape)} do not fit together")
        return cls(mean, covariance, count)


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics, method: str = "auto") -> float:
    """FID between two statistics objects (``a`` is the reference; its factor is cached)."""
    factor = a.factor() if method in ("auto", "symmetric") and a.mean.device.type == "cpu" else None
    return float(ops.frechet_distance(a.mean, a.covariance, b.mean, b.covariance, method, factor))


class FID(Metric):
    """Fréchet Inception Distance as a metric object.

    ``FID(feature_extractor)``: ``update(images, real=True/False)`` runs the extractor
    (e.g. :class:`fastgan.metrics.inception.InceptionV3`); without one, ``update`` takes
    features (N, feature_dim). ``set_real_statistics`` fixes the real side (e.g. loaded
    from an ``.npz``) instead of accumulating it."""

    def __init__(self, feature_extractor: Optional[Callable[[Tensor], Tensor]] = None, feature_dim: int = 2048,
                 method: str = "auto") -> None:
        super().__init__()
        self.feature_extractor = feature_extractor
        self.method = method
        self.real_statistics: Optional[FeatureStatistics] = None
        self._batches = 0
        for side in ("real", "fake"):
            self.add_state(f"{side}_count", torch.zeros((), dtype=torch.float64), "sum")
            self.add_state(f"{side}_total", torch.zeros(feature_dim, dtype=torch.float64), "sum")
            self.add_state(f"{side}_outer", torch.zeros(feature_dim, feature_dim, dtype=torch.float64), "sum")

    def set_real_statistics(self, statistics: FeatureStatistics) -> None:
        self.real_statistics = statistics

    @torch.no_grad()
    def update(self, batch: Tensor, real: bool) -> None:
        features = self.feature_extractor(batch) if self.feature_extractor is not None else batch
        check_floating_finite("features", features, self._batches + 1)
        side = "real" if real else "fake"
        total, outer = ops.feature_moments(features)
        setattr(self, f"{side}_count", getattr(self, f"{side}_count") + features.shape[0])
        setattr(self, f"{side}_total", getattr(self, f"{side}_total") + total.to(getattr(self, f"{side}_total").device))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + outer.to(getattr(self, f"{side}_outer").device))
        self._batches += 1

    def _statistics(self, states, side: str) -> FeatureStatistics:
        stats = FeatureStatistics()
        stats.count = int(states[f"{side}_count"])
        stats._total, stats._outer = states[f"{side}_total"], states[f"{side}_outer"]
        return stats

    def compute(self) -> float:
        states = self.reduced_states()
        real = self.real_statistics or self._statistics(states, "real")
        return frechet_distance(real, self._statistics(states, "fake"), self.method)

    def reset(self) -> None:
        super().reset()
        self._batches = 0
