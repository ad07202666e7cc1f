"""β-VAE training through the GAN trainer (``model: vae``): the update against a direct
computation, logged rate/distortion/ELBO and the mutual-information bounds, outputs,
FID of decoder samples, bit-exact resume, the VampPrior sampler, and config errors.

Tiny VAEs (16×16, a quarter of the channels, z_dim 8) on the embedded digits.
"""
import copy
import math

import numpy as np
import pytest
import torch

from conftest import DEVICES, needs_fid_helper
from fastgan.models.vae import VAE
from fastgan.train import checkpoint
from fastgan.train.config import load_config
from fastgan.train.data import load_dataset
from fastgan.train.trainer import BEST, CHECKPOINT, Trainer, load_generator
from fastgan.train.vae_step import VAESampler, VAEStep, image_counts, reconstruction_pairs, vae_sampler
from training_support import TINY_TRAINING, metrics_records

TINY = [*TINY_TRAINING, "model=vae", "z_dim=8", "deterministic=true"]
LOGGED = {"loss", "rate", "distortion", "elbo", "mi_lower_bound", "mi_upper_bound"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(tmp_path, *overrides, run="run"):
    return load_config(None, TINY + [f"out_dir={tmp_path / run}", *overrides])


def test_image_counts_count_each_byte_identical_image():
    data = load_dataset("digits", image_size=16)
    _, expected = np.unique(np.asarray(data.images).reshape(len(data), -1), axis=0, return_counts=True)
    counts = image_counts(data, chunk=100)  # chunks that split the set unevenly
    assert sorted(counts) == sorted(expected.tolist()) and sum(counts) == len(data)
    assert 1000 < len(counts) <= len(data)


def test_the_update_is_the_beta_vae_objective_in_float64(tmp_path):
    beta = 2.5
    config = tiny(tmp_path, "dtype=float64", f"beta={beta}", "vae.marginal=vamp", "vae.components=3")
    sampler = vae_sampler(config).double()
    reference = copy.deepcopy(sampler.vae)
    real = torch.rand(8, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = VAEStep(sampler, config, entropy=7.0).vae_update(real, seed=123)
    terms = reference(real, torch.Generator().manual_seed(123))
    rate, distortion = terms.rate.mean(), terms.distortion.mean()
    assert out["loss"].item() == pytest.approx((distortion + beta * rate).item(), rel=1e-12)
    assert out["rate"].item() == pytest.approx(rate.item(), rel=1e-12)
    assert out["elbo"].item() == pytest.approx(-(rate + distortion).item(), rel=1e-12)
    assert out["mi_lower_bound"].item() == pytest.approx(7.0 - distortion.item(), rel=1e-12)
    assert out["mi_upper_bound"].item() == out["rate"].item()
    # and the step moved the parameters
    assert any(not torch.equal(p, q) for p, q in zip(sampler.vae.parameters(), reference.parameters()))


def test_a_short_vae_run_logs_in_nats_and_writes_its_outputs(tmp_path):
    trainer = Trainer(tiny(tmp_path, "steps=4", "sample_every=2", "diagnostics_condition_number_every=4",
                           "diagnostics_condition_number_samples=2"))
    summary = trainer.fit()
    assert summary["finished"] and trainer.D is None
    logged = metrics_records(trainer.out_dir)
    steps = [r for r in logged if "rate" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(LOGGED <= set(r) for r in steps)
    _, counts = np.unique(np.asarray(trainer.data.images).reshape(len(trainer.data), -1), axis=0, return_counts=True)
    entropy = float(-(counts / counts.sum() * np.log(counts / counts.sum())).sum())
    for r in steps:
        assert r["elbo"] == pytest.approx(-(r["rate"] + r["distortion"]), rel=1e-6)
        assert r["mi_lower_bound"] == pytest.approx(entropy - r["distortion"], rel=1e-5)
        assert r["rate"] >= -1e-4 and r["distortion"] > 0  # a KL and −log of a discrete probability
    assert [r["step"] for r in logged if "log_condition_number_mean" in r] == [4]
    for name in ("samples.png", "reconstructions.png", "curves.png", "conditioning.png", CHECKPOINT):
        assert (trainer.out_dir / name).stat().st_size > 0
    state = checkpoint.load(trainer.out_dir / CHECKPOINT)
    assert state["D"] is None and "vae_optimizer" in state
    sampler, config = load_generator(str(trainer.out_dir / CHECKPOINT), device="cpu")
    assert isinstance(sampler, VAESampler) and config.model == "vae"
    images = sampler(torch.randn(3, 8))
    assert images.shape == (3, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


def test_vae_resume_is_bit_identical(tmp_path):
    Trainer(tiny(tmp_path, "steps=6", run="straight")).fit()
    Trainer(tiny(tmp_path, "steps=3", run="resumed")).fit()
    Trainer(tiny(tmp_path, "steps=6", run="resumed"), resume=True).fit()
    a, b = (checkpoint.load(tmp_path / run / CHECKPOINT) for run in ("straight", "resumed"))
    for key in a["G"]:
        assert torch.equal(a["G"][key], b["G"][key]), key
    assert torch.equal(a["random"], b["random"])
    moments = [(s["exp_avg"], s["exp_avg_sq"]) for s in a["vae_optimizer"]["state"].values()]
    resumed = [(s["exp_avg"], s["exp_avg_sq"]) for s in b["vae_optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for pair, other in zip(moments, resumed) for x, y in zip(pair, other))
    final = [r for r in metrics_records(tmp_path / "straight") if r["step"] == 6]
    assert final[0]["rate"] == [r for r in metrics_records(tmp_path / "resumed") if r["step"] == 6][0]["rate"]


@needs_fid_helper
def test_fid_of_decoder_samples(tmp_path):
    """With the fid-helper Inception installed by `make test`: FID of the VAE's decoded samples."""
    summary = Trainer(tiny(tmp_path, "steps=2", "fid_every=2", "fid_samples=12", "fid_real_samples=12")).fit()
    assert summary["final_fid"] > 0 and (tmp_path / "run" / BEST).exists()


def test_the_vamp_sampler_draws_the_mixture():
    """Each component is picked with probability 1/K and, given it, the noise is again N(0, I)."""
    torch.manual_seed(0)
    vae = VAE(image_size=8, z_dim=3, width=0.125, marginal="vamp", components=4).double()
    sampler = VAESampler(vae)
    eps = torch.randn(40000, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    mean, log_std = vae.posterior(vae.marginal.pseudo_images.clamp(0, 1))
    z = sampler.latent(eps)
    # recover each draw's component: the one whose mean/std standardizes z's last coordinates back to eps
    standardized = (z[:, None, 1:] - mean[None, :, 1:]) * torch.exp(-log_std[None, :, 1:])
    pick = (standardized - eps[:, None, 1:]).abs().sum(-1).argmin(1)
    shares = torch.bincount(pick, minlength=4).double() / len(eps)
    assert torch.allclose(shares, torch.full((4,), 0.25, dtype=torch.float64), atol=0.01)
    first = (z[:, 0] - mean[pick, 0]) * torch.exp(-log_std[pick, 0])
    for k in range(4):
        chosen = first[pick == k]
        assert abs(chosen.mean().item()) < 0.05 and abs(chosen.std().item() - 1) < 0.05


@pytest.mark.parametrize("overrides, message", [
    (["beta=0"], "beta"),
    (["beta=-1"], "beta"),
    (["vae.likelihood=poisson"], "vae_likelihood='poisson' is not one of"),
    (["vae={marginal: flow}"], "vae_marginal='flow' is not one of"),
    (["vae.components=0"], "vae_components must be >= 1"),
    (["loss=hinge"], "model=vae does not use loss"),
    (["penalty=wgan-gp", "n_disc=2", "steps=4"], "model=vae does not use penalty, n_disc"),
    (["generator.jacobian_clamping.weight=1"], "generator_jacobian_clamping_weight"),
    (["model=gan", "beta=2"], "model=gan does not use beta"),
    (["model=autoencoder"], "model='autoencoder' is not one of gan, vae"),
])
def test_bad_vae_configs_name_the_key(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny(tmp_path, *overrides)


def test_bernoulli_needs_binary_images(tmp_path):
    with pytest.raises(ValueError, match="bernoulli likelihood needs binary images"):
        Trainer(tiny(tmp_path, "steps=1", "vae.likelihood=bernoulli")).fit()


def test_a_study_of_vaes_draws_the_rate_distortion_plane(tmp_path):
    from fastgan.train.study import read_study, run_study

    grid = tmp_path / "grid.yaml"
    grid.write_text(f"settings: {{{', '.join(o.replace('=', ': ') for o in TINY)}, steps: 2}}\n"
                    f"out_dir: {tmp_path / 'study'}\naxes:\n  beta: [0.5, 4.0]\n")
    study = read_study(str(grid))
    assert run_study(study)
    assert (tmp_path / "study" / "rate_distortion.png").stat().st_size > 0
    table = (tmp_path / "study" / "results.md").read_text()
    assert "| rate | distortion |" in table


def test_the_evaluation_takes_each_images_terms_in_eval_mode():
    """Batch norm in the decoder couples a training batch's distortions; the evaluation uses the
    running statistics (each image its own terms, as one forward per image gives them), keeps
    the training state, and restores train mode."""
    from fastgan.train.vae_step import evaluation_rate_distortion

    torch.manual_seed(0)
    vae = VAE(16, 8, 0.25).double()
    images = torch.randint(0, 256, (7, 3, 16, 16), generator=torch.Generator().manual_seed(2)).double() / 255
    with torch.no_grad():
        for _ in range(3):  # running statistics away from their initial values
            vae(torch.rand(9, 3, 16, 16, dtype=torch.float64))
    state = copy.deepcopy(vae.state_dict())
    got = evaluation_rate_distortion(vae, images, batch_size=3, seed=11, entropy=7.0)
    assert vae.training and all(torch.equal(state[k], v) for k, v in vae.state_dict().items())
    # one image at a time, in eval mode, with the posterior noise the evaluation drew for it
    reference = copy.deepcopy(vae).eval()
    generator = torch.Generator().manual_seed(11)
    noise = torch.cat([torch.randn(chunk.shape[0], 8, generator=generator, dtype=torch.float64) for chunk in images.split(3)])
    rates, distortions = [], []
    with torch.no_grad():
        for image, eps in zip(images, noise):
            mean, log_std = reference.posterior(image[None])
            z = mean + eps * torch.exp(log_std)
            rates.append(reference(image[None]).rate)
            distortions.append(-reference.decoder_log_prob(image[None], z))
    rate, distortion = torch.cat(rates).mean().item(), torch.cat(distortions).mean().item()
    assert got == pytest.approx({"eval_rate": rate, "eval_distortion": distortion, "eval_elbo": -(rate + distortion),
                                 "eval_mi_lower_bound": 7.0 - distortion, "eval_mi_upper_bound": rate}, rel=1e-12)
    training = vae(images, torch.Generator().manual_seed(11))  # what a training batch's record holds
    assert abs(training.distortion.mean().item() - distortion) > 1e-3 * distortion


def test_a_vae_run_logs_its_evaluation_and_the_study_point_uses_it(tmp_path):
    from fastgan.train.vae_step import final_rate_distortion

    trainer = Trainer(tiny(tmp_path, "steps=5", "fid_every=2", "fid_samples=12", "fid_real_samples=12"))
    trainer.fit()
    records = metrics_records(trainer.out_dir)
    evaluated = [r for r in records if "eval_rate" in r]
    assert [r["step"] for r in evaluated] == [2, 4, 5]
    expected = trainer.evaluate_rate_distortion()
    assert evaluated[-1] == pytest.approx({"step": 5, **expected}, rel=1e-6)
    assert expected["eval_mi_lower_bound"] + expected["eval_distortion"] == pytest.approx(trainer.entropy, rel=1e-9)
    assert final_rate_distortion(records) == pytest.approx({"rate": expected["eval_rate"], "distortion": expected["eval_distortion"],
                                                            "entropy": trainer.entropy}, rel=1e-6)


def test_final_rate_distortion_averages_the_last_quarter_and_recovers_h():
    from fastgan.train.vae_step import final_rate_distortion

    logged = [{"step": s, "rate": float(s), "distortion": 100.0 - s, "mi_lower_bound": 7.0 - (100.0 - s)} for s in range(1, 9)]
    run = final_rate_distortion(logged + [{"step": 8, "fid": 3.0}])
    assert run == pytest.approx({"rate": 7.5, "distortion": 92.5, "entropy": 7.0})
    assert final_rate_distortion([{"step": 1, "fid": 2.0}]) is None


def test_the_vamp_sampler_stays_finite_far_in_the_tail_in_float32():
    """In float32 Φ(ε₁) rounds to 1 from ε₁ ≈ 5.4 on (about 3e-8 of the draws): the uniform left for ε'
    must still stay below 1, or Φ⁻¹ gives an infinite z and a NaN image."""
    torch.manual_seed(0)
    vae = VAE(image_size=8, z_dim=3, width=0.125, marginal="vamp", components=4)
    sampler = VAESampler(vae)
    first = torch.tensor([5.5, 6.0, 9.0, 40.0, -9.0, -40.0])
    eps = torch.cat([first[:, None], torch.randn(6, 2, generator=torch.Generator().manual_seed(3))], dim=1)
    z = sampler.latent(eps)
    assert torch.isfinite(z).all(), z
    assert torch.isfinite(sampler.eval()(eps)).all()
    # Far in either tail the draw is the last / first component, ε' a few standard deviations out.
    mean, log_std = vae.posterior(vae.marginal.pseudo_images.clamp(0, 1))
    standardized = (z[:, 0] - mean[[3, 3, 3, 3, 0, 0], 0]) * torch.exp(-log_std[[3, 3, 3, 3, 0, 0], 0])
    assert (standardized[:4] > 4).all() and (standardized[4:] < -4).all(), standardized


@pytest.mark.parametrize("device", DEVICES)
def test_reconstruction_pairs_take_images_of_any_dtype_and_device(device):
    """A float64 VAE and float32 images (or images on the GPU): float32 pairs on the CPU, as documented."""
    torch.manual_seed(0)
    vae = VAE(image_size=8, z_dim=3, width=0.125).double().to(device)
    real = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    images, columns = reconstruction_pairs(VAESampler(vae), real.to(device), columns=3)
    assert columns == 3 and images.dtype == torch.float32 and images.device.type == "cpu"
    expected = vae.eval().reconstruct(real.double().to(device)).float().cpu()
    assert torch.equal(images[:3], real[:3]) and torch.equal(images[3:6], expected[:3])
    assert torch.equal(images[6:8], real[3:]) and torch.equal(images[8:], expected[3:])
