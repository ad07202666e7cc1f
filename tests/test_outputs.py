"""What a run leaves for people to look at: curves.png's panels and the TensorBoard events files."""
import time

import pytest
import torch

from fastgan.train.outputs import MetricsLog, curves_figure, plot_curves


def _records(fid_steps):
    records = [{"step": s, "d_loss": 1.0 / s, "g_loss": 0.5 + 1.0 / s} for s in range(25, 801, 25)]
    for step, value in fid_steps:
        records.append({"step": step, "fid": value, "best_fid": value})
    return records


def test_a_single_fid_point_sits_at_its_step_on_a_labelled_axis_from_zero():
    losses, fid = curves_figure(_records([(800, 217.4)])).axes
    assert fid.get_ylabel() == "FID" and losses.get_ylabel() == "loss"
    assert fid.get_xlabel() == losses.get_xlabel() == "step (D updates)"
    assert fid.get_xlim() == losses.get_xlim() == (0, 800)
    low, high = fid.get_ylim()
    assert low == 0 and 217.4 < high <= 1.1 * 217.4 + 1e-9


def test_curves_without_fid_have_one_panel(tmp_path):
    assert len(curves_figure(_records([])).axes) == 1
    plot_curves(_records([(400, 90.0), (800, 60.0)]), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_every_plot_leaves_the_callers_backend_and_is_written_whole_under_its_name(tmp_path, monkeypatch):
    """A notebook's backend survives the training, VAE and Geometry Score plots (they used to switch
    matplotlib to Agg); each file goes through one atomic write, under exactly the name given."""
    import matplotlib
    from PIL import Image

    from fastgan import files
    from fastgan.metrics.geometry_score import plot_mrlt
    from fastgan.train.outputs import plot_conditioning
    from fastgan.train.vae_step import plot_rate_distortion

    written = []
    atomic = files.atomic_file
    monkeypatch.setattr(files, "atomic_file", lambda path: written.append(path.name) or atomic(path))
    records = _records([(400, 90.0)]) + [{"step": 400, "log_condition_number_mean": 3.0, "log_condition_number_std": 0.5}]
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        plot_curves(records, tmp_path / "curves.png")
        plot_conditioning(records, tmp_path / "conditioning.png")
        plot_rate_distortion([("beta=1", {"rate": 20.0, "distortion": 30.0, "entropy": 40.0})], tmp_path / "rd.png")
        plot_mrlt({"a": torch.tensor([0.1, 0.9]), "b": torch.tensor([0.8, 0.2])}, tmp_path / "mrlt")
        assert matplotlib.get_backend().lower() == "svg"
    finally:
        matplotlib.use(previous)
    assert written == ["curves.png", "conditioning.png", "rd.png", "mrlt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conditioning.png", "curves.png", "mrlt", "rd.png"]
    assert Image.open(tmp_path / "mrlt").format == "PNG"


def _events_files(out_dir):
    return sorted((out_dir / "tensorboard").glob("events.out.tfevents.*")) if (out_dir / "tensorboard").is_dir() else []


def test_tensorboard_gets_one_events_file_per_process_that_logs(tmp_path):
    log = MetricsLog(tmp_path)
    log.write(1, {"d_loss": 1.0})
    log.write(2, {"d_loss": 0.5})
    log.close()
    assert len(_events_files(tmp_path)) == 1
    for _ in range(3):  # reruns of the finished run log nothing: no new files
        MetricsLog(tmp_path, resume_step=2).close()
    assert len(_events_files(tmp_path)) == 1
    resumed = MetricsLog(tmp_path, resume_step=2)
    resumed.write(3, {"d_loss": 0.25})
    resumed.close()
    assert len(_events_files(tmp_path)) == 2
    assert [r["step"] for r in resumed.records] == [1, 2, 3]


def test_a_resume_purges_from_tensorboard_only_the_points_after_its_checkpoint(tmp_path):
    """A killed run logged steps 1-4 after its checkpoint at 2; the resumed run logs 3 again.
    TensorBoard shows 1, 2 (kept: logged before the checkpoint, as metrics.jsonl keeps them)
    and the resumed 3; the purge used to take step 2 with it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    killed = MetricsLog(tmp_path)
    for step in range(1, 5):
        killed.write(step, {"d_loss": float(step)})
    killed.close()
    # TensorBoard reads a run's events files in name order: time in whole seconds, then a
    # per-process counter whose digit count may grow (…9 < …10 fails as text). A resume comes
    # from a later process; here a later second keeps the order a real resume has.
    time.sleep(1.1)
    resumed = MetricsLog(tmp_path, resume_step=2)
    resumed.write(3, {"d_loss": 30.0})
    resumed.close()
    shown = EventAccumulator(str(tmp_path / "tensorboard"))
    shown.Reload()
    assert [(e.step, e.value) for e in shown.Scalars("d_loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]
    assert [(r["step"], r["d_loss"]) for r in resumed.records] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_rewriting_the_log_on_resume_never_loses_it(tmp_path, monkeypatch):
    """A resume rewrites metrics.jsonl without the records after its checkpoint; a full disk (or a
    kill) during that rewrite used to leave the run's whole history truncated."""
    import builtins
    import pathlib

    from conftest import FullDisk

    log = MetricsLog(tmp_path, tensorboard=False)
    for step in range(1, 5):
        log.write(step, {"d_loss": float(step)})
    before = (tmp_path / "metrics.jsonl").read_text()
    # the rewrite's text goes out through Path.write_text (fastgan.files.write_text_atomic)
    monkeypatch.setattr(pathlib.Path, "write_text",
                        lambda self, data, *args, **kwargs: FullDisk(builtins.open(self, "w")).write(data))
    try:
        MetricsLog(tmp_path, resume_step=2, tensorboard=False)
    except OSError:
        pass
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no partial file left behind


def test_a_failed_write_leaves_the_previous_grid_and_curves(tmp_path, monkeypatch):
    """samples.png and curves.png are redrawn during the run while people look at them: a kill or a
    failure mid-write used to leave them (or a `sample` folder's last PNG) torn."""
    import torch
    from matplotlib.figure import Figure
    from PIL import Image

    from fastgan.train.outputs import save_image_grid

    grid, curves = tmp_path / "samples.png", tmp_path / "curves.png"
    save_image_grid(torch.rand(4, 3, 8, 8), grid)
    plot_curves(_records([]), curves)
    before = {path: path.read_bytes() for path in (grid, curves)}

    def write_half_then_stop(original):
        def save(self, target, *args, **kwargs):
            with open(target, "wb") as f:
                f.write(b"\x89PNG\r\n\x1a\n torn")
            raise KeyboardInterrupt  # Ctrl-C in the middle of the write
        return save

    monkeypatch.setattr(Image.Image, "save", write_half_then_stop(Image.Image.save))
    monkeypatch.setattr(Figure, "savefig", write_half_then_stop(Figure.savefig))
    for write in (lambda: save_image_grid(torch.rand(4, 3, 8, 8), grid), lambda: plot_curves(_records([]), curves),
                  lambda: save_image_grid(torch.rand(1, 3, 8, 8), tmp_path / "new.png")):
        try:
            write()
        except KeyboardInterrupt:
            pass
    monkeypatch.undo()
    assert {path: path.read_bytes() for path in (grid, curves)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "samples.png"]


def test_grid_layout_and_quantization(tmp_path):
    """Row-major cells of --columns images, `padding` white pixels around each; [0, 1] -> round(255 x),
    values outside clamped."""
    import numpy as np
    import torch
    from PIL import Image

    from fastgan.train.outputs import save_image_grid

    images = torch.stack([torch.full((3, 4, 5), v) for v in (0.0, 0.5, 1.0, 0.2, 1.5)])
    save_image_grid(images, tmp_path / "g.png", columns=2, padding=1)
    with Image.open(tmp_path / "g.png") as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (1 + 3 * 5, 1 + 2 * 6, 3)
    cells = [pixels[1 + r * 5 : 5 + r * 5, 1 + c * 6 : 6 + c * 6] for r in range(3) for c in range(2)]
    assert [int(cell[0, 0, 0]) for cell in cells[:5]] == [0, 128, 255, 51, 255]
    assert all((cell == cell[0, 0]).all() for cell in cells) and (cells[5] == 255).all()  # the empty cell: white
    with pytest.raises(ValueError, match="not the name of an image file"):
        save_image_grid(images, tmp_path / "grid.txt")


def test_a_copy_that_fails_midway_leaves_the_previous_file(tmp_path, monkeypatch):
    """samples.png / lens.png / reconstructions.png are copies of the step's grid, made while
    people look at them: a kill mid-copy leaves the previous image, and no temporary file."""
    import shutil

    from fastgan.train.outputs import copy_atomically

    source, destination = tmp_path / "step-0000100.png", tmp_path / "samples.png"
    source.write_bytes(b"new grid" * 1000)
    destination.write_bytes(b"old grid")

    def copy_half_then_stop(src, dst, *args, **kwargs):
        with open(dst, "wb") as f:
            f.write(b"new g")
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "copyfile", copy_half_then_stop)
    with pytest.raises(KeyboardInterrupt):
        copy_atomically(source, destination)
    monkeypatch.undo()
    assert destination.read_bytes() == b"old grid" and sorted(p.name for p in tmp_path.iterdir()) == [
        "samples.png", "step-0000100.png"]
    copy_atomically(source, destination)
    assert destination.read_bytes() == source.read_bytes()


def test_a_grid_is_never_wider_than_its_images(tmp_path):
    """sample --n 3 --columns 10 drew 7 empty columns (torchvision's make_grid takes min(columns, n))."""
    from PIL import Image

    from fastgan.train.outputs import save_image_grid

    save_image_grid(torch.rand(3, 3, 8, 8), tmp_path / "wide.png", columns=10)
    assert Image.open(tmp_path / "wide.png").size == (3 * 10 + 2, 10 + 2)
    with pytest.raises(ValueError, match="N >= 1"):
        save_image_grid(torch.rand(0, 3, 8, 8), tmp_path / "none.png")
