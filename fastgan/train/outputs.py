"""What a training run leaves in its ``out_dir``: metrics as JSON lines and
TensorBoard scalars, PNG sample grids, and a PNG plot of losses and FID.

TensorBoard is optional: without the ``tensorboard`` package the run says so once
and writes the JSON lines only (they hold the same numbers). TensorBoard's writer
always starts a new events file, so each process that logs to a run (the first start,
each resume) adds one to ``tensorboard/``; TensorBoard shows them as one run, and a
resume purges the points logged after its checkpoint. A start that logs nothing (a
rerun of a finished run) adds none: the writer is created at the first record.
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor

from fastgan.files import atomic_file, save_figure, write_text_atomic


class MetricsLog:
    """``metrics.jsonl`` (one record per logged step) and TensorBoard scalars.

    Resuming at step S drops the records after S (a killed run may have logged
    past its last checkpoint), so the files describe one continuous run."""

    def __init__(self, out_dir: Path, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.records = [r for r in read_records(self.path) if r["step"] <= resume_step] if resume_step else []
        # Atomic: a kill or a full disk during this rewrite would otherwise leave the whole
        # history of the run truncated, and a reader (a study's --summarize) could see it half written.
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
        self._tensorboard = (out_dir / "tensorboard", resume_step) if tensorboard else None
        self.writer = None  # created at the first record

    def write(self, step: int, values: Dict[str, float]) -> None:
        record = {"step": step, **values}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is None and self._tensorboard is not None:
            self.writer = _tensorboard_writer(*self._tensorboard)
            self._tensorboard = None  # tried once: without the package, JSON lines only
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_records(path: Path) -> List[dict]:
    if not path.is_file():
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut short by a kill ends the usable log
    return records


def _tensorboard_writer(folder: Path, resume_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        print("note: the tensorboard package is not installed; metrics go to metrics.jsonl only "
              "(pip install tensorboard for TensorBoard scalars)", file=sys.stderr)
        return None
    # Points after the checkpoint are purged; the checkpoint step's own were logged before it was written.
    return SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)


def copy_atomically(source: Path, destination: Path) -> None:
    """``destination`` becomes a copy of ``source`` at once (samples.png from the step's grid):
    a reader, or a kill mid-copy, never sees it half written."""
    with atomic_file(Path(destination)) as partial:
        shutil.copyfile(source, partial)


def image_format(path: Path) -> str:
    """PIL's name of the image format that ``path``'s suffix asks for (PNG for .png), or a
    ValueError naming the path: a caller can check its destination before any work."""
    from PIL import Image

    name = Image.registered_extensions().get(Path(path).suffix.lower())
    if name is None or name not in Image.SAVE:
        raise ValueError(f"{path}: not the name of an image file (its suffix names no format PIL writes; use .png)")
    return name


def save_image_grid(images: Tensor, path: Path, columns: Optional[int] = None, padding: int = 2) -> None:
    """(N, 3, H, W) images in [0, 1] -> one PNG, ``columns`` wide (default ~square; at most N,
    as torchvision's make_grid), written atomically: a kill or a failure never leaves a torn
    image at ``path``."""
    from PIL import Image

    path = Path(path)
    kind = image_format(path)  # the temporary file's name tells PIL nothing
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"expected images of shape (N, 3, H, W), N >= 1, got {tuple(images.shape)}")
    n, _, h, w = images.shape
    columns = min(columns or math.ceil(math.sqrt(n)), n)
    rows = math.ceil(n / columns)
    grid = torch.ones(3, rows * (h + padding) + padding, columns * (w + padding) + padding)
    for index, image in enumerate(images.detach().float().cpu().clamp(0, 1)):
        top, left = padding + (index // columns) * (h + padding), padding + (index % columns) * (w + padding)
        grid[:, top : top + h, left : left + w] = image
    pixels = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    with atomic_file(path) as partial:
        Image.fromarray(pixels).save(partial, format=kind)


def curves_figure(records: List[dict]):
    """A matplotlib figure of the losses (and the penalty) against step, with FID on a second
    panel when present. Both panels span the run's steps from 0, so a single FID point sits at
    its step; the FID axis starts at 0 (FID is never negative). A bare Figure, not pyplot: the
    caller's backend (a notebook's, say) stays as it is, and nothing needs closing."""
    from matplotlib.figure import Figure

    fid = [(r["step"], r["fid"]) for r in records if "fid" in r]
    panels = 2 if fid else 1
    figure = Figure(figsize=(6 * panels, 4))
    axes = figure.subplots(1, panels, squeeze=False)
    last_step = max((r["step"] for r in records), default=0)
    losses = axes[0][0]
    for key in ("d_loss", "g_loss", "penalty", "lens_adversarial", "lens_reconstruction", "rate", "distortion"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            losses.plot(*zip(*points), label=key)
    losses.set_title("losses")
    losses.set_ylabel("loss")
    if losses.lines:
        losses.legend()
    if fid:
        panel = axes[0][1]
        panel.plot(*zip(*fid), marker="o", color="tab:red")
        panel.set_title("FID (lower is better)")
        panel.set_ylabel("FID")
        panel.set_ylim(0, 1.1 * max(value for _, value in fid))
    for panel in axes[0]:
        panel.set_xlabel("step (D updates)")
        panel.set_xlim(0, max(last_step, 1))
    figure.tight_layout()
    return figure


def plot_curves(records: List[dict], path: Path) -> None:
    """:func:`curves_figure` as a PNG."""
    save_figure(curves_figure(records), path)


CONDITIONING_KEY = "log_condition_number_mean"


def plot_conditioning(records: List[dict], path: Path) -> None:
    """Mean log condition number of the metric tensor JᵀJ of G's Jacobian against step, ± one
    standard deviation over the fixed z (Odena et al.'s figure of log-CN over training), as a PNG."""
    from matplotlib.figure import Figure

    points = [(r["step"], r[CONDITIONING_KEY], r.get("log_condition_number_std", 0.0)) for r in records if CONDITIONING_KEY in r]
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    if points:
        steps, mean, std = (torch.tensor(column, dtype=torch.float64) for column in zip(*points))
        axis.plot(steps, mean, marker="o", color="tab:purple", label="mean over the fixed z")
        axis.fill_between(steps, mean - std, mean + std, color="tab:purple", alpha=0.2, label="± 1 std")
        axis.legend()
    axis.set_title("conditioning of G's Jacobian")
    axis.set_xlabel("step (D updates)")
    axis.set_ylabel("log condition number of JᵀJ = 2 log(σ_max / σ_min)")
    figure.tight_layout()
    save_figure(figure, path)


__all__ = ["CONDITIONING_KEY", "MetricsLog", "curves_figure", "image_format", "plot_conditioning", "plot_curves",
           "read_records", "save_image_grid"]
