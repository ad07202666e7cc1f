"""The benchmarks' GPU-only entries, run on the CPU with the stand-in CUDA graph
(tests/graph_stand_in.py): everything a GPU run of those entries executes except the GPU, so
that CI, which has none, catches what would otherwise first break in a rare GPU run. Each
entry's own same-math check runs as it would there; timing is the benchmarks' business."""
import pytest
import torch

from graph_stand_in import use_stand_in_graphs, use_stand_in_training_graphs
from test_gpu_check import bench_module
from fastgan.train.runtime import Runtime

# On the CPU wherever they run (a GPU machine runs these entries for real in its benchmarks); the
# modules read the benchmark device when imported.
bench_module("timing").configure(quick=True, device="cpu")
penalty_bench = bench_module("bench_gradient_penalty")
sn_bench = bench_module("bench_spectral_norm")
training_bench = bench_module("bench_training")
profile_host = bench_module("profile_host")


@pytest.mark.parametrize("name", ["plain autograd, graphed", "fastgan [cpp], graphed"])
def test_graphed_d_step_entries(monkeypatch, name):
    use_stand_in_graphs(monkeypatch)
    monkeypatch.setattr(penalty_bench, "BATCH", 8)
    d, real, fake, alpha = penalty_bench.discriminator_and_batches()
    step = penalty_bench.entry_step(name, "wgan-gp", (d, real, fake, alpha, None))
    first, second = float(step()), float(step())
    assert first != second  # α drawn anew by each replay


def test_graph_replay_refresh_entry(monkeypatch):
    use_stand_in_graphs(monkeypatch)
    models = sn_bench.Models()
    torch_refresh, model, _ = sn_bench.refresh_fn(sn_bench.TORCH_PARAM, models)
    torch_refresh()
    expected = sn_bench.uv(model)
    replay, model, _ = sn_bench.refresh_fn(f"{sn_bench.GRAPH_REPLAY} [reference]", models)
    replay()
    ours = sn_bench.uv(model)
    sn_bench.assert_close([u for u, _ in ours], [u for u, _ in expected], "u")
    sn_bench.assert_close([v for _, v in ours], [v for _, v in expected], "v")


@pytest.mark.parametrize("stand_in", [False, True], ids=["eager", "replayed"])
def test_apply_spectral_norm_entries_refresh_and_normalize_as_torch(monkeypatch, stand_in):
    """The hook's entries, eager (as on the CPU) and replayed (as on a GPU), called three times
    from the common state: their u, v and W / σ are torch's after as many refreshes (the refresh
    entry once wrote no buffers, since the refresh leaves them to the layers that use it)."""
    if stand_in:
        use_stand_in_graphs(monkeypatch)
    models = sn_bench.Models()
    torch_refresh, expected_model, _ = sn_bench.refresh_fn(sn_bench.TORCH_PARAM, models)
    refresh, model, _ = sn_bench.refresh_fn(f"{sn_bench.GROUPED_HOOK} [reference]", models)
    torch_forward = sn_bench.normalized_fn(sn_bench.TORCH_PARAM, models)
    forward = sn_bench.normalized_fn("fastgan apply_spectral_norm [reference]", models)
    with torch.no_grad():
        for _ in range(3):  # eager, captured, replayed
            torch_refresh()
            refresh()
            sn_bench.assert_close([u for u, _ in sn_bench.uv(model)], [u for u, _ in sn_bench.uv(expected_model)], "u")
            sn_bench.assert_close([v for _, v in sn_bench.uv(model)], [v for _, v in sn_bench.uv(expected_model)], "v")
            sn_bench.assert_close(forward(), torch_forward(), "W / sigma")


@pytest.mark.parametrize("case, option", [
    ("sndcgan ns+sn", "fastgan graphs + amp + channels_last + cudnn_benchmark"),
    ("resnet_cifar wgan-gp", "fastgan graphs, tf32 off (fastgan train's default)"),
])
def test_training_option_entries(monkeypatch, tmp_path, case, option):
    """The graphed trainer with the option, after its same-math check against the plain GAN in the
    same layout and autocast, captured (graphed_step asserts it) and replayed once more."""
    use_stand_in_training_graphs(monkeypatch)
    monkeypatch.setattr(training_bench, "BATCH", {name: 4 for name in training_bench.CASES})
    options, numerics = training_bench.OPTIONS[option]
    real = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with Runtime().numerics(deterministic=False, **numerics):
        step, check = training_bench.graphed_step(case, str(tmp_path), real, option, **options)
        out = step()
    assert check and all(torch.isfinite(v).all() for v in out.values())


def test_plain_graphed_training_entry(monkeypatch, tmp_path):
    """The plain GAN's whole iteration (n_disc D updates, then G's) as one graph, replayed: its
    numbers are those of the same plain iterations run eagerly."""
    use_stand_in_graphs(monkeypatch)
    case = training_bench.CASES["sndcgan ns+sn"]  # torch's spectral-norm parametrization iterating inside the graph
    real = torch.rand(4, 3, 32, 32)
    trainer = training_bench.fastgan_trainer(training_bench.make_config(case, 4, str(tmp_path), width=0.25), real)
    torch.manual_seed(5)
    graphed = training_bench.plain_graphed_step(trainer, real)  # two iterations: warm-up and capture
    torch.manual_seed(5)
    eager = training_bench.PlainGAN(trainer.config, trainer, real)
    for _ in range(2):
        eager.train_step()
    for iteration in range(2):  # each with the same draws of z and α
        torch.manual_seed(10 + iteration)
        ours = graphed()
        torch.manual_seed(10 + iteration)
        theirs = eager.train_step()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), (iteration, ours, theirs)


def test_host_profile_graphed_workload(monkeypatch, tmp_path):
    """profile_host's GPU-only workload: ResNet CIFAR WGAN-GP captured with every speed option
    (after the benchmark's same-math check), a replay per call."""
    use_stand_in_training_graphs(monkeypatch)
    monkeypatch.setattr(training_bench, "BATCH", {name: 4 for name in training_bench.CASES})
    ((name, step),) = profile_host.graphed_workloads(str(tmp_path)).items()
    assert training_bench.ALL_OPTIONS in name
    out = step()
    assert {"d_loss", "penalty", "g_loss"} <= set(out) and all(torch.isfinite(v).all() for v in out.values())
