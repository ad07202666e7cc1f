"""The timing helper every fastgan benchmark uses: interleaved medians, the
environment a figure was taken in, and results written to ``bench/results/`` as
JSON and markdown."""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _block_seconds(fn: Callable[[], object], number: int, sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    sync()
    return time.perf_counter() - start


def medians_us(fns: Dict[str, Callable[[], object]], min_run_time: float, min_rounds: int = 5) -> Dict[str, float]:
    """Median wall time of one call of each function, in microseconds.

    The functions are timed in interleaved rounds (each round times every function
    once, in a block of calls long enough to dwarf the timer), so drift in the
    machine's speed -- other load, clocks, thermal state -- hits all of them alike
    and the ratios stay fair. CUDA is synchronized around every block."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    numbers = {}
    for name, fn in fns.items():
        fn()  # warm-up: compilation, caches, allocator
        number = 1
        while (elapsed := _block_seconds(fn, number, sync)) < 0.01 and number < 10**6:
            number *= max(2, min(100, int(0.01 / max(elapsed, 1e-9))))
        numbers[name] = number
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    deadline = time.perf_counter() + min_run_time * len(fns)
    while time.perf_counter() < deadline or min(len(v) for v in samples.values()) < min_rounds:
        for name, fn in fns.items():
            samples[name].append(_block_seconds(fn, numbers[name], sync) / numbers[name])
    return {name: statistics.median(v) * 1e6 for name, v in samples.items()}


def environment(device: torch.device) -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {
        "device": name,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def write_results(name: str, device: torch.device, env: Dict[str, str], rows: List[Dict[str, object]], notes: str) -> Path:
    """Write ``rows`` (dicts with 'figure', 'variant', 'median_us', 'ratio') as JSON and a markdown table."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{device.type}-{env['date']}"
    (RESULTS / f"{stem}.json").write_text(json.dumps({"environment": env, "rows": rows, "notes": notes}, indent=2) + "\n")
    lines = [f"# {name} on {env['device']}", "", ", ".join(f"{k} {v}" for k, v in env.items()), "", notes, ""]
    lines += ["| figure | variant | median (µs) | speed-up vs baseline | detail |", "|---|---|---:|---:|---|"]
    lines += [f"| {r['figure']} | {r['variant']} | {r['median_us']:.1f} | {r['ratio']:.2f}× | {r.get('detail', '')} |" for r in rows]
    path = RESULTS / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def ratio_rows(figure: str, times: Dict[str, float], baseline_us: float, details: Dict[str, str] = None) -> List[Dict[str, object]]:
    """Result rows of one figure: each variant's median and baseline / median."""
    details = details or {}
    return [{"figure": figure, "variant": name, "median_us": t, "ratio": baseline_us / t, **({"detail": details[name]} if name in details else {})}
            for name, t in times.items()]


def report(args, name: str, env: Dict[str, str], rows: List[Dict[str, object]], notes: str) -> None:
    """Write the results (unless --no-write), noting the command that measured them."""
    if args.no_write:
        return
    notes += f" Measured with `python bench/bench_{name}.py --device {args.device.type}`."
    print("written to", write_results(name, args.device, env, rows, notes))


def print_table(rows: List[Dict[str, object]]) -> None:
    width = max(len(str(r["variant"])) for r in rows)
    for r in rows:
        print(f"  {r['variant']:<{width}}  {r['median_us']:>12.1f} µs  {r['ratio']:>7.2f}×  {r.get('detail', '')}")


def default_device() -> torch.device:
    return torch.device(os.environ.get("FASTGAN_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))


def parse_args(doc: str, argv=None, add_arguments=None):
    """The options every benchmark takes, plus those ``add_arguments(parser)`` adds."""
    import argparse

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=str(default_device()), help="cpu or cuda (default: cuda when visible)")
    parser.add_argument("--quick", action="store_true", help="shorter timing runs (a smoke test, not a measurement)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write bench/results/")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    return args


def kernel_backends(device: torch.device) -> List[str]:
    """fastgan backends worth timing on ``device`` (the Triton interpreter is a test tool, not a kernel)."""
    import fastgan

    report = fastgan.backends()
    names = [b for b in ("triton", "cuda", "cpp", "reference") if report[b][device.type]]
    return [b for b in names if not (device.type == "cpu" and b == "triton")]
