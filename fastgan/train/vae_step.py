"""Training a β-VAE (``model: vae``) with the GAN trainer's loop, outputs and checkpoints.

Alemi et al. 2018 ("Fixing a Broken ELBO") read a VAE through its rate R (nats spent on
z per image) and distortion D (nats to describe the image given z); the β-VAE objective
is D + β·R. :class:`VAEStep` takes one Adam step on it per iteration (``steps`` counts
these updates; there is no D and ``n_disc`` is 1) and reports, as batch means in nats:
``rate``, ``distortion``, ``elbo`` = −(D + R), ``loss`` = D + β·R, and the bounds of the
encoder's mutual information H − D ≤ I(X; Z) ≤ R as ``mi_lower_bound`` = H − D and
``mi_upper_bound`` = R, with H the entropy of the training set as the trainer draws it
(:func:`data_entropy`: log N for N distinct images; duplicates counted as often as they occur).

Where the trainer wants "G" (sample grids, FID, ``generate``, the conditioning monitor,
``load_generator``), a VAE run has :class:`VAESampler`: the VAE whose forward maps
standard-normal noise ε to a decoded image (the decoder's per-pixel mean at z ~ m(z)),
so a sample of the model is ``sampler(ε)`` with ε ~ N(0, I), like a GAN's ``G(z)``.
"""
from __future__ import annotations

import collections
import hashlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from fastgan.models.vae import VAE, DiagonalGaussianMarginal, empirical_entropy
from fastgan.train.config import Config
from fastgan.train.data import ImageData
from fastgan.train.runtime import Runtime

# Keeps Φ(ε)·K − k away from 0 and 1, where Φ⁻¹ is infinite (a probability of ~1e-12 per draw in
# float64). In float32 1 − 1e-12 rounds to 1 while Φ(ε) itself rounds to 1 from ε ≈ 5.4 on, so the
# margin is at least the dtype's epsilon there.
_UNIFORM_MARGIN = 1e-12


class VAESampler(nn.Module):
    """A :class:`~fastgan.models.vae.VAE` seen as a generator: ``forward(eps)`` decodes
    z = the marginal's reparameterization of standard-normal ``eps`` (B, z_dim).

    Gaussian marginal: z = μ + σ ⊙ ε. VampPrior (K components): the component is
    k = ⌊Φ(ε₁)·K⌋ and ε₁ is replaced by Φ⁻¹(Φ(ε₁)·K − k), which is again N(0, 1) and
    independent of k, so z = μ_k(u) + σ_k ⊙ ε' is an exact draw of the mixture made from
    ε alone, sample by sample (no batch coupling, as the Jacobian monitor needs)."""

    def __init__(self, vae: VAE) -> None:
        super().__init__()
        self.vae = vae

    def latent(self, eps: Tensor) -> Tensor:
        marginal = self.vae.marginal
        if isinstance(marginal, DiagonalGaussianMarginal):
            return marginal.mean + eps * torch.exp(marginal.log_std)
        mean, log_std = self.vae.posterior(marginal.pseudo_images.clamp(0, 1))
        count = mean.shape[0]
        scaled = torch.special.ndtr(eps[:, :1]) * count
        component = scaled.detach().floor().clamp(max=count - 1)
        margin = max(_UNIFORM_MARGIN, torch.finfo(scaled.dtype).eps)
        first = torch.special.ndtri((scaled - component).clamp(margin, 1 - margin))
        pick = component.squeeze(1).long()
        return mean[pick] + torch.cat([first, eps[:, 1:]], dim=1) * torch.exp(log_std[pick])

    def forward(self, eps: Tensor) -> Tensor:
        return self.vae.decode_mean(self.latent(eps))


def vae_sampler(config: Config) -> VAESampler:
    """A freshly initialised VAE of ``config`` (``image_size``, ``z_dim``, ``width``, ``vae_*``) as a sampler."""
    return VAESampler(VAE(config.image_size, config.z_dim, config.width, config.vae_likelihood,
                          config.vae_marginal, config.vae_components))


def image_counts(data: ImageData, chunk: int = 1024) -> List[int]:
    """How often each different image occurs in ``data`` (byte-exact; compared by BLAKE2b digest,
    in chunks, so memory-mapped sets are read once and never held whole)."""
    counts: collections.Counter = collections.Counter()
    for start in range(0, len(data), chunk):
        block = data.images[start : start + chunk]
        counts.update(hashlib.blake2b(image.tobytes(), digest_size=16).digest() for image in block)
    return list(counts.values())


def data_entropy(data: ImageData) -> float:
    """H in nats of the training distribution: the set's entries drawn uniformly, so each distinct
    image with its share of them (log N when all N are distinct)."""
    return empirical_entropy(image_counts(data))


def rate_distortion_terms(rate, distortion, entropy: float) -> dict:
    """What a VAE's records hold of mean rate R and distortion D (nats, numbers or 0-d tensors):
    R, D, the ELBO −(D + R), and the bounds H − D ≤ I(X; Z) ≤ R for the data's entropy H."""
    return {"rate": rate, "distortion": distortion, "elbo": -(rate + distortion),
            "mi_lower_bound": entropy - distortion, "mi_upper_bound": rate}


class VAEStep:
    """The β-VAE update of ``config`` on ``sampler.vae`` (on the runtime's device, in the config's
    dtype): Adam (``g_lr``, ``g_betas``) on D + β·R. ``entropy`` is H (nats) for the bounds."""

    def __init__(self, sampler: VAESampler, config: Config, runtime: Runtime = Runtime(), *, entropy: float) -> None:
        self.vae, self.config, self.runtime, self.entropy = sampler.vae, config, runtime, entropy
        if runtime.world > 1:
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.vae_ddp = nn.parallel.DistributedDataParallel(self.vae, device_ids=ids)
        else:
            self.vae_ddp = self.vae
        self.optimizer = torch.optim.Adam(self.vae.parameters(), lr=config.g_lr, betas=config.g_betas)

    def vae_update(self, real: Tensor, seed: int) -> dict:
        """One Adam step on a batch of images in [0, 1]; ``seed`` seeds the posterior noise (each
        process draws from (seed, rank)). Returns 0-d tensors (batch means, nats)."""
        generator = torch.Generator(device=real.device).manual_seed(seed + self.runtime.rank)
        terms = self.vae_ddp(real, generator)
        loss = terms.objective(self.config.beta)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.detach(),
                **rate_distortion_terms(terms.rate.detach().mean(), terms.distortion.detach().mean(), self.entropy)}

    def state_dict(self) -> dict:
        return {"vae_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["vae_optimizer"])


@torch.no_grad()
def evaluation_rate_distortion(vae: VAE, images: Tensor, batch_size: int, seed: int, entropy: float) -> Dict[str, float]:
    """The training records' terms (nats per image) as means over ``images``, with the VAE in
    eval mode: batch norm (in the decoder) then uses its running statistics, so each image's
    rate and distortion are its own, whatever else is in its batch; in training they depend
    on the batch, and its size. Posterior noise from ``seed``; the VAE's modes are restored."""
    from fastgan.diagnostics import eval_mode

    like = next(vae.parameters())
    generator = torch.Generator(device=like.device).manual_seed(seed)
    rate = distortion = 0.0
    with eval_mode(vae):
        for chunk in images.split(batch_size):
            terms = vae(chunk.to(device=like.device, dtype=like.dtype), generator)
            rate += terms.rate.double().sum().item()
            distortion += terms.distortion.double().sum().item()
    terms = rate_distortion_terms(rate / len(images), distortion / len(images), entropy)
    return {f"eval_{name}": value for name, value in terms.items()}


@torch.no_grad()
def reconstruction_pairs(sampler: VAESampler, real: Tensor, columns: int = 8):
    """(images, columns) for :func:`~fastgan.train.outputs.save_image_grid`: rows of ``real``
    alternating with their reconstructions (decoder mean at the posterior mean), float32 on the CPU,
    the VAE in eval mode."""
    vae = sampler.vae
    was_training = vae.training
    vae.eval()
    try:
        like = next(vae.parameters())
        reconstructed = vae.reconstruct(real.to(device=like.device, dtype=like.dtype)).float().cpu()
    finally:
        vae.train(was_training)
    columns = min(columns, len(real))
    rows = zip(real.float().cpu().split(columns), reconstructed.split(columns))
    return torch.cat([image for pair in rows for image in pair]), columns


def final_rate_distortion(records: List[dict], share: float = 0.25) -> Optional[Dict[str, float]]:
    """A run's rate, distortion and H (nats): its last evaluation record's (eval mode, fixed
    images: :func:`evaluation_rate_distortion`) when it has one, else each the mean over the
    last ``share`` of its logged training steps (single batches are noisy); None when it
    logged neither. H is read back from the records as mi_lower_bound + distortion."""
    evaluated = [r for r in records if "eval_rate" in r]
    if evaluated:
        last = evaluated[-1]
        return {"rate": last["eval_rate"], "distortion": last["eval_distortion"],
                "entropy": last["eval_mi_lower_bound"] + last["eval_distortion"]}
    logged = [r for r in records if "rate" in r and "distortion" in r]
    if not logged:
        return None
    tail = logged[-max(1, round(share * len(logged))):]
    mean = {key: sum(r[key] for r in tail) / len(tail) for key in ("rate", "distortion", "mi_lower_bound")}
    return {"rate": mean["rate"], "distortion": mean["distortion"], "entropy": mean["mi_lower_bound"] + mean["distortion"]}


def plot_rate_distortion(points: Sequence[Tuple[str, Dict[str, float]]], path: Path) -> None:
    """The rate–distortion plane of Alemi et al.'s figure 1 as a PNG: each (label, run) a point at
    (R, D), and the boundary D = H − R of the feasible region (H − D ≤ I ≤ R implies D ≥ H − R;
    below the line no model exists), with R, D ≥ 0. Written atomically (a study's array jobs
    redraw it as each finishes); a bare Figure leaves the caller's matplotlib backend alone."""
    from matplotlib.figure import Figure

    from fastgan.files import save_figure

    figure = Figure(figsize=(6, 5))
    axis = figure.subplots()
    entropy = max(run["entropy"] for _, run in points)
    axis.fill_between([0, entropy], [entropy, 0], 0, color="0.85", label="infeasible: D < H − R")
    axis.plot([0, entropy], [entropy, 0], color="black", linewidth=1, label=f"D = H − R (H = {entropy:.2f} nats)")
    for label, run in points:
        axis.scatter(run["rate"], run["distortion"], zorder=3)
        axis.annotate(label, (run["rate"], run["distortion"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xlim(left=0)
    axis.set_ylim(bottom=0)
    axis.set_xlabel("rate R (nats per image)")
    axis.set_ylabel("distortion D (nats per image)")
    axis.set_title("rate–distortion plane")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    save_figure(figure, path)


__all__ = ["VAESampler", "VAEStep", "data_entropy", "image_counts", "final_rate_distortion", "plot_rate_distortion",
           "evaluation_rate_distortion", "rate_distortion_terms", "reconstruction_pairs", "vae_sampler"]
