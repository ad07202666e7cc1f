"""Geometry Score: fastgan.metrics.geometry_score against the per-set, from-the-paper
implementation in fastgan.reference.geometry_score (scipy distances, full gudhi tables,
the RLT counted at stretch midpoints), on the same landmarks; known topologies; the
metric object (one process and two gloo processes); bad input.

Small point sets keep this fast; gamma is set explicitly where the authors' default
(1/128 * N/5000) would be tiny for a few hundred points.
"""
import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import DEVICES, exit_worker
from fastgan.metrics import GeometryScore
from fastgan.metrics.geometry_score import (default_gamma, draw_landmarks, geometry_score, h1_intervals,
                                            mean_relative_living_times, nearest_landmarks, relative_living_times,
                                            rlt_of_intervals, witness_complex)
from fastgan.reference import geometry_score as reference

# persistence is gudhi's (the metric's one extra dependency; `make` installs it). A GPU image may lack
# it (`make wheels` carries it there); then this module says so once instead of failing test by test.
pytest.importorskip("gudhi", reason="the Geometry Score needs gudhi: pip install gudhi")

# float64 throughout; distances may differ from scipy's in the last bit, and the RLT is
# piecewise linear in the filtration values
ATOL = 1e-12


def circle(n, generator, center=(0.0, 0.0), radius=1.0, noise=0.02):
    angle = torch.rand(n, generator=generator, dtype=torch.float64) * 2 * math.pi
    points = torch.stack((center[0] + radius * torch.cos(angle), center[1] + radius * torch.sin(angle)), dim=1)
    return points + noise * torch.randn(n, 2, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("num_points,dim,L_0,gamma", [(301, 2, 17, 0.07), (523, 5, 32, None), (257, 33, 64, 0.02),
                                                      (180, 3, 3, 0.2)])
def test_rlt_equals_paper_oracle_on_same_landmarks(num_points, dim, L_0, gamma):
    generator = torch.Generator().manual_seed(num_points)
    x = torch.randn(num_points, dim, generator=generator, dtype=torch.float64) * 3 + 1
    sets = draw_landmarks(num_points, 6, L_0, generator)
    got = relative_living_times(x, landmarks=sets, gamma=gamma, i_max=50, workers=1)
    expected = reference.relative_living_times_of_sets(x.numpy(), sets.numpy(), gamma=gamma, i_max=50)
    assert got.shape == (6, 50) and got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=ATOL)
    # one set (1-D landmarks) gives one RLT; numpy and float32 points are accepted
    one = relative_living_times(x.numpy(), landmarks=sets[2], gamma=gamma, i_max=50)
    assert one.shape == (50,)
    np.testing.assert_allclose(one.numpy(), expected[2], rtol=0, atol=ATOL)
    assert relative_living_times(x.float(), landmarks=sets[0], gamma=gamma, i_max=50).shape == (50,)


@pytest.mark.parametrize("device", DEVICES)
def test_points_on_any_device_give_the_oracles_rlt(device):
    """The distance table is computed where the points are (a GPU's cdist included)."""
    generator = torch.Generator().manual_seed(21)
    x = torch.randn(333, 6, generator=generator, dtype=torch.float64)
    sets = draw_landmarks(333, 5, 29, generator)
    got = relative_living_times(x.to(device), landmarks=sets.to(device), gamma=0.06, workers=1)
    expected = reference.relative_living_times_of_sets(x.numpy(), sets.numpy(), gamma=0.06)
    assert got.device.type == "cpu"
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=ATOL)


def test_rlt_has_holes_to_count():
    """The oracle comparisons are not vacuous: such a set has several H1 intervals."""
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    order, values, alpha_max = nearest_landmarks(torch.cdist(x[:40], x).numpy(), 0.1)
    assert len(h1_intervals(witness_complex(order, values, alpha_max, 40))) >= 3


@pytest.mark.parametrize("num_points,dim,L_0,gamma,decimals", [
    (400, 2, 40, 0.05, None), (350, 8, 64, 1 / 128, None), (250, 3, 32, 0.2, None), (300, 5, 16, 0.1, None),
    (300, 2, 30, 0.08, 1),  # points on a grid: distance ties between landmarks
    (120, 4, 2, 0.1, None), (90, 3, 3, 0.3, None)])
def test_witness_complex_is_gudhis(num_points, dim, L_0, gamma, decimals):
    """The vectorized construction gives gudhi's complex: the same simplices with the
    same filtration values (exact floats), gudhi working on the full, uncut table."""
    import gudhi

    generator = torch.Generator().manual_seed(num_points + L_0)
    x = torch.randn(num_points, dim, generator=generator, dtype=torch.float64)
    if decimals is not None:
        x = torch.round(x, decimals=decimals)
    distances = torch.cdist(x[draw_landmarks(num_points, 1, L_0, generator)[0]], x).numpy()
    order, values, alpha_max = nearest_landmarks(distances, gamma)
    full_order = np.argsort(distances.T, axis=1)
    full = np.stack((full_order.astype(np.float64), np.take_along_axis(distances.T, full_order, axis=1)), axis=2)
    if L_0 > 8 and gamma < 0.1:
        assert order.shape[1] < L_0  # the cut is doing something
    expected = gudhi.WitnessComplex(full).create_simplex_tree(max_alpha_square=alpha_max, limit_dimension=2)
    got = [(tuple(int(v) for v in simplex), float(value))
           for simplices, filtration in witness_complex(order, values, alpha_max, L_0)
           for simplex, value in zip(simplices, filtration)]
    assert sorted(got) == sorted((tuple(simplex), value) for simplex, value in expected.get_filtration())


@pytest.mark.parametrize("num_points,dim,L_0,gamma,decimals", [(301, 2, 17, 0.07, None), (257, 3, 24, 0.1, None),
                                                               (199, 2, 16, 0.15, None), (301, 2, 20, 0.08, 1)])
def test_landmarks_drawn_with_replacement_give_gudhis_complex_and_the_oracles_rlt(num_points, dim, L_0, gamma,
                                                                                   decimals):
    """replace=True (the authors' np.random.choice(N, L_0)): a repeated index is one more
    landmark on the same point, at the same distance from every witness (ties in every
    row of gudhi's table). The vectorized complex is gudhi's, whatever the order of the
    tied landmarks in the table, and the RLTs are the oracle's on the same sets."""
    import gudhi

    generator = torch.Generator().manual_seed(num_points + L_0)
    x = torch.randn(num_points, dim, generator=generator, dtype=torch.float64)
    if decimals is not None:
        x = torch.round(x, decimals=decimals)
    sets = draw_landmarks(num_points, 4, L_0, generator, replace=True)
    sets[:, 1] = sets[:, 0]  # a pair and a triple in every set, wherever the draw put none
    sets[:, 3:5] = sets[:, 2:3]
    sets[1::2, 6:10] = sets[1::2, 5:6]
    sets = sets[:, torch.randperm(L_0, generator=generator)]
    for landmarks in sets:
        distances = torch.cdist(x[landmarks], x, compute_mode="donot_use_mm_for_euclid_dist").numpy()
        order, values, alpha_max = nearest_landmarks(distances, gamma)
        got = sorted((tuple(int(v) for v in simplex), float(value))
                     for simplices, filtration in witness_complex(order, values, alpha_max, L_0)
                     for simplex, value in zip(simplices, filtration))
        by_witness = distances.T
        for full_order in (np.argsort(by_witness, axis=1),  # ties in either order
                           L_0 - 1 - np.argsort(by_witness[:, ::-1], axis=1, kind="stable")):
            full = np.stack((full_order.astype(np.float64), np.take_along_axis(by_witness, full_order, axis=1)),
                            axis=2)
            expected = gudhi.WitnessComplex(full).create_simplex_tree(max_alpha_square=alpha_max, limit_dimension=2)
            assert got == sorted((tuple(simplex), value) for simplex, value in expected.get_filtration())
    got = relative_living_times(x, landmarks=sets, gamma=gamma, i_max=50, workers=1, replace=True)
    expected = reference.relative_living_times_of_sets(x.numpy(), sets.numpy(), gamma=gamma, i_max=50)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=ATOL)
    # the repeats matter: the same sets without them give other RLTs
    unique = np.stack([reference.relative_living_times(*reference.witness_h1_intervals(x.numpy(), np.unique(s), gamma),
                                                       50) for s in sets.numpy()])
    assert np.abs(unique - expected).max() > 1e-3
    with pytest.raises(ValueError, match="repeats an index"):
        relative_living_times(x, landmarks=sets, gamma=gamma)


def test_draws_with_replacement():
    sets = draw_landmarks(50, 7, 10, torch.Generator().manual_seed(0), replace=True)
    assert sets.shape == (7, 10) and sets.dtype == torch.int64 and int(sets.min()) >= 0 and int(sets.max()) < 50
    assert torch.equal(sets, torch.randint(50, (7, 10), generator=torch.Generator().manual_seed(0)))
    assert draw_landmarks(5, 2, 8, torch.Generator().manual_seed(0), replace=True).shape == (2, 8)  # L_0 > N
    # 20 sets of 40 out of 151 points: every one repeats some point; the mean is the oracle's on those sets
    x = torch.randn(151, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    sets = draw_landmarks(151, 20, 40, torch.Generator().manual_seed(1), replace=True)
    assert all(len(set(row.tolist())) < 40 for row in sets)
    mrlt = mean_relative_living_times(x, n=20, L_0=40, gamma=0.1, i_max=30, generator=torch.Generator().manual_seed(1),
                                      workers=1, replace=True)
    expected = reference.relative_living_times_of_sets(x.numpy(), sets.numpy(), gamma=0.1, i_max=30).mean(axis=0)
    np.testing.assert_allclose(mrlt.numpy(), expected, rtol=0, atol=ATOL)
    metric = GeometryScore(n=20, L_0=40, gamma=0.1, i_max=30, seed=1, workers=1, replace=True)
    metric.update(real_features=x, fake_features=x)
    real, fake = metric.mrlts()
    assert torch.equal(real, mrlt) and not torch.equal(fake, mrlt)  # fake: the next 20 draws


def test_rlt_of_intervals_by_hand():
    # alive: [0, .1) none, [.1, .3) one, [.3, .5) two, [.5, 1] one (the infinite one, clipped)
    intervals = np.array([[0.1, 0.5], [0.3, np.inf]])
    np.testing.assert_allclose(rlt_of_intervals(intervals, 1.0, 4), [0.1, 0.7, 0.2, 0.0], atol=1e-15)
    np.testing.assert_allclose(rlt_of_intervals(intervals * 2, 2.0, 2), [0.1, 0.7], atol=1e-15)  # i >= i_max dropped
    np.testing.assert_array_equal(rlt_of_intervals(np.zeros((0, 2)), 0.5, 3), [1.0, 0.0, 0.0])
    generator = np.random.default_rng(0)
    for _ in range(20):
        births = generator.uniform(0, 1, 9)
        deaths = np.where(generator.uniform(size=9) < 0.2, np.inf, births + generator.uniform(0, 0.6, 9))
        deaths = np.minimum(deaths, 1.3)
        intervals = np.stack((births, deaths), axis=1)
        np.testing.assert_allclose(rlt_of_intervals(intervals, 1.3, 6),
                                   reference.relative_living_times(intervals.tolist(), 1.3, 6), rtol=0, atol=1e-14)


def test_workers_give_identical_results():
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(300, 4, generator=generator, dtype=torch.float64)
    sets = draw_landmarks(300, 9, 24, generator)
    one = relative_living_times(x, landmarks=sets, gamma=0.05, workers=1)
    two = relative_living_times(x, landmarks=sets, gamma=0.05, workers=2)
    assert torch.equal(one, two)


def test_default_workers_start_processes_only_for_work_that_pays_for_them(monkeypatch):
    """workers=None: one process per WORK_PER_WORKER witness-sets, at most one per core; a
    small call stays in the calling process (16 workers made 40 sets of 1000 points 6x slower)."""
    import fastgan.metrics.geometry_score as module

    monkeypatch.setattr(module, "available_cores", lambda: 16)
    assert module.default_workers(40, 1000) == 1
    assert module.default_workers(300, 1000) == 3
    assert module.default_workers(1000, 5000) == 16
    monkeypatch.setattr(module, "available_cores", lambda: 1)
    assert module.default_workers(1000, 5000) == 1

    def no_pool(*args, **kwargs):
        raise AssertionError("a small call started worker processes")

    monkeypatch.setattr(module, "available_cores", lambda: 16)
    monkeypatch.setattr(module, "ProcessPoolExecutor", no_pool)
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(120, 3, generator=generator, dtype=torch.float64)
    sets = draw_landmarks(120, 5, 16, generator)
    assert torch.equal(relative_living_times(x, landmarks=sets, gamma=0.1),
                       relative_living_times(x, landmarks=sets, gamma=0.1, workers=1))


def test_distance_table_in_chunks_gives_the_same_rlts(monkeypatch):
    """Past DISTANCE_TABLE_BYTES the table is computed chunk by chunk of landmark sets."""
    import fastgan.metrics.geometry_score as module

    generator = torch.Generator().manual_seed(13)
    x = torch.randn(200, 3, generator=generator, dtype=torch.float64)
    sets = draw_landmarks(200, 7, 16, generator)
    whole = relative_living_times(x, landmarks=sets, gamma=0.1, workers=1)
    monkeypatch.setattr(module, "DISTANCE_TABLE_BYTES", 200 * 16 * 8 * 2)  # two sets' columns per chunk
    assert len(list(module._distance_blocks(x, sets))) == 4
    assert torch.equal(relative_living_times(x, landmarks=sets, gamma=0.1, workers=1), whole)
    assert torch.equal(relative_living_times(x, landmarks=sets, gamma=0.1, workers=2), whole)


def test_known_topology():
    """A circle has one long-lived hole, two circles two, a Gaussian blob none."""
    generator = torch.Generator().manual_seed(0)
    shapes = {1: circle(400, generator), 2: torch.cat((circle(200, generator), circle(200, generator, (3.0, 0.0)))),
              0: torch.randn(400, 2, generator=generator, dtype=torch.float64)}
    for holes, x in shapes.items():
        mrlt = mean_relative_living_times(x, n=12, L_0=32, gamma=0.1,
                                          generator=torch.Generator().manual_seed(1), workers=1)
        assert mrlt.shape == (100,)
        assert int(mrlt.argmax()) == holes and float(mrlt[holes]) > 0.6, (holes, mrlt)
        assert float(mrlt.sum()) == pytest.approx(1.0, abs=1e-12)


def test_geometry_score_orders_topologies():
    generator = torch.Generator().manual_seed(2)
    one, other_one = circle(300, generator), circle(300, generator, radius=2.0)
    two = torch.cat((circle(150, generator), circle(150, generator, (3.0, 0.0))))
    options = dict(n=10, L_0=24, gamma=0.1, i_max=10, workers=1)
    same = geometry_score(one, other_one, generator=torch.Generator().manual_seed(4), **options)
    different = geometry_score(one, two, generator=torch.Generator().manual_seed(4), **options)
    assert same < 0.01 < different
    # the landmarks of x are drawn first, then those of y, from the one generator
    generator = torch.Generator().manual_seed(4)
    mrlt_one = mean_relative_living_times(one, generator=generator, **options)
    mrlt_two = mean_relative_living_times(two, generator=generator, **options)
    assert different == pytest.approx(float(((mrlt_one - mrlt_two) ** 2).sum()), abs=1e-15)


@pytest.mark.parametrize("device", DEVICES)
def test_landmarks_come_from_a_generator_on_any_device(device):
    sets = draw_landmarks(50, 3, 7, torch.Generator(device).manual_seed(0))
    assert sets.device.type == "cpu" and sets.shape == (3, 7)
    assert all(len(set(row.tolist())) == 7 and 0 <= row.min() and row.max() < 50 for row in sets)


def test_default_gamma_and_landmark_draws():
    assert default_gamma(5000) == 1 / 128 and default_gamma(2500) == 1 / 256
    sets = draw_landmarks(50, 7, 10, torch.Generator().manual_seed(0))
    assert sets.shape == (7, 10) and sets.dtype == torch.int64
    assert all(len(set(row.tolist())) == 10 for row in sets) and int(sets.min()) >= 0 and int(sets.max()) < 50
    assert torch.equal(sets, draw_landmarks(50, 7, 10, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("setting, message", [({"seed": "a"}, "seed must be an int, got 'a'"),
                                              ({"seed": 1.5}, "seed must be an int, got 1.5"),
                                              ({"workers": 0}, "workers must be an int >= 1 or None")])
def test_metric_settings_are_checked_when_it_is_made(setting, message):
    """Not at compute(), after every feature was collected (seed=1.5 was torch's manual_seed error)."""
    with pytest.raises(ValueError, match=message):
        GeometryScore(**setting)


def test_a_progress_bar_counts_the_sets_and_changes_nothing(capsys):
    points = circle(60, torch.Generator().manual_seed(1))
    quiet = mean_relative_living_times(points, n=12, L_0=10, i_max=6, generator=torch.Generator().manual_seed(2), workers=1)
    assert capsys.readouterr().err == ""
    shown = mean_relative_living_times(points, n=12, L_0=10, i_max=6, generator=torch.Generator().manual_seed(2),
                                       workers=1, progress=True)
    assert "Geometry Score: landmark sets" in capsys.readouterr().err
    assert torch.equal(quiet, shown)


def test_metric_object_matches_functional_api():
    generator = torch.Generator().manual_seed(6)
    real, fake = torch.randn(200, 3, generator=generator), circle(170, generator).float() @ torch.randn(2, 3, generator=generator)
    metric = GeometryScore(n=8, L_0=20, gamma=0.08, i_max=12, seed=3, workers=1)
    metric.update(real_features=real[:50], fake_features=fake[:90])
    metric.update(real_features=real[50:])
    metric.update(fake_features=fake[90:])
    expected = geometry_score(real, fake, n=8, L_0=20, gamma=0.08, i_max=12,
                              generator=torch.Generator().manual_seed(3), workers=1)
    assert metric.compute() == pytest.approx(expected, abs=1e-15)
    assert metric.compute() == pytest.approx(expected, abs=1e-15)  # a fresh generator in every compute
    real_mrlt, fake_mrlt = metric.mrlts()
    assert real_mrlt.shape == fake_mrlt.shape == (12,)
    metric.reset()
    with pytest.raises(ValueError, match="at least L_0 = 20 points"):
        metric.compute()


def _distributed_worker(rank, world, init_file, real, fake, result_pattern):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    metric = GeometryScore(n=4, L_0=16, gamma=0.1, i_max=8, seed=1, workers=1)
    # rank 1 has no fake points at all
    metric.update(real_features=real[rank::world])
    if rank == 0:
        metric.update(fake_features=fake)
    torch.save(metric.compute(), result_pattern.format(rank))
    exit_worker()


@pytest.mark.slow
def test_two_processes_compute_the_score_of_all_points():
    generator = torch.Generator().manual_seed(8)
    real, fake = torch.randn(90, 2, generator=generator, dtype=torch.float64), circle(70, generator)
    single = GeometryScore(n=4, L_0=16, gamma=0.1, i_max=8, seed=1, workers=1)
    # rank order: rank 0's points, then rank 1's
    single.update(real_features=torch.cat((real[0::2], real[1::2])), fake_features=fake)
    expected = single.compute()
    with tempfile.TemporaryDirectory() as tmp:
        pattern = os.path.join(tmp, "rank{}.pt")
        mp.spawn(_distributed_worker, args=(2, os.path.join(tmp, "init"), real, fake, pattern), nprocs=2)
        assert [torch.load(pattern.format(rank)) for rank in range(2)] == [expected, expected]


def test_integer_points_are_taken_as_their_float64_values():
    """8-bit pixels, say, as numpy's uint8: the same RLTs as their float64 values."""
    generator = torch.Generator().manual_seed(12)
    pixels = torch.randint(0, 256, (60, 5), generator=generator, dtype=torch.uint8)
    landmarks = torch.randperm(60, generator=generator)[:12]
    expected = relative_living_times(pixels.double(), landmarks=landmarks)
    for points in (pixels, pixels.numpy(), pixels.to(torch.int64)):
        torch.testing.assert_close(relative_living_times(points, landmarks=landmarks), expected, rtol=0, atol=0)


def test_bad_input_is_rejected_clearly():
    x = torch.randn(40, 3, dtype=torch.float64)
    landmarks = torch.arange(8)
    with pytest.raises(ValueError, match=r"2-D \(N, d\) point set, got shape \(40, 3, 1\)"):
        relative_living_times(x[..., None], landmarks=landmarks)
    with pytest.raises(ValueError, match=r"2-D \(N, d\) point set, got shape \(40,\)"):
        mean_relative_living_times(x[:, 0], n=2, L_0=4)
    with pytest.raises(ValueError, match=r"y must be a 2-D \(N, d\) point set"):
        geometry_score(x, x[None], n=2, L_0=4)
    with pytest.raises(ValueError, match="NaN or Inf"):
        relative_living_times(torch.where(x == x[3, 1], float("nan"), x), landmarks=landmarks)
    with pytest.raises(ValueError, match="floating-point"):
        relative_living_times(torch.ones(40, 3, dtype=torch.bool), landmarks=landmarks)
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        relative_living_times([[0.0, 1.0]] * 5, landmarks=landmarks)
    for i_max in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="i_max must be an int >= 1"):
            relative_living_times(x, landmarks=landmarks, i_max=i_max)
    with pytest.raises(ValueError, match=r"landmark indices must lie in \[0, 39\].*got 0\.\.40"):
        relative_living_times(x, landmarks=torch.tensor([0, 5, 40]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 39\].*got -1\.\.5"):
        relative_living_times(x, landmarks=torch.tensor([-1, 5]))
    with pytest.raises(ValueError, match="landmark set 1 repeats an index"):
        relative_living_times(x, landmarks=torch.tensor([[0, 1, 2], [4, 7, 4]]))
    with pytest.raises(ValueError, match="integer indices"):
        relative_living_times(x, landmarks=torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(L_0,\) or \(n, L_0\)"):
        relative_living_times(x, landmarks=torch.zeros(2, 2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="L_0 = 64 landmarks per set need at least 64 points, got N = 40"):
        mean_relative_living_times(x, n=3)
    with pytest.raises(ValueError, match="n \\(landmark sets\\) must be an int >= 1"):
        mean_relative_living_times(x, n=0, L_0=4)
    for gamma in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="gamma must be a positive finite number"):
            relative_living_times(x, landmarks=landmarks, gamma=gamma)
    with pytest.raises(ValueError, match="workers must be an int >= 1"):
        relative_living_times(x, landmarks=landmarks, workers=0)
    with pytest.raises(ValueError, match="coincide"):
        relative_living_times(torch.ones(10, 2), landmarks=torch.arange(4))
    metric = GeometryScore(n=2, L_0=4)
    with pytest.raises(ValueError, match="needs real_features or fake_features"):
        metric.update()
    with pytest.raises(ValueError, match=r"must have shape \(N, d\).*flatten"):
        metric.update(real_features=torch.randn(4, 3, 8, 8))
    metric.update(real_features=torch.randn(5, 3))
    with pytest.raises(ValueError, match="4 features per sample in batch 4, the features given before have 3"):
        metric.update(fake_features=torch.randn(5, 4))
    with pytest.raises(ValueError, match="i_max must be an int >= 1"):
        GeometryScore(i_max=0)


# ---------------------------------------------------------------- command line


def _image_folder(path, count, seed, size, ring=False):
    """PNG images; ``ring``: a bright dot moving around a circle (pixels on a closed curve)."""
    from PIL import Image

    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        if ring:
            image = np.zeros((size, size, 3), dtype=np.uint8)
            angle = 2 * np.pi * rng.uniform()
            row, col = (np.array([np.sin(angle), np.cos(angle)]) * (size / 3) + size / 2).astype(int)
            image[row - 1:row + 2, col - 1:col + 2] = 255
        else:
            image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(image).save(path / f"{i:03d}.png")
    return str(path)


def test_cli_point_sets_and_plot(tmp_path, capsys):
    from fastgan.__main__ import main

    generator = torch.Generator().manual_seed(12)
    np.save(tmp_path / "circle.npy", circle(200, generator).numpy())
    np.savez(tmp_path / "blob.npz", points=torch.randn(180, 2, generator=generator).numpy())
    plot = tmp_path / "mrlt.png"
    options = ["--sets", "6", "--landmarks", "24", "--gamma", "0.1", "--workers", "1", "--device", "cpu"]
    assert main(["gs", str(tmp_path / "circle.npy"), str(tmp_path / "blob.npz"), "--plot", str(plot)] + options) == 0
    out, err = capsys.readouterr()
    score = float(out.split("GS:")[1])
    assert score > 0.1 and "circle.npy: 200 points of dimension 2; MRLT largest at i=1" in err
    assert plot.stat().st_size > 1000
    # the same as the API with the same seed (landmarks of PATH_A first)
    expected = geometry_score(torch.from_numpy(np.load(tmp_path / "circle.npy")),
                              torch.from_numpy(np.load(tmp_path / "blob.npz")["points"]),
                              n=6, L_0=24, gamma=0.1, generator=torch.Generator().manual_seed(0), workers=1)
    assert score == pytest.approx(expected, rel=1e-5)


def test_cli_image_folders(tmp_path, capsys, monkeypatch):
    import fastgan.__main__ as cli

    ring, noise = _image_folder(tmp_path / "ring", 40, 0, 12, ring=True), _image_folder(tmp_path / "noise", 30, 1, 12)
    options = ["--sets", "3", "--landmarks", "8", "--workers", "1", "--device", "cpu"]
    assert cli.main(["gs", ring, noise] + options) == 0
    out, err = capsys.readouterr()
    assert out.startswith("GS: ") and "40 points of dimension 432" in err and "30 points of dimension 432" in err
    # --features inception: the images go through the command's Inception loader and
    # batching (299x299); a small stand-in network keeps this fast (the Inception
    # network itself is tested in test_inception.py and test_cli.py)
    seen = []

    def pooled_features(images):
        seen.append(tuple(images.shape[1:]))
        return torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)

    monkeypatch.setattr(cli, "_network", lambda args: pooled_features)
    assert cli.main(["gs", ring, noise, "--features", "inception", "--batch-size", "16"] + options) == 0
    assert "40 points of dimension 48" in capsys.readouterr().err
    assert set(seen) == {(3, 299, 299)} and len(seen) == 3 + 2


def test_cli_pixels_are_read_as_fid_reads_images(tmp_path):
    """16-bit grayscale is k / 65535 replicated to RGB (PIL's convert("RGB") clips it to white)."""
    from PIL import Image

    from fastgan.__main__ import _gs_points

    folder = tmp_path / "gray16"
    folder.mkdir()
    values = np.random.default_rng(0).integers(1000, 31000, (3, 5, 4)).astype(np.uint16)
    for i, image in enumerate(values):
        Image.fromarray(image).save(folder / f"{i}.png")
    points = _gs_points(str(folder), "pixels", None, None)
    expected = np.repeat(values[..., None] / 65535.0, 3, axis=3).reshape(3, -1)
    np.testing.assert_allclose(points.numpy(), expected, rtol=1e-6)


def test_cli_errors_are_clear(tmp_path, capsys):
    from fastgan.__main__ import main

    small = _image_folder(tmp_path / "small", 3, 0, 8)
    mixed = _image_folder(tmp_path / "mixed", 2, 0, 8)
    _image_folder(tmp_path / "mixed" / "bigger", 1, 0, 9)
    np.savez(tmp_path / "two.npz", a=np.zeros((5, 2)), b=np.zeros((5, 2)))
    np.save(tmp_path / "flat.npy", np.zeros(5))
    np.save(tmp_path / "wide.npy", np.random.default_rng(0).normal(size=(80, 3)))
    np.save(tmp_path / "narrow.npy", np.random.default_rng(0).normal(size=(80, 2)))
    cases = [([str(tmp_path / "none.npy"), small], "no such point-set file"),
             ([str(tmp_path / "nowhere"), small], "neither an image folder nor a .npy/.npz point set"),
             ([str(tmp_path / "two.npz"), small], "holds arrays ['a', 'b']: name the point set 'points'"),
             ([str(tmp_path / "flat.npy"), small], "a point set is a 2-D numeric array (N, d)"),
             ([mixed, small], "pixels need one size"),
             ([str(tmp_path / "wide.npy"), str(tmp_path / "narrow.npy")], "dimension 3"),
             ([small, small], "L_0 = 64 landmarks per set need at least 64 points, got N = 3")]
    for paths, message in cases:
        assert main(["gs"] + paths + ["--workers", "1", "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert message in err and err.startswith("error:"), (paths, err)


def test_metric_object_leaves_the_global_random_stream_alone():
    """Building the metric validates n and L_0 without drawing: its landmarks come from its own
    seeded generator, and a training script's torch.manual_seed stream must not shift."""
    torch.manual_seed(5)
    expected = torch.rand(4)
    torch.manual_seed(5)
    GeometryScore(n=30, L_0=16)
    assert torch.equal(torch.rand(4), expected)
    with pytest.raises(ValueError, match="L_0 \\(landmarks per set\\) must be an int >= 1"):
        GeometryScore(L_0=0)
    with pytest.raises(ValueError, match="n \\(landmark sets\\) must be an int >= 1"):
        GeometryScore(n=-2)


def test_functional_errors_name_the_argument_not_a_batch():
    """The functions take whole point sets: their messages must not speak of update batches."""
    x = torch.randn(41, 3, dtype=torch.float64)
    bad = x.clone()
    bad[7, 2] = float("inf")
    for name, call in (("y", lambda: geometry_score(x, bad, n=2, L_0=4)),
                       ("x", lambda: mean_relative_living_times(bad.numpy(), n=2, L_0=4))):
        with pytest.raises(ValueError) as error:
            call()
        message = str(error.value)
        assert message.startswith(f"{name} contains NaN or Inf"), message
        assert "batch" not in message and "update" not in message, message
    with pytest.raises(ValueError, match="floating-point") as error:
        relative_living_times(torch.ones(9, 2, dtype=torch.bool), landmarks=torch.arange(3))
    assert "batch" not in str(error.value)


def test_numpy_scalar_gamma_is_accepted():
    generator = torch.Generator().manual_seed(17)
    x = torch.randn(151, 3, generator=generator, dtype=torch.float64)
    sets = draw_landmarks(151, 3, 13, generator)
    expected = relative_living_times(x, landmarks=sets, gamma=0.125, workers=1)
    for gamma in (np.float32(0.125), np.float64(0.125), 1 / 8):
        assert torch.equal(relative_living_times(x, landmarks=sets, gamma=gamma, workers=1), expected)
    with pytest.raises(ValueError, match="gamma must be a positive finite number"):
        relative_living_times(x, landmarks=sets, gamma=True)


def test_plot_mrlt_with_holes_up_to_i_max_and_the_callers_backend(tmp_path):
    """The last counted hole number (i_max - 1) can carry mass, e.g. with --i-max 3; and drawing
    must not switch the caller's matplotlib backend (a notebook's inline one, say)."""
    import matplotlib

    from fastgan.metrics.geometry_score import plot_mrlt

    before = matplotlib.get_backend()
    matplotlib.use("pdf")
    try:
        plot_mrlt({"a": torch.tensor([0.25, 0.375, 0.375], dtype=torch.float64), "b": np.array([0.5, 0.5, 0.0])},
                  tmp_path / "mrlt.png")
        assert matplotlib.get_backend() == "pdf"
    finally:
        matplotlib.use(before)
    from PIL import Image

    with Image.open(tmp_path / "mrlt.png") as image:
        assert image.format == "PNG" and image.size == (640, 360)


def test_cli_plot_with_a_small_i_max(tmp_path, capsys):
    from fastgan.__main__ import main

    generator = torch.Generator().manual_seed(19)
    np.save(tmp_path / "two.npy", torch.cat((circle(90, generator), circle(90, generator, (3.0, 0.0)))).numpy())
    np.save(tmp_path / "one.npy", circle(150, generator).numpy())
    plot = tmp_path / "mrlt.png"
    options = ["--sets", "4", "--landmarks", "24", "--gamma", "0.1", "--i-max", "2", "--workers", "1", "--device", "cpu"]
    assert main(["gs", str(tmp_path / "two.npy"), str(tmp_path / "one.npy"), "--plot", str(plot)] + options) == 0, \
        capsys.readouterr().err
    assert plot.stat().st_size > 1000
