"""`python -m fastgan`: FID round trip through saved statistics, errors, help."""
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FID_HELPER_WEIGHTS, FullDisk, needs_fid_helper
from fastgan.__main__ import main
from fastgan.train.config import load_config


def _folder(path, count, seed, size):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"{i:02d}.png")
    return str(path)


@pytest.fixture(scope="module")
def help_run():
    """`python -m fastgan --help` in a fresh interpreter: its output and the fastgan modules it loaded."""
    code = ("import runpy, sys\nsys.argv = ['fastgan', '--help']\ntry:\n    runpy.run_module('fastgan', run_name='__main__')\n"
            "except SystemExit as exit:\n    assert exit.code == 0\n"
            "print('MODULES', sorted(m for m in sys.modules if m.startswith(('fastgan.train', 'fastgan.metrics', 'fastgan.models'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    text, _, modules = out.rpartition("MODULES ")
    return {"help": text, "modules": modules.strip()}


@pytest.fixture(scope="module")
def weights():  # tests that take it are marked needs_fid_helper
    return str(FID_HELPER_WEIGHTS)


@needs_fid_helper
def test_fid_round_trip_through_saved_statistics(tmp_path, weights, capsys):
    a = _folder(tmp_path / "a", 5, 0, 48)
    b = _folder(tmp_path / "b", 4, 1, 40)
    stats = str(tmp_path / "a.npz")
    assert main(["fid", a, b, "--save-stats", stats, "--weights", weights, "--batch-size", "3", "--device", "cpu"]) == 0
    first = capsys.readouterr().out
    assert main(["fid", stats, b, "--weights", weights, "--device", "cpu"]) == 0
    second = capsys.readouterr().out
    value = float(first.split("FID:")[1])
    assert value > 0 and first == second


@needs_fid_helper
def test_errors_are_clear(tmp_path, weights, capsys):
    assert main(["fid", str(tmp_path / "nowhere"), str(tmp_path / "x.npz"), "--weights", weights]) == 1
    assert "neither an image folder nor an .npz" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["stats", str(tmp_path / "empty"), str(tmp_path / "o.npz"), "--weights", weights]) == 1
    assert "contains no images" in capsys.readouterr().err


def test_kid_and_inception_score_check_their_sizes_before_any_work(tmp_path, capsys):
    """The weights named do not exist: an error about them would mean the network was loaded first."""
    a = _folder(tmp_path / "a", 3, 2, 16)
    b = _folder(tmp_path / "b", 4, 3, 16)
    missing = str(tmp_path / "no-weights.pth")
    assert main(["kid", a, b, "--weights", missing, "--device", "cpu"]) == 1
    assert "KID subset_size=1000 exceeds the samples available (3 real, 4 fake)" in capsys.readouterr().err
    assert main(["is", a, "--weights", missing, "--device", "cpu"]) == 1
    assert "needs at least splits=10 samples (one per split), got 3" in capsys.readouterr().err


def test_fid_and_stats_refuse_a_one_image_folder_before_any_work(tmp_path, capsys):
    """FID needs a covariance, so 2 images a side: said before the network is loaded (the weights named
    do not exist) and before the other side's features are extracted, not after."""
    many, one = _folder(tmp_path / "many", 3, 4, 16), _folder(tmp_path / "one", 1, 5, 16)
    missing = str(tmp_path / "no-weights.pth")
    for argv in (["fid", many, one], ["fid", one, many], ["stats", one, str(tmp_path / "one.npz")]):
        assert main([*argv, "--weights", missing, "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert f"{one} holds a single image; FID statistics need at least 2" in err, err
    assert not (tmp_path / "one.npz").exists()


def test_statistics_are_written_only_under_a_name_fid_reads_back(tmp_path, capsys):
    """`fid` tells statistics from folders by the .npz suffix: `stats` (or --save-stats) to another
    name used to write a file that `fid` then took for a missing folder."""
    a, b = _folder(tmp_path / "a", 3, 6, 16), _folder(tmp_path / "b", 3, 7, 16)
    missing = str(tmp_path / "no-weights.pth")
    for argv in (["stats", a, str(tmp_path / "a_stats")], ["fid", a, b, "--save-stats", str(tmp_path / "a_stats")]):
        assert main([*argv, "--weights", missing, "--device", "cpu"]) == 1
        err = capsys.readouterr().err
        assert "a_stats: a statistics file's name must end in .npz" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.parametrize("command", ["fid", "stats", "kid", "is"])
@pytest.mark.parametrize("batch_size", ["0", "-4"])
def test_inception_commands_refuse_a_batch_size_below_one(tmp_path, capsys, command, batch_size):
    """0 used to fail late with Python's "range() arg 3 must not be zero", a negative size to read no
    image at all and then blame the folder for having 0 features."""
    a = str(tmp_path / "a")
    argv = {"fid": [a, a], "stats": [a, str(tmp_path / "s.npz")], "kid": [a, a], "is": [a]}[command]
    with pytest.raises(SystemExit) as stopped:
        main([command, *argv, "--batch-size", batch_size])
    assert stopped.value.code == 2
    assert f"--batch-size: must be an integer >= 1, got {batch_size}" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["kid", "is"])
def test_kid_and_inception_score_on_a_statistics_file_say_they_need_images(tmp_path, capsys, command):
    """They compute per-image features (logits), which an .npz of mu and sigma does not hold; the error
    used to call the file "neither an image folder nor an .npz statistics file"."""
    stats = str(tmp_path / "real.npz")
    np.savez(stats, mu=np.zeros(4), sigma=np.eye(4))  # pytorch-fid's format
    folder = _folder(tmp_path / "a", 12, 9, 16)
    argv = [stats, folder] if command == "kid" else [stats]
    assert main([command, *argv, "--weights", str(tmp_path / "no-weights.pth"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert f"{stats}: this command needs an image folder; .npz statistics hold only a mean" in err, err
    assert main([command, *[str(tmp_path / "gone") if p == stats else p for p in argv], "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "gone is not an image folder" in err and ".npz" not in err, err


def test_help_explains_the_commands(help_run, capsys):
    for command in ("fid", "is", "kid", "stats", "backends", "train", "sample", "study"):
        assert f"\n  {command} " in help_run["help"]
    assert "docs/README.md" in help_run["help"]
    with pytest.raises(SystemExit):
        main(["fid", "--help"])
    out = capsys.readouterr().out
    assert "--save-stats" in out and "--batch-size" in out and "--device" in out


@needs_fid_helper
def test_kid_and_inception_score_commands(tmp_path, weights, capsys):
    a = _folder(tmp_path / "a", 4, 2, 32)
    b = _folder(tmp_path / "b", 4, 3, 32)
    assert main(["kid", a, b, "--subsets", "3", "--subset-size", "3", "--weights", weights, "--device", "cpu"]) == 0
    assert "KID:" in capsys.readouterr().out
    # fid-helper's network has no classifier: the Inception Score needs pytorch-fid's weights, and says so
    assert main(["is", a, "--splits", "2", "--weights", weights, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1008-way classifier" in err and "download_weights()" in err


TINY_RUN = ["image_size=16", "width=0.25", "batch_size=8", "fid_every=0", "sample_every=3", "checkpoint_every=3",
            "log_every=1", "progress=false",
            "device=cpu"]  # the GPU's training runs are tests of their own


def test_train_three_steps_then_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_RUN, "steps=3", f"out_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "step 3/3" in out and str(run / "samples.png") in out and str(run / "checkpoint.pt") in out
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--n", "6", "--columns", "3", "--out", str(grid)]) == 0
    with Image.open(grid) as image:
        assert image.size == (2 + 3 * 18, 2 + 2 * 18)
    # a folder (trailing slash) gets one PNG per sample, e.g. for `fid real/ fake/`
    folder = tmp_path / "fake"
    assert main(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--n", "5", "--out", f"{folder}/"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [f"sample-{i:05d}.png" for i in range(5)]
    assert "samples: 100%" in capsys.readouterr().err  # a progress bar, as for --n 50000
    with Image.open(grid) as whole, Image.open(folder / "sample-00004.png") as single:
        assert single.size == (16, 16)  # the grid's fifth image (row 1, column 1) is the same sample
        np.testing.assert_array_equal(np.asarray(single), np.asarray(whole)[20:36, 20:36])
    # an existing run is never overwritten by accident; --resume continues it
    assert main(["train", *TINY_RUN, "steps=4", f"out_dir={run}"]) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", "--resume", *TINY_RUN, "steps=4", f"out_dir={run}"]) == 0
    assert "step 4/4" in capsys.readouterr().out


def test_a_new_run_removes_stale_partial_writes_and_says_it_starts(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    stale = [run / ".checkpoint.pt.0badc0de.part", run / ".best.pt.12345678.part", run / ".summary.json.abcdef01.part"]
    for path in stale:
        path.write_bytes(b"left by a kill -9 during a write")
    (run / "notes.part").write_text("not ours")
    assert main(["train", "--resume", *TINY_RUN, "steps=1", f"out_dir={run}"]) == 0
    err = capsys.readouterr().err
    assert f"starting a new run in {run}" in err and "no checkpoint" not in err
    assert not any(path.exists() for path in stale) and (run / "notes.part").exists()


def test_train_and_sample_errors(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", "loss=kl"]) == 1
    assert "loss='kl' is not one of" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "none.pt")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage_error:
        main(["sample", "--checkpoint", str(tmp_path / "none.pt"), "--n", "0"])
    assert usage_error.value.code == 2 and "argument --n: must be an integer >= 1, got 0" in capsys.readouterr().err


def test_overrides_may_sit_on_both_sides_of_a_flag(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("steps: 5\nloss: hinge\n")
    run = tmp_path / "run"
    assert main(["train", *TINY_RUN, "--config", str(config), "steps=1", "--resume", f"out_dir={run}"]) == 0
    saved = load_config(str(run / "config.yaml"))
    assert (saved.steps, saved.loss) == (1, "hinge")
    with pytest.raises(SystemExit) as usage_error:
        main(["train", "steps=1", "--config", str(config), "--seed", "3", f"out_dir={run}"])
    assert usage_error.value.code == 2 and "unrecognized arguments: --seed" in capsys.readouterr().err


def test_study_runs_a_two_trial_grid_and_skips_finished_trials(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"settings: {{steps: 2}}\nout_dir: {tmp_path / 'study'}\n"
        "axes:\n  loss: [ns, hinge]\n"
    )
    overrides = [o for o in TINY_RUN if not o.startswith("sample_every")]
    assert main(["study", "--grid", str(grid), "--index", "1", *overrides]) == 0
    assert "trial 2/2 (index 1): loss=hinge" in capsys.readouterr().out
    assert main(["study", "--grid", str(grid), "--list", *overrides]) == 0
    listing = capsys.readouterr().out
    assert "0  to run    loss=ns  (trial-" in listing and "1  finished  loss=hinge  (trial-" in listing
    assert main(["study", "--grid", str(grid), *overrides]) == 0
    assert "trial 2/2 (index 1): finished already" in capsys.readouterr().out
    table = (tmp_path / "study" / "results.csv").read_text().splitlines()
    assert table[0] == "trial,loss,status,steps,final_fid,best_fid,best_step,folder"
    assert [row.split(",")[:4] for row in table[1:]] == [["0", "ns", "finished", "2"], ["1", "hinge", "finished", "2"]]
    assert "| 1 | hinge | finished | 2 |" in (tmp_path / "study" / "results.md").read_text()
    # another step count is another trial: the finished runs are not reported for it
    assert main(["study", "--grid", str(grid), "--list", *overrides, "steps=3"]) == 0
    listing = capsys.readouterr().out
    assert "0  to run    loss=ns" in listing and "1  to run    loss=hinge" in listing
    assert "2 trial folder(s) in" in listing and "belong to no trial of this grid" in listing
    assert main(["study", "--grid", str(grid), "--index", "2"]) == 1
    assert "out of range" in capsys.readouterr().err


def test_train_help_lists_overrides_resume_and_every_config_key_with_its_default(capsys):
    import json
    import re

    from fastgan.train.config import FIELDS, Config

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--resume" in text and "key=value" in text and "--config" in text and "docs/training.md" in text
    for key, default in Config().to_dict().items():
        shown = default if isinstance(default, str) else json.dumps(default)
        assert re.search(rf"^  {key} +{re.escape(shown)}$", text, re.MULTILINE), key
    assert len(FIELDS) > 20


def test_the_cli_module_imports_nothing_heavy(help_run):
    """`--help` and usage errors must not wait for torch and the trainer: the module's top level
    imports only the standard library, and `--help` loads no command's modules."""
    import ast

    import fastgan.__main__ as cli

    tree = ast.parse(open(cli.__file__).read())
    top_level = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top_level |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert top_level <= {"__future__", "argparse", "errno", "signal", "sys", "pathlib", "threading", "typing"}, top_level
    assert help_run["modules"] == "[]"


def test_python_m_fastgan_help_does_not_import_torch():
    """The package's own import is what `python -m fastgan` pays first: it must leave torch to the commands."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "fastgan", "--help"], capture_output=True, text=True, check=True)
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "usage: python -m fastgan" in run.stdout
    assert "torch" not in imported and "fastgan.ops" not in imported


def test_import_fastgan_registers_the_ops():
    code = "import fastgan, torch; torch.ops.fastgan.spectral_normalize; print(fastgan.nn.spectral_norm.__name__)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "spectral_norm"


# --------------------------------------------------------------------------- OS errors: one line, the path, what to do


def _one_line_error(capsys):
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    return captured.err


def test_describe_os_error_names_the_path_and_what_to_do():
    import errno

    from fastgan.__main__ import describe_os_error

    cases = {errno.ENOSPC: "free some space", errno.EACCES: "permission denied", errno.EROFS: "read-only file system",
             errno.ENOTDIR: "a file where a folder is needed", errno.EEXIST: "exists already"}
    for number, advice in cases.items():
        message = describe_os_error(OSError(number, "os text", "/runs/x/checkpoint.pt"))
        assert message.startswith("/runs/x/checkpoint.pt: ") and advice in message
    assert "--resume continues" in describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/a"))
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device")).startswith("no space left on the device: free")
    assert describe_os_error(FileNotFoundError("checkpoint not found: /a.pt")) == "checkpoint not found: /a.pt"
    assert describe_os_error(OSError(errno.EIO, "Input/output error", "/a", None, "/b")) == "/a -> /b: Input/output error"


def test_sigterm_while_a_folder_is_decoded_exits_75_and_leaves_no_partial_cache(tmp_path, monkeypatch, capsys):
    """SIGTERM before training starts (here while the data cache is decoded) unwinds: the
    half-written cache is removed and the exit status is the one schedulers requeue."""
    import os
    import signal

    from fastgan.train import data

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(5):
        Image.fromarray(np.random.default_rng(index).integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    decode, calls = data._decode_image, []

    def decode_then_stop(path, size):
        calls.append(path)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return decode(path, size)

    monkeypatch.setattr(data, "_decode_image", decode_then_stop)
    monkeypatch.setenv("FASTGAN_DATA", str(tmp_path / "data"))
    previous = signal.getsignal(signal.SIGTERM)
    assert main(["train", *TINY_RUN, "steps=1", "dataset=folder", f"data_root={folder}", f"out_dir={tmp_path / 'run'}"]) == 75
    assert "stopped by SIGTERM" in capsys.readouterr().err and len(calls) == 3
    assert list((tmp_path / "data" / "folders").iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is previous


def test_train_into_a_path_below_a_file(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    out_dir = tmp_path / "file" / "run"
    assert main(["train", *TINY_RUN, "steps=1", f"out_dir={out_dir}"]) == 1
    err = _one_line_error(capsys)
    assert str(tmp_path / "file") in err and "a file where a folder is needed" in err


def test_train_into_a_read_only_out_dir(tmp_path, monkeypatch, capsys):
    """Root ignores permissions, so the read-only file system is simulated: every write below out_dir fails."""
    import builtins
    import errno
    import io
    import os

    out_dir = tmp_path / "read-only"
    out_dir.mkdir()

    def read_only(function, writes):
        def guarded(path, *args, **kwargs):
            if str(path).startswith(str(out_dir)) and writes(*args, **kwargs):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return function(path, *args, **kwargs)
        return guarded

    writing_mode = lambda mode="r", *a, **k: any(c in mode for c in "wax+")
    writing_flags = lambda flags, *a, **k: flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
    monkeypatch.setattr(builtins, "open", read_only(builtins.open, writing_mode))
    monkeypatch.setattr(io, "open", read_only(io.open, writing_mode))
    monkeypatch.setattr(os, "open", read_only(os.open, writing_flags))
    monkeypatch.setattr(os, "mkdir", read_only(os.mkdir, lambda *a, **k: True))
    assert main(["train", *TINY_RUN, "steps=1", f"out_dir={out_dir}"]) == 1
    err = _one_line_error(capsys)
    assert f"error: {out_dir}" in err and "read-only file system: choose a writable location" in err


def test_train_on_a_full_disk_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    from fastgan.train import checkpoint

    run = tmp_path / "run"
    assert main(["train", *TINY_RUN, "steps=1", f"out_dir={run}"]) == 0
    capsys.readouterr()
    saved = (run / "checkpoint.pt").read_bytes()

    monkeypatch.setattr(checkpoint, "open", lambda name, mode: FullDisk(open(name, mode)), raising=False)
    assert main(["train", "--resume", *TINY_RUN, "steps=2", f"out_dir={run}"]) == 1
    err = _one_line_error(capsys)
    assert f"error: {run / 'checkpoint.pt'}: no space left on the device" in err and "--resume" in err
    assert "enforce fail" not in err
    assert (run / "checkpoint.pt").read_bytes() == saved
    assert not [p for p in run.iterdir() if p.name.endswith(".part")]


def test_a_full_disk_while_logging_names_the_run(tmp_path, monkeypatch, capsys):
    import errno

    from fastgan.train.outputs import MetricsLog

    def full_disk(self, step, values):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(MetricsLog, "write", full_disk)
    run = tmp_path / "run"
    assert main(["train", *TINY_RUN, "steps=1", f"out_dir={run}"]) == 1
    assert f"error: {run}: no space left on the device" in _one_line_error(capsys)


def test_train_on_cifar10_without_network_points_to_data_root(tmp_path, monkeypatch, capsys):
    from fastgan.train import data

    monkeypatch.setattr(data, "CIFAR10_URL", (tmp_path / "offline" / data.CIFAR10_ARCHIVE).as_uri())
    assert main(["train", *TINY_RUN, "dataset=cifar10", f"data_root={tmp_path / 'data'}", f"out_dir={tmp_path / 'run'}"]) == 1
    err = _one_line_error(capsys)
    assert "cannot download CIFAR-10" in err and str(tmp_path / "data") in err and "data_root=" in err


def test_sample_from_a_garbage_checkpoint(tmp_path, capsys):
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02 certainly not a checkpoint")
    assert main(["sample", "--checkpoint", str(tmp_path / "garbage.pt")]) == 1
    err = _one_line_error(capsys)
    assert "is not a fastgan checkpoint" in err and "weights_only" not in err.replace("weights_only=True", "")


def test_train_under_torchrun_with_two_cpu_processes(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastgan", "train", *TINY_RUN, "steps=2", f"out_dir={run}"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("step 2/2") == 1  # rank 0 reports
    from fastgan.train import checkpoint

    assert checkpoint.load(run / "checkpoint.pt")["world_size"] == 2


# --------------------------------------------------------------------------- sample and gs: misuse


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    run = tmp_path_factory.mktemp("sample") / "run"
    assert main(["train", *TINY_RUN, "steps=1", "sample_every=0", f"out_dir={run}"]) == 0
    return run / "checkpoint.pt"


def test_sample_checks_its_arguments_before_any_work(tmp_path, capsys):
    """A destination PIL cannot write (no suffix, .txt) used to fail only after every sample was drawn
    (the checkpoint named here does not exist: an error about it would mean it was loaded first);
    --columns 0 was silently a square grid, a negative one a tensor-size error after the work."""
    missing = str(tmp_path / "none.pt")
    for out in (tmp_path / "samples", tmp_path / "grid.txt"):
        assert main(["sample", "--checkpoint", missing, "--out", str(out)]) == 1
        assert f"error: {out}: not the name of an image file" in _one_line_error(capsys)
    for columns in ("0", "-3"):
        with pytest.raises(SystemExit) as usage_error:
            main(["sample", "--checkpoint", missing, "--columns", columns])
        assert usage_error.value.code == 2
        assert f"argument --columns: must be an integer >= 1, got {columns}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_sample_into_a_folder_refuses_images_it_would_not_overwrite(tiny_checkpoint, tmp_path, capsys):
    """`fid real/ fake/` reads every image in fake/: 3 new samples over 5 old ones used to leave
    sample-00003.png and sample-00004.png of the old checkpoint among them."""
    folder = tmp_path / "fake"
    assert main(["sample", "--checkpoint", str(tiny_checkpoint), "--n", "5", "--out", f"{folder}/"]) == 0
    capsys.readouterr()
    old = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["sample", "--checkpoint", str(tiny_checkpoint), "--n", "3", "--seed", "1", "--out", str(folder)]) == 1
    err = _one_line_error(capsys)
    assert f"{folder} already holds 2 image(s) that 3 samples would not overwrite (sample-00003.png, ...)" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == old
    # the same count (a rerun, another seed or checkpoint) replaces them all; other files do not matter
    (folder / "notes.txt").write_text("not an image")
    assert main(["sample", "--checkpoint", str(tiny_checkpoint), "--n", "5", "--seed", "1", "--out", str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == sorted([*old, "notes.txt"])
    assert all((folder / name).read_bytes() != data for name, data in old.items())


def test_sample_refuses_a_diverged_generator(tiny_checkpoint, tmp_path, capsys):
    """NaN used to become black pixels (NaN cast to uint8): PNGs of nothing, and an FID computed on them."""
    import torch

    from fastgan.train import checkpoint

    state = checkpoint.load(tiny_checkpoint)
    state["G"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state["G"].items()}
    diverged = tmp_path / "diverged.pt"
    torch.save(state, diverged)
    for out in (tmp_path / "grid.png", tmp_path / "fake"):
        assert main(["sample", "--checkpoint", str(diverged), "--n", "3", "--out", f"{out}/" if out.suffix == "" else str(out)]) == 1
        last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
        assert last.startswith(f"error: {diverged}: the generator's output holds NaN or infinite values, first in sample 0")
    assert not (tmp_path / "grid.png").exists() and list((tmp_path / "fake").iterdir()) == []


def test_sample_is_reproducible_by_seed(tiny_checkpoint, tmp_path, capsys):
    run = lambda seed, name: main(["sample", "--checkpoint", str(tiny_checkpoint), "--n", "4", "--seed", seed,
                                   "--out", str(tmp_path / name)])  # noqa: E731
    assert run("7", "a.png") == 0 and run("7", "b.png") == 0 and run("8", "c.png") == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes() != (tmp_path / "c.png").read_bytes()


def test_gs_point_set_errors_name_the_file(tmp_path, capsys):
    """NaN used to be reported as "x contains NaN or Inf" (which side?), an unreadable .npy with numpy's
    advice to unpickle it, a truncated .npz as a BadZipFile traceback, a complex array not at all."""
    rng = np.random.default_rng(0)
    good = str(tmp_path / "good.npy")
    np.save(good, rng.normal(size=(80, 3)))
    with_nan = rng.normal(size=(80, 3))
    with_nan[[5, 9], 1] = np.nan
    np.save(tmp_path / "nan.npy", with_nan)
    (tmp_path / "text.npy").write_text("not an array")
    np.savez(tmp_path / "full.npz", points=rng.normal(size=(80, 3)))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "full.npz").read_bytes()[:200])
    np.save(tmp_path / "complex.npy", rng.normal(size=(80, 3)) + 1j)
    cases = {"nan.npy": "2 of its 80 points have NaN or infinite coordinates (the first: row 5)",
             "text.npy": "numpy cannot read it as an array", "cut.npz": "numpy cannot read it as an array",
             "complex.npy": "a point set is a 2-D numeric array (N, d) of real numbers, got complex128"}
    for name, message in cases.items():
        path = str(tmp_path / name)
        assert main(["gs", good, path, "--sets", "2", "--workers", "1", "--device", "cpu"]) == 1
        err = _one_line_error(capsys)
        assert f"error: {path}: {message}" in err and "allow_pickle" not in err, err


def test_gs_plot_destination_is_checked_before_the_work(tmp_path, capsys):
    """A format matplotlib cannot write used to fail after the score was computed (hours, for large
    sets); a folder that did not exist yet too, where `sample` and `dirac` make theirs."""
    rng = np.random.default_rng(1)
    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    np.save(a, rng.normal(size=(40, 2)))
    np.save(b, rng.normal(size=(40, 2)))
    options = ["--sets", "2", "--landmarks", "8", "--workers", "1", "--device", "cpu"]
    assert main(["gs", a, b, "--plot", str(tmp_path / "mrlt.xyz"), *options]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "mrlt.xyz: matplotlib writes no .xyz files" in captured.err
    plot = tmp_path / "plots" / "mrlt.png"
    assert main(["gs", a, b, "--plot", str(plot), *options]) == 0
    assert plot.stat().st_size > 0


def test_gs_with_replacement_draws_as_the_authors_code(tmp_path, capsys):
    """--with-replacement: landmark sets drawn with replacement (repeats allowed, L_0 may pass N),
    the score of geometry_score(..., replace=True) with the same seed."""
    import torch

    from fastgan.metrics.geometry_score import geometry_score

    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 2)), rng.normal(size=(30, 2)) * 1.5
    a, b = str(tmp_path / "a.npy"), str(tmp_path / "b.npy")
    np.save(a, x)
    np.save(b, y)
    options = ["--sets", "3", "--landmarks", "12", "--gamma", "0.2", "--seed", "4", "--workers", "1", "--device", "cpu"]
    assert main(["gs", a, b, "--with-replacement", *options]) == 0
    expected = geometry_score(x, y, n=3, L_0=12, gamma=0.2, generator=torch.Generator().manual_seed(4), workers=1,
                              replace=True)
    assert capsys.readouterr().out == f"GS: {expected:.6g}\n"
    assert main(["gs", a, b, "--with-replacement", *options[:2], "--landmarks", "40", *options[4:]]) == 0  # L_0 > N


def test_gs_plot_labels_both_sides_when_their_names_match(tmp_path, monkeypatch):
    """runs/a/points.npy against runs/b/points.npy (or a file against itself): one legend key
    per file name hid one side's curve."""
    from fastgan.metrics import geometry_score

    rng = np.random.default_rng(2)
    for run in ("a", "b"):
        (tmp_path / run).mkdir()
        np.save(tmp_path / run / "points.npy", rng.normal(size=(40, 2)))
    a, b = str(tmp_path / "a" / "points.npy"), str(tmp_path / "b" / "points.npy")
    plotted = []
    monkeypatch.setattr(geometry_score, "plot_mrlt", lambda mrlts, path, title: plotted.append(list(mrlts)))
    options = ["--sets", "2", "--landmarks", "8", "--workers", "1", "--device", "cpu", "--plot", str(tmp_path / "p.png")]
    assert main(["gs", a, b, *options]) == 0
    assert main(["gs", a, a, *options]) == 0
    assert main(["gs", a, str(tmp_path / "b" / ".." / "a" / "points.npy"), *options]) == 0
    assert plotted == [[a, b], [f"{a} (A)", f"{a} (B)"], [a, str(tmp_path / "b" / ".." / "a" / "points.npy")]]


def test_fid_refuses_to_save_statistics_over_the_file_it_compares_with(tmp_path, capsys):
    """--save-stats naming PATH_B wrote PATH_A's statistics there, then read them back: FID 0.000000."""
    a = _folder(tmp_path / "a", 3, 10, 16)
    mu, sigma = np.zeros(2048), np.eye(2048)
    np.savez(tmp_path / "b.npz", mu=mu, sigma=sigma)
    before = (tmp_path / "b.npz").read_bytes()
    assert main(["fid", a, str(tmp_path / "b.npz"), "--save-stats", str(tmp_path / "b.npz"),
                 "--weights", str(tmp_path / "no-weights.pth"), "--device", "cpu"]) == 1
    assert "is PATH_B: saving" in _one_line_error(capsys)
    assert (tmp_path / "b.npz").read_bytes() == before


class _NetworkThatReadsNoImage(torch.nn.Module):
    feature_dim = 2048

    def forward(self, images):
        raise AssertionError("an image went through the network before the statistics file was checked")


@pytest.mark.parametrize("case", ["nan", "dimension", "not psd"])
def test_fid_checks_saved_statistics_before_reading_any_image(tmp_path, capsys, monkeypatch, case):
    """A bad .npz was refused only after every image of the other side had gone through the network."""
    from fastgan import __main__ as cli

    monkeypatch.setattr(cli, "_network", lambda args: _NetworkThatReadsNoImage())
    a = _folder(tmp_path / "a", 3, 11, 16)
    d = 64 if case == "dimension" else 2048
    mu, sigma = np.zeros(d), np.eye(d)
    if case == "nan":
        mu[3] = np.nan
    if case == "not psd":
        sigma[5, 5] = -1.0
    np.savez(tmp_path / "saved.npz", mu=mu, sigma=sigma)
    assert main(["fid", a, str(tmp_path / "saved.npz"), "--device", "cpu"]) == 1
    err = _one_line_error(capsys)
    assert "saved.npz" in err, err
    assert {"nan": "NaN or Inf", "dimension": "64-dimensional", "not psd": "positive semi-definite"}[case] in err, err


def test_statistics_files_are_told_by_their_suffix_in_any_case(tmp_path, capsys):
    """UP.NPZ was "neither an image folder nor an .npz statistics file"."""
    rng = np.random.default_rng(12)
    x = rng.standard_normal((30, 5))
    with open(tmp_path / "UP.NPZ", "wb") as file:  # a file object: savez adds no ".npz"
        np.savez(file, mu=x.mean(0), sigma=np.cov(x.T))
    np.savez(tmp_path / "low.npz", mu=x.mean(0) + 1, sigma=np.cov(x.T))
    assert main(["fid", str(tmp_path / "UP.NPZ"), str(tmp_path / "low.npz")]) == 0
    assert float(capsys.readouterr().out.split("FID:")[1]) == pytest.approx(5.0, rel=1e-9)


@pytest.mark.parametrize("argv, message", [
    (["kid", "A", "A", "--subsets", "0"], "--subsets: must be an integer >= 1, got 0"),
    (["kid", "A", "A", "--subset-size", "1"], "--subset-size: must be an integer >= 2, got 1"),
    (["kid", "A", "A", "--subset-size", "-5"], "--subset-size: must be an integer >= 2, got -5"),
    (["is", "A", "--splits", "0"], "--splits: must be an integer >= 1, got 0"),
])
def test_kid_and_inception_score_sizes_are_usage_errors(tmp_path, capsys, argv, message):
    """They exited 1 with the metric's message, which named no option."""
    with pytest.raises(SystemExit) as stopped:
        main([str(tmp_path / "a") if word == "A" else word for word in argv])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


class _ClassOfColour(torch.nn.Module):
    """A stand-in Inception whose classifier calls an image's class by its grey level."""
    fc = True

    def logits(self, images):
        classes = (images.mean(dim=(1, 2, 3)) * 10).round().long()
        return torch.nn.functional.one_hot(classes, 1008).double() * 50


def test_inception_score_command_shuffles_a_class_ordered_folder(tmp_path, capsys, monkeypatch):
    """Images named in class order were split consecutively: each split held one class (IS 1.0)."""
    from fastgan import __main__ as cli

    monkeypatch.setattr(cli, "_network", lambda args: _ClassOfColour())
    folder = tmp_path / "ordered"
    folder.mkdir()
    for i in range(20):  # classes 0..9, two images each, in name order
        Image.fromarray(np.full((8, 8, 3), round(255 * (i // 2) / 10), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    scores = {}
    for flags in ([], ["--no-shuffle"], ["--shuffle-seed", "7"]):
        assert main(["is", str(folder), "--device", "cpu", *flags]) == 0
        scores[" ".join(flags)] = float(capsys.readouterr().out.split("IS:")[1].split("±")[0])
    assert scores["--no-shuffle"] == pytest.approx(1.0)
    assert scores[""] > 1.2 and scores["--shuffle-seed 7"] > 1.2


class _MeanColour(torch.nn.Module):
    """A stand-in Inception: an image's features are its mean colour."""
    feature_dim = 3

    def forward(self, images):
        return images.mean(dim=(2, 3))


def test_images_are_read_by_worker_threads_in_order(tmp_path, capsys, monkeypatch):
    """--num-workers threads decode and resize one batch ahead: the statistics are those of one
    thread, in file order, and a file that cannot be read is the same one-line error."""
    from fastgan import __main__ as cli

    monkeypatch.setattr(cli, "_network", lambda args: _MeanColour())
    folder = _folder(tmp_path / "a", 7, 13, 12)
    saved = {}
    for workers in ("1", "3"):
        out = str(tmp_path / f"w{workers}.npz")
        assert main(["stats", folder, out, "--batch-size", "2", "--num-workers", workers, "--device", "cpu"]) == 0
        with np.load(out) as arrays:
            saved[workers] = (arrays["mu"], arrays["sigma"])
    assert all(np.array_equal(a, b) for a, b in zip(saved["1"], saved["3"]))
    capsys.readouterr()
    (tmp_path / "a" / "03.png").write_bytes(b"not an image")
    assert main(["stats", folder, str(tmp_path / "bad.npz"), "--batch-size", "2", "--num-workers", "3",
                 "--device", "cpu"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: cannot read image") and "03.png" in last, last
    assert not (tmp_path / "bad.npz").exists()
