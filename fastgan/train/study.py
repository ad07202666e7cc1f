"""The study: a grid of training runs and a table of their FIDs.

A grid file (``configs/study/*.yaml``; docs/study.md)::

    base: ../sndcgan_cifar10.yaml      # a config file, relative to the grid file (optional)
    settings: {steps: 20000}           # keys set in every trial (optional)
    out_dir: runs/study/losses         # where trials go (default runs/study/<grid name>)
    axes:                              # the cartesian product of these, in this order
      loss: [ns, wgan, lsgan, hinge]   # a value sets the key named by the axis
      optimizer:                       # a mapping sets several keys at once (e.g. lr/β pairs)
        - {g_lr: 2.0e-4, g_betas: [0.5, 0.999]}
        - {g_lr: 1.0e-4, g_betas: [0.5, 0.9]}

A trial's identity is its full resolved config (base, settings, overrides and its
axes' choices, with every default filled in): trial i runs in
``out_dir/trial-<hash>``, the hash being that of its config without the keys listed in
:data:`PRESENTATION_KEYS` (they change what a run writes on the way, never its
parameters or FIDs), together with the trainer's ``TRAINER_VERSION``. So editing the grid never relabels old results: an unchanged trial
finds its folder wherever it moved in the grid, a changed one (another loss, more steps,
a new default) gets a new folder and runs afresh, and folders of trials no longer in the
grid are left alone (``--list`` counts them). ``trial.json`` in each folder records the
config and its hash; a folder whose ``trial.json`` does not match is refused.

A trial counts as finished (or diverged: its losses or images went NaN or Inf) when its
``summary.json`` says so; finished and diverged trials are skipped, interrupted ones resume. ``results.csv`` and ``results.md`` list every trial
of the grid: its settings, status, final and best FID, and folder.
"""
from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from fastgan.train.config import Config, from_mapping, merge_settings, parse_overrides, read_yaml
from fastgan.files import write_text_atomic
from fastgan.train.trainer import CHECKPOINT, SUMMARY, TRAINER_VERSION, RunInProgress, Trainer

# Config keys outside a trial's identity: where it writes, progress bars, and how often it logs,
# saves sample grids and checkpoints. None of them changes the trained parameters or the FIDs.
PRESENTATION_KEYS = frozenset({"out_dir", "progress", "log_every", "sample_every", "checkpoint_every",
                               "sample_grid", "download"})
TRIAL_FILE = "trial.json"
_TRIAL_PREFIX = "trial-"


def config_hash(config: Config) -> str:
    """A hex digest of every key of ``config`` except :data:`PRESENTATION_KEYS`, and of the
    trainer's version (bumped when the same config would train differently)."""
    identity = {k: v for k, v in config.to_dict().items() if k not in PRESENTATION_KEYS}
    identity["trainer_version"] = TRAINER_VERSION
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@dataclass
class Trial:
    index: int
    settings: Dict[str, Any]  # the axes' choices for this trial
    config: Config            # out_dir is the trial's folder

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    def summary(self) -> Optional[dict]:
        return self._summary_file() if self.holds_this_trial() else None

    def _summary_file(self) -> Optional[dict]:
        path = self.out_dir / SUMMARY
        if not path.is_file():
            return None
        with open(path) as f:
            return json.load(f)

    @property
    def finished(self) -> bool:
        return bool((self.summary() or {}).get("finished"))

    @property
    def status(self) -> str:
        """finished | diverged (stopped at NaN or Inf: a result too, never run again) | started (a
        checkpoint to resume) | to run | changed (the folder's run went on with another config, as
        ``train --resume`` with more steps does: no longer this trial's, never reported or run)."""
        if self.run_changes():  # the folder's config.yaml is read once per status
            return "changed"
        if not self._records_this_config():
            return "to run"
        summary = self._summary_file() or {}
        if summary.get("finished"):
            return "finished"
        if summary.get("diverged_at") is not None:
            return "diverged"
        return "started" if (self.out_dir / CHECKPOINT).is_file() else "to run"

    def recorded(self) -> Optional[dict]:
        """The folder's ``trial.json`` (None when there is none)."""
        path = self.out_dir / TRIAL_FILE
        if not path.is_file():
            return None
        with open(path) as f:
            return json.load(f)

    def run_changes(self) -> Optional[str]:
        """How the config the folder's run last trained with (its ``config.yaml``) differs from
        this trial's, or None when it does not (or no run has started there)."""
        path = self.out_dir / "config.yaml"
        if not path.is_file() or self.recorded() is None:
            return None
        try:
            ran = from_mapping(read_yaml(str(path)))
        except ValueError as error:
            return f"its config.yaml is not a config of this fastgan ({error})"
        return None if config_hash(ran) == self.config_hash else self._differences(ran.to_dict())

    def holds_this_trial(self) -> bool:
        """Whether the folder's ``trial.json`` records this trial's config and its run trained
        with it: only then do its summary and checkpoint count as this trial's."""
        return self._records_this_config() and self.run_changes() is None

    def _records_this_config(self) -> bool:
        record = self.recorded()
        return record is not None and record.get("config_hash") == self.config_hash

    def _differences(self, saved: Dict[str, Any]) -> str:
        ours = self.config.to_dict()
        return ", ".join(f"{k}: {saved.get(k)!r} -> {ours[k]!r}" for k in ours
                         if k not in PRESENTATION_KEYS and saved.get(k) != ours[k]) or "unknown keys"

    def check_folder(self) -> None:
        """ValueError when the folder holds a run of another config (copied or edited by hand)."""
        record = self.recorded()
        if record is None:
            if self.out_dir.is_dir() and any(self.out_dir.iterdir()):
                raise ValueError(f"{self.out_dir} holds files but no {TRIAL_FILE}, so it is not known to be trial "
                                 f"{self.index}'s run; move it away (or delete it) to run the trial")
            return
        if record.get("config_hash") != self.config_hash:
            raise ValueError(f"{self.out_dir} holds a run of another config than trial {self.index}'s "
                             f"({self._differences(record.get('config') or {})}); move it away (or delete it) to run the trial")
        changes = self.run_changes()
        if changes:
            raise ValueError(f"the run in {self.out_dir} went on with another config than trial {self.index}'s "
                             f"({changes}, from the run's config.yaml to the trial's), so it is no longer the trial's "
                             "run; move it away (or delete it) to run the trial")

    def record(self) -> None:
        write_text_atomic(self.out_dir / TRIAL_FILE, json.dumps(
            {"config_hash": self.config_hash, "index": self.index, "settings": self.settings,
             "config": self.config.to_dict()}, indent=2) + "\n")

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.settings.items())


@dataclass
class Study:
    name: str
    out_dir: Path
    axes: Dict[str, List[Any]]
    trials: List[Trial]

    def other_folders(self) -> List[Path]:
        """Trial folders in ``out_dir`` that belong to no trial of the grid (e.g. of an earlier version of it)."""
        ours = {trial.out_dir.name for trial in self.trials}
        if not self.out_dir.is_dir():
            return []
        return sorted(p for p in self.out_dir.iterdir()
                      if p.is_dir() and p.name.startswith(_TRIAL_PREFIX) and p.name not in ours)


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
    for key in ("base", "out_dir"):
        if grid.get(key) is not None and not isinstance(grid[key], str):
            what = "a config file name" if key == "base" else "a folder name"
            raise ValueError(f"{path}: '{key}' must be {what}, got {grid[key]!r}")
    if grid.get("settings") is not None and not isinstance(grid["settings"], dict):
        raise ValueError(f"{path}: 'settings' must be a mapping of config keys, got {type(grid['settings']).__name__}")
    base = read_yaml(str(Path(path).parent / grid["base"])) if grid.get("base") else {}
    name = Path(path).stem
    out_dir = Path(grid.get("out_dir") or f"runs/study/{name}").expanduser()
    base.pop("out_dir", None)  # the trials' folders go below the grid's out_dir
    common = merge_settings(grid.get("settings") or {}, parse_overrides(overrides))
    if "out_dir" in common:
        raise ValueError(f"{path}: out_dir is a key of the grid itself (the trials' folders go below it), "
                         "not a setting or an override")
    common = merge_settings(base, common)
    trials, folders = [], {}
    for index, combination in enumerate(itertools.product(*(axes[a] for a in axes))):
        choices = [_axis_choice(axis, item) for axis, item in zip(axes, combination)]
        settings = {key: value for choice in choices for key, value in choice.items()}
        if "out_dir" in settings:
            raise ValueError(f"{path}: an axis sets out_dir ({settings['out_dir']!r}), which is the grid's own key "
                             "(each trial's folder goes below it)")
        try:
            config = from_mapping(merge_settings(common, *choices))
        except ValueError as error:
            described = " ".join(f"{k}={v}" for k, v in settings.items())
            raise ValueError(f"{path}: trial {index} ({described}): {error}") from None
        folder = out_dir / f"{_TRIAL_PREFIX}{config_hash(config)[:16]}"
        if folder in folders:
            raise ValueError(f"{path}: trials {folders[folder]} and {index} have the same config "
                             f"({Trial(index, settings, config).describe()}); remove the duplicate choice")
        folders[folder] = index
        trials.append(Trial(index, settings, config.replace(out_dir=str(folder))))
    return Study(name, out_dir, axes, trials)


def run_study(study: Study, index: Optional[int] = None) -> bool:
    """Run every unfinished trial (or only trial ``index``), writing the results table after
    each; returns False when a stop signal interrupted a trial (the rest are not started)."""
    total = len(study.trials)
    if index is not None and not 0 <= index < total:
        raise ValueError(f"trial index {index} is out of range: the grid has {total} trials (0..{total - 1})")
    chosen = study.trials if index is None else [study.trials[index]]
    for trial in chosen:
        label = f"trial {trial.index + 1}/{total} (index {trial.index})"
        if trial.status in ("finished", "diverged"):
            print(f"{label}: {trial.status} already ({trial.out_dir}), skipped")
            continue
        trial.check_folder()
        print(f"{label}: {trial.describe()} -> {trial.out_dir}")
        trial.record()
        try:
            summary = Trainer(trial.config, resume=True).fit()
        except RunInProgress as busy:  # another study process (or job) has it: the next trial, then
            print(f"{label}: skipped: {busy}")
            continue
        write_results(study)
        if not summary["finished"] and summary["diverged_at"] is None:
            return False
    write_results(study)
    return True


def results_rows(study: Study) -> List[Dict[str, Any]]:
    keys = list(dict.fromkeys(k for trial in study.trials for k in trial.settings))
    vaes = _all_vaes(study)
    rows = []
    for trial in study.trials:
        summary = trial.summary() or {}
        row = {"trial": trial.index, **{k: trial.settings.get(k, "") for k in keys}, "status": trial.status,
               "steps": summary.get("step", ""), "final_fid": summary.get("final_fid"), "best_fid": summary.get("best_fid"),
               "best_step": summary.get("best_step"), "folder": trial.out_dir.name}
        if vaes:  # rate and distortion (nats) as on rate_distortion.png
            point = _rate_distortion_point(trial) or {}
            row = {**row, "rate": point.get("rate"), "distortion": point.get("distortion")}
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
    markdown += ["| " + " | ".join(_cell(row[c], c in _MEASURED) for c in columns) + " |" for row in rows]
    write_text_atomic(study.out_dir / "results.csv", text.getvalue())
    path = study.out_dir / "results.md"
    write_text_atomic(path, "\n".join(markdown) + "\n")
    if _all_vaes(study):
        _plot_rate_distortion(study)
    return path


def _all_vaes(study: Study) -> bool:
    return all(trial.config.model == "vae" for trial in study.trials)


def _rate_distortion_point(trial: Trial) -> Optional[Dict[str, float]]:
    """A VAE trial's rate, distortion and H (nats) from its log, or None before it logged a step."""
    from fastgan.train.outputs import read_records
    from fastgan.train.vae_step import final_rate_distortion

    return final_rate_distortion(read_records(trial.out_dir / "metrics.jsonl"))


def _plot_rate_distortion(study: Study) -> None:
    """``rate_distortion.png``: each VAE trial that logged a step as a point of the R–D plane."""
    from fastgan.train.vae_step import plot_rate_distortion

    points = [(trial.describe(), run) for trial in study.trials if (run := _rate_distortion_point(trial)) is not None]
    if points:
        plot_rate_distortion(points, study.out_dir / "rate_distortion.png")


# Columns of measured values, shown to 3 decimals; settings are shown as written (a learning rate of
# 1e-4 or 2e-4 would round to 0.000).
_MEASURED = frozenset({"final_fid", "best_fid", "rate", "distortion"})


def _cell(value: Any, measured: bool) -> str:
    return f"{value:.3f}" if measured and isinstance(value, float) else str(value)


__all__ = ["PRESENTATION_KEYS", "Study", "Trial", "config_hash", "read_study", "results_rows", "run_study",
           "write_results"]
