"""The study: a grid of training runs and a table of their FIDs.

A grid file (``configs/study/*.yaml``)::

    base: ../sndcgan_cifar10.yaml      # a config file, relative to the grid file (optional)
    settings: {steps: 20000}           # keys set in every trial (optional)
    out_dir: runs/study/losses         # where trials go (default runs/study/<grid name>)
    axes:                              # the cartesian product of these, in this order
      loss: [ns, wgan, lsgan, hinge]   # a value sets the key named by the axis
      optimizer:                       # a mapping sets several keys at once (e.g. lr/β pairs)
        - {g_lr: 2.0e-4, g_betas: [0.5, 0.999]}
        - {g_lr: 1.0e-4, g_betas: [0.5, 0.9]}

Trial i runs in ``out_dir/trial-iiii`` and counts as finished when its
``summary.json`` says so; finished trials are skipped, interrupted ones resume.
``results.csv`` and ``results.md`` list every trial: its settings, final and best FID.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from fastgan.train.config import Config, from_mapping, parse_overrides, read_yaml
from fastgan.train.files import write_text_atomic
from fastgan.train.trainer import SUMMARY, Trainer


@dataclass
class Trial:
    index: int
    settings: Dict[str, Any]  # the axes' choices for this trial
    config: Config

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)

    def summary(self) -> Optional[dict]:
        path = self.out_dir / SUMMARY
        if not path.is_file():
            return None
        with open(path) as f:
            return json.load(f)

    @property
    def finished(self) -> bool:
        return bool((self.summary() or {}).get("finished"))

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items())


@dataclass
class Study:
    name: str
    out_dir: Path
    axes: Dict[str, List[Any]]
    trials: List[Trial]


def _axis_choice(axis: str, item: Any) -> Dict[str, Any]:
    return dict(item) if isinstance(item, dict) else {axis: item}


def read_study(path: str, overrides: Iterable[str] = ()) -> Study:
    """The grid of ``path`` with ``key=value`` overrides applied to every trial."""
    grid = read_yaml(path)
    unknown = sorted(set(grid) - {"base", "settings", "out_dir", "axes"})
    if unknown:
        raise ValueError(f"{path}: unknown grid key(s) {', '.join(unknown)} (known: base, settings, out_dir, axes)")
    axes = grid.get("axes") or {}
    if not isinstance(axes, dict) or not axes or not all(isinstance(v, list) and v for v in axes.values()):
        raise ValueError(f"{path}: 'axes' must map each axis name to a non-empty list of choices")
    base = read_yaml(str(Path(path).parent / grid["base"])) if grid.get("base") else {}
    name = Path(path).stem
    out_dir = Path(grid.get("out_dir") or f"runs/study/{name}")
    common = {**base, **(grid.get("settings") or {}), **parse_overrides(overrides)}
    trials = []
    for index, combination in enumerate(itertools.product(*(axes[a] for a in axes))):
        settings = {}
        for axis, item in zip(axes, combination):
            settings.update(_axis_choice(axis, item))
        values = {**common, **settings, "out_dir": str(out_dir / f"trial-{index:04d}")}
        trials.append(Trial(index, settings, from_mapping(values)))
    return Study(name, out_dir, axes, trials)


def run_study(study: Study, index: Optional[int] = None) -> List[Trial]:
    """Run every unfinished trial (or only trial ``index``), then write the results table."""
    if index is not None and not 0 <= index < len(study.trials):
        raise ValueError(f"trial index {index} is out of range: the grid has {len(study.trials)} trials (0..{len(study.trials) - 1})")
    chosen = study.trials if index is None else [study.trials[index]]
    for trial in chosen:
        if trial.finished:
            print(f"trial {trial.index}: finished already ({trial.out_dir}), skipped")
            continue
        print(f"trial {trial.index}/{len(study.trials) - 1}: {trial.describe()} -> {trial.out_dir}")
        Trainer(trial.config, resume=True).fit()
    write_results(study)
    return chosen


def results_rows(study: Study) -> List[Dict[str, Any]]:
    keys = list(dict.fromkeys(k for trial in study.trials for k in trial.settings))
    rows = []
    for trial in study.trials:
        summary = trial.summary() or {}
        status = "finished" if trial.finished else "not finished"
        row = {"trial": trial.index, **{k: trial.settings.get(k, "") for k in keys}, "status": status,
               "steps": summary.get("step", ""), "final_fid": summary.get("final_fid"), "best_fid": summary.get("best_fid"),
               "best_step": summary.get("best_step")}
        rows.append({k: "" if v is None else (list(v) if isinstance(v, tuple) else v) for k, v in row.items()})
    return rows


def write_results(study: Study) -> Path:
    """``results.csv`` and ``results.md`` in the study's out_dir (each written atomically, so
    array jobs finishing together never leave a torn table). Returns the markdown path."""
    rows = results_rows(study)
    columns = list(rows[0])
    text = io.StringIO()
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows(rows)
    markdown = [f"# Study {study.name}: final and best FID per trial", "",
                "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    markdown += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    write_text_atomic(study.out_dir / "results.csv", text.getvalue())
    path = study.out_dir / "results.md"
    write_text_atomic(path, "\n".join(markdown) + "\n")
    return path


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


__all__ = ["Study", "Trial", "read_study", "results_rows", "run_study", "write_results"]
