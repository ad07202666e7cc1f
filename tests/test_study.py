"""Study grids (fastgan.train.study): a trial is its full resolved config, so editing the grid
never relabels or reuses results of another config. Training is replaced by a fake trainer
that writes what a finished run writes (tests/test_cli.py runs a real two-trial study)."""
import json
from pathlib import Path

import pytest

from fastgan.train import study as study_module
from fastgan.train.study import PRESENTATION_KEYS, config_hash, read_study, results_rows, run_study
from fastgan.train.config import save_config
from fastgan.train.trainer import SUMMARY, RunInProgress

FID_BY_LOSS = {"ns": 11.0, "wgan": 22.0, "lsgan": 33.0, "hinge": 44.0}


class FakeTrainer:
    """Writes a summary whose FID identifies the config it was given; records every run."""

    runs = []
    stop_after = None  # a number of steps at which a 'stop signal' arrives
    diverging = ()  # losses whose trials diverge at step 5
    busy = ()  # losses whose trials another process is training

    def __init__(self, config, resume):
        assert resume
        self.config = config

    def fit(self):
        config = self.config
        if config.loss in FakeTrainer.busy:
            raise RunInProgress(f"{config.out_dir} is being trained by another process (host h, process 7)")
        FakeTrainer.runs.append(config)
        steps = config.steps if FakeTrainer.stop_after is None else FakeTrainer.stop_after
        diverged_at = 5 if config.loss in FakeTrainer.diverging else None
        steps = steps if diverged_at is None else diverged_at
        summary = {"step": steps, "steps": config.steps, "finished": steps >= config.steps, "diverged_at": diverged_at,
                   "final_fid": None if diverged_at else FID_BY_LOSS[config.loss] + config.steps, "best_fid": None,
                   "best_step": None, "out_dir": config.out_dir}
        out = Path(config.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoint.pt").write_bytes(b"")
        if summary["finished"] or diverged_at is not None:
            (out / SUMMARY).write_text(json.dumps(summary))
        return summary


@pytest.fixture(autouse=True)
def fake_trainer(monkeypatch):
    FakeTrainer.runs, FakeTrainer.stop_after, FakeTrainer.diverging, FakeTrainer.busy = [], None, (), ()
    monkeypatch.setattr(study_module, "Trainer", FakeTrainer)
    return FakeTrainer


def write_grid(path, losses, steps=100, extra=""):
    path.write_text(f"settings: {{steps: {steps}}}\nout_dir: {path.parent / 'study'}\n"
                    f"axes:\n  loss: [{', '.join(losses)}]\n{extra}")
    return str(path)


def final_fids(grid):
    return {row["loss"]: (row["status"], row["final_fid"]) for row in results_rows(read_study(grid))}


def test_adding_a_choice_keeps_every_result_with_its_own_config(tmp_path):
    grid = write_grid(tmp_path / "grid.yaml", ["ns", "hinge"])
    assert run_study(read_study(grid))
    assert final_fids(grid) == {"ns": ("finished", 111.0), "hinge": ("finished", 144.0)}
    # lsgan inserted before hinge: hinge moves from index 1 to 2, and its result moves with it
    grid = write_grid(tmp_path / "grid.yaml", ["ns", "lsgan", "hinge"])
    assert final_fids(grid) == {"ns": ("finished", 111.0), "lsgan": ("to run", ""), "hinge": ("finished", 144.0)}
    FakeTrainer.runs.clear()
    assert run_study(read_study(grid))
    assert [c.loss for c in FakeTrainer.runs] == ["lsgan"]  # nothing else re-run
    assert final_fids(grid) == {"ns": ("finished", 111.0), "lsgan": ("finished", 133.0), "hinge": ("finished", 144.0)}


def test_changing_steps_runs_every_trial_again(tmp_path):
    grid = write_grid(tmp_path / "grid.yaml", ["ns", "hinge"], steps=100)
    run_study(read_study(grid))
    grid = write_grid(tmp_path / "grid.yaml", ["ns", "hinge"], steps=200)
    study = read_study(grid)
    assert [t.status for t in study.trials] == ["to run", "to run"]
    assert len(study.other_folders()) == 2  # the 100-step runs, left alone
    FakeTrainer.runs.clear()
    run_study(study)
    assert [c.steps for c in FakeTrainer.runs] == [200, 200]
    assert final_fids(grid) == {"ns": ("finished", 211.0), "hinge": ("finished", 244.0)}


def test_a_changed_default_or_base_is_a_changed_trial(tmp_path, monkeypatch):
    """The hash covers the resolved config, defaults included: a new default makes a new trial."""
    grid = write_grid(tmp_path / "grid.yaml", ["ns"])
    before = read_study(grid).trials[0]
    before_hash = before.config_hash
    after = read_study(grid, ["seed=1"]).trials[0]
    assert before.out_dir != after.out_dir and before_hash != after.config_hash
    assert config_hash(before.config.replace(progress=False, log_every=1, sample_every=7, checkpoint_every=9,
                                             sample_grid=4, download=False)) == before_hash
    monkeypatch.setattr(study_module, "TRAINER_VERSION", study_module.TRAINER_VERSION + 1)  # same config, new meaning
    assert read_study(grid).trials[0].config_hash != before_hash
    assert {"out_dir", "progress"} <= PRESENTATION_KEYS and not {"steps", "loss", "data_root", "fid_samples"} & PRESENTATION_KEYS


def test_progress_counts_the_whole_grid(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", ["ns", "wgan", "lsgan", "hinge"])
    run_study(read_study(grid), index=2)
    assert "trial 3/4 (index 2): loss=lsgan" in capsys.readouterr().out
    run_study(read_study(grid))
    out = capsys.readouterr().out
    for line in ("trial 1/4 (index 0): loss=ns", "trial 2/4 (index 1): loss=wgan",
                 "trial 3/4 (index 2): finished already", "trial 4/4 (index 3): loss=hinge"):
        assert line in out


def test_a_folder_holding_another_config_is_refused(tmp_path):
    grid = write_grid(tmp_path / "grid.yaml", ["ns", "hinge"])
    study = read_study(grid)
    run_study(study, index=0)
    # someone copies trial 0's folder over trial 1's
    ns, hinge = study.trials
    hinge.out_dir.mkdir(parents=True)
    (hinge.out_dir / "trial.json").write_text((ns.out_dir / "trial.json").read_text())
    (hinge.out_dir / SUMMARY).write_text((ns.out_dir / SUMMARY).read_text())
    assert not hinge.finished and hinge.summary() is None  # never reported as hinge's result
    with pytest.raises(ValueError, match=r"holds a run of another config than trial 1's \(loss: 'ns' -> 'hinge'\)"):
        run_study(study, index=1)
    (hinge.out_dir / "trial.json").unlink()
    with pytest.raises(ValueError, match="holds files but no trial.json"):
        run_study(study, index=1)


def test_an_interrupted_trial_stops_the_study(tmp_path):
    grid = write_grid(tmp_path / "grid.yaml", ["ns", "hinge"])
    FakeTrainer.stop_after = 10
    assert run_study(read_study(grid)) is False
    assert [c.loss for c in FakeTrainer.runs] == ["ns"]  # the next trial was not started
    assert [t.status for t in read_study(grid).trials] == ["started", "to run"]


def test_a_diverged_trial_is_a_result_and_the_study_goes_on(tmp_path):
    """A trial whose run diverged (NaN losses) is done: the study goes on to the next trial,
    the table says 'diverged', and a re-run of the study never trains it again."""
    grid = write_grid(tmp_path / "grid.yaml", ["ns", "wgan", "hinge"])
    FakeTrainer.diverging = ("wgan",)
    assert run_study(read_study(grid)) is True
    assert [c.loss for c in FakeTrainer.runs] == ["ns", "wgan", "hinge"]
    assert final_fids(grid) == {"ns": ("finished", 111.0), "wgan": ("diverged", ""), "hinge": ("finished", 144.0)}
    assert run_study(read_study(grid)) is True and len(FakeTrainer.runs) == 3


def test_grid_errors(tmp_path):
    grid = write_grid(tmp_path / "grid.yaml", ["ns", "ns"])
    with pytest.raises(ValueError, match="trials 0 and 1 have the same config"):
        read_study(grid)
    grid = write_grid(tmp_path / "grid.yaml", ["ns"])
    with pytest.raises(ValueError, match="out_dir is a key of the grid itself"):
        read_study(grid, ["out_dir=elsewhere"])
    with pytest.raises(ValueError, match="out of range: the grid has 1 trials"):
        run_study(read_study(grid), index=1)
    grid = write_grid(tmp_path / "grid.yaml", ["ns"], extra=f"  out_dir: [{tmp_path / 'elsewhere'}]\n")
    with pytest.raises(ValueError, match="an axis sets out_dir"):
        read_study(grid)
    # a trial's config error names the grid and the trial's choices
    grid = write_grid(tmp_path / "grid.yaml", ["ns", "hinj"])
    with pytest.raises(ValueError, match=r"grid.yaml: trial 1 \(loss=hinj\): loss='hinj' is not one of"):
        read_study(grid)


def test_a_trial_extended_in_place_is_no_longer_the_trial(tmp_path):
    """A finished trial trained further by hand (train --resume with more steps, which rewrites
    its config.yaml) holds another run than the trial's: listed 'changed', its FID never in
    the table, and the study refuses it instead of reporting or resuming it."""
    grid = write_grid(tmp_path / "grid.yaml", ["ns", "hinge"], steps=6)
    study = read_study(grid)
    run_study(study)
    ns = study.trials[0]
    save_config(ns.config, str(ns.out_dir / "config.yaml"))  # what the trial's own run writes
    assert ns.status == "finished" and ns.summary()["final_fid"] == 17.0
    save_config(ns.config.replace(steps=12), str(ns.out_dir / "config.yaml"))
    assert [t.status for t in read_study(grid).trials] == ["changed", "finished"]
    assert final_fids(grid) == {"ns": ("changed", ""), "hinge": ("finished", 50.0)}
    with pytest.raises(ValueError, match=r"went on with another config than trial 0's \(steps: 12 -> 6"):
        run_study(read_study(grid))


def test_a_trial_another_process_is_training_is_skipped(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid.yaml", ["ns", "hinge"])
    FakeTrainer.busy = ("ns",)
    assert run_study(read_study(grid)) is True
    assert "trial 1/2 (index 0): skipped: " in capsys.readouterr().out
    assert [t.status for t in read_study(grid).trials] == ["to run", "finished"]


@pytest.mark.parametrize("text, message", [
    ("settings: [steps, 10]\naxes: {loss: [ns]}\n", r"'settings' must be a mapping of config keys, got list"),
    ("out_dir: [a, b]\naxes: {loss: [ns]}\n", r"'out_dir' must be a folder name, got \['a', 'b'\]"),
    ("base: 5\naxes: {loss: [ns]}\n", r"'base' must be a config file name, got 5"),
])
def test_a_malformed_grid_names_its_key(tmp_path, text, message):
    """A wrong grid shape is a one-line error naming the key, not a Python traceback."""
    (tmp_path / "grid.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        read_study(str(tmp_path / "grid.yaml"))


def test_the_results_table_tells_the_settings_apart(tmp_path):
    """Learning rates such as 1e-4 and 2e-4 (the landscape grid's optimizer axis) stay distinct in
    results.md; the FIDs keep three decimals."""
    (tmp_path / "grid.yaml").write_text(f"settings: {{steps: 100}}\nout_dir: {tmp_path / 'study'}\n"
                                        "axes:\n  optimizer:\n    - {g_lr: 1.0e-4, g_betas: [0.5, 0.9]}\n"
                                        "    - {g_lr: 2.0e-4, g_betas: [0.5, 0.999]}\n")
    run_study(read_study(str(tmp_path / "grid.yaml")))
    rows = (tmp_path / "study" / "results.md").read_text().splitlines()[4:]
    assert [row.split(" | ")[1:3] for row in rows] == [["0.0001", "[0.5, 0.9]"], ["0.0002", "[0.5, 0.999]"]]
    assert all(" | 111.000 | " in row for row in rows)  # final FID (the fake trainer's 11 + steps)


def test_base_settings_overrides_and_axes_merge_key_by_key(tmp_path):
    """Each layer sets only the keys it names, sections included (as load_config merges a YAML
    file and its overrides): later layers win, and a section never replaces a whole earlier one."""
    (tmp_path / "base.yaml").write_text("generator: {jacobian_clamping: {weight: 1.0, eps: 2.0}}\nlens.steps: 3\n")
    (tmp_path / "grid.yaml").write_text(
        "base: base.yaml\nsettings: {generator: {jacobian_clamping: {eps: 0.5}}, lens: {steps: 4, hidden: 8}}\n"
        f"out_dir: {tmp_path / 'study'}\naxes:\n  clamping:\n    - {{generator: {{jacobian_clamping: {{lambda_max: 10.0}}}}}}\n"
        "    - {generator: {jacobian_clamping: {lambda_max: 15.0}}}\n")
    trials = read_study(str(tmp_path / "grid.yaml"), ["lens.steps=5"]).trials
    for trial, lambda_max in zip(trials, (10.0, 15.0)):
        config = trial.config
        assert (config.generator_jacobian_clamping_weight, config.generator_jacobian_clamping_eps) == (1.0, 0.5)
        assert config.generator_jacobian_clamping_lambda_max == lambda_max
        assert (config.lens_steps, config.lens_hidden) == (5, 8)


def test_a_grid_out_dir_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "grid.yaml").write_text("out_dir: ~/study\naxes: {loss: [ns]}\n")
    study = read_study(str(tmp_path / "grid.yaml"))
    assert study.out_dir == tmp_path / "study" and study.trials[0].out_dir.parent == tmp_path / "study"


def test_base_out_dir_is_ignored_and_the_shipped_grids_read(tmp_path):
    root = Path(__file__).resolve().parent.parent / "configs" / "study"
    sizes = {"demo": 4, "loss_x_normalization": 16, "landscape": 768}
    for name, size in sizes.items():
        study = read_study(str(root / f"{name}.yaml"))
        assert len(study.trials) == size
        assert len({t.out_dir for t in study.trials}) == size
        assert all(t.out_dir.parent == study.out_dir for t in study.trials)


def test_the_study_command_exits_with_the_interrupted_status(tmp_path, capsys):
    from fastgan.__main__ import main
    from fastgan.train.trainer import EXIT_INTERRUPTED

    grid = write_grid(tmp_path / "grid.yaml", ["ns", "hinge"])
    FakeTrainer.stop_after = 10
    assert main(["study", "--grid", grid]) == EXIT_INTERRUPTED == 75
    FakeTrainer.stop_after = None
    assert main(["study", "--grid", grid]) == 0
    assert "trial 2/2 (index 1): loss=hinge" in capsys.readouterr().out
