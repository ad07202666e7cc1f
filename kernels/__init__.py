"""Triton kernels, installed as ``fastgan.kernels``.

Every launcher takes tensors on any device triton can run on: CUDA, or the CPU
under ``TRITON_INTERPRET=1`` (set before this package is imported), and launches
on the tensors' own device (:func:`device_guard`), whichever GPU is current.
"""
import contextlib

import torch
import triton  # noqa: F401  (fail at import when triton is missing, so backends() can say so)
import triton.language as tl

_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


def device_guard(tensor: torch.Tensor):
    """Make ``tensor``'s GPU current for the launches inside (triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def triton_dtype(dtype: torch.dtype):
    """Triton's dtype for a floating-point torch dtype (its ``.name``, e.g. ``fp32``, types signatures)."""
    return _TRITON_DTYPES[dtype]
