"""Benchmark: the MRLT of the Geometry Score, fastgan against the paper's algorithm run
set by set (``fastgan.reference.geometry_score``: scipy distances, full gudhi tables,
one landmark set after the other, as the authors' code loops).

Same points, same landmark sets (drawn once by ``draw_landmarks``): every variant must
give the same MRLT as the baseline (|difference| <= 1e-12) before it is timed.

Cases (N points, n landmark sets of L_0 = 64, the authors' gamma and i_max):

* ``d=784``: N = 5000 points of dimension 784 (28x28 images, the paper's MNIST
  setting): a noisy ring mapped into 784 dimensions;
* ``d=2``: N = 5000 points of a noisy ring in the plane: distances are nearly free, so
  this case times what sorting, the complexes and persistence cost.

n = 1000 (quick mode: N = 1000, n = 40). Variants: the per-set baseline, fastgan with
its default ``workers`` (as many processes as the work pays for), ``workers=1`` and one
worker per core. The calls take seconds to minutes, so each
is timed once (host clock; quick mode too).

Run: pytest bench/bench_geometry_score.py --benchmark-only (see bench/conftest.py), or
``python bench/bench_geometry_score.py [--quick] [--points N] [--sets n] [--dim d]``
for the ratio and where the time goes (distances, witness tables, complex
construction, persistence, RLT: each stage timed alone on a sample of sets).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import time
from typing import Callable, Dict

import numpy as np
import pytest
import torch

import timing  # beside this file: pytest and `python bench/bench_geometry_score.py` both put bench/ on sys.path
from fastgan.metrics import geometry_score as gs
from fastgan.reference import geometry_score as reference

L_0, I_MAX = 64, 100
CLOCK = time.process_time  # stage breakdown
ATOL = 1e-12
CORES = gs.available_cores()
BASELINE = "paper's algorithm, set by set (numpy/scipy/gudhi)"
DEFAULT = "fastgan default workers"  # workers=None: what a user gets (gs.default_workers)
VARIANTS = [BASELINE, DEFAULT, "fastgan workers=1"] + ([f"fastgan workers={CORES}"] if CORES > 1 else [])
# every variant computes persistence with gudhi, which a GPU image may lack (`make wheels` carries it there)
pytestmark = pytest.mark.skipif(importlib.util.find_spec("gudhi") is None, reason="the Geometry Score needs gudhi")


def sizes(quick: bool):
    return (1000, 40) if quick else (5000, 1000)


def ring_points(num_points: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A noisy ring, mapped by a random orthonormal map into ``dim`` dimensions, plus
    small noise in every dimension: points with one large hole and many small ones."""
    generator = torch.Generator().manual_seed(seed)
    angle = torch.rand(num_points, generator=generator, dtype=torch.float64) * 2 * torch.pi
    radius = 1 + 0.1 * torch.randn(num_points, generator=generator, dtype=torch.float64)
    plane = torch.stack((radius * torch.cos(angle), radius * torch.sin(angle)), dim=1)
    if dim == 2:
        return plane
    basis = torch.linalg.qr(torch.randn(dim, 2, generator=generator, dtype=torch.float64)).Q
    return plane @ basis.T + 0.02 * torch.randn(num_points, dim, generator=generator, dtype=torch.float64)


def variant_fn(name: str, x: torch.Tensor, sets: torch.Tensor) -> Callable[[], np.ndarray]:
    if name == BASELINE:
        points, landmark_sets = x.numpy(), sets.numpy()
        return lambda: reference.relative_living_times_of_sets(points, landmark_sets, i_max=I_MAX).mean(axis=0)
    workers = None if name == DEFAULT else int(name.rsplit("=", 1)[1])
    device_x = x.to(timing.DEVICE)
    return lambda: gs.relative_living_times(device_x, landmarks=sets, i_max=I_MAX, workers=workers).mean(dim=0).numpy()


# --------------------------------------------------------------------------- pytest-benchmark entries


@pytest.fixture(scope="module", params=[784, 2], ids=lambda d: f"d={d}")
def case(request):
    num_points, num_sets = sizes(timing.QUICK)
    x = ring_points(num_points, request.param)
    sets = gs.draw_landmarks(num_points, num_sets, L_0, torch.Generator().manual_seed(1))
    return request.param, x, sets, {}


@pytest.mark.parametrize("name", VARIANTS)
def test_mean_relative_living_times(benchmark, case, name):
    dim, x, sets, results = case
    fn = variant_fn(name, x, sets)
    benchmark.group = f"geometry score: MRLT, N={x.shape[0]} d={dim}, {sets.shape[0]} sets of {L_0}"
    # Wall clock whatever --benchmark-timer says: a CPU-time timer (time.process_time) counts this
    # process alone, not the worker processes, and made workers=2 look 2x faster than workers=1.
    if hasattr(benchmark, "_timer"):
        benchmark._timer = time.perf_counter
    benchmark.extra_info.update(variant=name, baseline=name == BASELINE, device=timing.DEVICE.type,
                                quick=timing.QUICK, cores=CORES,
                                timing="wall-clock perf_counter, one call (the workers' CPU time is not this process's)")
    mrlt = benchmark.pedantic(fn, rounds=1, iterations=1, warmup_rounds=0)
    results[name] = mrlt
    if name != BASELINE:
        if BASELINE not in results:  # the baseline entry was deselected: its MRLT, untimed
            results[BASELINE] = variant_fn(BASELINE, x, sets)()
        error = float(np.abs(mrlt - results[BASELINE]).max())
        chose = f"; {gs.default_workers(sets.shape[0], x.shape[0])} worker(s)" if name == DEFAULT else ""
        benchmark.extra_info["detail"] = f"max |MRLT - baseline| {error:.1e}{chose}"
        assert error <= ATOL, f"{name}: MRLT differs from the per-set algorithm's by {error:.1e}"


# --------------------------------------------------------------------------- script: ratio and breakdown


def stage_breakdown(x: torch.Tensor, sets: torch.Tensor, sample: int) -> Dict[str, Dict[str, float]]:
    """CPU seconds per landmark set of each stage, both implementations, one process,
    over the first ``sample`` sets: each stage timed alone (process_time: robust to
    other load on the machine). fastgan's distances: the one table of all ``sets``
    (its cost shared by all of them), divided by their count."""
    import gudhi
    from scipy.spatial.distance import cdist

    points = x.numpy()
    gamma = gs.default_gamma(x.shape[0])
    paper = dict.fromkeys(["distances", "table (sort)", "complex construction", "persistence", "RLT"], 0.0)
    ours = dict.fromkeys(paper, 0.0)
    for landmarks in sets[:sample].numpy():
        start = CLOCK()
        distances = cdist(points, points[landmarks])
        paper["distances"] += CLOCK() - start
        start = CLOCK()
        order = np.argsort(distances, axis=1)
        table = np.stack((order.astype(np.float64), np.take_along_axis(distances, order, axis=1)), axis=2)
        alpha_max = gamma * distances.max()
        paper["table (sort)"] += CLOCK() - start
        start = CLOCK()
        tree = gudhi.WitnessComplex(table).create_simplex_tree(max_alpha_square=alpha_max, limit_dimension=2)
        paper["complex construction"] += CLOCK() - start
        start = CLOCK()
        tree.persistence(homology_coeff_field=2)
        intervals = tree.persistence_intervals_in_dimension(1)
        paper["persistence"] += CLOCK() - start
        start = CLOCK()
        reference.relative_living_times(intervals, alpha_max, I_MAX)
        paper["RLT"] += CLOCK() - start
    start = CLOCK()
    blocks = list(gs._distance_blocks(x.to(timing.DEVICE), sets))
    ours["distances"] = (CLOCK() - start) / sets.shape[0] * sample
    for distances, rows in blocks:
        for landmark_rows in rows[:sample]:
            start = CLOCK()
            order, values, alpha_max = gs.nearest_landmarks(distances[landmark_rows], gamma)
            ours["table (sort)"] += CLOCK() - start
            start = CLOCK()
            complex_ = gs.witness_complex(order, values, alpha_max, len(landmark_rows))
            ours["complex construction"] += CLOCK() - start
            start = CLOCK()
            intervals = gs.h1_intervals(complex_)
            ours["persistence"] += CLOCK() - start
            start = CLOCK()
            gs.rlt_of_intervals(intervals, alpha_max, I_MAX)
            ours["RLT"] += CLOCK() - start
    return {"paper": {k: v / sample for k, v in paper.items()}, "fastgan": {k: v / sample for k, v in ours.items()}}


def process_and_children_cpu() -> float:
    """CPU seconds of this process (all threads) and of its finished child processes."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1000, n = 40")
    parser.add_argument("--points", type=int, help="N (default 5000)")
    parser.add_argument("--sets", type=int, help="n landmark sets (default 1000)")
    parser.add_argument("--dim", type=int, default=784, help="dimension of the points (default 784)")
    parser.add_argument("--workers", type=int, nargs="*", default=None,
                        help=f"worker counts to time (default 1 and {CORES})")
    parser.add_argument("--breakdown-sets", type=int, default=20, help="sets for the per-stage breakdown (0: none)")
    args = parser.parse_args(argv)
    num_points, num_sets = sizes(args.quick)
    num_points, num_sets = args.points or num_points, args.sets or num_sets
    x = ring_points(num_points, args.dim)
    sets = gs.draw_landmarks(num_points, num_sets, L_0, torch.Generator().manual_seed(1))
    print(f"N={num_points} d={args.dim} n={num_sets} L_0={L_0} on {timing.DEVICE} ({CORES} cores, "
          f"load average {os.getloadavg()[0]:.1f})")
    names = [BASELINE] + [f"fastgan workers={w}" for w in (args.workers or sorted({1, CORES}))]
    seconds, mrlts = {}, {}
    cpu_seconds = {}
    print(f"{'':<52}{'wall s':>8}{'ratio':>7}{'CPU s':>8}{'ratio':>7}   (CPU: this process + its workers)")
    for name in names:
        fn = variant_fn(name, x, sets)
        start, cpu = time.perf_counter(), process_and_children_cpu()
        mrlts[name] = fn()
        seconds[name] = time.perf_counter() - start
        cpu_seconds[name] = process_and_children_cpu() - cpu
        error = float(np.abs(mrlts[name] - mrlts[BASELINE]).max())
        print(f"{name:<52}{seconds[name]:8.2f}{seconds[BASELINE] / seconds[name]:7.2f}"
              f"{cpu_seconds[name]:8.2f}{cpu_seconds[BASELINE] / cpu_seconds[name]:7.2f}   max |MRLT - baseline| {error:.1e}")
        assert error <= ATOL, f"{name}: MRLT differs from the baseline's by {error:.1e}"
    if args.breakdown_sets:
        sample = min(args.breakdown_sets, num_sets)
        breakdown = stage_breakdown(x, sets, sample)
        print(f"\nCPU ms per landmark set, one process, over {sample} sets (fastgan's distances: the table "
              f"of all {num_sets} sets, divided by {num_sets}):")
        print(f"{'stage':<22}{'paper':>10}{'fastgan':>10}")
        for stage in breakdown["paper"]:
            print(f"{stage:<22}{1e3 * breakdown['paper'][stage]:>10.2f}{1e3 * breakdown['fastgan'][stage]:>10.2f}")
        print(f"{'total':<22}{1e3 * sum(breakdown['paper'].values()):>10.2f}"
              f"{1e3 * sum(breakdown['fastgan'].values()):>10.2f}")


if __name__ == "__main__":
    main()
