"""Render pytest-benchmark's JSON into fastgan's result tables, and the gpu-check summary.

    python bench/report.py [RUN.json]            # default: the newest run saved under .benchmarks/
    python bench/report.py RUN.json --summary [--junit TESTS.xml ...] [--bench-junit BENCH.xml] [--phases PHASES.tsv]

For each op (``bench/bench_<op>.py``) it writes ``bench/results/<op>-<device>-<date>.md``
and ``.json``: the environment (device, driver, torch, triton, date, commit), then one
table per group with each entry's median, interquartile range, rounds, speed-up over
the group's baseline (baseline median / entry median), its rate (GB/s from the bytes
the entry must move at least, TFLOP/s from its FLOPs; on an H100 also as a share of
the card's limit; the JSON keeps B/s and FLOP/s) and its check or detail. A run never
overwrites another run's files: a second run the same day (another GPU, a ``-k`` subset)
gets ``<date>-2``, ``-3``, ...; rendering the same run again rewrites its own. Entries
more than REGRESSION slower than in the newest earlier result file of the same op, device
(by name) and mode (quick or not) are flagged.

``--summary`` prints one screen: the phases' exit status, the test suite's and the
benchmarks' pass/fail counts (from JUnit XML; failed same-math checks and skipped
entries by name), and every target of the issues against what was measured.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
STORAGE = ROOT / ".benchmarks"
REGRESSION = 0.10  # flag entries this much slower than the previous result file

# Datasheet limits of the cards the targets are stated for (SXM, dense).
LIMITS = {
    "H100": {"bandwidth": 3.35e12, "fp32": 67e12, "tf32": 495e12},
    "H200": {"bandwidth": 4.8e12, "fp32": 67e12, "tf32": 495e12},
}


def newest_saved_run() -> Path:
    runs = sorted(STORAGE.rglob("*.json"), key=lambda p: p.stat().st_mtime)  # quick runs: under quick/
    if not runs:
        raise SystemExit(f"no saved benchmark run under {STORAGE}; run `make bench` first or pass a JSON file")
    return runs[-1]


def op_of(benchmark: dict) -> str:
    match = re.search(r"bench_(\w+)\.py::", benchmark["fullname"])
    return match.group(1) if match else "misc"


def limits_for(env: dict) -> Optional[dict]:
    return next((v for k, v in LIMITS.items() if k in str(env.get("device", ""))), None)


def _timing(benchmark: dict) -> str:
    """How an entry was timed; names the timer when it is not CUDA events (e.g. time.process_time)."""
    how = benchmark.get("extra_info", {}).get("timing", "")
    timer = str(benchmark.get("options", {}).get("timer", ""))
    if how.startswith("host") and timer and "perf_counter" not in timer:
        how = how.replace("host perf_counter", f"{timer} (CPU time)" if "process_time" in timer else timer)
    return how


def rows_of(benchmarks: List[dict], env: dict) -> Dict[str, List[dict]]:
    """Group -> result rows (median, ratio to the group's baseline, rate)."""
    limits = limits_for(env)
    groups: Dict[str, List[dict]] = defaultdict(list)
    for b in benchmarks:
        info, stats = b.get("extra_info", {}), b["stats"]
        row = {"variant": info.get("variant", b["name"]), "baseline": bool(info.get("baseline")),
               "median_us": stats["median"] * 1e6, "iqr_us": stats.get("iqr", 0.0) * 1e6, "rounds": stats["rounds"],
               "detail": info.get("detail", ""), "timing": _timing(b)}
        if "bytes" in info:
            row["rate"] = info["bytes"] / stats["median"]
            row["rate_unit"] = "B/s"
            if limits:
                row["of_limit"] = row["rate"] / limits["bandwidth"]
        elif "flops" in info:
            row["rate"] = info["flops"] / stats["median"]
            row["rate_unit"] = "FLOP/s"
            if limits:
                row["of_limit"] = row["rate"] / limits["tf32" if env.get("cudnn_tf32", True) else "fp32"]
        groups[b["group"] or b["name"]].append(row)
    for rows in groups.values():
        base = next((r for r in rows if r["baseline"]), None)
        for r in rows:
            r["ratio"] = base["median_us"] / r["median_us"] if base else None
        rows.sort(key=lambda r: (not r["baseline"], r["median_us"]))
    return dict(groups)


def _result_key(op: str, device_type: str, stem: str) -> Optional[Tuple[str, int]]:
    """(date, number) of the result name ``<op>-<device>-<date>[-<number>]`` (number 1 unsuffixed)."""
    match = re.fullmatch(r"(\d{4}-\d{2}-\d{2})(?:-(\d+))?", stem[len(f"{op}-{device_type}-"):])
    return (match.group(1), int(match.group(2) or 1)) if match else None


def _result_files(op: str, device_type: str) -> Dict[Tuple[str, int], Path]:
    """(date, number) -> the result JSON of each result name of ``op`` on ``device_type``."""
    found = {}
    for path in RESULTS.glob(f"{op}-{device_type}-*.json"):
        key = _result_key(op, device_type, path.stem)
        if key:
            found[key] = path
    return found


def result_stem(op: str, device_type: str, date: str, run_id: str) -> Path:
    """Where this run's results of ``op`` go: the first of ``<op>-<device>-<date>``, ``...-2``, ...
    that is free or already holds this run's (``run_id``: pytest-benchmark's start time)."""
    files = _result_files(op, device_type)
    number = 1
    while (date, number) in files and json.loads(files[(date, number)].read_text()).get(
            "environment", {}).get("run") != run_id:
        number += 1
    return RESULTS / (f"{op}-{device_type}-{date}" + (f"-{number}" if number > 1 else ""))


def previous_result(op: str, device_type: str, stem: Path, env: dict) -> Optional[Tuple[str, dict]]:
    """(name, contents) of the newest result file before ``stem`` of this op on the same device
    (by name: an H200's figures are no baseline for an H100's) in the same mode (quick or not)."""
    files = _result_files(op, device_type)
    this = _result_key(op, device_type, stem.name)
    for key in sorted(files, reverse=True):
        if key >= this:  # this run's own file, or a later one
            continue
        data = json.loads(files[key].read_text())
        before = data.get("environment", {})
        if ("groups" in data and before.get("device") == env.get("device")
                and bool(before.get("quick")) == bool(env.get("quick"))):
            return files[key].stem, data
    return None


def flag_regressions(groups: Dict[str, List[dict]], previous: Optional[dict]) -> None:
    if not previous:
        return
    before = {(g, r["variant"]): r["median_us"] for g, rows in previous["groups"].items() for r in rows}
    for group, rows in groups.items():
        for r in rows:
            old = before.get((group, r["variant"]))
            if old:
                r["vs_previous"] = r["median_us"] / old - 1
                r["regression"] = r["vs_previous"] > REGRESSION


def _format_time(us: float) -> str:
    return f"{us / 1e3:.2f} ms" if us >= 1e4 else f"{us:.1f} µs"


def _format_rate(r: dict) -> str:
    if "rate" not in r:
        return ""
    bandwidth = r["rate_unit"] in ("B/s", "GB/s")  # GB/s: files written before the JSON kept base units
    text = f"{r['rate'] / (1e9 if bandwidth else 1e12):.3g} {'GB/s' if bandwidth else 'TFLOP/s'}"
    return text + (f" ({100 * r['of_limit']:.0f}%)" if "of_limit" in r else "")


def markdown(op: str, env: dict, groups: Dict[str, List[dict]], previous_name: Optional[str]) -> str:
    lines = [f"# {op} on {env.get('device', '?')}", "",
             ", ".join(f"{k} {env[k]}" for k in ("device", "driver", "cuda", "torch", "triton", "python", "date", "commit",
                                                  "load_average") if k in env), ""]
    if env.get("quick"):
        lines += ["Quick mode: short timing runs (and smaller CPU cases); a first look, not a measurement to quote.", ""]
    limits = limits_for(env)
    if limits:
        lines += [f"Share of the card's limit: GB/s of {limits['bandwidth'] / 1e12:.2f} TB/s HBM; TFLOP/s of "
                  f"{(limits['tf32'] if env.get('cudnn_tf32', True) else limits['fp32']) / 1e12:.0f} TFLOP/s "
                  f"({'TF32: cuDNN convolutions may use it' if env.get('cudnn_tf32', True) else 'FP32'}).", ""]
    lines += ["Speed-up = the group's baseline median / the entry's median (> 1: faster than the baseline). "
              "Rates: GB/s from the bytes an entry must move at least, TFLOP/s from its convolution and matmul FLOPs.", ""]
    if previous_name:
        lines += [f"vs previous: median change against bench/results/{previous_name}.md; "
                  f"⚠ marks a slowdown over {REGRESSION:.0%}.", ""]
    for group, rows in groups.items():
        lines += [f"## {group}", "", "| variant | median | IQR | rounds | speed-up | rate | vs previous | check / detail |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in rows:
            ratio = "baseline" if r["baseline"] else (f"{r['ratio']:.2f}×" if r["ratio"] else "")
            change = ""
            if "vs_previous" in r:
                change = f"{100 * r['vs_previous']:+.0f}%{' ⚠' if r['regression'] else ''}"
            detail = r["detail"].replace("|", "\\|")  # a pipe in a cell would end it
            lines.append(f"| {r['variant']} | {_format_time(r['median_us'])} | {_format_time(r['iqr_us'])} | {r['rounds']} | "
                         f"{ratio} | {_format_rate(r)} | {change} | {detail} |")
        timings = sorted({r["timing"] for r in rows if r["timing"]})
        lines += ["", f"Timing: {'; '.join(timings)}.", ""]
    return "\n".join(lines)


def render(run: dict, source: str) -> Tuple[dict, List[Path]]:
    """Write the result files of every op in ``run``; returns (op -> groups, paths)."""
    env = dict(run.get("machine_info", {}).get("fastgan", {}))
    device_type = env.get("device_type", "cpu")
    date = env.get("date") or run.get("datetime", "")[:10]
    env["source"] = source
    env["run"] = run.get("datetime", source)  # what tells this run's files from another's
    by_op: Dict[str, List[dict]] = defaultdict(list)
    for b in run["benchmarks"]:
        by_op[op_of(b)].append(b)
    RESULTS.mkdir(parents=True, exist_ok=True)
    paths, all_groups = [], {}
    for op, benchmarks in sorted(by_op.items()):
        groups = rows_of(benchmarks, env)
        stem = result_stem(op, device_type, date, env["run"])
        previous_name, previous = previous_result(op, device_type, stem, env) or (None, None)
        flag_regressions(groups, previous)
        stem.with_suffix(".json").write_text(json.dumps({"environment": env, "groups": groups}, indent=2, ensure_ascii=False) + "\n")
        stem.with_suffix(".md").write_text(markdown(op, env, groups, previous_name) + "\n")
        paths += [stem.with_suffix(".md"), stem.with_suffix(".json")]
        all_groups[op] = groups
    return all_groups, paths


# --------------------------------------------------------------------------- targets and the summary


def _find(groups: dict, op: str, group_prefix: str) -> List[dict]:
    return next((rows for name, rows in groups.get(op, {}).items() if name.startswith(group_prefix)), [])


def _best(rows: List[dict], prefix: Union[str, Tuple[str, ...]]) -> Optional[dict]:
    candidates = [r for r in rows if r["variant"].startswith(prefix)]
    return min(candidates, key=lambda r: r["median_us"]) if candidates else None


def _eager(rows: List[dict]) -> List[dict]:
    return [r for r in rows if not r["variant"].endswith(", graphed")]


def _graphed(rows: List[dict]) -> List[dict]:
    return [r for r in rows if r["variant"].endswith(", graphed")]


def _speedup(rows: List[dict], prefix: Union[str, Tuple[str, ...]], baseline: Optional[str] = None) -> Tuple[Optional[float], str]:
    best = _best(rows, prefix)
    base = next((r for r in rows if (r["variant"] == baseline if baseline else r["baseline"])), None)
    if not best or not base:
        return None, "not measured"
    return base["median_us"] / best["median_us"], f"{base['median_us'] / best['median_us']:.2f}× ({best['variant']})"


def targets(groups: dict, device_type: str) -> List[Tuple[str, str, Optional[bool]]]:
    """(target, measured, met: True / False / None when not measured) for this device."""
    out = []

    def add(text, value, measured, ok):
        out.append((text, measured, None if value is None else ok))

    refresh = _find(groups, "spectral_norm", "spectral_norm: refresh")
    normalized = _find(groups, "spectral_norm", "spectral_norm: normalized weights")
    training = {name: rows for name, rows in groups.get("training", {}).items()}
    if device_type == "cuda":
        eager_refresh = ("fastgan apply_spectral_norm's refresh", "fastgan multi-layer op")  # what a model's forward runs
        best = _best(refresh, eager_refresh)
        add("SN refresh, whole SNDCGAN D <= 25 µs", best and best["median_us"],
            f"{best['median_us']:.1f} µs ({best['variant']})" if best else "not measured", bool(best) and best["median_us"] <= 25)
        value, text = _speedup(refresh, eager_refresh)
        add("SN refresh >= 20x torch parametrization", value, text, value is not None and value >= 20)
        # Like against like: eager against eager, graphed against graphed (a graph speeds either penalty).
        d_step = _find(groups, "gradient_penalty", "gradient_penalty: wgan-gp")
        eager, eager_text = _speedup(_eager(d_step), "fastgan")
        replayed, replayed_text = _speedup(_graphed(d_step), "fastgan", baseline="plain autograd, graphed")
        value = max((v for v in (eager, replayed) if v is not None), default=None)
        add("WGAN-GP D step >= 1.3x plain autograd", value,
            f"eager {eager_text}; graphed against plain graphed {replayed_text}", value is not None and value >= 1.3)
        fid = _find(groups, "fid", "fid: trace_sqrt_product")
        auto, fastest = _best(fid, "fastgan auto"), _best(fid, "fastgan")
        add("FID tr sqrt at d=2048 <= 3 ms (device default)", auto and auto["median_us"],
            f"{auto['median_us'] / 1e3:.2f} ms ({auto['variant']}); fastest {fastest['median_us'] / 1e3:.2f} ms ({fastest['variant']})"
            if auto else "not measured", bool(auto) and auto["median_us"] <= 3000)
        value, text = _speedup(_find(groups, "fid", "fid: inception features"), "fastgan")
        add("Inception features >= plain torch throughput", value, text, value is not None and value >= 1.0)
        for name, rows in training.items():
            value, text = _speedup(rows, "fastgan cuda graphs")
            add(f"{name.removeprefix('training: ')}: graphs >= 3x plain", value, text, value is not None and value >= 3)
            value, text = _speedup(rows, "fastgan eager")
            add(f"{name.removeprefix('training: ')}: eager >= 1.5x plain", value, text, value is not None and value >= 1.5)
    else:
        value, text = _speedup(refresh, "fastgan", baseline="torch parametrizations.spectral_norm")
        add("CPU: SN refresh >= 3x per-layer torch", value, text, value is not None and value >= 3)
        value, text = _speedup(normalized, "fastgan spectral_norm per layer", baseline="torch parametrizations.spectral_norm")
        add("CPU: drop-in spectral_norm forward >= 2x torch", value, text, value is not None and value >= 2)
        for name, rows in training.items():
            value, text = _speedup(rows, "fastgan eager")
            add(f"CPU {name.removeprefix('training: ')}: eager not slower (>= 0.95x)", value, text, value is not None and value >= 0.95)
    return out


def junit_counts(path: Path) -> Tuple[Dict[str, int], List[str], List[str]]:
    """(counts, failed names, skipped names with reasons) of a JUnit XML report."""
    root = ElementTree.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], []
    for case in root.iter("testcase"):
        outcome = {child.tag: child for child in case}
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if "failure" in outcome:
            counts["failed"] += 1
            failures.append(name)
        elif "error" in outcome:
            counts["errors"] += 1
            failures.append(name + " (error)")
        elif "skipped" in outcome:
            counts["skipped"] += 1
            skips.append(f"{name}: {outcome['skipped'].get('message', '')}")
        else:
            counts["passed"] += 1
    return counts, failures, skips


def _junit_lines(label: str, path: Optional[Path], show_skips: bool) -> List[str]:
    if path is None:
        return []
    if not path.exists():
        return [f"{label}: no report at {path} (the phase did not finish)"]
    counts, failures, skips = junit_counts(path)
    lines = [f"{label}: " + ", ".join(f"{v} {k}" for k, v in counts.items())]
    lines += [f"  FAILED {name}" for name in failures[:8]]
    if len(failures) > 8:
        lines.append(f"  ... and {len(failures) - 8} more (see the log)")
    if show_skips:
        lines += [f"  skipped {text}" for text in skips[:4]]
    return lines


def summary(groups: dict, device_type: str, junits: List[Path], bench_junit: Optional[Path], phases: Optional[Path],
            paths: List[Path]) -> str:
    lines = ["=" * 78, "fastgan gpu-check summary" if device_type == "cuda" else "fastgan benchmark summary", "=" * 78]
    if phases and phases.exists():
        for line in phases.read_text().splitlines():
            name, status, seconds = (line.split("\t") + ["", ""])[:3]
            lines.append(f"phase {name:<12} {status:<24} {seconds} s")
    for junit in junits:
        lines += _junit_lines(junit.stem if len(junits) > 1 else "tests", junit, show_skips=False)
    lines += _junit_lines("benchmarks", bench_junit, show_skips=True)
    lines.append("targets:")
    for text, measured, ok in targets(groups, device_type):
        mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[ok]
        lines.append(f"  {mark} {text:<46} {measured}")
    configs = _find(groups, "spectral_norm", "spectral_norm: triton launch configs")
    fastest, default = _best(configs, "triton"), next((r for r in configs if r["baseline"]), None)
    if fastest and default:  # what fastgan.kernels.spectral_norm.GPU should be, by this run
        lines.append(f"triton SN launch config: default {default['median_us']:.1f} µs; fastest {fastest['median_us']:.1f} µs "
                     f"({fastest['variant'].removeprefix('triton ')})")
    for name, rows in groups.get("training", {}).items():  # what the speed options give, beside the targets' graphs
        value, text = _speedup(rows, "fastgan graphs")
        if value is not None:
            graphs, _ = _speedup(rows, "fastgan cuda graphs")
            plain_graphed, _ = _speedup(rows, "plain PyTorch, graphed")
            lines.append(f"{name.removeprefix('training: ')}: fastest option {text}"
                         + (f"; graphs with torch's numerics {graphs:.2f}×" if graphs else "")
                         + (f"; plain PyTorch graphed by GraphedStep {plain_graphed:.2f}×" if plain_graphed else ""))
    d_step = _find(groups, "gradient_penalty", "gradient_penalty: wgan-gp")
    value, text = _speedup(_eager(d_step), "fastgan")
    plain_graphed, _ = _speedup(d_step, "plain autograd, graphed")
    if value is not None and plain_graphed is not None:  # how much of the D step's speed-up is the graph's
        lines.append(f"wgan-gp D step: fastgan eager {text}; plain autograd graphed by GraphedStep {plain_graphed:.2f}×")
    if paths:
        lines.append("results: " + ", ".join(sorted({p.with_suffix('').name for p in paths})) + " (.md/.json in bench/results)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", type=Path, help="pytest-benchmark JSON (default: the newest saved run)")
    parser.add_argument("--summary", action="store_true", help="print the targets (and test counts) summary")
    parser.add_argument("--junit", type=Path, action="append", default=[],
                        help="JUnit XML of the test suite (or of one part of it: repeat), for the summary")
    parser.add_argument("--bench-junit", type=Path, help="JUnit XML of the benchmark run (failed checks, skips)")
    parser.add_argument("--phases", type=Path, help="tab-separated phase, status, seconds lines, for the summary")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="whose targets the summary lists (default: the run's device)")
    args = parser.parse_args(argv)
    groups, paths, device_type = {}, [], args.device or "cpu"
    if args.run is not None and not args.run.exists():
        print(f"no benchmark results at {args.run} (the benchmark phase did not run or wrote nothing)")
    else:
        path = args.run or newest_saved_run()
        run = json.loads(path.read_text())
        if not run.get("benchmarks"):
            print(f"{path} holds no benchmark results")
        else:
            groups, paths = render(run, str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path))
            device_type = args.device or run.get("machine_info", {}).get("fastgan", {}).get("device_type", "cpu")
            print("written: " + " ".join(str(p.relative_to(ROOT)) for p in paths))
    if args.summary:
        print(summary(groups, device_type, args.junit, args.bench_junit, args.phases, paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
