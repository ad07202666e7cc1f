"""Checkpoint files that survive a kill at any moment.

A checkpoint is written through :func:`fastgan.files.atomic_file` (a temporary
file beside it, flushed to disk, then renamed over the old one), so the file at
``path`` is always either the previous complete checkpoint or the new complete one.
A write that fails (a full disk) raises an OSError naming ``path`` and leaves the
previous checkpoint as it was. Files are read with ``torch.load(weights_only=True)``:
tensors, numbers, strings, lists and dicts only, nothing executable; any other file
is refused as "not a fastgan checkpoint".
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch

from fastgan.files import atomic_file

PathLike = Union[str, os.PathLike]


def save_atomic(state: Dict[str, Any], path: PathLike) -> None:
    path = Path(path)
    with atomic_file(path) as partial, open(partial, "wb") as f:
        try:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        except (OSError, RuntimeError) as error:
            cause = _os_error_in(error)
            if cause is None:
                raise
            # torch wraps a failed write in "[enforce fail at inline_container.cc] unexpected pos":
            # report the underlying OS error against the checkpoint's name.
            raise OSError(cause.errno, cause.strerror, str(path)) from error
    _sync_folder(path.parent)


def _os_error_in(error: BaseException) -> Optional[OSError]:
    """The first OSError with an errno in ``error``'s chain of causes and contexts."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno is not None:
            return error
        error = error.__cause__ or error.__context__
    return None


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
    not_ours = f"{path} is not a fastgan checkpoint"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise  # unreadable (permissions, I/O): reported with its path
    except Exception as error:  # torch raises several types for truncated or foreign files
        # torch's own message may advise weights_only=False, i.e. unpickling a file of unknown origin,
        # which can run arbitrary code: never passed on.
        raise ValueError(f"{not_ours}: torch.load(weights_only=True) cannot read it (a truncated file, a file "
                         f"torch.save did not write, or one holding Python objects besides tensors and containers, "
                         f"which fastgan never writes; {type(error).__name__}); nothing was loaded") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{not_ours} (format {FORMAT}): it holds a {type(state).__name__}"
                         + (f" with format {state.get('format')!r}" if isinstance(state, dict) else ""))
    return state


FORMAT = "fastgan-train-1"

__all__ = ["FORMAT", "load", "save_atomic"]
