"""fastgan.dynamics: the Dirac-GAN field against closed forms derived by hand, the
Jacobian's eigenvalues at the equilibrium, the convergence claims of Mescheder et al.
(ICML 2018), input checks, and the ``dirac`` command.

Conventions (fastgan's losses): D(x) = ψx, real data at 0, fake at θ, so the real
logit is 0 and the fake logit is t = ψθ; v = (−∂L_G/∂θ, −∂L_D/∂ψ); σ is the sigmoid.
"""
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import integrate, special

from fastgan.__main__ import main
from fastgan.dynamics import LOSSES, PENALTIES, DiracGAN, save_grid_figure

sig = torch.sigmoid

# The unregularized field near (0, 0) is v ≈ (aψ, −aθ): eigenvalues ±ia.
#   ns:         L_G = softplus(−t)          → v_θ = ψσ(−t);  L_D = log 2 + softplus(t) → v_ψ = −θσ(t);   a = σ(0) = ½
#   saturating: L_G = −L_D                  → v_θ = ψσ(t);   v_ψ as ns;                                     a = ½
#   wgan:       L_G = −t, L_D = t           → v = (ψ, −θ);                                                  a = 1
#   hinge:      L_G = −t, L_D = 1 + relu(1 + t) → v = (ψ, −θ·[t > −1]);                                     a = 1
#   lsgan:      L_G = ½(σ(t) − 1)², L_D = ½[(σ(0) − 1)² + σ(t)²], with σ' = σ(t)σ(−t):
#               v_θ = ψσ(t)σ(−t)², v_ψ = −θσ(t)²σ(−t);                                                      a = σ(0)³ = ⅛
RATE = {"ns": 0.5, "saturating": 0.5, "wgan": 1.0, "hinge": 1.0, "lsgan": 0.125}
# −∂²L_D/∂ψ² at (0, 0) per unit noise variance, for instance noise: E[ε²]·(ℓ_real''(0) + ℓ_fake''(0))
# with ℓ the per-sample D losses: softplus'' (0) = ¼ twice for ns and saturating; for lsgan
# d²/dx² ½(σ(x) − 1)² = σ'² + (σ − 1)σ'' = 1/16 at 0, the same for ½σ(y)²; zero for the linear ones.
NOISE_CURVATURE = {"ns": 0.5, "saturating": 0.5, "wgan": 0.0, "hinge": 0.0, "lsgan": 0.125}


def closed_form(loss, theta, psi):
    t = psi * theta
    if loss == "ns":
        return psi * sig(-t), -theta * sig(t)
    if loss == "saturating":
        return psi * sig(t), -theta * sig(t)
    if loss == "wgan":
        return psi, -theta
    if loss == "hinge":
        return psi, -theta * (t > -1).to(theta.dtype)
    return psi * sig(t) * sig(-t) ** 2, -theta * sig(t) ** 2 * sig(-t)


def random_points(shape, scale=2.0):
    return scale * (2 * torch.rand(shape, dtype=torch.float64) - 1), scale * (2 * torch.rand(shape, dtype=torch.float64) - 1)


def eigenvalues(matrix):
    return torch.linalg.eigvals(torch.tensor(matrix, dtype=torch.float64))


def sorted_complex(values):
    values = values.to(torch.complex128) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.complex128)
    return values[torch.argsort(values.imag * 1e6 + values.real)]


def assert_eigenvalues(game, expected):
    torch.testing.assert_close(sorted_complex(game.jacobian_eigenvalues()), sorted_complex(expected), rtol=1e-9, atol=1e-12)


# -- the field against closed forms ------------------------------------------------------

@pytest.mark.parametrize("loss", LOSSES)
def test_unregularized_field_matches_closed_form(loss):
    theta, psi = random_points((7, 5))
    v_theta, v_psi = DiracGAN(loss).vector_field(theta, psi)
    e_theta, e_psi = closed_form(loss, theta, psi)
    assert v_theta.shape == (7, 5) and v_theta.dtype == torch.float64
    torch.testing.assert_close(v_theta, e_theta, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v_psi, e_psi, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["r1", "r2", "wgan-gp", "dragan"])
@pytest.mark.parametrize("loss", ["ns", "hinge"])
def test_gradient_penalty_field_matches_closed_form(kind, loss):
    """∇_x D = ψ everywhere, so R1 = R2 = ½ψ² and WGAN-GP = DRAGAN = (√(eps + ψ²) − c)²,
    added to L_D with the weight as in training: v_ψ gains −λ·∂penalty/∂ψ."""
    theta, psi = random_points((3, 11))
    weight, center, eps = 0.37, 0.8, 1e-3
    v_theta, v_psi = DiracGAN(loss, kind, weight, center=center, eps=eps).vector_field(theta, psi)
    e_theta, e_psi = closed_form(loss, theta, psi)
    if kind in ("r1", "r2"):
        e_psi = e_psi - weight * psi
    else:
        slope = torch.sqrt(eps + psi**2)
        e_psi = e_psi - weight * 2 * (slope - center) * psi / slope
    torch.testing.assert_close(v_theta, e_theta, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v_psi, e_psi, rtol=1e-12, atol=1e-14)


def test_consensus_field_matches_closed_form():
    """Consensus: v − γ ∇(½‖v‖²) with ∇(½‖v‖²) = J(v)ᵀ v, J from the closed-form NS field
    (s = σ(t), r = σ(−t), s' = sr)."""
    theta, psi = random_points((9,))
    gamma = 0.6
    v_theta, v_psi = DiracGAN("ns", "consensus", gamma).vector_field(theta, psi)
    t = psi * theta
    s, r = sig(t), sig(-t)
    a, b = psi * r, -theta * s
    da_dtheta, da_dpsi = -psi**2 * s * r, r - t * s * r
    db_dtheta, db_dpsi = -s - t * s * r, -theta**2 * s * r
    torch.testing.assert_close(v_theta, a - gamma * (a * da_dtheta + b * db_dtheta), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(v_psi, b - gamma * (a * da_dpsi + b * db_dpsi), rtol=1e-12, atol=1e-14)
    # WGAN: ½‖v‖² = ½(θ² + ψ²)
    w_theta, w_psi = DiracGAN("wgan", "consensus", gamma).vector_field(theta, psi)
    torch.testing.assert_close(w_theta, psi - gamma * theta, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w_psi, -theta - gamma * psi, rtol=1e-12, atol=1e-14)


def test_instance_noise_field_is_the_expectation_over_the_noise():
    """NS with ε ~ N(0, σ²) on real and fake samples, against scipy's adaptive quadrature:
    v_θ = ψ E σ(−ψ(θ + ε)), v_ψ = E[ε σ(−ψε)] − E[(θ + ε) σ(ψ(θ + ε))]."""
    std = 0.55
    theta, psi = random_points((4,), 1.5)
    v_theta, v_psi = DiracGAN("ns", "instance-noise", std).vector_field(theta, psi)
    density = lambda e: math.exp(-0.5 * (e / std) ** 2) / (std * math.sqrt(2 * math.pi))  # noqa: E731
    for i, (a, b) in enumerate(zip(theta.tolist(), psi.tolist())):
        e_theta = integrate.quad(lambda e: b * special.expit(-b * (a + e)) * density(e), -np.inf, np.inf, epsabs=1e-13)[0]
        e_psi = integrate.quad(lambda e: (e * special.expit(-b * e) - (a + e) * special.expit(b * (a + e))) * density(e),
                               -np.inf, np.inf, epsabs=1e-13)[0]
        assert abs(v_theta[i].item() - e_theta) < 1e-9 and abs(v_psi[i].item() - e_psi) < 1e-9


def test_r1_equals_r2_and_wgan_gp_equals_dragan():
    theta, psi = random_points((6, 6))
    for a, b in (("r1", "r2"), ("wgan-gp", "dragan")):
        for first, second in zip(DiracGAN("ns", a).vector_field(theta, psi), DiracGAN("ns", b).vector_field(theta, psi)):
            torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_field_accepts_numbers_grids_and_other_dtypes():
    game = DiracGAN("ns", "r1", 0.3)
    v_theta, v_psi = game.vector_field(0.4, -1.3)
    assert v_theta.shape == () and v_theta.dtype == torch.float64
    e_theta, e_psi = closed_form("ns", torch.tensor(0.4, dtype=torch.float64), torch.tensor(-1.3, dtype=torch.float64))
    torch.testing.assert_close(v_psi, e_psi - 0.3 * -1.3)
    grid = torch.meshgrid(torch.linspace(-2, 2, 31), torch.linspace(-2, 2, 29), indexing="ij")
    assert game.vector_field(*grid)[0].shape == (31, 29)
    single = DiracGAN("ns", "r1", 0.3, dtype=torch.float32).vector_field(*random_points((5,)))
    assert single[0].dtype == torch.float32
    theta = torch.tensor([0.5, 1.0], dtype=torch.float64)
    game.vector_field(theta, theta.clone())
    assert not theta.requires_grad  # the caller's tensors are left alone


def test_bad_inputs_are_rejected_clearly():
    with pytest.raises(ValueError, match="unknown loss 'gan'.*ns, wgan, lsgan, hinge, saturating"):
        DiracGAN("gan")
    with pytest.raises(ValueError, match="unknown penalty 'r3'"):
        DiracGAN("ns", "r3")
    with pytest.raises(ValueError, match="weight must be >= 0"):
        DiracGAN("ns", "r1", -1.0)
    with pytest.raises(ValueError, match="no effect without a penalty"):
        DiracGAN("ns", None, 0.3)
    game = DiracGAN()
    with pytest.raises(ValueError, match=r"same shape, got \(3,\) and \(2,\)"):
        game.vector_field(torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="psi contains NaN"):
        game.vector_field(torch.zeros(2), torch.tensor([0.0, float("nan")]))
    with pytest.raises(TypeError, match="theta must be a number or a tensor"):
        game.vector_field("a", 0.0)


# -- eigenvalues of the Jacobian at the equilibrium ------------------------------------

@pytest.mark.parametrize("loss", LOSSES)
def test_unregularized_eigenvalues_are_imaginary(loss):
    a = RATE[loss]
    assert_eigenvalues(DiracGAN(loss), [complex(0, a), complex(0, -a)])


@pytest.mark.parametrize("weight", [0.3, 1.0, 2.5])
@pytest.mark.parametrize("loss", LOSSES)
def test_r1_eigenvalues(loss, weight):
    """fastgan's R1 is ½ E‖∇D‖², weighted λ: v_ψ gains −λψ, J = [[0, a], [−a, −λ]],
    eigenvalues (−λ ± √(λ² − 4a²))/2; for NS (a = ½) Mescheder's (−γ ± √(γ² − 1))/2, γ = λ."""
    a = RATE[loss]
    root = complex(weight**2 - 4 * a * a) ** 0.5
    assert_eigenvalues(DiracGAN(loss, "r1", weight), [(-weight + root) / 2, (-weight - root) / 2])


@pytest.mark.parametrize("loss", LOSSES)
def test_consensus_and_instance_noise_eigenvalues(loss):
    """Consensus: the linearization of J(v)ᵀv at 0 is a²·x, so the eigenvalues are −γa² ± ia.
    Instance noise: J = [[0, a], [−a, −σ²c]] with c the loss's curvature (NOISE_CURVATURE)."""
    a, gamma, std = RATE[loss], 0.8, 0.7
    assert_eigenvalues(DiracGAN(loss, "consensus", gamma), [complex(-gamma * a * a, a), complex(-gamma * a * a, -a)])
    assert_eigenvalues(DiracGAN(loss, "instance-noise", std), eigenvalues([[0, a], [-a, -std**2 * NOISE_CURVATURE[loss]]]))


def test_wgan_gp_equilibrium_repels():
    """WGAN-GP pushes |ψ| towards the center: at ψ = 0 the penalty's curvature is
    2(√eps − c)/√eps < 0, so the Jacobian has an eigenvalue with a positive real part."""
    weight, eps = 0.5, 1e-4
    curvature = 2 * (math.sqrt(eps) - 1.0) / math.sqrt(eps)
    game = DiracGAN("wgan", "wgan-gp", weight, eps=eps)
    assert_eigenvalues(game, eigenvalues([[0, 1], [-1, -weight * curvature]]))
    assert game.jacobian_eigenvalues().real.max() > 1


# -- the paper's claims -----------------------------------------------------------------

@pytest.mark.parametrize("loss", LOSSES)
def test_simultaneous_gd_moves_away_from_the_equilibrium(loss):
    """Near (0, 0) a simultaneous step multiplies the distance by √(1 + lr²a²) > 1
    (the linearized step is I + lr·J with J = a·rotation)."""
    lr, steps, a = 0.3, 60, RATE[loss]
    angle = 2 * math.pi * torch.rand(4, dtype=torch.float64)
    path = DiracGAN(loss).simulate(1e-6 * angle.cos(), 1e-6 * angle.sin(), steps=steps, lr=lr)
    ratio = path[-1].norm(dim=-1) / path[0].norm(dim=-1)
    torch.testing.assert_close(ratio, torch.full_like(ratio, (1 + lr * lr * a * a) ** (steps / 2)), rtol=1e-6, atol=0)


@pytest.mark.parametrize("loss", ["saturating", "wgan"])
def test_simultaneous_gd_diverges_for_the_minimax_and_wgan_games(loss):
    """For these two games x·v = 0 everywhere (the continuous flow keeps ‖x‖), so every
    simultaneous step adds exactly lr²‖v‖² to ‖x‖²: the distance grows at every step."""
    lr = 0.2
    game = DiracGAN(loss)
    path = game.simulate(1.0, 1.0, steps=80, lr=lr)
    v_theta, v_psi = game.vector_field(path[:-1, 0], path[:-1, 1])
    squared = path.square().sum(-1)
    torch.testing.assert_close(squared[1:], squared[:-1] + lr**2 * (v_theta**2 + v_psi**2), rtol=1e-12, atol=0)
    assert (squared[1:] > squared[:-1]).all()
    if loss == "wgan":
        torch.testing.assert_close(squared, 2 * (1 + lr**2) ** torch.arange(81, dtype=torch.float64), rtol=1e-12, atol=0)


def test_alternating_gd_circles_without_converging():
    """With J = a·rotation, a D step ψ' = ψ − lr·aθ then a G step θ' = θ + lr·aψ' conserve
    Q = θ² + ψ² − lr·a·θψ: the iterates stay on one ellipse for ever. Exact for WGAN (a = 1);
    for NS (a = ½) near the equilibrium, where the field is linear, while R1 with the same
    steps converges."""
    lr = 0.3
    theta0, psi0 = random_points((3,))
    path = DiracGAN("wgan").simulate(theta0, psi0, steps=150, lr=lr, update="alternating")
    q = path[..., 0] ** 2 + path[..., 1] ** 2 - lr * path[..., 0] * path[..., 1]
    torch.testing.assert_close(q, q[:1].expand_as(q), rtol=1e-11, atol=0)

    lr = 0.5
    start = (torch.tensor([1e-4, 0.0], dtype=torch.float64), torch.tensor([0.0, 1e-4], dtype=torch.float64))
    plain = DiracGAN("ns").simulate(*start, steps=150, lr=lr, update="alternating")
    q = plain[..., 0] ** 2 + plain[..., 1] ** 2 - lr * 0.5 * plain[..., 0] * plain[..., 1]
    torch.testing.assert_close(q, q[:1].expand_as(q), rtol=1e-6, atol=0)
    regularized = DiracGAN("ns", "r1", 0.3).simulate(*start, steps=150, lr=lr, update="alternating")
    assert (regularized[-1].norm(dim=-1) < 1e-4 * regularized[0].norm(dim=-1)).all()


@pytest.mark.parametrize("penalty,update", [("r1", "simultaneous"), ("r1", "alternating"), ("r2", "simultaneous"),
                                            ("consensus", "simultaneous"), ("instance-noise", "simultaneous")])
def test_regularizers_converge_for_small_lr(penalty, update):
    """From (1, 1) with lr = 0.5 (below each one's linear stability limit 2|Re λ|/|λ|²):
    the distance to the equilibrium shrinks more than 100-fold in 200 steps."""
    path = DiracGAN("ns", penalty, noise_nodes=16).simulate(1.0, 1.0, steps=200, lr=0.5, update=update)
    distance = path.norm(dim=-1)
    assert distance[-1] < distance[0] / 100


def test_r1_with_too_large_lr_moves_away():
    """Simultaneous steps are locally stable only where |1 + lr·λ| < 1 for both eigenvalues λ.
    With R1 (λ = 0.3) at lr = 1.5 that fails: near the equilibrium the iterates follow the
    linearized map x_k = (I + lr·J)^k x_0 away from it."""
    game, lr, steps = DiracGAN("ns", "r1", 0.3), 1.5, 40
    assert (1 + lr * game.jacobian_eigenvalues()).abs().min() > 1
    start = torch.tensor([1e-8, -2e-8], dtype=torch.float64)
    path = game.simulate(start[0], start[1], steps=steps, lr=lr)
    step = torch.eye(2, dtype=torch.float64) + lr * game.jacobian()
    torch.testing.assert_close(path[-1], torch.linalg.matrix_power(step, steps) @ start, rtol=1e-6, atol=0)
    assert path[-1].norm() > 5 * path[0].norm()


@pytest.mark.parametrize("n_disc", [1, 5])
def test_wgan_gp_does_not_converge_with_finite_discriminator_steps(n_disc):
    """WGAN-GP keeps |ψ| near the center, so G keeps moving at speed ~lr·|ψ| and overshoots
    θ = 0: the iterates oscillate at distance ~1 from (0, 0), with 1 or 5 D steps per G step."""
    path = DiracGAN("wgan", "wgan-gp").simulate(1.0, 1.0, steps=80, lr=0.1, update="alternating", n_disc=n_disc)
    tail = path[40:]
    assert tail.norm(dim=-1).min() > 0.5
    assert tail[:, 0].max() > 0.5 and tail[:, 0].min() < -0.5  # the generator swings across the data


def test_momentum_helps_a_little_then_diverges():
    """Heavy ball (torch.optim.SGD momentum β) on NS + R1, lr = 0.1, simultaneous steps. The
    linearized iteration x' = x + lr·Jx + β(x − x_prev) is stable iff the companion matrix
    [[(1 + β)I + lr·J, −βI], [I, 0]] has spectral radius < 1: β = 0.5 converges (faster than
    plain SGD), β = 0.9 diverges. Without a regularizer (alternating, WGAN) β = 0.5 turns the
    cycle into divergence."""
    game, lr = DiracGAN("ns", "r1", 0.3), 0.1
    jacobian = game.jacobian()

    def radius(beta):
        eye = torch.eye(2, dtype=torch.float64)
        top = torch.cat(((1 + beta) * eye + lr * jacobian, -beta * eye), 1)
        return torch.linalg.eigvals(torch.cat((top, torch.cat((eye, 0 * eye), 1)))).abs().max().item()

    assert radius(0.5) < radius(0.0) < 1 < radius(0.9)
    sgd = game.simulate(1.0, 1.0, steps=300, lr=lr)[-1].norm()
    half = game.simulate(1.0, 1.0, steps=300, lr=lr, optimizer="momentum", momentum=0.5)[-1].norm()
    heavy = game.simulate(1.0, 1.0, steps=300, lr=lr, optimizer="momentum", momentum=0.9)[-1].norm()
    assert half < sgd < math.sqrt(2) / 50
    assert heavy > 1e3
    cycle = DiracGAN("wgan").simulate(1.0, 1.0, steps=100, lr=lr, update="alternating", optimizer="momentum", momentum=0.5)
    assert cycle[-1].norm() > 10 * cycle[0].norm()


# -- simulate: shapes, options and checks -------------------------------------------------

def test_simulate_shapes_and_determinism():
    game = DiracGAN("ns", "wgan-gp")
    rng_state = torch.random.get_rng_state()
    path = game.simulate(1.0, -0.5, steps=7, lr=0.1)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the penalty's draws use their own seed
    assert path.shape == (8, 2) and path.dtype == torch.float64
    assert path[0].tolist() == [1.0, -0.5]
    theta0 = torch.tensor([[0.5, 1.0, -1.0]], dtype=torch.float64)
    batched = game.simulate(theta0, torch.full_like(theta0, -0.5), steps=7, lr=0.1)
    assert batched.shape == (8, 1, 3, 2)
    torch.testing.assert_close(batched[:, 0, 1], path, rtol=0, atol=0)  # each start is its own game
    assert theta0.tolist() == [[0.5, 1.0, -1.0]]
    adam = game.simulate(1.0, -0.5, steps=7, lr=0.1, update="alternating", optimizer="adam", n_disc=3)
    assert adam.shape == (8, 2) and torch.isfinite(adam).all()
    # a diverging run overflows and goes on, like training would
    diverged = DiracGAN("ns", "wgan-gp").simulate(1.0, 1.0, steps=60, lr=1e3)
    assert torch.isfinite(diverged[:2]).all() and not torch.isfinite(diverged[-1]).any()


def test_simulate_rejects_bad_options():
    game = DiracGAN()
    for kwargs, message in [
        (dict(lr=0.0), "lr must be > 0"),
        (dict(lr=-1.0), "lr must be > 0"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(steps=2.5), "steps must be a positive integer"),
        (dict(update="sequential"), "unknown update 'sequential'"),
        (dict(optimizer="rmsprop"), "unknown optimizer 'rmsprop'"),
        (dict(n_disc=5), "n_disc=5 needs update='alternating'"),
        (dict(update="alternating", n_disc=0), "n_disc must be a positive integer"),
        (dict(optimizer="momentum", momentum=1.0), r"momentum must be in \[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            game.simulate(1.0, 1.0, **kwargs)
    with pytest.raises(ValueError, match="theta0 and psi0 must have the same shape"):
        game.simulate(torch.zeros(2), torch.zeros(3))


# -- pictures and the command line --------------------------------------------------------

def test_dirac_command_draws_and_reports(tmp_path, capsys):
    out = tmp_path / "dirac.png"
    assert main(["dirac", "--loss", "ns", "--penalty", "r1", "--weight", "0.3", "--steps", "30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "-0.15+0.477j" in printed and "simultaneous" in printed and "alternating" in printed
    with Image.open(out) as image:
        assert image.format == "PNG" and min(image.size) > 200


def test_dirac_command_errors(tmp_path, capsys):
    out = str(tmp_path / "x.png")
    for argv, message in [
        (["--loss", "gan"], "unknown loss 'gan'"),
        (["--penalty", "l2"], "unknown penalty 'l2'"),
        (["--lr", "0"], "lr must be > 0"),
        (["--steps", "-3"], "steps must be a positive integer"),
        (["--extent", "0"], "extent must be > 0"),
    ]:
        assert main(["dirac", *argv, "--out", out]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_dirac_checks_its_output_format_before_drawing(tmp_path, capsys, monkeypatch):
    """A grid takes a minute; a format matplotlib cannot write used to fail only after it."""
    from fastgan import dynamics

    monkeypatch.setattr(dynamics, "draw_dynamics", lambda *args, **kwargs: pytest.fail("drew before checking --out"))
    assert main(["dirac", "--grid", "--losses", "ns", "--out", str(tmp_path / "grid.xyz")]) == 1
    assert "grid.xyz: matplotlib writes no .xyz files" in capsys.readouterr().err


def test_dirac_help_names_every_loss_and_penalty(capsys):
    with pytest.raises(SystemExit):
        main(["dirac", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in LOSSES + tuple(p for p in PENALTIES if p):
        assert name in text
    assert "--grid" in text and "--weight" in text


def test_grid_figure(tmp_path, capsys):
    out = tmp_path / "grid.png"
    save_grid_figure(out, loss_names=("ns", "wgan"), penalty_names=(None, "r1"), steps=10, lr=0.1, grid=12)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 300
    assert capsys.readouterr().err == ""  # a library call is quiet; the `dirac --grid` command shows its panels
    save_grid_figure(out, loss_names=("ns",), penalty_names=(None,), progress=True, steps=10, lr=0.1, grid=12)
    assert "Dirac-GAN panels" in capsys.readouterr().err
