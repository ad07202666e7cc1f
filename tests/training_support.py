"""What the training tests share: a tiny run's config keys and reading a run's metrics."""
import json
from pathlib import Path

# 16 px digits, a quarter-width SNDCGAN, batch 8, no FID, samples, checkpoints or progress bar.
TINY_TRAINING = ["image_size=16", "width=0.25", "batch_size=8", "fid_every=0", "sample_every=0", "checkpoint_every=0",
                 "log_every=1", "progress=false"]


def metrics_records(out_dir) -> list:
    """The records of a run's metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
