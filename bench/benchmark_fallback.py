"""A stand-in for the pytest-benchmark plugin, loaded by conftest.py only where that
plugin is not installed (e.g. a GPU machine with no package registry).

It provides what the fastgan benchmarks use -- the ``benchmark`` fixture's
``pedantic`` mode, ``group``, ``extra_info`` and its replaceable ``_timer`` -- and
writes ``--benchmark-json`` in pytest-benchmark's format (the fields
``bench/report.py`` reads). Saving, comparing and histograms need the real plugin:
``--benchmark-autosave`` and ``--benchmark-compare`` are accepted and ignored with a
warning, so the same command line works either way.
"""
import datetime
import json
import statistics
import time
import warnings

import pytest

import timing

_RESULTS = []


def pytest_addoption(parser):
    group = parser.getgroup("benchmark (fallback: pytest-benchmark is not installed)")
    group.addoption("--benchmark-only", action="store_true", help="ignored: every fastgan benchmark uses the fixture")
    group.addoption("--benchmark-disable", action="store_true", help="run each benchmarked call once, untimed")
    group.addoption("--benchmark-json", default=None, help="write the results to this file")
    group.addoption("--benchmark-autosave", action="store_true", help="needs pytest-benchmark; ignored")
    group.addoption("--benchmark-storage", default=None, help="needs pytest-benchmark; ignored")
    group.addoption("--benchmark-compare", nargs="?", const=True, default=None, help="needs pytest-benchmark; ignored")
    group.addoption("--benchmark-compare-fail", action="append", default=[], help="needs pytest-benchmark; ignored")


def pytest_configure(config):
    unavailable = [name for name in ("benchmark_autosave", "benchmark_compare", "benchmark_compare_fail")
                   if config.getoption(name)]
    if unavailable:
        warnings.warn(f"pytest-benchmark is not installed: {', '.join(unavailable)} ignored "
                      "(the results are still written with --benchmark-json)")


class FallbackBenchmark:
    def __init__(self, node, disabled: bool) -> None:
        self.name, self.fullname = node.name, node.nodeid
        self.param = node.callspec.id if hasattr(node, "callspec") else None
        self.params = dict(node.callspec.params) if hasattr(node, "callspec") else None
        self.group = None
        self.extra_info = {}
        self.disabled = disabled
        self._timer = time.perf_counter
        self.data = []

    def pedantic(self, target, args=(), kwargs=None, setup=None, teardown=None, rounds=1, warmup_rounds=0, iterations=1):
        kwargs = kwargs or {}
        if self.disabled:
            if setup:
                setup()
            return target(*args, **kwargs)
        result = None
        for index in range(warmup_rounds + rounds):
            if setup:
                setup()
            start = self._timer()
            for _ in range(iterations):
                result = target(*args, **kwargs)
            duration = (self._timer() - start) / iterations
            if teardown:
                teardown(*args, **kwargs)
            if index >= warmup_rounds:
                self.data.append(duration)
        return result

    def __call__(self, fn, *args, **kwargs):
        return self.pedantic(fn, args, kwargs, rounds=5, warmup_rounds=1)

    def as_dict(self):
        data = sorted(self.data)
        quartiles = statistics.quantiles(data, n=4) if len(data) > 1 else data * 3
        stats = {"min": data[0], "max": data[-1], "mean": statistics.fmean(data), "median": statistics.median(data),
                 "stddev": statistics.stdev(data) if len(data) > 1 else 0.0, "q1": quartiles[0], "q3": quartiles[2],
                 "iqr": quartiles[2] - quartiles[0], "rounds": len(data), "ops": 1.0 / statistics.fmean(data), "data": self.data}
        return {"group": self.group, "name": self.name, "fullname": self.fullname, "params": self.params,
                "param": self.param, "extra_info": self.extra_info, "options": {"timer": getattr(self._timer, "__name__", "")},
                "stats": stats}


@pytest.fixture
def benchmark(request):
    fixture = FallbackBenchmark(request.node, request.config.getoption("benchmark_disable"))
    yield fixture
    if fixture.data:
        _RESULTS.append(fixture.as_dict())


def pytest_sessionfinish(session):
    path = session.config.getoption("benchmark_json")
    if path and _RESULTS:
        output = {"machine_info": {"fastgan": timing.environment(timing.DEVICE), "node": "fallback"},
                  "commit_info": {}, "benchmarks": _RESULTS, "datetime": datetime.datetime.now().isoformat(),
                  "version": "fastgan-fallback"}
        with open(path, "w") as fh:
            json.dump(output, fh, indent=2)
