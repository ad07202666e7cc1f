"""What happens between training iterations: progress, logging, samples, FID, checkpoints.

A :class:`Callback` has three hooks, each given the :class:`~fastgan.train.trainer.Trainer`:
``start`` (before the first iteration of this process, after any resume), ``after``
(after every iteration, with that iteration's outputs: 0-d tensors) and ``end`` (after
the last, also when a stop signal ended the run). The trainer runs
:func:`default_callbacks` in order (progress, metrics, samples, FID, a VAE's evaluation,
conditioning, checkpoint), then any the caller passes (``Trainer(config, callbacks=[...])``).

Frequencies are in steps (discriminator updates): :func:`due` is true when the last
iteration reached a multiple of ``every`` (an iteration is ``n_disc`` steps), and at the
run's last step.
"""
from __future__ import annotations

import math
import sys
import time
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

import torch
from torch import Tensor

from fastgan.train.evaluator import Diverged
from fastgan.train.outputs import CONDITIONING_KEY, copy_atomically, plot_conditioning, plot_curves, save_image_grid

if TYPE_CHECKING:
    from fastgan.train.trainer import Trainer

Outputs = Dict[str, Tensor]


def due(trainer: "Trainer", every: int) -> bool:
    """Whether the iteration that just ended reached a multiple of ``every`` steps, or the last step."""
    step, n_disc = trainer.step, trainer.config.n_disc
    return step == trainer.config.steps or (every > 0 and step // every > (step - n_disc) // every)


class Callback:
    def start(self, trainer: "Trainer") -> None:
        pass

    def after(self, trainer: "Trainer", out: Outputs) -> None:
        pass

    def end(self, trainer: "Trainer") -> None:
        pass


class Progress(Callback):
    """A progress bar (rank 0, ``progress``): steps, losses at each log step, images/s and, on a
    GPU, the peak memory allocated since this run started; the same numbers go to the metrics
    as ``steps_per_s`` and ``images_per_s`` (through :attr:`rates`)."""

    def start(self, trainer: "Trainer") -> None:
        from tqdm import tqdm

        config = trainer.config
        self.bar = tqdm(total=config.steps, initial=trainer.step, desc="training", unit="step", file=sys.stderr,
                        disable=not config.progress or trainer.runtime.rank != 0, dynamic_ncols=True)
        self.started, self.first_step = time.perf_counter(), trainer.step
        self.postfix: Dict[str, str] = {}
        if trainer.runtime.device.type == "cuda":  # the counter is per process: a study's earlier trials set it
            torch.cuda.reset_peak_memory_stats(trainer.runtime.device)

    def rates(self, trainer: "Trainer") -> Dict[str, float]:
        steps_per_s = (trainer.step - self.first_step) / max(time.perf_counter() - self.started, 1e-9)
        return {"steps_per_s": steps_per_s, "images_per_s": steps_per_s * trainer.config.batch_size}

    def after(self, trainer: "Trainer", out: Outputs) -> None:
        self.bar.update(trainer.step - self.bar.n)
        if self.bar.disable:
            return
        self.postfix["img/s"] = f"{self.rates(trainer)['images_per_s']:.0f}"
        device = trainer.runtime.device
        if device.type == "cuda":
            self.postfix["mem"] = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}GiB"
        self.bar.set_postfix(self.postfix, refresh=False)

    def show_losses(self, record: Dict[str, float]) -> None:
        """The losses of this log step, on the bar now (its own after() of this step ran already)."""
        self.postfix.update({k: f"{v:.3f}" for k, v in record.items() if k in ("d_loss", "g_loss", "penalty", "rate", "distortion")})
        if not self.bar.disable:
            self.bar.set_postfix(self.postfix, refresh=False)

    def write(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)

    def end(self, trainer: "Trainer") -> None:
        self.bar.close()


class Metrics(Callback):
    """Every ``log_every`` steps: the iteration's outputs (the last D update's and the G update's,
    averaged over the processes: the global batch's) and the rates, to ``metrics.jsonl`` /
    TensorBoard (rank 0) and the progress bar. An output that is NaN or Inf there ends the run
    as diverged (:meth:`~fastgan.train.trainer.Trainer.mark_diverged`)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def after(self, trainer: "Trainer", out: Outputs) -> None:
        if not due(trainer, trainer.config.log_every):
            return
        record = trainer.runtime.mean(out)  # a collective: due() is the same on every process
        non_finite = [name for name, value in record.items() if not math.isfinite(value)]
        if non_finite:
            trainer.mark_diverged(f"{', '.join(non_finite)} not finite")
        self.progress.show_losses(record)
        record.update(self.progress.rates(trainer))
        if trainer.log is not None:
            trainer.log.write(trainer.step, record)


class Samples(Callback):
    """Every ``sample_every`` steps (rank 0): a grid of G's images from the fixed z to
    ``samples/step-NNNNNNN.png``, copied to ``samples.png``; with a lens also
    ``samples/lens_NNNNNN.png`` (rows of fixed real images alternating with the same images
    through the lens), copied to ``lens.png``; for a VAE also ``samples/reconstructions-NNNNNNN.png``
    (rows of fixed data images alternating with their reconstructions), copied to ``reconstructions.png``."""

    def after(self, trainer: "Trainer", out: Outputs) -> None:
        if trainer.runtime.rank != 0 or not trainer.config.sample_every or not due(trainer, trainer.config.sample_every):
            return
        grid_file = trainer.out_dir / "samples" / f"step-{trainer.step:07d}.png"
        save_image_grid(trainer.generate(trainer.fixed_z), grid_file)
        copy_atomically(grid_file, trainer.out_dir / "samples.png")
        if trainer.lens is not None:
            lens_file = trainer.out_dir / "samples" / f"lens_{trainer.step:06d}.png"
            images, columns = trainer.lens_pairs()
            save_image_grid(images, lens_file, columns=columns)
            copy_atomically(lens_file, trainer.out_dir / "lens.png")
        if trainer.config.model == "vae":
            from fastgan.train.vae_step import reconstruction_pairs

            pairs_file = trainer.out_dir / "samples" / f"reconstructions-{trainer.step:07d}.png"
            images, columns = reconstruction_pairs(trainer.G, trainer.vae_real)
            save_image_grid(images, pairs_file, columns=columns)
            copy_atomically(pairs_file, trainer.out_dir / "reconstructions.png")


class FIDTracking(Callback):
    """Every ``fid_every`` steps: FID (a separate metrics record), the best one kept in ``best.pt``.
    An evaluation that a stop signal interrupted stays pending in the checkpoint and runs first
    when the run resumes, which then checkpoints at once."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def start(self, trainer: "Trainer") -> None:
        if trainer.fid_pending and trainer.config.fid_every and trainer.diverged_at is None:
            self._evaluate(trainer)
            # Else the checkpoint stays pending until the next one (never, after the last step),
            # and every later resume would evaluate and log this FID again; the curves gain the FID.
            write_checkpoint(trainer)
        trainer.fid_pending = False

    def after(self, trainer: "Trainer", out: Outputs) -> None:
        if trainer.config.fid_every and due(trainer, trainer.config.fid_every):
            trainer.fid_pending = True
            self._evaluate(trainer)

    def _evaluate(self, trainer: "Trainer") -> None:
        step = trainer.step
        try:
            fid = trainer.evaluate_fid()  # raises Interrupted on a stop request, leaving fid_pending set
        except Diverged as error:
            trainer.fid_pending = False
            trainer.mark_diverged(str(error))
            return
        trainer.fid_pending = False
        if fid is None:
            return
        trainer.last_fid = (step, fid)
        if trainer.best_fid is None or fid < trainer.best_fid:
            trainer.best_fid, trainer.best_step = fid, step
            trainer.save_checkpoint(best=True)
        if trainer.log is not None:
            trainer.log.write(step, {"fid": fid, "best_fid": trainer.best_fid})
        self.progress.write(f"step {step}: FID {fid:.3f} (best {trainer.best_fid:.3f} at step {trainer.best_step})")


class Conditioning(Callback):
    """Every ``diagnostics_condition_number_every`` steps (rank 0): the conditioning of G's
    Jacobian at the run's fixed z (:meth:`Trainer.conditioning`: mean and std of the log
    condition number of JᵀJ, quantiles of log σ) as a separate metrics record. A Jacobian that is not finite ends the
    run as diverged (on every process: rank 0 tells the others)."""

    def after(self, trainer: "Trainer", out: Outputs) -> None:
        from fastgan.diagnostics import NonFiniteJacobian

        every = trainer.config.diagnostics_condition_number_every
        if not every or not due(trainer, every):
            return

        def summary():
            try:
                return trainer.conditioning()
            except NonFiniteJacobian:
                return None

        write_rank_zero_record(trainer, summary, "G's Jacobian for the conditioning record not finite")


class RateDistortionEvaluation(Callback):
    """A VAE run's evaluation (rank 0), when a GAN's FID would be due (every ``fid_every`` steps
    and at the last step): rate, distortion, ELBO and bounds in eval mode over fixed images
    (:meth:`Trainer.evaluate_rate_distortion`) as a separate metrics record, ``eval_*`` keys.
    Values that are not finite end the run as diverged (rank 0 tells the others)."""

    def after(self, trainer: "Trainer", out: Outputs) -> None:
        if trainer.config.model != "vae" or not due(trainer, trainer.config.fid_every):
            return

        def evaluation():
            record = trainer.evaluate_rate_distortion()
            return record if all(math.isfinite(v) for v in record.values()) else None

        write_rank_zero_record(trainer, evaluation, "the evaluation's rate or distortion not finite")


def write_rank_zero_record(trainer: "Trainer", measure: Callable[[], Optional[dict]], not_finite: str) -> None:
    """``measure()`` on rank 0 as a separate metrics record; where it returns None (what it
    measured was not finite) the run ends as diverged, ``not_finite`` saying why, on every
    process (rank 0 tells the others)."""
    record = measure() if trainer.runtime.rank == 0 else None
    if trainer.runtime.any(trainer.runtime.rank == 0 and record is None):
        trainer.mark_diverged(not_finite)
    elif record is not None and trainer.log is not None:
        trainer.log.write(trainer.step, record)


class Checkpoints(Callback):
    """Every ``checkpoint_every`` steps and at the last step: ``checkpoint.pt`` (atomic), the
    metrics flushed and ``curves.png`` (and with conditioning records ``conditioning.png``) redrawn (rank 0)."""

    def after(self, trainer: "Trainer", out: Outputs) -> None:
        if trainer.step == trainer.config.steps or (trainer.config.checkpoint_every and due(trainer, trainer.config.checkpoint_every)):
            write_checkpoint(trainer)


def write_checkpoint(trainer: "Trainer") -> None:
    """``checkpoint.pt``, the metrics flushed and the curves redrawn (rank 0)."""
    trainer.save_checkpoint()
    if trainer.log is not None:
        trainer.log.flush()
        plot_curves(trainer.log.records, trainer.out_dir / "curves.png")
        if any(CONDITIONING_KEY in r for r in trainer.log.records):
            plot_conditioning(trainer.log.records, trainer.out_dir / "conditioning.png")


def default_callbacks() -> List[Callback]:
    progress = Progress()
    return [progress, Metrics(progress), Samples(), FIDTracking(progress), RateDistortionEvaluation(), Conditioning(),
            Checkpoints()]


__all__ = ["Callback", "Checkpoints", "Conditioning", "FIDTracking", "Metrics", "Progress", "RateDistortionEvaluation", "Samples",
           "default_callbacks", "due"]
