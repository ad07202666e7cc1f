"""The base of fastgan's metrics: states that accumulate with ``update`` and reduce across processes.

A metric declares its states with :meth:`Metric.add_state`, each with a reduction:
``"sum"`` (tensors added across processes), ``"cat"`` (lists of tensors
concatenated along dim 0 across processes, in rank order; dtypes promote as ``torch.cat``'s
do, and ranks whose per-sample shapes differ raise ValueError on every rank) or
``"custom"`` (tensors the metric's :meth:`Metric.reduce_custom_states` combines: FID's
moments, taken about each process's own shift). ``compute`` works on
:meth:`Metric.reduced_states`, which equals the local states in a single process and
the all-process reduction under ``torch.distributed`` -- so every rank computes the
same value, as with torchmetrics.
"""
from __future__ import annotations

import functools
from typing import Dict, List, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

State = Union[Tensor, List[Tensor]]


def check_floating_finite(name: str, value, batch_number: Optional[int] = None) -> None:
    """Reject non-tensors, non-floating dtypes and NaN/Inf, naming the batch of a metric's
    ``update`` calls (``batch_number``; None for a plain function's argument, which has none)."""
    batch = "" if batch_number is None else f" (batch {batch_number})"
    if not isinstance(value, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}{batch}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be floating-point, got dtype {value.dtype}{batch}")
    if not bool(torch.isfinite(value).all()):
        where = "" if batch_number is None else \
            f" of batch {batch_number} (counting update calls from 1 since the last reset)"
        raise ValueError(f"{name}{where} contains NaN or Inf")


def _collective_device(group, device: torch.device) -> torch.device:
    """Where a collective of ``group`` can take a tensor that lives on ``device``: NCCL moves GPU
    tensors only, so CPU states go through the process's current GPU there."""
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def all_reduced_sum(value: Tensor, group) -> Tensor:
    """``value`` summed over the processes of ``group``, on ``value``'s device (a copy)."""
    reduced = value.to(_collective_device(group, value.device), copy=True)
    dist.all_reduce(reduced, group=group)
    return reduced.to(value.device)


def _gather_cat(tensors: List[Tensor], group) -> Tensor:
    """Concatenate every rank's tensors (different lengths, or none at all) in rank order, on
    this rank's device of them (the CPU for a rank that has none)."""
    world = dist.get_world_size(group)
    local = torch.cat(tensors) if tensors else None
    meta = None if local is None else (local.shape[0], tuple(local.shape[1:]), local.dtype)
    metas: List = [None] * world
    dist.all_gather_object(metas, meta, group=group)
    known = [m for m in metas if m is not None]
    if not known:
        return torch.empty(0)
    trailing = known[0][1]
    if any(m[1] != trailing for m in known):
        # Every rank sees the same metas, so all raise here; below, a smaller shape would broadcast
        # silently into the buffer, a larger one fail on its rank alone while the others wait.
        shapes = ", ".join(f"rank {rank}: {m[1]}" for rank, m in enumerate(metas) if m is not None)
        raise ValueError(f"the processes hold samples of different shapes ({shapes}); every rank must "
                         "update with the same per-sample shape")
    dtype = functools.reduce(torch.promote_types, (m[2] for m in known))  # as torch.cat in one process
    home = local.device if local is not None else torch.device("cpu")
    longest = max(m[0] if m is not None else 0 for m in metas)
    padded = torch.zeros((longest,) + trailing, dtype=dtype, device=_collective_device(group, home))
    if local is not None:
        padded[: local.shape[0]] = local
    gathered = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return torch.cat([g[: (m[0] if m is not None else 0)] for g, m in zip(gathered, metas)]).to(home)


class Metric:
    """update() / compute() / reset(), with states reduced across processes."""

    def __init__(self) -> None:
        self._defaults: Dict[str, State] = {}
        self._reductions: Dict[str, str] = {}
        self.process_group = None
        self._device: Optional[torch.device] = None  # set by to(); reset() keeps it

    def add_state(self, name: str, default: State, reduction: str) -> None:
        if reduction not in ("sum", "cat", "custom"):
            raise ValueError(f"reduction must be 'sum', 'cat' or 'custom', got {reduction!r}")
        if reduction == "cat" and default != []:
            raise ValueError("a 'cat' state starts as an empty list")
        self._defaults[name] = default
        self._reductions[name] = reduction
        setattr(self, name, [] if reduction == "cat" else default.clone())

    def reset(self) -> None:
        for name, default in self._defaults.items():
            setattr(self, name, [] if self._reductions[name] == "cat" else default.to(device=self._device, copy=True))

    def to(self, device) -> "Metric":
        """The states, and any network the metric holds (FID's feature extractor, when it is an
        ``nn.Module``), moved to ``device``. States keep their dtypes (sums are float64)."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"{type(self).__name__}.to takes a device, got the dtype {device}; a metric's states "
                            "keep their own dtypes (its sums are float64 whatever the inputs)")
        self._device = torch.device(device)
        for name, reduction in self._reductions.items():
            value = getattr(self, name)
            setattr(self, name, [t.to(device) for t in value] if reduction == "cat" else value.to(device))
        for value in vars(self).values():
            if isinstance(value, nn.Module):
                value.to(device)
        return self

    def reduced_states(self) -> Dict[str, Tensor]:
        """Every state, reduced over all processes when torch.distributed is initialized;
        'cat' states come back as one concatenated tensor, 'custom' ones as
        :meth:`reduce_custom_states` makes them."""
        distributed = dist.is_available() and dist.is_initialized()
        out = {}
        for name, reduction in self._reductions.items():
            value = getattr(self, name)
            if reduction == "cat":
                out[name] = _gather_cat(value, self.process_group) if distributed else (torch.cat(value) if value else torch.empty(0))
            else:
                out[name] = all_reduced_sum(value, self.process_group) if distributed and reduction == "sum" else value
        if distributed and "custom" in self._reductions.values():
            out = self.reduce_custom_states(out)
        return out

    def reduce_custom_states(self, states: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """``states`` with the local 'custom' states replaced by their all-process reduction
        (called on every process, under torch.distributed only)."""
        raise NotImplementedError(f"{type(self).__name__} declares 'custom' states but does not reduce them")

    def update(self, *args, **kwargs) -> None:
        raise NotImplementedError

    def compute(self):
        raise NotImplementedError


class FeatureSets(Metric):
    """A metric of two sets of feature vectors, real and fake (KID, Geometry Score).

    ``update(real_features=None, fake_features=None)`` takes (N, d) batches of either or
    both; both are validated (floating, finite, 2-D, one d throughout) before either is
    stored, so a bad call leaves the state untouched. The states ``real_features`` and
    ``fake_features`` concatenate across processes in rank order."""

    def __init__(self) -> None:
        super().__init__()
        self.add_state("real_features", [], "cat")
        self.add_state("fake_features", [], "cat")
        self._batches_seen = 0
        self._dimension: Optional[int] = None

    def reset(self) -> None:
        super().reset()
        self._batches_seen = 0
        self._dimension = None

    def _check_features(self, name: str, features, dimension: Optional[int]) -> int:
        """Validate one side of a call against the width ``dimension`` known so far (None: none
        yet); return the width. Nothing is recorded here: a call is stored only whole."""
        check_floating_finite(name, features, self._batches_seen)
        if features.dim() != 2:
            raise ValueError(
                f"{name} must have shape (N, d), got {tuple(features.shape)} (batch {self._batches_seen}); "
                f"flatten images with .flatten(1)")
        if dimension is not None and features.shape[1] != dimension:
            raise ValueError(
                f"{name} has {features.shape[1]} features per sample in batch {self._batches_seen}, "
                f"the features given before have {dimension}")
        return features.shape[1]

    def update(self, real_features: Optional[Tensor] = None, fake_features: Optional[Tensor] = None) -> None:
        self._batches_seen += 1
        if real_features is None and fake_features is None:
            raise ValueError(f"{type(self).__name__}.update needs real_features or fake_features (batch {self._batches_seen})")
        dimension = self._dimension
        for name, features in (("real_features", real_features), ("fake_features", fake_features)):
            if features is not None:
                dimension = self._check_features(name, features, dimension)
        self._dimension = dimension
        if real_features is not None:
            self.real_features.append(real_features.detach())
        if fake_features is not None:
            self.fake_features.append(fake_features.detach())
