"""Files that a kill at any moment leaves either complete or untouched.

Every file a run writes for later reading (checkpoints, summaries, study tables,
downloads, data caches) is written through :func:`atomic_file`: into a temporary
file beside its destination, then renamed over it (``os.replace`` is atomic on
POSIX and Windows), so readers only ever see the previous or the new complete file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed over ``path`` when the block
    completes, deleted when it raises (or is interrupted)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(descriptor)
    partial = Path(name)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as partial:
        partial.write_text(text)


__all__ = ["atomic_file", "write_text_atomic"]
