"""The Python blocks of README.md and docs/*.md run as written.

Each block runs in a fresh namespace after a small setup that defines what its text
leaves to the reader (a D, a batch of images, a latent z), so a renamed function, a
changed signature or a missing import in the documentation fails here. A new block
needs an entry in SETUPS (or in NOT_RUN, with the reason), keyed by its file and its
first line.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_IMAGES = """
import torch
from fastgan.models import build_models
torch.manual_seed(0)
real, fake = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
"""
_SMALL_D = _IMAGES + 'D = build_models("sndcgan", 32, 128, "none", 0.25)[1]\n'

SETUPS = {
    ("README.md", "import torch"): 'from fastgan.models import build_models\nD = build_models("sndcgan", 32, 128, "none", 0.25)[1]\n',
    ("README.md", "from fastgan.penalties import gradient_penalty"): _SMALL_D + "d_loss = D(fake).mean() - D(real).mean()\n",
    ("README.md", "from fastgan.metrics import GeometryScore"): """
import numpy as np
rng = np.random.default_rng(0)
real, fake = rng.normal(size=(70, 2)), rng.normal(size=(70, 2))
idx = rng.permutation(70)[:64]
""",
    ("README.md", "from fastgan.dynamics import DiracGAN"): """
import torch
theta, psi = torch.meshgrid(torch.linspace(-2, 2, 30), torch.linspace(-2, 2, 30), indexing="ij")
""",
    ("README.md", "from fastgan import diagnostics"): """
import torch
torch.manual_seed(0)
G = torch.nn.Sequential(torch.nn.Linear(5, 13), torch.nn.Tanh(), torch.nn.Linear(13, 7))
z = torch.randn(4, 5)
g_loss, weight = G(z).pow(2).mean(), 1.0
""",
    ("README.md", "from fastgan import mixed_batches"): _IMAGES + "z, g = torch.randn(4, 128), torch.Generator().manual_seed(1)\n",
    ("docs/icml2018.md", "from fastgan import mixed_batches"): _IMAGES + "B, g = 4, torch.Generator().manual_seed(1)\n",
    ("docs/icml2018.md", "from fastgan.models import build_models"): _IMAGES + "batch = real\n",
    ("docs/icml2018.md", "from fastgan.models import Lens"): _SMALL_D + 'kind, step, K = "ns", 3, 100\n',
}
NOT_RUN = {
    ("README.md", "from fastgan.graphs import GraphedStep"): "captures CUDA graphs: needs a GPU",
    ("README.md", "from fastgan.metrics import FID, FeatureStatistics, frechet_distance"):
        "InceptionV3.load() reads pytorch-fid's weights from the cache (a download); tests/test_inception.py covers the class",
    ("README.md", ">>> report = fastgan.backends()"): "a session transcript of a GPU-less machine, not code to run",
}


def _blocks():
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for match in re.finditer(r"```python\n(.*?)```", text, re.S):
            code = match.group(1)
            name = str(path.relative_to(ROOT))
            line = text[:match.start()].count("\n") + 1
            yield pytest.param(name, code, id=f"{name}:{line}")


@pytest.mark.parametrize("name, code", _blocks())
def test_documented_block_runs(name, code):
    key = (name, code.strip().splitlines()[0])
    if key in NOT_RUN:
        pytest.skip(NOT_RUN[key])
    assert key in SETUPS, f"{key}: a new documented block; give it a setup in SETUPS (or a reason in NOT_RUN)"
    namespace = {}
    exec(compile(SETUPS[key], f"<setup of {name}>", "exec"), namespace)
    exec(compile(code, f"<{name} block>", "exec"), namespace)


def test_every_setup_and_exclusion_belongs_to_a_block():
    keys = {(param.values[0], param.values[1].strip().splitlines()[0]) for param in _blocks()}
    assert set(SETUPS) | set(NOT_RUN) <= keys
