"""Generator conditioning: Jacobian singular values against torch.func.jacrev +
torch.linalg.svdvals in float64 (to 1e-10 relative to σ_max), and Jacobian clamping
against its formula evaluated by hand in float64 (value and parameter gradients to 1e-10)."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import fastgan
import fastgan.diagnostics as diagnostics
from fastgan.models import build_models
from fastgan.penalties import jacobian_clamping

F64 = torch.float64


def mlp_generator(n_z, n_out, batch_norm=True):
    layers = [nn.Linear(n_z, 13)] + ([nn.BatchNorm1d(13)] if batch_norm else []) + [nn.Tanh(), nn.Linear(13, n_out), nn.Sigmoid()]
    return nn.Sequential(*layers).to(F64)


def conv_generator(n_z):
    """Linear → 3×3 seed → transposed conv (odd sizes) → BN → ReLU → conv → tanh: (B, 3, 7, 7) images."""
    return nn.Sequential(
        nn.Linear(n_z, 5 * 3 * 3), nn.Unflatten(1, (5, 3, 3)),
        nn.ConvTranspose2d(5, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1), nn.Tanh(),
    ).to(F64)


def warm_up_batch_norm(G, n_z):
    """Move the running statistics away from (0, 1), so eval mode is not the identity."""
    G.train()
    with torch.no_grad():
        for _ in range(3):
            G(torch.randn(9, n_z, dtype=F64))


def jacrev_singular_values(G, z):
    """The oracle: each sample's full Jacobian by reverse mode, then its singular values."""
    G.eval()
    return torch.stack([torch.linalg.svdvals(torch.func.jacrev(lambda x: G(x[None]).flatten())(zi)) for zi in z]).detach()


def assert_spectrum_close(got, want):
    assert got.dtype == F64 and got.shape == want.shape
    scale = want[:, :1]
    torch.testing.assert_close(got / scale, want / scale, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- singular values


@pytest.mark.parametrize(
    "make,n_z,n_out",
    [
        (lambda: mlp_generator(5, 7), 5, 7),
        (lambda: mlp_generator(7, 3), 7, 3),  # output smaller than z: min(n_z, n_out) = 3 values
        (lambda: conv_generator(6), 6, 3 * 7 * 7),
    ],
    ids=["mlp-5to7", "mlp-7to3", "conv-6to147"],
)
@pytest.mark.parametrize("chunk_size", [None, 4, 11])
def test_singular_values_match_jacrev(make, n_z, n_out, chunk_size):
    torch.manual_seed(1)
    G = make()
    warm_up_batch_norm(G, n_z)
    z = torch.randn(5, n_z, dtype=F64)
    got = diagnostics.jacobian_singular_values(G, z, chunk_size=chunk_size)
    assert got.shape == (5, min(n_z, n_out))
    assert (got[:, :-1] >= got[:, 1:]).all(), "not in descending order"
    assert_spectrum_close(got, jacrev_singular_values(G, z))


def test_one_jacobian_vector_product_per_call():
    torch.manual_seed(1)
    G = mlp_generator(5, 7)
    warm_up_batch_norm(G, 5)
    z = torch.randn(3, 5, dtype=F64)
    assert_spectrum_close(diagnostics.jacobian_singular_values(G, z, chunk_size=1), jacrev_singular_values(G, z))


def test_float32_generator_gives_float64_values_near_the_float64_ones():
    torch.manual_seed(2)
    G = conv_generator(6)
    warm_up_batch_norm(G, 6)
    z = torch.randn(3, 6, dtype=F64)
    want = jacrev_singular_values(G, z)
    got = diagnostics.jacobian_singular_values(G.float(), z.float())
    assert got.dtype == F64
    torch.testing.assert_close(got / want[:, :1], want / want[:, :1], rtol=0, atol=1e-5)


def test_fastgan_generator():
    """A fastgan model (SNDCGAN's G: batch norm, transposed convs, sigmoid) at a small size."""
    torch.manual_seed(3)
    G, _ = build_models("sndcgan", image_size=8, z_dim=9, width=0.0625)
    G = G.to(F64)
    warm_up_batch_norm(G, 9)
    z = torch.randn(2, 9, dtype=F64)
    assert_spectrum_close(diagnostics.jacobian_singular_values(G, z), jacrev_singular_values(G, z))


def test_train_mode_generator_is_evaluated_in_eval_mode_and_restored():
    """In train mode batch norm couples the samples; the per-sample Jacobian is eval mode's."""
    torch.manual_seed(4)
    G = conv_generator(6)
    warm_up_batch_norm(G, 6)
    G.train()
    G[3].eval()  # a mixed state, restored module by module
    modes = [m.training for m in G.modules()]
    running_mean = G[3].running_mean.clone()
    z = torch.randn(4, 6, dtype=F64)
    got = diagnostics.jacobian_singular_values(G, z)
    assert [m.training for m in G.modules()] == modes
    assert torch.equal(G[3].running_mean, running_mean)
    assert_spectrum_close(got, jacrev_singular_values(G, z))


def test_spectral_normalized_generator():
    """fastgan's SN layers (the grouped launch included) work under the function transforms:
    eval mode, so no power iteration, and u, v untouched."""
    torch.manual_seed(13)
    G = fastgan.nn.apply_spectral_norm(nn.Sequential(nn.Linear(4, 9), nn.ReLU(), nn.Linear(9, 6)).to(F64))
    buffers = [b.clone() for b in G.buffers()]
    z = torch.randn(3, 4, dtype=F64)
    got = diagnostics.jacobian_singular_values(G, z)
    assert all(torch.equal(a, b) for a, b in zip(G.buffers(), buffers)) and G.training
    assert_spectrum_close(got, jacrev_singular_values(G, z))


def test_ddp_generator_is_evaluated_through_its_module(tmp_path):
    """DDP's own forward broadcasts buffers (a collective): one rank logging alone would hang."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(14)
        G = mlp_generator(4, 5)
        ddp = nn.parallel.DistributedDataParallel(G)
        wrapper_calls = []
        ddp.register_forward_pre_hook(lambda *args: wrapper_calls.append(1))
        z = torch.randn(3, 4, dtype=F64)
        got = diagnostics.jacobian_singular_values(ddp, z)
        assert not wrapper_calls
        assert_spectrum_close(got, jacrev_singular_values(G, z))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_compiled_generator():
    """A torch.compile'd G (compiled in train mode) gives the eager module's eval-mode spectrum."""
    torch.manual_seed(12)
    G = mlp_generator(4, 5)
    compiled = torch.compile(G)
    compiled(torch.randn(6, 4, dtype=F64))
    z = torch.randn(3, 4, dtype=F64)
    assert_spectrum_close(diagnostics.jacobian_singular_values(compiled, z), jacrev_singular_values(G, z))


def test_condition_number_and_rank_deficiency():
    torch.manual_seed(5)
    G = mlp_generator(4, 6)
    warm_up_batch_norm(G, 4)
    z = torch.randn(3, 4, dtype=F64)
    s = diagnostics.jacobian_singular_values(G, z)
    torch.testing.assert_close(diagnostics.condition_number(G, z), s[:, 0] / s[:, -1], rtol=1e-14, atol=0)
    # z's last two coordinates are unused: σ_min = 0 exactly, CN = inf
    W = torch.randn(3, 6, dtype=F64)
    unused = lambda x: x[:, :3] @ W  # noqa: E731
    s = diagnostics.jacobian_singular_values(unused, torch.randn(2, 5, dtype=F64))
    assert (s[:, 3:] == 0).all() and (s[:, :3] > 0).all()
    assert torch.isinf(diagnostics.condition_number(unused, torch.randn(2, 5, dtype=F64))).all()


@pytest.mark.parametrize("smallest", [1e-4, 1e-7, 1e-10])
def test_ill_conditioned_jacobians_keep_their_smallest_singular_values(smallest):
    """A float64 linear G with known singular values down to 1e-10 of the largest: each σ to
    1e-6 of itself (the eigenvalues of JᵀJ lost every σ below ~1e-8 σ_max: CN 1e10 was inf)."""
    torch.manual_seed(9)
    want = torch.tensor([1.0, 0.5, 0.1, 1e-2, 1e-3, smallest], dtype=F64)
    left, _ = torch.linalg.qr(torch.randn(21, 6, dtype=F64))
    right, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64))
    W = left @ torch.diag(want) @ right.T
    z = torch.randn(3, 6, dtype=F64)
    got = diagnostics.jacobian_singular_values(lambda x: x @ W.T, z)
    torch.testing.assert_close(got, want.expand(3, 6), rtol=1e-6, atol=0)
    torch.testing.assert_close(diagnostics.condition_number(lambda x: x @ W.T, z), torch.full((3,), 1 / smallest, dtype=F64),
                               rtol=1e-6, atol=0)


def test_conditioning_summary():
    torch.manual_seed(6)
    G = mlp_generator(5, 7)
    warm_up_batch_norm(G, 5)
    z = torch.randn(8, 5, dtype=F64)
    summary = diagnostics.conditioning_summary(G, z, quantiles=(0.0, 0.5, 1.0))
    s = jacrev_singular_values(G, z)
    # the log condition number of the metric tensor JᵀJ, as Odena et al. and compare_gan take it
    jacobians = [torch.func.jacrev(lambda x: G(x[None]).flatten())(zi).detach().numpy() for zi in z]
    log_cn = torch.tensor([np.log(np.linalg.cond(j.T @ j)) for j in jacobians])
    torch.testing.assert_close(log_cn, 2 * (s[:, 0] / s[:, -1]).log(), rtol=1e-9, atol=0)
    assert set(summary) == {
        "log_condition_number_mean", "log_condition_number_std", "rank_deficient_fraction",
        "log_singular_value_q0", "log_singular_value_q50", "log_singular_value_q100",
    }
    assert all(isinstance(v, float) for v in summary.values())
    assert summary["log_condition_number_mean"] == pytest.approx(log_cn.mean().item(), rel=1e-9)
    assert summary["log_condition_number_std"] == pytest.approx(log_cn.std(correction=0).item(), rel=1e-9)
    assert summary["rank_deficient_fraction"] == 0.0
    assert summary["log_singular_value_q0"] == pytest.approx(s.min().log().item(), rel=1e-9)
    assert summary["log_singular_value_q50"] == pytest.approx(np.percentile(s.detach().log().flatten().numpy(), 50), rel=1e-9)
    assert summary["log_singular_value_q100"] == pytest.approx(s.max().log().item(), rel=1e-9)


def test_conditioning_summary_with_rank_deficient_samples():
    W = torch.randn(2, 4, dtype=F64)
    summary = diagnostics.conditioning_summary(lambda x: x[:, :2] @ W, torch.randn(3, 3, dtype=F64))
    assert summary["rank_deficient_fraction"] == 1.0 and math.isnan(summary["log_condition_number_mean"])


def test_bad_inputs_are_rejected():
    G = mlp_generator(4, 6)
    good = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"2-D batch .* got shape \(4,\)"):
        diagnostics.jacobian_singular_values(G, good[0])
    with pytest.raises(ValueError, match=r"2-D batch .* got shape \(1, 3, 4\)"):
        diagnostics.jacobian_singular_values(G, good[None])
    with pytest.raises(ValueError, match="NaN or infinite"):
        diagnostics.jacobian_singular_values(G, torch.where(good > 0, good, torch.nan))
    with pytest.raises(TypeError, match="floating-point"):
        diagnostics.jacobian_singular_values(G, torch.ones(3, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="chunk_size must be a positive integer"):
        diagnostics.jacobian_singular_values(G, good, chunk_size=0)
    constant = lambda x: torch.ones(x.shape[0], 5, dtype=x.dtype) + 0 * x.sum()  # noqa: E731
    with pytest.raises(ValueError, match=r"does not depend on z \(all-zero Jacobian\) for 3 of 3 samples"):
        diagnostics.jacobian_singular_values(constant, good)
    with pytest.raises(ValueError, match=r"batch of B outputs; for B = 1 it returned \(\)"):
        diagnostics.condition_number(lambda x: x.sum(), good)
    with pytest.raises(ValueError, match="non-finite"):
        diagnostics.jacobian_singular_values(lambda x: x.sqrt(), -good.abs() - 1)
    with pytest.raises(ValueError, match="quantiles"):
        diagnostics.conditioning_summary(G, good, quantiles=(0.5, 2.0))


# ---------------------------------------------------------------- Jacobian clamping


def clamping_by_hand(G, z, delta, lambda_min, lambda_max):
    """Algorithm 1 of Odena et al. written out: two forwards, the gain, the two hinges."""
    gain = (G(z + delta) - G(z)).flatten(1).norm(dim=1) / delta.norm(dim=1)
    return ((gain.clamp(min=lambda_max) - lambda_max) ** 2 + (gain.clamp(max=lambda_min) - lambda_min) ** 2).mean(), gain


def unit_rows(x, eps):
    return eps * x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize(
    "make",
    [
        lambda: mlp_generator(5, 7, batch_norm=False),  # no batch coupling: one concatenated forward
        lambda: mlp_generator(5, 7).train(),  # batch norm in train mode: two forwards
        lambda: mlp_generator(5, 7).eval(),  # batch norm on running statistics: one forward
    ],
    ids=["plain", "bn-train", "bn-eval"],
)
def test_jacobian_clamping_matches_the_formula(make):
    torch.manual_seed(7)
    G = make()
    z = torch.randn(9, 5, dtype=F64)
    delta = unit_rows(torch.randn(9, 5, dtype=F64), 0.3)
    _, gain = clamping_by_hand(G, z, delta, 0.0, math.inf)
    # λ's inside the observed gains, so that some samples are below, some inside and some above
    lo, hi = gain.quantile(0.3).item(), gain.quantile(0.7).item()
    expected, _ = clamping_by_hand(G, z, delta, lo, hi)
    expected_grads = torch.autograd.grad(expected, list(G.parameters()))
    got = jacobian_clamping(G, z, lambda_min=lo, lambda_max=hi, delta=delta)
    grads = torch.autograd.grad(got, list(G.parameters()))
    assert got.dim() == 0 and expected > 0
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    assert any(g.abs().sum() > 0 for g in grads)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-14)


def test_jacobian_clamping_keeps_batch_statistics_of_each_forward():
    """In train mode a concatenated forward would normalize z and z + δ together: a different
    penalty. fastgan's equals two separate forwards (each batch with its own statistics)."""
    torch.manual_seed(8)
    G = mlp_generator(5, 7).train()
    z = torch.randn(6, 5, dtype=F64)
    delta = unit_rows(torch.randn(6, 5, dtype=F64), 1.0)
    separate, _ = clamping_by_hand(G, z, delta, 1.0, 1.5)
    joint_out, joint_perturbed = G(torch.cat([z, z + delta])).split(6)
    joint_gain = (joint_perturbed - joint_out).norm(dim=1)
    joint = ((joint_gain.clamp(min=1.5) - 1.5) ** 2 + (joint_gain.clamp(max=1.0) - 1.0) ** 2).mean()
    got = jacobian_clamping(G, z, lambda_min=1.0, lambda_max=1.5, delta=delta)
    torch.testing.assert_close(got, separate, rtol=1e-12, atol=0)
    assert not torch.isclose(got, joint, rtol=1e-6)


def test_jacobian_clamping_reuses_a_given_output():
    torch.manual_seed(9)
    G = mlp_generator(4, 6).train()
    z = torch.randn(5, 4, dtype=F64)
    delta = unit_rows(torch.randn(5, 4, dtype=F64), 0.5)
    calls = []
    G.register_forward_hook(lambda *args: calls.append(1))
    output = G(z)
    got = jacobian_clamping(G, z, lambda_min=2.0, lambda_max=3.0, delta=delta, output=output)
    assert len(calls) == 2  # G(z) by the caller, G(z + δ) here
    expected, _ = clamping_by_hand(G, z, delta, 2.0, 3.0)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    got.backward()  # through both G(z) (the caller's graph) and G(z + δ)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())


def test_jacobian_clamping_draws_delta_of_norm_eps_reproducibly():
    torch.manual_seed(10)
    W = torch.randn(4, 7, dtype=F64)
    linear = lambda x: x @ W  # noqa: E731  # its gain depends on δ's direction only
    square = lambda x: x.square()  # noqa: E731  # its gain depends on δ's norm too
    z = torch.randn(6, 4, dtype=F64)
    for seed in (0, 123):
        generator = torch.Generator().manual_seed(seed)
        delta = unit_rows(torch.randn(z.shape, dtype=F64, generator=generator), 0.25)
        for G in (linear, square):
            expected, _ = clamping_by_hand(G, z, delta, 5.0, 6.0)
            by_seed = jacobian_clamping(G, z, eps=0.25, lambda_min=5.0, lambda_max=6.0, generator=seed)
            by_generator = jacobian_clamping(G, z, eps=0.25, lambda_min=5.0, lambda_max=6.0, generator=torch.Generator().manual_seed(seed))
            torch.testing.assert_close(by_seed, expected, rtol=1e-12, atol=0)
            torch.testing.assert_close(by_generator, expected, rtol=1e-12, atol=0)
    torch.manual_seed(11)
    a = jacobian_clamping(square, z, eps=0.25)
    torch.manual_seed(11)
    assert torch.equal(jacobian_clamping(square, z, eps=0.25), a)


def test_jacobian_clamping_bad_inputs():
    G = mlp_generator(4, 6)
    z = torch.randn(3, 4, dtype=F64)
    with pytest.raises(ValueError, match=r"2-D batch .* got shape \(4,\)"):
        jacobian_clamping(G, z[0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        jacobian_clamping(G, torch.full_like(z, math.nan))
    with pytest.raises(ValueError, match="eps must be a positive number"):
        jacobian_clamping(G, z, eps=0.0)
    with pytest.raises(ValueError, match="lambda_min <= lambda_max"):
        jacobian_clamping(G, z, lambda_min=3.0, lambda_max=2.0)
    with pytest.raises(ValueError, match=r"delta must match z \(\(3, 4\)"):
        jacobian_clamping(G, z, delta=torch.randn(3, 5, dtype=F64))
    with pytest.raises(ValueError, match="non-zero norm for every sample"):
        jacobian_clamping(G, z, delta=torch.cat([torch.randn(2, 4, dtype=F64), torch.zeros(1, 4, dtype=F64)]))
    with pytest.raises(TypeError, match="generator must be"):
        jacobian_clamping(G, z, generator="seed")
    with pytest.raises(ValueError, match=r"output must be a batch of 3 outputs, got \(2, 6\)"):
        jacobian_clamping(G, z, output=torch.randn(2, 6, dtype=F64))


def test_conditioning_summary_percentiles_with_zero_singular_values():
    """σ = 0 exactly (unused latent coordinates) is log σ = −inf: a percentile at or just above
    those values is −inf, not NaN (linear interpolation from −inf), and the others are unchanged."""
    W = torch.randn(3, 6, dtype=F64)
    z = torch.randn(3, 5, dtype=F64)
    G = lambda x: x[:, :3] @ W  # noqa: E731
    quantiles = (0.0, 0.1, 0.3, 0.45, 0.5, 0.77, 1.0)
    summary = diagnostics.conditioning_summary(G, z, quantiles=quantiles)
    values = np.sort(diagnostics.jacobian_singular_values(G, z).numpy().ravel())
    assert (values[:6] == 0).all() and (values[6:] > 0).all()
    logs = np.log(values[6:])
    for q in quantiles:
        position = q * (len(values) - 1)
        low = int(math.floor(position))
        if low < 6:
            expected = -math.inf
        else:
            high = min(low + 1, len(values) - 1)
            expected = logs[low - 6] + (position - low) * (logs[high - 6] - logs[low - 6])
        got = summary[f"log_singular_value_q{100 * q:g}"]
        assert got == expected or got == pytest.approx(expected, rel=1e-12, abs=0), (q, got, expected)
