"""Where eager time goes: torch.profiler over the benchmarks' eager workloads.

On a GPU a small GAN's eager step is bound by the host -- Python, op dispatch, kernel
launches -- more than by the kernels (the first H200 run: the multi-layer spectral-norm
op took 305 µs eager and 55 µs replayed from a CUDA graph). This script says where
that host time goes, per workload:

* wall time per call (synchronized) and host time per call (the calls issued without
  waiting; on a GPU the difference is time the host had to spare);
* kernel launches per call (``cudaLaunchKernel`` and friends, on a GPU) and the kernels'
  own GPU time per call (a lower bound for the call replayed from a CUDA graph);
* the ops with the most self CPU time (the profiler's table, top ``--top``) and, on a GPU,
  the kernels with the most GPU time (where a replayed refresh's time goes, kernel by kernel).

Workloads, each a benchmark's own setup (bench_spectral_norm.py, bench_training.py):
``sn``: one refresh of SNDCGAN D's 8 layers by torch's parametrization and by fastgan's
multi-layer op on the device's default backend; ``penalty``: one WGAN-GP D step (SNDCGAN,
batch 64) with the hand-written autograd penalty and with fastgan's; ``training``: one
iteration of each training benchmark case (at the benchmarks' quick-mode batch: 64 on a
GPU, 16 and 4 on the CPU), plain and with fastgan's eager trainer; ``graphed`` (GPU only):
the convolution-bound ResNet CIFAR case replayed from the trainer's CUDA graphs with every
speed option (bench_training.ALL_OPTIONS), whose host work is gone: its kernel table is where
the GPU time of the fastest way to train it goes.

Run: python bench/profile_host.py [--device cuda] [--workloads sn penalty training graphed] [--out FILE.md]
(make gpu-check runs it and keeps the report in build/gpu-check/profile.md).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable, Dict, List, Tuple

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the benchmark modules beside this file
import timing  # noqa: E402

LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def per_call_times(call: Callable[[], object], device: torch.device, calls: int) -> Tuple[float, float]:
    """(wall µs per call, synchronized at the end; host µs per call, the calls only issued)."""
    timing.synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    issued = time.perf_counter()
    timing.synchronize(device)
    done = time.perf_counter()
    return (done - start) / calls * 1e6, (issued - start) / calls * 1e6


def profile_workload(name: str, call: Callable[[], object], device: torch.device, calls: int, top: int) -> List[str]:
    """Markdown lines for one workload: times, launches and the top ops by self CPU time."""
    for _ in range(3):  # warm-up: first calls build caches, autotune, allocate
        call()
    wall, host = per_call_times(call, device, calls)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(calls):
            call()
        timing.synchronize(device)
    averages = profiler.key_averages()
    launches = sum(event.count for event in averages if event.key in LAUNCHES) / calls
    summary = (f"{wall:.1f} µs per call (wall, synchronized), {host:.1f} µs to issue it (host), "
               f"{launches:.1f} kernel launches per call ({calls} calls)")
    if device.type == "cuda":
        # The kernels' own time, apart from the host's: what a CUDA graph replay of the call costs at least.
        # Only the GPU's events: the ops that launched them also carry their time (as torch's table sums it).
        busy = sum(event.self_device_time_total for event in averages
                   if event.device_type == DeviceType.CUDA and not getattr(event, "is_user_annotation", False)) / calls
        summary += f", {busy:.1f} µs of kernels"
    lines = [f"### {name}", "", summary, "", "```",
             averages.table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60), "```", ""]
    if device.type == "cuda":
        lines += ["Kernels by GPU time:", "", "```",
                  averages.table(sort_by="self_device_time_total", row_limit=top, max_name_column_width=60), "```", ""]
    print("\n".join(lines[:3]), flush=True)
    return lines


def sn_workloads() -> Dict[str, Callable[[], object]]:
    import bench_spectral_norm as sn

    models = sn.Models()
    backend = timing.default_backend(sn.DEVICE, "spectral_norm_power_iteration_multi")
    names = [sn.TORCH_PARAM, f"{sn.MULTI_LAYER_OP} [{backend}]"]
    if f"{sn.GROUPED_HOOK} [{backend}]" in sn.REFRESH:  # what a forward runs (replayed on a GPU)
        names.append(f"{sn.GROUPED_HOOK} [{backend}]")
    return {f"SN refresh, SNDCGAN D: {name}": sn.refresh_fn(name, models)[0] for name in names}


def penalty_workloads() -> Dict[str, Callable[[], object]]:
    import bench_gradient_penalty as penalty

    d, real, fake, _ = penalty.discriminator_and_batches()
    return {f"WGAN-GP D step, batch {penalty.BATCH}: {name}":
            penalty.d_step(d, real, fake, penalty.penalty_fn(name, d, real, fake, "wgan-gp"))
            for name in (penalty.PLAIN, f"fastgan [{timing.default_backend(penalty.DEVICE, 'gp_interpolate')}]")}


def training_workloads(workdir: str) -> Dict[str, Callable[[], object]]:
    import bench_training as training

    workloads = {}
    for case in training.CASES:
        trainer, plain, _ = training.build_case(case, workdir)
        label = f"training iteration, {case}, batch {training.BATCH[case]}"
        workloads[f"{label}: {training.PLAIN}"] = plain.train_step
        workloads[f"{label}: {training.EAGER}"] = trainer.train_step
    return workloads


def graphed_workloads(workdir: str) -> Dict[str, Callable[[], object]]:
    import bench_training as training
    from fastgan.train.runtime import Runtime

    case = "resnet_cifar wgan-gp"
    _, _, real = training.build_case(case, workdir)
    options, numerics = training.OPTIONS[training.ALL_OPTIONS]
    with Runtime().numerics(deterministic=False, **numerics):  # the capture records the kernels these pick
        step, _ = training.graphed_step(case, workdir, real, training.ALL_OPTIONS, **options)
    return {f"training iteration, {case}, batch {training.BATCH[case]}: {training.ALL_OPTIONS} (replayed)": step}


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Reports where each workload's eager time goes (see the module docstring).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to profile on (default: cuda when visible)")
    parser.add_argument("--workloads", nargs="+", choices=("sn", "penalty", "training", "graphed"),
                        default=["sn", "penalty", "training", "graphed"], help="graphed: on a GPU only")
    parser.add_argument("--calls", type=int, default=20, help="profiled calls per SN workload (the slower ones: a quarter)")
    parser.add_argument("--top", type=int, default=15, help="ops listed per workload")
    parser.add_argument("--out", help="write the report (markdown) here as well")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible")
    timing.configure(quick=True, device=args.device)  # before the benchmark modules size their cases
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# Eager host profile on {name}", "", f"torch {torch.__version__}", ""]
    with tempfile.TemporaryDirectory() as workdir:
        workloads: Dict[str, Callable[[], object]] = {}
        if "sn" in args.workloads:
            workloads.update(sn_workloads())
        if "penalty" in args.workloads:
            workloads.update(penalty_workloads())
        if "training" in args.workloads:
            workloads.update(training_workloads(workdir))
        if "graphed" in args.workloads and device.type == "cuda":
            workloads.update(graphed_workloads(workdir))
        for workload, call in workloads.items():
            calls = args.calls if workload.startswith("SN") else max(2, args.calls // 4)  # the others take ms
            lines += profile_workload(workload, call, device, calls, args.top)
            if args.out:  # after every workload: a run stopped at its time budget keeps what it profiled
                with open(args.out, "w") as f:
                    f.write("\n".join(lines))
    if args.out:  # the time taken, to tell a slow profile from a slow exit when a budget stops the run
        print(f"written: {args.out} after {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
