"""The Dirac-GAN: the smallest GAN whose training dynamics can be drawn.

Mescheder, Geiger & Nowozin, "Which Training Methods for GANs do actually
Converge?" (ICML 2018): the real data are a point mass at x = 0, the generator is
a point mass at θ (one parameter), the discriminator's logit is linear,
D(x) = ψ·x (one parameter). The unique equilibrium is (θ, ψ) = (0, 0).

>>> game = DiracGAN(loss="ns", penalty="r1", weight=0.3)
>>> v_theta, v_psi = game.vector_field(theta, psi)        # any equal shapes
>>> path = game.simulate(1.0, 1.0, steps=500, lr=0.1)      # (501, 2): (θ, ψ) per step
>>> game.jacobian_eigenvalues()                            # at the equilibrium

The field is each player's gradient-descent direction on its own loss,
v = (−∂L_G/∂θ, −∂L_D/∂ψ), taken by autograd through the training code itself:
:mod:`fastgan.train.losses` for L_G and L_D, and
:func:`fastgan.penalties.gradient_penalty` for the penalties, added to L_D as in
training (L_D + weight · penalty). So the sign conventions are fastgan's: D wants
real logits high and fake logits low, e.g. NS: L_D = softplus(−D(0)) + softplus(D(θ)),
L_G = softplus(−D(θ)), which gives v = (ψ σ(−ψθ), −θ σ(ψθ)) (the paper's ψ is
our −ψ; the dynamics are mirror images).

Every point of a grid is its own game; the games are evaluated together as one
batch. That is exact: the losses and penalties are batch means and game i's
parameters reach only game i's rows, so N × the gradient of the batch mean w.r.t.
game i's parameters is game i's own gradient.

Regularizers (``penalty``) and what ``weight`` means for each:

* ``r1``, ``r2``, ``wgan-gp``, ``dragan``: fastgan's gradient penalties, weight λ.
  D's input gradient is ψ at every x, so where the penalty is evaluated does not
  matter here: R1 and R2 give the same field (λ/2·ψ² added to L_D), and so do
  WGAN-GP and DRAGAN (λ·(√(eps + ψ²) − center)²).
* ``consensus`` (Mescheder et al. 2017, Dirac-only): both players add γ/2·‖v‖² to
  their losses, so the field becomes v − γ∇(½‖v‖²); weight γ.
* ``instance-noise`` (Dirac-only): Gaussian noise N(0, σ²) added to real and fake
  samples; weight σ. The field is the expectation over the noise, by Gauss-Hermite
  quadrature with ``noise_nodes`` noise values (the losses at each value, weighted
  by its probability), so it is deterministic rather than a Monte-Carlo estimate.

``saturating`` is the original minimax game: NS's L_D and L_G = −L_D.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy
import torch
from torch import Tensor

from fastgan.penalties import gradient_penalty
from fastgan.reference.gradient_penalty import KINDS as GRADIENT_PENALTIES
from fastgan.train import losses
from fastgan.train.config import LOSSES as TRAINING_LOSSES

LOSSES = TRAINING_LOSSES + ("saturating",)
PENALTIES = (None,) + GRADIENT_PENALTIES + ("consensus", "instance-noise")
UPDATES = ("simultaneous", "alternating")
OPTIMIZERS = ("sgd", "momentum", "adam")

# Default weights: the paper's figure for R1/R2 (γ = 0.3), consensus (γ = 1) and
# instance noise (σ = 0.7); 0.5 for WGAN-GP/DRAGAN, whose (√(eps + ψ²) − 1)² has no
# direct counterpart there.
DEFAULT_WEIGHTS: Dict[str, float] = {
    "r1": 0.3, "r2": 0.3, "wgan-gp": 0.5, "dragan": 0.5, "consensus": 1.0, "instance-noise": 0.7,
}

Number = Union[float, int, Tensor]


def _finite_number(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class DiracGAN:
    """The Dirac-GAN with one of fastgan's losses and (optionally) one regularizer.

    ``loss``: ns | wgan | lsgan | hinge (fastgan's training losses) | saturating.
    ``penalty``: None | r1 | r2 | wgan-gp | dragan | consensus | instance-noise.
    ``weight``: the regularizer's weight (see the module docstring); None takes
    ``DEFAULT_WEIGHTS[penalty]``. ``center`` and ``eps``: as in
    :func:`fastgan.penalties.gradient_penalty` (wgan-gp, dragan). ``noise_nodes``:
    noise values per sample for instance noise. ``dtype``: of every result.
    """

    def __init__(
        self,
        loss: str = "ns",
        penalty: Optional[str] = None,
        weight: Optional[float] = None,
        *,
        center: float = 1.0,
        eps: float = 1e-4,
        noise_nodes: int = 32,
        dtype: torch.dtype = torch.float64,
    ):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if penalty == "none":
            penalty = None
        if penalty not in PENALTIES:
            names = ", ".join("none" if p is None else p for p in PENALTIES)  # as the CLI and configs spell it
            raise ValueError(f"unknown penalty {penalty!r}; choose one of {names}")
        if penalty is None:
            if weight not in (None, 0, 0.0):
                raise ValueError(f"weight={weight} has no effect without a penalty; pass penalty=... or leave weight out")
            weight = 0.0
        elif weight is None:
            weight = DEFAULT_WEIGHTS[penalty]
        weight = _finite_number(weight, "weight")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        self.loss, self.penalty, self.weight = loss, penalty, weight
        self.center = _finite_number(center, "center")
        self.eps = _finite_number(eps, "eps")
        if self.eps < 0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        self.noise_nodes = _positive_int(noise_nodes, "noise_nodes")
        self.dtype = dtype

    def __repr__(self) -> str:
        penalty = "" if self.penalty is None else f", penalty={self.penalty!r}, weight={self.weight:g}"
        return f"DiracGAN(loss={self.loss!r}{penalty})"

    # -- the field --------------------------------------------------------------------

    def _noise(self, like: Tensor) -> Tuple[Tensor, Tensor]:
        """Instance noise values and their probabilities: Gauss-Hermite quadrature for N(0, σ²)."""
        nodes, weights = numpy.polynomial.hermite.hermgauss(self.noise_nodes)
        nodes = torch.as_tensor(nodes, dtype=like.dtype, device=like.device) * (math.sqrt(2.0) * self.weight)
        return nodes, torch.as_tensor(weights / math.sqrt(math.pi), dtype=like.dtype, device=like.device)

    def _field(self, theta: Tensor, psi: Tensor, create_graph: bool) -> Tuple[Tensor, Tensor]:
        """v at flat (N,) ``theta`` and ``psi`` (which require grad); with
        ``create_graph`` the result stays differentiable w.r.t. them."""
        games = theta.shape[0]
        # Two identical samples per game rather than one: DRAGAN estimates the data's
        # std over the batch and refuses a batch of one element (the std is 0 here).
        fake_at = theta.repeat_interleave(2).unsqueeze(1)
        real_at = torch.zeros_like(fake_at)
        psi_rows = psi.repeat_interleave(2)

        def discriminator(x: Tensor) -> Tensor:
            return psi_rows * x[:, 0]

        def game_losses(noise) -> Tuple[Tensor, Tensor]:
            """(L_D, L_G) with every sample shifted by ``noise``."""
            real_logits, fake_logits = discriminator(real_at + noise), discriminator(fake_at + noise)
            if self.loss == "saturating":
                d_loss = losses.discriminator_loss("ns", real_logits, fake_logits)
                return d_loss, -d_loss
            return losses.discriminator_loss(self.loss, real_logits, fake_logits), losses.generator_loss(self.loss, fake_logits)

        if self.penalty == "instance-noise":
            nodes, probabilities = self._noise(theta)
            d_losses, g_losses = torch.func.vmap(game_losses)(nodes)
            d_loss, g_loss = probabilities @ d_losses, probabilities @ g_losses
        else:
            d_loss, g_loss = game_losses(0.0)
        if self.penalty in GRADIENT_PENALTIES:
            # A fixed seed: α and the DRAGAN noise cannot change D's (constant) input
            # gradient, and the field must not consume torch's global random stream.
            penalty = gradient_penalty(discriminator, real_at, fake_at, self.penalty, generator=0, center=self.center, eps=self.eps)
            d_loss = d_loss + self.weight * penalty
        graph = create_graph or self.penalty == "consensus"
        (g_theta,) = torch.autograd.grad(games * g_loss, theta, retain_graph=True, create_graph=graph)
        (g_psi,) = torch.autograd.grad(games * d_loss, psi, create_graph=graph)
        v_theta, v_psi = -g_theta, -g_psi
        if self.penalty == "consensus":
            half_norm = 0.5 * (v_theta.square() + v_psi.square()).sum()
            r_theta, r_psi = torch.autograd.grad(
                half_norm, (theta, psi), create_graph=create_graph, allow_unused=True, materialize_grads=True
            )
            v_theta, v_psi = v_theta - self.weight * r_theta, v_psi - self.weight * r_psi
        return v_theta, v_psi

    def _points(self, theta: Number, psi: Number, names: Tuple[str, str] = ("theta", "psi")) -> Tuple[Tensor, Tensor]:
        pair = []
        for value, name in zip((theta, psi), names):
            if isinstance(value, Tensor):
                if value.is_complex() or value.dtype == torch.bool:
                    raise ValueError(f"{name} must be a real tensor, got dtype {value.dtype}")
                tensor = value.detach().to(self.dtype)
            else:
                try:
                    tensor = torch.as_tensor(value, dtype=self.dtype)
                except (TypeError, ValueError, RuntimeError):
                    raise TypeError(f"{name} must be a number or a tensor, got {type(value).__name__}") from None
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{name} contains NaN or infinite values")
            pair.append(tensor)
        theta_t, psi_t = pair
        if theta_t.shape != psi_t.shape:
            raise ValueError(
                f"{names[0]} and {names[1]} must have the same shape, got {tuple(theta_t.shape)} and {tuple(psi_t.shape)}"
            )
        if theta_t.device != psi_t.device:
            raise ValueError(f"{names[0]} and {names[1]} must be on the same device, got {theta_t.device} and {psi_t.device}")
        return theta_t, psi_t

    def vector_field(self, theta: Number, psi: Number) -> Tuple[Tensor, Tensor]:
        """(v_θ, v_ψ) = (−∂L_G/∂θ, −∂L_D/∂ψ) at every point: numbers or tensors of the
        same shape (a grid, a batch, a scalar), returned in that shape, in ``dtype``."""
        return self._evaluate(*self._points(theta, psi))

    def _evaluate(self, theta: Tensor, psi: Tensor) -> Tuple[Tensor, Tensor]:
        """``vector_field`` without its input checks: ``simulate`` calls it, and a
        diverging run may reach inf."""
        shape = theta.shape
        if theta.numel() == 0:
            return theta.clone(), psi.clone()
        flat_theta = theta.detach().reshape(-1).requires_grad_(True)
        flat_psi = psi.detach().reshape(-1).requires_grad_(True)
        with torch.enable_grad():
            v_theta, v_psi = self._field(flat_theta, flat_psi, create_graph=False)
        return v_theta.detach().reshape(shape), v_psi.detach().reshape(shape)

    def jacobian(self, theta: float = 0.0, psi: float = 0.0) -> Tensor:
        """The 2×2 Jacobian ∂(v_θ, v_ψ)/∂(θ, ψ) at one point (by default the equilibrium),
        by autograd through the field."""
        point = torch.tensor([_finite_number(theta, "theta"), _finite_number(psi, "psi")], dtype=self.dtype)

        def field(x: Tensor) -> Tensor:
            return torch.cat(self._field(x[0:1], x[1:2], create_graph=True))

        with torch.enable_grad():
            return torch.autograd.functional.jacobian(field, point)

    def jacobian_eigenvalues(self) -> Tensor:
        """Eigenvalues (complex, 2) of the field's Jacobian at the equilibrium (0, 0).
        Local convergence of gradient descent with small steps needs negative real parts;
        purely imaginary ones (the unregularized game) mean rotation without damping."""
        return torch.linalg.eigvals(self.jacobian())

    # -- training -----------------------------------------------------------------------

    def simulate(
        self,
        theta0: Number,
        psi0: Number,
        steps: int = 500,
        lr: float = 0.1,
        update: str = "simultaneous",
        optimizer: str = "sgd",
        n_disc: int = 1,
        *,
        momentum: float = 0.9,
        betas: Tuple[float, float] = (0.9, 0.999),
    ) -> Tensor:
        """Train both players from (θ₀, ψ₀); returns the path, shape (steps + 1, *S, 2)
        with S the shape of θ₀ (so (steps + 1, 2) from two numbers): row k holds
        (θ, ψ) after k generator updates.

        ``update="simultaneous"``: both players step from the same point.
        ``update="alternating"``: ``n_disc`` discriminator steps, then one generator
        step at the updated ψ (the order of fastgan's trainer).
        ``optimizer``: sgd | momentum (heavy ball, ``momentum``) | adam (``betas``);
        each player has its own optimizer state, learning rate ``lr`` for both
        (torch.optim's update rules). A run that diverges ends in inf or nan, as
        training would; it is not stopped.
        """
        steps = _positive_int(steps, "steps")
        n_disc = _positive_int(n_disc, "n_disc")
        lr = _finite_number(lr, "lr")
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if update not in UPDATES:
            raise ValueError(f"unknown update {update!r}; choose one of {', '.join(UPDATES)}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if optimizer == "momentum" and not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1) (torch.optim.SGD's heavy ball), got {momentum}")
        if update == "simultaneous" and n_disc != 1:
            raise ValueError(f"n_disc={n_disc} needs update='alternating' (simultaneous steps move both players at once)")
        theta, psi = self._points(theta0, psi0, ("theta0", "psi0"))
        theta, psi = theta.clone(), psi.clone()

        def make(parameter: Tensor) -> torch.optim.Optimizer:
            if optimizer == "sgd":
                return torch.optim.SGD([parameter], lr=lr)
            if optimizer == "momentum":
                return torch.optim.SGD([parameter], lr=lr, momentum=momentum)
            return torch.optim.Adam([parameter], lr=lr, betas=betas)

        g_opt, d_opt = make(theta), make(psi)

        def step(opt: torch.optim.Optimizer, parameter: Tensor, velocity: Tensor) -> None:
            parameter.grad = -velocity  # the optimizers descend; v is already the descent direction
            opt.step()

        path = [torch.stack((theta, psi), -1)]
        for _ in range(steps):
            if update == "simultaneous":
                v_theta, v_psi = self._evaluate(theta, psi)
                step(g_opt, theta, v_theta)
                step(d_opt, psi, v_psi)
            else:
                for _ in range(n_disc):
                    step(d_opt, psi, self._evaluate(theta, psi)[1])
                step(g_opt, theta, self._evaluate(theta, psi)[0])
            path.append(torch.stack((theta, psi), -1))
        return torch.stack(path)


# -- pictures -------------------------------------------------------------------------

def _label(game: DiracGAN) -> str:
    name = {"ns": "NS", "saturating": "saturating", "wgan": "WGAN", "lsgan": "LSGAN", "hinge": "hinge"}[game.loss]
    if game.penalty is None:
        return f"{name}, unregularized"
    symbol = {"consensus": "γ", "instance-noise": "σ"}.get(game.penalty, "λ")
    return f"{name} + {game.penalty} ({symbol}={game.weight:g})"


def draw_dynamics(
    game: DiracGAN,
    ax,
    start: Tuple[float, float] = (1.0, 1.0),
    steps: int = 500,
    lr: float = 0.1,
    optimizer: str = "sgd",
    n_disc: int = 1,
    extent: float = 2.0,
    grid: int = 30,
    legend: bool = True,
) -> Dict[str, Tensor]:
    """Draw the field's streamlines over [−extent, extent]² and the simultaneous and
    alternating trajectories from ``start`` on a matplotlib Axes; returns the paths."""
    extent = _finite_number(extent, "extent")
    if extent <= 0:
        raise ValueError(f"extent must be > 0, got {extent}")
    if _positive_int(grid, "grid") < 2:
        raise ValueError(f"grid must be >= 2 points per axis, got {grid}")
    axis = torch.linspace(-extent, extent, grid, dtype=game.dtype)
    psi_grid, theta_grid = torch.meshgrid(axis, axis, indexing="ij")  # rows: ψ (y), columns: θ (x)
    v_theta, v_psi = game.vector_field(theta_grid, psi_grid)
    ax.streamplot(axis.numpy(), axis.numpy(), v_theta.numpy(), v_psi.numpy(), color="0.6",
                  density=0.9, linewidth=0.6, arrowsize=0.7)
    paths = {}
    for update, color in (("simultaneous", "tab:red"), ("alternating", "tab:blue")):
        path = game.simulate(start[0], start[1], steps, lr, update, optimizer, n_disc if update == "alternating" else 1)
        paths[update] = path
        ax.plot(path[:, 0].numpy(), path[:, 1].numpy(), color=color, linewidth=1.2, label=update)
    ax.plot([start[0]], [start[1]], "o", color="black", markersize=3)
    ax.plot([0.0], [0.0], "*", color="tab:green", markersize=9, label="equilibrium")
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")
    ax.set_xlabel("θ (generator)")
    ax.set_ylabel("ψ (discriminator)")
    ax.set_title(_label(game), fontsize=9)
    if legend:
        ax.legend(loc="lower left", fontsize=7, framealpha=0.8)
    return paths


def _save(figure, out) -> None:
    """Save ``figure`` in the format of ``out``'s suffix (PNG when there is none). PNGs
    are stored with a 256-colour palette: line plots need no more, and the file is a
    third of the size."""
    import io
    from pathlib import Path

    from PIL import Image

    from fastgan.files import atomic_file, save_figure

    path = Path(out)
    if path.suffix.lstrip(".").lower() not in ("", "png"):
        save_figure(figure, path, dpi=figure.dpi)
        return
    with atomic_file(path) as partial:
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=figure.dpi)
        with Image.open(buffer) as image:
            image.convert("RGB").quantize(256).save(partial, format="PNG", optimize=True)


def save_dynamics_figure(game: DiracGAN, out, **draw_options) -> Dict[str, Tensor]:
    """One panel (``draw_dynamics``) saved to ``out`` (format from the suffix, e.g. .png)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.4, 4.4), dpi=100, layout="constrained")
    paths = draw_dynamics(game, figure.add_subplot(), **draw_options)
    _save(figure, out)
    return paths


GRID_PENALTIES: Tuple[Optional[str], ...] = (None, "r1", "wgan-gp", "consensus", "instance-noise")


def save_grid_figure(
    out,
    loss_names: Sequence[str] = LOSSES,
    penalty_names: Sequence[Optional[str]] = GRID_PENALTIES,
    progress: bool = False,
    **draw_options,
) -> None:
    """The paper-style panel: one ``draw_dynamics`` per loss (rows) × regularizer
    (columns, default weights). R2 and DRAGAN are left out by default: here they
    draw the same field as R1 and WGAN-GP. ``progress``: a bar of the panels drawn, on stderr."""
    import sys

    from matplotlib.figure import Figure
    from tqdm import tqdm

    if not loss_names or not penalty_names:
        raise ValueError("the grid needs at least one loss and one regularizer (None or 'none' for no regularizer)")
    games = [[DiracGAN(loss, penalty) for penalty in penalty_names] for loss in loss_names]
    figure = Figure(figsize=(2.6 * len(penalty_names), 2.6 * len(loss_names)), dpi=80, layout="constrained")
    axes = figure.subplots(len(loss_names), len(penalty_names), squeeze=False)
    with tqdm(total=len(loss_names) * len(penalty_names), desc="Dirac-GAN panels", unit="panel", file=sys.stderr,
              disable=not progress, leave=False) as bar:
        for i, row in enumerate(games):
            for j, game in enumerate(row):
                ax = axes[i][j]
                draw_dynamics(game, ax, legend=(i == 0 and j == 0), **draw_options)
                ax.set_xlabel("θ" if i == len(games) - 1 else "")
                ax.set_ylabel("ψ" if j == 0 else "")
                bar.update()
    _save(figure, out)


__all__ = [
    "DiracGAN", "LOSSES", "PENALTIES", "UPDATES", "OPTIMIZERS", "DEFAULT_WEIGHTS", "GRID_PENALTIES",
    "draw_dynamics", "save_dynamics_figure", "save_grid_figure",
]
