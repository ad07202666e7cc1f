"""Benchmark: spectral norm of the whole SNDCGAN discriminator (8 layers, 5.9M weights).

Four groups; ``refresh`` and ``normalized weights`` have torch's parametrization
(``torch.nn.utils.parametrizations.spectral_norm``, the baseline) and hook form
(``torch.nn.utils.spectral_norm``) beside fastgan on every backend usable on the device:

* ``refresh``: one training-mode power iteration of all 8 layers, u and v updated
  -- what the issue's SN targets are stated for. torch: its own power-method code per
  layer; fastgan: the multi-layer op, one launch for the model (what
  ``apply_spectral_norm``'s hook runs on the GPU), and the single-layer op once per layer.
  On a GPU also a CUDA-graph replay of the multi-layer op: its kernels' own time, what a
  training step captured with ``cuda_graphs: true`` spends (informative: the targets are
  stated for the eager call).
* ``triton launch configs`` (on a GPU): the Triton kernels' refresh with their default launch
  configuration and with each candidate (``GPU_CANDIDATES`` of ``fastgan.kernels.spectral_norm``),
  replayed from a CUDA graph: the measurement that picks the default.
* ``normalized weights``: the refresh plus W / sigma for every layer: all that one
  training forward spends on SN. torch's modules against fastgan's
  ``apply_spectral_norm``, the drop-in ``fastgan.nn.spectral_norm`` on each layer and
  the hook-form drop-in ``fastgan.nn.utils.spectral_norm`` (compare it with torch's hook form).
* ``W / sigma backward``: the gradient of every layer's W / sigma with respect to W for a
  given upstream gradient (what a D update's backward spends on SN), torch's parametrization
  against the drop-in per backend of ``spectral_normalize``.

Before timing, every variant runs once from the same weights and u, v as torch's
parametrization and must give the same u, v (refresh) or W / sigma (normalized
weights), within float32 round-off; the hook forms iterate v first, so fastgan's is
checked against torch's. Rates: bytes = the floor, W read once
(+ W / sigma written once).

Run: pytest bench/bench_spectral_norm.py --benchmark-only (see bench/conftest.py)
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from torch import Tensor, nn

import fastgan
import timing
from fastgan.models import build_models
from fastgan import graphs
from timing import DEVICE

grouped = importlib.import_module("fastgan.nn.spectral_norm")

BACKENDS = timing.kernel_backends(DEVICE, "spectral_norm_power_iteration_multi", "spectral_norm_power_iteration")
TORCH_PARAM, TORCH_HOOK = "torch parametrizations.spectral_norm", "torch utils.spectral_norm (hook)"
MULTI_LAYER_OP = "fastgan multi-layer op (one launch)"
GRAPH_REPLAY = "fastgan graph replay of the multi-layer op"
GROUPED_HOOK = "fastgan apply_spectral_norm's refresh"


def _hook_launches(backend: str) -> bool:
    """Whether apply_spectral_norm's hook launches anything with ``backend`` (on the CPU's C++
    kernels it leaves each layer to its own forward: nothing to time there)."""
    with fastgan.use_backend(backend):
        return grouped.ops.one_launch_pays(DEVICE)


REFRESH = [TORCH_PARAM, TORCH_HOOK] + [f"{kind} [{b}]" for b in BACKENDS
                                      for kind in ((GROUPED_HOOK,) if _hook_launches(b) else ())
                                      + (MULTI_LAYER_OP, "fastgan single-layer op x8")
                                      + ((GRAPH_REPLAY,) if DEVICE.type == "cuda" else ())]
FASTGAN_HOOK = "fastgan utils.spectral_norm (hook) per layer"
PER_LAYER = "fastgan spectral_norm per layer"
NORMALIZED = [TORCH_PARAM, TORCH_HOOK] + [f"{kind} [{b}]" for b in BACKENDS
                                         for kind in ("fastgan apply_spectral_norm", PER_LAYER, FASTGAN_HOOK)]
# W / σ's backward runs on the spectral_normalize backends (a forced Triton would rerun the default)
BACKWARD = [TORCH_PARAM] + [f"{PER_LAYER} [{b}]" for b in timing.kernel_backends(DEVICE, "spectral_normalize")]
RTOL = 1e-5  # float32: one power iteration over <= 4608-long dot products
# On a GPU with Triton: the Triton kernels' launch configurations (the default, then the candidates),
# each replayed from a CUDA graph -- the kernels' own time, which picks the default by measurement.
if DEVICE.type == "cuda" and "triton" in BACKENDS:
    triton_sn = importlib.import_module("fastgan.kernels.spectral_norm")
    LAUNCH_CONFIGS = {f"triton {config.label()}{' (default)' if config == triton_sn.GPU else ''}": config
                      for config in (triton_sn.GPU,) + triton_sn.GPU_CANDIDATES}
else:
    LAUNCH_CONFIGS = {}


def weight_layers(model: nn.Module) -> List[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def sndcgan_discriminator() -> nn.Module:
    """SNDCGAN's D at 32x32 without normalization, so each variant applies its own SN."""
    torch.manual_seed(0)
    return build_models("sndcgan", 32, d_norm="none")[1].to(DEVICE)


class Models:
    """SN-wrapped copies of one discriminator, all set to the same weights and u, v."""

    def __init__(self) -> None:
        self.plain = sndcgan_discriminator()
        self.weights = [m.weight.detach() for m in weight_layers(self.plain)]
        generator = torch.Generator().manual_seed(1)
        unit = lambda n: nn.functional.normalize(torch.randn(n, generator=generator), dim=0).to(DEVICE)
        self.us = [unit(w.shape[0]) for w in self.weights]
        self.vs = [unit(w[0].numel()) for w in self.weights]
        self.weight_bytes = sum(w.numel() * w.element_size() for w in self.weights)

    def _copy(self, apply: Callable[[nn.Module], object], per_layer: bool) -> List[nn.Module]:
        model = sndcgan_discriminator()
        model.load_state_dict(self.plain.state_dict())
        if per_layer:
            for m in weight_layers(model):
                apply(m)
        else:
            apply(model)
        self.reset(model)
        return model

    def reset(self, model: nn.Module) -> None:
        """The common u, v in every layer's buffers (both torch forms' names)."""
        with torch.no_grad():
            for m, u, v in zip(weight_layers(model), self.us, self.vs):
                if hasattr(m, "weight_u"):
                    m.weight_u.copy_(u)
                    m.weight_v.copy_(v)
                else:
                    m.parametrizations.weight[0]._u.copy_(u)
                    m.parametrizations.weight[0]._v.copy_(v)

    def torch_param(self) -> nn.Module:
        return self._copy(torch.nn.utils.parametrizations.spectral_norm, per_layer=True)

    def torch_hook(self) -> nn.Module:
        return self._copy(torch.nn.utils.spectral_norm, per_layer=True)

    def fastgan_grouped(self, backend: str) -> nn.Module:
        with fastgan.use_backend(backend):
            return self._copy(fastgan.nn.apply_spectral_norm, per_layer=False)

    def fastgan_per_layer(self, backend: str) -> nn.Module:
        with fastgan.use_backend(backend):
            return self._copy(fastgan.nn.spectral_norm, per_layer=True)

    def fastgan_hook(self, backend: str) -> nn.Module:
        with fastgan.use_backend(backend):
            return self._copy(fastgan.nn.utils.spectral_norm, per_layer=True)


def uv(model: nn.Module) -> List[Tuple[Tensor, Tensor]]:
    out = []
    for m in weight_layers(model):
        if hasattr(m, "weight_u"):
            out.append((m.weight_u.clone(), m.weight_v.clone()))
        else:
            out.append((m.parametrizations.weight[0]._u.clone(), m.parametrizations.weight[0]._v.clone()))
    return out


def grouped_refresh_hook(model: nn.Module):
    hooks = [h for h in model._forward_pre_hooks.values() if isinstance(h, grouped._GroupedPowerIteration)]
    if len(hooks) != 1:
        raise RuntimeError("apply_spectral_norm's grouped power-iteration hook was not found on the model")
    return hooks[0]


def refresh_fn(name: str, models: Models) -> Tuple[Callable[[], object], nn.Module, str]:
    """(one refresh of all layers, the model whose buffers it updates, the backend or '')."""
    if name == TORCH_PARAM:
        model = models.torch_param()
        layers = weight_layers(model)

        def torch_param():
            with torch.no_grad():
                for m in layers:
                    sn = m.parametrizations.weight[0]
                    w = sn._reshape_weight_to_matrix(m.parametrizations.weight.original)
                    sn._power_method(w, 1)
                    torch.vdot(sn._u, torch.mv(w, sn._v))

        return torch_param, model, ""
    if name == TORCH_HOOK:
        model = models.torch_hook()
        layers = weight_layers(model)

        def torch_hook():  # the hook form's own power method; σ as its compute_weight forms it
            with torch.no_grad():
                for m in layers:
                    w, u, v = m.weight_orig.flatten(1), m.weight_u, m.weight_v
                    torch.nn.functional.normalize(torch.mv(w.t(), u), dim=0, eps=1e-12, out=v)
                    torch.nn.functional.normalize(torch.mv(w, v), dim=0, eps=1e-12, out=u)
                    torch.dot(u, torch.mv(w, v))

        return torch_hook, model, ""
    kind, backend = name[:-1].split(" [")
    if kind == GROUPED_HOOK:
        model = models.fastgan_grouped(backend)
        hook = grouped_refresh_hook(model)

        def grouped_refresh():
            # What a training forward spends on the refresh: the hook's launch (on a GPU replayed from a
            # graph from the second call on), each layer taking its u, v, σ, and the buffers' write when
            # the forward returns (a layer that took nothing keeps its buffers).
            with fastgan.use_backend(backend):
                hook(model, ())
                for p in hook.params:
                    p.take_group_result()
                hook.clear(model, ())

        return grouped_refresh, model, backend
    model = models.fastgan_per_layer(backend)
    params = [m.parametrizations.weight[0] for m in weight_layers(model)]
    weights = [m.parametrizations.weight.original for m in weight_layers(model)]
    if kind in (MULTI_LAYER_OP, GRAPH_REPLAY):

        def multi_layer_op():  # what apply_spectral_norm's hook runs where one launch pays
            with fastgan.use_backend(backend):
                grouped.iterate_together(params, weights, 1)

        if kind == GRAPH_REPLAY:
            graph = captured(multi_layer_op)
            models.reset(model)  # the warm-up iterated: back to the common u, v
            return graph.replay, model, backend
        return multi_layer_op, model, backend

    def single_layer_ops():
        with torch.no_grad(), fastgan.use_backend(backend):
            for w, p in zip(weights, params):
                u, v, _ = torch.ops.fastgan.spectral_norm_power_iteration(w, p._u, p._v, p.dim, 1, p.eps, True)
                p._u.copy_(u)
                p._v.copy_(v)

    return single_layer_ops, model, backend


def launch_config_refresh_fn(name: str, models: Models) -> Tuple[Callable[[], object], nn.Module]:
    """(the Triton kernels' refresh with launch configuration ``name`` replayed from a CUDA
    graph, u and v updated; the model whose buffers it updates)."""
    model = models.fastgan_per_layer("triton")
    params = [m.parametrizations.weight[0] for m in weight_layers(model)]
    weights = [m.parametrizations.weight.original.detach() for m in weight_layers(model)]
    buffers = [p._u for p in params] + [p._v for p in params]

    def refresh():
        with torch.no_grad():
            u_cat, v_cat, _ = triton_sn.power_iteration_multi(
                weights, buffers[:len(params)], buffers[len(params):], [p.dim for p in params], 1, params[0].eps, True,
                config=LAUNCH_CONFIGS[name])
            torch._foreach_copy_(buffers, list(u_cat.split([p._u.numel() for p in params]))
                                 + list(v_cat.split([p._v.numel() for p in params])))

    graph = captured(refresh)
    models.reset(model)  # the warm-up iterated: back to the common u, v
    return graph.replay, model


def captured(fn: Callable[[], object]) -> graphs.CapturedGraph:
    """``fn`` captured in a CUDA graph, after a warm-up call on a side stream (which builds the
    multi-layer op's layer table, something a capture may not do), as the trainer warms up."""
    graphs.on_side_stream(fn)
    return graphs.CapturedGraph(fn, DEVICE)


def hook_forward(model: nn.Module, backend: str) -> Callable[[], List[Tensor]]:
    """What a forward of a hook-form model spends on SN: each layer's pre-hook, then its weight."""
    layers = weight_layers(model)
    hooks = [(m, next(iter(m._forward_pre_hooks.values()))) for m in layers]

    def forward():
        with fastgan.use_backend(backend or None):
            for m, hook in hooks:
                hook(m, ())
            return [m.weight for m in layers]

    return forward


def normalized_fn(name: str, models: Models) -> Callable[[], List[Tensor]]:
    if name == TORCH_PARAM:
        layers = weight_layers(models.torch_param())
        return lambda: [m.weight for m in layers]
    if name == TORCH_HOOK:
        return hook_forward(models.torch_hook(), "")
    kind, backend = name[:-1].split(" [")
    if kind == FASTGAN_HOOK:
        return hook_forward(models.fastgan_hook(backend), backend)
    if kind == "fastgan apply_spectral_norm":
        model = models.fastgan_grouped(backend)
        hook, layers = grouped_refresh_hook(model), weight_layers(model)

        def grouped_forward():  # the model's pre-hook, every layer's weight, the model's forward hook
            with fastgan.use_backend(backend):
                hook(model, ())
                weights = [m.weight for m in layers]
                hook.clear(model, ())
                return weights

        return grouped_forward
    layers = weight_layers(models.fastgan_per_layer(backend))

    def per_layer_forward():
        with fastgan.use_backend(backend):
            return [m.weight for m in layers]

    return per_layer_forward


def backward_fn(name: str, models: Models) -> Callable[[], Tuple[Tensor, ...]]:
    """The backward of every layer's W / σ (the forward recorded once, its graph kept), for
    the same upstream gradients whatever the variant."""
    backend = None if name == TORCH_PARAM else name[:-1].split(" [")[1]
    with fastgan.use_backend(backend):
        layers = weight_layers(models.torch_param() if backend is None else models.fastgan_per_layer(backend))
        outputs = [m.weight for m in layers]
    originals = [m.parametrizations.weight.original for m in layers]
    generator = torch.Generator().manual_seed(2)
    grads = [torch.randn(w.shape, generator=generator).to(DEVICE) for w in outputs]

    def backward():
        with fastgan.use_backend(backend):
            return torch.autograd.grad(outputs, originals, grads, retain_graph=True)

    return backward


@pytest.fixture(scope="module")
def models() -> Models:
    return Models()


@pytest.fixture(scope="module")
def torch_refresh(models):
    """u, v after one refresh by torch's parametrization, from the common state."""
    fn, model, _ = refresh_fn(TORCH_PARAM, models)
    fn()
    return uv(model)


@pytest.fixture(scope="module")
def torch_normalized(models):
    with torch.no_grad():
        return [w.detach().clone() for w in normalized_fn(TORCH_PARAM, models)()]


def assert_close(ours: List[Tensor], theirs: List[Tensor], what: str) -> None:
    for i, (a, b) in enumerate(zip(ours, theirs)):
        error = float((a.double() - b.double()).norm() / b.double().norm())
        assert error < RTOL, f"{what}, layer {i}: relative error {error:.1e} against torch's parametrization"


@pytest.mark.parametrize("name", REFRESH)
def test_refresh(benchmark, models, torch_refresh, name):
    fn, model, _ = refresh_fn(name, models)
    fn()
    if name != TORCH_HOOK:  # torch's hook form iterates v first: a different (equally valid) u, v
        ours = uv(model)
        assert_close([u for u, _ in ours], [u for u, _ in torch_refresh], f"{name}: u")
        assert_close([v for _, v in ours], [v for _, v in torch_refresh], f"{name}: v")
    timing.measure(benchmark, fn, name, baseline=name == TORCH_PARAM, group="spectral_norm: refresh",
                   bytes=models.weight_bytes, warmup=5)


@pytest.mark.parametrize("name", list(LAUNCH_CONFIGS))
def test_triton_launch_configs(benchmark, models, torch_refresh, name):
    fn, model = launch_config_refresh_fn(name, models)
    fn()
    ours = uv(model)
    assert_close([u for u, _ in ours], [u for u, _ in torch_refresh], f"{name}: u")
    assert_close([v for _, v in ours], [v for _, v in torch_refresh], f"{name}: v")
    timing.measure(benchmark, fn, name, baseline=name.endswith("(default)"),
                   group="spectral_norm: triton launch configs (graph replay)", bytes=models.weight_bytes, warmup=5)


@pytest.fixture(scope="module")
def torch_hook_normalized(models):
    with torch.no_grad():
        return [w.detach().clone() for w in normalized_fn(TORCH_HOOK, models)()]


@pytest.mark.parametrize("name", NORMALIZED)
def test_normalized_weights(benchmark, models, torch_normalized, torch_hook_normalized, name):
    fn = normalized_fn(name, models)
    # The hook form iterates v first: its W / sigma is checked against torch's hook form.
    with torch.no_grad():
        if name.startswith(FASTGAN_HOOK):
            assert_close(fn(), torch_hook_normalized, f"{name}: W / sigma (against torch's hook form)")
        elif name != TORCH_HOOK:
            assert_close(fn(), torch_normalized, f"{name}: W / sigma")
    timing.measure(benchmark, fn, name, baseline=name == TORCH_PARAM, group="spectral_norm: normalized weights",
                   bytes=2 * models.weight_bytes, warmup=5)


@pytest.fixture(scope="module")
def torch_backward(models):
    return backward_fn(TORCH_PARAM, models)()


@pytest.mark.parametrize("name", BACKWARD)
def test_normalized_weights_backward(benchmark, models, torch_backward, name):
    fn = backward_fn(name, models)
    assert_close(list(fn()), list(torch_backward), f"{name}: the gradient of W / sigma")
    # read W and the upstream gradient, write the weight gradient
    timing.measure(benchmark, fn, name, baseline=name == TORCH_PARAM, group="spectral_norm: W / sigma backward",
                   bytes=3 * models.weight_bytes, warmup=5)


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "--benchmark-only"]))
