"""Mixed batches (symmetric D) and the tempered lens as options of the reference trainer:
config validation naming the key, the step's maths on mixed batches, the lens's schedule
and identity inside training, sample grids and logs, and bit-exact resume."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import CUDA_ONLY
from fastgan import mixed_batches
from fastgan.models.symmetric import SymmetricDiscriminator
from fastgan.tempered import lens_weight
from fastgan.train import checkpoint
from fastgan.train.callbacks import Callback
from fastgan.train.config import load_config
from fastgan.train.step import GANStep
from fastgan.train.trainer import CHECKPOINT, Trainer, models_for
from training_support import TINY_TRAINING, metrics_records, train_in_two_processes

REPO = Path(__file__).resolve().parents[1]
TINY = [*TINY_TRAINING, "deterministic=true"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(tmp_path, *overrides):
    return load_config(None, TINY + [f"out_dir={tmp_path / 'run'}", *overrides])




# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("overrides, key", [
    (["mixed_batches=true", "loss=wgan"], "loss="),
    (["mixed_batches=true", "loss=hinge"], "loss="),
    (["mixed_batches=true", "penalty=wgan-gp"], "penalty=wgan-gp"),
    (["mixed_batches=true", "penalty=dragan"], "penalty=dragan"),
    (["mixed_batches=true", "penalty=r1"], "penalty=r1"),
    (["mixed_batches=true", "penalty=r2"], "penalty=r2"),
    (["mixed_batch_loss=max"], "mixed_batch_loss"),
    (["lens_steps=-1"], "lens_steps"),
    (["lens_weight=-0.5"], "lens_weight"),
    (["lens_weight=.nan"], "lens_weight"),
    (["lens_lr=0"], "lens_lr"),
    (["lens_betas=[1.0, 0.5]"], "lens_betas"),
    (["lens_hidden=0"], "lens_hidden"),
    (["lens_depth=1"], "lens_depth"),
    (["model=vae", "mixed_batches=true"], "mixed_batches"),
    (["model=vae", "lens_steps=10"], "lens_steps"),
])
def test_bad_configs_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ValueError, match=key.replace("[", r"\[")):
        load_config(None, overrides)


def test_sections_and_accepted_combinations_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("mixed_batches: true\nloss: lsgan\npenalty: l2\nlens: {steps: 7, weight: 0.5, lr: 1.0e-3}\n")
    config = load_config(str(path))
    assert (config.mixed_batches, config.lens_steps, config.lens_weight, config.lens_learning_rate) == (True, 7, 0.5, 1e-3)
    assert config.lens_adam_betas == config.g_betas
    for name in ("demo_mixed_batches.yaml", "demo_lens.yaml"):
        load_config(str(REPO / "configs" / name))


def test_mixed_batch_keys_in_the_discriminator_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("discriminator: {mixed_batches: true, batch_smoothing: false, mixed_batch_loss: ensemble}\n")
    config = load_config(str(path))
    assert (config.mixed_batches, config.batch_smoothing, config.mixed_batch_loss) == (True, False, "ensemble")
    assert load_config(None, ["discriminator.mixed_batches=true"]).mixed_batches
    with pytest.raises(ValueError, match="mixed_batch_loss"):
        load_config(None, ["discriminator.mixed_batch_loss=max"])


def test_mixed_batches_need_two_images_per_process(tmp_path):
    with pytest.raises(ValueError, match="mixed_batches=true needs at least 2 images"):
        Trainer(tiny_config(tmp_path, "mixed_batches=true", "batch_size=1"))


# ------------------------------------------------------------------ the step on mixed batches


@pytest.mark.parametrize("loss, reduction", [("ns", "pooled"), ("ns", "ensemble"), ("lsgan", "pooled"), ("lsgan", "ensemble")])
def test_a_mixed_d_update_judges_one_mixed_batch_against_its_proportion(loss, reduction):
    config = load_config(None, TINY + ["mixed_batches=true", f"loss={loss}", f"mixed_batch_loss={reduction}",
                                       "dtype=float64", "d_norm=none"])
    torch.manual_seed(0)
    G, D = models_for(config)
    assert isinstance(D, SymmetricDiscriminator)
    step = GANStep(G, D, config)
    real, z = torch.rand(6, 3, 16, 16, dtype=torch.float64), torch.rand(6, config.z_dim, dtype=torch.float64) * 2 - 1
    mask = torch.tensor([True, False, False, True, True, False])
    seen = []
    D.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    with torch.no_grad():
        fake = G(z)
        logits = D(torch.where(mask[:, None, None, None], real, fake), pool=reduction == "pooled")
    expected = mixed_batches.discriminator_loss(loss, logits, torch.tensor(0.5, dtype=torch.float64))
    out = step.discriminator_update(real, z, mask=mask)
    assert seen == [6, 6]  # one batch of B mixed images: never cat(real, fake)
    assert out["d_target"].item() == 0.5
    torch.testing.assert_close(out["d_loss"], expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["d_prediction"], logits.sigmoid().mean(), rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="mask"):
        step.discriminator_update(real, z)


@pytest.mark.parametrize("extra", [["loss=ns"], ["loss=lsgan", "mixed_batch_loss=ensemble", "penalty=l2"],
                                   ["loss=ns", "batch_smoothing=false", "n_disc=2"]])
def test_mixed_batch_training_runs_and_logs_target_and_prediction(tmp_path, extra):
    config = tiny_config(tmp_path, "mixed_batches=true", "steps=4", *extra)
    summary = Trainer(config).fit()
    assert summary["finished"]
    records = metrics_records(Path(config.out_dir))
    for record in records:
        assert {"d_loss", "g_loss", "d_target", "d_prediction"} <= record.keys()
        assert 0 <= record["d_target"] <= 1 and 0 < record["d_prediction"] < 1
        assert "real_logit" not in record
        if "batch_smoothing=false" in extra:
            assert record["d_target"] in (0.0, 1.0)  # pure batches


# ------------------------------------------------------------------ the lens in training


class LensError(Callback):
    """‖L(x) − x‖ / ‖x‖ on the run's fixed real images after every iteration."""

    def __init__(self) -> None:
        self.errors = {}

    def start(self, trainer) -> None:
        self.errors[trainer.step] = self._error(trainer)

    def after(self, trainer, out) -> None:
        self.errors[trainer.step] = self._error(trainer)

    @staticmethod
    @torch.no_grad()
    def _error(trainer) -> float:
        x = trainer.lens_real
        return float((trainer.lens(x) - x).norm() / x.norm())


def test_the_lens_is_the_identity_at_init_moves_during_the_schedule_and_returns_after(tmp_path):
    watch = LensError()
    config = tiny_config(tmp_path, "lens_steps=4", "steps=24")
    trainer = Trainer(config, callbacks=[watch])
    trainer.fit()
    assert watch.errors[0] == 0.0  # exactly the identity at init
    peak = max(watch.errors[s] for s in range(1, 5))
    assert peak > 5e-4  # the adversarial term moved it
    assert watch.errors[24] < peak / 5 and watch.errors[24] < 2e-4  # back towards the identity, by reconstruction only
    records = metrics_records(Path(config.out_dir))
    for record in records:  # λ(t) of the iteration that began at step t = record step - n_disc
        assert record["lens_weight"] == pytest.approx(lens_weight(record["step"] - 1, 4, 1.0), rel=1e-6)
        assert {"lens_reconstruction", "lens_adversarial"} <= record.keys()
    assert records[-1]["lens_weight"] == 0.0


def test_the_lens_update_raises_ds_loss_on_the_lensed_reals(tmp_path):
    """Inside the trainer's G update the lens ascends D's loss (D frozen, its parameters unchanged)."""
    config = tiny_config(tmp_path, "lens_steps=100", "d_norm=none", "dtype=float64", "lens_lr=1e-3")
    trainer = Trainer(config)
    trainer.discriminator_step()
    real = trainer.last_real
    z = torch.rand(8, config.z_dim, dtype=torch.float64) * 2 - 1

    def d_loss_on_lensed():
        with torch.no_grad():
            from fastgan.train.losses import discriminator_loss

            logits = trainer.D(torch.cat([trainer.lens(real), trainer.G(z)]))
            return discriminator_loss(config.loss, *logits.chunk(2)).item()

    before, d_before = d_loss_on_lensed(), [p.clone() for p in trainer.D.parameters()]
    G_before = [p.clone() for p in trainer.G.parameters()]
    trainer.generator_step()
    assert all(torch.equal(a, b) for a, b in zip(d_before, trainer.D.parameters()))
    # G moved too; measure the lens's effect alone, with G as it was
    for p, saved in zip(trainer.G.parameters(), G_before):
        p.data.copy_(saved)
    assert d_loss_on_lensed() > before


def test_lens_grids_alternate_real_rows_with_lensed_rows(tmp_path):
    config = tiny_config(tmp_path, "lens_steps=2", "steps=2", "sample_every=2")
    trainer = Trainer(config)
    trainer.fit()
    out = Path(config.out_dir)
    grid = out / "samples" / "lens_000002.png"
    assert grid.is_file() and (out / "lens.png").is_file() and (out / "samples" / "step-0000002.png").is_file()
    images, columns = trainer.lens_pairs()
    assert columns == 8 and images.shape == (64, 3, 16, 16)
    torch.testing.assert_close(images[:8], trainer.lens_real[:8].float())  # row 1: originals
    torch.testing.assert_close(images[16:24], trainer.lens_real[8:16].float())  # row 3: the next originals
    with torch.no_grad():
        torch.testing.assert_close(images[8:16], trainer.lens(trainer.lens_real[:8]).float())  # row 2: lensed
    width, height = Image.open(grid).size
    assert (width, height) == (2 + 8 * 18, 2 + 8 * 18)


# ------------------------------------------------------------------ checkpoints


def _state(out_dir: Path):
    state = checkpoint.load(out_dir / CHECKPOINT)
    return {k: state[k] for k in ("G", "D", "lens", "g_optimizer", "d_optimizer", "lens_optimizer", "random", "step")
            if k in state}


def _assert_identical(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_identical(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


@pytest.mark.parametrize("extra, split", [(["mixed_batches=true"], 3), (["lens_steps=3"], 2),
                                          (["mixed_batches=true", "lens_steps=4", "n_disc=2", "penalty=l2"], 2)])
def test_resume_is_bit_exact(tmp_path, extra, split):
    steps = 6 if "n_disc=2" not in extra else 8
    common = [f"steps={steps}", *extra]
    Trainer(tiny_config(tmp_path, *common, f"out_dir={tmp_path / 'straight'}")).fit()
    Trainer(tiny_config(tmp_path, *common, f"steps={split * (2 if 'n_disc=2' in extra else 1)}",
                        f"out_dir={tmp_path / 'resumed'}")).fit()
    Trainer(tiny_config(tmp_path, *common, f"out_dir={tmp_path / 'resumed'}"), resume=True).fit()
    straight, resumed = _state(tmp_path / "straight"), _state(tmp_path / "resumed")
    assert ("lens" in straight) == ("lens_steps=3" in extra or "lens_steps=4" in extra)
    _assert_identical(straight, resumed)
    rates = ("steps_per_s", "images_per_s")
    strip = lambda records: [{k: v for k, v in r.items() if k not in rates} for r in records]  # noqa: E731
    assert strip(metrics_records(tmp_path / "resumed")) == strip(metrics_records(tmp_path / "straight"))


@pytest.mark.parametrize("change", ["mixed_batches=false", "lens_steps=5", "lens_weight=2", "batch_smoothing=false"])
def test_resume_refuses_a_different_mixed_or_lens_setup(tmp_path, change):
    Trainer(tiny_config(tmp_path, "steps=1", "mixed_batches=true", "lens_steps=3")).fit()
    with pytest.raises(ValueError, match=change.split("=")[0]):
        Trainer(tiny_config(tmp_path, "steps=2", "mixed_batches=true", "lens_steps=3", change), resume=True)


# ------------------------------------------------------------------ CUDA graphs (GPU only)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=CUDA_ONLY)])
def test_captured_mixed_lens_updates_match_eager(tmp_path, device):
    runs = {}
    for graphs in (False, True):
        config = tiny_config(tmp_path, "mixed_batches=true", "lens_steps=3", "steps=6", f"device={device}",
                             f"cuda_graphs={str(graphs).lower()}", f"out_dir={tmp_path / str(graphs)}")
        trainer = Trainer(config)
        trainer.fit()
        assert not graphs or trainer.updates.captured  # replayed, not fallen back to eager
        runs[graphs] = [p.detach().cpu() for m in (trainer.G, trainer.D, trainer.lens) for p in m.parameters()]
    for eager, captured in zip(runs[False], runs[True]):
        # 1e-3: Adam moves a weight whose gradient is pure round-off by ±lr either way (test_train_graphs.py)
        torch.testing.assert_close(captured, eager, rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ several processes


@pytest.mark.slow
@pytest.mark.parametrize("option", ["mixed_batches=true", "lens_steps=2"])
def test_two_process_runs_train_and_log_once(tmp_path, option):
    """gloo, 2 CPU processes: mixed batches (one mask per process, each mixing its own share)
    and the lens train, and rank 0 alone writes the run's records."""
    state = train_in_two_processes(TINY + ["steps=2", option], tmp_path / "ddp")
    assert all(torch.isfinite(t).all() for part in state.values() for t in part.values() if t.is_floating_point())
    records = [r for r in metrics_records(tmp_path / "ddp") if "d_loss" in r]
    assert [r["step"] for r in records] == [1, 2]
