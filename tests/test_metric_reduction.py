"""The metrics' cross-process reduction of "cat" states (fastgan/metrics/base.py).

Two gloo processes whose 'cat' states disagree with each other: per-sample shapes that
differ must be refused on every rank (not broadcast into one another, nor left to fail
inside the collective on one rank while the other waits), and dtypes must promote as
torch.cat does in one process. Inputs are fresh random tensors of odd sizes; the
promoted result is compared with the single-process value to rtol 1e-10 / atol 1e-12.
"""
import datetime
import os
import re
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastgan.metrics.kid import KID
from fastgan.metrics.ms_ssim import MSSSIM
from conftest import exit_worker


def _attempt(compute):
    try:
        return ("value", compute())
    except Exception as error:  # the outcome on each rank is what the test checks
        return ("error", f"{type(error).__name__}: {error}")


def _mismatch_worker(rank, world, init_file, data, result_pattern):
    # a short timeout: before the fix one rank could wait in a collective the other never joined
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    torch.set_num_threads(1)
    results = {}

    kid = KID(subsets=3, subset_size=7, seed=2)
    kid.update(real_features=data["real"][rank], fake_features=data["fake"][rank])
    results["kid_dtype"] = kid.reduced_states()["real_features"].dtype
    results["kid"] = _attempt(kid.compute)

    channels = MSSSIM(subsets=1)
    channels.update(data["rgb"] if rank == 0 else data["gray"])
    results["channels"] = _attempt(channels.compute)
    torch.save(results, result_pattern.format(rank))   # before the case that could leave a rank waiting

    sizes = MSSSIM(subsets=1)
    sizes.update(data["rgb"] if rank == 0 else data["larger"])
    results["sizes"] = _attempt(sizes.compute)
    torch.save(results, result_pattern.format(rank))
    exit_worker()


@pytest.mark.slow
def test_cat_states_that_disagree_across_processes_are_refused_or_promoted():
    real = [torch.randn(9, 13, dtype=torch.float64).float(), torch.randn(8, 13, dtype=torch.float64)]
    fake = [torch.randn(7, 13, dtype=torch.float64) + 0.4, torch.randn(10, 13, dtype=torch.float64) + 0.4]
    data = {"real": real, "fake": fake,
            "rgb": torch.rand(3, 3, 17, 19), "gray": torch.rand(2, 1, 17, 19), "larger": torch.rand(2, 3, 35, 19)}
    single = KID(subsets=3, subset_size=7, seed=2)
    single.update(real_features=torch.cat(real), fake_features=torch.cat(fake))   # torch.cat promotes to float64
    expected = single.compute()
    with tempfile.TemporaryDirectory() as tmp:
        pattern = os.path.join(tmp, "rank{}.pt")
        mp.spawn(_mismatch_worker, args=(2, os.path.join(tmp, "init"), data, pattern), nprocs=2)
        per_rank = [torch.load(pattern.format(rank)) for rank in range(2)]
    for got in per_rank:
        assert got["kid_dtype"] == torch.float64
        kind, value = got["kid"]
        assert kind == "value", value
        np.testing.assert_allclose([v.item() for v in value], [v.item() for v in expected], rtol=1e-10, atol=1e-12)
        for case, shapes in (("channels", r"rank 0: \(3, 17, 19\), rank 1: \(1, 17, 19\)"),
                             ("sizes", r"rank 0: \(3, 17, 19\), rank 1: \(3, 35, 19\)")):
            kind, value = got[case]
            assert kind == "error", f"{case}: computed {value} from images of different shapes"
            assert value.startswith("ValueError") and re.search(shapes, value), value
