"""What a run leaves for people to look at: curves.png's panels and the TensorBoard events files."""
from fastgan.train.outputs import MetricsLog, curves_figure, plot_curves


def _records(fid_steps):
    records = [{"step": s, "d_loss": 1.0 / s, "g_loss": 0.5 + 1.0 / s} for s in range(25, 801, 25)]
    for step, value in fid_steps:
        records.append({"step": step, "fid": value, "best_fid": value})
    return records


def test_a_single_fid_point_sits_at_its_step_on_a_labelled_axis_from_zero():
    import matplotlib.pyplot as plt

    figure = curves_figure(_records([(800, 217.4)]))
    try:
        losses, fid = figure.axes
        assert fid.get_ylabel() == "FID" and losses.get_ylabel() == "loss"
        assert fid.get_xlabel() == losses.get_xlabel() == "step (D updates)"
        assert fid.get_xlim() == losses.get_xlim() == (0, 800)
        low, high = fid.get_ylim()
        assert low == 0 and 217.4 < high <= 1.1 * 217.4 + 1e-9
    finally:
        plt.close(figure)


def test_curves_without_fid_have_one_panel(tmp_path):
    import matplotlib.pyplot as plt

    figure = curves_figure(_records([]))
    assert len(figure.axes) == 1
    plt.close(figure)
    plot_curves(_records([(400, 90.0), (800, 60.0)]), tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


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
