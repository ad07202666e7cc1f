"""Benchmark: training iterations/s of fastgan's trainer against the same GAN written in plain PyTorch.

One iteration is ``n_disc`` discriminator updates and one generator update, with the
trainer's math on both sides. Two cases (32x32, Adam with the config's defaults, lr
2e-4, betas (0.5, 0.999), on both sides), one group each:

1. ``sndcgan ns+sn``: SNDCGAN, non-saturating loss, spectral norm on every layer of D, n_disc 1;
2. ``resnet_cifar wgan-gp``: ResNet CIFAR, WGAN loss + WGAN-GP with lambda 10, n_disc 5,
   no normalization in D (compare_gan's WGAN-GP setting).

Entries of each group:

* ``plain PyTorch`` (the baseline): what users write today -- the same G and D built
  with ``d_norm="none"``, torch's ``parametrizations.spectral_norm`` on every Conv /
  ConvTranspose / Linear of D in case 1, and a hand-written step with the same math
  (D on ``cat(real, fake)`` once; softplus / mean-difference losses; WGAN-GP at
  x̂ = real + α(fake − real), α ~ U[0, 1) per sample, penalty
  mean((sqrt(1e-4 + ‖∂D/∂x̂‖²) − 1)²) through ``autograd.grad(create_graph=True)``);
* ``fastgan eager``: the trainer's step (fused spectral norm and gradient penalty) on
  the device's default backends;
* ``fastgan cuda graphs``: the same with ``cuda_graphs: true`` (D and G updates
  captured and replayed); skipped, with the trainer's reason, wherever it runs them
  eagerly (on the CPU, for instance);
* ``plain PyTorch, graphed by GraphedStep`` (GPU only, informative): the baseline's whole
  iteration (its n_disc D updates and its G update, capturable Adam) replayed from one CUDA
  graph by :class:`fastgan.graphs.GraphedStep` -- what a plain training loop gains from
  fastgan's graphs alone, beside what the trainer's graphs and kernels give together;
* ``fastgan graphs + ...`` (GPU only, informative: none is a default, so no target reads
  them; timed after the entries above, so a run short of time drops these first): the
  graphs with fastgan's speed options, one entry each and all together -- the numerics
  ``fastgan train`` uses by default (full float32: ``tf32: false``), ``cudnn_benchmark``,
  ``channels_last`` (NHWC models and batch) and ``amp`` (bfloat16 autocast). Their
  same-math check runs both sides with the entry's numerics, layout and autocast (the plain
  GAN then runs NHWC, or under the same bfloat16 autocast), and allows bfloat16's round-off
  (1e-2) with ``amp``.

Both sides start from the same weights (the trainer's G and D state, spectral norm's u
and v included, are copied into the plain models) and use the same pre-made real batch
on the device (the trainer's ``RepeatedBatch`` stream), so data loading is out of the
figure. Before timing, one D step of each from that common state with the same z, real
batch and α must give the same losses (|Δ| ≤ 1e-4 relative). Rate: TFLOP/s of one
iteration's convolutions and matmuls. Both sides run with torch's default numerics (on a
GPU: TF32 convolutions, float32 matmuls), as a plain script would; ``fastgan train``
turns TF32 off unless ``tf32: true``, so its own rates on a GPU are lower than these.

Batch 64 (the issue's setting) on a GPU. Full-size models on a 2-core CPU are slow
(about 1.5 s per SNDCGAN iteration at batch 64, 7 s per ResNet WGAN-GP iteration at
batch 16), so on the CPU the ResNet case runs at batch 16 (quick mode: 16 and 4).
Issue targets on an H100: graphs ≥ 3× plain, eager ≥ 1.5×; CPU: never slower.

Run: pytest bench/bench_training.py --benchmark-only (see bench/conftest.py)
"""
from __future__ import annotations

import tempfile
from typing import Dict, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import timing
from fastgan.models import build_models
from fastgan.train.config import Config
from fastgan.train.runtime import Runtime
from fastgan.train.step import CapturedStep, why_not_capturable
from fastgan.train.stream import RepeatedBatch
from fastgan.train.trainer import Trainer, draw_latents
from timing import DEVICE

SIZE = 32
CASES = {
    "sndcgan ns+sn": dict(architecture="sndcgan", loss="ns", penalty="none", d_norm="spectral", n_disc=1),
    "resnet_cifar wgan-gp": dict(architecture="resnet_cifar", loss="wgan", penalty="wgan-gp", penalty_weight=10.0,
                                 d_norm="none", n_disc=5),
}
BATCH = {
    "cuda": {name: 64 for name in CASES},
    "cpu": {"sndcgan ns+sn": timing.budget(64, 16), "resnet_cifar wgan-gp": timing.budget(16, 4)},
}[DEVICE.type]
PLAIN, EAGER, GRAPHS = "plain PyTorch", "fastgan eager", "fastgan cuda graphs"
PLAIN_GRAPHED = "plain PyTorch, graphed by GraphedStep"
VARIANTS = [PLAIN, EAGER, GRAPHS] + ([PLAIN_GRAPHED] if DEVICE.type == "cuda" else [])
# Informative, GPU only: the graphs with the speed options (config keys and Runtime.numerics
# switches). Named so that no target's prefix ("fastgan cuda graphs", "fastgan eager") matches.
# TF32 convolutions, as torch's default (and the entries above) has them; Runtime.numerics switches
# TF32 matmuls on with them (one linear layer in G and one in D).
TORCH_NUMERICS = dict(tf32=True)
AUTOTUNED = dict(TORCH_NUMERICS, cudnn_benchmark=True)
ALL_OPTIONS = "fastgan graphs + amp + channels_last + cudnn_benchmark"
OPTIONS = {
    "fastgan graphs, tf32 off (fastgan train's default)": (dict(), dict(tf32=False)),
    "fastgan graphs + cudnn_benchmark": (dict(), AUTOTUNED),
    "fastgan graphs + channels_last": (dict(channels_last=True), TORCH_NUMERICS),
    "fastgan graphs + amp": (dict(amp=True), TORCH_NUMERICS),
    ALL_OPTIONS: (dict(amp=True, channels_last=True), AUTOTUNED),
}
SAME_MATH = 1e-4  # relative |fastgan − plain| of one D step's losses, in float32
SAME_MATH_BF16 = 1e-2  # the same under bfloat16 autocast on both sides


def make_config(case: Dict[str, object], batch: int, out_dir: str, **options) -> Config:
    return Config(image_size=SIZE, batch_size=batch, dataset="digits", download=False, device=str(DEVICE), out_dir=out_dir,
                  fid_every=0, sample_every=0, checkpoint_every=0, log_every=0, progress=False, **case, **options).validate()


class PlainGAN:
    """The plain-PyTorch version of the trainer's step for ``config``, from the trainer's current weights."""

    def __init__(self, config: Config, trainer: Trainer, real: Tensor, capturable: bool = False) -> None:
        self.config, self.real = config, real
        self.G, self.D = build_models(config.architecture, config.image_size, config.z_dim, "none", config.width)
        if config.d_norm == "spectral":
            for module in self.D.modules():
                if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                    nn.utils.parametrizations.spectral_norm(module)
        elif config.d_norm != "none":
            raise ValueError(f"d_norm={config.d_norm} is not benchmarked")
        # Same parameter and buffer names as fastgan's spectral norm (a drop-in for torch's parametrization).
        self.G.load_state_dict(trainer.G.state_dict())
        self.D.load_state_dict(trainer.D.state_dict())
        layout = torch.channels_last if config.channels_last else torch.contiguous_format
        self.G.to(DEVICE, memory_format=layout)
        self.D.to(DEVICE, memory_format=layout)
        self.g_optimizer = torch.optim.Adam(self.G.parameters(), lr=config.g_lr, betas=config.g_betas, capturable=capturable)
        self.d_optimizer = torch.optim.Adam(self.D.parameters(), lr=config.discriminator_lr, betas=config.discriminator_betas,
                                            capturable=capturable)

    def z(self) -> Tensor:
        return torch.randn(self.config.batch_size, self.config.z_dim, device=DEVICE)

    def autocast(self):
        """bfloat16 autocast of G and D with ``amp`` (logits, losses and the penalty's norm stay float32)."""
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=self.config.amp)

    def discriminator_step(self, z: Optional[Tensor] = None, alpha: Optional[Tensor] = None) -> Dict[str, Tensor]:
        real, config = self.real, self.config
        with torch.no_grad(), self.autocast():
            fake = self.G(self.z() if z is None else z).float()
        with self.autocast():
            real_logits, fake_logits = self.D(torch.cat([real, fake])).float().chunk(2)
        if config.loss == "ns":
            loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
        else:
            loss = fake_logits.mean() - real_logits.mean()
        out = {"d_loss": loss.detach()}
        total = loss
        if config.penalty == "wgan-gp":
            if alpha is None:
                alpha = torch.rand(real.shape[0], device=DEVICE)
            point = (real + alpha.view(-1, 1, 1, 1) * (fake - real)).requires_grad_(True)
            with self.autocast():
                scores = self.D(point).float()
            (grad,) = torch.autograd.grad(scores.sum(), point, create_graph=True)
            penalty = (torch.sqrt(1e-4 + grad.flatten(1).square().sum(1)) - 1).square().mean()
            total = loss + config.penalty_weight * penalty
            out["penalty"] = penalty.detach()
        self.d_optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.d_optimizer.step()
        return out

    def generator_step(self) -> Dict[str, Tensor]:
        self.D.requires_grad_(False)
        with self.autocast():
            logits = self.D(self.G(self.z())).float()
        loss = F.softplus(-logits).mean() if self.config.loss == "ns" else -logits.mean()
        self.g_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.D.requires_grad_(True)
        self.g_optimizer.step()
        return {"g_loss": loss.detach()}

    def train_step(self) -> Dict[str, Tensor]:
        for _ in range(self.config.n_disc):
            out = self.discriminator_step()
        out.update(self.generator_step())
        return out


def fastgan_trainer(config: Config, real: Tensor) -> Trainer:
    """The trainer for ``config``, fed the pre-made ``real`` batch at every D step."""
    return Trainer(config, stream=RepeatedBatch(real))


def same_math_check(trainer: Trainer, plain: PlainGAN) -> Dict[str, float]:
    """|fastgan − plain| / |plain| of one D step's loss (and penalty) from the common state,
    with the trainer's own next z and α handed to the plain step."""
    peek = torch.Generator().manual_seed(0)
    peek.set_state(trainer.random.get_state())
    z = draw_latents(trainer.config.batch_size, trainer.config, peek).to(DEVICE)
    alpha = torch.rand(trainer.config.batch_size, generator=peek).to(DEVICE)
    ours, theirs = trainer.discriminator_step(), plain.discriminator_step(z, alpha)
    return {key: abs(float(ours[key]) - float(theirs[key])) / max(abs(float(theirs[key])), 1e-6) for key in theirs}


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as path:
        yield path


def build_case(name: str, workdir: str) -> Tuple[Trainer, PlainGAN, Tensor]:
    """(fastgan eager trainer, plain GAN from its weights, real batch) of case ``name`` at its BATCH."""
    batch = BATCH[name]
    config = make_config(CASES[name], batch, f"{workdir}/{name.replace(' ', '_')}")
    real = torch.rand(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    trainer = fastgan_trainer(config, real)
    return trainer, PlainGAN(config, trainer, real), real


@pytest.fixture(scope="module")
def runs(workdir):
    """Per case: (plain GAN, fastgan eager trainer, real batch, FLOPs of one iteration, same-math differences)."""
    built = {}
    for name in CASES:
        trainer, plain, real = build_case(name, workdir)
        diffs = same_math_check(trainer, plain)
        flops = timing.count_flops(plain.train_step)
        built[name] = (plain, trainer, real, flops, diffs)
    return built


def describe(diffs: Dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())


def graphed_step(case: str, workdir: str, real: Tensor, name: str, **options):
    """The captured train step of ``case`` with config ``options``, after its same-math check
    against a plain GAN from the same weights: (step, check text). Skips where the trainer
    would run eagerly (it says why)."""
    config = make_config(CASES[case], BATCH[case], f"{workdir}/{case}_{name}".replace(" ", "_"), cuda_graphs=True, **options)
    if config.channels_last:
        real = real.contiguous(memory_format=torch.channels_last)
    graphed = fastgan_trainer(config, real)
    if not isinstance(graphed.updates, CapturedStep):
        pytest.skip(f"the trainer runs eagerly here: {why_not_capturable(config, graphed.runtime, graphed.G, graphed.D)}")
    diffs = same_math_check(graphed, PlainGAN(config, graphed, real))
    tolerance = SAME_MATH_BF16 if config.amp else SAME_MATH
    assert all(v <= tolerance for v in diffs.values()), f"{case}: fastgan ({name}) and plain PyTorch differ ({describe(diffs)})"
    for _ in range(2):  # D's capture (the check above was its warm-up) and G's warm-up, then G's capture
        graphed.train_step()
    assert graphed.updates.captured, f"{case} ({name}): a capture failed, the updates run eagerly (see its warning)"
    return graphed.train_step, describe(diffs)


def plain_graphed_step(trainer: Trainer, real: Tensor):
    """The plain GAN's whole iteration as one GraphedStep, from the trainer's weights, warmed up and
    captured (capturable Adam where the device has it: torch's runs on GPUs only)."""
    capturable = DEVICE.type == "cuda"
    plain = PlainGAN(trainer.config, trainer, real, capturable=capturable)
    return timing.graphed(plain.train_step, PLAIN_GRAPHED,
                          optimizers=[plain.d_optimizer, plain.g_optimizer] if capturable else ())


def time_iteration(benchmark, case: str, variant: str, step, flops: float, check: str) -> None:
    batch, n_disc = BATCH[case], CASES[case]["n_disc"]
    timing.measure(benchmark, step, variant, baseline=variant == PLAIN,
                   group=f"training: {case}, batch {batch}, n_disc {n_disc}", flops=flops,
                   detail=f"same-math check (relative |fastgan − plain| of one D step): {check}",
                   seconds=timing.budget(5.0, 1.0), min_rounds=timing.budget(5, 3), warmup=timing.budget(3, 2))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", list(CASES))
def test_training_iteration(benchmark, runs, workdir, case, variant):
    plain, trainer, real, flops, diffs = runs[case]
    check = describe(diffs)
    assert all(v <= SAME_MATH for v in diffs.values()), f"{case}: fastgan and plain PyTorch differ after one D step ({check})"
    if variant == PLAIN:
        step = plain.train_step
    elif variant == EAGER:
        step = trainer.train_step
    elif variant == PLAIN_GRAPHED:
        step, check = plain_graphed_step(trainer, real), "the baseline itself, captured"
    else:
        step, check = graphed_step(case, workdir, real, "graphs")
    time_iteration(benchmark, case, variant, step, flops, check)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the speed options act on GPUs (CUDA graphs, cuDNN, TF32, bfloat16)")
@pytest.mark.parametrize("variant", list(OPTIONS))
@pytest.mark.parametrize("case", sorted(CASES, key=lambda name: name != "resnet_cifar wgan-gp"))  # the convolution-bound case first
def test_training_option(benchmark, runs, workdir, case, variant):
    _, _, real, flops, _ = runs[case]
    options, numerics = OPTIONS[variant]
    with Runtime().numerics(deterministic=False, **numerics):
        step, check = graphed_step(case, workdir, real, variant, **options)
        time_iteration(benchmark, case, variant, step, flops, check)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "--benchmark-only"]))
