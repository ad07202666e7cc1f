"""What every fastgan benchmark shares: the device and quick mode of a run, how one
entry is timed with pytest-benchmark's ``benchmark`` fixture, and the environment a
figure was taken in.

Timing (:func:`measure`):

* CPU: host ``perf_counter`` around a block of calls long enough (>= 10 ms) to dwarf
  the timer, repeated for a number of rounds; the median round is the figure.
* CUDA: CUDA events, in pytest-benchmark's pedantic mode. Before each round the L2
  cache is flushed (a 256 MB buffer is zeroed, as ``triton.testing.do_bench`` does)
  and the host waits for the flush: the events then bracket the call on an idle
  stream, and the round's duration is the device time between them, the host's
  launch work included whenever the GPU waits for it. (Queued behind the flush
  without that wait, as do_bench does, the host issued the call while the GPU was
  still zeroing: up to the flush's ~0.1 ms of host work never showed, and an eager
  call whose hook spends 80 µs on the host measured 48 µs.)

Each entry records in ``benchmark.extra_info`` its variant name, whether it is its
group's baseline, and what its rate is computed from (``bytes`` moved at least, or
``flops`` done); ``bench/report.py`` turns them into ratio and rate tables.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import time
from typing import Callable, Dict, List, Optional

import torch

QUICK_ENV, DEVICE_ENV = "FASTGAN_BENCH_QUICK", "FASTGAN_BENCH_DEVICE"
L2_FLUSH_BYTES = 256 * 1024 * 1024

# Set by conftest.py from --bench-quick / FASTGAN_BENCH_QUICK and --bench-device / FASTGAN_BENCH_DEVICE.
QUICK = os.environ.get(QUICK_ENV, "0").strip().lower() not in ("", "0", "false", "no", "off")
DEVICE = torch.device(os.environ.get(DEVICE_ENV) or ("cuda" if torch.cuda.is_available() else "cpu"))


def configure(quick: bool, device: Optional[str]) -> None:
    """Set the run's mode and device; ValueError (a usage error to pytest) for a device the
    benchmarks cannot use here."""
    global QUICK, DEVICE
    QUICK = quick
    if device:
        try:
            DEVICE = torch.device(device)
        except RuntimeError:
            raise ValueError(f"--bench-device {device!r}: not a device; use cpu or cuda (cuda:N for one GPU)") from None
    if DEVICE.type not in ("cpu", "cuda"):
        raise ValueError(f"--bench-device {DEVICE}: the benchmarks run on cpu or cuda")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--bench-device {DEVICE}: torch sees no CUDA device here")


def default_backend(device: torch.device, op: str) -> str:
    """The backend ``op`` runs on ``device`` by default (its registry order, what users get)."""
    from fastgan import _backend

    return _backend.registered()[op].backend(device.type)


def kernel_backends(device: torch.device, *ops: str) -> List[str]:
    """fastgan backends worth timing on ``device``: usable there and, where the backend
    registry knows ``ops``, implemented by at least one of them (a forced backend an op
    lacks would only rerun its default). The Triton interpreter is a test tool, not a kernel."""
    import fastgan
    from fastgan import _backend

    report = fastgan.backends()
    usable = report.get("backends", report)  # {"backends": {name: {device: bool}}, "ops": ...}
    names = [b for b in ("triton", "cuda", "cpp", "reference") if b in usable and usable[b].get(device.type)]
    registry = _backend.registered() if hasattr(_backend, "registered") else {}
    known = [registry[op] for op in ops if op in registry]
    if known:
        names = [b for b in names if any(b in op.impls for op in known)]
    return [b for b in names if not (device.type == "cpu" and b == "triton")]


def synchronize(device: torch.device = None) -> None:
    if (device or DEVICE).type == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------- CUDA event clock


class _EventStamp:
    """A point on the current CUDA stream; ``end - start`` is the device time between two (s)."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, start: "_EventStamp") -> float:
        self.event.synchronize()
        return start.event.elapsed_time(self.event) * 1e-3


def cuda_event_clock() -> _EventStamp:
    """pytest-benchmark timer that reads CUDA events instead of the host clock."""
    return _EventStamp()


_flush_buffer: Optional[torch.Tensor] = None


def flush_l2() -> None:
    """Evict the GPU's L2 cache (zero a buffer larger than it) and wait for it: the timed call
    that follows starts on an idle GPU, so its host work is not hidden behind the flush."""
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device=DEVICE)
    _flush_buffer.zero_()
    torch.cuda.synchronize()


# --------------------------------------------------------------------------- one entry


def _seconds(fn: Callable[[], object], number: int) -> float:
    synchronize()
    start = time.perf_counter()
    for _ in range(number):
        fn()
    synchronize()
    return time.perf_counter() - start


def graphed(fn: Callable[[], object], what: str, optimizers=()) -> Callable[[], object]:
    """``fn`` as a :class:`fastgan.graphs.GraphedStep`, warmed up and captured, so that what a
    benchmark then times is the replay; a capture that fell back to eager fails the entry."""
    from fastgan.graphs import GraphedStep

    step = GraphedStep(fn, optimizers=optimizers)
    step(), step()  # the eager warm-up, then the capture
    assert step.captured, f"{what}: the capture failed, the step runs eagerly (see its warning)"
    return step


def budget(full: float, quick: float) -> float:
    return quick if QUICK else full


def measure(
    benchmark,
    fn: Callable[[], object],
    variant: str,
    *,
    baseline: bool = False,
    group: Optional[str] = None,
    bytes: Optional[float] = None,
    flops: Optional[float] = None,
    detail: str = "",
    seconds: Optional[float] = None,
    min_rounds: Optional[int] = None,
    rounds: Optional[int] = None,
    warmup: int = 2,
):
    """Time ``fn`` as one benchmark entry (see the module docstring for how).

    ``seconds``: timing budget of the entry (default 1 s, quick 0.2 s); rounds are at
    least ``min_rounds`` (default 5, quick 3), so slow calls take longer than the budget.
    ``rounds``: exactly that many rounds of one call, no calibration (for calls of seconds).
    ``bytes`` / ``flops``: the least bytes the call must move / the FLOPs it does, for
    the rate columns. Returns what ``fn`` returned in the last round."""
    if group is not None:
        benchmark.group = group
    benchmark.extra_info.update(variant=variant, baseline=baseline, device=DEVICE.type, quick=QUICK)
    if bytes is not None:
        benchmark.extra_info["bytes"] = float(bytes)
    if flops is not None:
        benchmark.extra_info["flops"] = float(flops)
    if detail:
        benchmark.extra_info["detail"] = detail
    if getattr(benchmark, "disabled", False):  # --benchmark-disable: a smoke test; pedantic makes one untimed call
        return benchmark.pedantic(fn)
    seconds = budget(1.0, 0.2) if seconds is None else seconds
    min_rounds = budget(5, 3) if min_rounds is None else min_rounds
    once, warm = None, 0.0
    for _ in range(warmup):  # compilation, autotuning, allocator, caches; no more than the budget's worth
        once = _seconds(fn, 1)
        warm += once
        if warm > seconds:
            break
    fixed = rounds is not None
    if once is None and not fixed:
        once = _seconds(fn, 1)
    if DEVICE.type != "cuda":
        iterations = 1 if fixed else max(1, int(0.01 / max(once, 1e-9)))
        rounds = rounds or max(min_rounds, int(seconds / max(once * iterations, 1e-9)))
        benchmark.extra_info["timing"] = f"host perf_counter, {iterations} call(s) per round"
        return benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=0)
    rounds = rounds or max(min_rounds, min(2000, int(seconds / max(once, 20e-6))))
    warmup_rounds = 0 if fixed else 1
    if hasattr(benchmark, "_timer"):
        # pytest-benchmark's pedantic runner reads its timer right before and after the call.
        benchmark._timer = cuda_event_clock
        benchmark.extra_info["timing"] = "CUDA events, L2 flushed before each round"
        return benchmark.pedantic(fn, setup=flush_l2, rounds=rounds, warmup_rounds=warmup_rounds)
    # A benchmark fixture without a replaceable timer: the host clock around a synchronised call.
    benchmark.extra_info["timing"] = "host clock around a synchronised call, L2 flushed before each round"

    def synchronized():
        result = fn()
        torch.cuda.synchronize()
        return result

    return benchmark.pedantic(synchronized, setup=flush_l2, rounds=rounds, warmup_rounds=warmup_rounds)


# --------------------------------------------------------------------------- environment


def nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def environment(device: torch.device) -> Dict[str, object]:
    """Device, driver and library versions, date: written beside every result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    env: Dict[str, object] = {
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "quick": QUICK,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, driver=nvidia_driver(), cuda=torch.version.cuda,
                   capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   l2_mb=round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
                   cudnn_tf32=torch.backends.cudnn.allow_tf32, matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        threads = torch.get_num_threads()
        env.update(device=f"{platform.processor() or platform.machine()} CPU, {threads} thread{'s' if threads != 1 else ''}",
                   driver="n/a", load_average=" ".join(f"{x:.1f}" for x in os.getloadavg()))
    env["commit"] = source_commit()
    return env


def source_commit(root: Optional[str] = None) -> str:
    """The commit of the checkout at ``root`` (default: this one), with "+changes" when tracked
    files (results aside) differ from it: a copy of a working tree (a GPU machine's) may carry
    an older .git than its files."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        changed = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                  ":(exclude)bench/results"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+changes" if changed else "")) if head else "unknown"


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` by torch's FLOP formulas (matmuls and convolutions,
    backward and double backward included). torch's FlopCounterMode itself cannot be
    used: its module tracker breaks ``autograd.grad`` inside the counted region."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Counter(TorchDispatchMode):
        flops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            formula = flop_registry.get(func._overloadpacket)
            if formula is not None:
                Counter.flops += formula(*args, **kwargs, out_val=out)
            return out

    with Counter():
        fn()
    return Counter.flops
