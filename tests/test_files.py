"""Atomic files (fastgan.files) and checkpoints (fastgan.train.checkpoint): permissions,
stale temporary files, a full disk, and files that are not checkpoints."""
import errno
import os
import pickle
import random
import subprocess
import sys

import pytest
import torch

from conftest import FullDisk
from fastgan.train import checkpoint
from fastgan.files import atomic_file, atomic_folder, remove_stale_parts, write_text_atomic


@pytest.fixture
def umask():
    """Sets the process umask for a test and restores it."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_files_follow_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    write_text_atomic(tmp_path / "summary.json", "{}")
    checkpoint.save_atomic({"format": checkpoint.FORMAT}, tmp_path / "checkpoint.pt")
    with atomic_folder(tmp_path / "folder") as partial:
        (partial / "x").write_text("x")
    for name in ("summary.json", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "folder", "summary.json"]


def test_atomic_folder_failure_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_folder(tmp_path / "data") as partial:
            (partial / "half").write_text("half")
            raise ValueError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_remove_stale_parts_removes_only_killed_writes_parts(tmp_path):
    stale = [tmp_path / ".checkpoint.pt.0a1b2c3d.part", tmp_path / ".checkpoint.pt.ffffffff.part",
             tmp_path / ".curves.png.12345678.part"]
    kept = [tmp_path / "checkpoint.pt", tmp_path / "checkpoint.pt.part", tmp_path / ".checkpoint.pt.notes",
            tmp_path / ".notes.part", tmp_path / ".curves.png.1234567.part", tmp_path / "samples"]
    for path in stale + kept[:-1]:
        path.write_bytes(b"x")
    kept[-1].mkdir()
    (kept[-1] / ".step-0000001.png.0a1b2c3d.part").write_bytes(b"x")  # another folder: not this call's
    assert sorted(remove_stale_parts(tmp_path)) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_parts(tmp_path / "missing") == []
    with atomic_file(kept[-1] / "written.txt") as partial:  # the names atomic_file gives its partial files
        partial.write_text("x")
        assert remove_stale_parts(kept[-1]) == []  # a live writer's: this process
        assert partial in remove_stale_parts(kept[-1], all_writers_gone=True)
        partial.write_text("x")  # (for the rename at the block's end)


def _ended_process_id() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_remove_stale_parts_keeps_live_and_other_hosts_writers(tmp_path):
    from fastgan import files

    host = files._host_tag()
    other_host = "0" * 8 if host != "0" * 8 else "1" * 8
    dead = [tmp_path / f".data.npy.{_ended_process_id()}-{host}.0a1b2c3d.part",
            tmp_path / f".cifar.tar.gz.{10 ** 30}-{host}.0a1b2c3d.part",  # beyond any process id
            tmp_path / ".data.npy.0a1b2c3d.part"]  # named before names carried their writer
    live = tmp_path / f".data.npy.{os.getpid()}-{host}.0a1b2c3d.part"
    elsewhere = tmp_path / f".data.npy.{os.getpid()}-{other_host}.0a1b2c3d.part"
    for path in dead + [live, elsewhere]:
        path.write_bytes(b"x")
    dead_folder = tmp_path / f".cifar-10-batches-py.{_ended_process_id()}-{host}.0a1b2c3d.part"
    (dead_folder / "inner").mkdir(parents=True)
    (dead_folder / "inner" / "batch").write_bytes(b"x")
    assert sorted(remove_stale_parts(tmp_path)) == sorted(dead + [dead_folder])
    assert sorted(tmp_path.iterdir()) == sorted([live, elsewhere])
    assert sorted(remove_stale_parts(tmp_path, all_writers_gone=True)) == sorted([live, elsewhere])


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from fastgan.files import atomic_file, atomic_folder
target = Path(sys.argv[1])
with (atomic_folder if sys.argv[2] == "folder" else atomic_file)(target) as partial:
    (partial / "half" if sys.argv[2] == "folder" else partial).write_text("half")
    print(partial.name, flush=True)
    time.sleep(600)
"""


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_killed_writers_leftover_goes_with_the_next_write_a_live_writers_stays(tmp_path, kind):
    """Shared caches have several writers at once: a write there deletes only what killed
    writers left (kill -9: no handler runs), never a running writer's temporary file."""
    writer = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(tmp_path / "cache.npy"), kind],
                              stdout=subprocess.PIPE, text=True)
    try:
        partial = tmp_path / writer.stdout.readline().strip()
        assert partial.exists() and partial.name.endswith(".part")
        write_text_atomic(tmp_path / "other.json", "{}")  # another process writing beside it
        assert partial.exists()
    finally:
        writer.kill()
        writer.wait()
        writer.stdout.close()
    assert partial.exists()
    write_text_atomic(tmp_path / "other.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]


def test_atomic_file_never_reuses_an_existing_name(tmp_path, monkeypatch):
    from fastgan import files

    names = iter(["0000000a", "0000000a", "0000000b"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    taken = tmp_path / f".out.txt.{os.getpid()}-{files._host_tag()}.0000000a.part"  # a live writer's (this process)
    taken.write_text("another writer's file")
    write_text_atomic(tmp_path / "out.txt", "new")
    assert (tmp_path / "out.txt").read_text() == "new"
    assert taken.read_text() == "another writer's file"


@pytest.mark.parametrize("room", [0, 1000])
def test_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, monkeypatch, room):
    path = tmp_path / "checkpoint.pt"
    previous = {"format": checkpoint.FORMAT, "step": 1, "weights": torch.randn(7)}
    checkpoint.save_atomic(previous, path)
    monkeypatch.setattr(checkpoint, "open", lambda name, mode: FullDisk(open(name, mode), room), raising=False)
    with pytest.raises(OSError) as error:
        checkpoint.save_atomic({"format": checkpoint.FORMAT, "step": 2, "weights": torch.randn(100_000)}, path)
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(path)
    assert "enforce fail" not in str(error.value)
    monkeypatch.undo()
    loaded = checkpoint.load(path)
    assert loaded["step"] == 1 and torch.equal(loaded["weights"], previous["weights"])
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


class _Payload:
    """Any Python object: what a pickle of unknown origin may hold."""


# The random bytes are seeded: pytest-xdist workers must collect the same parameters.
@pytest.mark.parametrize("content", [
    b"",
    b"PK\x03\x04 truncated zip",
    random.Random(4096).randbytes(4096),
    pickle.dumps({"format": checkpoint.FORMAT}, protocol=2),  # a plain pickle, not torch.save's zip
    "torch.save of a Python object",
], ids=["empty", "truncated zip", "random bytes", "plain pickle", "torch.save of a Python object"])
def test_garbage_is_not_a_fastgan_checkpoint_and_never_unpickled(tmp_path, content):
    path = tmp_path / "garbage.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save({"format": checkpoint.FORMAT, "payload": _Payload()}, path)
    with pytest.raises(ValueError) as error:
        checkpoint.load(path)
    message = str(error.value)
    assert message.startswith(f"{path} is not a fastgan checkpoint")
    assert "weights_only=False" not in message and "weights_only` set to False" not in message
    assert error.value.__cause__ is None and error.value.__suppress_context__  # torch's advice is not chained either


def test_a_torch_file_of_other_content_is_not_a_fastgan_checkpoint(tmp_path):
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a fastgan checkpoint .*holds a dict with format None"):
        checkpoint.load(tmp_path / "other.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list"):
        checkpoint.load(tmp_path / "list.pt")


def test_an_os_error_without_a_file_name_gets_the_destinations(tmp_path):
    target = tmp_path / "summary.json"
    with pytest.raises(OSError) as error:
        with atomic_file(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(target)
    with pytest.raises(ConnectionResetError) as error:  # the type is kept
        with atomic_file(target):
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    assert error.value.filename == str(target)
    elsewhere = str(tmp_path / "source.png")
    with pytest.raises(PermissionError) as error:  # an error naming its own file is left alone
        with atomic_file(target):
            raise PermissionError(errno.EACCES, "Permission denied", elsewhere)
    assert error.value.filename == elsewhere
    assert list(tmp_path.iterdir()) == []
