"""What a training run leaves in its ``out_dir``: metrics as JSON lines and
TensorBoard scalars, PNG sample grids, and a PNG plot of losses and FID.

TensorBoard is optional: without the ``tensorboard`` package the run says so once
and writes the JSON lines only (they hold the same numbers).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import Tensor


class MetricsLog:
    """``metrics.jsonl`` (one record per logged step) and TensorBoard scalars.

    Resuming at step S drops the records after S (a killed run may have logged
    past its last checkpoint), so the files describe one continuous run."""

    def __init__(self, out_dir: Path, resume_step: int = 0, tensorboard: bool = True) -> None:
        self.path = out_dir / "metrics.jsonl"
        self.records = [r for r in read_records(self.path) if r["step"] <= resume_step] if resume_step else []
        with open(self.path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        self.writer = _tensorboard_writer(out_dir / "tensorboard", resume_step) if tensorboard else None

    def write(self, step: int, values: Dict[str, float]) -> None:
        record = {"step": step, **values}
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
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
    return SummaryWriter(str(folder), purge_step=resume_step or None)


def save_image_grid(images: Tensor, path: Path, columns: Optional[int] = None, padding: int = 2) -> None:
    """(N, 3, H, W) images in [0, 1] -> one PNG, ``columns`` wide (default ~square)."""
    from PIL import Image

    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    n, _, h, w = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = torch.ones(3, rows * (h + padding) + padding, columns * (w + padding) + padding)
    for index, image in enumerate(images.detach().float().cpu().clamp(0, 1)):
        top, left = padding + (index // columns) * (h + padding), padding + (index % columns) * (w + padding)
        grid[:, top : top + h, left : left + w] = image
    pixels = grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def plot_curves(records: List[dict], path: Path) -> None:
    """Losses (and the gradient penalty) against step, with FID on a second panel when present."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fid = [(r["step"], r["fid"]) for r in records if "fid" in r]
    panels = 2 if fid else 1
    figure, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    losses = axes[0][0]
    for key in ("d_loss", "g_loss", "penalty"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            losses.plot(*zip(*points), label=key)
    losses.set_xlabel("step")
    losses.set_title("losses")
    losses.legend()
    if fid:
        axes[0][1].plot(*zip(*fid), marker="o", color="tab:red")
        axes[0][1].set_xlabel("step")
        axes[0][1].set_title("FID (lower is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


__all__ = ["MetricsLog", "plot_curves", "read_records", "save_image_grid"]
