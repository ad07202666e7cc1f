"""FID: streaming feature statistics and the Fréchet distance between two sets of them.

:class:`FeatureStatistics` accumulates n, Σ(x − s) and Σ (x − s)(x − s)ᵀ of feature batches in
float64, about a shift s (the first batch's mean; moments about 0 would lose the covariance's
digits to a large common mean), mergeable across batches and processes (moved to one shift, then
added), gives μ and the unbiased Σ,
caches the factor of Σ used by the symmetric square root (reference statistics are
reused across evaluations), and saves/loads pytorch-fid-compatible ``.npz`` files
(keys ``mu`` and ``sigma``; fastgan adds ``count`` and, when known, ``resize``: the
preprocessing convention of :mod:`fastgan.metrics.images` the features were made with).
Each statistics object has a ``source`` (its file, folder, or what it was made from)
that error messages name; :func:`frechet_distance` refuses statistics of different
dimensions or conventions, and invalid ones (NaN, asymmetric, not positive semi-definite).

:class:`FID` is a metric object (``update`` / ``compute`` / ``reset``, reduced across
processes): ``update(features, real=...)`` with Inception pool features (N, 2048), or
images when it was built with a feature extractor.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from fastgan.files import atomic_file
from fastgan.metrics.base import Metric, all_reduced_sum, check_floating_finite
from fastgan.ops import frechet as ops
from fastgan.reference import frechet as reference


def _moments_about_shift(features: Tensor, shift: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """(shift, Σ(x − shift), Σ(x − shift)(x − shift)ᵀ) of a batch in float64, on the batch's
    device; ``shift`` None (a first batch): the batch's mean."""
    features = features.double()
    if shift is None:
        shift = features.mean(0)
    total, outer = ops.feature_moments(features - shift.to(features.device))
    return shift, total, outer


class FeatureStatistics:
    """μ and Σ of a feature set, accumulated batch by batch."""

    def __init__(self, mean: Optional[Tensor] = None, covariance: Optional[Tensor] = None, count: int = 0,
                 source: str = "features", resize: Optional[str] = None) -> None:
        self.count = count
        self.batches = 0
        self.source = source  # named in error messages: a file, a folder, "real features"...
        self.resize = resize  # the preprocessing convention of the images, when known
        self._checked = False
        self._total: Optional[Tensor] = None  # Σ(x − shift)
        self._outer: Optional[Tensor] = None  # Σ(x − shift)(x − shift)ᵀ
        self._shift: Optional[Tensor] = None
        self._mean, self._covariance = mean, covariance
        self._factor: Optional[Tensor] = None

    def update(self, features: Tensor) -> "FeatureStatistics":
        if self._total is None and self._mean is not None:
            raise ValueError("these statistics were loaded as (mu, sigma); they cannot be updated with features")
        if features.dim() != 2:
            raise ValueError(f"features must be (N, d), got shape {tuple(features.shape)} in batch {self.batches + 1}")
        check_floating_finite("features", features, self.batches + 1)
        self.batches += 1
        if features.shape[0] == 0:  # nothing to add (a process's empty shard), as KID takes it
            return self
        self._shift, total, outer = _moments_about_shift(features.detach(), self._shift)
        if self._total is None:
            self._total, self._outer = total, outer
        else:
            self._total, self._outer = self._total + total, self._outer + outer
        self.count += features.shape[0]
        self._mean = self._covariance = self._factor = None
        self._checked = False
        return self

    def merge(self, other: "FeatureStatistics") -> "FeatureStatistics":
        """This accumulator's batches and another's (e.g. another process's) as a new one. Either
        may be empty (a process that saw no images); statistics loaded as (μ, Σ) hold no sums to
        add, and statistics of another preprocessing convention do not mix: both raise ValueError."""
        for stats in (self, other):
            if stats._total is None and stats._mean is not None:
                raise ValueError(f"the statistics of {stats.source} were loaded as (mu, sigma) and cannot be merged: "
                                 "merging adds feature sums, which mu and sigma do not give back")
        mismatch = _convention_mismatch(self, other)
        if mismatch:
            raise ValueError(f"{mismatch}: features of different preprocessing conventions cannot be merged")
        merged = FeatureStatistics(source=self.source, resize=self.resize or other.resize)
        merged.count, merged.batches = self.count + other.count, self.batches + other.batches
        first, *rest = [stats for stats in (self, other) if stats._total is not None] or [merged]
        merged._shift, merged._total, merged._outer = first._shift, first._total, first._outer
        for stats in rest:
            total, outer = reference.recentered_moments(stats.count, stats._shift, stats._total, stats._outer, first._shift)
            merged._total, merged._outer = merged._total + total, merged._outer + outer
        return merged

    @classmethod
    def from_moments(cls, count: int, shift: Tensor, total: Tensor, outer: Tensor, source: str = "features",
                     resize: Optional[str] = None) -> "FeatureStatistics":
        """Statistics of ``count`` features with Σ(x − shift) = ``total`` and
        Σ(x − shift)(x − shift)ᵀ = ``outer`` (float64), as :meth:`update` accumulates them."""
        stats = cls(count=count, source=source, resize=resize)
        stats._shift, stats._total, stats._outer = shift, total, outer
        return stats

    @property
    def mean(self) -> Tensor:
        self._materialize()
        return self._mean

    @property
    def covariance(self) -> Tensor:
        self._materialize()
        return self._covariance

    @property
    def dim(self) -> int:
        """The feature dimension d."""
        known = self._mean if self._mean is not None else self._outer
        if known is None:
            raise ValueError(f"the statistics of {self.source} are empty: update() them with features first")
        return known.shape[0]

    def check(self) -> None:
        """Raise ValueError naming :attr:`source` unless μ and Σ are valid FID statistics
        (finite; Σ symmetric and positive semi-definite up to round-off); checked once."""
        if not self._checked:
            ops.check_statistics(self.mean, self.covariance, f"the statistics of {self.source}")
            self._checked = True

    def factor(self) -> Tensor:
        """R with R Rᵀ = Σ, computed once and reused by every FID against these statistics."""
        if self._factor is None:
            self._factor = reference.symmetric_factor(self.covariance.double())
        return self._factor

    def _materialize(self) -> None:
        if self._mean is not None:
            return
        if self.count < 2:
            raise ValueError(f"FID statistics need at least 2 feature vectors, the statistics of {self.source} "
                             f"have {self.count}")
        self._mean, self._covariance = reference.statistics_from_moments(self.count, self._total, self._outer, self._shift)

    @staticmethod
    def check_destination(path: str) -> None:
        """Raise FileNotFoundError naming the folder when ``path`` cannot be created there
        (called before the features are computed, so no work is lost)."""
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")

    def save(self, path: str) -> None:
        """Write ``mu`` and ``sigma`` (float64), ``count`` and ``resize`` to ``path`` (.npz), atomically."""
        self.check_destination(path)
        extra = {} if self.resize is None else {"resize": np.array(self.resize)}
        with atomic_file(Path(path)) as partial, open(partial, "wb") as f:  # a file object: savez adds no ".npz"
            np.savez(f, mu=self.mean.cpu().numpy(), sigma=self.covariance.cpu().numpy(), count=self.count, **extra)

    @classmethod
    def load(cls, path: str) -> "FeatureStatistics":
        if not os.path.exists(path):
            raise FileNotFoundError(f"no statistics file at {path}")
        try:
            data = np.load(path)  # allow_pickle=False: a pickle is refused, never run
            if not isinstance(data, np.lib.npyio.NpzFile):  # np.save's single array under an .npz name
                raise ValueError(f"it holds one {data.dtype} array of shape {data.shape} (.npy format)")
            with data:
                arrays = {key: data[key] for key in data.keys()}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:  # not a zip, truncated, a pickle...
            # numpy's text for a pickle advises allow_pickle=True, i.e. running what the file holds: never passed on
            why = ("it holds pickled Python objects, which fastgan never loads" if "pickle" in str(error)
                   else f"{type(error).__name__}: {error}")
            raise ValueError(f"{path} is not an FID statistics file (an .npz with arrays 'mu' and 'sigma'): {why}") from error
        if "mu" not in arrays or "sigma" not in arrays:
            raise ValueError(f"{path} is not an FID statistics file: it needs arrays 'mu' and 'sigma', has {sorted(arrays)}")
        if not all(arrays[key].dtype.kind in "fiu" for key in ("mu", "sigma")):
            raise ValueError(f"{path}: 'mu' and 'sigma' must be numeric arrays, got {arrays['mu'].dtype} and {arrays['sigma'].dtype}")
        mean, covariance = torch.from_numpy(arrays["mu"]).double(), torch.from_numpy(arrays["sigma"]).double()
        count = arrays.get("count", np.array(0))
        if count.ndim != 0 or count.dtype.kind not in "iu" or count < 0:
            raise ValueError(f"{path}: 'count' must be one integer >= 0 (the number of feature vectors), got "
                             f"{count.dtype} {count.shape}")
        count = int(count)
        resize = str(arrays["resize"]) if "resize" in arrays else None
        if mean.dim() != 1 or covariance.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"{path}: mu {tuple(mean.shape)} and sigma {tuple(covariance.shape)} do not fit together")
        return cls(mean, covariance, count, source=path, resize=resize)


def _convention_mismatch(a: FeatureStatistics, b: FeatureStatistics) -> Optional[str]:
    """What differs when both statistics know their preprocessing conventions and they differ."""
    if a.resize is not None and b.resize is not None and a.resize != b.resize:
        return (f"the statistics of {a.source} were computed with resize={a.resize!r} and those of {b.source} "
                f"with resize={b.resize!r}")
    return None


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics, method: str = "auto") -> float:
    """FID between two statistics objects (``a`` is the reference; its factor is cached).

    Checked first, naming each side's :attr:`~FeatureStatistics.source`: the same
    dimension, the same preprocessing convention when both are known, valid statistics."""
    if a.dim != b.dim:
        raise ValueError(f"the statistics of {a.source} have dimension {a.dim} and those of {b.source} {b.dim}: "
                         "FID compares features of the same network layer")
    mismatch = _convention_mismatch(a, b)
    if mismatch:
        raise ValueError(f"{mismatch}: FIDs across preprocessing conventions are not comparable")
    a.check()
    b.check()
    factor = a.factor() if method in ("auto", "symmetric") and a.mean.device.type == "cpu" else None
    # b meets a where a is (statistics loaded from a file are on the CPU, a metric's may be on a GPU)
    b_mean, b_covariance = b.mean.to(a.mean.device), b.covariance.to(a.mean.device)
    return float(ops.frechet_distance(a.mean, a.covariance, b_mean, b_covariance, method, factor,
                                      names=(f"the statistics of {a.source}", f"the statistics of {b.source}"),
                                      validate=False))


class FID(Metric):
    """Fréchet Inception Distance as a metric object.

    ``FID(feature_extractor)``: ``update(images, real=True/False)`` runs the extractor
    (e.g. :class:`fastgan.metrics.inception.InceptionV3`); without one, ``update`` takes
    features (N, feature_dim). ``set_real_statistics`` fixes the real side (e.g. loaded
    from an ``.npz``) instead of accumulating it; statistics saved with another preprocessing
    convention than the extractor's (its ``resize_convention``) are refused at ``compute``."""

    def __init__(self, feature_extractor: Optional[Callable[[Tensor], Tensor]] = None, feature_dim: int = 2048,
                 method: str = "auto") -> None:
        super().__init__()
        self.feature_extractor = feature_extractor
        self.feature_dim = feature_dim
        self.method = method
        self.real_statistics: Optional[FeatureStatistics] = None
        self._batches = 0
        # Moments about the first batch's mean (as FeatureStatistics takes them), each process
        # its own: reduce_custom_states moves them to the global mean before adding them.
        for side in ("real", "fake"):
            self.add_state(f"{side}_count", torch.zeros((), dtype=torch.float64), "custom")
            self.add_state(f"{side}_shift", torch.zeros(feature_dim, dtype=torch.float64), "custom")
            self.add_state(f"{side}_total", torch.zeros(feature_dim, dtype=torch.float64), "custom")
            self.add_state(f"{side}_outer", torch.zeros(feature_dim, feature_dim, dtype=torch.float64), "custom")

    def set_real_statistics(self, statistics: FeatureStatistics) -> None:
        """Fix the real side to ``statistics`` (e.g. loaded from an ``.npz``); from then on
        ``update(..., real=True)`` is refused rather than accumulated for nothing."""
        self.real_statistics = statistics

    @torch.no_grad()
    def update(self, batch: Tensor, real: bool) -> None:
        if real and self.real_statistics is not None:
            raise ValueError(f"FID.update(real=True): the real side is fixed by set_real_statistics "
                             f"({self.real_statistics.source}); update with fake images only, or make a new FID")
        features = self.feature_extractor(batch) if self.feature_extractor is not None else batch
        check_floating_finite("features", features, self._batches + 1)
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            source = "the feature extractor's output" if self.feature_extractor is not None else "features"
            raise ValueError(f"FID(feature_dim={self.feature_dim}).update: {source} must have shape "
                             f"(N, {self.feature_dim}), got {tuple(features.shape)} in batch {self._batches + 1}")
        self._batches += 1
        if features.shape[0] == 0:  # nothing to add (a process's empty shard), as KID takes it
            return
        side = "real" if real else "fake"
        count, shift = getattr(self, f"{side}_count"), getattr(self, f"{side}_shift")
        # the moments are taken where the features are, added where the states are
        new_shift, total, outer = _moments_about_shift(features, shift if count > 0 else None)
        setattr(self, f"{side}_shift", new_shift.to(shift.device))
        setattr(self, f"{side}_count", count + features.shape[0])
        setattr(self, f"{side}_total", getattr(self, f"{side}_total") + total.to(shift.device))
        setattr(self, f"{side}_outer", getattr(self, f"{side}_outer") + outer.to(shift.device))

    def reduce_custom_states(self, states):
        """Each side's moments moved from this process's shift to the global mean (one
        all-reduce of n and Σx), then added across processes (one all-reduce)."""
        for side in ("real", "fake"):
            count, shift, total, outer = (states[f"{side}_{key}"] for key in ("count", "shift", "total", "outer"))
            summed = all_reduced_sum(torch.cat([count.reshape(1), count * shift + total]), self.process_group)
            common = summed[1:] / summed[0].clamp(min=1)
            total, outer = reference.recentered_moments(count, shift, total, outer, common)
            moments = all_reduced_sum(torch.cat([total.reshape(1, -1), outer]), self.process_group)
            states.update({f"{side}_count": summed[0], f"{side}_shift": common,
                           f"{side}_total": moments[0], f"{side}_outer": moments[1:]})
        return states

    def _statistics(self, states, side: str) -> FeatureStatistics:
        return FeatureStatistics.from_moments(
            int(states[f"{side}_count"]), *(states[f"{side}_{key}"] for key in ("shift", "total", "outer")),
            source=f"the {side} features", resize=getattr(self.feature_extractor, "resize_convention", None))

    def compute(self) -> float:
        states = self.reduced_states()
        real = self.real_statistics or self._statistics(states, "real")
        return frechet_distance(real, self._statistics(states, "fake"), self.method)

    def reset(self) -> None:
        super().reset()
        self._batches = 0
