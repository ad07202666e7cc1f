"""Spectral normalization: every backend against torch's two SN forms and the plain-torch reference.

Tolerances: float64 to 1e-9, float32 to 1e-5 (relative and absolute), on outputs,
sigma, u, v and the gradient of a random projection of the output w.r.t. the
original weight. float16 / bfloat16 weights (float32 accumulation, u and v rounded
to the weight dtype after each step as torch's buffers are) against float64 from the
same rounded inputs: 5e-3 / 4e-2 (a few units in the last place of each rounding;
the interpreter rounds float32 -> bfloat16 by truncation). Triton runs through the
interpreter on CPU tensors; tests marked cuda repeat everything on a GPU.
"""
import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

import fastgan
import importlib
from fastgan.reference import spectral_norm as reference
from conftest import CUDA_ONLY, DEVICES, KERNEL_BACKENDS, device_backends
from graph_stand_in import RerunGraph

fsn = importlib.import_module("fastgan.nn.spectral_norm")  # the module; fastgan.nn.spectral_norm is the function

TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=5e-3, atol=5e-3),
    torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
}
OPS = torch.ops.fastgan


def _unit(n, dtype, device):
    return F.normalize(torch.randn(n, dtype=dtype, device=device), dim=0)


def _layer_inputs(shape, dim, dtype, device):
    weight = torch.randn(shape, dtype=dtype, device=device)
    rows = shape[dim]
    return weight, _unit(rows, dtype, device), _unit(weight.numel() // rows, dtype, device)


LAYER_SHAPES = [((37, 3, 3, 3), 0), ((1, 8192), 0), ((5, 11, 4, 4), 1), ((3, 7, 5), 2), ((19, 1), 0)]
# Large and odd enough for every block path: several row blocks with a ragged last one
# (Triton BLOCK_M 16/32, CUDA 1-8 rows per block), column tiles past 256 with a tail,
# reduce blocks past 1024, finalize loops past 1024 rows, a row over 64 KB (one row per
# CUDA block), the strided (dim != 0) read, and > 65536 weights (several CPU ranges).
LARGE_LAYER_SHAPES = [((67, 1200), 0), ((1030, 3, 3, 3), 0), ((3, 17001), 0), ((5, 37, 4, 4), 1)]


# ---------------------------------------------------------------- ops vs reference


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_power_iterations", [0, 1, 3])
@pytest.mark.parametrize("u_first", [True, False])
def test_power_iteration_matches_reference(device, backend, dtype, n_power_iterations, u_first):
    for shape, dim in LAYER_SHAPES:
        weight, u, v = _layer_inputs(shape, dim, dtype, device)
        expected = reference.power_iteration(weight, u, v, dim, n_power_iterations, 1e-12, u_first)
        with fastgan.use_backend(backend):
            actual = OPS.spectral_norm_power_iteration(weight, u, v, dim, n_power_iterations, 1e-12, u_first)
        for a, e in zip(actual, expected):
            assert a.shape == e.shape and a.dtype == e.dtype
            torch.testing.assert_close(a, e, **TOL[dtype])


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_power_iterations", [0, 1, 2])
@pytest.mark.parametrize("u_first", [True, False])
def test_multi_tensor_matches_layer_by_layer(device, backend, dtype, n_power_iterations, u_first):
    layers = [_layer_inputs(shape, dim, dtype, device) for shape, dim in LAYER_SHAPES]
    weights, us, vs = (list(x) for x in zip(*layers))
    dims = [dim for _, dim in LAYER_SHAPES]
    with fastgan.use_backend(backend):
        u_cat, v_cat, sigmas = OPS.spectral_norm_power_iteration_multi(weights, us, vs, dims, n_power_iterations, 1e-12, u_first)
    exp_u, exp_v, exp_sigma = reference.power_iteration_multi(weights, us, vs, dims, n_power_iterations, 1e-12, u_first)
    torch.testing.assert_close(u_cat, exp_u, **TOL[dtype])
    torch.testing.assert_close(v_cat, exp_v, **TOL[dtype])
    torch.testing.assert_close(sigmas, exp_sigma, **TOL[dtype])


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
@pytest.mark.parametrize("n_power_iterations", [1, 2])
def test_u_first_iterations_never_read_u(device, backend, n_power_iterations):
    """The parametrization's schedule computes u from W v: the kernels skip loading the given u
    (one launch less a refresh on a GPU), so a NaN u must change nothing."""
    layers = [_layer_inputs(shape, dim, torch.float32, device) for shape, dim in LAYER_SHAPES]
    weights, us, vs = (list(x) for x in zip(*layers))
    dims = [dim for _, dim in LAYER_SHAPES]
    nan_us = [torch.full_like(u, float("nan")) for u in us]
    with fastgan.use_backend(backend):
        expected = OPS.spectral_norm_power_iteration_multi(weights, us, vs, dims, n_power_iterations, 1e-12, True)
        got = OPS.spectral_norm_power_iteration_multi(weights, nan_us, vs, dims, n_power_iterations, 1e-12, True)
        expected_single = OPS.spectral_norm_power_iteration(weights[0], us[0], vs[0], dims[0], n_power_iterations, 1e-12, True)
        single = OPS.spectral_norm_power_iteration(weights[0], nan_us[0], vs[0], dims[0], n_power_iterations, 1e-12, True)
    for a, e in [*zip(got, expected), *zip(single, expected_single)]:
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n_power_iterations,u_first", [(1, True), (2, False), (0, True)])
def test_every_dtype_and_block_path_matches_float64(device, backend, dtype, n_power_iterations, u_first):
    """Low-precision weights accumulate in float32; u, v, sigma come back in the weight dtype like
    torch's buffers. One multi-layer call and one single-layer call per shape."""
    layers = [[x.to(dtype) for x in _layer_inputs(shape, dim, torch.float32, device)] for shape, dim in LARGE_LAYER_SHAPES]
    weights, us, vs = (list(x) for x in zip(*layers))
    dims = [dim for _, dim in LARGE_LAYER_SHAPES]
    as64 = lambda xs: [x.double() for x in xs]  # noqa: E731
    with fastgan.use_backend(backend):
        got = OPS.spectral_norm_power_iteration_multi(weights, us, vs, dims, n_power_iterations, 1e-12, u_first)
        single = OPS.spectral_norm_power_iteration(weights[2], us[2], vs[2], dims[2], n_power_iterations, 1e-12, u_first)
    expected = reference.power_iteration_multi(as64(weights), as64(us), as64(vs), dims, n_power_iterations, 1e-12, u_first)
    for a, e in zip(got, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), e, **TOL[dtype])
    expected = reference.power_iteration(*as64([weights[2], us[2], vs[2]]), dims[2], n_power_iterations, 1e-12, u_first)
    for a, e in zip(single, expected):
        torch.testing.assert_close(a.double(), e, **TOL[dtype])


_TRITON_SN = importlib.import_module("fastgan.kernels.spectral_norm") if "triton" in KERNEL_BACKENDS["cpu"] else None
_GPU_CONFIGS = [] if _TRITON_SN is None else (
    [pytest.param(dtype, _TRITON_SN.GPU, id=f"GPU-{dtype}") for dtype in (torch.bfloat16, torch.float32)]
    + [pytest.param(torch.float32, config, id=f"GPU_CANDIDATES[{i}]")
       for i, config in enumerate(_TRITON_SN.GPU_CANDIDATES)])


@pytest.mark.parametrize("dtype,config", _GPU_CONFIGS)
def test_triton_gpu_launch_configuration_in_the_interpreter(dtype, config, monkeypatch):
    """The tiles a GPU launch uses (the default GPU configuration, and each candidate the GPU
    benchmark times), run by the interpreter on the large shapes: the GPU's code paths,
    checked without a GPU (where Triton cannot run on the CPU, the list is empty)."""
    kernels = _TRITON_SN
    monkeypatch.setattr(kernels, "config_for", lambda device: config)
    layers = [[x.to(dtype) for x in _layer_inputs(shape, dim, torch.float32, "cpu")] for shape, dim in LARGE_LAYER_SHAPES]
    weights, us, vs = (list(x) for x in zip(*layers))
    dims = [dim for _, dim in LARGE_LAYER_SHAPES]
    with fastgan.use_backend("triton"):
        got = OPS.spectral_norm_power_iteration_multi(weights, us, vs, dims, 1, 1e-12, True)
    as64 = lambda xs: [x.double() for x in xs]  # noqa: E731
    expected = reference.power_iteration_multi(as64(weights), as64(us), as64(vs), dims, 1, 1e-12, True)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.double(), e, **TOL[dtype])


def _strided_layers(device):
    """(weight, dim, dense) laid out as users' models have them: channels-last conv and
    transposed-conv kernels, a transposed matrix, and a non-dense slice."""
    conv = torch.randn(37, 5, 3, 3, device=device).to(memory_format=torch.channels_last)
    conv_t = torch.randn(5, 11, 4, 4, device=device).to(memory_format=torch.channels_last)
    return [(conv, 0, True), (conv_t, 1, True), (torch.randn(30, 41, device=device).t(), 0, True),
            (torch.randn(20, 30, device=device)[:, ::2], 0, False)]


@pytest.mark.parametrize("device,backend", device_backends())
def test_strided_weights_are_read_in_place(device, backend, monkeypatch):
    """Channels-last and other dense layouts reach the kernels as views of the same
    memory (no silent .contiguous() copy) and give the reference's u, v, sigma."""
    layers = _strided_layers(device)
    weights = [w for w, _, _ in layers]
    dims = [d for _, d, _ in layers]
    us = [_unit(w.shape[d], w.dtype, device) for w, d, _ in layers]
    vs = [_unit(w.numel() // w.shape[d], w.dtype, device) for w, d, _ in layers]
    seen = []
    op = fastgan._backend.registered()["spectral_norm_power_iteration_multi"]
    kernel = op.impls[backend]
    monkeypatch.setitem(op.impls, backend, lambda ws, *rest: seen.append(list(ws)) or kernel(ws, *rest))
    with fastgan.use_backend(backend):
        got = OPS.spectral_norm_power_iteration_multi(weights, us, vs, dims, 2, 1e-12, True)
    expected = reference.power_iteration_multi(weights, us, vs, dims, 2, 1e-12, True)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, **TOL[torch.float32])
    for passed, (w, _, dense) in zip(seen[0], layers):
        assert passed.is_contiguous()
        assert (passed.data_ptr() == w.data_ptr()) == dense, "a dense weight was copied (or a slice was not)"


class _AtenCalls(TorchDispatchMode):
    """The aten ops a call runs, by name."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS["cpu"])
def test_a_strided_layouts_columns_move_by_views_and_a_copy(backend):
    """A weight whose columns are not in W_mat's order (channels-last) has v reordered by a
    permuted view and one copy: no index tensor is built (nor cached on a device, where freeing
    it would race a launch queued on another stream or a captured graph's replay)."""
    op = importlib.import_module("fastgan.ops.spectral_norm")
    layers = _strided_layers("cpu")[:2]  # both reorder their columns
    weights = [w for w, _, _ in layers]
    dims = [d for _, d, _ in layers]
    us = [_unit(w.shape[d], w.dtype, "cpu") for w, d, _ in layers]
    vs = [_unit(w.numel() // w.shape[d], w.dtype, "cpu") for w, d, _ in layers]
    op._layout.cache_clear()
    with fastgan.use_backend(backend), _AtenCalls() as calls:
        got = op._power_iteration_multi(weights, us, vs, dims, 2, 1e-12, True)
    assert not {"arange", "sort", "argsort", "index", "gather"} & set(calls.names), calls.names
    as64 = lambda xs: [x.double() for x in xs]  # noqa: E731
    expected = reference.power_iteration_multi(as64(weights), as64(us), as64(vs), dims, 2, 1e-12, True)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a.double(), e, **TOL[torch.float32])


@pytest.mark.parametrize("backend", [pytest.param(b, marks=CUDA_ONLY) for b in KERNEL_BACKENDS["cuda"]])
def test_a_strided_layout_met_first_in_a_capture_is_right_outside_it(backend):
    """A layout whose column order the op first works out while a CUDA graph is captured: the
    eager call after the capture (before any replay) reads v in the right order."""
    op = importlib.import_module("fastgan.ops.spectral_norm")
    w = torch.randn(37, 5, 3, 3, device="cuda").to(memory_format=torch.channels_last)
    u, v = _unit(37, w.dtype, "cuda"), _unit(45, w.dtype, "cuda")
    expected = reference.power_iteration(w, u, v, 0, 1, 1e-12, True)
    with fastgan.use_backend(backend):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            OPS.spectral_norm_power_iteration(w, u, v, 0, 1, 1e-12, True)  # builds the layer table
        torch.cuda.current_stream().wait_stream(side)
        op._layout.cache_clear()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            OPS.spectral_norm_power_iteration(w, u, v, 0, 1, 1e-12, True)
        got = OPS.spectral_norm_power_iteration(w, u, v, 0, 1, 1e-12, True)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_triton_layer_table_is_built_once_per_set_of_weights():
    """No host->device table copy on a repeated call (CUDA-graph capture needs that);
    a new storage for a weight builds a new table."""
    if "triton" not in KERNEL_BACKENDS["cpu"]:
        pytest.skip("triton runs on the CPU only under TRITON_INTERPRET=1")
    kernels = importlib.import_module("fastgan.kernels.spectral_norm")
    layers = [_layer_inputs(shape, dim, torch.float32, "cpu") for shape, dim in LAYER_SHAPES]
    weights, us, vs = (list(x) for x in zip(*layers))
    dims = [dim for _, dim in LAYER_SHAPES]
    config = kernels.config_for(torch.device("cpu"))
    first = kernels._table(weights, dims, config)
    assert kernels._table(weights, dims, config) is first
    built = []
    tensor = torch.tensor
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels.torch, "tensor", lambda *a, **k: built.append(1) or tensor(*a, **k))
        with fastgan.use_backend("triton"):
            for _ in range(2):
                OPS.spectral_norm_power_iteration_multi(weights, us, vs, dims, 1, 1e-12, True)
        assert len(built) <= 1  # at most the first call of this test's op (its table may already be cached)
        built.clear()
        weights[0] = weights[0].clone()
        with fastgan.use_backend("triton"):
            OPS.spectral_norm_power_iteration_multi(weights, us, vs, dims, 1, 1e-12, True)
        assert len(built) == 1


def test_triton_layer_table_used_in_a_capture_is_never_evicted(monkeypatch):
    """A CUDA graph replays with the table it captured, without a lookup: however many other
    weight sets come after, that table stays (the LRU evicts others). Capture is faked here."""
    kernels = importlib.import_module("fastgan.kernels.spectral_norm")
    config = kernels.config_for(torch.device("cpu"))
    monkeypatch.setattr(kernels, "_TABLES", type(kernels._TABLES)())
    monkeypatch.setattr(kernels, "_CAPTURED", set())
    captured = [torch.randn(5, 7)]
    table = kernels._table(captured, [0], config)  # the warm-up call before capture builds it
    monkeypatch.setattr(kernels, "_capturing", lambda device: True)
    assert kernels._table(captured, [0], config) is table
    with pytest.raises(RuntimeError, match="inside CUDA graph capture"):
        kernels._table([torch.randn(3, 4)], [0], config)  # a table cannot be built during capture
    monkeypatch.setattr(kernels, "_capturing", lambda device: False)
    others = [torch.randn(3, 4) for _ in range(2 * kernels._TABLE_CACHE_SIZE)]
    for w in others:
        kernels._table([w], [0], config)
    assert len(kernels._TABLES) == kernels._TABLE_CACHE_SIZE
    assert kernels._table(captured, [0], config) is table


@pytest.mark.parametrize("backend", [pytest.param(b, marks=CUDA_ONLY) for b in KERNEL_BACKENDS["cuda"]])
def test_a_layer_table_used_on_another_stream_outlives_its_eviction(backend):
    """Each backend keeps its layer tables in a 16-entry LRU. A table built on one stream and then
    launched on another must not go back to its own stream's pool while that launch is still
    queued: here the launch waits behind a GPU sleep while the first stream evicts the table
    and builds 20 tables of the same size (which take the freed memory if they may). The
    launch must still read its own table: u, v, sigma as the reference's."""
    build, launch = torch.cuda.Stream(), torch.cuda.current_stream()
    layers = [_layer_inputs(shape, dim, torch.float32, "cuda") for shape, dim in LAYER_SHAPES]
    weights, us, vs = (list(x) for x in zip(*layers))
    dims = [dim for _, dim in LAYER_SHAPES]
    expected = reference.power_iteration_multi(weights, us, vs, dims, 1, 1e-12, True)
    with fastgan.use_backend(backend):
        build.wait_stream(launch)
        with torch.cuda.stream(build):
            OPS.spectral_norm_power_iteration_multi(weights, us, vs, dims, 1, 1e-12, True)
        launch.wait_stream(build)
        torch.cuda._sleep(200_000_000)  # ~0.1 s: the launch below stays queued while the other stream runs
        got = OPS.spectral_norm_power_iteration_multi(weights, us, vs, dims, 1, 1e-12, True)
        with torch.cuda.stream(build):
            others = [[w.clone() for w in weights] for _ in range(20)]  # all alive: new pointers, new tables
            for clones in others:
                OPS.spectral_norm_power_iteration_multi(clones, us, vs, dims, 1, 1e-12, True)
    torch.cuda.synchronize()
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- modules vs torch


def _conv():
    return nn.Conv2d(3, 37, 3), (2, 3, 7, 7)


def _conv_transpose():
    return nn.ConvTranspose2d(5, 11, 4, stride=2, padding=1), (2, 5, 3, 3)


def _linear():
    return nn.Linear(8192, 1), (3, 8192)


LAYERS = [pytest.param(_conv, id="conv37x3x3x3"), pytest.param(_conv_transpose, id="convT5x11x4x4"), pytest.param(_linear, id="linear1x8192")]

FORMS = {
    # name: (torch's function, fastgan's drop-in, original-weight getter, (u, v) getter)
    "parametrization": (
        torch.nn.utils.parametrizations.spectral_norm,
        fastgan.nn.spectral_norm,
        lambda m: m.parametrizations.weight.original,
        lambda m: (m.parametrizations.weight[0]._u, m.parametrizations.weight[0]._v),
    ),
    "hook": (
        torch.nn.utils.spectral_norm,
        fastgan.nn.utils.spectral_norm,
        lambda m: m.weight_orig,
        lambda m: (m.weight_u, m.weight_v),
    ),
}


def _twins(make, form, dtype, device, n_power_iterations, backend):
    """The same layer under torch's SN and fastgan's, from one RNG state."""
    torch_fn, ours_fn, _, _ = FORMS[form]
    torch.manual_seed(1)
    layer, x_shape = make()
    layer = layer.to(device=device, dtype=dtype)
    theirs, ours = copy.deepcopy(layer), copy.deepcopy(layer)
    torch.manual_seed(2)
    torch_fn(theirs, n_power_iterations=n_power_iterations)
    torch.manual_seed(2)
    with fastgan.use_backend(backend):
        ours_fn(ours, n_power_iterations=n_power_iterations)
    return theirs, ours, x_shape


def _assert_same_state(theirs, ours, form, dtype):
    _, _, _, vectors = FORMS[form]
    for a, e in zip(vectors(ours), vectors(theirs)):
        torch.testing.assert_close(a, e, **TOL[dtype])


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("make", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n_power_iterations", [1, 2, 3])
def test_drop_in_matches_torch(device, backend, form, make, dtype, n_power_iterations):
    theirs, ours, x_shape = _twins(make, form, dtype, device, n_power_iterations, backend)
    _assert_same_state(theirs, ours, form, dtype)  # includes the parametrization's 15 warm-up steps
    original = FORMS[form][2]
    for training in (True, True, False):
        theirs.train(training)
        ours.train(training)
        x = torch.randn(x_shape, dtype=dtype, device=device)
        out_t = theirs(x)
        with fastgan.use_backend(backend):
            out_o = ours(x)
        torch.testing.assert_close(out_o, out_t, **TOL[dtype])
        torch.testing.assert_close(ours.weight, theirs.weight, **TOL[dtype])
        _assert_same_state(theirs, ours, form, dtype)
        projection = torch.randn_like(out_t)
        g_t, = torch.autograd.grad((out_t * projection).sum(), original(theirs))
        g_o, = torch.autograd.grad((out_o * projection).sum(), original(ours))
        torch.testing.assert_close(g_o, g_t, **TOL[dtype])


@pytest.mark.parametrize("form", list(FORMS))
def test_eval_mode_does_not_iterate(form):
    _, ours, x_shape = _twins(_conv, form, torch.float64, "cpu", 1, "cpp")
    ours.eval()
    before = [t.clone() for t in FORMS[form][3](ours)]
    ours(torch.randn(x_shape, dtype=torch.float64))
    for a, b in zip(FORMS[form][3](ours), before):
        assert torch.equal(a, b)


@pytest.mark.parametrize("form", list(FORMS))
def test_two_forwards_in_one_graph(form):
    """D(real) - D(fake) through one SN layer backprops (no in-place version error), like torch's."""
    theirs, ours, x_shape = _twins(_conv, form, torch.float64, "cpu", 1, "cpp")
    real, fake = torch.randn(x_shape, dtype=torch.float64), torch.randn(x_shape, dtype=torch.float64)
    grads = []
    for m in (theirs, ours):
        loss = m(real).mean() - m(fake).mean()
        loss.backward()
        grads.append(FORMS[form][2](m).grad)
    torch.testing.assert_close(grads[1], grads[0], **TOL[torch.float64])


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("make", LAYERS)
def test_state_dict_round_trip_with_torch(form, make):
    theirs, ours, x_shape = _twins(make, form, torch.float64, "cpu", 1, "cpp")
    theirs(torch.randn(x_shape, dtype=torch.float64))  # move torch's state away from ours
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    ours(torch.randn(x_shape, dtype=torch.float64))
    theirs.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value), key


def test_conv_transpose_uses_dim_1():
    layer = fastgan.nn.spectral_norm(nn.ConvTranspose2d(5, 11, 4))
    assert layer.parametrizations.weight[0].dim == 1
    assert layer.parametrizations.weight[0]._u.shape == (11,)
    hook_layer = fastgan.nn.utils.spectral_norm(nn.ConvTranspose2d(5, 11, 4))
    assert hook_layer.weight_u.shape == (11,)


def test_hook_form_is_removable_with_torch():
    layer = fastgan.nn.utils.spectral_norm(nn.Linear(6, 4))
    layer(torch.randn(2, 6))
    fastgan.nn.utils.remove_spectral_norm(layer)
    assert isinstance(layer.weight, nn.Parameter) and not hasattr(layer, "weight_u")


# ---------------------------------------------------------------- apply_spectral_norm


def _small_discriminator():
    return nn.Sequential(
        nn.Conv2d(3, 13, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.ConvTranspose2d(13, 7, 4, stride=2, padding=1),
        nn.LeakyReLU(0.1),
        nn.Conv2d(7, 21, 4, stride=4),
        nn.LeakyReLU(0.1),
        nn.Flatten(),
        nn.Linear(21 * 4 * 4, 1),
    )


def _sn_pair(dtype, device, backend, make=_small_discriminator):
    """A model under torch's spectral norm and a copy under apply_spectral_norm (dtype None: the model's own)."""
    torch.manual_seed(3)
    base = make().to(device=device, dtype=dtype)
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(4)
    for m in theirs.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            torch.nn.utils.parametrizations.spectral_norm(m)
    torch.manual_seed(4)
    with fastgan.use_backend(backend):
        fastgan.nn.apply_spectral_norm(ours)
    return theirs, ours


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_apply_spectral_norm_launches_once_with_per_layer_results(device, backend, dtype, monkeypatch):
    # One multi-layer launch per forward -- except on the CPU's C++ kernels, where each layer's
    # own one-call forward is faster and the hook launches nothing.
    theirs, ours = _sn_pair(dtype, device, backend)
    launches_per_forward = 0 if backend == "cpp" else 1
    monkeypatch.setattr(fsn, "_MAX_CAPTURES", 0)  # on a GPU: the eager launch (replays: the tests below)

    def per_layer_call(*args, **kwargs):
        raise AssertionError("a layer ran the ops one by one inside the model forward")

    monkeypatch.setattr(fsn.ops, "power_iteration", per_layer_call)
    launches = []
    multi = fsn.ops.power_iteration_multi
    monkeypatch.setattr(fsn.ops, "power_iteration_multi", lambda *a: launches.append(1) or multi(*a))
    for step in range(3):
        x = torch.randn(4, 3, 8, 8, dtype=dtype, device=device)
        out_t = theirs(x)
        with fastgan.use_backend(backend):
            out_o = ours(x)
        assert len(launches) == launches_per_forward * (step + 1)
        torch.testing.assert_close(out_o, out_t, **TOL[dtype])
        for (name, p_o), (_, p_t) in zip(ours.named_parameters(), theirs.named_parameters()):
            g_o, = torch.autograd.grad(out_o.sum(), p_o, retain_graph=True)
            g_t, = torch.autograd.grad(out_t.sum(), p_t, retain_graph=True)
            torch.testing.assert_close(g_o, g_t, **TOL[dtype], msg=name)
        for (name, b_o), (_, b_t) in zip(ours.named_buffers(), theirs.named_buffers()):
            torch.testing.assert_close(b_o, b_t, **TOL[dtype], msg=name)


def _grouped_hook(model):
    (hook,) = [h for h in model._forward_pre_hooks.values() if isinstance(h, fsn._GroupedPowerIteration)]
    return hook


def _replays_comparable(device, monkeypatch):
    """Replays to compare with eager calls: the stand-in graph on the CPU; on a GPU deterministic
    cuDNN, as the comparison is bit for bit and cuDNN's own nondeterminism must not blur it."""
    if device == "cpu":
        monkeypatch.setattr(fsn, "_capture_for", lambda device: RerunGraph)
    else:
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)


def _replayed_and_eager(device, monkeypatch):
    """Two copies of a model under apply_spectral_norm: one whose refresh is replayed from a
    graph once its key repeats, one held to the eager launch."""
    _replays_comparable(device, monkeypatch)
    torch.manual_seed(3)
    base = _small_discriminator().to(device)
    replayed, eager = copy.deepcopy(base), copy.deepcopy(base)
    for model, cuda_graphs in ((replayed, True), (eager, False)):
        torch.manual_seed(4)
        with fastgan.use_backend("reference" if device == "cpu" else None):
            fastgan.nn.apply_spectral_norm(model, cuda_graphs=cuda_graphs)
    return replayed, eager


def _train_steps(models, device, steps, backend):
    """Steps with two forwards (real, fake) before one backward; returns each model's losses."""
    losses = {id(m): [] for m in models}
    for _ in range(steps):
        real, fake = torch.randn(4, 3, 8, 8, device=device), torch.randn(4, 3, 8, 8, device=device)
        for model in models:
            model.zero_grad()
            with fastgan.use_backend(backend):
                loss = model(fake).mean() - model(real).mean()
            loss.backward()
            losses[id(model)].append(loss.detach())
    return losses


def _assert_bit_identical(ours, theirs):
    for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), (_, b) in zip(ours.named_buffers(), theirs.named_buffers()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("device", DEVICES)
def test_replayed_refresh_gives_the_eager_refresh(device, monkeypatch):
    """From the second forward with the same layers and storage, the refresh is replayed:
    bit-identical losses, gradients and buffers to the eager launch, with two forwards
    (each iterating) before one backward; eval mode its own group; new storage re-keys."""
    backend = "reference" if device == "cpu" else None
    replayed, eager = _replayed_and_eager(device, monkeypatch)
    hook = _grouped_hook(replayed)
    losses = _train_steps((replayed, eager), device, 3, backend)
    assert all(torch.equal(a, b) for a, b in zip(losses[id(replayed)], losses[id(eager)]))
    _assert_bit_identical(replayed, eager)
    assert hook.refreshes.captures == 1 and {group[0] for group in hook.refreshes.replays} == {True}
    assert _grouped_hook(eager).refreshes.captures == 0  # cuda_graphs=False
    x = torch.randn(2, 3, 8, 8, device=device)
    for model in (replayed, eager):
        model.eval()
    with fastgan.use_backend(backend):
        for _ in range(3):
            assert torch.equal(replayed(x), eager(x))
    assert hook.refreshes.captures == 2 and {group[0] for group in hook.refreshes.replays} == {True, False}
    for model in (replayed, eager):
        model.train()
        layer = model[0].parametrizations.weight
        layer.original.data = layer.original.detach().clone()  # new storage: the captured refresh would read the old
    losses = _train_steps((replayed, eager), device, 3, backend)
    assert all(torch.equal(a, b) for a, b in zip(losses[id(replayed)], losses[id(eager)]))
    _assert_bit_identical(replayed, eager)
    assert hook.refreshes.captures == 3


def test_a_model_with_a_replayed_refresh_can_be_copied(monkeypatch):
    """deepcopy drops the captures (graphs are not copyable, and the copy's storage is new):
    the copy refreshes eagerly, then captures its own, with the original's numbers.
    (torch pickles parametrized models only through their state_dict.)"""
    replayed, _ = _replayed_and_eager("cpu", monkeypatch)
    x = torch.randn(2, 3, 8, 8)
    with fastgan.use_backend("reference"):
        for _ in range(3):
            replayed(x)
    assert _grouped_hook(replayed).refreshes.captures == 1
    copied = copy.deepcopy(replayed)
    assert _grouped_hook(copied).refreshes.captures == 0 and not _grouped_hook(copied).refreshes.replays
    with fastgan.use_backend("reference"):
        for _ in range(3):
            assert torch.equal(copied(x), replayed(x))
    assert _grouped_hook(copied).refreshes.captures == 1
    for (name, a), (_, b) in zip(copied.named_buffers(), replayed.named_buffers()):
        assert torch.equal(a, b), name


def test_a_refresh_that_cannot_be_captured_stays_eager_and_says_so(monkeypatch):
    replayed, eager = _replayed_and_eager("cpu", monkeypatch)

    def refused(record, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fsn, "_capture_for", lambda device: refused)
    with pytest.warns(RuntimeWarning, match="stays eager"):
        losses = _train_steps((replayed, eager), "cpu", 3, "reference")
    assert all(torch.equal(a, b) for a, b in zip(losses[id(replayed)], losses[id(eager)]))
    _assert_bit_identical(replayed, eager)
    assert not _grouped_hook(replayed).refreshes.replays


def test_refresh_whose_storage_keeps_changing_stays_eager(monkeypatch):
    replayed, _ = _replayed_and_eager("cpu", monkeypatch)
    hook = _grouped_hook(replayed)
    x = torch.randn(2, 3, 8, 8)
    with fastgan.use_backend("reference"):
        for _ in range(4 * fsn._MAX_CAPTURES):
            replayed(x)
            replayed(x)
            replayed[-1].parametrizations.weight.original.data = replayed[-1].parametrizations.weight.original.detach().clone()
    assert hook.refreshes.captures == fsn._MAX_CAPTURES
    RerunGraph.replays = 0
    with fastgan.use_backend("reference"):
        replayed(x)
        replayed(x)
    assert RerunGraph.replays == 0


def _per_layer_replayed_and_eager(device, monkeypatch):
    """Two copies of a model with the drop-in spectral_norm on each layer: one whose layers
    replay their own refresh from a graph once its key repeats, one held to the eager call."""
    _replays_comparable(device, monkeypatch)
    torch.manual_seed(3)
    base = _small_discriminator().to(device)
    models = []
    for cuda_graphs in (True, False):
        model = copy.deepcopy(base)
        torch.manual_seed(4)
        for layer in model:
            if isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                fastgan.nn.spectral_norm(layer, cuda_graphs=cuda_graphs)
        models.append(model)
    return models


def _layer_replays(model):
    return [layer.parametrizations.weight[0]._replays for layer in model if hasattr(layer, "parametrizations")]


@pytest.mark.parametrize("device", DEVICES)
def test_a_layer_replays_its_own_refresh(device, monkeypatch):
    """The drop-in spectral_norm: from the second forward with the same storage, each layer's
    refresh is replayed from a graph of its own -- bit-identical losses, gradients and buffers
    to the eager call, with two forwards before one backward; eval mode its own group; new
    storage re-keys that layer alone; cuda_graphs=False keeps every layer eager."""
    replayed, eager = _per_layer_replayed_and_eager(device, monkeypatch)
    losses = _train_steps((replayed, eager), device, 3, None)
    assert all(torch.equal(a, b) for a, b in zip(losses[id(replayed)], losses[id(eager)]))
    _assert_bit_identical(replayed, eager)
    assert all(r.captures == 1 and set(r.replays) == {True} for r in _layer_replays(replayed))
    assert all(r.captures == 0 and not r.enabled for r in _layer_replays(eager))
    x = torch.randn(2, 3, 8, 8, device=device)
    for model in (replayed, eager):
        model.eval()
    for _ in range(3):
        assert torch.equal(replayed(x), eager(x))
    assert all(r.captures == 2 and set(r.replays) == {True, False} for r in _layer_replays(replayed))
    for model in (replayed, eager):
        model.train()
        layer = model[0].parametrizations.weight
        layer.original.data = layer.original.detach().clone()
    losses = _train_steps((replayed, eager), device, 3, None)
    assert all(torch.equal(a, b) for a, b in zip(losses[id(replayed)], losses[id(eager)]))
    _assert_bit_identical(replayed, eager)
    assert [r.captures for r in _layer_replays(replayed)] == [3, 2, 2, 2]
    copied = copy.deepcopy(replayed)  # the copy starts eager, then captures its own
    assert all(r.captures == 0 and r.enabled for r in _layer_replays(copied))
    for _ in range(3):
        assert torch.equal(copied(x), replayed(x))


def _data_parallel_replica(model: nn.Module) -> nn.Module:
    """The replica nn.DataParallel makes of ``model`` for one device (torch.nn.parallel.replicate's
    steps, with the tensors themselves in place of their copies on another GPU)."""
    copies = {m: m._replicate_for_data_parallel() for m in model.modules()}
    for module, replica in copies.items():
        for key, child in module._modules.items():
            setattr(replica, key, copies[child])
        for key, param in module._parameters.items():
            setattr(replica, key, param.view_as(param))  # not a leaf, as a broadcast copy
        for key, buffer in module._buffers.items():
            setattr(replica, key, buffer)
    return copies[model]


def test_data_parallel_replicas_of_a_layer_refresh_eagerly(monkeypatch):
    """nn.DataParallel's replicas copy a layer's __dict__, so they share its replay state from
    threads of their own: a replica's refresh runs eagerly (as torch's), never captured."""
    replayed, eager = _per_layer_replayed_and_eager("cpu", monkeypatch)
    replicas = [_data_parallel_replica(model) for model in (replayed, eager)]
    x = torch.randn(2, 3, 8, 8)
    for _ in range(3):
        assert torch.equal(replicas[0](x), replicas[1](x))
    assert all(r.captures == 0 for r in _layer_replays(replayed))
    for (name, a), (_, b) in zip(replayed.named_buffers(), eager.named_buffers()):
        assert torch.equal(a, b), name


def test_apply_spectral_norm_without_graphs_keeps_its_layers_eager():
    model = fastgan.nn.apply_spectral_norm(_small_discriminator(), cuda_graphs=False)
    assert not _grouped_hook(model).refreshes.enabled
    assert not any(r.enabled for r in _layer_replays(model))


@pytest.mark.parametrize("backend", ["cpp", "reference"])  # per layer / grouped on the CPU
def test_apply_spectral_norm_eval_and_shared_layer_semantics(backend):
    """Eval mode does not iterate; a layer used twice iterates again on its second use, as torch's does."""
    theirs, ours = _sn_pair(torch.float64, "cpu", backend)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for model in (theirs, ours):
        model.eval()
    with fastgan.use_backend(backend):
        torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float64])
    for model in (theirs, ours):
        model.train()
    head_t, head_o = theirs[-1], ours[-1]
    feats = torch.randn(2, 21 * 4 * 4, dtype=torch.float64)
    with fastgan.use_backend(backend):
        torch.testing.assert_close(ours(x) + head_o(feats), theirs(x) + head_t(feats), **TOL[torch.float64])
    for (name, b_o), (_, b_t) in zip(ours.named_buffers(), theirs.named_buffers()):
        torch.testing.assert_close(b_o, b_t, **TOL[torch.float64], msg=name)


class _OptionalHead(nn.Module):
    """A discriminator whose auxiliary head only some forwards use."""

    def __init__(self):
        super().__init__()
        self.body = _small_discriminator()
        self.head = nn.Linear(3 * 8 * 8, 5)

    def forward(self, x, with_head):
        y = self.body(x)
        return y + self.head(x.flatten(1)).sum(1, keepdim=True) if with_head else y


class _MixedPrecision(nn.Module):
    """Layers of two dtypes in one model."""

    def __init__(self):
        super().__init__()
        self.wide = nn.Linear(6, 9).double()
        self.narrow = nn.Linear(9, 4)

    def forward(self, x, with_head=True):
        return self.narrow(self.wide(x.double()).float())


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
@pytest.mark.parametrize("make,shape", [(_OptionalHead, (2, 3, 8, 8)), (_MixedPrecision, (3, 6))])
def test_apply_spectral_norm_matches_torch_on_skipped_layers_and_mixed_dtypes(device, backend, make, shape):
    """A layer a forward skips keeps its u, v (torch's iterate only on use); layers of different
    dtypes iterate in separate groups."""
    theirs, ours = _sn_pair(None, device, backend, make)
    for with_head in (False, False, True, False):
        x = torch.randn(shape, device=device)
        with fastgan.use_backend(backend):
            out_o = ours(x, with_head)
        torch.testing.assert_close(out_o, theirs(x, with_head), **TOL[out_o.dtype])
        for (name, b_o), (_, b_t) in zip(ours.named_buffers(), theirs.named_buffers()):
            assert b_o.dtype == b_t.dtype
            torch.testing.assert_close(b_o, b_t, **TOL[b_t.dtype], msg=name)


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
def test_apply_spectral_norm_keeps_each_layers_own_iterations_and_eps(device, backend):
    """A layer given other settings after apply_spectral_norm (as torch's parametrization allows)
    iterates with its own: the grouped refresh used the first layer's for all of them."""
    theirs, ours = _sn_pair(torch.float64, device, backend, lambda: nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)))
    for model in (theirs, ours):
        model[2].parametrizations.weight[0].n_power_iterations = 4
        model[0].parametrizations.weight[0].eps = 0.5
    for _ in range(2):
        x = torch.randn(3, 6, device=device, dtype=torch.float64)
        with fastgan.use_backend(backend):
            out_o = ours(x)
        torch.testing.assert_close(out_o, theirs(x), rtol=1e-10, atol=1e-12)
        for (name, b_o), (_, b_t) in zip(ours.named_buffers(), theirs.named_buffers()):
            torch.testing.assert_close(b_o, b_t, rtol=1e-10, atol=1e-12, msg=name)


def test_spectral_norm_made_directly_checks_its_settings_as_torchs_does():
    weight = torch.randn(3, 4)
    with pytest.raises(IndexError, match="Dimension out of range"):
        fsn.SpectralNorm(weight, dim=5)
    with pytest.raises(IndexError, match="Dimension out of range"):
        fsn.SpectralNorm(weight, dim=-3)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="n_power_iterations to be positive"):
            fsn.SpectralNorm(weight, n_power_iterations=bad)
    with pytest.raises(TypeError, match=r"n_power_iterations must be an int, got 2.5 \(Linear"):
        fastgan.nn.spectral_norm(nn.Linear(4, 3), n_power_iterations=2.5)


def test_integer_settings_of_numpy_are_taken_as_torch_takes_them():
    """n_power_iterations and dim read from NumPy or a config loader (np.int64): torch's forms
    accept them, so do the drop-ins, as plain ints for the ops."""
    import numpy as np

    torch.manual_seed(3)
    theirs = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(5, 4), n_power_iterations=np.int64(2), dim=np.int64(0))
    torch.manual_seed(3)
    ours = fastgan.nn.spectral_norm(nn.Linear(5, 4), n_power_iterations=np.int64(2), dim=np.int64(0))
    sn = ours.parametrizations.weight[0]
    assert type(sn.n_power_iterations) is int and type(sn.dim) is int
    ours.load_state_dict(theirs.state_dict())
    torch.testing.assert_close(ours.weight, theirs.weight, rtol=1e-5, atol=1e-6)
    hooked = fastgan.nn.utils.spectral_norm(nn.Linear(5, 4), n_power_iterations=np.int32(3), dim=np.int64(-2))
    hook = next(h for h in hooked._forward_pre_hooks.values() if isinstance(h, fsn.HookSpectralNorm))
    assert (hook.n_power_iterations, hook.dim) == (3, -2) and type(hook.n_power_iterations) is type(hook.dim) is int
    hooked(torch.randn(2, 5))
    grouped = fastgan.nn.apply_spectral_norm(nn.Sequential(nn.Linear(5, 4)), n_power_iterations=np.int16(2))
    assert grouped(torch.randn(2, 5)).shape == (2, 4)
    with pytest.raises(TypeError, match=r"n_power_iterations must be an int, got True"):
        fastgan.nn.spectral_norm(nn.Linear(4, 3), n_power_iterations=True)
    with pytest.raises(TypeError, match=r"dim must be an int, got 0.0"):
        fastgan.nn.spectral_norm(nn.Linear(4, 3), dim=0.0)


def test_apply_spectral_norm_follows_a_conversion_and_layers_in_eval_mode():
    """After model.double() (new u, v buffers) and with one layer switched to eval mode, the grouped
    refresh still matches torch's: it reads the buffers where they are now, per mode."""
    theirs, ours = _sn_pair(torch.float32, "cpu", "reference")
    for model in (theirs, ours):
        model.double()
        model[0].eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    for _ in range(2):
        with fastgan.use_backend("reference"):
            torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
    for (name, b_o), (_, b_t) in zip(ours.named_buffers(), theirs.named_buffers()):
        assert b_o.dtype == torch.float64
        torch.testing.assert_close(b_o, b_t, **TOL[torch.float32], msg=name)


def test_apply_spectral_norm_state_dict_matches_torch():
    theirs, ours = _sn_pair(torch.float64, "cpu", "cpp")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float64])


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
@pytest.mark.parametrize("leave_parametrized", [True, False])
def test_apply_spectral_norm_after_removing_a_layers_parametrization(device, backend, leave_parametrized):
    """parametrize.remove_parametrizations on a layer of an apply_spectral_norm model leaves it a plain
    layer, as under torch's: the model's hook must not go on iterating its detached u, v (which
    model.float() no longer converts), whether the layer stays plain or gets spectral norm again."""
    theirs, ours = _sn_pair(torch.float64, device, backend)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, device=device)
    with fastgan.use_backend(backend):
        torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float64])
    for model, renormalize in ((theirs, torch.nn.utils.parametrizations.spectral_norm), (ours, fastgan.nn.spectral_norm)):
        parametrize.remove_parametrizations(model[0], "weight", leave_parametrized=leave_parametrized)
        parametrize.remove_parametrizations(model[4], "weight", leave_parametrized=leave_parametrized)
        torch.manual_seed(5)
        with fastgan.use_backend(backend):
            renormalize(model[4], n_power_iterations=2)
        model.float()
    for training in (True, True, False):
        x = torch.randn(2, 3, 8, 8, device=device)
        for model in (theirs, ours):
            model.train(training)
        with fastgan.use_backend(backend):
            torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float32])
        for (name, b_o), (_, b_t) in zip(ours.named_buffers(), theirs.named_buffers()):
            assert b_o.dtype == torch.float32
            torch.testing.assert_close(b_o, b_t, **TOL[torch.float32], msg=name)


def test_apply_spectral_norm_leaves_data_parallel_replicas_to_their_layers(monkeypatch):
    """nn.DataParallel's replicas share the model's forward hooks but hold replicated layers:
    the hook must not refresh the original layers from every replica's thread (work no replica
    uses, and captures from several threads on a GPU). A replica made as DataParallel makes it
    (_replicate_for_data_parallel, which needs no GPU) runs its layers' own iterations."""
    from fastgan.ops import spectral_norm as sn_ops

    theirs, ours = _sn_pair(torch.float64, "cpu", "reference")
    replica = ours._replicate_for_data_parallel()
    launches = []
    multi = sn_ops.power_iteration_multi
    monkeypatch.setattr(sn_ops, "power_iteration_multi", lambda *args, **kwargs: launches.append(1) or multi(*args, **kwargs))
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with fastgan.use_backend("reference"):
        torch.testing.assert_close(replica(x), theirs(x), **TOL[torch.float64])
    assert launches == []
    for (name, b_o), (_, b_t) in zip(ours.named_buffers(), theirs.named_buffers()):
        torch.testing.assert_close(b_o, b_t, **TOL[torch.float64], msg=name)


# ---------------------------------------------------------------- opcheck, gradcheck, compile


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
def test_opcheck(device, backend):
    dtype = torch.float64
    weight, u, v = _layer_inputs((7, 3, 2, 2), 0, dtype, device)
    w2, u2, v2 = _layer_inputs((3, 5, 3), 1, dtype, device)
    with fastgan.use_backend(backend):
        torch.library.opcheck(OPS.spectral_norm_power_iteration.default, (weight, u, v, 0, 2, 1e-12, True))
        torch.library.opcheck(OPS.spectral_norm_power_iteration.default, (w2, u2, v2, 1, 0, 1e-12, False))
        torch.library.opcheck(
            OPS.spectral_norm_power_iteration_multi.default, ([weight, w2], [u, u2], [v, v2], [0, 1], 1, 1e-12, True)
        )
    sigma = torch.dot(u, reference.weight_matrix(weight, 0) @ v)
    for normalize in NORMALIZE_OPS.values():
        torch.library.opcheck(normalize().default, (weight.requires_grad_(), u, v, sigma, 0))


def _cpp_normalize():
    fastgan._backend.extension()  # loads fastgan._C, raising when it is not built
    return torch.ops.fastgan_C.spectral_normalize


# W / σ: the Python op (the reference) and its C++ twin with C++ autograd, which the modules use.
NORMALIZE_OPS = {"python": lambda: OPS.spectral_normalize, "cpp": _cpp_normalize}


@pytest.mark.parametrize("impl", sorted(NORMALIZE_OPS))
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_gradcheck_normalize(dim, impl):
    weight, u, v = _layer_inputs((6, 4, 3), dim, torch.float64, "cpu")

    def normalize(w):
        sigma = torch.dot(u, reference.weight_matrix(w, dim % w.dim()) @ v).detach()
        return NORMALIZE_OPS[impl]()(w, u, v, sigma, dim)

    assert torch.autograd.gradcheck(normalize, (weight.requires_grad_(),))
    assert torch.autograd.gradgradcheck(normalize, (weight,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", [((7, 5, 3, 3), 0), ((5, 7, 4, 4), 1), ((9, 13), 0)])
def test_cpp_normalize_matches_python_to_second_order(shape, dim, dtype, device):
    weight, u, v = _layer_inputs(shape, dim, dtype, device)
    sigma = torch.dot(u.double(), reference.weight_matrix(weight.double(), dim) @ v.double()).to(dtype)
    grad, grad_grad = torch.randn_like(weight), torch.randn_like(weight)
    results = []
    for make in NORMALIZE_OPS.values():
        w = weight.clone().requires_grad_()
        out = make()(w, u, v, sigma, dim)
        (first,) = torch.autograd.grad(out, w, grad, create_graph=True)
        (second,) = torch.autograd.grad(first, w, grad_grad)
        results.append((out, first, second))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "make_weight",
    [
        lambda: torch.randn(517, 509),  # 1.05 MB, numel not a multiple of the vector width
        lambda: torch.randn(256, 128, 3, 3).to(memory_format=torch.channels_last),
        lambda: torch.randn(300, 1100)[:, 3:1003],  # not dense: the plain division
        lambda: torch.randn(64, 27),  # under 1 MiB: normal stores
    ],
    ids=["large-odd", "channels-last", "slice", "small"],
)
def test_cpp_normalize_forward_is_the_exact_division(make_weight, threads, one_torch_thread):
    # The CPU kernel writes large float32 outputs with streaming stores; every path must
    # give torch's own W / σ bit for bit, in W's memory layout.
    torch.set_num_threads(threads)
    weight = make_weight()
    u = torch.randn(weight.shape[0])
    v = torch.randn(weight[0].numel())
    sigma = torch.tensor(1.0) + torch.rand(())
    out = _cpp_normalize()(weight, u, v, sigma, 0)
    expected = weight / sigma
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert out.stride() == expected.stride()


def _cpp_normalize_backward():
    fastgan._backend.extension()
    return torch.ops.fastgan_C.spectral_normalize_backward


def _normalize_backward_inputs(shape, dim, dtype, device, layout):
    """(grad, weight, u, v, sigma) for the backward kernel; ``layout`` "contiguous" is what the
    fused kernels take, the others go to the ATen formula."""
    weight, u, v = _layer_inputs(shape, dim, dtype, device)
    grad = torch.randn_like(weight)
    sigma = (torch.rand((), device=device) + 0.5).to(dtype)
    if layout == "channels-last":
        weight, grad = (x.contiguous(memory_format=torch.channels_last) for x in (weight, grad))
    elif layout == "transposed-grad":
        grad = grad.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "float64-sigma":
        sigma = sigma.double()
    return grad, weight, u, v, sigma


# Odd shapes; (517, 509) spans several CPU chunks and CUDA blocks, (3, 17001) a long row.
BACKWARD_SHAPES = [((37, 3, 3, 3), 0), ((5, 11, 4, 4), 1), ((3, 7, 5), 2), ((517, 509), 0), ((3, 17001), 0)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,dim", BACKWARD_SHAPES)
def test_normalize_backward_kernel_matches_float64(shape, dim, dtype, device):
    """spectral_normalize's backward kernel (two passes over W) against the float64 formula."""
    grad, weight, u, v, sigma = _normalize_backward_inputs(shape, dim, dtype, device, "contiguous")
    got = _cpp_normalize_backward()(grad, weight, u, v, sigma, dim)
    expected = reference.normalize_weight_backward(*(x.double() for x in (grad, weight, u, v, sigma)), dim)
    assert got.dtype == dtype and got.stride() == grad.stride()
    torch.testing.assert_close(got.double(), expected, **TOL[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["channels-last", "transposed-grad", "float64-sigma"])
def test_normalize_backward_other_layouts_take_the_aten_formula(layout, device):
    shape = (6, 5, 3, 3) if layout == "channels-last" else (9, 13)
    grad, weight, u, v, sigma = _normalize_backward_inputs(shape, 0, torch.float32, device, layout)
    got = _cpp_normalize_backward()(grad, weight, u, v, sigma, 0)
    expected = reference.normalize_weight_backward(*(x.double() for x in (grad, weight, u, v, sigma)), 0)
    assert got.stride() == grad.stride()
    torch.testing.assert_close(got.double(), expected, **TOL[torch.float32])


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_backward_kernel_is_deterministic(device, one_torch_thread):
    """<grad, W> is summed in a fixed order: the same bits for any thread count (CPU) and run."""
    grad, weight, u, v, sigma = _normalize_backward_inputs((517, 509), 0, torch.float32, device, "contiguous")
    results = []
    for threads in (1, 2, 1):
        torch.set_num_threads(threads)
        results.append(_cpp_normalize_backward()(grad, weight, u, v, sigma, 0))
    assert all(torch.equal(r, results[0]) for r in results[1:])


@pytest.mark.parametrize("device", DEVICES)
def test_normalize_backward_opcheck_and_errors(device):
    grad, weight, u, v, sigma = _normalize_backward_inputs((7, 3, 2, 2), 0, torch.float64, device, "contiguous")
    op = _cpp_normalize_backward()
    torch.library.opcheck(op.default, (grad, weight, u, v, sigma, 0))
    with pytest.raises(RuntimeError, match="grad .* must match the weight's shape"):
        op(grad[:-1], weight, u, v, sigma, 0)
    with pytest.raises(RuntimeError, match="do not fit a weight"):
        op(grad, weight, u[:-1], v, sigma, 0)
    if device != "cpu":  # a kernel must not read another device's memory
        with pytest.raises(RuntimeError, match="must be on the weight's device"):
            op(grad, weight, u.cpu(), v, sigma, 0)


def test_layer_backward_runs_the_kernel_and_its_double_backward_the_formula():
    """A first-order backward of the C++ W / σ goes through spectral_normalize_backward; a
    create_graph backward keeps the differentiable ATen formula (gradgradcheck: test_gradcheck_normalize)."""
    weight, u, v = _layer_inputs((6, 4, 3), 0, torch.float64, "cpu")
    sigma = torch.dot(u, reference.weight_matrix(weight, 0) @ v)
    grad = torch.randn_like(weight)
    results = {}
    for create_graph in (False, True):
        w = weight.clone().requires_grad_()
        out = _cpp_normalize()(w, u, v, sigma, 0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            (results[create_graph],) = torch.autograd.grad(out, w, grad, create_graph=create_graph)
        ran = {event.name for event in profiler.events()}
        assert ("fastgan_C::spectral_normalize_backward" in ran) == (not create_graph), sorted(ran)
    assert results[True].requires_grad
    torch.testing.assert_close(results[False], results[True].detach(), **TOL[torch.float64])


def _fused():
    fastgan._backend.extension()
    return torch.ops.fastgan_C.spectral_norm_weight


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("steps,u_first", [(1, True), (3, False), (0, True)])
@pytest.mark.parametrize("shape,dim", [((37, 3, 3, 3), 0), ((5, 11, 4, 4), 1), ((600, 1200), 0)])
def test_fused_layer_forward_is_the_ops_one_by_one(shape, dim, steps, u_first, dtype, device):
    # The modules' one-call forward against the ops it composes: same W / σ and buffer
    # updates, bit for bit; each one's gradient against the float64 formula (the C++ backward is
    # the fused spectral_normalize_backward kernel, the Python op's the reference formula).
    weight, u, v = _layer_inputs(shape, dim, dtype, device)
    # A random cotangent: all ones (as before) cannot tell a backward that reads it in the wrong
    # order (a transposed or permuted layout) from a right one.
    cotangent = torch.randn_like(weight)
    results = []
    for fused in (True, False):
        w, u_buf, v_buf = weight.clone().requires_grad_(), u.clone(), v.clone()
        if fused:
            out = _fused()(w, u_buf, v_buf, dim, steps, 1e-12, u_first)
        else:
            with torch.no_grad():
                u_new, v_new, sigma = OPS.spectral_norm_power_iteration(w.detach(), u_buf, v_buf, dim, steps, 1e-12, u_first)
            if steps:
                u_buf.copy_(u_new)
                v_buf.copy_(v_new)
            out = OPS.spectral_normalize(w, u_new, v_new, sigma, dim)
        (grad,) = torch.autograd.grad(out, w, cotangent)
        results.append((out, u_buf, v_buf, grad))
    for ours, theirs in zip(results[0][:3], results[1][:3]):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # G / σ − (⟨G, W⟩ / σ²) u vᵀ with the u, v, σ the forward used. With steps = 0 the random u, v
    # give a small σ, whose two terms then nearly cancel: the error is measured against the larger
    # term, not the difference (float32 rounding of ⟨G, W⟩ / σ² alone is ~1e-7 of it).
    g64, w64, u64, v64 = (x.double() for x in (cotangent, weight, u_new, v_new))
    sigma64 = sigma.double()
    expected = reference.normalize_weight_backward(g64, w64, u64, v64, sigma64, dim)
    scale = float(g64.abs().max() / sigma64.abs() + (g64 * w64).sum().abs() / sigma64**2 * u64.abs().max() * v64.abs().max())
    for grad in (results[0][3], results[1][3]):
        torch.testing.assert_close(grad.double() / scale, expected / scale, rtol=0, atol=TOL[dtype]["atol"])
    if steps == 0:
        assert torch.equal(results[0][1], u) and torch.equal(results[0][2], v)


def test_fused_layer_forward_opcheck_and_gradcheck():
    weight, u, v = _layer_inputs((7, 3, 2, 2), 0, torch.float64, "cpu")
    torch.library.opcheck(_fused().default, (weight.requires_grad_(), u, v, 0, 1, 1e-12, True))
    fixed_u, fixed_v = u.clone(), v.clone()

    def forward(w):  # from the same u, v every time, so the numerical Jacobian sees one function
        return _fused()(w, fixed_u.clone(), fixed_v.clone(), 0, 0, 1e-12, True)

    assert torch.autograd.gradcheck(forward, (weight,))
    assert torch.autograd.gradgradcheck(forward, (weight,))


@pytest.mark.parametrize("form", ["per-layer", "apply"])
def test_drop_ins_under_function_transforms(form):
    # jacrev / vmap / jvp cannot run C++ autograd functions: the modules take the registered
    # ops there (eval mode: no power iteration, as a transformed forward should be).
    theirs, ours = _sn_pair(torch.float64, "cpu", None)
    if form == "per-layer":
        ours = _small_discriminator().double()
        for m in ours.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                fastgan.nn.spectral_norm(m)
    ours.load_state_dict(theirs.state_dict())
    theirs.eval(), ours.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    single = lambda model: (lambda xi: model(xi[None])[0])
    torch.testing.assert_close(torch.func.vmap(single(ours))(x), torch.func.vmap(single(theirs))(x), **TOL[torch.float64])
    torch.testing.assert_close(torch.func.jacrev(single(ours))(x[0]), torch.func.jacrev(single(theirs))(x[0]), **TOL[torch.float64])
    tangent = torch.randn_like(x)
    torch.testing.assert_close(
        torch.func.jvp(ours, (x,), (tangent,))[1], torch.func.jvp(theirs, (x,), (tangent,))[1], **TOL[torch.float64]
    )
    # with respect to the parameters: W / σ in plain torch ops there, σ's value from the op
    def parameter_gradients(model):
        loss = lambda params: torch.func.functional_call(model, params, (x,)).pow(2).sum()  # noqa: E731
        return torch.func.grad(loss)(dict(model.named_parameters()))

    theirs_grads = parameter_gradients(theirs)
    for name, grad in parameter_gradients(ours).items():
        torch.testing.assert_close(grad, theirs_grads[name], **TOL[torch.float64], msg=name)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_sigma_with_a_gradient_is_refused_not_dropped(backend):
    """spectral_normalize differentiates σ as uᵀ W v through W and gives sigma no gradient, so a
    sigma that requires grad would lose it silently: every way in refuses it."""
    weight, u, v = torch.randn(4, 3), torch.randn(4), torch.randn(3)
    sigma = torch.tensor(2.0, requires_grad=True)
    calls = [lambda: torch.ops.fastgan.spectral_normalize(weight, u, v, sigma, 0),
             lambda: fsn.ops.normalize(weight, u, v, sigma, 0),
             lambda: torch.func.vmap(lambda w: fsn.ops.normalize(w, u, v, sigma, 0))(weight[None])]
    if backend == "cpp":
        calls.append(lambda: torch.ops.fastgan_C.spectral_normalize(weight, u, v, sigma, 0))
    with fastgan.use_backend(backend):
        for call in calls:
            with pytest.raises(ValueError, match="sigma requires grad.*sigma.detach"):
                call()
        with torch.no_grad():  # no graph, nothing dropped
            torch.testing.assert_close(fsn.ops.normalize(weight, u, v, sigma, 0), weight / 2)


def test_modules_make_one_call_per_layer_for_contiguous_weights(monkeypatch):
    calls = []
    one_by_one = fsn.ops.power_iteration
    monkeypatch.setattr(fsn.ops, "power_iteration", lambda *a: calls.append(1) or one_by_one(*a))
    layer = fastgan.nn.spectral_norm(nn.Conv2d(3, 8, 3))
    layer.weight
    assert calls == []  # the fused C++ call
    layer.parametrizations.weight.original.data = layer.parametrizations.weight.original.data.to(
        memory_format=torch.channels_last
    )
    layer.weight
    assert calls == [1]  # channels-last: the ops one by one, reading W in place
    with fastgan.use_backend("reference"):
        layer.parametrizations.weight.original.data = layer.parametrizations.weight.original.data.contiguous()
        layer.weight
    assert calls == [1, 1]


def test_modules_run_the_cpp_normalize_on_cpu():
    assert fastgan.backends()["ops"]["spectral_normalize"]["cpu"]["runs"] == "cpp"
    if torch.cuda.is_available():
        assert fastgan.backends()["ops"]["spectral_normalize"]["cuda"]["runs"] == "cuda"
    with fastgan.use_backend("reference"):
        assert fastgan.backends()["ops"]["spectral_normalize"]["cpu"]["runs"] == "reference"


def test_gradcheck_module_in_eval_mode():
    layer = fastgan.nn.spectral_norm(nn.Conv2d(3, 5, 3).double()).eval()
    parametrization = layer.parametrizations.weight[0]
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(parametrization, (weight,))


def _per_layer_spectral_norm(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            fastgan.nn.spectral_norm(m)
    return model


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("apply", [_per_layer_spectral_norm, fastgan.nn.apply_spectral_norm])
def test_compile_fullgraph_matches_eager_without_warnings(apply, device):
    """Compiled (fullgraph) equals eager; tracing the backend choice raises no warning (dynamo
    warned of every lru_cache-wrapped call it traced, on every compile of an apply_spectral_norm model).
    On a GPU the layers' forwards also ask whether their refresh can be captured (answered
    before any query dynamo cannot trace)."""
    torch.manual_seed(5)
    torch._dynamo.reset()  # a fresh compile, whatever earlier tests compiled
    eager = apply(_small_discriminator().double().to(device))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    for _ in range(2):
        x = torch.randn(3, 3, 8, 8, dtype=torch.float64, device=device)
        out_e = eager(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            # torch 2.11's inductor imports torch.utils.mkldnn at its first compile, whose
            # torch.jit.script_method warns DeprecationWarning: torch's own, not the tracing's
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.")
            out_c = compiled(x)
        torch.testing.assert_close(out_c, out_e, **TOL[torch.float64])
        out_e.square().sum().backward()
        out_c.square().sum().backward()
    for (name, p_e), (_, p_c) in zip(eager.named_parameters(), compiled_model.named_parameters()):
        torch.testing.assert_close(p_c.grad, p_e.grad, **TOL[torch.float64], msg=name)
    for (name, b_e), (_, b_c) in zip(eager.named_buffers(), compiled_model.named_buffers()):
        torch.testing.assert_close(b_c, b_e, **TOL[torch.float64], msg=name)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("apply", [fastgan.nn.spectral_norm, fastgan.nn.utils.spectral_norm])
def test_bad_layers_get_errors_naming_them(apply):
    with pytest.raises(ValueError, match=r"BatchNorm1d\.weight.*at least 2 dimensions"):
        apply(nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"Linear\.weight.*zero-size"):
        apply(nn.Linear(0, 3))
    layer = nn.Linear(4, 3)
    layer.weight = nn.Parameter(torch.ones(3, 4, dtype=torch.int64), requires_grad=False)
    with pytest.raises(TypeError, match=r"Linear\.weight.*floating-point"):
        apply(layer)
    with pytest.raises(ValueError, match=r"Linear\.bogus"):
        apply(nn.Linear(4, 3), name="bogus")


def test_apply_spectral_norm_names_the_bad_layer():
    model = nn.Sequential(nn.Linear(4, 3), nn.Sequential(nn.Linear(0, 2)))
    with pytest.raises(ValueError, match=r"1\.0\.weight.*zero-size"):
        fastgan.nn.apply_spectral_norm(model)


def test_apply_spectral_norm_refusing_a_layer_leaves_the_model_unchanged():
    """Retried after the fix (the dummy forward the message asks for), it normalizes every layer."""
    model = nn.Sequential(nn.Linear(4, 3), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"1\.weight\)$"):
        fastgan.nn.apply_spectral_norm(model)
    assert not parametrize.is_parametrized(model[0]) and not model._forward_pre_hooks
    model(torch.randn(1, 4))
    fastgan.nn.apply_spectral_norm(model)
    (hook,) = model._forward_pre_hooks.values()
    assert len(hook.params) == 2


def test_apply_spectral_norm_twice_says_so():
    model = fastgan.nn.apply_spectral_norm(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match=r"parametrized already \(0\.weight, 2\.weight\): was spectral norm applied twice"):
        fastgan.nn.apply_spectral_norm(model)


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
def test_ops_reject_bad_vectors(device, backend):
    weight, u, v = _layer_inputs((6, 4), 0, torch.float32, device)
    with fastgan.use_backend(backend):
        with pytest.raises(ValueError, match=r"u must have shape \(6,\)"):
            OPS.spectral_norm_power_iteration(weight, u[:5], v, 0, 1, 1e-12, True)
        with pytest.raises(ValueError, match=r"v must have shape \(4,\)"):
            OPS.spectral_norm_power_iteration(weight, u, v.repeat(2), 0, 1, 1e-12, True)
        with pytest.raises(ValueError, match=r"at least 2 dimensions"):
            OPS.spectral_norm_power_iteration(weight[0], u, v, 0, 1, 1e-12, True)
        with pytest.raises(TypeError, match=r"u is torch.float64"):
            OPS.spectral_norm_power_iteration(weight, u.double(), v, 0, 1, 1e-12, True)
        with pytest.raises(ValueError, match=r"layer 1 .*v must have shape"):
            OPS.spectral_norm_power_iteration_multi([weight, weight], [u, u], [v, v[:3]], [0, 0], 1, 1e-12, True)
        with pytest.raises(ValueError, match="n_power_iterations must be >= 0"):
            OPS.spectral_norm_power_iteration(weight, u, v, 0, -1, 1e-12, True)
        with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
            OPS.spectral_norm_power_iteration(weight, u, v, 0, 1, -1.0, True)


def test_normalize_op_checks_sigma_u_and_v_as_the_extension_does():
    """torch.ops.fastgan.spectral_normalize (plain torch) and its fake refuse what the C++ op refuses."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    weight, u, v = _layer_inputs((6, 4), 0, torch.float32, "cpu")
    sigma = torch.tensor(2.5)
    bad = [((weight, u, v, sigma.reshape(1), 0), "sigma must be a 0-d tensor"),
           ((weight, u[:5], v, sigma, 0), r"u \(5,\) and v \(4,\) do not fit"),
           ((weight, u, v[:, None], sigma, 0), "do not fit"),
           ((weight, u, v, sigma, 2), "dim=2 is out of range")]
    for args, message in bad:
        with pytest.raises((ValueError, IndexError), match=message):
            OPS.spectral_normalize(*args)
        with FakeTensorMode() as mode, pytest.raises((ValueError, IndexError), match=message):
            OPS.spectral_normalize(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))


def test_eps_zero_is_accepted_as_torch_accepts_it():
    torch.manual_seed(8)
    theirs = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(7, 5).double(), eps=0.0)
    torch.manual_seed(8)
    ours = fastgan.nn.spectral_norm(nn.Linear(7, 5).double(), eps=0.0)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 7, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(ours(x), theirs(x), **TOL[torch.float64])


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("u_first", [True, False])
def test_a_nan_weight_gives_nan_u_and_v_as_torch_does(device, backend, u_first):
    """One NaN weight makes the norms NaN, and F.normalize's max(norm, eps) keeps NaN: u and v
    come back all NaN. A NaN norm clamped to eps instead (fmax, Triton's default maximum)
    gave u or v finite entries scaled by 1/eps beside the NaN."""
    weight, u, v = _layer_inputs((5, 7), 0, torch.float64, device)
    weight[2, 3] = float("nan")
    expected = reference.power_iteration(weight, u, v, 0, 1, 1e-12, u_first)
    with fastgan.use_backend(backend):
        got = OPS.spectral_norm_power_iteration(weight, u, v, 0, 1, 1e-12, u_first)
    for a, e in zip(got, expected):
        assert e.isnan().all()
        torch.testing.assert_close(a, e, equal_nan=True)


_BAD_CALLS_TO_THE_EXTENSION = """
import torch, fastgan._backend
extension = fastgan._backend.extension()
ops = torch.ops.fastgan_C
for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() and extension.built_with_cuda() else []):
    weight, u, v = torch.randn(6, 4, device=device), torch.randn(6, device=device), torch.randn(4, device=device)
    sigma = torch.tensor(2.0, device=device)
    # v one element too long for a weight of 2**32 rows: rows * len(v) overflowed int64 and wrapped
    # to the weight's size, so the check let it through (stride-0 views: no memory behind them).
    tall, u_tall, v_long = (torch.ones(1, device=device).expand(n) for n in (2**32, 2**32, 2**32 + 1))
    # A zero-size weight: the CPU backward divided by its rows' length, 0 (SIGFPE).
    empty = weight[:, :0]
    for op, args, message in (
        (ops.spectral_norm_power_iteration, (weight, u[:2], v, 0, 1, 1e-12, True), "u must have shape"),
        (ops.spectral_norm_power_iteration, (weight[0], u, v, 0, 1, 1e-12, True), "needs a weight with >= 2 dims"),
        (ops.spectral_norm_power_iteration, (weight, u, v, 0, 1, -1e-12, True), "eps must be a finite number >= 0"),
        (ops.spectral_norm_power_iteration, (weight, u, v, 0, 1, float("nan"), True), "eps must be a finite number >= 0"),
        (ops.spectral_normalize, (tall.unsqueeze(1), u_tall, v_long, sigma, 0), "do not fit a weight"),
        (ops.spectral_normalize_backward, (empty, empty, u, v[:0], sigma, 0), "zero-size weight"),
        (ops.spectral_normalize, (empty, u, v[:0], sigma, 0), "zero-size weight"),
    ):
        try:
            op(*args)
        except RuntimeError as error:
            assert message in str(error), error
        else:
            raise AssertionError(f"no error from {op} on {device}: expected {message!r}")
    print(device, "ok")
"""


def test_extension_checks_its_own_inputs():
    """Calling the C++ library directly with bad shapes raises (a C++ exception crossing into
    Python), never crashes. In a child process: a build whose exceptions cannot unwind took
    the whole test process down on the GPU machine (SIGSEGV), so the failure says that."""
    fastgan._backend.extension()
    child = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _BAD_CALLS_TO_THE_EXTENSION],
                           capture_output=True, text=True, timeout=300)
    crashed = f"killed by signal {-child.returncode}" if child.returncode < 0 else f"exit status {child.returncode}"
    assert child.returncode == 0, f"{crashed}:\n{child.stdout}{child.stderr[-3000:]}"
    assert child.stdout.startswith("cpu ok")

def test_the_discriminator_example_runs():
    """examples/spectral_norm_discriminator.py, two steps on the CPU: it trains torch's and
    fastgan's SN discriminators side by side and reports how far apart they end up."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "spectral_norm_discriminator.py"
    done = subprocess.run([sys.executable, str(path), "--steps", "2", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    difference = next(line for line in done.stdout.splitlines() if line.startswith("largest difference"))
    assert float(difference.split()[-1]) < 1e-3, done.stdout
    assert "estimated sigma per layer" in done.stdout
