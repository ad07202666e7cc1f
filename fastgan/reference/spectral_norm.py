"""Spectral normalization in plain torch: the oracle every kernel is tested against.

The weight W (any rank >= 2) is read as the matrix W_mat = W.movedim(dim, 0).flatten(1),
of shape (M, K) with M = W.size(dim): torch's convention (dim=0, or dim=1 for
ConvTranspose). The power iteration refines the left/right singular vector
estimates u (M) and v (K):

* ``u_first=True``  (torch.nn.utils.parametrizations.spectral_norm):
  u = normalize(W_mat v); v = normalize(W_matᵀ u), n times;
* ``u_first=False`` (torch.nn.utils.spectral_norm, the hook form):
  v = normalize(W_matᵀ u); u = normalize(W_mat v), n times;

with normalize(x) = x / max(‖x‖, eps). ``n_power_iterations=0`` is eval mode: u and v
are kept. Then σ = uᵀ W_mat v. The normalized weight is W / σ, differentiated
with u and v held constant.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F


def weight_matrix(weight: torch.Tensor, dim: int) -> torch.Tensor:
    if dim != 0:
        weight = weight.movedim(dim, 0)
    return weight.reshape(weight.shape[0], -1)


def power_iteration(
    weight: torch.Tensor,
    u: torch.Tensor,
    v: torch.Tensor,
    dim: int,
    n_power_iterations: int,
    eps: float,
    u_first: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (u, v, σ) after ``n_power_iterations`` steps; the inputs are not modified."""
    w = weight_matrix(weight, dim)
    u, v = u.clone(), v.clone()
    for _ in range(n_power_iterations):
        if u_first:
            u = F.normalize(torch.mv(w, v), dim=0, eps=eps)
            v = F.normalize(torch.mv(w.t(), u), dim=0, eps=eps)
        else:
            v = F.normalize(torch.mv(w.t(), u), dim=0, eps=eps)
            u = F.normalize(torch.mv(w, v), dim=0, eps=eps)
    sigma = torch.dot(u, torch.mv(w, v))
    return u, v, sigma


def power_iteration_multi(
    weights: Sequence[torch.Tensor],
    us: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    dims: Sequence[int],
    n_power_iterations: int,
    eps: float,
    u_first: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Layer-by-layer :func:`power_iteration`; returns (cat of u's, cat of v's, σ per layer)."""
    results: List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = [
        power_iteration(w, u, v, d, n_power_iterations, eps, u_first) for w, u, v, d in zip(weights, us, vs, dims)
    ]
    return (
        torch.cat([r[0] for r in results]),
        torch.cat([r[1] for r in results]),
        torch.stack([r[2] for r in results]),
    )


def normalize_weight_backward(
    grad: torch.Tensor, weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, dim: int
) -> torch.Tensor:
    """∂L/∂W for W_sn = W / σ(W), σ = uᵀ W_mat v with u, v constant:
    grad/σ − (⟨grad, W⟩ / σ²) · u vᵀ, the outer product laid out like W."""
    coeff = (grad * weight).sum() / (sigma * sigma)
    outer = torch.outer(u, v)
    if dim != 0:
        moved = list(weight.movedim(dim, 0).shape)
        outer = outer.reshape(moved).movedim(0, dim)
    else:
        outer = outer.reshape(weight.shape)
    return grad / sigma - coeff * outer
