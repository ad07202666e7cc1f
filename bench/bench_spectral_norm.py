"""Benchmark: one full spectral-norm refresh of the SNDCGAN discriminator's weights.

A refresh is what one training forward of an SN'd discriminator spends on SN:
every layer's power iteration, sigma and W / sigma (training mode, one iteration).
Compared side by side in one run:

* torch's parametrization (``torch.nn.utils.parametrizations.spectral_norm``),
* torch's hook form (``torch.nn.utils.spectral_norm``),
* fastgan's ``apply_spectral_norm`` (one multi-tensor launch for all layers) and
  fastgan's per-layer ``spectral_norm``, on every backend usable on the device,
* fastgan's multi-tensor power iteration alone (u, v, sigma; no W / sigma).

Ratios are against the faster of torch's two forms. Results go to
``bench/results/spectral_norm-<device>-<date>.{json,md}``.

Usage: python bench/bench_spectral_norm.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Dict, List

import torch
from torch import nn

sys.path.insert(0, __import__("os").path.dirname(__file__))
import timing  # noqa: E402

import fastgan  # noqa: E402

grouped = importlib.import_module("fastgan.nn.spectral_norm")


def sndcgan_discriminator() -> nn.Sequential:
    """SNDCGAN D's weight layers for 32x32 inputs (shapes from SPEC.md §3)."""
    spec = [(3, 64, 3, 1), (64, 128, 4, 2), (128, 128, 3, 1), (128, 256, 4, 2), (256, 256, 3, 1), (256, 512, 4, 2), (512, 512, 3, 1)]
    layers: List[nn.Module] = [nn.Conv2d(i, o, k, s, padding=1) for i, o, k, s in spec]
    layers.append(nn.Linear(512 * 4 * 4, 1))
    return nn.Sequential(*layers)


def weight_layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model if isinstance(m, (nn.Conv2d, nn.Linear))]


def torch_parametrization(device) -> Callable[[], object]:
    model = sndcgan_discriminator().to(device)
    for m in weight_layers(model):
        torch.nn.utils.parametrizations.spectral_norm(m)
    return lambda: [m.weight for m in weight_layers(model)]


def torch_hook(device) -> Callable[[], object]:
    model = sndcgan_discriminator().to(device)
    for m in weight_layers(model):
        torch.nn.utils.spectral_norm(m)
    hooks = [(m, next(iter(m._forward_pre_hooks.values()))) for m in weight_layers(model)]
    return lambda: [hook(m, ()) for m, hook in hooks]


def fastgan_grouped(device, backend) -> Callable[[], object]:
    with fastgan.use_backend(backend):
        model = fastgan.nn.apply_spectral_norm(sndcgan_discriminator().to(device))
    hook = next(h for h in model._forward_pre_hooks.values() if isinstance(h, grouped._GroupedPowerIteration))
    layers = weight_layers(model)

    def refresh():
        with fastgan.use_backend(backend):
            hook(model, ())
            return [m.weight for m in layers]

    return refresh


def fastgan_per_layer(device, backend) -> Callable[[], object]:
    with fastgan.use_backend(backend):
        model = sndcgan_discriminator().to(device)
        for m in weight_layers(model):
            fastgan.nn.spectral_norm(m)

    def refresh():
        with fastgan.use_backend(backend):
            return [m.weight for m in weight_layers(model)]

    return refresh


def fastgan_power_iteration_only(device, backend) -> Callable[[], object]:
    model = sndcgan_discriminator().to(device)
    weights = [m.weight.detach() for m in weight_layers(model)]
    us = [torch.nn.functional.normalize(torch.randn(w.shape[0], device=device), dim=0) for w in weights]
    vs = [torch.nn.functional.normalize(torch.randn(w[0].numel(), device=device), dim=0) for w in weights]
    dims = [0] * len(weights)

    def refresh():
        with fastgan.use_backend(backend):
            return torch.ops.fastgan.spectral_norm_power_iteration_multi(weights, us, vs, dims, 1, 1e-12, True)

    return refresh


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=str(timing.default_device()), help="cpu or cuda (default: cuda when visible)")
    parser.add_argument("--quick", action="store_true", help="shorter timing runs (for the demo)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    min_run_time = 0.2 if args.quick else 1.0
    report = fastgan.backends()
    backends = [b for b in ("triton", "cuda", "cpp", "reference") if report[b][device.type]]
    if device.type == "cpu":
        backends = [b for b in backends if b != "triton"]  # the interpreter is a test tool, not a kernel

    variants: Dict[str, Callable[[], object]] = {
        "torch parametrizations.spectral_norm": torch_parametrization(device),
        "torch utils.spectral_norm (hook)": torch_hook(device),
    }
    for backend in backends:
        variants[f"fastgan apply_spectral_norm [{backend}]"] = fastgan_grouped(device, backend)
        variants[f"fastgan spectral_norm per layer [{backend}]"] = fastgan_per_layer(device, backend)
        variants[f"fastgan multi power iteration only [{backend}]"] = fastgan_power_iteration_only(device, backend)

    env = timing.environment(device)
    print(f"SN refresh of the SNDCGAN discriminator (5.9M weights) on {env['device']}, torch {env['torch']}, triton {env['triton']}")
    times = {name: timing.median_us(fn, min_run_time) for name, fn in variants.items()}
    baseline = min(times["torch parametrizations.spectral_norm"], times["torch utils.spectral_norm (hook)"])
    rows = [{"variant": name, "median_us": t, "ratio": baseline / t} for name, t in times.items()]
    timing.print_table(rows)
    if not args.no_write:
        notes = (
            "One training-mode refresh (power iteration, sigma, W/sigma) of all 8 SNDCGAN D layers; "
            "ratio = faster torch form / variant. `python bench/bench_spectral_norm.py --device "
            f"{device.type}`."
        )
        print("written to", timing.write_results("spectral_norm", device, env, rows, notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
