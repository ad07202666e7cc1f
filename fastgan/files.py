"""Files that a kill at any moment leaves either complete or untouched.

Every file a run writes for later reading (checkpoints, summaries, study tables,
downloads, data caches) is written through :func:`atomic_file`: into a temporary
file beside its destination, then renamed over it (``os.replace`` is atomic on
POSIX and Windows), so readers only ever see the previous or the new complete file.

The temporary file is created with mode 0666 less the process umask, like any file
``open()`` creates, so the renamed file has the permissions the user's other outputs
have (``tempfile.mkstemp`` would make it 0600). A SIGKILL between creation and rename
leaves ``.NAME.PID-HOST.XXXXXXXX.part`` behind: the temporary name carries its writer's
process id and (hashed) host name, so that any later write into the folder can tell a
killed writer's leftovers from a live writer's file and delete only the former
(:func:`remove_stale_parts`), also in caches that several processes fill at once.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import warnings
from pathlib import Path
from typing import Iterator, List, Optional

PART_SUFFIX = ".part"


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _partial_name(path: Path) -> str:
    return f".{path.name}.{os.getpid()}-{_host_tag()}.{secrets.token_hex(4)}{PART_SUFFIX}"


# The writer's part is optional: temporary files named before it was added have none.
_PARTIAL_NAME = re.compile(r"\..+?\.(?:(?P<pid>[0-9]+)-(?P<host>[0-9a-f]{8})\.)?[0-9a-f]{8}" + re.escape(PART_SUFFIX))


def _writer_has_ended(pid: Optional[str], host: Optional[str]) -> bool:
    """Whether the process that named a temporary file is known to have ended. Unknown (kept)
    for another host's (a shared file system) and where processes cannot be asked (Windows,
    where os.kill would terminate it); a name without a writer is from before names had one,
    so no live writer makes it."""
    if pid is None:
        return True
    if host != _host_tag() or os.name != "posix":
        return False
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, OverflowError):  # (OverflowError: beyond any process id)
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _create_partial(path: Path) -> Path:
    """A new empty file beside ``path`` with a fresh random name (never an existing one),
    after deleting what killed writes left in that folder."""
    remove_stale_parts(path.parent)
    while True:
        partial = path.parent / _partial_name(path)
        try:
            descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:  # 2^32 names: a clash is rare, but possible
            continue
        os.close(descriptor)
        return partial


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed over ``path`` when the block
    completes, deleted when it raises (or is interrupted). An OSError of the block that
    names no file (a write to a full disk says only "No space left on device") is raised
    again naming ``path``, with the same type and errno."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = _create_partial(path)
    try:
        yield partial
        os.replace(partial, path)
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        raise type(error)(error.errno, error.strerror, str(path)) from error
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Like :func:`atomic_file`, for a folder: a new temporary folder beside ``path`` to
    fill, renamed to ``path`` when the block completes, deleted when it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_parts(path.parent)
    while True:
        partial = path.parent / _partial_name(path)
        try:
            partial.mkdir()  # mode 0777 less the umask, like any new folder
            break
        except FileExistsError:
            continue
    try:
        yield partial
        os.replace(partial, path)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as partial:
        partial.write_text(text)


def file_hash(path: Path, algorithm: str):
    """The ``hashlib`` hash (``algorithm``: "md5", "sha256"...) of the file's content, read in
    1 MiB blocks; the caller may update it further (``hashlib.file_digest`` needs Python 3.11)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest


def save_figure(figure, path: Path, dpi: int = 100) -> None:
    """A matplotlib figure written atomically to ``path``, in the format its suffix names (PNG
    when it has none, under exactly that name): plots redrawn while people look at them, or
    written by jobs that finish together, are never left torn."""
    path = Path(path)
    with atomic_file(path) as partial:
        figure.savefig(partial, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi)


def remove_stale_parts(folder: Path, all_writers_gone: bool = False) -> List[Path]:
    """Delete the temporary files and folders that killed writes left in ``folder`` (not below
    it); returns them.

    Those whose writer process, on this host, has ended; with ``all_writers_gone`` (the
    caller holds the folder's :class:`FileLock`, so nobody else writes there) every one,
    another host's included. A file that cannot be deleted (another user's) is left."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    for entry in entries:
        match = _PARTIAL_NAME.fullmatch(entry.name)
        if match is None or entry.is_symlink():
            continue
        if not all_writers_gone and not _writer_has_ended(match["pid"], match["host"]):
            continue
        try:
            if entry.is_dir():  # atomic_folder's
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except OSError:  # removed by another process first, or another user's: left
            continue
        removed.append(Path(entry.path))
    return removed


class FileLock:
    """An exclusive advisory lock (``flock``) on ``path``, for one process at a time.

    :meth:`acquire` never waits: it returns None once held, or what the holder wrote of
    itself (host and process id). The operating system drops the lock when its holder exits,
    killed or not, so no stale lock is ever left to clean up. Where there is no ``flock``
    (Windows; a Lustre or NFS mount without lock support) nothing is locked, with a warning
    for a file system that refuses it."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._descriptor: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._descriptor is not None

    def acquire(self) -> Optional[str]:
        try:
            import fcntl
        except ImportError:
            return None
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 200).decode(errors="replace").strip()
            os.close(descriptor)
            return holder or "another process"
        except OSError as error:
            os.close(descriptor)
            if error.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            warnings.warn(f"{self.path}: the file system does not lock files ({error.strerror}); nothing keeps "
                          "a second process from writing here at the same time", RuntimeWarning, stacklevel=2)
            return None
        os.ftruncate(descriptor, 0)
        os.write(descriptor, f"host {socket.gethostname()}, process {os.getpid()}\n".encode())
        self._descriptor = descriptor
        return None

    def release(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)  # closing drops the flock
            self._descriptor = None

    __del__ = release


__all__ = ["FileLock", "atomic_file", "atomic_folder", "file_hash", "remove_stale_parts", "save_figure", "write_text_atomic"]
