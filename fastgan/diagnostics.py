"""Generator conditioning (Odena et al. 2018, "Is Generator Conditioning Causally Related
to GAN Performance?"): the singular values of the generator's input-output Jacobian
J(z) = ∂G(z)/∂z, per latent sample.

>>> s = fastgan.diagnostics.jacobian_singular_values(G, z)   # (B, min(n_z, n_out)), descending, float64
>>> cn = fastgan.diagnostics.condition_number(G, z)          # (B,) σ_max / σ_min
>>> fastgan.diagnostics.conditioning_summary(G, z)           # dict of floats for a training log

How it is computed: J's n_z columns J e_k are forward-mode Jacobian-vector products
(``torch.func.jvp``), many at once under ``torch.func.vmap``; each sample's J is
reduced in float64 by a QR decomposition to its n × n triangular factor R (n =
min(n_z, n_out)), whose singular values (``torch.linalg.svdvals``) are J's. This is
exact up to round-off -- no sampling, and no Gram matrix JᵀJ, whose eigenvalues would
square the condition number and lose every σ below ~1e-8 σ_max -- and costs n_z JVPs
per sample (each about two forwards of G).

Evaluation mode: an ``nn.Module`` G is put in eval mode for the call (its modes are
restored afterwards), so batch norm uses its running statistics and every sample's
Jacobian is that of G alone. In train mode batch norm couples the samples of a
batch: ∂G(z)_i/∂z_j ≠ 0 for i ≠ j, so there is no per-sample Jacobian to speak of.
A plain callable G is used as given; it must treat samples independently. A
DistributedDataParallel-wrapped G is evaluated through its module: DDP's forward
would broadcast buffers, a collective that hangs when one rank logs alone.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Dict, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

# Default JVPs per vmapped call of G: keeps one call's outputs (and the stored
# Jacobian block) near 2**24 elements, 64 MiB in float32, whatever the image size;
# the activations behind them are what chunk_size bounds on a GPU.
_DEFAULT_OUTPUT_ELEMENTS_PER_CALL = 2**24


class NonFiniteJacobian(ValueError):
    """G's Jacobian has NaN or Inf entries (a diverged G): there are no singular values."""


def check_latent(z: Tensor, where: str) -> None:
    """z must be a finite, floating-point (B, n_z) batch with B, n_z >= 1."""
    if not isinstance(z, Tensor):
        raise TypeError(f"{where}: z must be a Tensor, got {type(z).__name__}")
    if z.dim() != 2 or z.shape[0] == 0 or z.shape[1] == 0:
        raise ValueError(f"{where}: z must be a 2-D batch of latent vectors (B, n_z), got shape {tuple(z.shape)}")
    if not z.is_floating_point():
        raise TypeError(f"{where}: z must be a floating-point tensor, got dtype {z.dtype}")
    if not torch.isfinite(z).all():
        raise ValueError(f"{where}: z contains NaN or infinite values")


@contextlib.contextmanager
def eval_mode(G: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """G (if it is an ``nn.Module``) in eval mode inside the block; each submodule's mode restored after."""
    if not isinstance(G, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in G.modules()]
    G.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _jacobian_vector_products(G: Callable[[Tensor], Tensor], z: Tensor, directions: Tensor) -> Tensor:
    """J(z_i) d for every sample z_i and every row d of ``directions``: (n_directions, B, *out).
    The same direction is pushed through every sample at once, which is exact because
    G (in eval mode) treats samples independently."""

    def push(direction: Tensor) -> Tensor:
        return torch.func.jvp(G, (z,), (direction.expand_as(z),))[1]

    return torch.func.vmap(push)(directions)


def jacobian_singular_values(G: Callable[[Tensor], Tensor], z: Tensor, *, chunk_size: Optional[int] = None) -> Tensor:
    """Singular values of ∂G(z)/∂z for each sample of ``z``: a float64 tensor of shape
    (B, min(n_z, n_out)), each row in descending order (n_out = elements of one output).

    ``chunk_size`` is how many Jacobian-vector products (samples × directions) go
    through G in one vmapped call; memory grows with it (activations of that many
    forwards, and as many stored Jacobian columns). By default it keeps one call's
    outputs near 16M elements (e.g. 341 JVPs for 128×128 RGB images). Lower it if G's
    activations do not fit.

    A σ at or below max(n_z, n_out) · ε(float64) · σ_max, the decomposition's own
    round-off (torch.linalg.matrix_rank's tolerance), is returned as 0: J is
    rank-deficient there, and its condition number is infinite.

    G runs in eval mode (see the module docstring). Raises ValueError for a z that is
    not a finite 2-D batch, a G output without one entry per sample or with non-finite
    values, and a sample whose Jacobian is all zeros (G's output does not depend on z).
    """
    where = "jacobian_singular_values"
    check_latent(z, where)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{where}: chunk_size must be a positive integer, got {chunk_size!r}")
    batch, n_z = z.shape
    if isinstance(G, nn.parallel.DistributedDataParallel):
        G = G.module
    with eval_mode(G), torch.no_grad():
        probe = G(z[:1])
        if not isinstance(probe, Tensor) or probe.dim() < 1 or probe.shape[0] != 1 or probe.numel() == 0:
            shape = tuple(probe.shape) if isinstance(probe, Tensor) else type(probe).__name__
            raise ValueError(f"{where}: G must map z of shape (B, {n_z}) to a batch of B outputs; for B = 1 it returned {shape}")
        n_out = probe.numel()
        if chunk_size is None:
            chunk_size = max(1, _DEFAULT_OUTPUT_ELEMENTS_PER_CALL // n_out)
        samples_per_group = max(1, chunk_size // n_z)
        directions_per_call = min(n_z, chunk_size)
        basis = torch.eye(n_z, dtype=z.dtype, device=z.device)
        rows = []
        for start in range(0, batch, samples_per_group):
            group = z[start : start + samples_per_group]
            columns = torch.cat(
                [
                    _jacobian_vector_products(G, group, basis[k : k + directions_per_call])
                    for k in range(0, n_z, directions_per_call)
                ]
            )
            jacobian_t = columns.reshape(n_z, group.shape[0], n_out).transpose(0, 1).to(torch.float64)  # (b, n_z, n_out)
            if not torch.isfinite(jacobian_t).all():
                raise NonFiniteJacobian(f"{where}: the Jacobian of G has non-finite entries (samples {start}..{start + group.shape[0] - 1})")
            # R of a QR of the tall side, then R's singular values: the eigenvalues of JᵀJ
            # would square the condition number and lose every σ below ~1e-8 σ_max.
            tall = jacobian_t.mT if n_z <= n_out else jacobian_t
            rows.append(torch.linalg.svdvals(torch.linalg.qr(tall, mode="r").R))
    singular_values = torch.cat(rows)
    # Below the decomposition's own round-off a σ is 0 (torch.linalg.matrix_rank's tolerance)
    floor = singular_values[:, :1] * (max(n_z, n_out) * torch.finfo(torch.float64).eps)
    singular_values = torch.where(singular_values <= floor, 0.0, singular_values)
    dead = (singular_values[:, 0] == 0).nonzero().flatten().tolist()
    if dead:
        listed = ", ".join(map(str, dead[:10])) + (", ..." if len(dead) > 10 else "")
        raise ValueError(
            f"{where}: G's output does not depend on z (all-zero Jacobian) for {len(dead)} of {batch} samples ({listed})"
        )
    return singular_values


def condition_number(G: Callable[[Tensor], Tensor], z: Tensor, *, chunk_size: Optional[int] = None) -> Tensor:
    """σ_max / σ_min of ∂G(z)/∂z per sample: a float64 tensor of shape (B,); ``inf``
    where the Jacobian is rank-deficient (σ_min = 0). Arguments as :func:`jacobian_singular_values`."""
    singular_values = jacobian_singular_values(G, z, chunk_size=chunk_size)
    return singular_values[:, 0] / singular_values[:, -1]


def conditioning_summary(
    G: Callable[[Tensor], Tensor],
    z: Tensor,
    *,
    quantiles: Sequence[float] = (0.0, 0.1, 0.5, 0.9, 1.0),
    chunk_size: Optional[int] = None,
) -> Dict[str, float]:
    """Scalars for a training log (JSONL / TensorBoard), all natural logarithms:

    * ``log_condition_number_mean`` / ``_std``: mean and standard deviation over the
      batch of the log condition number of the metric tensor M_z = JᵀJ,
      log(λ_max/λ_min) = 2 log(σ_max/σ_min) -- the quantity Odena et al. plot over
      training and compare_gan logs (twice the log of :func:`condition_number`);
    * ``log_singular_value_q<P>``: the P-th percentile of log σ over every singular
      value of every sample (the spectrum; ``quantiles`` picks P; −inf where it
      reaches a σ of 0);
    * ``rank_deficient_fraction``: the share of samples with σ_min = 0 (their log-CN is
      infinite and left out of the mean and std; both are NaN if every sample is).
    """
    if not quantiles or any(not 0.0 <= q <= 1.0 for q in quantiles):
        raise ValueError(f"conditioning_summary: quantiles must be a non-empty sequence of numbers in [0, 1], got {quantiles!r}")
    singular_values = jacobian_singular_values(G, z, chunk_size=chunk_size)
    log_cn = 2 * (singular_values[:, 0].log() - singular_values[:, -1].log())
    finite = log_cn[torch.isfinite(log_cn)]
    summary = {
        "log_condition_number_mean": finite.mean().item() if finite.numel() else math.nan,
        "log_condition_number_std": finite.std(correction=0).item() if finite.numel() else math.nan,
        "rank_deficient_fraction": 1.0 - finite.numel() / log_cn.numel(),
    }
    log_spectrum = singular_values.log().flatten()
    q = torch.tensor(list(quantiles), dtype=torch.float64, device=log_spectrum.device)
    levels = torch.quantile(log_spectrum, q)
    # σ = 0 is log σ = −inf, and interpolating from −inf gives NaN (−inf + 0·inf): a percentile
    # whose lower neighbour is −inf is −inf
    levels = torch.where(torch.quantile(log_spectrum, q, interpolation="lower").isneginf(), -math.inf, levels)
    for q, value in zip(quantiles, levels.tolist()):
        summary[f"log_singular_value_q{100 * q:g}"] = value
    return summary
