"""The reference GAN trainer of "The GAN Landscape", on fastgan's ops.

The trainer assembles the pieces of a run and loops over them:

* :class:`~fastgan.train.runtime.Runtime`: process group, device, numerics switches;
* :class:`~fastgan.train.stream.BatchStream`: the data's global batches, on the device;
* :class:`~fastgan.train.step.GANStep`: the D and G updates (tensors in, tensors out),
  replayed from CUDA graphs with ``cuda_graphs`` (:class:`~fastgan.train.step.CapturedStep`);
* :class:`~fastgan.train.evaluator.FIDEvaluator`: FID during training;
* :mod:`~fastgan.train.callbacks`: progress, metrics, samples, FID tracking, checkpoints.

An iteration is ``n_disc`` D updates and one G update (compare_gan); ``step`` counts D
updates, like the paper-era code's ``training_steps``.

Randomness: every draw of a run (data order, z, the WGAN-GP α and penalty seeds) comes
from the trainer's own generator, drawn for the *global* batch and sliced per rank. A
run under ``torchrun`` with W processes therefore computes what one process computes on
the combined batch (batch norm is cross-process); checkpoints hold that generator's
state, so ``resume`` continues bit-for-bit on CPU (GPU too with ``deterministic``).
Exception: DRAGAN's noise scale is the std of each rank's own batch, and each rank draws its
noise from a seed of its own (the step's seed + rank). With ``mixed_batches``
each process mixes its own share (a symmetric D judges that batch as one set): one mask per
process, all drawn from the run's generator in rank order.

The lens (``lens_steps`` > 0) follows λ(t) with t the D updates made before the iteration.

Images are in [0, 1] everywhere (G's output, D's input, the data).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Optional, Tuple

import torch
from torch import Tensor

from fastgan.mixed_batches import draw_mask
from fastgan.models import build_models
from fastgan.models.lens import Lens
from fastgan.nn import convert_batch_norm
from fastgan.train import checkpoint
from fastgan.train.callbacks import Callback, default_callbacks
from fastgan.train.config import Config, from_mapping, save_config
from fastgan.train.evaluator import FIDEvaluator, Interrupted
from fastgan.files import FileLock, remove_stale_parts, write_text_atomic
from fastgan.train.outputs import MetricsLog
from fastgan.train.runtime import EXIT_DIVERGED, EXIT_INTERRUPTED, Runtime, StopRequest, resolve_device
from fastgan.tempered import lens_weight
from fastgan.train.step import build_step
from fastgan.train.stream import BatchStream

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
SUMMARY = "summary.json"
LOCK = ".lock"  # held (flock) by the process training into out_dir
# Keys a resumed run may change: they do not alter the trajectory of the parameters.
RESUMABLE_CHANGES = {"steps", "log_every", "sample_every", "checkpoint_every", "fid_every", "fid_samples",
                     "fid_real_samples", "fid_resize", "inception_weights", "sample_grid", "progress", "device", "download",
                     "diagnostics_condition_number_every"}
# Checkpoints of trainers whose steps or losses meant something else are refused.
TRAINER_VERSION = 2
# Keys newer than some checkpoints whose behaviour before they existed is not today's default.
_BEFORE_THEIR_KEYS = {"fid_resize": "torch-bilinear"}
# Offsets that give each stream its own seed, so e.g. a larger sample grid never changes training.
_FIXED_Z_STREAM, _FID_Z_STREAM, _CONDITIONING_Z_STREAM = 1, 2, 4  # (3 is the FID's real subset)
_LENS_REAL_STREAM = 5  # the fixed real images of the lens grids
_VAE_REAL_STREAM = 6  # the fixed data images of a VAE's reconstruction grids
_VAE_EVAL_STREAM = 7  # a VAE's evaluation images and their posterior noise
_VAE_EVAL_IMAGES = 1024
_LENS_GRID_COLUMNS = 8
# Multi-process runs agree on a stop request every this many iterations (an all-reduce, a host sync).
_STOP_CHECK_EVERY = 10


def draw_latents(count: int, config: Config, generator: torch.Generator) -> Tensor:
    """(count, z_dim) latents on the CPU in the config's dtype: ``z_prior`` uniform, U[-1, 1)
    (compare_gan's and the paper's), or normal, N(0, 1); always normal for a VAE (the noise
    its :class:`~fastgan.train.vae_step.VAESampler` maps through the marginal)."""
    shape = (count, config.z_dim)
    if config.z_prior == "uniform" and config.model == "gan":
        return torch.rand(shape, generator=generator, dtype=config.torch_dtype) * 2 - 1
    return torch.randn(shape, generator=generator, dtype=config.torch_dtype)


def draw_perturbations(z: Tensor, config: Config, generator: torch.Generator) -> Tensor:
    """Jacobian clamping's δ for each latent of ``z``: N(0, I) rescaled to norm
    ``generator_jacobian_clamping_eps`` per sample (Odena et al., Algorithm 1), drawn on the CPU."""
    direction = torch.randn(z.shape, generator=generator, dtype=z.dtype)
    return config.generator_jacobian_clamping_eps * direction / direction.norm(dim=1, keepdim=True)


def models_for(config: Config):
    """A freshly initialised (G, D) of the config's architecture, on the CPU in the config's dtype;
    for ``model: vae``, (the VAE as a :class:`~fastgan.train.vae_step.VAESampler`, None)."""
    if config.model == "vae":
        from fastgan.train.vae_step import vae_sampler

        return vae_sampler(config).to(config.torch_dtype), None
    models = build_models(config.architecture, config.image_size, config.z_dim, config.d_norm, config.width,
                          symmetric=config.mixed_batches)
    return tuple(m.to(config.torch_dtype) for m in models)


class RunInProgress(RuntimeError):
    """Another process is training into the same out_dir."""


class Trainer:
    """Train a G and D of ``fastgan.models`` as ``config`` says.

    >>> trainer = Trainer(load_config("configs/sndcgan_cifar10.yaml"))
    >>> trainer.fit()               # to config.steps, with outputs in config.out_dir

    ``resume=True`` continues from ``out_dir/checkpoint.pt`` when it exists (and starts
    afresh when it does not); without it an existing checkpoint is an error, so no run is
    overwritten by accident. ``runtime`` defaults to ``Runtime.from_environment(config.device)``;
    ``stream`` (anything with ``next()``, ``state_dict()``, ``load_state_dict()``) replaces the
    data set's batches, e.g. :class:`~fastgan.train.stream.RepeatedBatch` in benchmarks;
    ``callbacks`` run after the default ones.
    """

    def __init__(self, config: Config, *, resume: bool = False, runtime: Optional[Runtime] = None,
                 stream=None, callbacks: Iterable[Callback] = ()) -> None:
        config.validate()  # before anything is read, decoded or downloaded
        self.runtime = runtime = runtime or Runtime.from_environment(config.device)
        if config.batch_size % runtime.world:
            raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of processes ({runtime.world})")
        if config.mixed_batches and config.batch_size // runtime.world < 2:
            raise ValueError(f"mixed_batches=true needs at least 2 images per process to mix (batch_size={config.batch_size} "
                             f"over {runtime.world} process(es))")
        self.out_dir = Path(config.out_dir).expanduser()
        if config.fid_every and config.inception_weights and not Path(config.inception_weights).expanduser().is_file():
            raise FileNotFoundError(f"Inception weight file not found: {config.inception_weights}")
        self._lock = FileLock(self.out_dir / LOCK) if runtime.rank == 0 else None
        self._hold_out_dir()
        try:
            self._set_up(config, resume, stream, callbacks)
        except BaseException:
            self._release_out_dir()
            raise

    def _set_up(self, config: Config, resume: bool, stream, callbacks: Iterable[Callback]) -> None:
        """Everything the run starts from: the checkpoint (read under out_dir's lock), data,
        models, optimizers, the FID evaluator and the callbacks."""
        runtime = self.runtime
        saved = self._saved_state(config, resume)
        if saved and config.steps < saved["step"]:
            raise ValueError(f"steps={config.steps} is below the {saved['step']} steps {self.out_dir / CHECKPOINT} has done; "
                             f"a resumed run only goes on (steps >= {saved['step']}), or start a new out_dir")
        self.config = config = self._resumed_config(saved["config"], config) if saved else config
        torch.manual_seed(config.seed)

        # Rank 0 loads (and downloads, caches) first; the others then read what it left.
        from fastgan.train.data import load_dataset

        if runtime.rank != 0:
            runtime.patient_barrier()
        self.data = load_dataset(config.dataset, root=config.data_root, image_size=config.image_size,
                                 download=config.download and runtime.rank == 0)
        if runtime.rank == 0:
            runtime.patient_barrier()
        if stream is None:
            stream = BatchStream(self.data, config.batch_size, config.seed, runtime, config.torch_dtype,
                                 channels_last=config.channels_last)
        self.stream = stream

        memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        self.G, self.D = (m and m.to(runtime.device, memory_format=memory_format) for m in models_for(config))
        if runtime.world > 1:
            self.G, self.D = (m and convert_batch_norm(m) for m in (self.G, self.D))
        # Built after G and D, so their initial weights do not depend on whether a lens exists.
        self.lens = (Lens(3, config.lens_hidden, config.lens_depth).to(config.torch_dtype)
                     .to(runtime.device, memory_format=memory_format) if config.lens_steps else None)
        self.lens_real = self._lens_real_images() if self.lens is not None else None
        self.last_real = self.last_mask = None  # the last D update's inputs, which the lens's update reuses
        self.random = torch.Generator().manual_seed(config.seed)
        self.fixed_z = draw_latents(config.sample_grid, config, torch.Generator().manual_seed(config.seed + _FIXED_Z_STREAM))
        # The z at which G's Jacobian is monitored: one batch for the whole run (in checkpoints).
        self.conditioning_z = draw_latents(config.diagnostics_condition_number_samples, config,
                                           torch.Generator().manual_seed(config.seed + _CONDITIONING_Z_STREAM))
        self.step = 0  # discriminator updates so far
        self.best_fid: Optional[float] = None
        self.best_step: Optional[int] = None
        self.last_fid: Optional[Tuple[int, float]] = None  # (step, FID) of the latest evaluation
        self.fid_pending = False  # a stop request interrupted the FID of this step
        self.diverged_at: Optional[int] = None  # the step whose losses or images were not finite
        self._diverged_because = ""
        optimizers = None
        if saved is not None:
            optimizers = self._load_state(saved)
        if config.model == "vae":
            from fastgan.train.vae_step import VAEStep, data_entropy

            self.vae_real = self._vae_real_images()
            self.entropy = data_entropy(self.data)
            self.updates = VAEStep(self.G, config, runtime, entropy=self.entropy)
        else:
            self.updates = build_step(self.G, self.D, config, runtime, lens=self.lens)
        if optimizers is not None:
            self.updates.load_state_dict(optimizers)
        self.evaluator = FIDEvaluator(config, runtime, self.data, self.out_dir)
        self.callbacks = default_callbacks() + list(callbacks)
        self.stop = StopRequest()
        self.log: Optional[MetricsLog] = None

    @property
    def rank(self) -> int:
        return self.runtime.rank

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        """Train to ``config.steps``, writing outputs; returns the run's summary.

        SIGINT/SIGTERM (Ctrl-C, a cluster's pre-emption) finish the current iteration (or abandon
        a running FID evaluation, which the resumed run repeats first; the step's other callbacks
        still run), write a checkpoint and
        return a summary with ``finished: False``; a second Ctrl-C stops at once.

        A run whose losses (at a log step), FID images or conditioning Jacobian go NaN or Inf has
        diverged: no later callback of that iteration runs (none samples, evaluates or saves G),
        it checkpoints, and its summary (written, as a finished run's) has ``diverged_at``; a
        resumed diverged run does not train further.

        One process at a time trains into an out_dir: the Trainer holds it from its construction
        (before the checkpoint is read) to the end of ``fit``; while another process holds it (a
        study relaunched while it runs, two jobs given one trial), constructing a Trainer raises
        :class:`RunInProgress` on every rank, before anything is read or written."""
        self._hold_out_dir()  # held since construction; again for a second fit
        try:
            return self._train_and_finish()
        finally:
            self._release_out_dir()

    def _hold_out_dir(self) -> None:
        """Rank 0 takes out_dir's lock, or every rank raises :class:`RunInProgress`: taken before
        the checkpoint is read, so the state a run starts from is one no other process is changing."""
        holder = None
        if self._lock is not None and not self._lock.held:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            holder = self._lock.acquire()
        if self.runtime.any(holder is not None):
            if holder is not None and holder.endswith(f"process {os.getpid()}"):
                raise RunInProgress(f"{self.out_dir} is held by another Trainer of this process: fit() it to the end "
                                    "or delete it (del trainer) before making a new one there")
            raise RunInProgress(f"{self.out_dir} is being trained by another process ({holder or 'see rank 0'}); "
                                "wait for it to end, or train into another out_dir")

    def _release_out_dir(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def _train_and_finish(self) -> dict:
        config, runtime = self.config, self.runtime
        self._open_outputs()
        with self.stop, runtime.numerics(deterministic=config.deterministic, tf32=config.tf32,
                                         cudnn_benchmark=config.cudnn_benchmark):
            try:
                for callback in self.callbacks:
                    callback.start(self)
                while self.step < config.steps and self.diverged_at is None and not self._stop_agreed():
                    out = self.train_step()
                    interrupted = None
                    for callback in self.callbacks:
                        if self.diverged_at is not None:
                            break  # nothing more to sample, evaluate or save of a G gone non-finite
                        try:
                            callback.after(self, out)
                        except Interrupted as error:  # the step's other callbacks still run (a conditioning
                            interrupted = error       # record, the curves): a resume does not repeat them
                    if interrupted is not None:
                        raise interrupted
            except Interrupted:  # agreed by every process, like the loop's own check
                self.fid_pending = True
                self.stop.request()
            stopped = self.stop.requested and (self.step < config.steps or self.fid_pending)
            if stopped or self.diverged_at is not None:
                self.save_checkpoint()
            for callback in self.callbacks:
                callback.end(self)
        if self.diverged_at is not None and self.rank == 0:
            print(f"diverged at step {self.diverged_at}: {self._diverged_because or 'an earlier run found it'}; "
                  f"training stopped (recorded in {self.out_dir / SUMMARY}; a resume does not train it further; "
                  f"exit status {EXIT_DIVERGED})", file=sys.stderr)
        elif stopped and self.rank == 0:
            print(f"stopped at step {self.step}; checkpoint written to {self.out_dir / CHECKPOINT} "
                  f"(continue with --resume; exit status {EXIT_INTERRUPTED})", file=sys.stderr)
        return self._finish()

    def mark_diverged(self, because: str) -> None:
        """End the run after this iteration: ``because`` (what was not finite) was seen at this
        step, on every process alike (callbacks call it with all-process results)."""
        if self.diverged_at is None:
            self.diverged_at, self._diverged_because = self.step, because

    def train_step(self) -> dict:
        """One iteration: ``n_disc`` D updates (the last one's outputs are reported), one G update;
        ``step`` advances by ``n_disc``. A VAE's iteration is one update of its objective."""
        if self.config.model == "vae":
            out = self.updates.vae_update(self.stream.next(), int(torch.randint(0, 2**62, (), generator=self.random)))
            self.step += 1
            return out
        for _ in range(self.config.n_disc):
            out = self.discriminator_step()
        out = {**out, **self.generator_step()}
        self.step += self.config.n_disc
        return out

    def discriminator_step(self) -> dict:
        """One D update on the next real batch, with this run's next z (and α, penalty seed)."""
        config = self.config
        real = self.stream.next()
        z = self._local(draw_latents(config.batch_size, config, self.random))
        alpha = self._local(torch.rand(config.batch_size, generator=self.random, dtype=config.torch_dtype)) \
            if config.penalty == "wgan-gp" else None
        seed = None
        if config.penalty not in ("none", "l2"):
            # DRAGAN's kernel draws element i's noise from (seed, i): one seed on every process would
            # give each share the same noise. Rank 0 keeps the one-process stream; nothing more is drawn.
            seed = int(torch.randint(0, 2**62, (), generator=self.random)) + self.runtime.rank
        mask = None
        if config.mixed_batches:  # every process draws every process's mask, keeping the generators in step
            masks = [draw_mask(config.batch_size // self.runtime.world, config.batch_smoothing, generator=self.random)
                     for _ in range(self.runtime.world)]
            mask = self.runtime.to_device(masks[self.runtime.rank])
        self.last_real, self.last_mask = real, mask
        return self.updates.discriminator_update(real, z, alpha, seed, mask)

    def generator_step(self) -> dict:
        config = self.config
        z = draw_latents(config.batch_size, config, self.random)
        lens = self._lens_inputs()
        if not config.generator_jacobian_clamping_weight:
            return self.updates.generator_update(self._local(z), **lens)
        return self.updates.generator_update(self._local(z), self._local(draw_perturbations(z, config, self.random)), **lens)

    def _lens_inputs(self) -> dict:
        """The lens's inputs to the G update: the last D update's real batch (and mask), λ(step)."""
        config = self.config
        if self.lens is None:
            return {}
        weight = lens_weight(self.step, config.lens_steps, config.lens_weight)
        return {"real": self.last_real, "mask": self.last_mask,
                "lens_weight": torch.tensor(weight, dtype=config.torch_dtype, device=self.device)}

    def _seeded_subset(self, stream: int, count: int) -> Tensor:
        """``count`` data images (or all) chosen by the run's seed stream ``stream``, in the run's dtype."""
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.config.seed + stream))
        return self.data.batch(order[:count]).to(self.config.torch_dtype)

    def _vae_real_images(self) -> Tensor:
        """The fixed data images of a VAE's reconstruction grids (4 rows of 8, a seeded subset)."""
        return self._seeded_subset(_VAE_REAL_STREAM, 32)

    def evaluate_rate_distortion(self) -> dict:
        """A VAE's rate, distortion, ELBO and bounds (nats per image) over a fixed seeded subset of
        up to 1,024 data images, in eval mode with fixed posterior noise
        (:func:`~fastgan.train.vae_step.evaluation_rate_distortion`); nothing of training changes."""
        from fastgan.train.vae_step import evaluation_rate_distortion

        images = self._seeded_subset(_VAE_EVAL_STREAM, _VAE_EVAL_IMAGES)
        return evaluation_rate_distortion(self.G.vae, images, self.config.batch_size,
                                          self.config.seed + _VAE_EVAL_STREAM, self.entropy)

    def _lens_real_images(self) -> Tensor:
        """The fixed real images of the lens grids: a seeded random subset, whole rows of the grid."""
        count = min(4 * _LENS_GRID_COLUMNS, len(self.data))
        count -= count % min(_LENS_GRID_COLUMNS, count)
        return self._seeded_subset(_LENS_REAL_STREAM, count)

    @torch.no_grad()
    def lens_pairs(self) -> Tuple[Tensor, int]:
        """(images, columns): rows of the fixed real images alternating with the same images through
        the lens, float32 on the CPU, for :func:`~fastgan.train.outputs.save_image_grid`."""
        columns = min(_LENS_GRID_COLUMNS, len(self.lens_real))
        lensed = self.lens(self.runtime.to_device(self.lens_real)).float().cpu()
        rows = zip(self.lens_real.float().split(columns), lensed.split(columns))
        return torch.cat([image for pair in rows for image in pair]), columns

    def _local(self, global_batch: Tensor) -> Tensor:
        return self.runtime.to_device(self.runtime.rank_share(global_batch))

    def _stop_agreed(self) -> bool:
        """Whether any process was asked to stop; then every process stops (and checkpoints) together."""
        if self.runtime.world > 1 and (self.step // self.config.n_disc) % _STOP_CHECK_EVERY:
            return False
        if self.runtime.any(self.stop.requested):
            self.stop.request()
        return self.stop.requested

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def generate(self, z: Tensor, batch_size: int = 250) -> Tensor:
        """Images of G in inference mode (batch-norm running statistics), float32 on the CPU."""
        was_training = self.G.training
        self.G.eval()
        try:
            return torch.cat([self.G(chunk.to(self.device)).float().cpu() for chunk in z.split(batch_size)])
        finally:
            self.G.train(was_training)

    def conditioning(self) -> dict:
        """:func:`fastgan.diagnostics.conditioning_summary` of G's Jacobian at the run's fixed
        ``conditioning_z`` (G in eval mode; nothing of the training state changes)."""
        from fastgan.diagnostics import conditioning_summary

        return conditioning_summary(self.G, self.conditioning_z.to(self.device))

    def evaluate_fid(self) -> Optional[float]:
        """FID of ``fid_samples`` images of G (the same z every time) against the data, or None
        without Inception weights. Raises ``Interrupted`` when a stop request arrives meanwhile."""
        z = draw_latents(self.config.fid_samples, self.config, torch.Generator().manual_seed(self.config.seed + _FID_Z_STREAM))
        return self.evaluator.evaluate(self.generate, z, stop=lambda: self.stop.requested)

    # ------------------------------------------------------------------ state

    def _saved_state(self, config: Config, resume: bool) -> Optional[dict]:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            if resume and self.rank == 0:
                print(f"starting a new run in {self.out_dir}", file=sys.stderr)
            return None
        if not resume:
            raise ValueError(f"{path} exists; pass --resume (resume=True) to continue that run, or choose another out_dir")
        state = checkpoint.load(path)
        if state.get("trainer_version") != TRAINER_VERSION:
            raise ValueError(f"{path} was written by an older fastgan trainer (whose steps counted generator updates "
                             "and whose LSGAN and L2 penalty differed); it cannot be resumed: start a new out_dir")
        return state

    @staticmethod
    def _resumed_config(saved: dict, requested: Config) -> Config:
        saved = {**Config().to_dict(), **_BEFORE_THEIR_KEYS, **saved}  # keys newer than the checkpoint: what it trained with
        requested_values = requested.to_dict()
        changed = {k for k, v in requested_values.items() if saved.get(k) != v}
        trajectory_changes = sorted(changed - RESUMABLE_CHANGES - {"out_dir"})
        if trajectory_changes:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {requested_values[k]!r}" for k in trajectory_changes)
            raise ValueError(f"cannot resume with a different training setup ({details}); "
                             f"only {', '.join(sorted(RESUMABLE_CHANGES))} may change")
        return from_mapping({**saved, **{k: requested_values[k] for k in changed}})

    def state_dict(self) -> dict:
        return {
            "format": checkpoint.FORMAT,
            "trainer_version": TRAINER_VERSION,
            "config": self.config.to_dict(),
            "step": self.step,
            "batches_drawn": self.stream.state_dict()["batches_drawn"],
            "world_size": self.runtime.world,
            "G": self.G.state_dict(),
            "D": self.D.state_dict() if self.D is not None else None,  # a VAE has none
            **({"lens": self.lens.state_dict()} if self.lens is not None else {}),
            **self.updates.state_dict(),
            "random": self.random.get_state(),
            "torch_random": torch.get_rng_state(),
            "fixed_z": self.fixed_z,
            "conditioning_z": self.conditioning_z,
            "best_fid": self.best_fid,
            "best_step": self.best_step,
            "last_fid": self.last_fid,
            "fid_pending": self.fid_pending,
            "diverged_at": self.diverged_at,
        }

    def _load_state(self, state: dict) -> dict:
        """Restore everything but the optimizers, whose state is returned (loaded once the step exists)."""
        self.G.load_state_dict(state["G"])
        if self.D is not None:
            self.D.load_state_dict(state["D"])
        if self.lens is not None:
            self.lens.load_state_dict(state["lens"])
        self.stream.load_state_dict({"batches_drawn": state["batches_drawn"]})
        self.random.set_state(state["random"])
        torch.set_rng_state(state["torch_random"])
        if len(state["fixed_z"]) == self.config.sample_grid:  # a resume that changes sample_grid draws its new z above
            self.fixed_z = state["fixed_z"]
        self.conditioning_z = state.get("conditioning_z", self.conditioning_z)  # absent in older checkpoints
        self.step = state["step"]
        self.best_fid, self.best_step = state["best_fid"], state["best_step"]
        evaluated_with = {**_BEFORE_THEIR_KEYS, **state["config"]}["fid_resize"]
        if evaluated_with != self.config.fid_resize and self.best_fid is not None:
            # FIDs of two preprocessing conventions differ by percents: best.pt restarts
            if self.rank == 0:
                print(f"fid_resize is {self.config.fid_resize} now, {evaluated_with} before: FIDs from here on are not "
                      f"comparable with the run's earlier ones, so the best FID (kept in best.pt) starts again",
                      file=sys.stderr)
            self.best_fid = self.best_step = None
        self.last_fid, self.fid_pending = state["last_fid"], state["fid_pending"]
        self.diverged_at = state.get("diverged_at")  # absent in older checkpoints
        optimizers = ("g_optimizer", "d_optimizer") + (("lens_optimizer",) if self.lens is not None else ())
        if self.config.model == "vae":
            optimizers = ("vae_optimizer",)
        return {name: state[name] for name in optimizers}

    def save_checkpoint(self, best: bool = False) -> Path:
        """``checkpoint.pt`` (or ``best.pt``), written atomically by rank 0; all ranks wait for it."""
        path = self.out_dir / (BEST if best else CHECKPOINT)
        if self.rank == 0:
            checkpoint.save_atomic(self.state_dict(), path)
        self.runtime.barrier()
        return path

    # ------------------------------------------------------------------ outputs

    def _open_outputs(self) -> None:
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for folder in (self.out_dir, self.out_dir / "samples"):  # what killed writes of a run left
                remove_stale_parts(folder, all_writers_gone=True)  # the run holds out_dir's lock
            if self.diverged_at is None and (self.step < self.config.steps or self.fid_pending):
                (self.out_dir / SUMMARY).unlink(missing_ok=True)  # a finished run extended: not finished now
            save_config(self.config, str(self.out_dir / "config.yaml"))
            self.log = MetricsLog(self.out_dir, resume_step=self.step)
        self.runtime.barrier()

    def _finish(self) -> dict:
        finished = self.step >= self.config.steps and not self.fid_pending and self.diverged_at is None
        summary = {"step": self.step, "steps": self.config.steps, "finished": finished, "diverged_at": self.diverged_at,
                   "final_fid": self.last_fid[1] if self.last_fid and self.last_fid[0] == self.step else None,
                   "best_fid": self.best_fid, "best_step": self.best_step, "out_dir": str(self.out_dir)}
        if self.rank == 0:
            self.log.close()
            if finished or self.diverged_at is not None:  # a study's trials are done by this file, never torn
                write_text_atomic(self.out_dir / SUMMARY, json.dumps(summary, indent=2))
        return summary


def load_generator(path: str, device: str = "auto"):
    """(G in eval mode, its Config) from a training checkpoint (``checkpoint.pt`` or ``best.pt``)."""
    state = checkpoint.load(path)
    config = from_mapping(state["config"])
    generator, _ = models_for(config)
    generator.load_state_dict(state["G"])
    return generator.to(resolve_device(device)).eval(), config


__all__ = ["BEST", "CHECKPOINT", "EXIT_DIVERGED", "EXIT_INTERRUPTED", "LOCK", "SUMMARY", "Interrupted", "RunInProgress", "Trainer", "draw_latents", "draw_perturbations",
           "load_generator", "models_for", "resolve_device"]
