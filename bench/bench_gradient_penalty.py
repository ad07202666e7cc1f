"""Benchmark: one full discriminator step with a gradient penalty, SNDCGAN, batch 64, 32x32.

A step is D on real and fake, the penalty, and the backward of the total loss
(WGAN loss + 10·penalty), for WGAN-GP and R1. Compared side by side in one run:

* the plain-autograd penalty every GAN codebase hand-writes (interpolate,
  ``autograd.grad(create_graph=True)``, norm, subtract, square);
* ``fastgan.penalties.gradient_penalty`` on every backend usable on the device.

Ratios are plain autograd / fastgan. Results go to
``bench/results/gradient_penalty-<device>-<date>.{json,md}``.

Usage: python bench/bench_gradient_penalty.py [--device cpu|cuda] [--quick]
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List

import torch

sys.path.insert(0, os.path.dirname(__file__))
import timing  # noqa: E402
import fastgan  # noqa: E402
from fastgan.models import build_models  # noqa: E402

BATCH, SIZE, LAMBDA = 64, 32, 10.0


def plain_autograd_penalty(d, real, fake, kind):
    if kind == "wgan-gp":
        alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
        point = (real + alpha * (fake - real)).detach().requires_grad_(True)
    else:
        point = real.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(d(point).sum(), point, create_graph=True)
    sq = g.flatten(1).square().sum(1)
    if kind == "r1":
        return 0.5 * sq.mean()
    return (torch.sqrt(1e-4 + sq) - 1).square().mean()


def d_step(d, real, fake, penalty: Callable) -> Callable[[], None]:
    def step():
        d.zero_grad(set_to_none=True)
        loss = d(fake).mean() - d(real).mean() + LAMBDA * penalty()
        loss.backward()

    return step


def variants(device, backends, kind) -> Dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    d = build_models("sndcgan", SIZE, d_norm="none")[1].to(device)
    real = torch.rand(BATCH, 3, SIZE, SIZE, device=device)
    fake = torch.rand(BATCH, 3, SIZE, SIZE, device=device)
    steps = {"plain autograd": d_step(d, real, fake, lambda: plain_autograd_penalty(d, real, fake, kind))}
    for backend in backends:
        def penalty(backend=backend):
            with fastgan.use_backend(backend):
                return fastgan.penalties.gradient_penalty(d, real, fake, kind)

        steps[f"fastgan [{backend}]"] = d_step(d, real, fake, penalty)
    return steps


def main(argv=None) -> int:
    args = timing.parse_args(__doc__, argv)
    device = args.device
    min_run_time = 0.5 if args.quick else 8.0
    backends = timing.kernel_backends(device)
    env = timing.environment(device)
    print(f"SNDCGAN D step with gradient penalty, batch {BATCH}, {SIZE}x{SIZE}, on {env['device']}, torch {env['torch']}")
    rows: List[Dict[str, object]] = []
    for kind in ("wgan-gp", "r1"):
        times = timing.medians_us(variants(device, backends, kind), min_run_time)
        rows += timing.ratio_rows(kind, times, times["plain autograd"])
        print(f"{kind}:")
        timing.print_table([r for r in rows if r["figure"] == kind])
    notes = "One D step: D(real), D(fake), penalty, backward of WGAN loss + 10·penalty. Ratio = plain autograd / variant."
    timing.report(args, "gradient_penalty", env, rows, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
