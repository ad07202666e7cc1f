"""Checkpoint files that survive a kill at any moment.

A checkpoint is written through :func:`fastgan.train.files.atomic_file` (a temporary
file beside it, flushed to disk, then renamed over the old one), so the file at
``path`` is always either the previous complete checkpoint or the new complete one. Files are read with ``torch.load(weights_only=True)``: tensors,
numbers, strings, lists and dicts only, nothing executable.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Union

import torch

from fastgan.train.files import atomic_file

PathLike = Union[str, os.PathLike]


def save_atomic(state: Dict[str, Any], path: PathLike) -> None:
    path = Path(path)
    with atomic_file(path) as partial, open(partial, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    # The rename itself must reach the disk too; folders cannot be opened on Windows.
    if os.name == "posix":
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def load(path: PathLike) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(f"{path} is not a readable fastgan checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path} is not a fastgan training checkpoint (format {FORMAT})")
    return state


FORMAT = "fastgan-train-1"

__all__ = ["FORMAT", "load", "save_atomic"]
