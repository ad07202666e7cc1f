"""Spectral normalization modules: drop-ins for torch's two forms, on fastgan's fused ops.

* :func:`spectral_norm` replaces ``torch.nn.utils.parametrizations.spectral_norm``
  (u-first iteration, 15 warm-up iterations, state_dict keys
  ``parametrizations.<name>.original`` / ``.0._u`` / ``.0._v``).
* :func:`hook_spectral_norm` (exported as ``fastgan.nn.utils.spectral_norm``) replaces
  the older ``torch.nn.utils.spectral_norm`` (v-first, no warm-up, ``<name>_orig`` /
  ``<name>_u`` / ``<name>_v``); it subclasses torch's hook, so torch's
  ``remove_spectral_norm`` and state-dict version handling apply unchanged.
* :func:`apply_spectral_norm` puts :func:`spectral_norm` on every Conv/ConvTranspose/Linear
  of a model and runs all their power iterations for one model forward as one
  multi-tensor launch.

Both forms share :func:`normalized_weight`: one power-iteration op, an in-place
buffer update, and W / σ with the gradient through W only.

Complex weights work in the parametrization form as in torch's (u = W v / ‖W v‖,
v = Wᴴ u / ‖Wᴴ u‖, σ = uᴴ W v), in plain torch: the fused ops are real-only. The hook
form rejects them: torch's hook form transposes without conjugating, which does not
give the spectral norm of a complex matrix.
"""
from __future__ import annotations

import importlib
import operator
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
torch_hook_sn = importlib.import_module("torch.nn.utils.spectral_norm")  # the module; the package attribute is the function

from fastgan import graphs
from fastgan.ops import spectral_norm as ops
from fastgan.reference.spectral_norm import weight_matrix

_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_WARMUP_ITERATIONS = 15


def default_dim(module: nn.Module) -> int:
    return 1 if isinstance(module, _TRANSPOSED) else 0


def normalized_weight(
    weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float, u_first: bool
) -> Tensor:
    """W / σ after ``n_power_iterations`` steps (0 in eval mode), updating the u, v buffers in place.

    The returned weight saves fresh copies of u and v, so a later forward that
    updates the buffers again does not invalidate this one's backward."""
    if weight.is_complex():
        return _complex_normalized_weight(weight, u, v, dim, n_power_iterations, eps)
    return ops.normalized_weight(weight, u, v, dim, n_power_iterations, eps, u_first)


def _complex_normalized_weight(weight: Tensor, u: Tensor, v: Tensor, dim: int, n_power_iterations: int, eps: float) -> Tensor:
    """:func:`normalized_weight` for a complex weight, as torch's parametrization computes
    it (u first, conjugate transposes, σ = uᴴ W v, complex in general). Plain torch: the
    fused ops and kernels take real weights only; σ is differentiated through W by autograd."""
    with torch.no_grad():
        w = weight_matrix(weight.detach(), dim)
        u_new, v_new = u.clone(), v.clone()
        for _ in range(n_power_iterations):
            u_new = F.normalize(torch.mv(w, v_new), dim=0, eps=eps)
            v_new = F.normalize(torch.mv(w.mH, u_new), dim=0, eps=eps)
        if n_power_iterations > 0:
            u.copy_(u_new)
            v.copy_(v_new)
    sigma = torch.vdot(u_new, torch.mv(weight_matrix(weight, dim), v_new))
    return weight / sigma


def _describe(module: nn.Module, name: str) -> str:
    return f"{type(module).__name__}.{name}"


def _random_unit_vectors(weight: Tensor, dim: int, eps: float):
    """u, v drawn like torch draws them (normal, then normalized; same RNG order)."""
    rows = weight.shape[dim]
    cols = weight.numel() // rows
    u = F.normalize(weight.new_empty(rows).normal_(0, 1), dim=0, eps=eps)
    v = F.normalize(weight.new_empty(cols).normal_(0, 1), dim=0, eps=eps)
    return u, v


def _checked_weight(module: nn.Module, name: str, n_power_iterations: int, dim: int, where: str,
                    hook_form: bool = False) -> Tuple[Tensor, int, int]:
    """The module's weight and the settings as Python ints (:func:`_checked_settings`)."""
    # Where torch's own spectral norm raises a message of its own, the same type and wording
    # (code matches on them), then the layer.
    weight = getattr(module, name, None)
    if not isinstance(weight, Tensor):
        if hook_form and name in module._parameters:  # a slot holding None, e.g. Linear(bias=False).bias
            raise ValueError(f"`SpectralNorm` cannot be applied as parameter `{name}` is None ({where})")
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}' ({where})")
    if isinstance(weight, nn.parameter.UninitializedParameter):
        raise ValueError("The module passed to `SpectralNorm` can't have uninitialized parameters. Make sure to "
                         f"run the dummy forward before applying spectral normalization ({where})")
    return (weight, *_checked_settings(weight, n_power_iterations, dim, where))


def _integer(value, name: str, where: str) -> int:
    """``value`` as a Python int (the ops' schemas take nothing else): ints and integer scalars
    such as NumPy's, as torch's spectral norm takes them; not bools."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{name} must be an int, got {value!r} ({where})")


def _checked_settings(weight: Tensor, n_power_iterations: int, dim: int, where: str) -> Tuple[int, int]:
    """(n_power_iterations, dim) as Python ints, once checked against the weight."""
    n_power_iterations, dim = _integer(n_power_iterations, "n_power_iterations", where), _integer(dim, "dim", where)
    if n_power_iterations <= 0:
        raise ValueError(f"Expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations} "
                         f"({where})")
    ndim = weight.dim()
    if ndim and not -ndim <= dim < ndim:
        raise IndexError(f"Dimension out of range (expected to be in range of [-{ndim}, {ndim - 1}] but got {dim}) "
                         f"({where})")
    # The shape checks apply to complex weights too; a complex weight's real view has its shape.
    ops.check_weight(weight.real if weight.is_complex() else weight, dim, where)
    return n_power_iterations, dim


class SpectralNorm(nn.Module):
    """The parametrization behind :func:`spectral_norm` (buffers ``_u``, ``_v`` like torch's)."""

    def __init__(self, weight: Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12,
                 cuda_graphs: bool = True) -> None:
        super().__init__()
        # made directly, as torch's checks it too
        n_power_iterations, dim = _checked_settings(weight, n_power_iterations, dim, "SpectralNorm")
        self.dim = dim % weight.dim()
        self.eps = eps
        self.n_power_iterations = n_power_iterations
        # This layer's own refresh replayed from a CUDA graph on a GPU (_RefreshReplays), when no
        # apply_spectral_norm hook refreshed it already.
        self._replays = _RefreshReplays(cuda_graphs)
        u, v = _random_unit_vectors(weight.detach(), self.dim, eps)
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)
        normalized_weight(weight.detach(), self._u, self._v, self.dim, _WARMUP_ITERATIONS, eps, True)
        self._group_result: Optional[tuple] = None
        # (u, v) of apply_spectral_norm's refresh that this layer used, written to its buffers
        # at the end of the model's forward (or at its next use, if sooner)
        self._pending_buffers: Optional[Tuple[Tensor, Tensor]] = None

    def take_group_result(self) -> Optional[Tuple[Tensor, Tensor, Tensor]]:
        """This forward's (u, v, σ) from :func:`apply_spectral_norm`'s refresh, or None (no
        hook, or taken already): handed out once, and in training its u, v are then written to
        the buffers when the model's forward returns (or at this layer's next use)."""
        result = self._group_result
        if result is not None:
            _set_group_result(self, None)
            if self.training:
                object.__setattr__(self, "_pending_buffers", result[:2])
        return result

    def forward(self, weight: Tensor) -> Tensor:
        result = self.take_group_result()
        if result is not None:
            u, v, sigma = result
            return ops.normalize(weight, u, v, sigma, self.dim)
        if self._pending_buffers is not None:  # a second use in one forward iterates on from the first's u, v
            write_pending_buffers([self])
        steps = self.n_power_iterations if self.training else 0
        # nn.DataParallel's replicas share this layer's _replays (a shallow copy) from threads of their own
        replica = self.__dict__.get("_is_replica", False)
        capture = _capture_for(weight.device) if self._replays.enabled and not replica and not weight.is_complex() else None
        if capture is not None:
            backend = ops.multi_layer_backend(weight.device)
            ((u, v, sigma),) = self._replays.refresh(self.training, [self], [weight], steps, backend, capture)
            return ops.normalize(weight, u, v, sigma, self.dim)
        return normalized_weight(weight, self._u, self._v, self.dim, steps, self.eps, True)

    def right_inverse(self, value: Tensor) -> Tensor:
        """``module.weight = t`` stores ``t`` as the original weight (as torch's does);
        reading ``module.weight`` then gives t / σ(t). A value whose matrix does not fit
        u and v is refused here, where torch fails at the next forward."""
        rows, cols = self._u.numel(), self._v.numel()
        if value.dim() < 2 or value.shape[self.dim] != rows or value.numel() != rows * cols:
            raise ValueError(
                f"cannot assign a weight of shape {tuple(value.shape)} to a spectral-normalized weight whose "
                f"matrix (dim={self.dim}) is {rows}x{cols}; remove the parametrization to change the shape"
            )
        return value

    def extra_repr(self) -> str:
        return f"n_power_iterations={self.n_power_iterations}, dim={self.dim}, eps={self.eps}"


def spectral_norm(
    module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12, dim: Optional[int] = None,
    *, cuda_graphs: bool = True,
) -> nn.Module:
    """Drop-in for ``torch.nn.utils.parametrizations.spectral_norm`` on fastgan's kernels. On a
    GPU the layer's power iteration is replayed from a private CUDA graph once the same weight
    and buffers come a second time in a row (the same numbers, bit for bit; ``cuda_graphs=False``
    keeps it eager), as :func:`apply_spectral_norm` does for a whole model."""
    if dim is None:
        dim = default_dim(module)
    weight, n_power_iterations, dim = _checked_weight(module, name, n_power_iterations, dim, _describe(module, name))
    parametrize.register_parametrization(module, name, SpectralNorm(weight, n_power_iterations, dim, eps, cuda_graphs))
    return module


class HookSpectralNorm(torch_hook_sn.SpectralNorm):
    """torch's hook form with its power iteration and σ computed by fastgan's ops."""

    def compute_weight(self, module: nn.Module, do_power_iteration: bool) -> Tensor:
        weight = getattr(module, self.name + "_orig")
        u = getattr(module, self.name + "_u")
        v = getattr(module, self.name + "_v")
        steps = self.n_power_iterations if do_power_iteration else 0
        return normalized_weight(weight, u, v, self.dim, steps, self.eps, False)

    @staticmethod
    def apply(module: nn.Module, name: str, n_power_iterations: int, dim: int, eps: float) -> "HookSpectralNorm":
        where = _describe(module, name)
        if any(isinstance(h, torch_hook_sn.SpectralNorm) and h.name == name for h in module._forward_pre_hooks.values()):
            # torch's wording first: code and tests match on it.
            raise RuntimeError(
                f"Cannot register two spectral_norm hooks on the same parameter {name} "
                f"({where} already has one; remove it first with fastgan.nn.utils.remove_spectral_norm)"
            )
        weight, n_power_iterations, dim = _checked_weight(module, name, n_power_iterations, dim, where, hook_form=True)
        if weight.is_complex():
            raise TypeError(
                f"{where}: the hook form of spectral norm does not take complex weights (torch's transposes "
                f"without conjugating, which is not the spectral norm); use fastgan.nn.spectral_norm, the "
                f"parametrization form, which supports them"
            )
        fn = HookSpectralNorm(name, n_power_iterations, dim, eps)
        with torch.no_grad():
            u, v = _random_unit_vectors(weight, fn.dim, eps)
        del module._parameters[name]
        module.register_parameter(name + "_orig", weight)
        setattr(module, name, weight.data)
        module.register_buffer(name + "_u", u)
        module.register_buffer(name + "_v", v)
        module.register_forward_pre_hook(fn)
        module._register_state_dict_hook(torch_hook_sn.SpectralNormStateDictHook(fn))
        module._register_load_state_dict_pre_hook(torch_hook_sn.SpectralNormLoadStateDictPreHook(fn))
        return fn


def hook_spectral_norm(
    module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12, dim: Optional[int] = None
) -> nn.Module:
    """Drop-in for ``torch.nn.utils.spectral_norm`` (the forward-pre-hook form) on fastgan's kernels."""
    if dim is None:
        dim = default_dim(module)
    HookSpectralNorm.apply(module, name, n_power_iterations, dim, eps)
    return module


_SN_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d) + _TRANSPOSED


class _GroupedPowerIteration:
    """Forward pre-hook of a model under :func:`apply_spectral_norm`: one multi-tensor
    power-iteration launch for all its SN layers, whose results each layer consumes
    on its first weight access in that forward. A layer accessed again (weight
    sharing) or outside the model's forward iterates on its own, as torch's would.
    Where one launch does not pay (:func:`fastgan.ops.spectral_norm.one_launch_pays`:
    the CPU C++ backend) the hook leaves every layer to its own one-call forward.
    Layers iterate in groups of one training mode, dtype and device.

    The refresh does not write the u, v buffers: a layer that uses its result keeps it,
    and the model's forward hook (:meth:`clear`) writes the used layers' buffers in one
    multi-tensor copy, so a layer the forward skips keeps its buffers, as under torch's.

    On a GPU the launch is replayed from a private CUDA graph (:class:`_ReplayedRefresh`)
    once the same layers, weights and buffers come a second time in a row: eager, the
    host's work around the kernels took ~5x their time (an H100: 271-313 µs a refresh of
    SNDCGAN's D, 58 µs replayed; the hook's refresh with the replay then measured 119 and 48 µs
    in two runs). New weight or buffer storage (``.to()``, ``.data =``)
    goes back to the eager launch; a model whose storage keeps changing stops capturing
    after :data:`_MAX_CAPTURES` captures."""

    def __init__(self, layers: Sequence[nn.Module], cuda_graphs: bool = True) -> None:
        # The parametrizations are fixed from here on; reaching them through each module
        # (module.parametrizations.weight[0]) is ~10 Python calls per layer per forward.
        lists = [m.parametrizations.weight for m in layers]
        self.params: List[SpectralNorm] = [plist[0] for plist in lists]
        # where each unnormalized weight lives: the list's parameters (or its buffers, for a
        # weight that was not a Parameter); the dicts stay when .to() replaces what is in them
        self.originals = [plist._parameters if "original" in plist._parameters else plist._buffers
                          for plist in lists]
        # parametrize.remove_parametrizations detaches a layer's list: from then on its u, v are
        # no longer the model's (.float() leaves them as they were), so the refresh skips it
        self.lists = list(zip(layers, lists))
        # per group: (training, dtype, device)
        self.refreshes = _RefreshReplays(cuda_graphs, writes_buffers=False)

    def __call__(self, model: nn.Module, inputs) -> None:
        if model.__dict__.get("_is_replica", False):
            # nn.DataParallel's replicas share this hook but hold layers of their own, which
            # iterate on their own (as torch's do there); the hook's layers are the originals.
            return
        # Complex layers refresh on their own (the multi-tensor op is real-only). Parameters and
        # buffers straight from their dicts: nn.Module's __getattr__ costs ~0.7 us a lookup, and
        # this runs for every layer on every forward.
        groups: dict = {}
        for p, original, (layer, plist) in zip(self.params, self.originals, self.lists):
            attached = layer._modules.get("parametrizations")
            if attached is None or attached._modules.get("weight") is not plist:
                continue
            weight = original["original"]
            if not weight.is_complex():
                # a group is one launch: layers that differ in their settings go to different ones
                key = (p.training, weight.dtype, weight.device, p.n_power_iterations, p.eps)
                params, weights = groups.setdefault(key, ([], []))
                params.append(p)
                weights.append(weight)
        for group, (params, weights) in groups.items():
            training, _, device, n_power_iterations, _ = group
            backend = ops.multi_layer_backend(device)
            if not ops.one_launch_pays_on(backend):
                continue
            capture = _capture_for(device) if self.refreshes.enabled else None
            steps = n_power_iterations if training else 0
            for p, result in zip(params, self.refreshes.refresh(group, params, weights, steps, backend, capture)):
                _set_group_result(p, result)

    def clear(self, model: nn.Module, inputs, output=None) -> None:
        if model.__dict__.get("_is_replica", False):
            return
        used = []
        for p in self.params:
            if p._group_result is not None:  # a layer the forward did not use (each use clears its own)
                _set_group_result(p, None)
            elif p._pending_buffers is not None:
                used.append(p)
        if used:
            write_pending_buffers(used)


# A hook recaptures when its layers' storage changes; past this many captures it stays eager.
_MAX_CAPTURES = 8


class _RefreshReplays:
    """Refreshes of groups of layers (:func:`iterate_together`), replayed from private CUDA
    graphs: a group's first call with a key (:func:`_replay_key`) runs eagerly (it also builds
    the kernels' layer table), the next with the same key is captured (:class:`_ReplayedRefresh`)
    and replayed, and so on while the key repeats. New weight or buffer storage (``.to()``,
    ``.data =``) goes back to the eager launch; past :data:`_MAX_CAPTURES` captures, or when
    CUDA refuses one (said once, in a warning), the refresh stays eager. Used by
    :func:`apply_spectral_norm`'s hook (a group per training mode) and by each
    :class:`SpectralNorm` layer refreshing on its own (a group of one)."""

    def __init__(self, enabled: bool, writes_buffers: bool = True) -> None:
        self.enabled = enabled
        self.writes_buffers = writes_buffers
        self._forget()

    def _forget(self) -> None:
        self.replays: Dict[object, _ReplayedRefresh] = {}
        self.last_keys: Dict[object, tuple] = {}
        self.captures = 0

    def __getstate__(self) -> dict:
        # A copy (copy.deepcopy, pickle) starts eager: graphs cannot be copied, and a copy's storage is new.
        return {"enabled": self.enabled, "writes_buffers": self.writes_buffers}

    def __setstate__(self, state: dict) -> None:
        self.enabled = state["enabled"]
        self.writes_buffers = state.get("writes_buffers", True)
        self._forget()

    def refresh(self, group: object, params: List["SpectralNorm"], weights: List[Tensor], steps: int, backend: str,
                capture) -> List[Tuple[Tensor, Tensor, Tensor]]:
        """Each layer's (u, v, σ) after ``steps`` iterations, their buffers updated if
        ``writes_buffers``; replayed where ``capture`` (:func:`_capture_for`) can capture, else eager."""
        if capture is None or self.captures >= _MAX_CAPTURES:
            return iterate_together(params, weights, steps, self.writes_buffers)
        key = _replay_key(params, weights, steps, backend)
        replay = self.replays.get(group)
        if replay is not None and replay.key == key:
            return list(replay(params))
        self.replays.pop(group, None)
        if self.last_keys.get(group) != key:  # a first call: eager (it also builds the kernels' layer table)
            self.last_keys[group] = key
            return iterate_together(params, weights, steps, self.writes_buffers)
        self.captures += 1
        try:
            replay = _ReplayedRefresh(key, params, weights, steps, self.writes_buffers, capture)
        except RuntimeError as error:  # a capture CUDA refused (nothing ran): eager from now on, said once
            self.captures = _MAX_CAPTURES
            warnings.warn(f"spectral norm: the power-iteration refresh could not be captured in a CUDA graph "
                          f"({error}); it stays eager", RuntimeWarning, stacklevel=3)
            return iterate_together(params, weights, steps, self.writes_buffers)
        self.replays[group] = replay
        return list(replay(params))


def _replay_key(params: Sequence["SpectralNorm"], weights: Sequence[Tensor], steps: int, backend: str) -> tuple:
    """What a captured refresh is bound to: the layers, the addresses it reads and writes,
    the schedule and the backend whose kernels it recorded. One flat tuple, built with
    comprehensions: it is formed before every forward (2.6 µs for SNDCGAN's D against 6 µs
    as a tuple per layer, on the 2-core development machine)."""
    buffers = [p._buffers for p in params]
    return (backend, steps, weights[0].dtype, *map(id, params), *map(Tensor.data_ptr, weights),
            *[b["_u"].data_ptr() for b in buffers], *[b["_v"].data_ptr() for b in buffers])


def _capture_for(device: torch.device) -> Optional[Callable[[Callable[[], Tensor], torch.device], graphs.CapturedGraph]]:
    """How to capture a refresh on ``device``, or None where it is run eagerly: off the GPU,
    inside another capture (the trainer's graphs record the launch itself), under
    torch.compile and functorch transforms (they trace the registered ops)."""
    return None if graphs.capture_refusal(device) else graphs.CapturedGraph


class _ReplayedRefresh:
    """One group's :func:`iterate_together` (the multi-layer op and the u, v buffer update)
    captured once and replayed. The replay rewrites the graph's own outputs, so each call
    hands out a copy: a layer's W / σ keeps its u, v, σ for its backward, and two forwards
    before one backward (D on real, then fake) must not share them."""

    def __init__(self, key: tuple, params, weights, steps: int, writes_buffers: bool, capture) -> None:
        self.key = key
        # the copy's pieces: each layer's u, then each layer's v, then the σ's
        self.pieces = [p._buffers["_u"].numel() for p in params] + [p._buffers["_v"].numel() for p in params] + [len(params)]
        self.graph = capture(lambda: _concatenated_refresh(params, weights, steps, writes_buffers), weights[0].device)

    def __call__(self, params) -> Iterable[Tuple[Tensor, Tensor, Tensor]]:
        # The copy is one cat of the op's three outputs (one launch, outside the graph: packing
        # them inside would add a node to every replay), split into every layer's pieces.
        pieces = torch.cat(self.graph.replay()).split_with_sizes(self.pieces)
        count = len(params)
        return zip(pieces[:count], pieces[count:2 * count], pieces[-1].unbind())


def _concatenated_refresh(params: Sequence["SpectralNorm"], weights: Sequence[Tensor], steps: int,
                          writes_buffers: bool) -> Tuple[Tensor, ...]:
    """The refresh's (u's, v's, σ's) concatenated, autocast off: nothing in it is cast, and a
    capture must not fill autocast's cache."""
    with torch.autocast("cuda", enabled=False):
        return _refresh_together(params, weights, steps, writes_buffers)[0]


def _refresh_together(params: Sequence["SpectralNorm"], weights: Sequence[Tensor], steps: int, writes_buffers: bool):
    """The multi-layer op on these layers, their u, v buffers updated if ``writes_buffers``:
    ((u's, v's, σ's) concatenated, each layer's (u, v, σ))."""
    u_buffers = [p._buffers["_u"] for p in params]  # the dicts, not nn.Module's slow __getattr__
    v_buffers = [p._buffers["_v"] for p in params]
    with torch.no_grad():
        concatenated = ops.power_iteration_multi(
            [w.detach() for w in weights], u_buffers, v_buffers, [p.dim for p in params], steps, params[0].eps, True,
        )
        per_layer = _per_layer(params, *concatenated)
        if steps > 0 and writes_buffers:
            _write_buffers(params, [u for u, _, _ in per_layer], [v for _, v, _ in per_layer])
    return concatenated, per_layer


def _write_buffers(params: Sequence["SpectralNorm"], us: Sequence[Tensor], vs: Sequence[Tensor]) -> None:
    """One multi-tensor copy into all the layers' u and v buffers: one launch, one graph node."""
    with torch.no_grad():
        torch._foreach_copy_([p._buffers["_u"] for p in params] + [p._buffers["_v"] for p in params], [*us, *vs])


def write_pending_buffers(params: Sequence["SpectralNorm"]) -> None:
    """Write the u, v that these layers took from :func:`apply_spectral_norm`'s refresh to their buffers."""
    pending = [p._pending_buffers for p in params]
    for p in params:
        object.__setattr__(p, "_pending_buffers", None)
    _write_buffers(params, [u for u, _ in pending], [v for _, v in pending])


def _per_layer(params: Sequence["SpectralNorm"], u_cat: Tensor, v_cat: Tensor, sigmas: Tensor) -> List[Tuple[Tensor, Tensor, Tensor]]:
    us = u_cat.split([p._buffers["_u"].shape[0] for p in params])
    vs = v_cat.split([p._buffers["_v"].shape[0] for p in params])
    return list(zip(us, vs, sigmas.unbind()))


def iterate_together(
    params: Sequence["SpectralNorm"], weights: Sequence[Tensor], steps: int, writes_buffers: bool = True,
) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """``steps`` power iterations of the layers whose :class:`SpectralNorm` parametrizations
    and weights are given, in one launch of the multi-tensor op (the same ``eps``, dtype and
    device for all), their u, v buffers updated if ``writes_buffers``; returns each layer's (u, v, sigma)."""
    return _refresh_together(params, weights, steps, writes_buffers)[1]


def _set_group_result(param: "SpectralNorm", result: Optional[tuple]) -> None:
    # A plain attribute: nn.Module.__setattr__'s parameter/buffer/module checks are not needed.
    object.__setattr__(param, "_group_result", result)


def apply_spectral_norm(
    model: nn.Module, n_power_iterations: int = 1, eps: float = 1e-12, layer_types: Sequence[type] = _SN_LAYERS,
    *, cuda_graphs: bool = True,
) -> nn.Module:
    """Apply :func:`spectral_norm` to every layer of ``model`` of ``layer_types``
    (Conv, ConvTranspose and Linear by default) and batch their power iterations
    into one multi-tensor launch per model forward (on the GPU and with the Triton or
    reference kernels; on the CPU's C++ kernels each layer's own forward is faster).
    Per-layer results equal layer-by-layer spectral norm. On a GPU that launch is
    replayed from a private CUDA graph once the same layers and storage come again
    (the same numbers, bit for bit); ``cuda_graphs=False`` keeps it eager. Returns ``model``."""
    layers, weights, parametrized = [], [], []
    for qualified, module in model.named_modules():
        if not isinstance(module, tuple(layer_types)):
            continue
        where = f"{qualified or type(model).__name__}.weight"
        if parametrize.is_parametrized(module, "weight"):
            parametrized.append(where)
        else:  # every layer checked before any is changed: a bad layer leaves the model as it was
            weights.append(_checked_weight(module, "weight", n_power_iterations, default_dim(module), where)[0])
            layers.append(module)
    for module, weight in zip(layers, weights):
        parametrize.register_parametrization(
            module, "weight", SpectralNorm(weight, n_power_iterations, default_dim(module), eps, cuda_graphs))
    if not layers and parametrized:
        raise ValueError(f"apply_spectral_norm: every layer of {type(model).__name__} of types "
                         f"{[t.__name__ for t in layer_types]} is parametrized already ({', '.join(parametrized[:3])}"
                         f"{', ...' if len(parametrized) > 3 else ''}): was spectral norm applied twice?")
    if not layers:
        raise ValueError(f"apply_spectral_norm: {type(model).__name__} has no layer of types {[t.__name__ for t in layer_types]}")
    hook = _GroupedPowerIteration(layers, cuda_graphs)
    model.register_forward_pre_hook(hook)
    model.register_forward_hook(hook.clear, always_call=True)
    return model
