"""The Fréchet distance against the pytorch-fid formula (scipy sqrtm, float64).

Bound: |ΔFID| ≤ 1e-3 + 1e-6·FID, on full-rank, singular (N < d) and ill-conditioned
covariances, d ∈ {16, 64, 256, 2048}. Newton–Schulz must meet it wherever it claims
convergence (reference on CPU; Triton under the interpreter at small d).
"""
import os

import numpy as np
import pytest
import scipy.linalg
import torch

import fastgan
from fastgan.metrics import FeatureStatistics, frechet_distance
from fastgan.ops import frechet as ops
from fastgan.reference import frechet as reference
from conftest import DEVICES, device_backends, exit_worker


def pytorch_fid_formula(mu1, sigma1, mu2, sigma2):
    """What pytorch-fid computes: scipy sqrtm, the 1e-6·I retry, and the real part."""
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(sigma1 @ sigma2, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


def features(n, d, kind, generator, shift=0.0):
    """Feature sets with full-rank, singular (n < d) or ill-conditioned covariances."""
    x = torch.randn(n, d, dtype=torch.float64, generator=generator)
    if kind == "ill-conditioned":
        x = x * torch.logspace(0, -4, d, dtype=torch.float64)  # eigenvalues over 8 decades
    else:
        x = x @ (torch.randn(d, d, dtype=torch.float64, generator=generator) / d**0.5)
    return x + shift + 0.5


def statistics_pair(n, d, kind, seed):
    generator = torch.Generator().manual_seed(seed)
    a = FeatureStatistics().update(features(n, d, kind, generator))
    b = FeatureStatistics().update(features(n, d, kind, generator, shift=0.1) * 1.2)
    return a, b


def bound(fid):
    return 1e-3 + 1e-6 * abs(fid)


CASES = [
    pytest.param(d, n, kind, id=f"{kind}-d{d}-n{n}")
    for d in (16, 64, 256)
    for n, kind in ((4 * d, "full-rank"), (d // 2, "singular"), (4 * d, "ill-conditioned"))
] + [
    pytest.param(2048, 4096, "full-rank", id="full-rank-d2048"),
    pytest.param(2048, 1000, "singular", id="singular-d2048"),
    pytest.param(2048, 4096, "ill-conditioned", id="ill-conditioned-d2048"),
]


@pytest.mark.parametrize("d,n,kind", CASES)
def test_symmetric_method_matches_pytorch_fid(d, n, kind):
    a, b = statistics_pair(n, d, kind, seed=d + n)
    expected = pytorch_fid_formula(*(t.numpy() for t in (a.mean, a.covariance, b.mean, b.covariance)))
    got = frechet_distance(a, b, "symmetric")
    assert abs(got - expected) <= bound(expected), (got, expected)
    assert got >= 0


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
@pytest.mark.parametrize("d,n,kind", [(16, 64, "full-rank"), (64, 256, "full-rank"), (64, 32, "singular"), (37, 200, "ill-conditioned")])
def test_newton_schulz_meets_the_bound_where_it_converges(device, backend, d, n, kind):
    a, b = statistics_pair(n, d, kind, seed=n)
    expected = pytorch_fid_formula(*(t.numpy() for t in (a.mean, a.covariance, b.mean, b.covariance)))
    exact_trace = float(reference.trace_sqrt_product_symmetric(a.covariance, b.covariance))
    moved = [t.to(device) for t in (a.mean, a.covariance, b.mean, b.covariance)]
    with fastgan.use_backend(backend):
        value, converged = ops.newton_schulz(moved[1], moved[3])
        fid = float(ops.frechet_distance(*moved, "newton-schulz"))  # falls back when not converged
    if converged:
        assert abs(2 * (float(value) - exact_trace)) <= bound(expected)
    assert abs(fid - expected) <= bound(expected)
    if kind == "full-rank":
        assert converged, "Newton–Schulz should converge on well-conditioned full-rank statistics"


def test_results_are_real_and_never_negative():
    a = FeatureStatistics().update(torch.rand(40, 64, dtype=torch.float64))
    assert frechet_distance(a, a) == 0.0  # identical statistics: round-off negatives clamp to 0
    value = ops.trace_sqrt_product(a.covariance, a.covariance)
    assert value.dtype == torch.float64 and not value.is_complex()


def test_cached_factor_gives_the_same_distance():
    a, b = statistics_pair(300, 64, "full-rank", seed=1)
    direct = float(ops.frechet_distance(a.mean, a.covariance, b.mean, b.covariance, "symmetric"))
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-12)
    assert a._factor is not None  # reused by the next evaluation against a


def test_gradcheck_wrt_second_statistics():
    a, b = statistics_pair(60, 6, "full-rank", seed=3)
    mu2 = b.mean.clone().requires_grad_()
    sigma2 = b.covariance.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda m, s: ops.frechet_distance(a.mean, a.covariance, m, s, "symmetric"), (mu2, sigma2)
    )


def test_opcheck():
    a, b = statistics_pair(60, 7, "full-rank", seed=4)
    torch.library.opcheck(torch.ops.fastgan.trace_sqrt_product.default, (a.covariance, b.covariance, "symmetric", None))
    torch.library.opcheck(torch.ops.fastgan.trace_sqrt_product.default, (a.covariance, b.covariance.clone().requires_grad_(), "auto", None))
    torch.library.opcheck(torch.ops.fastgan.feature_moments.default, (torch.rand(9, 5),))


# ---------------------------------------------------------------- the streaming accumulator


def test_streaming_statistics_equal_one_pass():
    x = torch.rand(301, 17, dtype=torch.float32) * 3 + 1
    streamed = FeatureStatistics()
    for batch in x.split(64):
        streamed.update(batch)
    torch.testing.assert_close(streamed.mean, x.double().mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(streamed.covariance, torch.cov(x.double().T), rtol=1e-10, atol=1e-12)
    halves = FeatureStatistics().update(x[:150]).merge(FeatureStatistics().update(x[150:]))
    torch.testing.assert_close(halves.covariance, streamed.covariance, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_feature_moments_on_every_backend(device):
    x = torch.rand(37, 11, device=device) + 2
    expected = reference.feature_moments(x)
    backends = ("reference", "cpp" if device == "cpu" else "cuda")
    for backend in backends:
        with fastgan.use_backend(backend):
            total, outer = ops.feature_moments(x)
        assert total.dtype == outer.dtype == torch.float64
        torch.testing.assert_close(total, expected[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(outer, expected[1], rtol=1e-12, atol=1e-12)


def test_nan_features_name_the_batch():
    stats = FeatureStatistics().update(torch.rand(4, 3))
    bad = torch.rand(4, 3)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"features of batch 2 .*contains NaN or Inf"):
        stats.update(bad)


def test_save_and_load_round_trip(tmp_path):
    stats = FeatureStatistics().update(torch.rand(50, 8))
    path = str(tmp_path / "stats.npz")
    stats.save(path)
    loaded = FeatureStatistics.load(path)
    torch.testing.assert_close(loaded.mean, stats.mean)
    torch.testing.assert_close(loaded.covariance, stats.covariance)
    assert loaded.count == 50 and not any(name.startswith("stats.npz.tmp") for name in os.listdir(tmp_path))
    with pytest.raises(FileNotFoundError, match="no statistics file"):
        FeatureStatistics.load(str(tmp_path / "missing.npz"))
    np.savez(tmp_path / "wrong.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="needs arrays 'mu' and 'sigma'"):
        FeatureStatistics.load(str(tmp_path / "wrong.npz"))


def test_fid_metric_object():
    from fastgan.metrics import FID

    real, fake = torch.rand(120, 16), torch.rand(90, 16) * 1.3
    metric = FID(feature_dim=16)
    for batch in real.split(50):
        metric.update(batch, real=True)
    for batch in fake.split(50):
        metric.update(batch, real=False)
    expected = frechet_distance(FeatureStatistics().update(real), FeatureStatistics().update(fake))
    assert metric.compute() == pytest.approx(expected, rel=1e-10)
    metric.reset()
    metric.set_real_statistics(FeatureStatistics().update(real))
    metric.update(fake, real=False)
    assert metric.compute() == pytest.approx(expected, rel=1e-10)


def _fid_worker(rank, world, init_file, real, fake, result_file):
    import torch.distributed as dist

    from fastgan.metrics import FID

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    metric = FID(feature_dim=real.shape[1])
    metric.update(real[rank::world], real=True)
    if rank == 0:  # rank 1 sees no fakes at all
        metric.update(fake, real=False)
    value = metric.compute()
    if rank == 1:
        torch.save(value, result_file)
    exit_worker()


def test_fid_reduces_across_processes(tmp_path):
    import torch.multiprocessing as mp

    from fastgan.metrics import FID

    real, fake = torch.rand(41, 9), torch.rand(30, 9) * 1.2
    single = FID(feature_dim=9)
    single.update(real, real=True)
    single.update(fake, real=False)
    result = str(tmp_path / "fid.pt")
    mp.spawn(_fid_worker, args=(2, str(tmp_path / "init"), real, fake, result), nprocs=2)
    assert torch.load(result) == pytest.approx(single.compute(), rel=1e-10)
