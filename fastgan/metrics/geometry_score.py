"""Geometry Score (Khrulkov & Oseledets, ICML 2018, "Geometry Score: A Method For
Comparing Generative Adversarial Networks").

The score compares the topology of two point sets (flattened images or their
features) through the 1-dimensional holes of witness complexes built on random
landmark subsets:

1. For one landmark set L (L_0 distinct points of X; every point of X is a witness),
   build gudhi's (weak, relaxed) witness complex from the table of each witness's
   landmarks sorted by Euclidean distance, up to dimension 2 and relaxation
   ``alpha_max = gamma * max_{w, l} d(w, l)``, and compute its persistent homology with
   Z/2 coefficients.
2. From the H1 intervals (infinite deaths clipped at ``alpha_max``) the relative living
   times: ``RLT[i]`` is the fraction of ``[0, alpha_max]`` during which exactly ``i`` holes
   are alive (i < i_max; with no H1 interval at all, ``RLT = (1, 0, 0, ...)``).
3. The MRLT is the mean RLT over ``n`` landmark sets; the Geometry Score of X and Y is
   ``sum_i (MRLT_X[i] - MRLT_Y[i])^2``.

Defaults are the authors': ``L_0 = 64``, ``n = 1000``, ``i_max = 100``,
``gamma = 1/128 * N/5000`` for N points. Landmark sets are drawn without replacement
(``torch.randperm``; the paper's L is a subset of X, and duplicated landmarks are
rejected), with the ``generator`` given or torch's default one. ``replace=True`` draws
them as the authors' code does (``np.random.choice(N, L_0)``, with replacement;
``torch.randint`` here): a point drawn twice is two landmarks at the same place, both
in gudhi's table, and the complex is built on them as they are (the MRLT differs
systematically from the one without replacement, by more than the sampling noise).

How it is computed (the result equals the authors' algorithm run set by set on the
same landmarks; ``tests/test_geometry_score.py`` checks it against the per-set
implementation in ``fastgan.reference.geometry_score``, which uses gudhi's witness
complex):

* distances: one float64 table from every point used as a landmark by any set to
  every point, in torch on ``x``'s device (direct differences as scipy's ``cdist``, not
  the Gram-matrix formula, which loses small distances). With n = 1000 sets of 64 out
  of 5000 points nearly every point is some set's landmark: one N x N table instead
  of n tables of N x L_0.
* the witness complex, per set, vectorized in numpy: each witness's landmarks sorted
  by distance (d_0 <= d_1 <= ...); a simplex sigma gets from witness w the relaxation
  ``d_w(farthest vertex of sigma) - d_w(first landmark not in sigma)`` (0 when sigma
  is w's nearest landmarks), w counts when ``d - alpha_max <= d_w(first missing)``
  as gudhi tests it, and sigma's filtration value is the smallest relaxation over
  witnesses, raised to its facets' values; sigma is in when a witness counts and all
  its facets are in. That is what gudhi's ``WitnessComplex.create_simplex_tree``
  computes witness by witness (the same subtractions, so the same floats; the tests
  compare the complexes), several times faster. Vertices enter at 0 (every landmark
  is a point, hence its own witness); only landmarks with
  ``d - alpha_max <= d_2`` can be in a simplex of dimension <= 2, so only those are sorted out.
* persistence (Z/2) with gudhi's ``SimplexTree`` and the RLT per set, as the
  authors'; the per-set work runs in ``workers`` processes (default: one per CPU
  core when there is enough work to pay for starting them, :func:`default_workers`;
  gudhi and numpy hold the GIL, so threads would not help). The processes start
  with Python's default method (fork on Linux, as torch's DataLoader workers; they
  run only numpy and gudhi and inherit the distance table without a copy). Where that
  method is spawn or forkserver (macOS, Windows, Python >= 3.14) a script must call
  this from under ``if __name__ == "__main__":``, as any multiprocessing code, or pass
  ``workers=1`` to compute in the calling process.
"""
from __future__ import annotations

import contextlib
import itertools
import numbers
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from fastgan.files import save_figure
from fastgan.metrics.base import FeatureSets, check_floating_finite

__all__ = ["relative_living_times", "mean_relative_living_times", "geometry_score", "draw_landmarks",
           "default_gamma", "plot_mrlt", "GeometryScore", "nearest_landmarks", "witness_complex", "h1_intervals",
           "rlt_of_intervals"]

# The complex goes up to triangles (the authors' limit_dimension=2): enough for H1.
COMPLEX_DIMENSION = 2
# Largest float64 distance table (points x landmark points) held at once; past it the
# table is computed chunk by chunk of landmark sets.
DISTANCE_TABLE_BYTES = 1 << 30


def default_gamma(num_points: int) -> float:
    """The authors' default relaxation factor: 1/128 at 5000 points, proportional to N."""
    return 1.0 / 128 * num_points / 5000


def _as_points(name: str, x) -> Tensor:
    """(N, d) finite points as a float64 tensor on their device; integer points (8-bit
    pixels, say) are converted, as the authors' numpy code takes them (exactly up to 2**53)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor or a numpy array, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (N, d) point set, got shape {tuple(x.shape)}")
    if x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"{name} needs at least 2 points of dimension >= 1, got shape {tuple(x.shape)}")
    if not (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        x = x.to(torch.float64)
    check_floating_finite(name, x)
    return x.detach().to(torch.float64)


def _check_int(value, description: str, minimum: Optional[int] = 1, alternative: str = "") -> None:
    """``value`` an int (not a bool) of at least ``minimum``, else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{description} must be an int{bound}{alternative}, got {value!r}")


def _check_parameters(i_max: int, gamma: Optional[float]) -> None:
    _check_int(i_max, "i_max")
    if gamma is not None and not (isinstance(gamma, numbers.Real) and not isinstance(gamma, bool)
                                  and 0 < gamma < float("inf")):
        raise ValueError(f"gamma must be a positive finite number or None (1/128 * N/5000), got {gamma!r}")


def _check_landmarks(landmarks, num_points: int, replace: bool = False) -> Tensor:
    """(n, L_0) int64 landmark sets of indices into the N points, distinct within a set
    unless ``replace`` (then a repeated index is a separate landmark on the same point)."""
    landmarks = torch.as_tensor(landmarks)
    if landmarks.dtype in (torch.bool,) or landmarks.is_floating_point() or landmarks.is_complex():
        raise ValueError(f"landmarks must be integer indices into the points, got dtype {landmarks.dtype}")
    if landmarks.dim() not in (1, 2) or landmarks.shape[-1] < 1 or landmarks.numel() == 0:
        raise ValueError(f"landmarks must have shape (L_0,) or (n, L_0) with L_0 >= 1, got {tuple(landmarks.shape)}")
    sets = landmarks.reshape(-1, landmarks.shape[-1]).to(torch.int64).cpu()
    low, high = int(sets.min()), int(sets.max())
    if low < 0 or high >= num_points:
        raise ValueError(f"landmark indices must lie in [0, {num_points - 1}] (the point count), got {low}..{high}")
    if replace:
        return sets
    ordered = sets.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
    if bool(repeated.any()):
        row = int(repeated.nonzero()[0])
        raise ValueError(f"landmark set {row} repeats an index; the landmarks of a set must be distinct points "
                         f"(pass replace=True for sets drawn with replacement, as the authors' code draws them)")
    return sets


def _check_set_sizes(n: int, L_0: int) -> None:
    _check_int(n, "n (landmark sets)")
    _check_int(L_0, "L_0 (landmarks per set)")


def draw_landmarks(num_points: int, n: int, L_0: int, generator: Optional[torch.Generator] = None,
                   replace: bool = False) -> Tensor:
    """``n`` landmark sets of ``L_0`` distinct indices in [0, num_points), shape (n, L_0):
    row k is ``torch.randperm(num_points, generator=generator)[:L_0]``, drawn on the
    generator's device; returned on the CPU. ``replace=True``: each index uniform and
    independent (``torch.randint``), so a set may repeat a point, as the authors'
    ``np.random.choice(N, L_0)``."""
    _check_set_sizes(n, L_0)
    device = generator.device if generator is not None else None
    if replace:
        return torch.randint(num_points, (n, L_0), generator=generator, device=device).cpu()
    if L_0 > num_points:
        raise ValueError(f"L_0 = {L_0} landmarks per set need at least {L_0} points, got N = {num_points}")
    return torch.stack([torch.randperm(num_points, generator=generator, device=device)[:L_0] for _ in range(n)]).cpu()


# --------------------------------------------------------------------------- distances (torch)


def _distance_blocks(x: Tensor, sets: Tensor) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """(distances (u, N), rows (b, L_0)) for consecutive chunks of the landmark sets:
    ``distances[rows[k, j]]`` are the distances from landmark j of the chunk's set k to
    every point. One table for all sets when it fits DISTANCE_TABLE_BYTES (with
    n = 1000 sets of 64 out of 5000 points nearly every point is some set's landmark:
    one N x N table instead of n tables of N x L_0)."""
    num_points, L_0 = x.shape[0], sets.shape[1]
    per_chunk = sets.shape[0]
    if num_points * torch.unique(sets).numel() * 8 > DISTANCE_TABLE_BYTES:
        per_chunk = max(1, DISTANCE_TABLE_BYTES // (num_points * L_0 * 8))
    for start in range(0, sets.shape[0], per_chunk):
        landmark_points, rows = torch.unique(sets[start:start + per_chunk], return_inverse=True)
        # direct differences, as scipy's cdist: the Gram-matrix form loses small distances
        distances = torch.cdist(x[landmark_points.to(x.device)], x, compute_mode="donot_use_mm_for_euclid_dist")
        yield distances.cpu().numpy(), rows.numpy()


# --------------------------------------------------------------------------- one set (workers)


def nearest_landmarks(distances: np.ndarray, gamma: float) -> Tuple[np.ndarray, np.ndarray, float]:
    """Each witness's nearest landmarks of one set, and alpha_max.

    ``distances``: (L_0, N), landmark j to every point. Returns ``order`` (N, K) landmark
    positions j and ``values`` (N, K) their distances, nearest first, cut after the last
    landmark any witness can put into a simplex of dimension <= 2 (``d - alpha_max <=
    d_2``; K >= min(3, L_0)); alpha_max = gamma * the largest distance."""
    alpha_max = gamma * float(distances.max())
    if not alpha_max > 0:
        raise ValueError("all points of a landmark set's witnesses coincide (largest distance 0)")
    by_witness = np.ascontiguousarray(distances.T)
    order = np.argsort(by_witness, axis=1)
    values = np.take_along_axis(by_witness, order, axis=1)
    third = min(COMPLEX_DIMENSION, values.shape[1] - 1)
    width = max(int(((values - alpha_max) <= values[:, third:third + 1]).sum(axis=1).max()), third + 1)
    return np.ascontiguousarray(order[:, :width]), np.ascontiguousarray(values[:, :width]), alpha_max


@lru_cache(maxsize=None)
def _position_sets(first_missing: int, more: int, available: int) -> np.ndarray:
    """Sorted-list positions of the simplices that hold positions 0..first_missing-1, not
    first_missing, and ``more`` of the ``available`` positions after it: (m, first_missing + more)."""
    after = itertools.combinations(range(first_missing + 1, first_missing + 1 + available), more)
    rows = [tuple(range(first_missing)) + chosen for chosen in after]
    return np.array(rows, dtype=np.int64).reshape(len(rows), first_missing + more)


def _simplex_keys(vertices: np.ndarray, num_landmarks: int) -> np.ndarray:
    """One int64 per simplex (rows of sorted vertex ids)."""
    keys = vertices[:, 0].astype(np.int64)
    for column in range(1, vertices.shape[1]):
        keys = keys * num_landmarks + vertices[:, column]
    return keys


def witness_complex(order: np.ndarray, values: np.ndarray, alpha_max: float,
                    num_landmarks: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    """The relaxed witness complex (up to triangles) that gudhi's ``WitnessComplex``
    builds from this nearest-landmark table (as :func:`nearest_landmarks` returns it),
    as [(simplices (m, k+1) of sorted landmark positions, filtration values (m,)) for
    k = 0, 1, 2] (see the module docstring). Every landmark must also be a witness (as
    when landmarks are points of the witness set): vertices enter at 0."""
    num_witnesses, width = values.shape
    # near[g][w]: how many positions after g a witness reaches from position g
    near = [((values[:, g + 1:] - alpha_max) <= values[:, g:g + 1]).sum(axis=1) for g in range(COMPLEX_DIMENSION + 1)
            if g + 1 < width]
    vertices = np.arange(num_landmarks)[:, None]
    levels = [(vertices, np.zeros(num_landmarks), vertices[:, 0].astype(np.int64))]
    for size in range(2, COMPLEX_DIMENSION + 2):
        if width < size:
            break
        # the witness's `size` nearest landmarks: relaxation 0
        simplices, relaxations = [np.sort(order[:, :size], axis=1)], [np.zeros(num_witnesses)]
        for first_missing in range(min(size, len(near))):
            more, reach = size - first_missing, near[first_missing]
            if more == 1:  # one landmark after the gap: every reachable one, all witnesses at once
                witness, step = np.nonzero(np.arange(1, int(reach.max(initial=0)) + 1)[None, :] <= reach[:, None])
                position = first_missing + 1 + step
                chosen = np.concatenate((order[witness, :first_missing], order[witness, position][:, None]), axis=1)
                simplices.append(np.sort(chosen, axis=1))
                relaxations.append(values[witness, position] - values[witness, first_missing])
                continue
            for available in np.unique(reach[reach >= more]).tolist():  # witnesses grouped by reach
                witness = np.nonzero(reach == available)[0]
                positions = _position_sets(first_missing, more, available)
                chosen = order[witness[:, None, None], positions[None]].reshape(-1, size)
                simplices.append(np.sort(chosen, axis=1))
                relaxations.append((values[witness[:, None], positions[None, :, -1]]
                                    - values[witness, first_missing][:, None]).reshape(-1))
        simplices, relaxation = np.concatenate(simplices), np.concatenate(relaxations)
        keys = _simplex_keys(simplices, num_landmarks)
        by_key = np.lexsort((relaxation, keys))  # each simplex's smallest relaxation first
        keys, simplices, relaxation = keys[by_key], simplices[by_key], relaxation[by_key]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        keys, simplices, filtration = keys[first], simplices[first], relaxation[first]
        if size > 2:  # (an edge's vertices are all in, at 0)
            facet_keys, facet_filtration = levels[-1][2], levels[-1][1]
            complete = np.ones(len(keys), dtype=bool)
            for dropped in range(size):
                facet = _simplex_keys(np.delete(simplices, dropped, axis=1), num_landmarks)
                at = np.minimum(np.searchsorted(facet_keys, facet), len(facet_keys) - 1)
                present = facet_keys[at] == facet
                complete &= present
                filtration = np.maximum(filtration, np.where(present, facet_filtration[at], filtration))
            keys, simplices, filtration = keys[complete], simplices[complete], filtration[complete]
        levels.append((simplices, filtration, keys))
    return [(simplices, filtration) for simplices, filtration, _ in levels]


def _gudhi():
    try:
        import gudhi
    except ImportError as exc:
        raise ImportError("the Geometry Score needs gudhi (persistent homology): pip install gudhi") from exc
    return gudhi


def h1_intervals(complex_: List[Tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """(m, 2) H1 persistence intervals (Z/2 coefficients) of a filtered complex given as
    :func:`witness_complex` returns it, computed by gudhi."""
    tree = _gudhi().SimplexTree()
    for simplices, filtration in complex_:
        if len(simplices):
            tree.insert_batch(np.ascontiguousarray(simplices.T), filtration)
    tree.compute_persistence(homology_coeff_field=2)
    return np.asarray(tree.persistence_intervals_in_dimension(1), dtype=np.float64).reshape(-1, 2)


def rlt_of_intervals(intervals: np.ndarray, alpha_max: float, i_max: int) -> np.ndarray:
    """Relative living times (i_max,) of H1 intervals on [0, alpha_max] (the paper's
    formulas (2), (3)): the total length of the stretches between consecutive interval
    end points (and 0, alpha_max) during which i intervals are alive, over alpha_max.
    Infinite deaths count as alpha_max; no interval at all gives (1, 0, ...)."""
    rlt = np.zeros(i_max)
    if len(intervals) == 0:
        rlt[0] = 1.0
        return rlt
    births = intervals[:, 0]
    deaths = np.where(np.isinf(intervals[:, 1]), alpha_max, intervals[:, 1])
    points = np.unique(np.concatenate((births, deaths, [0.0, alpha_max])))
    # alive on (p_j, p_j+1) <=> birth <= p_j < death, since every end point is one of the p
    alive = (np.searchsorted(np.sort(births), points[:-1], side="right")
             - np.searchsorted(np.sort(deaths), points[:-1], side="right"))
    counted = alive < i_max
    # bincount adds in stretch order, as a sequential sum does
    rlt += np.bincount(alive[counted], weights=np.diff(points)[counted], minlength=i_max)[:i_max]
    return rlt / alpha_max


def _rlts_of_sets(distances: np.ndarray, rows: np.ndarray, gamma: float, i_max: int) -> np.ndarray:
    """(b, i_max) RLTs of the landmark sets whose table rows are ``rows`` (b, L_0)."""
    out = np.empty((rows.shape[0], i_max))
    for k, landmark_rows in enumerate(rows):
        order, values, alpha_max = nearest_landmarks(distances[landmark_rows], gamma)
        complex_ = witness_complex(order, values, alpha_max, len(landmark_rows))
        out[k] = rlt_of_intervals(h1_intervals(complex_), alpha_max, i_max)
    return out


# The distance table of a worker process, set once by the pool's initializer: inherited
# without a copy where processes fork, pickled once per worker where they spawn.
_worker_distances: Optional[np.ndarray] = None


def _set_worker_distances(distances: np.ndarray) -> None:
    global _worker_distances
    _worker_distances = distances


def _rlts_in_worker(rows: np.ndarray, gamma: float, i_max: int) -> np.ndarray:
    return _rlts_of_sets(_worker_distances, rows, gamma, i_max)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Witness-sets (points x landmark sets) of work that pay for one worker process. A set costs
# ~4 µs per point in one process (3-4 ms for 1000 points, 22 ms for 5000), and starting a worker
# from a process that holds torch and a CUDA context took ~60 ms on a 16-core H100 machine: there
# 16 workers turned 40 sets of 1000 points (0.15 s in one process) into 0.97 s
# (bench/results/geometry_score-cuda-2026-11-28.md). 100 000 is ~0.4 s of work per worker.
WORK_PER_WORKER = 100_000


def default_workers(num_sets: int, num_points: int) -> int:
    """Processes for ``num_sets`` landmark sets over ``num_points`` witnesses when ``workers``
    is None: one per :data:`WORK_PER_WORKER` of work, at most one per available core."""
    return max(1, min(available_cores(), num_sets * num_points // WORK_PER_WORKER))


def _check_workers(workers) -> None:
    if workers is not None:
        _check_int(workers, "workers", alternative=" or None (as many as the work pays for)")


def _relative_living_times_of_sets(x: Tensor, sets: Tensor, gamma: float, i_max: int,
                                   workers: Optional[int], progress: bool = False) -> Tensor:
    """(n, i_max) float64 RLTs of the landmark sets (rows of ``sets``); ``progress``: a bar on stderr."""
    from tqdm import tqdm

    _check_workers(workers)
    if workers is None:
        workers = default_workers(sets.shape[0], x.shape[0])
    workers = min(workers, sets.shape[0])
    _gudhi()  # here, not in every worker
    out: List[np.ndarray] = []
    with tqdm(total=sets.shape[0], desc="Geometry Score: landmark sets", unit="set", file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for distances, rows in _distance_blocks(x, sets):
            # small tasks balance the load (each costs one message each way) and move the bar
            tasks = np.array_split(rows, min(rows.shape[0], 8 * workers * max(1, rows.shape[0] // (64 * workers))))
            with contextlib.ExitStack() as stack:
                if workers == 1:
                    results = (_rlts_of_sets(distances, task, gamma, i_max) for task in tasks)
                else:
                    pool = stack.enter_context(
                        ProcessPoolExecutor(workers, initializer=_set_worker_distances, initargs=(distances,)))
                    results = pool.map(_rlts_in_worker, tasks, [gamma] * len(tasks), [i_max] * len(tasks))
                for result in results:
                    out.append(result)
                    bar.update(len(result))
    return torch.from_numpy(np.concatenate(out))


# --------------------------------------------------------------------------- public API


def relative_living_times(x, *, landmarks, gamma: Optional[float] = None, i_max: int = 100,
                          workers: Optional[int] = None, progress: bool = False, replace: bool = False) -> Tensor:
    """RLT of 1-dimensional holes of the witness complex of ``x`` on given landmarks.

    x: (N, d) floating points (tensor or numpy array), all of them witnesses.
    landmarks: (L_0,) indices into x -- one landmark set, gives (i_max,) -- or (n, L_0),
    one set per row, gives (n, i_max). Indices of a set must be distinct unless ``replace``
    (a repeated index is then one more landmark on that point, as gudhi gets it from the
    authors' code).
    gamma: alpha_max = gamma * the largest witness-to-landmark distance of the set;
    default 1/128 * N/5000. workers: processes for the complexes (None: one per core
    when the work pays for them, see :func:`default_workers`). progress: a bar of the sets done
    on stderr. Returns float64 on the CPU; each row sums to 1 unless some stretch had >= i_max holes."""
    points = _as_points("x", x)
    _check_parameters(i_max, gamma)
    sets = _check_landmarks(landmarks, points.shape[0], replace)
    gamma = default_gamma(points.shape[0]) if gamma is None else float(gamma)
    rlts = _relative_living_times_of_sets(points, sets, gamma, i_max, workers, progress)
    return rlts[0] if torch.as_tensor(landmarks).dim() == 1 else rlts


def mean_relative_living_times(x, n: int = 1000, L_0: int = 64, gamma: Optional[float] = None,
                               i_max: int = 100, generator: Optional[torch.Generator] = None,
                               workers: Optional[int] = None, progress: bool = False, replace: bool = False) -> Tensor:
    """MRLT (i_max,) of ``x``: the mean RLT over ``n`` random landmark sets of ``L_0``
    points (drawn by :func:`draw_landmarks` with ``generator`` and ``replace``: True draws
    with replacement, as the authors' code). See
    :func:`relative_living_times` for the other arguments."""
    points = _as_points("x", x)
    _check_parameters(i_max, gamma)
    sets = draw_landmarks(points.shape[0], n, L_0, generator, replace)
    return relative_living_times(points, landmarks=sets, gamma=gamma, i_max=i_max, workers=workers,
                                 progress=progress, replace=replace).mean(dim=0)


def geometry_score(x, y, n: int = 1000, L_0: int = 64, gamma: Optional[float] = None, i_max: int = 100,
                   generator: Optional[torch.Generator] = None, workers: Optional[int] = None,
                   replace: bool = False) -> float:
    """Geometry Score: squared L2 distance between the MRLTs of ``x`` and ``y`` (lower:
    closer topology). Landmarks of x are drawn first, then those of y, from
    ``generator``; gamma=None uses each set's own default (1/128 * N/5000). ``replace``: draw
    the landmarks with replacement (the authors' ``np.random.choice(N, L_0)``)."""
    x, y = _as_points("x", x), _as_points("y", y)
    options = dict(n=n, L_0=L_0, gamma=gamma, i_max=i_max, generator=generator, workers=workers, replace=replace)
    mrlt_x = mean_relative_living_times(x, **options)
    mrlt_y = mean_relative_living_times(y, **options)
    return float(((mrlt_x - mrlt_y) ** 2).sum())


def plot_mrlt(mrlts: dict, path, title: str = "Mean relative living times") -> None:
    """Bar plot of MRLTs ({label: (i_max,) tensor or array}) against the number of holes,
    written to ``path`` (PNG, PDF, ...); the axis ends after the last non-zero bar."""
    # a bare Figure, not pyplot: the caller's backend (a notebook's, say) stays as it is
    from matplotlib.figure import Figure

    arrays = {label: np.asarray(torch.as_tensor(m, dtype=torch.float64)) for label, m in mrlts.items()}
    last = max((int(np.nonzero(a > 1e-4)[0].max()) if (a > 1e-4).any() else 0) for a in arrays.values())
    # one empty bar after the last non-zero one, unless that one is already hole number i_max - 1
    shown = np.arange(min(last + 2, max(len(a) for a in arrays.values())))
    figure = Figure(figsize=(6.4, 3.6))
    axes = figure.add_subplot()
    for k, (label, values) in enumerate(arrays.items()):
        color = f"C{k}"
        heights = np.zeros(len(shown))
        heights[: min(len(values), len(shown))] = values[: len(shown)]
        axes.bar(shown, heights, width=1.0, alpha=0.3, color=color, edgecolor=color)
        axes.step(np.append(shown - 0.5, shown[-1] + 0.5), np.append(heights, 0.0), where="post",
                  color=color, lw=2, label=label)
    axes.set_xlabel("number of 1-dimensional holes i")
    axes.set_ylabel("MRLT")
    axes.set_xlim(-0.5, shown[-1] + 0.5)
    axes.set_title(title)
    axes.legend()
    figure.tight_layout()
    save_figure(figure, path)  # atomically, in the suffix's format (PNG without one, under that name)


class GeometryScore(FeatureSets):
    """Geometry Score as a metric object.

    ``update(real_features=None, fake_features=None)`` with (B, d) point batches
    (flattened images or features; either or both per call); ``compute()`` -> the score
    (float). The landmark draws come from ``torch.Generator().manual_seed(seed)``,
    created afresh in every ``compute()`` (real side first), so a compute is
    reproducible; :meth:`mrlts` gives the two MRLTs (e.g. for :func:`plot_mrlt`).
    Under ``torch.distributed`` the points are concatenated in rank order, so every
    rank computes the same score."""

    def __init__(self, n: int = 1000, L_0: int = 64, gamma: Optional[float] = None, i_max: int = 100,
                 seed: int = 0, workers: Optional[int] = None, replace: bool = False) -> None:
        super().__init__()
        _check_parameters(i_max, gamma)
        _check_set_sizes(n, L_0)
        _check_workers(workers)
        _check_int(seed, "seed", minimum=None)  # else torch.manual_seed refuses it only at compute()
        if not isinstance(replace, bool):
            raise ValueError(f"replace must be a bool, got {replace!r}")
        self.n, self.L_0, self.gamma, self.i_max, self.seed, self.workers = n, L_0, gamma, i_max, seed, workers
        self.replace = replace

    def mrlts(self) -> Tuple[Tensor, Tensor]:
        """(real MRLT, fake MRLT), each (i_max,) float64."""
        states = self.reduced_states()
        generator = torch.Generator().manual_seed(self.seed)
        out = []
        for side in ("real_features", "fake_features"):
            points = states[side]
            if points.shape[0] < self.L_0 and not self.replace:
                raise ValueError(f"GeometryScore needs at least L_0 = {self.L_0} points per side, "
                                 f"got {points.shape[0]} {side.split('_')[0]}")
            out.append(mean_relative_living_times(points, n=self.n, L_0=self.L_0, gamma=self.gamma,
                                                  i_max=self.i_max, generator=generator, workers=self.workers,
                                                  replace=self.replace))
        return out[0], out[1]

    def compute(self) -> float:
        real, fake = self.mrlts()
        return float(((real - fake) ** 2).sum())
