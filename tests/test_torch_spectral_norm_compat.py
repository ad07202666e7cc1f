"""PyTorch's own spectral-norm tests, restated for fastgan's drop-ins.

PyTorch checks its two spectral-norm forms in test/nn/test_parametrization.py
(the parametrization, ``torch.nn.utils.parametrizations.spectral_norm``) and in
test/test_nn.py (the hook form, ``torch.nn.utils.spectral_norm``). The checks below
cover the same ground -- registration layout, training and eval behaviour, removal,
gradients through one and several forwards (gradcheck), state_dict loading including
torch's version-None hook checkpoints, ``dim`` for ConvTranspose, the naive forward
formula, the value on a diagonal matrix (real and complex), pickling -- run against
``fastgan.nn.spectral_norm`` and ``fastgan.nn.utils.spectral_norm``, and where it is
cheap also against a torch twin built from the same seed.

Every remaining difference from torch is documented in the README ("Differences
from torch") and pinned by a test in the last section here:

* 1-D weights (e.g. a bias) are rejected where torch normalizes the vector;
* the hook form rejects complex weights (torch's hook form transposes without
  conjugating, so what it computes is not the spectral norm of a complex matrix).

Not restated: torch's DataParallel variants (they need two GPUs; fastgan updates
u and v in place exactly as torch does, which is what DataParallel relies on) and
TorchScript.
"""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck
from torch.nn.utils import parametrize

import fastgan

PARAMETRIZATION = fastgan.nn.spectral_norm
HOOK = fastgan.nn.utils.spectral_norm
TOL64 = dict(rtol=1e-10, atol=1e-12)


@pytest.fixture(params=[False, True], ids=["assign", "swap"])
def conversion(request):
    """torch runs these tests with both module-conversion modes (``torch.__future__``);
    modules here are converted with ``.to(float64)`` so the mode matters."""
    before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(request.param)
    yield request.param
    torch.__future__.set_swap_module_params_on_conversion(before)


# ---------------------------------------------------------------- parametrization form


def _check_eval_and_mixed_forwards(m, x, u, v):
    """Both forms: eval returns the last training result and iterates no further (buffers u, v
    untouched); gradients flow through training and eval forwards mixed in one graph."""
    m(x)
    last_train = m(x)
    last_u, last_v = u.clone(), v.clone()
    m.eval()
    eval_out = m(x)
    torch.testing.assert_close(eval_out, last_train, **TOL64)
    torch.testing.assert_close(m(x), eval_out, rtol=0, atol=0)
    assert torch.equal(u, last_u) and torch.equal(v, last_v)

    def mixed_forwards(inp):
        u.data.copy_(last_u)
        v.data.copy_(last_v)
        outs = []
        for training in (True, False, True, False):
            m.train(training)
            outs.append(m(inp))
        return sum(outs)

    assert gradcheck(mixed_forwards, (x.clone().requires_grad_(),))


def test_parametrization_layout():
    m = PARAMETRIZATION(nn.Linear(5, 7).double())
    sn = m.parametrizations.weight[0]
    assert sn._u.shape == (m.weight.shape[0],)
    assert "original" in m.parametrizations.weight._parameters
    assert "_u" in sn._buffers and "_v" in sn._buffers
    assert "weight" not in m._parameters and "weight" not in m._buffers
    original = m.parametrizations.weight.original
    assert original.shape == m.weight.shape and original.stride() == m.weight.stride()


def test_parametrization_removal_and_stacking():
    """Removing gives back a plain parameter; SN can be registered twice on one weight
    (a stack of two), and on two parameters of one module, removable independently."""
    m = PARAMETRIZATION(nn.Linear(5, 7).double())
    m = parametrize.remove_parametrizations(m, "weight")
    assert not hasattr(m, "parametrizations") and "weight" in m._parameters

    torch.manual_seed(3)
    base = nn.Linear(6, 4).double()
    base.extra = nn.Parameter(torch.randn(3, 5, dtype=torch.float64))
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    for model, sn in ((theirs, torch.nn.utils.parametrizations.spectral_norm), (ours, PARAMETRIZATION)):
        torch.manual_seed(4)
        sn(model, "weight")
        sn(model, "weight")
        sn(model, "extra")
    assert len(ours.parametrizations.weight) == 2
    x = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **TOL64)
    torch.testing.assert_close(ours.extra, theirs.extra, **TOL64)

    ours = parametrize.remove_parametrizations(ours, "extra")
    assert "extra" in ours._parameters and parametrize.is_parametrized(ours, "weight")
    ours = parametrize.remove_parametrizations(ours, "weight")
    assert not hasattr(ours, "parametrizations") and not parametrize.is_parametrized(ours)


def _parametrized_linear(requires_grad):
    m = nn.Linear(3, 4).to(torch.float64)
    m.weight.requires_grad_(requires_grad)
    m = PARAMETRIZATION(m)
    return m, m.parametrizations.weight[0]


@pytest.mark.parametrize("requires_grad", [True, False])
def test_parametrization_training_eval_and_removal(conversion, requires_grad):
    x = torch.randn(2, 3, dtype=torch.float64)

    # training: an optimizer step, then a forward moves u and v; gradients reach the original
    m, sn = _parametrized_linear(requires_grad)
    u0, v0 = sn._u.clone(), sn._v.clone()
    if requires_grad:
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(x).sum().backward()
        opt.step()
    out = m(x)
    if requires_grad:
        assert not torch.equal(u0, sn._u) and not torch.equal(v0, sn._v)
        torch.autograd.grad(out.sum(), m.parametrizations.weight.original)

    # two training forwards in one graph, u and v reset before each evaluation
    saved_u, saved_v = sn._u.clone(), sn._v.clone()

    def two_forwards(inp):
        sn._u.data.copy_(saved_u)
        sn._v.data.copy_(saved_v)
        return m(inp) + m(inp)

    two_forwards(x.clone().requires_grad_()).sum().backward()
    assert gradcheck(two_forwards, (x.clone().requires_grad_(),), check_batched_grad=False)

    # removal in eval mode keeps the function (after 1 and after 3 training forwards)
    for forwards in (1, 3):
        m, _ = _parametrized_linear(requires_grad)
        for _ in range(forwards):
            before = m(x).detach()
        m.eval()
        m = parametrize.remove_parametrizations(m, "weight")
        torch.testing.assert_close(m(x), before, **TOL64)

    # eval: the last training result, and no further iteration
    m, sn = _parametrized_linear(requires_grad)
    _check_eval_and_mixed_forwards(m, x, sn._u, sn._v)
    if requires_grad:  # and to the original weight in eval mode
        m.eval()
        assert gradcheck(lambda w: m(x), (m.parametrizations.weight.original,))


@pytest.mark.parametrize("forwards_before_saving", [0, 3])
def test_parametrization_state_dict(forwards_before_saving):
    x = torch.randn(2, 3)
    m = PARAMETRIZATION(nn.Linear(3, 5))
    for _ in range(forwards_before_saving):
        m(x)
    state = copy.deepcopy(m.state_dict())
    assert set(state) == {"parametrizations.weight.original", "bias", "parametrizations.weight.0._u", "parametrizations.weight.0._v"}

    # strict loading refuses an unknown key; non-strict loading tolerates it and any missing key
    loose = copy.deepcopy(state)
    loose["nonsense"] = "nonsense"
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "nonsense"'):
        m.load_state_dict(loose, strict=True)
    m.load_state_dict(loose, strict=False)
    for key in ("parametrizations.weight.original", "parametrizations.weight.0._u", "parametrizations.weight.0._v"):
        del loose[key]
        m.load_state_dict(loose, strict=False)
    loose["weight"] = m.weight.detach().clone()
    m.load_state_dict(loose, strict=False)
    del loose._metadata["parametrizations.weight.0"]
    m.load_state_dict(loose, strict=False)
    del loose["weight"], loose["bias"]
    m.load_state_dict(loose, strict=False)

    # a freshly re-wrapped module that loads the state reproduces eval / train / train / eval
    def replay(module):
        outs = []
        with torch.no_grad():
            for training in (False, True, True, False):
                module.train(training)
                outs.append(module(x))
        return outs

    m = PARAMETRIZATION(parametrize.remove_parametrizations(m, "weight"))
    m.load_state_dict(state)
    expected = replay(m)
    m = PARAMETRIZATION(parametrize.remove_parametrizations(m, "weight"))
    m.load_state_dict(state)
    for got, want in zip(replay(m), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # ... and those are torch's from the same state: the replays above only agree with each other,
    # which a train / eval forward both got wrong in the same way would too
    theirs = torch.nn.utils.parametrizations.spectral_norm(nn.Linear(3, 5))
    theirs.load_state_dict(state)
    for got, want in zip(expected, replay(theirs)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_parametrization_dim_for_conv_transpose():
    m = PARAMETRIZATION(nn.ConvTranspose2d(3, 4, (5, 6)))
    m(torch.randn(2, 3, 10, 12))
    assert m.parametrizations.weight[0]._u.shape == m.parametrizations.weight.original[0, :, 0, 0].shape


def test_parametrization_forward_is_the_naive_formula():
    m = PARAMETRIZATION(nn.Linear(5, 7).double())
    x = torch.randn(3, 5, dtype=torch.float64)
    w = m.parametrizations.weight.original.detach().clone()
    v = m.parametrizations.weight[0]._v.clone()
    u = F.normalize(w @ v, dim=0, eps=1e-12)
    v = F.normalize(w.t() @ u, dim=0, eps=1e-12)
    expected = F.linear(x, w / torch.dot(u, w @ v), m.bias)
    torch.testing.assert_close(m(x), expected, **TOL64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_parametrization_value_on_a_diagonal_matrix(dtype):
    """σ of a diagonal matrix is its largest |entry|, complex entries included."""
    m = nn.Linear(2, 2, dtype=dtype)
    with torch.no_grad():
        diagonal = torch.diagonal(m.weight).clone()
        m.weight = nn.Parameter(torch.diag(diagonal))
    PARAMETRIZATION(m)
    torch.testing.assert_close(m.weight.data, torch.diag(diagonal / diagonal.abs().max()))


def test_parametrization_assignment_stores_the_value():
    """``m.weight = t`` goes through right_inverse: t becomes the original, as in torch."""
    torch.manual_seed(5)
    base = nn.Conv2d(3, 5, 3).double()
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(6)
    torch.nn.utils.parametrizations.spectral_norm(theirs)
    torch.manual_seed(6)
    PARAMETRIZATION(ours)
    value = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    theirs.weight = value
    ours.weight = value
    assert torch.equal(ours.parametrizations.weight.original, value)
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), **TOL64)
    with pytest.raises(ValueError, match=r"cannot assign a weight of shape \(5, 3, 2, 2\).*5x27"):  # torch fails later, at the forward
        ours.weight = torch.randn(5, 3, 2, 2, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.complex128, torch.complex64])
@pytest.mark.parametrize("make", [lambda dt: nn.Linear(6, 5, dtype=dt), lambda dt: nn.Conv2d(2, 3, 3, dtype=dt)], ids=["linear", "conv"])
def test_parametrization_complex_weights_match_torch(dtype, make):
    """Complex weights: same u, v, output and gradient as torch's parametrization, step by step."""
    torch.manual_seed(7)
    base = make(dtype)
    theirs, ours = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(8)
    torch.nn.utils.parametrizations.spectral_norm(theirs)
    torch.manual_seed(8)
    PARAMETRIZATION(ours)
    x = torch.randn((3, 6) if isinstance(base, nn.Linear) else (2, 2, 6, 5), dtype=dtype)
    tol = TOL64 if dtype == torch.complex128 else dict(rtol=1e-5, atol=1e-6)
    for training in (True, True, False):
        theirs.train(training)
        ours.train(training)
        out_t, out_o = theirs(x), ours(x)
        torch.testing.assert_close(out_o, out_t, **tol)
        for a, b in zip((ours.parametrizations.weight[0]._u, ours.parametrizations.weight[0]._v),
                        (theirs.parametrizations.weight[0]._u, theirs.parametrizations.weight[0]._v)):
            torch.testing.assert_close(a, b, **tol)
        g_t, = torch.autograd.grad(out_t.abs().sum(), theirs.parametrizations.weight.original)
        g_o, = torch.autograd.grad(out_o.abs().sum(), ours.parametrizations.weight.original)
        torch.testing.assert_close(g_o, g_t, **tol)
    # the normalized weight's largest singular value is 1 once the iteration has converged
    ours.train()
    for _ in range(50):
        ours(x)
    ours.eval()
    sigma = torch.linalg.matrix_norm(ours.weight.detach().flatten(1), ord=2)
    torch.testing.assert_close(sigma, torch.ones_like(sigma), rtol=1e-4, atol=0)


def test_apply_spectral_norm_with_a_complex_layer():
    """A complex layer in apply_spectral_norm iterates on its own (the grouped launch is real-only)."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 6, dtype=torch.complex128), nn.Linear(6, 3, dtype=torch.complex128))
    theirs = copy.deepcopy(model)
    torch.manual_seed(10)
    fastgan.nn.apply_spectral_norm(model)
    torch.manual_seed(10)
    for layer in theirs:
        torch.nn.utils.parametrizations.spectral_norm(layer)
    x = torch.randn(2, 4, dtype=torch.complex128)
    for _ in range(2):
        torch.testing.assert_close(model(x), theirs(x), **TOL64)


# ---------------------------------------------------------------- hook form


def test_hook_layout_and_removal():
    m = HOOK(nn.Linear(5, 7))
    assert m.weight_u.shape == (m.weight.shape[0],)
    assert "weight_orig" in m._parameters
    assert "weight_u" in m._buffers and "weight_v" in m._buffers
    assert "weight" not in m._buffers and "weight" not in m._parameters
    assert m.weight_orig.untyped_storage().data_ptr() == m.weight.untyped_storage().data_ptr()
    assert m.weight_orig.shape == m.weight.shape and m.weight_orig.stride() == m.weight.stride()

    m = fastgan.nn.utils.remove_spectral_norm(m)
    assert not hasattr(m, "weight_orig") and not hasattr(m, "weight_u")
    assert "weight" in m._parameters


@pytest.mark.parametrize("first", [HOOK, torch.nn.utils.spectral_norm], ids=["fastgan-first", "torch-first"])
def test_hook_registered_twice_raises_torchs_message(first):
    m = first(nn.Linear(5, 7))
    with pytest.raises(RuntimeError, match="^Cannot register two spectral_norm hooks on the same parameter weight"):
        HOOK(m)


def _hooked_linear(requires_grad):
    m = nn.Linear(3, 4).to(torch.float64)
    m.weight.requires_grad_(requires_grad)
    return HOOK(m)


@pytest.mark.parametrize("requires_grad", [True, False])
def test_hook_training_eval_and_removal(conversion, requires_grad):
    x = torch.randn(2, 3, dtype=torch.float64)
    m = _hooked_linear(requires_grad)
    u0, v0 = m.weight_u.clone(), m.weight_v.clone()
    out = m(x)
    assert not torch.equal(u0, m.weight_u) and not torch.equal(v0, m.weight_v)
    if requires_grad:
        torch.autograd.grad(out.sum(), m.weight_orig)

    saved_u, saved_v = m.weight_u.clone(), m.weight_v.clone()

    def two_forwards(inp):
        m.weight_u.data.copy_(saved_u)
        m.weight_v.data.copy_(saved_v)
        return m(inp) + m(inp)

    assert gradcheck(two_forwards, (x.clone().requires_grad_(),))

    # removal keeps the last weight (after 1 and after 3 more forwards)
    before = m(x).detach()
    m = fastgan.nn.utils.remove_spectral_norm(m)
    torch.testing.assert_close(m(x), before, **TOL64)
    m = HOOK(m)
    for _ in range(3):
        before = m(x).detach()
    m = fastgan.nn.utils.remove_spectral_norm(m)
    torch.testing.assert_close(m(x), before, **TOL64)

    m = HOOK(m)
    _check_eval_and_mixed_forwards(m, x, m.weight_u, m.weight_v)
    if requires_grad:
        m.eval()
        assert gradcheck(lambda w: m(x), (m.weight_orig,))


@pytest.mark.parametrize("forwards_before_saving", [0, 3])
def test_hook_state_dict_including_version_none(forwards_before_saving):
    """torch's loader hook converts pre-1.0 checkpoints (W stored, no v) for fastgan's hook too."""
    x = torch.randn(2, 3, dtype=torch.float64)
    m = HOOK(nn.Linear(3, 5).double())
    for _ in range(forwards_before_saving):
        m(x)
    old = copy.deepcopy(m.state_dict())
    assert set(old) == {"weight_orig", "bias", "weight_u", "weight_v"}
    assert "spectral_norm" in old._metadata[""]
    del old._metadata[""]["spectral_norm"]
    del old["weight_v"]
    old["weight"] = m.weight.detach().clone()
    latest = copy.deepcopy(m.state_dict())

    def replay():
        outs = []
        for training in (False, True, True, False):
            m.train(training)
            outs.append(m(x))
        return outs

    expected = replay()
    m.load_state_dict(old)
    if forwards_before_saving > 0:  # torch's converter assumes at least one forward happened
        for got, want in zip(replay(), expected):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    m.load_state_dict(latest)
    for got, want in zip(replay(), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_hook_dim_for_conv_transpose():
    m = HOOK(nn.ConvTranspose2d(3, 4, (5, 6)))
    m(torch.randn(2, 3, 10, 12))
    assert m.weight_u.shape == m.weight_orig[0, :, 0, 0].shape


def test_hook_forward_is_the_naive_formula():
    m = HOOK(nn.Linear(5, 7).double())
    x = torch.randn(3, 5, dtype=torch.float64)
    w = m.weight_orig.detach().clone()
    v = F.normalize(w.t() @ m.weight_u, dim=0, eps=1e-12)
    u = F.normalize(w @ v, dim=0, eps=1e-12)
    expected = F.linear(x, w / torch.dot(u, w @ v), m.bias)
    torch.testing.assert_close(m(x), expected, **TOL64)


def test_hook_pickles():
    """The copy is the same layer: its weight, u, v, and the outputs and power-iteration steps
    of its training and eval forwards (a copy that only ran would pass a check that it runs)."""
    original = HOOK(nn.Linear(5, 7).double())
    x = torch.randn(3, 5, dtype=torch.float64)
    original(x)  # u, v one step past their initial draw
    m = pickle.loads(pickle.dumps(original))
    assert isinstance(m, nn.Linear)
    for name in ("weight_orig", "bias", "weight_u", "weight_v"):
        assert torch.equal(getattr(m, name), getattr(original, name)), name
    for training in (True, True, False):
        m.train(training)
        original.train(training)
        torch.testing.assert_close(m(x), original(x), rtol=0, atol=0)
        assert torch.equal(m.weight_u, original.weight_u) and torch.equal(m.weight_v, original.weight_v)


# The misuses torch's spectral norm itself checks (not ones it fails on deep inside).
MISUSES = [
    ("parametrization", lambda: nn.Linear(4, 3), dict(n_power_iterations=0)),
    ("parametrization", lambda: nn.Linear(4, 3), dict(dim=2)),
    ("parametrization", lambda: nn.Conv2d(2, 3, 3), dict(dim=-5)),
    ("parametrization", lambda: nn.Linear(4, 3), dict(name="bogus")),
    ("parametrization", lambda: nn.Linear(4, 3, bias=False), dict(name="bias")),
    ("hook", lambda: nn.Linear(4, 3), dict(n_power_iterations=0)),
    ("hook", lambda: nn.LazyLinear(3), dict()),
    ("hook", lambda: nn.Linear(4, 3, bias=False), dict(name="bias")),
]


@pytest.mark.parametrize("form,make,kwargs", MISUSES, ids=[f"{form}-{kwargs}" for form, _, kwargs in MISUSES])
def test_misuse_raises_torchs_error_in_torchs_words(form, make, kwargs):
    """The same exception type and torch's message, then the layer (code matches on torch's words)."""
    theirs, ours = {"parametrization": (torch.nn.utils.parametrizations.spectral_norm, PARAMETRIZATION),
                    "hook": (torch.nn.utils.spectral_norm, HOOK)}[form]
    with pytest.raises(Exception) as expected:
        theirs(make(), **kwargs)
    with pytest.raises(expected.type) as got:
        ours(make(), **kwargs)
    assert str(got.value).startswith(str(expected.value))


# ---------------------------------------------------------------- the documented differences


@pytest.mark.parametrize("ours,theirs", [(PARAMETRIZATION, torch.nn.utils.parametrizations.spectral_norm), (HOOK, torch.nn.utils.spectral_norm)], ids=["parametrization", "hook"])
def test_difference_one_dimensional_weights_are_rejected(ours, theirs):
    """torch normalizes a vector (its "spectral norm" is its 2-norm); spectral norm on a
    bias or a BatchNorm scale is almost always a slip, so fastgan refuses it by name."""
    theirs(nn.Linear(5, 7), "bias")
    with pytest.raises(ValueError, match=r"Linear\.bias: spectral norm needs a weight with at least 2 dimensions"):
        ours(nn.Linear(5, 7), "bias")


def test_difference_hook_form_rejects_complex_weights():
    """torch's hook form runs on complex weights but computes v = normalize(Wᵀu) and
    σ = uᵀWv without conjugation: not the spectral norm (σ is complex, |σ| ≠ ‖W‖₂)."""
    torch.manual_seed(11)
    layer = nn.Linear(4, 4, dtype=torch.complex128)
    torch_hooked = torch.nn.utils.spectral_norm(copy.deepcopy(layer), n_power_iterations=50)
    torch_hooked(torch.randn(1, 4, dtype=torch.complex128))
    assert torch_hooked.weight.detach().abs().sum() > 0  # it runs ...
    largest = torch.linalg.matrix_norm(torch_hooked.weight.detach(), ord=2)
    assert not torch.isclose(largest, torch.ones_like(largest), rtol=1e-3)  # ... but does not normalize
    with pytest.raises(TypeError, match=r"Linear\.weight: the hook form .* complex .* fastgan\.nn\.spectral_norm"):
        HOOK(layer)
