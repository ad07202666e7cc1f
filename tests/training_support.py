"""What the training tests share: a tiny run's config keys, reading a run's metrics, and
training in two processes."""
import json
import os
import tempfile
from pathlib import Path

import torch

# 16 px digits, a quarter-width SNDCGAN, batch 8, no FID, samples, checkpoints or progress bar.
TINY_TRAINING = ["image_size=16", "width=0.25", "batch_size=8", "fid_every=0", "sample_every=0", "checkpoint_every=0",
                 "log_every=1", "progress=false",
                 "device=cpu"]  # the GPU's training runs are tests of their own


def metrics_records(out_dir) -> list:
    """The records of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def train_in_two_processes(overrides: list, out_dir) -> dict:
    """Train with ``overrides`` on two gloo CPU processes (one thread each) into ``out_dir``;
    rank 0's final state dicts, {"G": ..., "D": ...}."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.pt")
        mp.spawn(_train_worker, args=(2, os.path.join(tmp, "init"), overrides + [f"out_dir={out_dir}"], result), nprocs=2)
        return torch.load(result)


def _train_worker(rank, world, init_file, overrides, result_file):
    import torch.distributed as dist

    from conftest import exit_worker
    from fastgan.train.config import load_config
    from fastgan.train.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    trainer = Trainer(load_config(None, overrides))
    trainer.fit()
    if rank == 0:
        torch.save({"G": trainer.G.state_dict(), "D": trainer.D.state_dict()}, result_file)
    exit_worker()
