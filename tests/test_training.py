"""Reference training: losses, config, every loss × penalty, checkpoints (atomic,
bit-identical resume, kill-safe), outputs, DDP equivalence, FID during training.

Runs use SNDCGAN at 16×16 with a quarter of the channels on the embedded digits,
so each step takes milliseconds on a CPU.
"""
import copy
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from conftest import exit_worker, needs_fid_helper
from fastgan.nn import CrossProcessBatchNorm, convert_batch_norm
from fastgan.train import checkpoint
from fastgan.train.config import LOSSES, PENALTIES, Config, load_config, parse_overrides
from fastgan.train.losses import discriminator_loss, generator_loss, l2_penalty
from fastgan.train.outputs import MetricsLog, plot_curves, save_image_grid
from fastgan.train.callbacks import Callback
from fastgan.train.step import GANStep
from fastgan.train.trainer import (BEST, CHECKPOINT, EXIT_DIVERGED, EXIT_INTERRUPTED, SUMMARY, Trainer, draw_latents,
                                   models_for)
from training_support import TINY_TRAINING, metrics_records, train_in_two_processes

REPO = Path(__file__).resolve().parents[1]
TINY = TINY_TRAINING + ["deterministic=true"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is faster, and on a loaded 2-core machine ~30× faster
    (spinning OpenMP workers otherwise fight other processes for the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(tmp_path, *overrides) -> Config:
    return load_config(None, TINY + [f"out_dir={tmp_path / 'run'}", *overrides])


# ------------------------------------------------------------------ losses


def test_losses_match_the_formulas_in_float64():
    real, fake = torch.randn(7, dtype=torch.float64) * 3, torch.randn(7, dtype=torch.float64) * 3
    sig = torch.sigmoid
    expected_d = {
        "ns": (-torch.log(sig(real))).mean() + (-torch.log(1 - sig(fake))).mean(),
        "wgan": -real.mean() + fake.mean(),
        "lsgan": 0.5 * (((sig(real) - 1) ** 2).mean() + (sig(fake) ** 2).mean()),  # compare_gan halves both
        "hinge": torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean(),
    }
    expected_g = {"ns": (-torch.log(sig(fake))).mean(), "wgan": -fake.mean(), "lsgan": 0.5 * ((sig(fake) - 1) ** 2).mean(),
                  "hinge": -fake.mean()}
    for kind in LOSSES:
        torch.testing.assert_close(discriminator_loss(kind, real, fake), expected_d[kind], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(generator_loss(kind, fake), expected_g[kind], rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown loss"):
        discriminator_loss("kl", real, fake)


def test_l2_penalty_is_the_mean_over_kernels_of_half_their_squared_norm():
    """compare_gan: mean over D's kernels (conv and linear weights, not biases or norm scales)
    of tf.nn.l2_loss(W) = ½ΣW²; here with layer norm in D, whose scales must not count."""
    from fastgan.models import build_models

    _, discriminator = build_models("sndcgan", 16, 8, "layer", 0.25)
    discriminator = discriminator.double()
    kernels = [m.weight for m in discriminator.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert len(kernels) == 8  # 7 convs and the final linear layer, as compare_gan's layer count for SNDCGAN
    expected = sum(0.5 * float((w.detach().numpy() ** 2).sum()) for w in kernels) / len(kernels)
    assert float(l2_penalty(discriminator).detach()) == pytest.approx(expected, rel=1e-12)


# ------------------------------------------------------------------ config


def test_config_yaml_overrides_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss: hinge\ng_lr: 1\ng_betas: [0.5, 0.9]\nsteps: 10\n")
    config = load_config(str(path), ["steps=20", "d_lr=3e-4", "penalty=wgan-gp"])
    assert (config.loss, config.steps, config.penalty) == ("hinge", 20, "wgan-gp")
    assert config.g_lr == 1.0 and isinstance(config.g_lr, float)
    assert config.g_betas == (0.5, 0.9) and config.discriminator_betas == (0.5, 0.9)
    assert config.discriminator_lr == 3e-4
    assert parse_overrides(["d_betas=[0.0, 0.9]"]) == {"d_betas": [0.0, 0.9]}


@pytest.mark.parametrize("overrides, message", [
    (["lr=1"], "unknown config key"),
    (["loss=kl"], "loss='kl' is not one of"),
    (["penalty=gp"], "penalty='gp' is not one of"),
    (["steps=many"], "steps must be int"),
    (["steps=0"], "steps must be >= 1"),
    (["g_betas=[0.5]"], "g_betas must be a list of 2"),
    (["g_betas=[0.5, 1.5]"], "g_betas must be two numbers in"),
    (["dataset=folder"], "needs data_root"),
    (["steps"], "an override is key=value"),
    (["n_disc=5", "steps=12"], "steps=12 must be a multiple of n_disc=5"),
    (["z_distribution=normal"], "z_distribution is now z_prior"),
    (["z_prior=gaussian"], "z_prior='gaussian' is not one of"),
    (["dtype=float16"], "dtype='float16' is not one of"),
    (["g_lr=.inf"], "g_lr must be a finite number > 0"),
    (["d_lr=inf"], "d_lr must be a finite number > 0"),  # YAML reads inf as a string, which float() accepts
    (["lens_steps=10", "lens_lr=.inf"], "lens_lr must be a finite number > 0"),
    (["penalty_weight=.nan"], "penalty_weight must be a finite number >= 0"),
    (["penalty_weight=.inf"], "penalty_weight must be a finite number >= 0"),
    (["width=.inf"], "width must be a finite number > 0"),
    (["seed=-1"], r"seed must be in \[0, "),
    ([f"seed={2**64}"], r"seed must be in \[0, "),
    (["amp=true", "dtype=float64"], "amp .* needs dtype=float32"),
    # shapes are checked with the config, before any data is read or decoded
    (["architecture=resnet19", "image_size=32"], "resnet19 needs image_size a positive multiple of 64"),
    (["image_size=20"], "sndcgan needs image_size a positive multiple of 8"),
    # an FID of one image has no covariance: refused at load, not at the first evaluation after hours of training
    (["fid_samples=1"], "fid_samples must be >= 2"),
    (["fid_real_samples=1"], "fid_real_samples must be >= 2"),
    # a misspelled device names the key and the choices (not torch's list of every backend)
    (["device=gpu"], "device='gpu' is not a device: use auto, cpu, cuda or cuda:N"),
    (["device=cuda:x"], "device='cuda:x' is not a device"),
    # SNDCGAN's G (and the VAE built from its blocks) batch-normalizes a feature vector per image
    (["batch_size=1"], "batch_size=1 is too small for sndcgan"),
    (["model=vae", "batch_size=1"], "batch_size=1 is too small for sndcgan"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_what_the_load_time_checks_leave_alone():
    """The FID sizes matter only when FID is computed; other architectures train at batch 1; a
    device torch knows is left to the runtime (which says when no GPU is visible)."""
    assert load_config(None, ["fid_every=0", "fid_samples=1", "fid_real_samples=1"]).fid_samples == 1
    assert load_config(None, ["architecture=resnet_cifar", "batch_size=1"]).batch_size == 1
    assert load_config(None, ["device=cuda:1"]).device == "cuda:1"


def test_config_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="a config is a mapping"):
        load_config(str(tmp_path / "list.yaml"))


def test_yaml_syntax_errors_name_the_file_or_override_and_the_line(tmp_path, capsys):
    from fastgan.__main__ import main

    path = tmp_path / "bad.yaml"
    path.write_text("loss: hinge\ng_betas: [0.5, 0.9\nsteps: 10\n")
    with pytest.raises(ValueError, match=rf"{path} is not valid YAML: line 3, column 6: expected ',' or ']'"):
        load_config(str(path))
    with pytest.raises(ValueError, match=r"override 'g_betas=\[0.5, 0.9': the value is not valid YAML \(line 1, column 10"):
        load_config(None, ["g_betas=[0.5, 0.9"])
    assert main(["train", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path} is not valid YAML: line 3") and err.count("\n") == 1


def test_shipped_configs_and_grids_load():
    from fastgan.train.study import read_study

    configs = sorted((REPO / "configs").glob("*.yaml"))
    grids = sorted((REPO / "configs" / "study").glob("*.yaml"))
    assert len(configs) >= 4 and grids
    for path in configs:
        if load_config(str(path)).model == "vae":  # its latent prior is the learned marginal (vae_marginal)
            continue
        assert "z_prior" in path.read_text(), f"{path.name} must state its latent prior"
        assert load_config(str(path)).z_prior == "uniform"  # compare_gan's U[-1, 1]
    for path in grids:
        assert len(read_study(str(path)).trials) >= 2


def test_configs_reproduce_the_papers_budgets_in_discriminator_updates():
    """steps counts D updates (the paper-era compare_gan's training_steps). compare_gan's gin configs
    count G updates instead (GPUModularGAN advances the estimator's global step on G updates only),
    so their 40k steps at n_disc 5 are 200k D updates: the paper-era runs of ResNet CIFAR at n_disc 5
    have training_steps 200000 too."""
    budgets = {"resnet19_lsun_bedroom128": (200_000, 5), "resnet_cifar10": (200_000, 5),
               "sndcgan_cifar10": (200_000, 1), "sndcgan_celebahq128": (100_000, 1)}
    for name, (steps, n_disc) in budgets.items():
        config = load_config(str(REPO / "configs" / f"{name}.yaml"))
        assert (config.steps, config.n_disc) == (steps, n_disc), name


def test_the_data_set_is_not_read_before_the_config_is_valid(tmp_path, monkeypatch):
    """A wrong image_size for the architecture fails before a folder is decoded."""
    import fastgan.train.data as data

    def must_not_decode(*args, **kwargs):
        raise AssertionError("the data set was read before the config was validated")

    monkeypatch.setattr(data, "load_dataset", must_not_decode)
    config = Config(architecture="resnet19", image_size=64, dataset="folder", data_root=str(tmp_path))
    config.image_size = 96  # e.g. a config edited in code after loading
    with pytest.raises(ValueError, match="multiple of 64"):
        Trainer(config)


# ------------------------------------------------------------------ every loss × penalty


@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_and_penalty_trains(tmp_path, loss, penalty):
    trainer = Trainer(tiny_config(tmp_path, f"loss={loss}", f"penalty={penalty}", "penalty_weight=1", "d_lr=5e-4",
                                  "d_norm=layer" if penalty == "l2" else "d_norm=spectral"))
    for _ in range(2):
        out = trainer.train_step()
        assert all(torch.isfinite(v) for v in out.values()), out
        assert ("penalty" in out) == (penalty != "none")
    # Same real batch, z, α and seed at every D update: D's loss is then a function of D alone.
    config = trainer.config
    step = GANStep(*models_for(config), config)
    real, z = trainer.stream.next(), draw_latents(config.batch_size, config, torch.Generator().manual_seed(1))
    alpha = torch.rand(config.batch_size) if penalty == "wgan-gp" else None
    losses = [float(step.discriminator_update(real, z, alpha, seed=5)["d_loss"]) for _ in range(10)]
    assert all(map(lambda v: v == v and abs(v) < 1e6, losses))
    assert sum(losses[-3:]) / 3 < losses[0], losses


class PlainGAN:
    """The trainer's math written plainly in float64 PyTorch: torch's own spectral norm,
    autograd gradient penalties, compare_gan's formulas, torch.optim.Adam."""

    def __init__(self, config: Config, G: torch.nn.Module, D: torch.nn.Module) -> None:
        from fastgan.models import build_models

        self.config = config
        self.G, self.D = (m.double() for m in build_models(config.architecture, config.image_size, config.z_dim,
                                                              "none" if config.d_norm == "spectral" else config.d_norm,
                                                              config.width))
        self.G.load_state_dict(G.state_dict())
        theirs = dict(D.named_modules())
        for name, module in self.D.named_modules():
            if config.d_norm == "spectral" and isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                sn = theirs[name].parametrizations.weight
                torch.nn.utils.parametrizations.spectral_norm(module)  # iterates u first, as fastgan's
                with torch.no_grad():
                    module.parametrizations.weight.original.copy_(sn.original)
                    module.parametrizations.weight[0]._u.copy_(sn[0]._u)
                    module.parametrizations.weight[0]._v.copy_(sn[0]._v)
            elif not list(module.children()):
                module.load_state_dict(theirs[name].state_dict())
        self.g_opt = torch.optim.Adam(self.G.parameters(), lr=config.g_lr, betas=config.g_betas)
        self.d_opt = torch.optim.Adam(self.D.parameters(), lr=config.discriminator_lr, betas=config.discriminator_betas)

    def losses(self, real_logits, fake_logits):
        kind, sig = self.config.loss, torch.sigmoid
        if kind == "ns":
            return -torch.log(sig(real_logits)).mean() - torch.log(1 - sig(fake_logits)).mean()
        if kind == "wgan":
            return fake_logits.mean() - real_logits.mean()
        if kind == "lsgan":
            return 0.5 * ((sig(real_logits) - 1) ** 2).mean() + 0.5 * (sig(fake_logits) ** 2).mean()
        return torch.clamp(1 - real_logits, min=0).mean() + torch.clamp(1 + fake_logits, min=0).mean()

    def penalty(self, real, fake, alpha, seed):
        from fastgan.reference.gradient_penalty import philox_uniform

        kind = self.config.penalty
        if kind == "l2":
            kernels = [m.parametrizations.weight.original if hasattr(m, "parametrizations") else m.weight
                       for m in self.D.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
            return sum(0.5 * (w ** 2).sum() for w in kernels) / len(kernels)
        if kind == "wgan-gp":
            point = real + alpha.view(-1, 1, 1, 1) * (fake - real)
        elif kind == "dragan":
            noise = philox_uniform(seed, real.numel()).reshape(real.shape).double()
            point = torch.clamp(real + real.std(correction=0) * (noise - 0.5), 0, 1)  # the batch's population std
        else:  # R1 at the real images, R2 at the fake ones
            point = real if kind == "r1" else fake
        point = point.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self.D(point).sum(), point, create_graph=True)
        squares = (grad ** 2).sum(dim=(1, 2, 3))
        if kind in ("r1", "r2"):
            return 0.5 * squares.mean()
        return ((torch.sqrt(1e-4 + squares) - 1) ** 2).mean()

    def discriminator_step(self, real, z, alpha, seed):
        with torch.no_grad():
            fake = self.G(z)
        logits = self.D(torch.cat([real, fake]))
        loss = self.losses(logits[: len(real)], logits[len(real):])
        if self.config.penalty != "none":
            loss = loss + self.config.penalty_weight * self.penalty(real, fake, alpha, seed)
        self.d_opt.zero_grad()
        loss.backward()
        self.d_opt.step()

    def generator_step(self, z):
        logits = self.D(self.G(z))
        loss = {"ns": lambda: -torch.log(torch.sigmoid(logits)).mean(), "lsgan": lambda: 0.5 * ((torch.sigmoid(logits) - 1) ** 2).mean()}
        loss = loss.get(self.config.loss, lambda: -logits.mean())()
        self.g_opt.zero_grad()
        loss.backward()
        self.g_opt.step()


@pytest.mark.parametrize("penalty", PENALTIES)
@pytest.mark.parametrize("loss", LOSSES)
def test_float64_training_equals_a_plain_pytorch_loop(tmp_path, loss, penalty):
    """10 iterations (D then G update) of fastgan's float64 step against the same GAN written
    plainly, from the same state and inputs: the same parameters to 1e-10 relative, for every
    loss × penalty (so no float32 cast remains in the step, and the losses and penalties are
    compare_gan's). Relative to each model's largest parameter: biases before batch norm have
    pure round-off gradients, so their own values (~1e-15) carry no relative precision."""
    config = tiny_config(tmp_path, "dtype=float64", f"loss={loss}", f"penalty={penalty}", "penalty_weight=1",
                         "image_size=8", "width=0.125", "batch_size=4", "d_norm=layer" if penalty == "l2" else "d_norm=spectral")
    G, D = models_for(config)
    step, plain = GANStep(G, D, config), PlainGAN(config, G, D)
    draws = torch.Generator().manual_seed(3)
    for _ in range(10):
        real = torch.rand(4, 3, 8, 8, generator=draws, dtype=torch.float64)
        z = draw_latents(4, config, draws)
        alpha = torch.rand(4, generator=draws, dtype=torch.float64) if penalty == "wgan-gp" else None
        seed = int(torch.randint(0, 2**62, (), generator=draws))
        out = step.discriminator_update(real, z, alpha, seed)
        plain.discriminator_step(real, z, alpha, seed)
        z = draw_latents(4, config, draws)
        out.update(step.generator_update(z))
        plain.generator_step(z)
        assert all(v.dtype == torch.float64 for v in out.values()), out
    for ours, theirs in ((G.state_dict(), plain.G.state_dict()), (D.state_dict(), plain.D.state_dict())):
        assert ours.keys() == theirs.keys()
        scale = max(float(v.abs().max()) for v in ours.values() if v.is_floating_point())
        for key, value in ours.items():
            assert value.dtype == torch.float64 or not value.is_floating_point(), key
            if value.is_floating_point():
                torch.testing.assert_close(value, theirs[key], rtol=0, atol=1e-10 * scale, msg=key)
            else:
                assert torch.equal(value, theirs[key]), key


def test_amp_steps_are_finite(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "amp=true", "penalty=wgan-gp", "deterministic=false"))
    for _ in range(2):
        assert all(torch.isfinite(v) for v in trainer.train_step().values())


def test_a_float64_run_keeps_float64_everywhere(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "dtype=float64", "penalty=wgan-gp", "steps=2"))
    assert trainer.stream.next().dtype == trainer.fixed_z.dtype == torch.float64
    assert all(v.dtype == torch.float64 for v in trainer.train_step().values())
    assert {p.dtype for m in (trainer.G, trainer.D) for p in m.parameters()} == {torch.float64}


def test_latent_priors_and_steps_count_discriminator_updates(tmp_path):
    trainer = Trainer(tiny_config(tmp_path, "n_disc=3", "steps=6"))
    trainer.train_step()
    assert trainer.stream.batches_drawn == 3 and trainer.step == 3  # one iteration: 3 D updates, 1 G update
    z = trainer.fixed_z
    assert z.abs().max() <= 1 and z.min() < -0.9 and z.max() > 0.9 and abs(float(z.mean())) < 0.1  # U[-1, 1)
    normal = Trainer(tiny_config(tmp_path, "z_prior=normal", "sample_grid=256", f"out_dir={tmp_path / 'n'}")).fixed_z
    assert normal.abs().max() > 1.5 and abs(float(normal.std()) - 1) < 0.1


# ------------------------------------------------------------------ checkpoints


def _final_state(out_dir: Path):
    state = checkpoint.load(out_dir / CHECKPOINT)
    return state["G"], state["D"], state["d_optimizer"]["state"], state["step"]


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_identical(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def test_resume_continues_bit_for_bit(tmp_path):
    common = ["steps=6", "penalty=wgan-gp", "checkpoint_every=2", "sample_every=3"]
    straight = tiny_config(tmp_path, *common, f"out_dir={tmp_path / 'straight'}")
    Trainer(straight).fit()
    first_part = tiny_config(tmp_path, *common, "steps=3", f"out_dir={tmp_path / 'resumed'}")
    assert Trainer(first_part).fit()["step"] == 3
    summary = Trainer(tiny_config(tmp_path, *common, f"out_dir={tmp_path / 'resumed'}"), resume=True).fit()
    assert summary["finished"] and summary["step"] == 6
    for a, b in zip(_final_state(tmp_path / "straight"), _final_state(tmp_path / "resumed")):
        _assert_identical({"x": a}, {"x": b})
    records = [json.loads(line) for line in open(tmp_path / "resumed" / "metrics.jsonl")]
    expected = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    assert [r["step"] for r in records] == list(range(1, 7))
    for r, e in zip(records, expected):
        rates = ("steps_per_s", "images_per_s")
        assert {k: v for k, v in r.items() if k not in rates} == {k: v for k, v in e.items() if k not in rates}


class SignalAt(Callback):
    """Sends SIGTERM to this process after the iteration that ends at ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def after(self, trainer, out) -> None:
        if trainer.step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_checkpoints_and_resume_matches(tmp_path):
    """A pre-empted run (SIGTERM mid-run) stops after the current step with a checkpoint;
    resuming reaches the same parameters as an uninterrupted run."""
    common = ["steps=5", "penalty=r1"]
    Trainer(tiny_config(tmp_path, *common, f"out_dir={tmp_path / 'straight'}")).fit()
    trainer = Trainer(tiny_config(tmp_path, *common, f"out_dir={tmp_path / 'killed'}"), callbacks=[SignalAt(2)])
    summary = trainer.fit()
    assert summary["step"] == 2 and not summary["finished"]
    assert not (tmp_path / "killed" / SUMMARY).exists()
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored
    Trainer(tiny_config(tmp_path, *common, f"out_dir={tmp_path / 'killed'}"), resume=True).fit()
    for a, b in zip(_final_state(tmp_path / "straight"), _final_state(tmp_path / "killed")):
        _assert_identical({"x": a}, {"x": b})


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    previous = {"format": checkpoint.FORMAT, "step": 1, "weights": torch.randn(5)}
    checkpoint.save_atomic(previous, path)

    def save_half_then_die(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the kill arrives mid-write

    monkeypatch.setattr(torch, "save", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"format": checkpoint.FORMAT, "step": 2}, path)
    monkeypatch.undo()
    loaded = checkpoint.load(path)
    assert loaded["step"] == 1 and torch.equal(loaded["weights"], previous["weights"])
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "none.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="not a fastgan checkpoint"):
        checkpoint.load(tmp_path / "cut.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fastgan checkpoint"):
        checkpoint.load(tmp_path / "other.pt")


def test_existing_run_needs_resume_and_same_setup(tmp_path):
    Trainer(tiny_config(tmp_path, "steps=1")).fit()
    with pytest.raises(ValueError, match="pass --resume"):
        Trainer(tiny_config(tmp_path, "steps=2"))
    with pytest.raises(ValueError, match="loss: 'ns' -> 'hinge'"):
        Trainer(tiny_config(tmp_path, "steps=2", "loss=hinge"), resume=True)
    assert Trainer(tiny_config(tmp_path, "steps=2"), resume=True).step == 1
    # other data is another training setup: refused like another loss
    with pytest.raises(ValueError, match="data_root: None -> "):
        Trainer(tiny_config(tmp_path, "steps=2", f"data_root={tmp_path}"), resume=True)


def test_extending_a_finished_run_unfinishes_it_and_fewer_steps_are_refused(tmp_path):
    """A finished run resumed with more steps is not finished while it trains: its
    summary.json goes at the start (a kill then leaves no 'finished' claim behind). Fewer
    steps than it has done are refused, not reported as 'step 4/2'."""
    Trainer(tiny_config(tmp_path, "steps=4")).fit()
    assert json.loads((tmp_path / "run" / SUMMARY).read_text())["finished"]
    with pytest.raises(ValueError, match=r"steps=2 is below the 4 steps .*checkpoint.pt has done"):
        Trainer(tiny_config(tmp_path, "steps=2"), resume=True)

    class Kill(Callback):
        def after(self, trainer, out):
            assert not (tmp_path / "run" / SUMMARY).exists()
            raise KeyboardInterrupt  # a kill after the first new iteration

    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(tmp_path, "steps=6"), resume=True, callbacks=[Kill()]).fit()
    assert not (tmp_path / "run" / SUMMARY).exists()
    assert Trainer(tiny_config(tmp_path, "steps=6"), resume=True).fit()["finished"]
    assert json.loads((tmp_path / "run" / SUMMARY).read_text())["step"] == 6


def test_the_progress_bar_ends_on_the_losses_of_its_last_step(tmp_path, capsys):
    trainer = Trainer(tiny_config(tmp_path, "steps=3", "progress=true"))
    trainer.fit()
    last = metrics_records(tmp_path / "run")[-1]
    assert last["step"] == 3 and f"d_loss={last['d_loss']:.3f}" in trainer.callbacks[0].bar.postfix  # not step 2's


def test_a_run_removes_what_killed_writes_left_in_its_folders(tmp_path):
    """Every file of a run is written atomically; a kill mid-write leaves a hidden .part file,
    which the next start removes -- the curves', samples', config's too, not only the checkpoint's."""
    Trainer(tiny_config(tmp_path, "steps=2", "sample_every=1")).fit()
    from fastgan import files

    # the run holds its folder's lock, so even a leftover named as another host's is stale there
    another_host = f"{os.getpid()}-{'0' * 8 if files._host_tag() != '0' * 8 else '1' * 8}"
    leftovers = [tmp_path / "run" / ".curves.png.0a1b2c3d.part", tmp_path / "run" / f".config.yaml.{another_host}.ffffffff.part",
                 tmp_path / "run" / "samples" / ".step-0000003.png.12345678.part"]
    for path in leftovers:
        path.write_bytes(b"half")
    Trainer(tiny_config(tmp_path, "steps=3", "sample_every=1"), resume=True).fit()
    assert not any(path.exists() for path in leftovers)
    assert not list((tmp_path / "run").rglob("*.part"))


def test_a_resume_may_change_the_sample_grid(tmp_path):
    from PIL import Image

    Trainer(tiny_config(tmp_path, "steps=1", "sample_grid=4")).fit()
    resumed = Trainer(tiny_config(tmp_path, "steps=2", "sample_grid=9", "sample_every=1"), resume=True)
    assert resumed.fixed_z.shape[0] == 9
    resumed.fit()
    with Image.open(tmp_path / "run" / "samples.png") as grid:
        assert grid.size == (2 + 3 * 18, 2 + 3 * 18)  # 9 images of 16 px, 3 columns, 2 px padding
    assert checkpoint.load(tmp_path / "run" / CHECKPOINT)["fixed_z"].shape[0] == 9


def test_bad_setups_raise_clearly(tmp_path):
    with pytest.raises(ValueError, match="fewer than batch_size"):
        Trainer(tiny_config(tmp_path, "batch_size=4096"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU is visible"):
            Trainer(tiny_config(tmp_path, "device=cuda"))
    with pytest.raises(FileNotFoundError, match="Inception weight file not found"):
        Trainer(tiny_config(tmp_path, "fid_every=1", f"inception_weights={tmp_path / 'none.pt'}"))


# ------------------------------------------------------------------ outputs


def test_outputs_of_a_run(tmp_path):
    summary = Trainer(tiny_config(tmp_path, "steps=4", "sample_every=2", "checkpoint_every=2", "sample_grid=10")).fit()
    run = Path(summary["out_dir"])
    for name in ("config.yaml", "metrics.jsonl", "samples.png", "samples/step-0000002.png", "samples/step-0000004.png",
                 "curves.png", CHECKPOINT, SUMMARY):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard").iterdir())
    from PIL import Image

    with Image.open(run / "samples.png") as grid:
        assert grid.size == (2 + 4 * 18, 2 + 3 * 18)  # 10 images of 16 px, 4 columns, 2 px padding
    assert load_config(str(run / "config.yaml")) == tiny_config(tmp_path, "steps=4", "sample_every=2",
                                                                 "checkpoint_every=2", "sample_grid=10")


def test_a_failed_config_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import errno

    from fastgan.train.config import save_config

    path = tmp_path / "config.yaml"
    save_config(tiny_config(tmp_path, "steps=1"), str(path))
    previous = path.read_text()

    def write_half_then_fail(self, text):
        Path.write_bytes(self, text[: len(text) // 2].encode())
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_half_then_fail)
    with pytest.raises(OSError):
        save_config(tiny_config(tmp_path, "steps=2"), str(path))
    monkeypatch.undo()
    assert path.read_text() == previous and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_metrics_log_drops_records_after_the_resumed_step(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 6):
        log.write(step, {"d_loss": float(step)})
    with open(log.path, "a") as f:
        f.write('{"step": 6, "d_lo')  # cut by a kill
    resumed = MetricsLog(tmp_path, resume_step=3, tensorboard=False)
    assert [r["step"] for r in resumed.records] == [1, 2, 3]
    plot_curves(resumed.records + [{"step": 3, "fid": 50.0}], tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_image_grid_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="expected images of shape"):
        save_image_grid(torch.rand(2, 1, 8, 8), tmp_path / "g.png")


# ------------------------------------------------------------------ FID during training


@needs_fid_helper
def test_fid_every_n_steps_tracks_the_best(tmp_path):
    """With the fid-helper Inception installed by `make test`: FID at steps 2 and 3, best.pt kept."""
    summary = Trainer(tiny_config(tmp_path, "steps=3", "fid_every=2", "fid_samples=12", "fid_real_samples=12")).fit()
    records = [json.loads(line) for line in open(Path(summary["out_dir"]) / "metrics.jsonl")]
    fids = {r["step"]: r["fid"] for r in records if "fid" in r}
    assert sorted(fids) == [2, 3] and all(v > 0 for v in fids.values())
    assert summary["final_fid"] == fids[3] and summary["best_fid"] == min(fids.values())
    assert checkpoint.load(Path(summary["out_dir"]) / BEST)["step"] == summary["best_step"]
    # a finished run, resumed, reports the same and evaluates nothing again
    config = tiny_config(tmp_path, "steps=3", "fid_every=2", "fid_samples=12", "fid_real_samples=12")
    assert Trainer(config, resume=True).fit() == summary


class SlowInception(torch.nn.Module):
    """A stand-in Inception network (random features of ``feature_dim`` = 8) whose ``signal_at``-th call sends
    SIGTERM to this process, as a cluster's pre-emption would during a long FID evaluation."""

    def __init__(self, signal_at: int) -> None:
        super().__init__()
        self.calls, self.signal_at, self.calls_after_signal = 0, signal_at, 0
        self.feature_dim = 8

    def forward(self, images):
        self.calls += 1
        if self.calls == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        elif self.calls > self.signal_at:
            self.calls_after_signal += 1
        return torch.randn(images.shape[0], self.feature_dim, generator=torch.Generator().manual_seed(int(images.sum() * 1e3)))


def stand_in_weights(path: Path, content: bytes = b"stand-in") -> str:
    """A file to name as inception_weights when InceptionV3.load is replaced (the run checks that it exists)."""
    path.write_bytes(content)
    return str(path)


def test_a_stop_signal_during_fid_checkpoints_at_once_and_resume_evaluates_it(tmp_path, monkeypatch):
    """SIGTERM during the FID at step 2 (the 2nd of 5 chunks of generated features): the run
    writes its checkpoint before any further chunk and stops, unfinished; --resume evaluates
    that FID first and ends as an uninterrupted run does."""
    from fastgan.metrics.inception import InceptionV3

    common = ["steps=2", "fid_every=2", "fid_samples=500", "fid_real_samples=100", "penalty=wgan-gp",
              "diagnostics_condition_number_every=2", "diagnostics_condition_number_samples=2",
              f"inception_weights={stand_in_weights(tmp_path / 'weights.pt')}"]
    network = SlowInception(signal_at=3)  # call 1: the 100 real images; calls 2-6: the 5 chunks of 100 samples
    monkeypatch.setattr(InceptionV3, "load", lambda *args, **kwargs: network)
    summary = Trainer(tiny_config(tmp_path, *common, f"out_dir={tmp_path / 'stopped'}")).fit()
    assert summary["step"] == 2 and not summary["finished"] and network.calls_after_signal == 0
    assert checkpoint.load(tmp_path / "stopped" / CHECKPOINT)["fid_pending"]
    # the step's callbacks after the FID still ran: its conditioning record is not lost to the stop
    assert [r["step"] for r in metrics_records(tmp_path / "stopped") if "log_condition_number_mean" in r] == [2]

    network.signal_at = -1  # no more signals
    resumed = Trainer(tiny_config(tmp_path, *common, f"out_dir={tmp_path / 'stopped'}"), resume=True).fit()
    straight = Trainer(tiny_config(tmp_path, *common, f"out_dir={tmp_path / 'straight'}")).fit()
    assert resumed["finished"] and {k: v for k, v in resumed.items() if k != "out_dir"} == \
        {k: v for k, v in straight.items() if k != "out_dir"}
    fids = [(r["step"], r["fid"]) for r in map(json.loads, open(tmp_path / "stopped" / "metrics.jsonl")) if "fid" in r]
    assert [step for step, _ in fids] == [2]
    assert (tmp_path / "stopped" / "curves.png").is_file()  # redrawn with the resumed FID
    for a, b in zip(_final_state(tmp_path / "straight"), _final_state(tmp_path / "stopped")):
        _assert_identical({"x": a}, {"x": b})
    # the resume checkpointed once the pending FID was done: resuming the finished run again evaluates
    # nothing and logs nothing twice
    assert not checkpoint.load(tmp_path / "stopped" / CHECKPOINT)["fid_pending"]
    calls = network.calls
    again = Trainer(tiny_config(tmp_path, *common, f"out_dir={tmp_path / 'stopped'}"), resume=True).fit()
    assert again == resumed and network.calls == calls
    assert [r["step"] for r in metrics_records(tmp_path / "stopped") if "fid" in r] == [2]


def test_the_real_statistics_cache_is_keyed_on_the_inception_weights_and_the_seed(tmp_path, monkeypatch):
    """A run resumed with other Inception weights computes the real statistics again (the
    old cache would give a wrong FID); unchanged weights reuse the cache. So does a new run
    in the same out_dir with another seed (which draws another real subset)."""
    from fastgan.metrics.inception import InceptionV3

    network = SlowInception(signal_at=-1)
    monkeypatch.setattr(InceptionV3, "load", lambda *args, **kwargs: network)
    first, other = stand_in_weights(tmp_path / "a.pt", b"weights a"), stand_in_weights(tmp_path / "b.pt", b"weights b")
    common = ["fid_every=1", "fid_samples=10", "fid_real_samples=10"]
    Trainer(tiny_config(tmp_path, *common, "steps=1", f"inception_weights={first}")).fit()
    Trainer(tiny_config(tmp_path, *common, "steps=2", f"inception_weights={first}"), resume=True).fit()
    assert len(list((tmp_path / "run").glob("fid_real_*.npz"))) == 1
    Trainer(tiny_config(tmp_path, *common, "steps=3", f"inception_weights={other}"), resume=True).fit()
    assert len(list((tmp_path / "run").glob("fid_real_*.npz"))) == 2
    for name in (CHECKPOINT, BEST, SUMMARY):
        (tmp_path / "run" / name).unlink()
    Trainer(tiny_config(tmp_path, *common, "steps=1", f"inception_weights={other}", "seed=1")).fit()
    assert len(list((tmp_path / "run").glob("fid_real_*.npz"))) == 3


def test_one_process_at_a_time_trains_into_an_out_dir(tmp_path, monkeypatch):
    """While another process holds out_dir (its lock; flock conflicts between two open files even
    within one process), a Trainer is refused before it reads the checkpoint -- it would start
    from a state the other run is still changing -- and writes nothing; released, the run goes on.
    A file system without flock trains unlocked, saying so."""
    import errno
    import fcntl

    from fastgan.files import FileLock
    from fastgan.train.trainer import LOCK, RunInProgress

    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from fastgan.files import FileLock; "
                               f"lock = FileLock({str(tmp_path / 'run' / LOCK)!r}); lock.acquire(); "
                               "print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(RunInProgress, match=rf"being trained by another process \(host .+, process {holder.pid}\)"):
            Trainer(tiny_config(tmp_path, "steps=1"))
    finally:
        holder.communicate("")  # the holder exits: the system drops its lock
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK]
    first = Trainer(tiny_config(tmp_path, "steps=1"))  # holds out_dir from here on
    with pytest.raises(RunInProgress, match="held by another Trainer of this process: fit"):
        Trainer(tiny_config(tmp_path, "steps=2"), resume=True)
    assert first.fit()["finished"]
    assert FileLock(tmp_path / "run" / LOCK).acquire() is None  # released when the run ended

    def no_locks(descriptor, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(RuntimeWarning, match="does not lock files"):
        assert Trainer(tiny_config(tmp_path, "steps=2"), resume=True).fit()["finished"]


def test_a_checkpoint_from_before_fid_resize_resumes_with_a_fresh_best_fid(tmp_path, monkeypatch, capsys):
    """Runs checkpointed before fid_resize existed evaluated FID with torch-bilinear. Resumed
    under today's default (tf-bilinear) their best FID no longer compares: it starts again,
    with a notice; resumed with fid_resize=torch-bilinear it is kept."""
    from fastgan.metrics.inception import InceptionV3
    from fastgan.train import checkpoint as checkpoints

    monkeypatch.setattr(InceptionV3, "load", lambda *args, **kwargs: SlowInception(signal_at=-1))
    common = ["fid_every=1", "fid_samples=10", "fid_real_samples=10",
              f"inception_weights={stand_in_weights(tmp_path / 'weights.pt')}"]
    Trainer(tiny_config(tmp_path, *common, "steps=1")).fit()
    state = checkpoints.load(tmp_path / "run" / CHECKPOINT)
    del state["config"]["fid_resize"]  # as the trainer wrote it before the key existed
    checkpoints.save_atomic(state, tmp_path / "run" / CHECKPOINT)
    kept = Trainer(tiny_config(tmp_path, *common, "steps=2", "fid_resize=torch-bilinear"), resume=True)
    assert (kept.best_fid, kept.best_step) == (state["best_fid"], 1)
    kept.fit()
    capsys.readouterr()
    restarted = Trainer(tiny_config(tmp_path, *common, "steps=3"), resume=True)
    assert restarted.best_fid is None and "fid_resize is tf-bilinear now, torch-bilinear before" in capsys.readouterr().err
    assert restarted.fit()["best_step"] == 3


def test_fid_resizes_as_compare_gan_unless_configured_otherwise(tmp_path, monkeypatch):
    """Training FIDs preprocess as compare_gan (tf-bilinear), whose figures the paper reports;
    fid_resize picks another convention, may change on resume (the reference statistics,
    keyed on it, are computed again) and is checked against the conventions there are."""
    from fastgan.metrics.inception import InceptionV3

    network, conventions = SlowInception(signal_at=-1), []

    def load(path, **kwargs):
        conventions.append(kwargs["resize"])
        network.resize_convention = kwargs["resize"]
        return network

    monkeypatch.setattr(InceptionV3, "load", load)
    common = ["fid_every=1", "fid_samples=10", "fid_real_samples=10",
              f"inception_weights={stand_in_weights(tmp_path / 'weights.pt')}"]
    Trainer(tiny_config(tmp_path, *common, "steps=1")).fit()
    Trainer(tiny_config(tmp_path, *common, "steps=2", "fid_resize=torch-bilinear"), resume=True).fit()
    assert conventions == ["tf-bilinear", "torch-bilinear"]
    assert len(list((tmp_path / "run").glob("fid_real_*.npz"))) == 2
    with pytest.raises(ValueError, match="fid_resize='bilinear' is not one of torch-bilinear, tf-bilinear, pil-bicubic"):
        tiny_config(tmp_path, "fid_resize=bilinear")


def test_out_dir_and_inception_weights_expand_the_home_folder(tmp_path, monkeypatch):
    from fastgan.metrics.inception import InceptionV3

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(InceptionV3, "load", lambda *args, **kwargs: SlowInception(signal_at=-1))
    stand_in_weights(tmp_path / "weights.pt")
    summary = Trainer(tiny_config(tmp_path, "steps=1", "fid_every=1", "fid_samples=10", "fid_real_samples=10",
                                  "out_dir=~/run", "inception_weights=~/weights.pt")).fit()
    assert summary["out_dir"] == str(tmp_path / "run") and summary["final_fid"] is not None
    assert (tmp_path / "run" / CHECKPOINT).is_file() and not Path("~").exists()


def test_the_cli_exits_with_a_distinct_status_when_stopped(tmp_path, monkeypatch, capsys):
    from fastgan.__main__ import main
    from fastgan.metrics.inception import InceptionV3

    monkeypatch.setattr(InceptionV3, "load", lambda *args, **kwargs: SlowInception(signal_at=2))
    run = ["train", *TINY, "steps=4", "fid_every=2", "fid_samples=200", "fid_real_samples=50", f"out_dir={tmp_path / 'run'}",
           f"inception_weights={stand_in_weights(tmp_path / 'weights.pt')}"]
    assert main(run) == EXIT_INTERRUPTED == 75
    assert "stopped at step 2" in capsys.readouterr().err


# WGAN without normalization at learning rate 10: D's outputs overflow to NaN at step 3 (CPU, deterministic).
DIVERGING = ["loss=wgan", "d_norm=none", "d_lr=10", "g_lr=10", "d_betas=[0.0,0.0]", "g_betas=[0.0,0.0]"]


def test_a_diverged_run_stops_says_so_and_is_not_trained_further(tmp_path, capsys):
    """NaN losses at a log step end the run after that iteration: nothing of the NaN G is
    sampled, the checkpoint and summary.json record the step, the CLI exits 3, and a resume
    trains nothing (as a finished run's does)."""
    from fastgan.__main__ import main

    run = ["train", *TINY, *DIVERGING, "steps=12", "sample_every=1", f"out_dir={tmp_path / 'run'}"]
    assert main(run) == EXIT_DIVERGED == 3
    captured = capsys.readouterr()
    assert "diverged at step 3: d_loss, fake_logit, g_loss not finite; training stopped" in captured.err
    assert "step 3/12, diverged" in captured.out
    summary = json.loads((tmp_path / "run" / SUMMARY).read_text())
    assert (summary["step"], summary["diverged_at"], summary["finished"]) == (3, 3, False)
    assert checkpoint.load(tmp_path / "run" / CHECKPOINT)["diverged_at"] == 3
    assert sorted(p.name for p in (tmp_path / "run" / "samples").iterdir()) == ["step-0000001.png", "step-0000002.png"]
    assert main(run + ["--resume"]) == EXIT_DIVERGED
    assert [r["step"] for r in metrics_records(tmp_path / "run")] == [1, 2, 3]
    assert json.loads((tmp_path / "run" / SUMMARY).read_text()) == summary


class _PoisonG(Callback):
    """Sets G's parameters to NaN after iteration ``at``, as an overflow in its update would."""

    def __init__(self, at: int) -> None:
        self.at = at

    def after(self, trainer, out):
        if trainer.step == self.at:
            with torch.no_grad():
                for parameter in trainer.G.parameters():
                    parameter.fill_(float("nan"))


def test_non_finite_images_at_an_fid_end_the_run_as_diverged(tmp_path, monkeypatch):
    """Between log steps the FID is where a NaN G shows: its images are not fed to Inception
    (which would refuse them and abort the run); the run ends as diverged at that step."""
    from fastgan.metrics.inception import InceptionV3

    network = SlowInception(signal_at=-1)
    monkeypatch.setattr(InceptionV3, "load", lambda *args, **kwargs: network)
    config = tiny_config(tmp_path, "steps=4", "log_every=10", "fid_every=2", "fid_samples=10", "fid_real_samples=10",
                         f"inception_weights={stand_in_weights(tmp_path / 'weights.pt')}")
    summary = Trainer(config, callbacks=[_PoisonG(at=1)]).fit()
    assert (summary["step"], summary["diverged_at"], summary["finished"], summary["best_fid"]) == (2, 2, False, None)
    assert network.calls == 1  # the real images only
    assert not any("fid" in r for r in metrics_records(tmp_path / "run"))


def test_a_non_finite_jacobian_at_a_conditioning_record_ends_the_run_as_diverged(tmp_path):
    config = tiny_config(tmp_path, "steps=4", "log_every=10", "diagnostics_condition_number_every=2",
                         "diagnostics_condition_number_samples=2")
    summary = Trainer(config, callbacks=[_PoisonG(at=1)]).fit()
    assert (summary["step"], summary["diverged_at"], summary["finished"]) == (2, 2, False)
    assert not any("log_condition_number_mean" in r for r in metrics_records(tmp_path / "run"))


def test_fid_without_inception_weights_says_how_to_get_them(tmp_path, monkeypatch, capsys):
    from fastgan.metrics import inception

    def no_weights(*args, **kwargs):
        raise RuntimeError("no Inception weights found")

    monkeypatch.setattr(inception, "resolve_weights_path", no_weights)
    summary = Trainer(tiny_config(tmp_path, "steps=2", "fid_every=1")).fit()
    assert summary["finished"] and summary["best_fid"] is None
    assert "FID disabled: no Inception weights found" in capsys.readouterr().err


# ------------------------------------------------------------------ cross-process training


def test_cross_process_batch_norm_is_batch_norm_in_one_process():
    bn = torch.nn.BatchNorm2d(5)
    converted = convert_batch_norm(torch.nn.Sequential(bn))[0]
    assert isinstance(converted, CrossProcessBatchNorm)
    x = torch.randn(6, 5, 3, 3)
    torch.testing.assert_close(converted(x), torch.nn.BatchNorm2d(5)(x))


def test_batch_norm_conversion_keeps_dtype_and_device():
    bn = torch.nn.BatchNorm1d(3).double()
    converted = convert_batch_norm(bn)
    assert {t.dtype for t in converted.parameters()} == {torch.float64}
    assert converted.running_var.dtype == torch.float64
    assert converted.num_batches_tracked.dtype == torch.long


def test_convert_batch_norm_keeps_the_modules_parameters_and_buffers():
    """As torch's SyncBatchNorm.convert_sync_batchnorm: the converted module holds the very
    parameters and buffers (a frozen scale stays frozen, an optimizer built before the
    conversion still trains the model), in nested modules, keeping each one's mode."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(nn.BatchNorm2d(4)),
                          nn.ModuleDict({"plain": nn.BatchNorm1d(6, affine=False, track_running_stats=False)}))
    frozen = model[1][0]
    frozen.weight.requires_grad_(False)
    frozen.eval()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = {name: t for name, t in list(frozen.named_parameters()) + list(frozen.named_buffers())}
    converted = convert_batch_norm(model)
    bn, plain = converted[1][0], converted[2]["plain"]
    assert isinstance(bn, CrossProcessBatchNorm) and isinstance(plain, CrossProcessBatchNorm)
    assert not bn.training and plain.training and not bn.weight.requires_grad and bn.bias.requires_grad
    for name, tensor in list(bn.named_parameters()) + list(bn.named_buffers()):
        assert tensor is before[name], name
    assert plain.weight is None and plain.running_mean is None and plain.num_batches_tracked is None
    bias = bn.bias.detach().clone()
    converted.train()
    converted[1](converted[0](torch.rand(5, 3, 7, 7) + 0.5)).mean().backward()
    optimizer.step()
    assert not torch.equal(bn.bias, bias)  # the optimizer's parameter is the converted module's


def _one_process_all_reduce(monkeypatch):
    """CrossProcessBatchNorm's cross-process path in this process: a one-rank all-reduce is the identity."""
    import torch.distributed.nn.functional as distributed_functional
    from fastgan.nn import batch_norm

    monkeypatch.setattr(batch_norm, "_distributed", lambda: True)
    monkeypatch.setattr(distributed_functional, "all_reduce", lambda tensor, *args, **kwargs: tensor)


@pytest.mark.skipif("bias" not in inspect.signature(nn.BatchNorm2d).parameters,
                    reason="this torch's batch norm has no bias=False")
def test_batch_norm_built_without_bias_converts_and_trains_across_processes(monkeypatch):
    """nn.BatchNorm2d(..., bias=False) (a scale, no shift): converted, and through the
    cross-process path, its outputs and gradients are the float64 module's (odd sizes,
    channels with |mean| > std)."""
    torch.manual_seed(3)
    reference = nn.BatchNorm2d(5, bias=False).double()
    with torch.no_grad():
        reference.weight.copy_(torch.linspace(0.5, 1.5, 5))
    converted = convert_batch_norm(copy.deepcopy(reference))
    assert converted.bias is None and set(converted.state_dict()) == set(reference.state_dict())
    _one_process_all_reduce(monkeypatch)
    x = (torch.randn(3, 5, 7, 3, dtype=torch.float64) * 0.7 + torch.linspace(-2, 3, 5).view(1, 5, 1, 1))
    weights = torch.randn(3, 5, 7, 3, dtype=torch.float64)
    grads = []
    for bn in (converted, reference):
        point = x.clone().requires_grad_()
        out = bn(point)
        (out * weights).sum().backward()
        grads.append((out.detach(), point.grad, bn.weight.grad, bn.running_mean, bn.running_var))
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def _batch_norm_worker(rank, world, init_file, inputs, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    bn = CrossProcessBatchNorm(inputs[rank].shape[1])
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, bn.num_features))
    x = inputs[rank].clone().requires_grad_()
    out = bn(x)
    (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()).sum().backward()
    torch.save({"out": out.detach(), "grad": x.grad, "weight_grad": bn.weight.grad,
                "running_mean": bn.running_mean, "running_var": bn.running_var}, f"{result_file}.{rank}")
    exit_worker()


def test_cross_process_batch_norm_is_batch_norm_on_the_combined_batch(tmp_path):
    """2 gloo processes with uneven float32 batches (3 and 5 samples) whose channels have a mean
    of ~1000 and a std of ~0.01 (E[x²] − mean² would be round-off there) against float64 batch
    norm on the combined batch: outputs, input and weight gradients, running statistics."""
    torch.manual_seed(11)
    combined = (1000 + 0.01 * torch.randn(8, 4, 3, 2, dtype=torch.float64)) * torch.tensor([1.0, -1, 0.5, 2]).view(1, 4, 1, 1)
    inputs = [combined[:3].float(), combined[3:].float()]
    result = str(tmp_path / "result")
    mp.spawn(_batch_norm_worker, args=(2, str(tmp_path / "init"), inputs, result), nprocs=2)
    got = [torch.load(f"{result}.{rank}") for rank in (0, 1)]
    bn = torch.nn.BatchNorm2d(4).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 4))
    x = torch.cat(inputs).double().requires_grad_()
    out = bn(x)
    weights = torch.cat([torch.arange(t.numel(), dtype=torch.float64).view_as(t).sin() for t in inputs])
    (out * weights).sum().backward()
    # float32 inputs near 1000 carry ~3e-5 of absolute rounding against a std of 0.01: ~1e-3 relative
    torch.testing.assert_close(torch.cat([g["out"] for g in got]).double(), out.detach(), rtol=0, atol=5e-3)
    torch.testing.assert_close(torch.cat([g["grad"] for g in got]).double(), x.grad, rtol=5e-3, atol=5)
    # each rank's weight gradient is its samples' share (DDP sums them)
    torch.testing.assert_close(sum(g["weight_grad"].double() for g in got), bn.weight.grad, rtol=5e-3, atol=1e-2)
    for g in got:
        torch.testing.assert_close(g["running_mean"].double(), bn.running_mean, rtol=1e-6, atol=0)
        torch.testing.assert_close(g["running_var"].double(), bn.running_var, rtol=5e-3, atol=0)


def test_two_process_ddp_equals_one_process_on_the_combined_batch(tmp_path):
    """gloo, 2 CPU processes × 4 samples vs 1 process × 8: the same parameters after 3 steps,
    with spectral norm in D, batch norm in G (cross-process) and the WGAN-GP penalty.

    The runs differ only in float32 summation order. Adam's first steps move every weight by
    about ±lr whatever its gradient's size, so at lr 2e-4 gradients that are pure round-off
    (biases before batch norm) flip sign and the game amplifies it; at lr 1e-5 the runs agree
    to 2e-6 while the weights move by ~3e-5, which the test also checks."""
    common = TINY + ["steps=3", "penalty=wgan-gp", "deterministic=false", "log_every=0", "g_lr=1e-5"]
    single = Trainer(load_config(None, common + [f"out_dir={tmp_path / 'single'}"]))
    initial = {"G": {k: v.clone() for k, v in single.G.state_dict().items()},
               "D": {k: v.clone() for k, v in single.D.state_dict().items()}}
    single.fit()
    got = train_in_two_processes(common, tmp_path / "ddp")
    moved = 0.0
    for name, module in (("G", single.G), ("D", single.D)):
        expected = module.state_dict()
        weights = {key for key, _ in module.named_parameters()}  # not the buffers: SN's u, v and BN's statistics move at any forward
        assert got[name].keys() == expected.keys()
        for key, value in expected.items():
            if value.is_floating_point():
                torch.testing.assert_close(got[name][key], value, rtol=0, atol=2e-6, msg=f"{name}.{key}")
                if key in weights:
                    moved = max(moved, float((value - initial[name][key]).abs().max()))
            else:
                assert torch.equal(got[name][key], value), f"{name}.{key}"
    assert moved > 2e-5
    # the logged losses are the whole batch's (the mean over the processes), not rank 0's share's
    rates = ("steps_per_s", "images_per_s")
    logged, expected = ([{k: v for k, v in r.items() if k not in rates} for r in metrics_records(tmp_path / run)]
                        for run in ("ddp", "single"))
    assert [r["step"] for r in logged] == [r["step"] for r in expected] == [3]
    assert logged[0].keys() == expected[0].keys()
    for key, value in expected[0].items():
        assert logged[0][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


class SignalOnRankZeroAt(SignalAt):
    def after(self, trainer, out) -> None:
        if trainer.rank == 0:
            super().after(trainer, out)


def _stopping_worker(rank, world, init_file, overrides, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    summary = Trainer(load_config(None, overrides), callbacks=[SignalOnRankZeroAt(2)]).fit()
    torch.save(summary, f"{result_file}.{rank}")
    exit_worker()


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """Under torchrun a pre-emption signal may reach one rank first: the ranks agree (every
    10 iterations) and all stop at that step with one checkpoint, instead of one rank waiting
    forever in a collective."""
    overrides = TINY + ["steps=20", "log_every=0", f"out_dir={tmp_path / 'run'}"]
    result = str(tmp_path / "summary")
    with tempfile.TemporaryDirectory() as tmp:
        workers = mp.spawn(_stopping_worker, args=(2, os.path.join(tmp, "init"), overrides, result), nprocs=2, join=False)
        for _ in range(30):  # at most 10 minutes, so a hang fails instead of stalling the suite
            if workers.join(timeout=20):
                break
        else:
            for process in workers.processes:
                process.kill()
            pytest.fail("the processes did not stop together")
    summaries = [torch.load(f"{result}.{rank}") for rank in (0, 1)]
    assert [s["step"] for s in summaries] == [10, 10] and not any(s["finished"] for s in summaries)
    assert checkpoint.load(tmp_path / "run" / CHECKPOINT)["step"] == 10


class PixelFeatures(torch.nn.Module):
    """A stand-in Inception whose features are a fixed projection of each image alone, so a
    FID does not depend on how its images are split into chunks or processes."""

    feature_dim = 8

    def forward(self, images):
        flat = images.flatten(1).double()
        projection = torch.randn(flat.shape[1], self.feature_dim, dtype=torch.float64,
                                 generator=torch.Generator().manual_seed(0))
        return (flat @ projection).float()


def _fid_worker(rank, world, init_file, overrides, result_file):
    from fastgan.metrics.inception import InceptionV3

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    InceptionV3.load = lambda *args, **kwargs: PixelFeatures()
    torch.save(Trainer(load_config(None, overrides)).evaluate_fid(), f"{result_file}.{rank}")
    exit_worker()


def test_two_processes_evaluate_the_fid_of_one_when_their_shares_differ_in_chunks(tmp_path, monkeypatch):
    """201 samples over 2 processes: rank 0 generates 101 (two chunks of the evaluator), rank 1
    100 (one). Every process polls the stop request (a collective) once per chunk, so the ranks
    must take the same number of polls; the FID is the one-process FID of the 201 samples."""
    from fastgan.metrics.inception import InceptionV3

    common = TINY + ["fid_every=1", "fid_samples=201", "fid_real_samples=50",
                     f"inception_weights={stand_in_weights(tmp_path / 'weights.pt')}"]
    monkeypatch.setattr(InceptionV3, "load", lambda *args, **kwargs: PixelFeatures())
    for run in ("single", "two"):  # evaluated without fit, which makes out_dir
        (tmp_path / run).mkdir()
    expected = Trainer(load_config(None, common + [f"out_dir={tmp_path / 'single'}"])).evaluate_fid()
    result = str(tmp_path / "fid")
    with tempfile.TemporaryDirectory() as tmp:
        workers = mp.spawn(_fid_worker, args=(2, os.path.join(tmp, "init"), common + [f"out_dir={tmp_path / 'two'}"], result),
                           nprocs=2, join=False)
        for _ in range(6):  # a minute at most: mismatched collectives hang instead of failing
            if workers.join(timeout=10):
                break
        else:
            for process in workers.processes:
                process.kill()
            pytest.fail("the processes' FID evaluations did not finish together")
    fids = [torch.load(f"{result}.{rank}") for rank in (0, 1)]
    assert fids[0] == fids[1]
    assert fids[0] == pytest.approx(expected, rel=1e-9)


class _DraganNoise:
    """Stands in for the step: the DRAGAN noise U (uniforms by element index from the step's
    seed, as the kernel draws them) that the penalty would add to this process's share."""

    def discriminator_update(self, real, z, alpha, seed, mask):
        from fastgan.reference.gradient_penalty import philox_uniform

        self.noise = philox_uniform(seed, real.numel()).reshape(real.shape)
        return {}


def test_each_process_perturbs_its_share_with_noise_of_its_own_under_dragan(tmp_path):
    """The DRAGAN kernel draws element i's uniform from (seed, i): with the step's one seed on
    every process, each process added the same noise pattern to its own images (the global
    batch's noise repeated world times). Rank 0 keeps the one-process run's noise; the draws of
    the run's generator (z, data) are unchanged."""
    from fastgan.train.runtime import Runtime
    from fastgan.train.stream import RepeatedBatch

    noise, latents = {}, {}
    for world, rank in ((1, 0), (2, 0), (2, 1)):
        trainer = Trainer(tiny_config(tmp_path, "penalty=dragan", f"out_dir={tmp_path / f'{world}-{rank}'}"),
                          stream=RepeatedBatch(torch.rand(8 // world, 3, 16, 16)))
        trainer.runtime, trainer.updates = Runtime(rank, world), _DraganNoise()
        trainer.discriminator_step()
        noise[world, rank] = trainer.updates.noise
        latents[world, rank] = draw_latents(8, trainer.config, trainer.random)  # the next draw of the run
    assert not torch.equal(noise[2, 0], noise[2, 1])
    assert torch.equal(noise[2, 0], noise[1, 0][:4])
    assert torch.equal(latents[2, 0], latents[1, 0]) and torch.equal(latents[2, 1], latents[1, 0])
