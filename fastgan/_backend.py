"""Which kernel runs an op: the per-op backend registry.

Every fastgan op has up to four implementations:

* ``reference`` -- plain torch (``fastgan.reference``), any device; the test oracle.
* ``triton``    -- ``fastgan.kernels``; CUDA tensors, or CPU tensors when
  ``TRITON_INTERPRET=1`` was set before triton was imported (``import fastgan``
  imports it, through torch's compiler).
* ``cuda``      -- the CUDA C++ kernels of ``fastgan._C``; CUDA tensors.
* ``cpp``       -- the CPU C++ kernels of ``fastgan._C``; CPU tensors.

Each op declares, in ONE :func:`register` call next to its definition, which of
these it has and its own order of preference per device type (with the
measurement that justifies the order, where there is one). Per call, the first
backend of that order that can run here is used.

Overrides, in order of precedence: the :func:`use_backend` context manager, then
the ``FASTGAN_BACKEND`` environment variable (read at each call). A forced backend
that this op has no kernel for falls back to the op's own default (so
``FASTGAN_BACKEND=triton`` never breaks an op without a Triton kernel, on any
device); one it has that cannot run on the tensors' device raises.
:func:`backends` reports, per op and device, what runs and why.

Adding an op touches one place (its ``register`` call); adding a backend touches
two here (:data:`BACKENDS` and :func:`_status`) plus one entry in the table of each
op it implements.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import os
import sys
from typing import Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch

BACKENDS = ("triton", "cuda", "cpp", "reference")
DEVICE_TYPES = ("cpu", "cuda")

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("fastgan_backend", default=None)


_on_extension_load = []


# What the first attempt to load each optional part gave: "extension" -> (fastgan._C or None, why not),
# "triton" -> (importable, why not). A plain dict, not functools.lru_cache: torch.compile traces the
# backend choice, and dynamo warns of every lru_cache-wrapped call it meets.
_loaded: Dict[str, Tuple[object, str]] = {}


def _load_extension():
    """Import ``fastgan._C`` once; return (module or None, reason it is missing)."""
    if "extension" not in _loaded:
        try:
            module = importlib.import_module("fastgan._C")
        except ImportError as exc:
            _loaded["extension"] = (None, f"fastgan._C is not built or failed to load ({exc}); "
                                          "reinstall with `pip install --no-build-isolation -e .`")
        else:
            for register in _on_extension_load:
                register()
            _loaded["extension"] = (module, "")
    return _loaded["extension"]


def when_extension_loads(register: Callable[[], None]) -> None:
    """Run ``register`` (e.g. a fake-tensor registration for a ``fastgan_C`` op) once
    ``fastgan._C`` is loaded -- now, if it already is. The C++ ops exist only from then on."""
    _on_extension_load.append(register)
    if _loaded.get("extension", (None,))[0] is not None:
        register()


def _load_triton():
    """Import ``fastgan.kernels`` once; return (whether it imported, reason it did not)."""
    if "triton" not in _loaded:
        try:
            importlib.import_module("fastgan.kernels")
        except ImportError as exc:
            _loaded["triton"] = (False, f"triton is not importable ({exc})")
        else:
            _loaded["triton"] = (True, "")
    return _loaded["triton"]


def _interpret_requested() -> bool:
    # Read as Triton reads it (knobs.runtime.interpret): TRITON_INTERPRET=true makes its
    # kernels interpreted too, so triton must not be refused on CPU tensors then.
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


def _triton_compiled_before_interpret() -> bool:
    """Whether triton.language was imported while TRITON_INTERPRET was off: its own jitted
    helpers (tl.sum, tl.cdiv, ...) are then compiled functions, which an interpreted kernel
    cannot call ("Cannot call @triton.jit'd outside of the scope of a kernel")."""
    language = sys.modules.get("triton.language")
    if language is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return not isinstance(getattr(language.standard, "sum", None), InterpretedFunction)


def triton_interpreted() -> bool:
    """Whether Triton kernels run through its interpreter here (so on CPU tensors)."""
    return _interpret_requested() and not _triton_compiled_before_interpret()


def _status(name: str, device_type: str) -> Tuple[bool, str]:
    """Whether backend ``name`` can run on ``device_type`` at all, and if not, why."""
    if name == "reference":
        return True, ""
    if name == "triton":
        if device_type == "cpu" and not triton_interpreted():
            if _interpret_requested():
                return False, ("TRITON_INTERPRET=1 was set after triton was imported (import fastgan imports it); "
                               "set it before importing fastgan to run triton on CPU tensors")
            return False, "triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device_type not in DEVICE_TYPES:
            return False, f"triton kernels do not support device type {device_type!r}"
        return _load_triton()
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
    why = _why_cuda_kernels_cannot_run_here()
    return not why, why


_cannot_run_on_gpu: Dict[int, str] = {}


@torch.compiler.assume_constant_result  # asked while dynamo traces apply_spectral_norm's grouping: a constant
def _why_cuda_kernels_cannot_run_here() -> str:
    """Why the CUDA kernels cannot run on the current GPU ("" when they can). The build holds the
    architectures of TORCH_CUDA_ARCH_LIST only (Hopper's sm_90a when it was built without a
    visible GPU); elsewhere every launch failed with "no kernel image is available" instead of
    the op choosing another backend. Asked once per GPU."""
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    device = torch.cuda.current_device()
    if device not in _cannot_run_on_gpu:
        major, minor = torch.cuda.get_device_capability(device)
        _cannot_run_on_gpu[device] = "" if _load_extension()[0].cuda_kernels_run_on(device) else (
            f"fastgan._C has no CUDA code for this GPU (sm_{major}{minor}): rebuild it on this machine, or with "
            f"TORCH_CUDA_ARCH_LIST={major}.{minor} (see setup.py)")
    return _cannot_run_on_gpu[device]


@dataclasses.dataclass(frozen=True)
class Op:
    """One op's backend table: its implementations and its preference per device type."""

    name: str
    impls: Mapping[str, Callable]
    order: Mapping[str, Tuple[str, ...]]
    basis: str  # why this order: the measurement it rests on, or that there is none yet

    def choose(self, device_type: str) -> Tuple[str, str]:
        """(backend, why) for a call on ``device_type`` now; raises when a forced backend cannot run there."""
        return self._select(device_type, explain=True)

    def backend(self, device_type: str) -> str:
        """:meth:`choose`'s backend without its explanation: what every call of the op asks, so
        no message is formatted (2.2 µs a call with it, on the 2-core development machine)."""
        return self._select(device_type, explain=False)[0]

    def _select(self, device_type: str, explain: bool) -> Tuple[str, str]:
        forced = forced_backend()
        if forced is None:
            return self._default(device_type, explain)
        if forced not in self.impls:
            default, why_default = self._default(device_type, explain)
            return default, (f"forced {forced!r} ({_forced_source()}) has no {self.name} kernel; the op's default: "
                             f"{why_default}" if explain else "")
        ok, why = _status(forced, device_type)
        if not ok:
            raise RuntimeError(f"fastgan backend {forced!r} was requested but cannot run on {device_type}: {why}")
        return forced, f"forced ({_forced_source()})" if explain else ""

    def _default(self, device_type: str, explain: bool) -> Tuple[str, str]:
        skipped = []
        for name in self.order.get(device_type, ()):
            ok, why = _status(name, device_type)
            if ok:
                if not explain:
                    return name, ""
                prefix = f"{'; '.join(skipped)}; " if skipped else ""
                return name, f"{prefix}first usable of {', '.join(self.order[device_type])} ({self.basis})"
            skipped.append(f"{name} unusable: {why}")
        return "reference", f"no kernel backend for {device_type}; plain torch"

    def __call__(self, device: torch.device) -> Callable:
        """The implementation to run on ``device`` now."""
        return self.impls[self.backend(device.type)]


_REGISTRY: Dict[str, Op] = {}


def register(name: str, impls: Mapping[str, Callable], order: Mapping[str, Sequence[str]], basis: str) -> Op:
    """Declare op ``name``: ``impls`` (backend -> callable, ``reference`` required) and
    ``order`` (device type -> backends to try, best first), justified by ``basis``."""
    unknown = set(impls) - set(BACKENDS)
    if unknown or "reference" not in impls:
        raise ValueError(f"{name}: implementations must be among {BACKENDS} and include 'reference', got {sorted(impls)}")
    for device_type, names in order.items():
        missing = [n for n in names if n not in impls]
        if device_type not in DEVICE_TYPES or missing:
            raise ValueError(f"{name}: order for {device_type!r} names backends without an implementation: {missing}")
    op = Op(name, dict(impls), {d: tuple(n) for d, n in order.items()}, basis)
    _REGISTRY[name] = op
    return op


def registered() -> Dict[str, Op]:
    return dict(_REGISTRY)


def backends() -> Dict[str, Dict]:
    """What is built and usable here, and what each op runs on each device, with reasons.

    ``report["backends"][name][device]`` says whether a backend can run on a device
    (``report["backends"][name]["why_not"]`` why not); ``report["ops"][op][device]``, for
    each device visible here, is ``{"runs": backend, "why": ...}`` under the current
    overrides, or ``{"error": ...}`` when a forced backend cannot run there;
    ``report["forced"]`` is the forced backend or None.
    """
    importlib.import_module("fastgan.ops")  # registers every op
    visible = {"cpu": True, "cuda": torch.cuda.is_available()}
    report: Dict[str, Dict] = {"backends": {}, "ops": {}, "forced": forced_backend()}
    for name in BACKENDS:
        entry: Dict[str, object] = {}
        reasons = {}
        for dev in DEVICE_TYPES:
            ok, why = _status(name, dev)
            if ok and not visible[dev]:
                ok, why = False, "no CUDA device visible to torch"
            entry[dev] = ok
            if not ok:
                reasons[dev] = why
        entry["why_not"] = reasons
        report["backends"][name] = entry
    for op_name, op in sorted(_REGISTRY.items()):
        per_device = {}
        for dev in (d for d in DEVICE_TYPES if visible[d]):
            try:
                runs, why = op.choose(dev)
                per_device[dev] = {"runs": runs, "why": why}
            except RuntimeError as exc:
                per_device[dev] = {"error": str(exc)}
        report["ops"][op_name] = per_device
    return report


def _validate_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"a fastgan backend is named by a string, one of {', '.join(BACKENDS)}; got {name!r}")
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown fastgan backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force every fastgan op in this context onto backend ``name`` where the op has it
    (others keep their default). Takes precedence over FASTGAN_BACKEND. ``None`` lifts
    the overrides of enclosing ``use_backend`` contexts: FASTGAN_BACKEND, if set, applies
    again, else each op's own choice. The override is the calling thread's (a ContextVar, so
    one thread's choice never switches another's kernels mid-step): threads started inside,
    nn.DataParallel's replicas among them, keep FASTGAN_BACKEND or the defaults."""
    token = _forced.set(None if name is None else _validate_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


@torch.compiler.assume_constant_result
def _forced_while_tracing() -> Optional[str]:
    """``use_backend``'s override, read by dynamo as a constant at trace time: dynamo before
    torch 2.14 cannot trace ``ContextVar.get`` (torch 2.11: ``Unsupported: Dynamo does not know
    how to trace method `get` of class `ContextVar```), which failed torch.compile(fullgraph=True)
    of an ``apply_spectral_norm`` model. 2.14 traces it, with a guard that recompiles on a change."""
    return _forced.get()


_DYNAMO_TRACES_CONTEXTVARS = torch.torch_version.TorchVersion(torch.__version__) >= (2, 14)


def forced_backend() -> Optional[str]:
    if _DYNAMO_TRACES_CONTEXTVARS or not torch.compiler.is_compiling():
        name = _forced.get()
    else:
        name = _forced_while_tracing()
    if name is None:
        env = os.environ.get("FASTGAN_BACKEND", "").strip()
        name = _validate_name(env) if env else None
    return name


def _forced_source() -> str:
    return "use_backend" if _forced.get() is not None else "FASTGAN_BACKEND"


def memory_order(tensor: torch.Tensor) -> Optional[Tuple[int, ...]]:
    """The permutation P with ``tensor.permute(P)`` contiguous -- the order of its dims in
    memory, outermost first -- or None when the tensor is not dense (overlapping or gapped,
    e.g. a slice). Channels-last tensors are dense; kernels read them in place through it."""
    order = tuple(sorted(range(tensor.dim()), key=lambda i: (-tensor.stride(i), i)))
    return order if tensor.permute(order).is_contiguous() else None


def triton_kernel(module: str, name: str) -> Callable:
    """The launcher ``fastgan.kernels.<module>.<name>``, imported at its first call
    (importing triton is slow, and TRITON_INTERPRET must be set before it)."""

    def launch(*args):
        return getattr(importlib.import_module(f"fastgan.kernels.{module}"), name)(*args)

    return launch


def extension_op(name: str) -> Callable:
    """``torch.ops.fastgan_C.<name>``, looked up at call time (after the backend check loaded the library)."""

    def call(*args):
        return getattr(torch.ops.fastgan_C, name)(*args)

    return call


def extension():
    """The loaded ``fastgan._C`` module (raises when it is not built)."""
    module, why = _load_extension()
    if module is None:
        raise RuntimeError(why)
    return module


# Eager entry points. A Python ``torch.library`` custom op costs ~100 us of dispatch and
# autograd wrapping per call on a 2-core CPU (fastgan::gp_interpolate: 121 us through the
# op, 17 us calling its kernel), which in a host-bound training step is time the GPU idles.
# So the modules and penalties call the same computation without the op's dispatch,
# except where only the registered ops will do.


def registered_ops_only() -> bool:
    """torch.compile traces the registered ops (the compiled graph does not pay their
    dispatch), and functorch transforms (jvp, vmap, grad: fastgan.diagnostics uses them)
    cannot run the C++ autograd functions of the fastgan_C ops."""
    return torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is not None


def eager_twin(op: Callable, eager: Callable) -> Callable:
    """``op`` (a registered op) where only it will do, else ``eager``, the same computation
    (with the same autograd, where it has one) without the op's dispatch."""

    def call(*args):
        return op(*args) if registered_ops_only() else eager(*args)

    return call


def autograd_twin(forward: Callable, setup_context: Callable, backward: Callable) -> Callable:
    """``forward`` with the autograd of a custom op (its ``setup_context`` and ``backward``,
    unchanged, double backward included) as a plain ``torch.autograd.Function``: the eager
    half of :func:`eager_twin` for a differentiable op. Old-style (``forward(ctx, ...)``):
    a Function with its own ``setup_context`` binds every call's arguments to the forward's
    signature first, which made it slower than the custom op itself (49 vs 42 us a call
    for gp_penalty on the 2-core CPU; this form 19 us)."""

    def forward_with_context(ctx, *args):
        output = forward(*args)
        setup_context(ctx, args, output)
        return output

    function = type(
        f"{forward.__name__}_function",
        (torch.autograd.Function,),
        {"forward": staticmethod(forward_with_context), "backward": staticmethod(backward)},
    )

    def call(*args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return function.apply(*args)
        return forward(*args)  # nothing to differentiate: the Function's bookkeeping would be pure cost

    return call
