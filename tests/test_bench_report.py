"""The benchmark suite's own machinery, on the CPU: how a GPU round is timed, where a run's
result files go and what they are compared with, the targets' like-for-like ratios, and the
options a user passes (``make bench QUICK=...``, ``--bench-device``, quick runs' storage)."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from test_gpu_check import ROOT, bench_module

timing = bench_module("timing")
report = bench_module("report")


def test_the_l2_flush_waits_for_the_gpu(monkeypatch):
    """Queued behind the flush without a wait, the timed call's host work hid behind the GPU's
    zeroing: an eager SN refresh with ~80 µs of host work measured 48 µs on an H100."""
    calls = []
    monkeypatch.setattr(timing, "_flush_buffer", torch.ones(16, dtype=torch.int8))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: calls.append(int(timing._flush_buffer.sum())))
    timing.flush_l2()
    assert calls == [0]  # synchronised once, after the zeroing


def run_json(started: str, median: float = 1e-3, quick: bool = False, device: str = "H100") -> dict:
    """A pytest-benchmark run of one spectral_norm group (a baseline and one entry)."""
    def entry(variant, baseline, seconds):
        return {"name": variant, "fullname": f"bench/bench_spectral_norm.py::test_x[{variant}]",
                "group": "spectral_norm: refresh", "options": {"timer": "perf_counter"},
                "stats": {"median": seconds, "iqr": 0.0, "rounds": 5},
                "extra_info": {"variant": variant, "baseline": baseline, "bytes": 2e6, "timing": "host perf_counter"}}
    return {"datetime": started,
            "machine_info": {"fastgan": {"device_type": "cuda", "device": device, "date": "2026-12-07", "quick": quick}},
            "benchmarks": [entry("torch", True, 2e-3), entry("fastgan", False, median)]}


def test_a_run_never_overwrites_another_runs_results(tmp_path, monkeypatch):
    """Results were named <op>-<device>-<date> only: a second run that day (a -k subset, another
    GPU) replaced the first's files; rendering the same run again rewrites its own."""
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    first, second = run_json("2026-12-07T10:00:00"), run_json("2026-12-07T11:00:00", median=2e-3)
    _, paths = report.render(first, "a.json")
    assert sorted(p.name for p in paths) == ["spectral_norm-cuda-2026-12-07.json", "spectral_norm-cuda-2026-12-07.md"]
    _, paths = report.render(second, "a.json")
    assert {p.name for p in paths} == {"spectral_norm-cuda-2026-12-07-2.json", "spectral_norm-cuda-2026-12-07-2.md"}
    report.render(first, "a.json")
    assert len(list(tmp_path.iterdir())) == 4
    kept = json.loads((tmp_path / "spectral_norm-cuda-2026-12-07.json").read_text())
    assert kept["groups"]["spectral_norm: refresh"][1]["median_us"] == pytest.approx(1000.0)
    # the second run is compared with the first, the first with nothing (never with a later file)
    assert "against bench/results/spectral_norm-cuda-2026-12-07.md" in (tmp_path / "spectral_norm-cuda-2026-12-07-2.md").read_text()
    assert "+100%" in (tmp_path / "spectral_norm-cuda-2026-12-07-2.md").read_text()
    assert "vs previous:" not in (tmp_path / "spectral_norm-cuda-2026-12-07.md").read_text()
    # a run of an earlier date rendered after them is compared with nothing later than itself
    earlier = run_json("2026-12-06T10:00:00")
    earlier["machine_info"]["fastgan"]["date"] = "2026-12-06"
    report.render(earlier, "c.json")
    assert "vs previous:" not in (tmp_path / "spectral_norm-cuda-2026-12-06.md").read_text()


@pytest.mark.parametrize("other", [{"quick": True}, {"device": "H200"}], ids=["quick", "another GPU"])
def test_regressions_are_flagged_against_the_same_mode_and_device_only(tmp_path, monkeypatch, other):
    """A quick run's smaller cases were flagged +425% against a full run; an H200's figures
    served as an H100's baseline."""
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    report.render(run_json("2026-12-07T10:00:00", **other), "a.json")
    report.render(run_json("2026-12-07T11:00:00", median=3e-3), "b.json")
    assert "vs previous:" not in (tmp_path / "spectral_norm-cuda-2026-12-07-2.md").read_text()


def test_the_json_keeps_rates_in_the_units_it_states(tmp_path, monkeypatch):
    """The JSON said rate_unit "GB/s" beside a rate in B/s (off by 1e9 for anyone reading it)."""
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    groups, _ = report.render(run_json("2026-12-07T10:00:00"), "a.json")
    row = next(r for r in groups["spectral_norm"]["spectral_norm: refresh"] if r["variant"] == "fastgan")
    assert row["rate_unit"] == "B/s" and row["rate"] == pytest.approx(2e9)
    assert "| 2 GB/s (0%) |" in (tmp_path / "spectral_norm-cuda-2026-12-07.md").read_text()
    assert report._format_rate({"rate": 2e9, "rate_unit": "GB/s"}) == "2 GB/s"  # files written before


def test_the_d_step_target_compares_like_with_like():
    """The target read the fastest fastgan entry, graphed ones included, against eager plain
    autograd: 'MET 1.64x' where plain autograd graphed the same way was 1.63x."""
    rows = [dict(variant="plain autograd", median_us=120.0, baseline=True),
            dict(variant="fastgan [cuda]", median_us=125.0, baseline=False),
            dict(variant="plain autograd, graphed", median_us=80.0, baseline=False),
            dict(variant="fastgan [cuda], graphed", median_us=75.0, baseline=False)]
    text = report.summary({"gradient_penalty": {"gradient_penalty: wgan-gp D step": rows}}, "cuda", [], None, None, [])
    assert re.search(r"MISSED WGAN-GP D step >= 1.3x plain autograd\s+eager 0.96× \(fastgan \[cuda\]\); "
                     r"graphed against plain graphed 1.07× \(fastgan \[cuda\], graphed\)", text)
    rows[3]["median_us"] = 60.0
    text = report.summary({"gradient_penalty": {"gradient_penalty: wgan-gp D step": rows}}, "cuda", [], None, None, [])
    assert re.search(r"MET    WGAN-GP D step >= 1.3x plain autograd\s+eager 0.96×.*graphed 1.33×", text)


def load_bench_conftest():
    spec = importlib.util.spec_from_file_location("bench_conftest", ROOT / "bench" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("quick", [True, False])
def test_quick_runs_are_saved_apart(monkeypatch, quick):
    """Quick mode shrinks the CPU cases under the same test names: `make bench-compare` failed a
    full run with "270.7 > 25" against a quick run's batch of 4."""
    conftest = load_bench_conftest()
    monkeypatch.setattr(timing, "QUICK", timing.QUICK)
    monkeypatch.setattr(timing, "DEVICE", timing.DEVICE)
    monkeypatch.setenv(timing.QUICK_ENV, os.environ.get(timing.QUICK_ENV, "0"))
    options = {"bench_quick": quick, "bench_device": "cpu", "bench_threads": None}
    config = types.SimpleNamespace(option=types.SimpleNamespace(benchmark_storage=conftest.DEFAULT_STORAGE),
                                   getoption=options.__getitem__)
    conftest.pytest_configure(config)
    assert config.option.benchmark_storage == conftest.DEFAULT_STORAGE + ("/quick" if quick else "")


@pytest.mark.parametrize("device", ["gpu", "mps"] + ([] if torch.cuda.is_available() else ["cuda"]))
def test_a_bench_device_it_cannot_use_is_a_usage_error(device):
    """--bench-device gpu / cuda without a GPU printed an INTERNALERROR traceback; mps failed
    at collection with KeyError: 'mps'."""
    run = subprocess.run([sys.executable, "-m", "pytest", "bench", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "--bench-device", device], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 4, run.stdout + run.stderr
    assert "INTERNALERROR" not in run.stdout + run.stderr
    assert f"--bench-device" in run.stderr and ("cpu or cuda" in run.stderr or "no CUDA device" in run.stderr)


@pytest.mark.parametrize("quick, expected", [("0", False), ("1", True), ("", False)])
def test_make_bench_reads_quick_0_as_off(quick, expected):
    """`make bench QUICK=0` ran in quick mode (any non-empty value turned it on)."""
    run = subprocess.run(["make", "-n", "bench", f"QUICK={quick}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    line = next(line for line in run.stdout.splitlines() if "-m pytest bench" in line)
    assert ("--bench-quick" in line) == expected


def test_geometry_score_entries_time_the_wall_clock_whatever_the_timer():
    """Under --benchmark-timer time.process_time the worker processes' CPU time went uncounted and
    workers=2 read 2.1x faster than workers=1 (it was slower by the wall clock)."""
    pytest.importorskip("gudhi")
    path = list(sys.path)
    bench = bench_module("bench_geometry_score")
    assert sys.path == path  # bench/ left first on sys.path made spawned test workers import its conftest
    x = bench.ring_points(120, 2)
    sets = bench.gs.draw_landmarks(120, 3, bench.L_0, torch.Generator().manual_seed(1))

    class Benchmark:
        _timer, extra_info, group = staticmethod(time.process_time), {}, None

        def pedantic(self, fn, **kwargs):
            self.timer_used = self._timer
            return fn()

    benchmark = Benchmark()
    bench.test_mean_relative_living_times(benchmark, (2, x, sets, {}), "fastgan workers=1")
    assert benchmark.timer_used is time.perf_counter
    entry = {"extra_info": benchmark.extra_info, "options": {"timer": "process_time"}}
    assert report._timing(entry) == benchmark.extra_info["timing"]  # not relabelled "process_time (CPU time)"
    assert benchmark.extra_info["timing"].startswith("wall-clock perf_counter")
