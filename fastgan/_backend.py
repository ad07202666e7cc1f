"""Which kernel runs an op: the one place backends are chosen.

Every fastgan op has up to four implementations:

* ``reference`` -- plain torch (``fastgan.reference``), any device; the test oracle.
* ``triton``    -- ``fastgan.kernels``; CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before ``fastgan.kernels`` was imported.
* ``cuda``      -- the CUDA C++ kernels of ``fastgan._C``; CUDA tensors.
* ``cpp``       -- the CPU C++ kernels of ``fastgan._C``; CPU tensors.

The choice is made per call from the tensors' device: CUDA prefers triton, then
cuda, then reference; CPU prefers cpp, then reference. It is overridden, in order
of precedence, by the :func:`use_backend` context manager and by the
``FASTGAN_BACKEND`` environment variable (read at each call). A forced backend
that cannot run on the tensors' device raises instead of silently falling back.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
from typing import Callable, Dict, Iterator, Optional

import torch

BACKENDS = ("triton", "cuda", "cpp", "reference")
_DEFAULT_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastgan_backend", default=None)


@functools.lru_cache(maxsize=None)
def _load_extension():
    """Import ``fastgan._C`` once; return (module or None, reason it is missing)."""
    try:
        module = importlib.import_module("fastgan._C")
    except ImportError as exc:
        return None, f"fastgan._C is not built or failed to load ({exc}); reinstall with `pip install --no-build-isolation -e .`"
    return module, ""


@functools.lru_cache(maxsize=None)
def _load_triton():
    try:
        importlib.import_module("fastgan.kernels")
    except ImportError as exc:
        return False, f"triton is not importable ({exc})"
    return True, ""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _status(name: str, device_type: str) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device_type``, and if not, why."""
    if name == "reference":
        return True, ""
    if name == "triton":
        ok, why = _load_triton()
        if not ok:
            return False, why
        if device_type == "cpu" and not triton_interpreted():
            return False, "triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in ("cpu", "cuda"):
            return False, f"triton kernels do not support device type {device_type!r}"
        return True, ""
    module, why = _load_extension()
    if module is None:
        return False, why
    if name == "cpp":
        if device_type != "cpu":
            return False, "the cpp backend runs on CPU tensors; use 'cuda' or 'triton' on a GPU"
        return True, ""
    if not module.built_with_cuda():
        return False, "fastgan._C was built without CUDA (no nvcc/CUDA_HOME or a CPU-only torch at build time)"
    if device_type != "cuda":
        return False, "the cuda backend runs on CUDA tensors only"
    return True, ""


def backends() -> Dict[str, Dict[str, object]]:
    """What is built and usable here, per backend and device, with reasons.

    >>> fastgan.backends()["cpp"]
    {'cpu': True, 'cuda': False, 'why_not': {'cuda': 'the cpp backend runs on CPU tensors; ...'}}
    """
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    report = {}
    for name in BACKENDS:
        entry: Dict[str, object] = {}
        reasons = {}
        for dev in ("cpu", "cuda"):
            ok, why = _status(name, dev)
            if dev not in devices and ok:
                ok, why = False, "no CUDA device visible to torch"
            entry[dev] = ok
            if not ok:
                reasons[dev] = why
        entry["why_not"] = reasons
        report[name] = entry
    return report


def _validate_name(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown fastgan backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force every fastgan op in this context onto backend ``name``
    (``None`` restores automatic choice). Takes precedence over FASTGAN_BACKEND."""
    token = _forced.set(None if name is None else _validate_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> Optional[str]:
    name = _forced.get()
    if name is None:
        env = os.environ.get("FASTGAN_BACKEND", "").strip()
        name = _validate_name(env) if env else None
    return name


def select(device: torch.device, implemented=BACKENDS) -> str:
    """The backend that runs an op with kernels for ``implemented`` on ``device`` now."""
    device_type = device.type
    forced = forced_backend()
    if forced is not None:
        ok, why = _status(forced, device_type)
        if not ok:
            raise RuntimeError(f"fastgan backend {forced!r} was requested but cannot run on {device_type}: {why}")
        if forced not in implemented:
            raise RuntimeError(f"fastgan backend {forced!r} was requested but this op only has {', '.join(implemented)}")
        return forced
    for name in _DEFAULT_ORDER.get(device_type, ()):
        if name in implemented and _status(name, device_type)[0]:
            return name
    return "reference"


def dispatch(impls: Dict[str, Callable], device: torch.device) -> Callable:
    """The implementation of one op (``impls``: backend name -> callable) to run on ``device``."""
    return impls[select(device, tuple(impls))]


def triton_kernel(module: str, name: str) -> Callable:
    """The launcher ``fastgan.kernels.<module>.<name>``, imported at its first call
    (importing triton is slow, and TRITON_INTERPRET must be set before it)."""

    def launch(*args):
        return getattr(importlib.import_module(f"fastgan.kernels.{module}"), name)(*args)

    return launch


def extension_op(name: str) -> Callable:
    """``torch.ops.fastgan_C.<name>``, looked up at call time (after :func:`select` loaded the library)."""

    def call(*args):
        return getattr(torch.ops.fastgan_C, name)(*args)

    return call


def extension():
    """The loaded ``fastgan._C`` module (raises when it is not built)."""
    module, why = _load_extension()
    if module is None:
        raise RuntimeError(why)
    return module
