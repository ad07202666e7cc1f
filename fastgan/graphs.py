"""Whole training steps replayed from CUDA graphs, for hand-written training loops.

On a GPU a GAN's discriminator step -- D on real and fake, a gradient penalty's double
backward, the optimizer -- is hundreds of small kernels, and eager PyTorch spends more host
time launching them than the GPU spends running them (an H100 machine took 12.4 ms to issue
an SNDCGAN WGAN-GP D step whose kernels ran for 7.4 ms). Replayed from a CUDA graph, the
whole step launches as one.

>>> def d_update(real, z):
...     d_optimizer.zero_grad()
...     with torch.no_grad():
...         fake = G(z)
...     loss = D(fake).mean() - D(real).mean() + 10 * gradient_penalty(D, real, fake)
...     loss.backward()
...     d_optimizer.step()
...     return loss.detach()
>>> d_step = fastgan.graphs.GraphedStep(d_update, optimizers=[d_optimizer])
>>> for real in loader:
...     loss = d_step(real.cuda(), torch.randn(64, 128, device="cuda"))

:class:`GraphedStep` runs the first call eagerly on a side stream (cuDNN, Triton and the
optimizer's state initialise there), captures the second, and from then on copies each
call's tensor arguments into the graph's input buffers and replays. What it returns is the
graph's own output: rewritten by the next call, so clone what you keep.

The rules of CUDA graphs (``torch.cuda.graph``'s documentation) hold inside ``fn``:

* every call passes tensors of the same shapes, dtypes and device, and the same non-tensor
  arguments (they are frozen into the graph); GraphedStep checks both;
* optimizers of GPU parameters that take a ``capturable`` option are built with
  ``capturable=True`` (checked when they are given; SGD, which has none, is captured as it is);
* random numbers come from torch's CUDA generator (``torch.rand(..., device="cuda")``),
  which draws anew at every replay. Host-side randomness is read once, at capture:
  :func:`fastgan.penalties.gradient_penalty` therefore draws its α (and DRAGAN's noise) on
  the device while being captured, unless given an explicit seed;
* nothing synchronises with the host (``.item()``, ``.cpu()``, ``print(tensor)``): CUDA
  refuses it during capture (GraphedStep then runs eagerly, saying so);
* an autocast context inside ``fn`` passes ``cache_enabled=False``, as torch advises for
  captures (an autocast around the call has its cache turned off while capturing);
* the graph keeps the tensors and numbers it read at capture: load checkpoints before the
  second call (or copy into the parameters and optimizer state in place), and a learning
  rate changed later reaches the replays only as a tensor changed in place (torch's Adam
  takes ``lr=torch.tensor(2e-4, device="cuda")`` with ``capturable=True``);
* gradients, too, live in the tensors of the capture: zero them inside ``fn``
  (``optimizer.zero_grad()`` there, as above, makes ``.grad`` graph memory). Outside ``fn``
  after the capture, ``zero_grad()`` would free them -- the replays then write freed memory
  and the optimizer sees no gradient -- so zero there with ``set_to_none=False`` only (an
  update that accumulates gradients over calls keeps the ``.grad`` tensors of its warm-up).
  GraphedStep does not check this yet.

Off the GPU (CPU tensors), inside another capture, under ``torch.compile``, or where CUDA
refuses the capture, GraphedStep runs ``fn`` eagerly and says once why.
:class:`~fastgan.train.step.CapturedStep` (the trainer's ``cuda_graphs: true``) and
:func:`~fastgan.nn.apply_spectral_norm`'s replayed refresh are built on the same pieces.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

from fastgan import _backend

__all__ = ["CapturedGraph", "GraphedStep", "capture_refusal", "is_capturing", "on_side_stream"]


def is_capturing(device: torch.device) -> bool:
    """Whether work on ``device`` is being recorded into a CUDA graph right now."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def capture_refusal(device: torch.device) -> Optional[str]:
    """Why work on ``device`` cannot be captured into a graph of its own here, or None when it can."""
    if device.type != "cuda":
        return f"CUDA graphs need a GPU; the tensors are on {device}"
    # Tracing first: dynamo cannot trace the capture query (a torch function returning a bool).
    if _backend.registered_ops_only():
        return "torch.compile or a functorch transform is tracing this call"
    if torch.cuda.is_current_stream_capturing():
        return "already inside a CUDA graph capture, which records this work itself"
    return None


def on_side_stream(fn: Callable[[], Any]) -> Any:
    """``fn()`` on a side stream, ordered after the current stream's work and before what
    follows it: torch.cuda.graph's warm-up recipe (lazy initialisations then happen outside
    the stream a later capture uses)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return out


def _autocast_cache_off(device: torch.device):
    """The caller's autocast with its weight-cast cache off: casts cached before a capture
    would be read by every replay, stale once the weights change."""
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.get_autocast_dtype(device.type), cache_enabled=False)


_CAPTURE_STREAMS: Dict[int, "torch.cuda.Stream"] = {}


def _capture_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream captures on ``device`` use, one per GPU. torch.cuda.graph's own default
    is one stream per process, made on whichever GPU was current at the first capture, and
    entering it switches to that GPU: a later capture for another GPU would record nothing
    (its kernels run uncaptured on their own GPU's stream) and replay nothing."""
    stream = _CAPTURE_STREAMS.get(device.index)
    if stream is None:
        stream = _CAPTURE_STREAMS[device.index] = torch.cuda.Stream(device)
    return stream


class CapturedGraph:
    """``record()``'s kernels captured once in a CUDA graph of their own (own memory pool);
    ``replay()`` reruns them and returns what ``record`` returned, rewritten in place.
    Captured and replayed on ``device``, whichever GPU is current. Thread-local capture:
    other threads (a DataLoader pinning memory) keep working meanwhile."""

    def __init__(self, record: Callable[[], Any], device: torch.device) -> None:
        self.device = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device), _autocast_cache_off(self.device), \
                torch.cuda.graph(self.graph, stream=_capture_stream(self.device), capture_error_mode="thread_local"):
            self.output = record()

    def replay(self) -> Any:
        if torch.cuda.current_device() == self.device.index:
            self.graph.replay()
        else:
            with torch.cuda.device(self.device):
                self.graph.replay()
        return self.output


def _describe(x: Any) -> str:
    return f"{tuple(x.shape)} {x.dtype} on {x.device}" if isinstance(x, Tensor) else repr(x)


class GraphedStep:
    """``fn(*args, **kwargs)`` -- one whole training update -- replayed from a CUDA graph from
    its second call on (see the module's documentation for the rules ``fn`` follows).

    ``optimizers``: those ``fn`` steps, checked to be built with ``capturable=True`` where
    their parameters are off the CPU and they take the option (torch would refuse them at
    capture, after the warm-up; on the CPU the update runs eagerly anyway) and, once captured,
    not to have loaded another state or had their parameters moved to new memory (a replay
    then raises). Tensor arguments may be nested in lists, tuples and dicts."""

    def __init__(self, fn: Callable[..., Any], *, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
        self.fn = fn
        self._optimizers = list(optimizers)
        for optimizer in self._optimizers:
            # CPU parameters run eagerly (no graph), where torch's capturable optimizers do not run at all
            on_cpu = all(p.device.type == "cpu" for group in optimizer.param_groups for p in group["params"])
            # Optimizers without the option (SGD: no step count) are captured as they are, as in torch's examples
            if not on_cpu and not all(group.get("capturable", True) for group in optimizer.param_groups):
                raise ValueError(
                    f"GraphedStep: {type(optimizer).__name__} must be built with capturable=True: a CUDA graph "
                    "replays its step only when the step count lives on the GPU")
        self.graph: Optional[CapturedGraph] = None
        self._calls = 0
        self._static: List[Any] = []
        self._spec = None
        self._optimizer_states: List[dict] = []  # the optimizers' state dicts the graph updates
        self._parameter_memory: List[Tuple[List[Tensor], List[int]]] = []  # their parameters' addresses at capture
        self._eager_because: Optional[str] = None  # set when a capture failed: eager from then on
        self._said_why = False

    @property
    def captured(self) -> bool:
        """Whether calls now replay a graph (which holds the optimizers' tensors: load their
        state before this turns true)."""
        return self.graph is not None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        if self.graph is not None:
            return self._replay(leaves, spec)
        device = _device_of(leaves)
        refusal = self._eager_because or capture_refusal(device)
        if refusal is not None:
            self._say_once(refusal)
            return self.fn(*args, **kwargs)
        if self._calls == 0:
            output = on_side_stream(lambda: self.fn(*args, **kwargs))
            # Counted once it returns: a warm-up that raised initialised nothing, and a capture
            # without one would record Adam's lazy state set-up, which every replay would rerun.
            self._calls = 1
            return output
        self._calls += 1
        # An input the caller marked requires_grad stays so (fn may differentiate with respect to it)
        static = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, Tensor) else x for x in leaves]
        static_args, static_kwargs = pytree.tree_unflatten(static, spec)
        try:
            graph = CapturedGraph(lambda: self.fn(*static_args, **static_kwargs), device)
        except RuntimeError as error:  # CUDA refused something fn does (nothing ran); it ran eagerly once before
            self._eager_because = f"the capture failed ({error})"
            self._say_once(self._eager_because)
            return self.fn(*args, **kwargs)
        self.graph, self._static, self._spec = graph, static, spec
        self._optimizer_states = [optimizer.state for optimizer in self._optimizers]
        parameters = [[p for group in optimizer.param_groups for p in group["params"]]
                      for optimizer in self._optimizers]
        self._parameter_memory = [(ps, list(map(Tensor.data_ptr, ps))) for ps in parameters]
        return self.graph.replay()

    def _say_once(self, why: str) -> None:
        if not self._said_why:
            self._said_why = True
            warnings.warn(f"GraphedStep: running eagerly: {why}", RuntimeWarning, stacklevel=3)

    def _replay(self, leaves: List[Any], spec) -> Any:
        for optimizer, state in zip(self._optimizers, self._optimizer_states):
            if optimizer.state is not state:  # load_state_dict puts new tensors in a new dict
                raise RuntimeError(f"GraphedStep: {type(optimizer).__name__}'s state was loaded after the capture, but "
                                   "the graph still updates the tensors it had then; load before the second call, or "
                                   "make a new GraphedStep")
        for optimizer, (parameters, addresses) in zip(self._optimizers, self._parameter_memory):
            now = list(map(Tensor.data_ptr, parameters))
            if now != addresses:  # the graph would update freed memory, not the model
                index = next(i for i, (a, b) in enumerate(zip(now, addresses)) if a != b)
                raise RuntimeError(
                    f"GraphedStep: {type(optimizer).__name__}'s parameter {index} ({_describe(parameters[index])}) "
                    "moved to new memory after the capture (model.to(dtype or memory_format), p.data = ...), but the "
                    "graph still reads and updates the memory it had then; convert the model before the second call, "
                    "copy into parameters in place, or make a new GraphedStep")
        if spec != self._spec:
            raise ValueError(f"GraphedStep: called with arguments structured as {spec}, but the graph was captured "
                             f"with {self._spec}; a graph replays one structure (make one GraphedStep per structure)")
        with torch.no_grad():  # an input buffer may require grad, as its argument did
            for index, (new, static) in enumerate(zip(leaves, self._static)):
                if isinstance(static, Tensor):
                    if not (isinstance(new, Tensor) and new.shape == static.shape and new.dtype == static.dtype
                            and new.device == static.device):
                        raise ValueError(f"GraphedStep: argument {index} is {_describe(new)}, but the graph was "
                                         f"captured with {_describe(static)} (a graph reads one shape, dtype and "
                                         "device per input)")
                    static.copy_(new, non_blocking=True)
                elif isinstance(new, Tensor) or (new is not static and new != static):
                    raise ValueError(f"GraphedStep: non-tensor argument {index} is {_describe(new)}, but the graph "
                                     f"was captured with {_describe(static)}, which it keeps (pass values that "
                                     "change as tensors)")
        return self.graph.replay()


def _device_of(leaves: List[Any]) -> torch.device:
    """The one device of the tensor arguments (the current GPU when there are none, or the CPU)."""
    devices = {x.device for x in leaves if isinstance(x, Tensor)}
    if len(devices) > 1:
        raise ValueError(f"GraphedStep: tensor arguments on several devices ({', '.join(sorted(map(str, devices)))}); "
                         "a graph reads its inputs from one GPU")
    if devices:
        return devices.pop()
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
