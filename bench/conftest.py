"""Benchmark-suite set-up: the device and quick mode of a run, the environment written
into pytest-benchmark's JSON, and a stand-in ``benchmark`` fixture where the
pytest-benchmark plugin is not installed (see ``benchmark_fallback.py``).

Options (each also an environment variable, for ``make``):

* ``--bench-quick`` / ``FASTGAN_BENCH_QUICK=1``: shorter timing and smaller CPU cases
  (a smoke test and a first look, as ``make gpu-check`` runs it; not a measurement to quote);
* ``--bench-device cpu|cuda`` / ``FASTGAN_BENCH_DEVICE``: default cuda when torch sees a GPU;
* ``--bench-threads N``: torch's CPU threads (default: torch's own choice). On a shared
  machine, ``--bench-threads 1 --benchmark-timer time.process_time`` measures CPU time
  of one thread, which other processes' load does not inflate.

Triton is not put in interpreter mode here: interpreted kernels are a test tool, and
the benchmarks time only backends that run natively on the device.
"""
import importlib.util
import os

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


def pytest_configure(config):
    quick = config.getoption("bench_quick")
    timing.configure(timing.QUICK if quick is None else quick, config.getoption("bench_device"))
    if config.getoption("bench_threads"):
        torch.set_num_threads(config.getoption("bench_threads"))
    if timing.QUICK:
        os.environ[timing.QUICK_ENV] = "1"


def pytest_report_header(config):
    return f"fastgan benchmarks on {timing.DEVICE}{' (quick mode)' if timing.QUICK else ''}"


if HAS_PYTEST_BENCHMARK:
    def pytest_benchmark_update_machine_info(config, machine_info):
        machine_info["fastgan"] = timing.environment(timing.DEVICE)
