"""Training batches: epoch-wise shuffled global batches of a uint8 data set, as float tensors on the device.

:class:`BatchStream` draws batch k of epoch e from a permutation seeded by (seed, e), so
the data order depends on the seed and the position only (``batches_drawn``, kept in
checkpoints): resumed runs and runs on any number of processes see the same global
batches, each process its :meth:`Runtime.rank_share`. Batches drop the epoch's last
partial batch.

Where the conversion to float happens: on a GPU the whole uint8 set is copied to the
device once when it takes at most :data:`RESIDENT_FRACTION` of the free GPU memory
(CIFAR-10: 150 MB); each batch is then an index-gather and a convert on the device, with
no host work. Larger sets (e.g. a memory-mapped folder) are gathered on the host into
pinned memory by a background thread one batch ahead, copied asynchronously and
converted on the device. On the CPU batches are gathered and converted in place.
The values are the same everywhere: x / 255 in the configured dtype.
"""
from __future__ import annotations

import concurrent.futures
import warnings
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from fastgan.train.data import ImageData
from fastgan.train.runtime import Runtime

# Share of the free GPU memory a data set may take to be kept on the device.
RESIDENT_FRACTION = 0.25
_ORDER_SEED_MULTIPLIER = 1_000_003
# The largest run seed whose epoch seeds (seed * _ORDER_SEED_MULTIPLIER + epoch, for up to 2**32 epochs)
# torch.manual_seed accepts (< 2**64); the config refuses larger ones before anything runs.
MAX_SEED = (2**64 - 1 - 2**32) // _ORDER_SEED_MULTIPLIER


class BatchStream:
    """Batches of ``data``: (B / world, 3, S, S) in [0, 1], ``dtype``, on the runtime's device.

    ``resident`` forces (True) or forbids (False) keeping the uint8 set on the device;
    None decides by size (GPU only). ``channels_last`` returns NHWC-strided batches."""

    def __init__(self, data: ImageData, batch_size: int, seed: int, runtime: Runtime, dtype: torch.dtype = torch.float32,
                 *, channels_last: bool = False, resident: Optional[bool] = None) -> None:
        if len(data) < batch_size:
            raise ValueError(f"the data set has {len(data)} images, fewer than batch_size={batch_size}")
        self.data, self.batch_size, self.seed, self.runtime, self.dtype = data, batch_size, seed, runtime, dtype
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.batches_drawn = 0
        self._order = (-1, None)  # (epoch, its permutation)
        device = runtime.device
        if resident is None:
            resident = device.type == "cuda" and data.images.nbytes <= RESIDENT_FRACTION * torch.cuda.mem_get_info(device)[0]
        self.resident = bool(resident)
        self._images = _on_device(data.images, device) if self.resident else None
        self._prefetch = (concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastgan-prefetch")
                          if device.type == "cuda" and not self.resident else None)
        self._pending = None  # (position, future of the pinned uint8 batch)
        # A divisor on the device: CUDA divides by a host scalar as a multiplication by its
        # reciprocal, which differs from x / 255 in the last bit for half of the 256 levels.
        self._max_level = torch.tensor(255, dtype=dtype, device=device)

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.data) // self.batch_size

    def indices(self, position: int) -> Tensor:
        """This rank's data indices of global batch ``position`` (0, 1, ... over all epochs)."""
        epoch, index = divmod(position, len(self))
        order = self._order  # read once: the prefetch thread may replace it meanwhile
        if order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * _ORDER_SEED_MULTIPLIER + epoch)
            self._order = order = (epoch, torch.randperm(len(self.data), generator=generator))
        return self.runtime.rank_share(order[1][index * self.batch_size : (index + 1) * self.batch_size])

    def next(self) -> Tensor:
        """The next batch (advances :attr:`batches_drawn`)."""
        position = self.batches_drawn
        self.batches_drawn += 1
        if self.resident:
            pixels = self._images[self.runtime.to_device(self.indices(position))]
        elif self._prefetch is not None:
            pixels = self._host_batch(position).to(self.runtime.device, non_blocking=True)
            self._pending = (self.batches_drawn, self._prefetch.submit(self._gather, self.batches_drawn, True))
        else:
            pixels = self._gather(position, False)
        return self._to_float(pixels)

    def _host_batch(self, position: int) -> Tensor:
        if self._pending is not None and self._pending[0] == position:
            return self._pending[1].result()
        return self._gather(position, True)

    def _gather(self, position: int, pin: bool) -> Tensor:
        pixels = torch.from_numpy(np.asarray(self.data.images[self.indices(position).numpy()]))
        return pixels.pin_memory() if pin else pixels

    def _to_float(self, pixels: Tensor) -> Tensor:
        """uint8 (B, S, S, 3) -> (B, 3, S, S) in [0, 1]."""
        return pixels.permute(0, 3, 1, 2).to(self.dtype, memory_format=self.memory_format).div_(self._max_level)

    def state_dict(self) -> dict:
        return {"batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.batches_drawn = state["batches_drawn"]
        self._pending = None

    def close(self) -> None:
        if self._prefetch is not None:
            self._prefetch.shutdown(wait=True)


class RepeatedBatch:
    """A stream that returns the same batch at every draw: for benchmarks and tests that keep
    data out of the picture (``Trainer(config, stream=RepeatedBatch(real))``)."""

    def __init__(self, batch: Tensor) -> None:
        self.batch = batch
        self.batches_drawn = 0

    def next(self) -> Tensor:
        self.batches_drawn += 1
        return self.batch

    def state_dict(self) -> dict:
        return {"batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict) -> None:
        self.batches_drawn = state["batches_drawn"]

    def close(self) -> None:
        pass


def _on_device(images: np.ndarray, device: torch.device) -> Tensor:
    """The uint8 images as one tensor on ``device``. A read-only array (an ``np.memmap`` opened
    for reading) is fine here: the host tensor is only read, by the copy to the device, so
    torch's warning about non-writable arrays would only alarm."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(images)).to(device)


__all__ = ["BatchStream", "MAX_SEED", "RepeatedBatch", "RESIDENT_FRACTION"]
