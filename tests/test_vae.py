"""fastgan.models.vae: the VAE's rate and distortion terms against independent float64 computations,
the linear-Gaussian toy whose optimal rate–distortion line is known in closed form, and bad inputs."""
import functools
import math

import pytest
import torch
from scipy import stats

from fastgan.models.vae import (VAE, RateDistortion, discretized_log_prob, empirical_entropy, gaussian_log_density,
                                kl_diagonal_gaussians)


def test_analytic_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean_q, mean_p = torch.randn(2, 5, generator=g, dtype=torch.float64)
    log_std_q, log_std_p = 0.4 * torch.randn(2, 5, generator=g, dtype=torch.float64)
    analytic = kl_diagonal_gaussians(mean_q, log_std_q, mean_p, log_std_p).sum()
    z = mean_q + torch.randn(400_000, 5, generator=g, dtype=torch.float64) * log_std_q.exp()
    samples = (gaussian_log_density(z, mean_q, log_std_q) - gaussian_log_density(z, mean_p, log_std_p)).sum(1)
    standard_error = samples.std() / math.sqrt(samples.numel())
    assert abs(samples.mean() - analytic) < 4 * standard_error
    assert analytic > 0


def test_gaussian_log_density_matches_scipy():
    x, mean = torch.randn(2, 7, dtype=torch.float64)
    log_std = 0.3 * torch.randn(7, dtype=torch.float64)
    expected = stats.norm.logpdf(x.numpy(), mean.numpy(), log_std.exp().numpy())
    torch.testing.assert_close(gaussian_log_density(x, mean, log_std), torch.from_numpy(expected), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("family, scipy_dist", [("logistic", stats.logistic), ("gaussian", stats.norm)])
def test_discretized_log_prob_matches_cdf_differences_and_sums_to_one(family, scipy_dist):
    levels = 256
    values = torch.arange(levels, dtype=torch.float64) / (levels - 1)
    # Means in and beyond [0, 1], scales from a tenth of a bin to the whole range.
    mean = torch.tensor([0.013, 0.5, 0.97, 1.4, -0.3], dtype=torch.float64)[:, None]
    log_scale = torch.tensor([-8.0, -3.0, -1.0, 0.5, -5.5], dtype=torch.float64)[:, None]
    log_p = discretized_log_prob(values.expand(5, -1), mean, log_scale, family, levels)
    torch.testing.assert_close(log_p.exp().sum(1), torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-9)
    half = 0.5 / (levels - 1)
    edges = torch.cat([values - half, values[-1:] + half]).numpy()
    edges[0], edges[-1] = -math.inf, math.inf
    cdf = scipy_dist.cdf(edges[None, :], mean.numpy(), log_scale.exp().numpy())
    sf = scipy_dist.sf(edges[None, :], mean.numpy(), log_scale.exp().numpy())
    # Bin mass from the tail that does not cancel: the CDF left of the mean, the survival function right of it.
    from_cdf = torch.from_numpy(cdf[:, 1:] - cdf[:, :-1])
    from_sf = torch.from_numpy(sf[:, :-1] - sf[:, 1:])
    expected = torch.where(values < mean, from_cdf, from_sf)
    finite = expected > 1e-200
    torch.testing.assert_close(log_p[finite], expected[finite].log(), rtol=1e-7, atol=1e-9)


def test_discretized_log_prob_gradient_is_finite_at_the_edges():
    x = torch.tensor([0.0, 1.0, 0.5, 1 / 255], dtype=torch.float64)
    mean = torch.tensor([0.9, 0.1, 0.5, 0.0], dtype=torch.float64, requires_grad=True)
    log_scale = torch.full((4,), -4.0, dtype=torch.float64, requires_grad=True)
    for family in ("logistic", "gaussian"):
        discretized_log_prob(x, mean, log_scale, family).sum().backward()
        assert torch.isfinite(mean.grad).all() and torch.isfinite(log_scale.grad).all()


@pytest.mark.parametrize("likelihood", ["logistic", "gaussian", "bernoulli"])
@pytest.mark.parametrize("marginal", ["gaussian", "vamp"])
def test_vae_forward_shapes_and_bound(likelihood, marginal):
    torch.manual_seed(0)
    vae = VAE(image_size=16, z_dim=5, width=0.125, likelihood=likelihood, marginal=marginal, components=3).double()
    images = torch.randint(0, 256, (6, 3, 16, 16)).double() / 255
    if likelihood == "bernoulli":
        images = (images > 0.5).double()
    out = vae(images, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, RateDistortion)
    assert out.rate.shape == out.distortion.shape == (6,)
    assert torch.isfinite(out.rate).all() and (out.distortion > 0).all()
    if marginal == "gaussian":
        assert (out.rate >= 0).all()
    # Discrete decoders: E[D + R] ≥ H = log N for the data set's uniform distribution (6 distinct images).
    assert (out.distortion + out.rate).mean() >= empirical_entropy([1] * 6)
    out.objective(beta=0.5).backward()
    assert all(p.grad is not None for p in vae.parameters())
    assert vae.sample(4).shape == (4, 3, 16, 16)
    assert vae.reconstruct(images).shape == images.shape


def test_vamp_marginal_is_the_mean_of_the_component_posteriors():
    torch.manual_seed(0)
    vae = VAE(image_size=8, z_dim=3, width=0.125, marginal="vamp", components=4).double()
    z = torch.randn(7, 3, dtype=torch.float64)
    mean, log_std = vae.posterior(vae.marginal.pseudo_images.clamp(0, 1))
    density = torch.stack([gaussian_log_density(z, mean[k], log_std[k]).sum(1).exp() for k in range(4)]).mean(0)
    torch.testing.assert_close(vae.marginal.log_prob(z), density.log(), rtol=1e-12, atol=1e-12)


def test_vae_rejects_bad_configuration_and_inputs():
    with pytest.raises(ValueError, match="likelihood"):
        VAE(likelihood="poisson")
    with pytest.raises(ValueError, match="marginal"):
        VAE(marginal="flow")
    with pytest.raises(ValueError, match="multiple of 8"):
        VAE(image_size=20)
    vae = VAE(image_size=8, z_dim=2, width=0.125, likelihood="bernoulli")
    with pytest.raises(ValueError, match="binary"):
        vae(torch.full((2, 3, 8, 8), 0.3))
    with pytest.raises(ValueError, match="shape"):
        vae(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="at least one"):
        empirical_entropy([])


def test_the_entropy_of_a_set_with_duplicates_weighs_each_image_by_its_count():
    """10 entries, one image 8 times: the trainer draws it with probability 0.8, so H is
    −(0.8 log 0.8 + 2 · 0.1 log 0.1) = 0.639 nats, not log 3 = 1.099 (3 distinct images)."""
    assert empirical_entropy([8, 1, 1]) == pytest.approx(-(0.8 * math.log(0.8) + 0.2 * math.log(0.1)), rel=1e-12)
    assert empirical_entropy([1] * 7) == pytest.approx(math.log(7), rel=1e-12)


class LinearGaussianVAE(torch.nn.Module):
    """x ∈ R^d, e(z|x) = N(Ax, diag σ_e²), m(z) = N(μ_m, diag σ_m²), d(x|z) = N(Cz + c, diag σ_d²).

    For Gaussian data N(0, diag s²) the optimal models of every rate lie on D = H − R with
    H = Σ ½ log(2πe s_i²) (differential entropy; D is a differential cross-entropy here), and the
    β-VAE objective D + βR = H + (β − 1) R pushes R to 0 for β > 1 and up for β < 1."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.encode = torch.nn.Linear(d, k, bias=False)
        self.encoder_log_std = torch.nn.Parameter(torch.zeros(k))
        self.marginal_mean = torch.nn.Parameter(torch.zeros(k))
        self.marginal_log_std = torch.nn.Parameter(torch.zeros(k))
        self.decode = torch.nn.Linear(k, d)
        self.decoder_log_std = torch.nn.Parameter(torch.zeros(d))

    def forward(self, x, generator):
        mean = self.encode(x)
        log_std = self.encoder_log_std.expand_as(mean)
        z = mean + torch.randn(mean.shape, generator=generator, dtype=x.dtype) * log_std.exp()
        rate = kl_diagonal_gaussians(mean, log_std, self.marginal_mean, self.marginal_log_std).sum(1)
        distortion = -gaussian_log_density(x, self.decode(z), self.decoder_log_std).sum(1)
        return RateDistortion(rate, distortion)


@functools.lru_cache(maxsize=None)
def _train_linear_gaussian(beta: float, steps: int = 600):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)
    model = LinearGaussianVAE(3, 3).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(steps):
        x = torch.randn(512, 3, generator=g, dtype=torch.float64) * scales
        optimizer.zero_grad()
        model(x, g).objective(beta).backward()
        optimizer.step()
    x = torch.randn(100_000, 3, generator=g, dtype=torch.float64) * scales
    with torch.no_grad():
        out = model(x, g)
    entropy = float((0.5 * torch.log(2 * math.pi * math.e * scales**2)).sum())
    return float(out.rate.mean()), float(out.distortion.mean()), entropy


@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_linear_gaussian_training_reaches_the_optimal_rate_distortion_line(beta):
    rate, distortion, entropy = _train_linear_gaussian(beta)
    # D + R ≥ H always; trained models sit on the line D = H − R within 0.03 nats.
    assert -0.01 < rate + distortion - entropy < 0.03
    if beta > 1:
        assert rate < 0.02  # the posterior collapses onto the marginal


def test_linear_gaussian_low_beta_trades_distortion_for_rate():
    # Below β = 1 the objective H + (β − 1) R has no minimum: R keeps growing and D falling.
    rate_low, distortion_low, _ = _train_linear_gaussian(0.5)
    rate_one, distortion_one, _ = _train_linear_gaussian(1.0)
    assert rate_low > rate_one + 2.0
    assert distortion_low < distortion_one - 2.0


@pytest.mark.parametrize("likelihood", ["logistic", "gaussian"])
def test_images_outside_the_unit_range_are_refused(likelihood):
    """The discretized decoders put a probability on each of the 256 levels of [0, 1]: images scaled to
    [-1, 1] (or with NaN pixels) would get a finite but meaningless distortion (every negative pixel
    lumped into the lowest bin), so they are refused."""
    torch.manual_seed(0)
    vae = VAE(image_size=8, z_dim=2, width=0.125, likelihood=likelihood).double()
    images = torch.randint(0, 256, (3, 3, 8, 8), generator=torch.Generator().manual_seed(1)).double() / 255
    assert torch.isfinite(vae(images).distortion).all()  # 0 and 1 themselves are levels
    nan = images.clone()
    nan[1, 2, 3, 4] = math.nan
    for bad in (images * 2 - 1, images + 1 / 255, nan):
        with pytest.raises(ValueError, match=r"pixel values in \[0, 1\]"):
            vae(bad)
        with pytest.raises(ValueError, match=r"pixel values in \[0, 1\]"):
            vae.reconstruct(bad)


def test_an_empty_batch_is_refused_not_averaged_into_nan():
    vae = VAE(image_size=8, z_dim=2, width=0.125)
    with pytest.raises(ValueError, match="at least one image"):
        vae(torch.rand(0, 3, 8, 8))


def test_discretized_log_prob_refuses_an_unknown_family():
    x = torch.rand(5, dtype=torch.float64)
    for family in ("bernoulli", "logisitc"):
        with pytest.raises(ValueError, match="logistic.*gaussian"):
            discretized_log_prob(x, x, torch.zeros_like(x), family)
