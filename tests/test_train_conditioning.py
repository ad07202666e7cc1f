"""Generator conditioning in training: the condition-number monitor (config
``diagnostics_condition_number_every``) and Jacobian clamping of G
(``generator_jacobian_clamping_*``), Odena et al. 2018.

Tiny SNDCGANs (16×16, a quarter of the channels, z_dim 8) on the embedded digits.
"""
import copy

import pytest
import torch

from fastgan.diagnostics import conditioning_summary
from fastgan.train.config import load_config
from fastgan.train.losses import generator_loss
from fastgan.train.runtime import Runtime
from fastgan.train.step import GANStep, why_not_capturable
from fastgan.train.trainer import CHECKPOINT, Trainer, draw_perturbations, models_for
from training_support import TINY_TRAINING, metrics_records, train_in_two_processes

TINY = [*TINY_TRAINING, "z_dim=8", "log_every=2", "deterministic=true"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(tmp_path, *overrides, run="run"):
    return load_config(None, TINY + [f"out_dir={tmp_path / run}", *overrides])




def test_condition_number_is_logged_every_n_steps_and_plotted(tmp_path):
    config = tiny(tmp_path, "steps=10", "diagnostics.condition_number_every=4", "diagnostics.condition_number_samples=3")
    trainer = Trainer(config)
    trainer.fit()
    logged = [r for r in metrics_records(trainer.out_dir) if "log_condition_number_mean" in r]
    assert [r["step"] for r in logged] == [4, 8, 10]  # every 4 steps, and the last step
    expected = conditioning_summary(trainer.G, trainer.conditioning_z)  # the final G at the same fixed z
    assert logged[-1] == pytest.approx({"step": 10, **expected}, rel=1e-12)
    assert {"log_singular_value_q50", "log_condition_number_std", "rank_deficient_fraction"} <= set(logged[-1])
    assert trainer.conditioning_z.shape == (3, 8)
    assert (trainer.out_dir / "conditioning.png").stat().st_size > 0
    assert torch.equal(torch.load(trainer.out_dir / CHECKPOINT)["conditioning_z"], trainer.conditioning_z)


def test_the_monitor_never_changes_training(tmp_path):
    watched = Trainer(tiny(tmp_path, "steps=4", "diagnostics_condition_number_every=1", run="watched"))
    watched.fit()
    plain = Trainer(tiny(tmp_path, "steps=4", run="plain"))
    plain.fit()
    for a, b in zip(watched.G.state_dict().values(), plain.G.state_dict().values()):
        assert torch.equal(a, b)


def _state(out_dir):
    state = torch.load(out_dir / CHECKPOINT)
    return {k: state[k] for k in ("G", "D", "g_optimizer", "d_optimizer", "random", "conditioning_z")}


def _assert_identical(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_identical(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def test_resume_with_clamping_and_monitor_is_bit_identical(tmp_path):
    keys = ["diagnostics_condition_number_every=2", "generator.jacobian_clamping.weight=0.5", "generator.jacobian_clamping.lambda_max=2"]
    Trainer(tiny(tmp_path, "steps=6", *keys, run="straight")).fit()
    Trainer(tiny(tmp_path, "steps=3", *keys, run="resumed")).fit()
    Trainer(tiny(tmp_path, "steps=6", *keys, run="resumed"), resume=True).fit()
    _assert_identical(_state(tmp_path / "straight"), _state(tmp_path / "resumed"))
    straight, resumed = metrics_records(tmp_path / "straight"), metrics_records(tmp_path / "resumed")
    assert [r for r in straight if "jacobian_clamping" in r]
    drop = ("steps_per_s", "images_per_s")
    resumed = [{k: v for k, v in r.items() if k not in drop} for r in resumed]
    for record in straight:  # the resumed run also logged its first part's last step, 3
        assert {k: v for k, v in record.items() if k not in drop} in resumed


def test_generator_loss_includes_jacobian_clamping(tmp_path):
    """g_loss = L_G(D(G(z))) + weight · mean((max(Q, λmax) − λmax)² + (min(Q, λmin) − λmin)²), with
    Q = ‖G(z+δ) − G(z)‖/‖δ‖ computed here by hand, float64, G in train mode like the step's."""
    weight, eps, low, high = 0.7, 0.5, 1.3, 2.1
    config = tiny(tmp_path, "dtype=float64", f"generator.jacobian_clamping={{weight: {weight}, eps: {eps}, "
                  f"lambda_min: {low}, lambda_max: {high}}}")
    G, D = models_for(config)
    G_copy, D_copy = copy.deepcopy(G), copy.deepcopy(D)
    random = torch.Generator().manual_seed(5)
    z = torch.randn(8, config.z_dim, generator=random, dtype=torch.float64)
    delta = draw_perturbations(z, config, random)
    assert torch.allclose(delta.norm(dim=1), torch.full((8,), eps, dtype=torch.float64))
    out = GANStep(G, D, config).generator_update(z, delta)

    fake, perturbed = G_copy(z), G_copy(z + delta)
    gain = (perturbed - fake).flatten(1).norm(dim=1) / eps
    clamping = (torch.relu(gain - high) ** 2 + torch.relu(low - gain) ** 2).mean()
    assert clamping > 0  # the bounds are chosen so that some gains fall outside them
    expected = generator_loss(config.loss, D_copy(fake)) + weight * clamping
    assert out["jacobian_clamping"].item() == pytest.approx(clamping.item(), rel=1e-12)
    assert out["g_loss"].item() == pytest.approx(expected.item(), rel=1e-12)


def test_clamping_needs_its_perturbations_and_is_not_captured(tmp_path):
    config = tiny(tmp_path, "generator.jacobian_clamping.weight=1")
    G, D = models_for(config)
    with pytest.raises(ValueError, match="needs delta"):
        GANStep(G, D, config).generator_update(torch.zeros(8, config.z_dim))
    reason = why_not_capturable(config, Runtime(device=torch.device("cuda")), G, D)
    assert reason and "Jacobian clamping" in reason


@pytest.mark.parametrize("override, message", [
    ("generator.jacobian_clamping.weight=-1", "generator.jacobian_clamping.weight"),
    ("generator.jacobian_clamping.eps=0", "generator.jacobian_clamping.eps"),
    ("generator.jacobian_clamping={lambda_min: 3, lambda_max: 2}", "generator.jacobian_clamping.lambda_min"),
    ("diagnostics.condition_number_every=-1", "diagnostics_condition_number_every"),
    ("diagnostics.condition_number_samples=0", "diagnostics_condition_number_samples"),
    ("diagnostics.condition_number_evry=5", "unknown config key(s) diagnostics_condition_number_evry"),
])
def test_bad_conditioning_keys_are_named(tmp_path, override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny(tmp_path, override)


def test_two_process_clamping_equals_one_process_on_the_combined_batch(tmp_path):
    """gloo, 2 CPU processes × 4 samples vs 1 process × 8, with Jacobian clamping (two forwards of
    the DDP-wrapped G before one backward, cross-process batch norm in both) and the monitor on
    rank 0: the same G weights after 3 steps, to float32 summation order (lr 1e-5, as the plain
    DDP test in test_training.py explains)."""
    common = TINY + ["steps=3", "deterministic=false", "log_every=0", "g_lr=1e-5", "diagnostics_condition_number_every=3",
                     "generator.jacobian_clamping={weight: 1, lambda_min: 1.5, lambda_max: 2}"]
    single = Trainer(load_config(None, common + [f"out_dir={tmp_path / 'single'}"]))
    single.fit()
    got = train_in_two_processes(common, tmp_path / "ddp")["G"]
    # Biases just before batch norm get gradients that are pure round-off, which Adam turns into
    # steps of ±lr (and batch norm's running means follow them): only the weights are compared.
    weights = [key for key in single.G.state_dict() if key.endswith("weight") or key.endswith("running_var")]
    assert len(weights) > 8
    for key in weights:
        torch.testing.assert_close(got[key], single.G.state_dict()[key], rtol=0, atol=2e-6, msg=key)
    assert [r["step"] for r in metrics_records(tmp_path / "ddp") if "log_condition_number_mean" in r] == [3]
