"""Where a training run executes: its process group, device, numerics switches and stop signals.

:class:`Runtime` is made once per process by whoever starts training (the CLI, a test,
a notebook): ``Runtime.from_environment(config.device)`` joins the process group that
``torchrun`` describes in the environment (nccl on GPUs, gloo otherwise) and picks the
device (``cuda:LOCAL_RANK`` under torchrun). Everything else in ``fastgan.train`` takes
the runtime instead of reading the environment itself.

:class:`StopRequest` turns SIGINT / SIGTERM (Ctrl-C, a cluster's pre-emption) into a flag
that the training loop and long evaluations poll; a second Ctrl-C raises
KeyboardInterrupt at once. :data:`EXIT_INTERRUPTED` is the exit status of
``python -m fastgan train`` for a run that a signal stopped (after its checkpoint).
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

# sysexits' EX_TEMPFAIL ("temporary failure, try again"): the run stopped early on a signal,
# wrote its checkpoint and continues with --resume; schedulers can requeue on this status.
EXIT_INTERRUPTED = 75
# The run diverged (its losses or G's images went NaN or Inf): it stopped, checkpointed and
# recorded the step in summary.json; resuming does not train it further.
EXIT_DIVERGED = 3

# How long the other processes wait while rank 0 alone decodes a folder data set, downloads
# CIFAR-10 or extracts the FID's real features: far beyond the process group's own collective
# timeout (NCCL's 10 minutes), which such work outlasts (hours, for LSUN decoded once).
PATIENT_TIMEOUT = datetime.timedelta(hours=24)


def resolve_device(name: str) -> torch.device:
    """``auto`` (cuda when visible, else cpu), ``cpu``, ``cuda`` or ``cuda:N``; errors when no GPU is visible."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but no GPU is visible (use device=cpu or device=auto)")
    return device


@dataclass
class Runtime:
    """This process's place in a (possibly single-process) run: ``rank`` of ``world`` on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_process_group: bool = False  # joined by from_environment, so close() leaves it
    # a gloo group whose timeout is PATIENT_TIMEOUT, for patient_barrier (made by from_environment)
    patient_group: Optional[object] = field(default=None, repr=False, compare=False)

    @classmethod
    def from_environment(cls, device: str = "auto") -> "Runtime":
        """Join ``torchrun``'s process group (if WORLD_SIZE > 1 and none is joined yet) and pick the device."""
        resolved = resolve_device(device)
        joined = False
        if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
            joined = True
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        if resolved.type == "cuda" and resolved.index is None:  # set_device needs an index
            index = int(os.environ.get("LOCAL_RANK", rank)) if world > 1 else torch.cuda.current_device()
            resolved = torch.device("cuda", index)
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        # every process makes it here, at once: new_group is a collective
        patient = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT) if world > 1 else None
        return cls(rank, world, resolved, joined, patient)

    @property
    def backend(self) -> Optional[str]:
        """The process group's backend (nccl, gloo), or None in a single process."""
        return dist.get_backend() if self.world > 1 and dist.is_initialized() else None

    @property
    def _reduce_device(self) -> torch.device:
        """Where this process's small all-reduces run: NCCL reduces GPU tensors only, gloo CPU ones."""
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def patient_barrier(self) -> None:
        """A barrier for the processes that wait while rank 0 alone does long work (a data set's
        first decoding or download, the FID's real statistics): it may wait up to
        :data:`PATIENT_TIMEOUT`, where a plain barrier fails at the process group's timeout."""
        if self.world > 1:
            dist.barrier(group=self.patient_group)  # None (a runtime made by hand): the default group

    def rank_share(self, global_batch: Tensor) -> Tensor:
        """This rank's contiguous slice of a tensor drawn for the global batch."""
        share = global_batch.shape[0] // self.world
        return global_batch[self.rank * share : (self.rank + 1) * share]

    def to_device(self, tensor: Tensor) -> Tensor:
        """A CPU tensor on the device without stalling the host: on a GPU through pinned memory
        (a copy from pageable memory would wait for every kernel queued before it)."""
        if self.device.type != "cuda":
            return tensor.to(self.device)
        return tensor.pin_memory().to(self.device, non_blocking=True)

    def any(self, flag: bool) -> bool:
        """True on every process when ``flag`` is true on any (so no process waits alone in a collective)."""
        if self.world == 1:
            return flag
        value = torch.tensor([float(flag)], device=self._reduce_device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def mean(self, values: Dict[str, Tensor]) -> Dict[str, float]:
        """Each one-element tensor of ``values`` averaged over the processes (every process
        calls it, with the same keys): a batch mean of each process's share becomes the mean
        over the global batch, as one process computes it."""
        if self.world == 1:
            return {k: float(v) for k, v in values.items()}
        stacked = torch.stack([torch.as_tensor(v).detach().reshape(()).to(self._reduce_device, torch.float64)
                               for v in values.values()])
        dist.all_reduce(stacked)
        return dict(zip(values, (stacked / self.world).tolist()))

    def close(self) -> None:
        """Leave the process group this runtime joined (one passed in by the caller is the caller's)."""
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_process_group = False

    @contextlib.contextmanager
    def numerics(self, *, deterministic: bool, tf32: bool, cudnn_benchmark: bool = False) -> Iterator[None]:
        """torch's switches for the run, restored afterwards.

        ``deterministic``: torch's deterministic algorithms and cuDNN without autotuning
        (fastgan's own kernels reduce in a fixed order on every backend -- no floating-point
        atomics -- so they stay on). ``tf32``: TensorFloat-32 matmuls and convolutions on Ampere and newer GPUs
        (10-bit mantissa products, ~1e-3 relative; much faster); off means full float32 for both
        (PyTorch's own default allows TF32 in cuDNN convolutions). ``cudnn_benchmark``: cuDNN times
        its convolution algorithms for each new shape and keeps the fastest (a GAN's shapes are
        fixed, so only the first updates pay); ``deterministic`` overrides it (Config refuses both)."""
        saved = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                 torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
        elif cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(saved[0])
            (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32) = saved[1:]


class StopRequest:
    """SIGINT / SIGTERM set :attr:`requested` (handlers installed for the ``with`` block, then
    restored); a second SIGINT raises KeyboardInterrupt. Outside the main thread, where Python
    cannot install signal handlers, only :meth:`request` sets it."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def request(self) -> None:
        self.requested = True

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "StopRequest":
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


__all__ = ["EXIT_DIVERGED", "EXIT_INTERRUPTED", "Runtime", "StopRequest", "resolve_device"]
