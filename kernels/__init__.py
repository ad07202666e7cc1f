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


def int_forms(low: int, high: int, specialize: bool = True):
    """The forms Triton gives an int argument whose values lie in [low, high] at a launch, as
    (signature type, constant or None, divisible by 16): each is a kernel of its own, so the
    Hopper compile check compiles them all. Triton types a value by its range (i32, else i64)
    and, unless the argument is in the kernel's ``do_not_specialize``, makes 1 a constant and
    marks a multiple of 16 divisible."""
    forms = []
    if specialize and low <= 1 <= high:
        forms.append(("constexpr", 1, False))
    for kind, lo, hi in (("i32", -2**31, 2**31 - 1), ("i64", 2**31, 2**63 - 1)):
        lo, hi = max(lo, low), min(hi, high)
        if lo > hi:
            continue
        if not specialize:
            forms.append((kind, None, False))
            continue
        if any(x % 16 and x != 1 for x in range(lo, min(hi, lo + 17) + 1)):
            forms.append((kind, None, False))
        if -(-lo // 16) * 16 <= hi:
            forms.append((kind, None, True))
    return forms
