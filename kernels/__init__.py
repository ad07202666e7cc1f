"""Triton kernels, installed as ``fastgan.kernels``.

Every launcher takes tensors on any device triton can run on: CUDA, or the CPU
under ``TRITON_INTERPRET=1`` (set before triton is imported: ``import fastgan`` imports it), and launches
on the tensors' own device (:func:`device_guard`), whichever GPU is current.
"""
import contextlib

import torch
import triton  # noqa: F401  (fail at import when triton is missing, so backends() can say so)
import triton.language as tl


def _fix_interpreter_index():
    """Triton < 3.8's interpreter reads a runtime int argument (a 1-element array) as an index with
    ``int(array)``, which NumPy >= 2.4 refuses (TypeError: only 0-dimensional arrays can be converted
    to Python scalars): every ``range(0, n, BLOCK)`` over a runtime ``n`` failed under TRITON_INTERPRET=1.
    Triton 3.8 reads ``int(array.squeeze())``; do the same on older ones."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "_fastgan_index_fix", False):
        return

    def _patch_lang_tensor(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    _patch_lang_tensor._fastgan_index_fix = True
    interpreter._patch_lang_tensor = _patch_lang_tensor


if torch.torch_version.TorchVersion(triton.__version__) < (3, 8):
    _fix_interpreter_index()

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
