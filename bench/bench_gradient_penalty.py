"""Benchmark: one full discriminator step with a gradient penalty, SNDCGAN, batch 64, 32x32.

A step is D on real and fake, the penalty, and the backward of the total loss
(WGAN loss + 10·penalty), for WGAN-GP and R1; one group per penalty with

* the plain-autograd penalty every GAN codebase hand-writes (interpolate,
  ``autograd.grad(create_graph=True)``, norm, subtract, square) -- the baseline;
* ``fastgan.penalties.gradient_penalty`` on every backend usable on the device;
* on a GPU, the WGAN-GP step of the baseline and of each kernel backend as a
  :class:`fastgan.graphs.GraphedStep` (``..., graphed``):
  the same step replayed from a CUDA graph, α drawn on the device at each replay. Eager,
  the host sets the pace of this step (an H100 machine took 12.4 ms to issue what its
  kernels ran in 7.4 ms), so these entries show what a hand-written loop gains by one
  wrapper, and the plain penalty's graphed entry how much of that is the graph's.

Before timing, each fastgan variant runs one step from the same weights, batches and
interpolation weights α as the baseline and must give the same penalty and the same
D gradients (in float64, to 1e-9, on 8 of the samples). Rate: TFLOP/s of the step's FLOPs (convolutions and matmuls, double
backward included, as torch's FlopCounterMode counts them on the baseline).

Run: pytest bench/bench_gradient_penalty.py --benchmark-only (see bench/conftest.py)
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, Optional

import pytest
import torch

import fastgan
import timing
from fastgan.models import build_models
from timing import DEVICE

BATCH, SIZE, LAMBDA = 64, 32, 10.0
KINDS = ("wgan-gp", "r1")
PLAIN = "plain autograd"
EAGER_VARIANTS = [PLAIN] + [f"fastgan [{b}]" for b in timing.kernel_backends(DEVICE, "gp_interpolate", "gp_penalty")]
GRAPHED = ", graphed"
# (kind, variant) entries: graphs only on a GPU, for the WGAN-GP step (the target's) and the kernel backends
ENTRIES = [(kind, name) for kind in KINDS for name in EAGER_VARIANTS] + (
    [("wgan-gp", name + GRAPHED) for name in EAGER_VARIANTS if name != "fastgan [reference]"] if DEVICE.type == "cuda" else [])


def plain_autograd_penalty(d, real, fake, kind, alpha: Optional[torch.Tensor] = None):
    if kind == "wgan-gp":
        if alpha is None:
            alpha = torch.rand(real.shape[0], device=real.device)
        point = (real + alpha.view(-1, 1, 1, 1) * (fake - real)).detach().requires_grad_(True)
    else:
        point = real.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(d(point).sum(), point, create_graph=True)
    sq = g.flatten(1).square().sum(1)
    if kind == "r1":
        return 0.5 * sq.mean()
    return (torch.sqrt(1e-4 + sq) - 1).square().mean()


def penalty_fn(name: str, d, real, fake, kind) -> Callable[..., torch.Tensor]:
    """penalty(alpha=None): the variant's penalty (α drawn when None)."""
    if name == PLAIN:
        return lambda alpha=None: plain_autograd_penalty(d, real, fake, kind, alpha)
    backend = name[len("fastgan ["):-1]

    def penalty(alpha=None):
        with fastgan.use_backend(backend):
            return fastgan.penalties.gradient_penalty(d, real, fake if kind == "wgan-gp" else None, kind, alpha=alpha)

    return penalty


def d_step(d, real, fake, penalty: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def step(alpha=None):
        d.zero_grad(set_to_none=True)
        value = penalty(alpha)
        loss = d(fake).mean() - d(real).mean() + LAMBDA * value
        loss.backward()
        return value.detach()

    return step


def discriminator_and_batches():
    """(D, real, fake, α): the seeded SNDCGAN D and batches every entry (and profile_host.py) uses."""
    torch.manual_seed(0)
    d = build_models("sndcgan", SIZE, d_norm="none")[1].to(DEVICE)
    real = torch.rand(BATCH, 3, SIZE, SIZE, device=DEVICE)
    fake = torch.rand(BATCH, 3, SIZE, SIZE, device=DEVICE)
    alpha = torch.rand(BATCH, device=DEVICE)
    return d, real, fake, alpha


@pytest.fixture(scope="module")
def setup():
    d, real, fake, alpha = discriminator_and_batches()
    flops = {kind: timing.count_flops(lambda: d_step(d, real, fake, penalty_fn(PLAIN, d, real, fake, kind))(alpha))
             for kind in KINDS}
    return d, real, fake, alpha, flops


def same_math_check(name: str, kind: str, setup) -> None:
    """The variant's penalty and D gradients equal plain autograd's for the same α, in float64:
    in float32 the convolutions' own round-off hides small differences (on an H200 cuDNN's
    algorithms put the two 6e-4 apart in full float32, 3e-3 with its default TF32)."""
    d, real, fake, alpha, _ = setup
    d, real, fake, alpha = copy.deepcopy(d).double(), real[:8].double(), fake[:8].double(), alpha[:8].double()
    results: Dict[str, tuple] = {}
    for which in (PLAIN, name):
        value = d_step(d, real, fake, penalty_fn(which, d, real, fake, kind))(alpha if kind == "wgan-gp" else None)
        results[which] = (value, [p.grad.clone() for p in d.parameters()])
    (ours, our_grads), (theirs, their_grads) = results[name], results[PLAIN]
    assert torch.allclose(ours, theirs, rtol=1e-9, atol=1e-12), f"{name} {kind}: penalty {float(ours)} vs plain {float(theirs)}"
    for a, b in zip(our_grads, their_grads):
        error = float((a - b).norm() / b.norm().clamp_min(1e-30))
        assert error < 1e-9, f"{name} {kind}: D gradient differs from plain autograd's by {error:.1e} (relative)"


def entry_step(name: str, kind: str, setup) -> Callable[[], torch.Tensor]:
    """The D step entry ``name`` times, after its same-math check (graphed: warmed up and captured)."""
    d, real, fake, _, _ = setup
    penalty_variant = name.removesuffix(GRAPHED)
    if penalty_variant != PLAIN:
        same_math_check(penalty_variant, kind, setup)
    step = d_step(d, real, fake, penalty_fn(penalty_variant, d, real, fake, kind))
    return timing.graphed(step, name) if name.endswith(GRAPHED) else step


@pytest.mark.parametrize("kind, name", ENTRIES)
def test_d_step(benchmark, setup, kind, name):
    step, flops = entry_step(name, kind, setup), setup[-1]
    timing.measure(benchmark, step, name, baseline=name == PLAIN, group=f"gradient_penalty: {kind} D step",
                   flops=flops[kind], seconds=timing.budget(3.0, 0.3))


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "--benchmark-only"]))
