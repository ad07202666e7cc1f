"""The GAN step: discriminator and generator updates as pure tensor functions (no I/O, no randomness).

:class:`GANStep` holds G, D (and their DDP wrappers), the two Adam optimizers and the
objective of a config. ``discriminator_update(real, z, alpha, seed)`` evaluates D once on
``cat(real, G(z))`` (compare_gan's convention, which also makes D's batch norm see both
halves), adds ``penalty_weight`` × the configured penalty and takes an Adam step;
``generator_update(z)`` takes G's step. Every random input is an argument: the caller
draws it (the trainer from its own generator, for the global batch).

:class:`CapturedStep` runs the same updates as CUDA graphs, each kind a
:class:`fastgan.graphs.GraphedStep`: the first update of each kind runs eagerly (it also
creates Adam's state), the second is captured (D: G's forward, D's forward on real and
fake, the double-backward penalty, fused spectral norm, capturable Adam; G: its forward
and backward through D, Adam) into static buffers, and every update from then on copies
its inputs into those buffers and replays the graph: a few launches per update instead
of hundreds. :func:`why_not_capturable` says when a setup cannot be captured;
:func:`build_step` falls back to eager with that one line.

Mixed batches (``mixed_batches``, :mod:`fastgan.mixed_batches`): D's update reads one mixed
batch ``mix(real, G(z), mask)`` (never ``cat(real, fake)``) and predicts its proportion of real
images; G's loss asks D to call a batch of G's samples all real. The lens (``lens_steps`` > 0,
:mod:`fastgan.tempered`): D sees L(real) in place of real; L is trained in the G update, through
the frozen D, on the last D update's real batch (and mask), with one backward for G's and L's
losses. The mask and the lens weight λ(t) are inputs like z (graph inputs under capture).

Numbers: the captured and eager updates run the same kernels on the same values; they
agree to float32 round-off (the GPU test compares N steps of each from the same state).
"""
from __future__ import annotations

import inspect
import sys
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from fastgan import graphs, mixed_batches
from fastgan.graphs import GraphedStep
from fastgan.penalties import gradient_penalty, jacobian_clamping
from fastgan.train.config import Config
from fastgan.train.losses import discriminator_loss, generator_loss, l2_penalty
from fastgan.tempered import lens_loss, reconstruction_error
from fastgan.train.runtime import Runtime

Outputs = Dict[str, Tensor]

# torch >= 2.14 renamed DDP's per-forward buffer broadcast switch (and warns on the old name).
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


class GANStep:
    """The updates of one training iteration for ``config``'s objective, on G and D as given
    (already on the runtime's device, in the config's dtype), and the ``lens`` when the config has one."""

    def __init__(self, G: nn.Module, D: nn.Module, config: Config, runtime: Runtime = Runtime(), *,
                 capturable: bool = False, lens: Optional[nn.Module] = None) -> None:
        if (lens is None) != (config.lens_steps == 0):
            raise ValueError(f"lens_steps={config.lens_steps}: the step needs a lens exactly when lens_steps > 0")
        self.G, self.D, self.config, self.lens = G, D, config, lens
        if runtime.world > 1:
            # Buffers (SN's u, v; batch-norm statistics) evolve identically on every rank, so none is broadcast.
            ids = [runtime.device.index] if runtime.device.type == "cuda" else None
            self.G_ddp = nn.parallel.DistributedDataParallel(G, device_ids=ids, **_NO_BUFFER_SYNC)
            self.D_ddp = nn.parallel.DistributedDataParallel(D, device_ids=ids, **_NO_BUFFER_SYNC)
            self.lens_ddp = nn.parallel.DistributedDataParallel(lens, device_ids=ids) if lens is not None else None
        else:
            self.G_ddp, self.D_ddp, self.lens_ddp = G, D, lens
        # torch.compile (config.compile) for the forwards whose backward is first-order; the gradient
        # penalty double-backwards through the eager D (same parameters).
        compiled = torch.compile if config.compile else (lambda module: module)
        self.G_fast, self.D_fast = compiled(self.G_ddp), compiled(self.D_ddp)
        # G's update calls D directly, not through DDP: D's gradients are not wanted there.
        self.D_for_G = self.D_fast if self.D_ddp is D else compiled(D)
        self.device = next(G.parameters()).device
        self.device_type = self.device.type
        adam = adam_options(capturable, self.device_type)
        self.g_optimizer = torch.optim.Adam(G.parameters(), lr=config.g_lr, betas=config.g_betas, **adam)
        # D's parameters, frozen during G's update: nn.Module.requires_grad_ walks every submodule
        # to find them (47 µs a call for SNDCGAN's spectral-norm D on the 2-core CPU; this list, 2 µs)
        self.d_parameters = list(D.parameters())
        self.d_optimizer = torch.optim.Adam(self.d_parameters, lr=config.discriminator_lr, betas=config.discriminator_betas, **adam)
        self.lens_optimizer = (torch.optim.Adam(lens.parameters(), lr=config.lens_learning_rate,
                                                betas=config.lens_adam_betas, **adam) if lens is not None else None)
        # A symmetric D gives one logit per batch (pooled) or the per-element logits (ensemble).
        self.d_kwargs = {"pool": config.mixed_batch_loss == "pooled"} if config.mixed_batches else {}

    def _autocast(self):
        # autocast's weight-cast cache stays off while a CUDA graph records the update
        return torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.config.amp,
                              cache_enabled=not (self.config.amp and graphs.is_capturing(self.device)))

    def discriminator_update(self, real: Tensor, z: Tensor, alpha: Optional[Tensor] = None,
                             seed: Optional[int] = None, mask: Optional[Tensor] = None) -> Outputs:
        """One D update on ``real`` (through the lens, when there is one) and ``G(z)``; ``alpha``
        (WGAN-GP's per-sample weights) and ``seed`` (DRAGAN's noise) feed the penalty; ``mask``
        (bool (B,), needed with mixed batches) says which elements of the mixed batch are real.
        Returns 0-d tensors: d_loss, real_logit, fake_logit (batch means) and the unweighted
        penalty; with mixed batches d_loss, d_target (the proportion of reals) and d_prediction
        (D's, σ of its logit(s), averaged)."""
        config = self.config
        with torch.no_grad(), self._autocast():
            fake = self.G_fast(z).to(real.dtype)
            if self.lens is not None:
                real = self.lens(real).to(fake.dtype)
        with self._autocast():
            if config.mixed_batches:
                loss, out = self._mixed_discriminator_loss(real, fake, mask)
            else:
                loss, out = self._discriminator_loss(real, fake, alpha, seed)
        self.d_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.d_optimizer.step()
        return out

    def _discriminator_loss(self, real: Tensor, fake: Tensor, alpha: Optional[Tensor], seed: Optional[int]):
        config = self.config
        logits = self.D_fast(torch.cat([real, fake])).to(real.dtype)
        real_logits, fake_logits = logits.chunk(2)
        loss = discriminator_loss(config.loss, real_logits, fake_logits)
        out = {"d_loss": loss.detach(), "real_logit": real_logits.detach().mean(), "fake_logit": fake_logits.detach().mean()}
        if config.penalty != "none":
            # Under amp the penalty's D runs in bfloat16 too; its input gradient and norm stay in real's dtype.
            penalty = (l2_penalty(self.D) if config.penalty == "l2" else
                       gradient_penalty(self.D_ddp, real, fake, config.penalty, alpha=alpha,
                                        generator=0 if seed is None else seed))
            loss = self._with_penalty(loss, penalty, out)
        return loss, out

    def _mixed_discriminator_loss(self, real: Tensor, fake: Tensor, mask: Optional[Tensor]):
        config = self.config
        if mask is None:
            raise ValueError("mixed_batches=true: discriminator_update needs mask, which elements of the batch are real")
        batch = mixed_batches.mix(real, fake, mask)
        logits = self.D_fast(batch.images, **self.d_kwargs).to(real.dtype)
        loss = mixed_batches.discriminator_loss(config.loss, logits, batch.target)
        out = {"d_loss": loss.detach(), "d_target": batch.target, "d_prediction": logits.detach().sigmoid().mean()}
        if config.penalty == "l2":  # the only penalty config allows here: it needs no per-sample output
            loss = self._with_penalty(loss, l2_penalty(self.D), out)
        return loss, out

    def _with_penalty(self, loss: Tensor, penalty: Tensor, out: Outputs) -> Tensor:
        """``loss`` plus the weighted penalty; the unweighted penalty goes into ``out``."""
        out["penalty"] = penalty.detach()
        return loss + self.config.penalty_weight * penalty.to(loss.dtype)

    def _lens_adversarial_loss(self, lensed: Tensor, fake: Tensor, mask: Optional[Tensor]) -> Tensor:
        """D's loss (D frozen) on the batch of the last D update with its reals lensed: what the
        lens ascends. G's samples enter detached: only the lens gets this gradient."""
        config = self.config
        if config.mixed_batches:
            batch = mixed_batches.mix(lensed, fake.detach(), mask)
            logits = self.D_for_G(batch.images, **self.d_kwargs).to(lensed.dtype)
            return mixed_batches.discriminator_loss(config.loss, logits, batch.target)
        # One forward of both halves, as in the D update (batch-norm D's statistics see both).
        real_logits, fake_logits = self.D_for_G(torch.cat([lensed, fake.detach()])).to(lensed.dtype).chunk(2)
        return discriminator_loss(config.loss, real_logits, fake_logits.detach())

    def generator_update(self, z: Tensor, delta: Optional[Tensor] = None, real: Optional[Tensor] = None,
                         mask: Optional[Tensor] = None, lens_weight: Optional[Tensor] = None) -> Outputs:
        """One G update through D (whose parameters get no gradient). Returns g_loss (the whole
        loss G descends) and, with Jacobian clamping (``delta``: its perturbations of z, needed
        then), the unweighted ``jacobian_clamping`` term.

        With a lens, the same backward also takes the lens's step on ``real`` (the last D
        update's real batch, and its ``mask`` with mixed batches) with adversarial weight
        ``lens_weight`` (0-d tensor, λ(t)); it adds lens_weight, lens_reconstruction (‖L(x) − x‖²)
        and lens_adversarial (D's loss on the lensed batch, which the lens ascends)."""
        config = self.config
        clamping_weight = config.generator_jacobian_clamping_weight
        if clamping_weight and delta is None:
            raise ValueError("generator_jacobian_clamping_weight > 0: generator_update needs delta, the perturbations of z")
        if self.lens is not None and (real is None or lens_weight is None):
            raise ValueError("lens_steps > 0: generator_update needs real (the last D update's batch) and lens_weight")
        if config.mixed_batches and self.lens is not None and mask is None:
            raise ValueError("mixed_batches=true with a lens: generator_update needs the last D update's mask")
        out = {}
        _requires_grad(self.d_parameters, False)
        try:
            with self._autocast():
                fake = self.G_fast(z)
                logits = self.D_for_G(fake, **self.d_kwargs).to(z.dtype)
                if clamping_weight:
                    # G(z + δ) in train mode like G(z), whose output is reused (Odena et al., Algorithm 1).
                    clamping = jacobian_clamping(self.G_fast, z, config.generator_jacobian_clamping_eps,
                                                 config.generator_jacobian_clamping_lambda_min,
                                                 config.generator_jacobian_clamping_lambda_max, delta=delta,
                                                 output=fake).to(z.dtype)
                    out["jacobian_clamping"] = clamping.detach()
            loss = (mixed_batches.generator_loss if config.mixed_batches else generator_loss)(config.loss, logits)
            if clamping_weight:
                loss = loss + clamping_weight * clamping
            total = loss
            if self.lens is not None:
                with self._autocast():
                    lensed = self.lens_ddp(real).to(real.dtype)
                    adversarial = self._lens_adversarial_loss(lensed, fake.to(real.dtype), mask)
                total = loss + lens_loss(adversarial, lensed, real, lens_weight)
                out.update(lens_weight=lens_weight.detach().clone(), lens_adversarial=adversarial.detach(),
                           lens_reconstruction=reconstruction_error(lensed.detach(), real))
                self.lens_optimizer.zero_grad(set_to_none=True)
            self.g_optimizer.zero_grad(set_to_none=True)
            total.backward()
        finally:
            _requires_grad(self.d_parameters, True)
        self.g_optimizer.step()
        if self.lens is not None:
            self.lens_optimizer.step()
        return {"g_loss": loss.detach(), **out}

    def state_dict(self) -> dict:
        state = {"g_optimizer": self.g_optimizer.state_dict(), "d_optimizer": self.d_optimizer.state_dict()}
        if self.lens_optimizer is not None:
            state["lens_optimizer"] = self.lens_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        load_optimizer_state(self.g_optimizer, state["g_optimizer"])
        load_optimizer_state(self.d_optimizer, state["d_optimizer"])
        if self.lens_optimizer is not None:
            load_optimizer_state(self.lens_optimizer, state["lens_optimizer"])


def _requires_grad(parameters, flag: bool) -> None:
    for p in parameters:
        p.requires_grad_(flag)


def adam_options(capturable: bool, device_type: str) -> dict:
    """Captured updates: ``capturable`` (step counts on the device, no host sync). Eager on a
    GPU: the fused kernel, a launch or two per update where the default multi-tensor Adam spent
    1.3 ms of host time per update on the H100 machine (bench/profile_host.py, profiled). The
    same algorithm; the two differ by float round-off."""
    if capturable:
        return {"capturable": True}
    return {"fused": True} if device_type == "cuda" else {}


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Load ``saved`` keeping this optimizer's ``capturable`` and ``fused``: torch's
    load_state_dict takes the saved run's, so a run resumed with CUDA graphs from an eager
    checkpoint would fail its capture, and one resumed eagerly (or on the CPU) from a captured
    run its first step. torch then puts each Adam step count where those settings want it
    (float32 on the parameter's device); an unfused eager one goes back to the host."""
    keep = {key: optimizer.param_groups[0][key] for key in ("capturable", "fused") if key in optimizer.param_groups[0]}
    optimizer.load_state_dict({**saved, "param_groups": [{**g, **keep} for g in saved["param_groups"]]})
    if not (keep.get("capturable") or keep.get("fused")):
        for per_param in optimizer.state.values():
            if torch.is_tensor(per_param.get("step")):
                per_param["step"] = per_param["step"].cpu()


class CapturedStep:
    """:class:`GANStep`'s updates replayed from CUDA graphs (same interface, same numbers): each
    kind of update is a :class:`fastgan.graphs.GraphedStep` (eager first, captured second,
    replayed after). Each graph has its own memory pool, so D's replays (n_disc of them per G
    replay) never write over memory that G's graph keeps, whatever the order of replays.

    Outputs are the graphs' static tensors: valid until the next update of the same kind."""

    def __init__(self, step: GANStep) -> None:
        self.step = step
        self._d = GraphedStep(lambda real, z, alpha, mask: step.discriminator_update(real, z, alpha, None, mask),
                              optimizers=[step.d_optimizer])
        self._g = GraphedStep(step.generator_update,
                              optimizers=[o for o in (step.g_optimizer, step.lens_optimizer) if o is not None])

    @property
    def captured(self) -> bool:
        """Whether both kinds of update now replay graphs (each is captured at its second
        update; a capture CUDA refuses leaves that kind eager, with a warning)."""
        return self._d.captured and self._g.captured

    # the optimizers, models and state of the wrapped step
    def __getattr__(self, name):
        return getattr(self.step, name)

    def discriminator_update(self, real: Tensor, z: Tensor, alpha: Optional[Tensor] = None,
                             seed: Optional[int] = None, mask: Optional[Tensor] = None) -> Outputs:
        # The seed feeds only DRAGAN's noise, which is never captured (why_not_capturable); a graph
        # would keep the first seed, and GraphedStep refuses a non-tensor argument that changes.
        return self._d(real, z, alpha, mask)

    def generator_update(self, z: Tensor, delta: Optional[Tensor] = None, real: Optional[Tensor] = None,
                         mask: Optional[Tensor] = None, lens_weight: Optional[Tensor] = None) -> Outputs:
        if delta is not None:
            raise ValueError("Jacobian clamping is not captured (why_not_capturable says why)")
        return self._g(z, None, real, mask, lens_weight)

    def state_dict(self) -> dict:
        return self.step.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self._d.captured or self._g.captured:
            raise RuntimeError("load the optimizers' state before the first captured update (graphs hold their tensors)")
        self.step.load_state_dict(state)


def _user_hooks(model: nn.Module) -> Optional[str]:
    """The first module of ``model`` with a forward/backward hook that is not fastgan's own."""
    for name, module in model.named_modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks, module._backward_hooks,
                      getattr(module, "_backward_pre_hooks", {})):
            for hook in hooks.values():
                owner = getattr(hook, "__self__", hook)
                if not type(owner).__module__.startswith("fastgan.") and not getattr(owner, "__module__", "").startswith("fastgan."):
                    return f"{type(model).__name__}.{name or '(model)'} has a user hook ({getattr(hook, '__name__', hook)!r})"
    return None


def why_not_capturable(config: Config, runtime: Runtime, G: nn.Module, D: nn.Module,
                       lens: Optional[nn.Module] = None) -> Optional[str]:
    """Why ``config``'s updates cannot run as CUDA graphs here, or None when they can. Mixed
    batches and the lens are capturable: their mask and λ(t) are graph inputs, copied in per update."""
    if runtime.device.type != "cuda":
        return f"CUDA graphs need a GPU; the device is {runtime.device}"
    if runtime.world > 1:
        return (f"multi-process runs ({runtime.backend}, {runtime.world} processes) are not captured: "
                "DDP's gradient all-reduce runs outside the graph here")
    if config.penalty == "dragan":
        return "DRAGAN's noise is drawn inside the kernel from a host seed, which a graph would freeze"
    if config.generator_jacobian_clamping_weight:
        return ("Jacobian clamping checks z and its perturbations for finite values on the host, a device-to-host "
                "sync that graph capture forbids")
    hooked = _user_hooks(G) or _user_hooks(D) or (_user_hooks(lens) if lens is not None else None)
    if hooked:
        return hooked
    module = nn.modules.module
    if any(getattr(module, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                     "_global_backward_hooks", "_global_backward_pre_hooks")):
        return "a global module hook is registered (torch.nn.modules.module.register_module_*_hook)"
    return None


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def build_step(G: nn.Module, D: nn.Module, config: Config, runtime: Runtime = Runtime(), *, cuda_graphs: Optional[bool] = None,
               announce=_say, lens: Optional[nn.Module] = None):
    """The step for ``config`` (with its ``lens`` when ``lens_steps`` > 0): :class:`CapturedStep` when ``cuda_graphs`` (default: the config's
    ``cuda_graphs``) and the setup allows it, else :class:`GANStep`, announcing (one line, on
    ``announce``, rank 0 only) why a requested capture fell back to eager."""
    wanted = config.cuda_graphs if cuda_graphs is None else cuda_graphs
    reason = why_not_capturable(config, runtime, G, D, lens) if wanted else None
    if wanted and reason:
        if runtime.rank == 0:
            announce(f"cuda_graphs: running eagerly: {reason}")
        wanted = False
    step = GANStep(G, D, config, runtime, capturable=wanted, lens=lens)
    return CapturedStep(step) if wanted else step


__all__ = ["CapturedStep", "GANStep", "build_step", "why_not_capturable"]
