"""Benchmark-suite set-up: the device and quick mode of a run, the environment written
into pytest-benchmark's JSON, and a stand-in ``benchmark`` fixture where the
pytest-benchmark plugin is not installed (see ``benchmark_fallback.py``).

Options (each also an environment variable, for ``make``):

* ``--bench-quick`` / ``FASTGAN_BENCH_QUICK=1``: shorter timing and smaller CPU cases
  (a smoke test and a first look, as ``make gpu-check`` runs it; not a measurement to quote);
  saved under ``.benchmarks/quick/``, apart from full runs, so ``--benchmark-compare`` never
  sets a quick run's smaller cases against a full run's;
* ``--bench-device cpu|cuda`` / ``FASTGAN_BENCH_DEVICE``: default cuda when torch sees a GPU;
* ``--bench-threads N``: torch's CPU threads (default: torch's own choice). On a shared
  machine, ``--bench-threads 1 --benchmark-timer time.process_time`` measures CPU time
  of one thread, which other processes' load does not inflate;
* ``--bench-budget S``: entries that would start more than S seconds into the run are
  skipped (with that reason), so a run under a time limit still ends normally and
  writes its results (``make gpu-check`` uses it).

The ops with targets run first (spectral norm, gradient penalty, FID, training), then the rest.

Triton is not put in interpreter mode here: interpreted kernels are a test tool, and
the benchmarks time only backends that run natively on the device.
"""
import importlib.util
import os
import time

import pytest
import torch

import timing

HAS_PYTEST_BENCHMARK = importlib.util.find_spec("pytest_benchmark") is not None
if not HAS_PYTEST_BENCHMARK:
    pytest_plugins = ["benchmark_fallback"]


def pytest_addoption(parser):
    group = parser.getgroup("fastgan benchmarks")
    group.addoption("--bench-quick", action="store_true", default=None,
                    help=f"short timing runs and small CPU cases (also {timing.QUICK_ENV}=1)")
    group.addoption("--bench-device", default=None,
                    help=f"cpu or cuda (also {timing.DEVICE_ENV}; default cuda when a GPU is visible)")
    group.addoption("--bench-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    group.addoption("--bench-budget", type=float, default=None,
                    help="skip entries that would start more than this many seconds into the run")


DEFAULT_STORAGE = "file://./.benchmarks"


def pytest_configure(config):  # before pytest-benchmark's (trylast), which opens the storage
    quick = config.getoption("bench_quick")
    try:
        timing.configure(timing.QUICK if quick is None else quick, config.getoption("bench_device"))
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    if timing.QUICK and getattr(config.option, "benchmark_storage", None) == DEFAULT_STORAGE:
        # Quick runs shrink the CPU cases under the same test names: saved apart, so that
        # --benchmark-compare sets a run against the last run of its own mode.
        config.option.benchmark_storage = DEFAULT_STORAGE + "/quick"
    if config.getoption("bench_threads"):
        torch.set_num_threads(config.getoption("bench_threads"))
    if timing.QUICK:
        os.environ[timing.QUICK_ENV] = "1"


FIRST = ("bench_spectral_norm.py", "bench_gradient_penalty.py", "bench_fid.py", "bench_training.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: file order kept within a module
    config._bench_started = time.monotonic()


def pytest_runtest_setup(item):
    budget = item.config.getoption("bench_budget")
    if budget is not None and time.monotonic() - item.config._bench_started > budget:
        pytest.skip(f"the run's time budget of {budget:.0f} s was spent before this entry started (--bench-budget)")


def pytest_report_header(config):
    return f"fastgan benchmarks on {timing.DEVICE}{' (quick mode)' if timing.QUICK else ''}"


if HAS_PYTEST_BENCHMARK:
    def pytest_benchmark_update_machine_info(config, machine_info):
        machine_info["fastgan"] = timing.environment(timing.DEVICE)
