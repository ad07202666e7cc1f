"""Inception Score (Salimans et al., 2016) on the logits of the TF FID Inception.

Conventions (those of the original ``inception_score.py`` of openai/improved-gan):

- input: logits, shape (N, num_classes), num_classes = 1008 for the 2015-12-05 TF
  Inception graph (1000 ImageNet classes, a background class and 7 unused outputs;
  the softmax runs over all 1008, as in the original code);
- the samples are cut, in the order they were given, into ``splits`` consecutive parts
  with boundaries ``i * N // splits`` (unequal sizes when N is not a multiple); with
  ``shuffle_seed`` they are first put in the order ``numpy.random.RandomState(seed).permutation(N)``
  (torch-fidelity's convention, whose default seed is 2020; the ``is`` command uses it, since
  a folder read in name order may hold its classes in runs, which consecutive splits would
  keep apart);
- per part: IS = exp(mean_x KL(p(y|x) || p(y))), p(y) the mean of p(y|x) over the part;
- ``compute()`` returns (mean, std) over the parts, std with 1/splits (numpy's
  ``np.std``), both as float64 0-dim tensors on the logits' device.

Everything is computed in float64 from log-softmax, so a class probability that
underflows contributes 0 (the original float32 code gives NaN there via log(0)).

Under ``torch.distributed`` every rank returns the same value; the samples are
concatenated in rank order before splitting, so rank r should hold the r-th block of
the sample for the splits to match a single-process run (see base.py).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from fastgan.metrics.base import Metric, check_floating_finite


class InceptionScore(Metric):
    """IS = exp(E_x KL(p(y|x) || p(y))) over ``splits`` consecutive parts of the sample
    (after a permutation seeded by ``shuffle_seed``, when given).

    ``update(logits)`` with logits of shape (N, num_classes); ``compute()`` ->
    (mean, std) over the splits, float64.
    """

    def __init__(self, splits: int = 10, num_classes: int = 1008, shuffle_seed: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(splits, int) or splits < 1:
            raise ValueError(f"splits must be a positive int, got {splits!r}")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if shuffle_seed is not None and (not isinstance(shuffle_seed, int) or not 0 <= shuffle_seed < 2**32):
            raise ValueError(f"shuffle_seed must be None or an int in [0, 2**32), got {shuffle_seed!r}")
        self.splits = splits
        self.num_classes = num_classes
        self.shuffle_seed = shuffle_seed
        self.add_state("logits", [], "cat")
        self._batches_seen = 0

    def reset(self) -> None:
        super().reset()
        self._batches_seen = 0

    def update(self, logits: Tensor) -> None:
        self._batches_seen += 1
        check_floating_finite("logits", logits, self._batches_seen)
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have shape (N, {self.num_classes}), got {tuple(logits.shape)} "
                f"(batch {self._batches_seen})")
        self.logits.append(logits.detach())

    def check_count(self, num_samples: int) -> None:
        """Raise ValueError unless ``num_samples`` fill the splits (``compute`` checks what it got,
        the command line the image count before any logit is computed)."""
        if num_samples < self.splits:
            raise ValueError(
                f"InceptionScore needs at least splits={self.splits} samples (one per split), got {num_samples}")

    def compute(self) -> Tuple[Tensor, Tensor]:
        logits = self.reduced_states()["logits"]
        num_samples = logits.shape[0]
        self.check_count(num_samples)
        if self.shuffle_seed is not None:
            order = np.random.RandomState(self.shuffle_seed).permutation(num_samples)
            logits = logits[torch.from_numpy(order).to(logits.device)]
        log_probs = torch.log_softmax(logits.to(torch.float64), dim=1)
        split_scores = []
        for i in range(self.splits):
            part = log_probs[i * num_samples // self.splits:(i + 1) * num_samples // self.splits]
            # log p(y) = log mean_x p(y|x), formed in log space so that no class underflows to log(0)
            log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])
            mean_kl = (part.exp() * (part - log_marginal)).sum(dim=1).mean()
            split_scores.append(mean_kl.exp())
        split_scores = torch.stack(split_scores)
        return split_scores.mean(), split_scores.std(unbiased=False)
