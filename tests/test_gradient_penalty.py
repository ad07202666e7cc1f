"""Gradient penalties: fused ops on every backend against plain autograd.

Tolerances: float64 to 1e-9, float32 to 1e-5, on the penalty and on the gradient
of λ·penalty w.r.t. every discriminator parameter (the double-backward path).
float16 / bfloat16 images (float32 arithmetic) against float64 from the same rounded
inputs: 2e-3 / 1.6e-2, two units in the last place (the interpreter rounds float32
-> bfloat16 by truncation).
"""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fastgan
from fastgan.ops import gradient_penalty as penalty_ops
from fastgan.penalties import gradient_penalty
from fastgan.reference import gradient_penalty as reference
from conftest import device_backends, exit_worker

TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-9),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
OPS = torch.ops.fastgan
SHAPES = [(5, 3, 7, 9), (1, 11), (13,)]
# Large and odd: samples past the Triton tile (1024-2048) and the CPU block (8192), and
# on a GPU the CUDA penalty's multi-chunk path (a sample of 20011 float32 is split in
# 4096-element chunks on any GPU with > 15 SMs) beside its several-samples-per-block
# path (SHAPES).
LARGE_SHAPES = [(3, 20011), (7, 3, 33, 35)]
LAMBDA = 10.0


def small_sndcgan_d(spectral_norm=False):
    """SNDCGAN's D layout (3x3 s1 / 4x4 s2 convs, leaky ReLU 0.1, linear) at odd, small sizes, 9x9 inputs."""
    d = nn.Sequential(
        nn.Conv2d(3, 5, 3, 1, 1), nn.LeakyReLU(0.1),
        nn.Conv2d(5, 7, 4, 2, 1), nn.LeakyReLU(0.1),
        nn.Conv2d(7, 7, 3, 1, 1), nn.LeakyReLU(0.1),
        nn.Conv2d(7, 11, 4, 2, 1), nn.LeakyReLU(0.1),
        nn.Flatten(), nn.Linear(11 * 2 * 2, 1),
    )
    return fastgan.nn.apply_spectral_norm(d) if spectral_norm else d


def param_grads(loss, module):
    """∂loss/∂θ for every parameter (zeros where θ does not reach the loss, e.g. D's last bias in a penalty)."""
    return torch.autograd.grad(loss, list(module.parameters()), allow_unused=True, materialize_grads=True)


# ---------------------------------------------------------------- the random stream


def test_philox_stream_is_tritons_philox():
    """fastgan's uniform i is the top 24 bits of word i % 4 of Philox-4x32-10 at counter
    i // 4, as triton's randint4x computes it: all four words are used."""
    import triton
    import triton.language as tl

    @triton.jit
    def four_words(out_ptr, seed, N: tl.constexpr):
        offs = tl.arange(0, N)
        w0, w1, w2, w3 = tl.randint4x(seed, offs)
        tl.store(out_ptr + 4 * offs, w0)
        tl.store(out_ptr + 4 * offs + 1, w1)
        tl.store(out_ptr + 4 * offs + 2, w2)
        tl.store(out_ptr + 4 * offs + 3, w3)

    device = "cpu" if fastgan._backend.triton_interpreted() else "cuda"  # compiled Triton reads GPU memory only
    for seed in (0, 12345, 2**33 + 17):
        words = torch.empty(4 * 16, dtype=torch.int32, device=device)
        four_words[(1,)](words, seed, N=16)
        words = words.cpu()
        expected = ((words.to(torch.int64) & 0xFFFFFFFF) >> 8).to(torch.float32) * 2.0**-24
        assert torch.equal(reference.philox_uniform(seed, 64), expected)
        assert torch.equal(reference.philox_uniform(seed, 61), expected[:61])


# ---------------------------------------------------------------- ops vs reference


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_interpolate_matches_reference(device, backend, dtype):
    for shape in SHAPES:
        real, fake = torch.rand(shape, dtype=dtype, device=device), torch.rand(shape, dtype=dtype, device=device)
        alpha = torch.rand(shape[0], dtype=torch.float32, device=device)
        for given in (alpha, None):
            for seed in (3, 2**40 + 5):
                expected = reference.interpolate(real, fake, given, seed)
                with fastgan.use_backend(backend):
                    x_hat, used = OPS.gp_interpolate(real, fake, given, seed)
                assert torch.equal(used, expected[1])  # the in-kernel draws are bit-identical
                torch.testing.assert_close(x_hat, expected[0], **TOL[dtype])


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dragan_perturb_matches_reference(device, backend, dtype):
    for shape in SHAPES:
        real = torch.rand(shape, dtype=dtype, device=device)
        for seed in (0, 99):
            with fastgan.use_backend(backend):
                x_hat = OPS.dragan_perturb(real, seed)
            torch.testing.assert_close(x_hat, reference.dragan_perturb(real, seed), **TOL[dtype])
            assert x_hat.min() >= 0 and x_hat.max() <= 1


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("squared_norm,one_sided,eps", [(True, False, 0.0), (False, False, 1e-4), (False, True, 0.0), (False, True, 1e-4)])
def test_penalty_matches_reference(device, backend, dtype, squared_norm, one_sided, eps):
    for shape in SHAPES:
        grad = torch.randn(shape, dtype=dtype, device=device) * 0.4
        with fastgan.use_backend(backend):
            penalty, sq = OPS.gp_penalty(grad, squared_norm, 1.0, eps, one_sided)
        exp_penalty, exp_sq = reference.penalty(grad, squared_norm, 1.0, eps, one_sided)
        assert penalty.dtype == dtype and sq.dtype == exp_sq.dtype
        torch.testing.assert_close(penalty, exp_penalty, **TOL[dtype])
        torch.testing.assert_close(sq, exp_sq, **TOL[dtype])


def test_cpu_dragan_is_the_reference_bit_for_bit():
    """The CPU kernel's own two-pass std was 3 ulp off torch's in float64 (36169 of 49152 elements differed)."""
    real = torch.rand(16, 3, 32, 32, dtype=torch.float64)
    with fastgan.use_backend("cpp"):
        perturbed = OPS.dragan_perturb(real, 99)
    assert torch.equal(perturbed, reference.dragan_perturb(real, 99))


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
def test_dragan_scale_is_the_population_std(device, backend):
    """compare_gan's scale: the biased std of the whole batch (numpy's default ddof=0);
    a one-element batch has std 0 and is only clipped, never NaN."""
    real = torch.rand(4, 3, 5, 5, dtype=torch.float64, device=device) * 0.6 + 0.2  # no clipping
    noise = reference.philox_uniform(5, real.numel(), device).reshape(real.shape).double()
    with fastgan.use_backend(backend):
        x_hat = OPS.dragan_perturb(real, 5)
    scale = ((x_hat - real) / (noise - 0.5)).flatten()
    torch.testing.assert_close(scale, torch.full_like(scale, float(np.std(real.cpu().numpy()))), rtol=1e-9, atol=1e-9)
    for one in (torch.tensor([1.7], device=device), torch.full((1, 1, 1, 1), 0.3, device=device)):
        with fastgan.use_backend(backend):
            assert torch.equal(OPS.dragan_perturb(one, 5), one.clamp(0, 1))


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
def test_a_float64_penalty_takes_center_and_eps_in_float64(device, backend):
    """center 0.3 and eps 1e-4 are not float32 numbers: a float64 penalty must use them as
    float64 (a kernel taking them as float32 was 1.5e-7 off). The compiled Triton kernel
    declares them float64 (its Hopper compile check compiles that signature); Triton's
    interpreter, which runs it on CPU tensors here, hands every Python float to the kernel
    as float32 whatever the annotation, so there the float32-rounded values are expected."""
    scales = torch.tensor([0.005, 0.01, 0.02, 0.03, 0.04], dtype=torch.float64, device=device)  # ‖g‖ below and above center
    grad = torch.randn(5, 3, 8, 8, dtype=torch.float64, device=device) * scales[:, None, None, None]
    center, eps = 0.3, 1e-4
    if backend == "triton" and fastgan._backend.triton_interpreted() and device == "cpu":
        center, eps = (float(np.float32(value)) for value in (center, eps))
    sq = grad.flatten(1).pow(2).sum(1)
    for one_sided in (False, True):
        gap = torch.sqrt(eps + sq) - center
        expected = (gap.clamp(min=0) if one_sided else gap).pow(2).mean()
        with fastgan.use_backend(backend):
            penalty, _ = OPS.gp_penalty(grad, False, 0.3, 1e-4, one_sided)
        torch.testing.assert_close(penalty, expected, rtol=1e-13, atol=0)


@pytest.mark.parametrize("device,backend", device_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_every_dtype_and_block_path_matches_float64(device, backend, dtype):
    for shape in LARGE_SHAPES + SHAPES:
        real = torch.rand(shape, device=device).to(dtype)
        fake = torch.rand(shape, device=device).to(dtype)
        grad = (torch.randn(shape, device=device) * 0.02).to(dtype)
        alpha = torch.rand(shape[0], device=device)
        with fastgan.use_backend(backend):
            drawn, alpha_drawn = OPS.gp_interpolate(real, fake, None, 11)
            given, _ = OPS.gp_interpolate(real, fake, alpha, 11)
            perturbed = OPS.dragan_perturb(real, 11)
            penalties = [OPS.gp_penalty(grad, sq, 1.0, 1e-4, one_sided) for sq, one_sided in ((True, False), (False, True))]
        r64, f64, g64 = real.double(), fake.double(), grad.double()
        drawn_exact = reference.philox_uniform(11, shape[0], device)
        if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
            # The interpreter rounds float32 -> bfloat16 toward zero (GPUs round to nearest): 1 ulp.
            torch.testing.assert_close(alpha_drawn.float(), drawn_exact, rtol=2**-7, atol=0)
        else:
            assert torch.equal(alpha_drawn, drawn_exact.to(dtype))
        for got, a in ((drawn, alpha_drawn), (given, alpha.to(dtype))):
            assert got.dtype == dtype
            torch.testing.assert_close(got.double(), reference.interpolate(r64, f64, a.double(), 0)[0], **TOL[dtype])
        # The noise and the std are rounded to the image dtype, as the op does.
        noise = reference.philox_uniform(11, real.numel(), device).reshape(shape).to(dtype).double()
        expected = (r64 + real.std(correction=0).double() * (noise - 0.5)).clamp(0, 1)
        torch.testing.assert_close(perturbed.double(), expected, **TOL[dtype])
        for (penalty, sq), (squared, one_sided) in zip(penalties, ((True, False), (False, True))):
            exp_penalty, exp_sq = reference.penalty(g64, squared, 1.0, 1e-4, one_sided)
            assert penalty.dtype == dtype and sq.dtype == reference.accumulator_dtype(dtype)
            torch.testing.assert_close(sq.double(), exp_sq, **TOL[torch.float32 if dtype != torch.float64 else dtype])
            torch.testing.assert_close(penalty.double(), exp_penalty, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_gpu_launch_configuration_in_the_interpreter(dtype, monkeypatch):
    """The tiles a GPU launch uses (per-sample sums up to 2048 wide), run by the interpreter."""
    import importlib

    from conftest import KERNEL_BACKENDS

    if "triton" not in KERNEL_BACKENDS["cpu"]:
        pytest.skip("triton runs on the CPU only under TRITON_INTERPRET=1")
    kernels = importlib.import_module("fastgan.kernels.gradient_penalty")
    monkeypatch.setattr(kernels, "config_for", lambda device: kernels.GPU)
    for shape in LARGE_SHAPES:
        grad = (torch.randn(shape) * 0.02).to(dtype)
        real, fake = torch.rand(shape).to(dtype), torch.rand(shape).to(dtype)
        with fastgan.use_backend("triton"):
            penalty, sq = OPS.gp_penalty(grad, False, 1.0, 1e-4, False)
            x_hat, alpha = OPS.gp_interpolate(real, fake, None, 5)
        exp_penalty, exp_sq = reference.penalty(grad.double(), False, 1.0, 1e-4, False)
        torch.testing.assert_close(sq.double(), exp_sq, **TOL[torch.float32])
        torch.testing.assert_close(penalty.double(), exp_penalty, **TOL[dtype])
        torch.testing.assert_close(x_hat.double(), reference.interpolate(real.double(), fake.double(), alpha.double(), 0)[0], **TOL[dtype])


def test_triton_dragan_refuses_more_elements_than_its_philox_counters_cover(monkeypatch):
    """Counters are 32 bits, four uniforms each: past 2**34 elements the noise would repeat
    (element i + 2**34 drew element i's), so the launcher refuses, as the C++ backends do.
    Meta tensors and a stand-in kernel: nothing is allocated, nothing runs."""
    import importlib

    kernels = importlib.import_module("fastgan.kernels.gradient_penalty")
    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(grid)

    monkeypatch.setattr(kernels, "_dragan_kernel", Kernel())
    with pytest.raises(ValueError, match=r"at most 2\*\*34 elements"):
        kernels.dragan_perturb(torch.empty(2**34 + 1, device="meta"), 0)
    assert not launched
    kernels.dragan_perturb(torch.empty(2, 2**33, device="meta"), 0)  # 2**34: the last counter is 2**32 - 1
    assert len(launched) == 1


@pytest.mark.parametrize("device,backend", device_backends())
def test_channels_last_images_are_read_in_place(device, backend, monkeypatch):
    """Interpolation and penalty take channels-last batches as they are (no copy) and
    keep the layout; DRAGAN's noise follows the logical element order on any layout."""
    real = torch.rand(5, 3, 9, 11, device=device).to(memory_format=torch.channels_last)
    fake = torch.rand(5, 3, 9, 11, device=device).to(memory_format=torch.channels_last)
    grad = torch.randn(5, 3, 9, 11, device=device).to(memory_format=torch.channels_last)
    seen = []
    for op_name in ("gp_interpolate", "gp_penalty"):
        op = fastgan._backend.registered()[op_name]
        kernel = op.impls[backend]
        monkeypatch.setitem(op.impls, backend, lambda x, *rest, kernel=kernel: seen.append(x) or kernel(x, *rest))
    with fastgan.use_backend(backend):
        x_hat, _ = OPS.gp_interpolate(real, fake, None, 3)
        penalty, sq = OPS.gp_penalty(grad, False, 1.0, 1e-4, False)
        perturbed = OPS.dragan_perturb(real, 3)
    assert [t.data_ptr() for t in seen] == [real.data_ptr(), grad.data_ptr()]
    assert x_hat.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x_hat, reference.interpolate(real, fake, None, 3)[0], **TOL[torch.float32])
    exp_penalty, exp_sq = reference.penalty(grad, False, 1.0, 1e-4, False)
    torch.testing.assert_close(penalty, exp_penalty, **TOL[torch.float32])
    torch.testing.assert_close(sq, exp_sq, **TOL[torch.float32])
    torch.testing.assert_close(perturbed, reference.dragan_perturb(real.contiguous(), 3), **TOL[torch.float32])


# ---------------------------------------------------------------- the API vs plain autograd


def plain_autograd_penalty(d, real, fake, kind, alpha=None, noise=None, center=1.0, eps=1e-4, one_sided=False):
    """The hand-written penalty every GAN codebase has, as the oracle."""
    if kind == "wgan-gp":
        a = alpha.reshape(-1, 1, 1, 1).to(real.dtype)
        point = real + a * (fake - real)
    elif kind == "dragan":
        point = (real + real.std(correction=0) * (noise.to(real.dtype) - 0.5)).clamp(0, 1)
    else:
        point = real if kind == "r1" else fake
    point = point.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(d(point).sum(), point, create_graph=True)
    sq = g.flatten(1).square().sum(1)
    if kind in ("r1", "r2"):
        return 0.5 * sq.mean()
    gap = torch.sqrt(eps + sq) - center
    return (gap.clamp(min=0) if one_sided else gap).square().mean()


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["wgan-gp", "dragan", "r1", "r2"])
def test_gradient_penalty_matches_plain_autograd(device, backend, dtype, kind):
    d = small_sndcgan_d().to(device=device, dtype=dtype)
    real = torch.rand(6, 3, 9, 9, dtype=dtype, device=device)
    fake = torch.rand(6, 3, 9, 9, dtype=dtype, device=device)
    seed = 1234
    alpha = reference.philox_uniform(seed, 6, device)
    noise = reference.philox_uniform(seed, real.numel(), device).reshape(real.shape)
    expected = plain_autograd_penalty(d, real, fake, kind, alpha=alpha, noise=noise)
    expected_grads = param_grads(LAMBDA * expected, d)
    with fastgan.use_backend(backend):
        penalty = gradient_penalty(d, real, fake, kind, generator=seed)
        grads = param_grads(LAMBDA * penalty, d)
    torch.testing.assert_close(penalty, expected, **TOL[dtype])
    for (name, _), g, e in zip(d.named_parameters(), grads, expected_grads):
        torch.testing.assert_close(g, e, **TOL[dtype], msg=name)


@pytest.mark.parametrize("one_sided,eps", [(False, 0.0), (True, 1e-4)])
def test_options_and_explicit_alpha(one_sided, eps):
    d = small_sndcgan_d().double()
    real, fake = torch.rand(4, 3, 9, 9, dtype=torch.float64), torch.rand(4, 3, 9, 9, dtype=torch.float64)
    alpha = torch.rand(4, dtype=torch.float64)
    expected = plain_autograd_penalty(d, real, fake, "wgan-gp", alpha=alpha, center=0.5, eps=eps, one_sided=one_sided)
    state = torch.get_rng_state()
    penalty = gradient_penalty(d, real, fake, alpha=alpha, center=0.5, eps=eps, one_sided=one_sided)
    torch.testing.assert_close(penalty, expected, **TOL[torch.float64])
    assert torch.equal(torch.get_rng_state(), state)  # a given α draws nothing from the global generator


@pytest.mark.parametrize("kind", ["r1", "r2"])
def test_r1_r2_take_samples_made_under_inference_mode(kind):
    """Samples made under torch.inference_mode (cannot require grad themselves) work for every
    kind, as they already did for wgan-gp and dragan, whose x̂ is a new tensor."""
    d = small_sndcgan_d().double()
    with torch.inference_mode():
        real, fake = torch.rand(5, 3, 9, 9, dtype=torch.float64), torch.rand(5, 3, 9, 9, dtype=torch.float64)
    expected = plain_autograd_penalty(d, real.clone(), fake.clone(), kind)
    penalty = gradient_penalty(d, real, fake, kind)
    torch.testing.assert_close(penalty, expected, **TOL[torch.float64])
    for g, e in zip(param_grads(penalty, d), param_grads(expected, d)):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


@pytest.mark.parametrize("shape", [(5,), (5, 1), (5, 1, 1), (5, 1, 1, 1)])
def test_alpha_in_any_per_sample_shape(shape):
    """(B, 1, 1, 1) is how compare_gan / WGAN-GP code write α; every per-sample shape gives the same penalty."""
    d = small_sndcgan_d().double()
    real, fake = torch.rand(5, 3, 9, 9, dtype=torch.float64), torch.rand(5, 3, 9, 9, dtype=torch.float64)
    alpha = torch.rand(5, dtype=torch.float64)
    expected = plain_autograd_penalty(d, real, fake, "wgan-gp", alpha=alpha)
    torch.testing.assert_close(gradient_penalty(d, real, fake, alpha=alpha.reshape(shape)), expected, **TOL[torch.float64])


@pytest.mark.parametrize("shape", [(), (1, 5), (5, 3), (5, 1, 1, 1, 1), (25,)])
def test_alpha_not_per_sample_is_rejected(shape):
    d = small_sndcgan_d()
    real, fake = torch.rand(5, 3, 9, 9), torch.rand(5, 3, 9, 9)
    with pytest.raises(ValueError, match=r"alpha must be one value per sample.*\(5, 1, 1, 1\)"):
        gradient_penalty(d, real, fake, alpha=torch.rand(shape))


def test_alpha_with_a_penalty_that_does_not_interpolate_is_rejected():
    d = small_sndcgan_d()
    real, fake = torch.rand(2, 3, 9, 9), torch.rand(2, 3, 9, 9)
    with pytest.raises(ValueError, match="only used by the 'wgan-gp' penalty, not by 'r1'"):
        gradient_penalty(d, real, fake, "r1", alpha=torch.rand(2))


def test_penalty_through_spectral_norm_layers():
    """GP on an SN'd D (the paper's combination): double backward through fastgan's SN weights."""
    torch.manual_seed(7)
    d = small_sndcgan_d(spectral_norm=True).double()
    real, fake = torch.rand(4, 3, 9, 9, dtype=torch.float64), torch.rand(4, 3, 9, 9, dtype=torch.float64)
    alpha = torch.rand(4, dtype=torch.float64)
    d.eval()  # no power-iteration step between the two evaluations
    expected = param_grads(plain_autograd_penalty(d, real, fake, "wgan-gp", alpha=alpha), d)
    got = param_grads(gradient_penalty(d, real, fake, alpha=alpha), d)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


def test_default_seed_follows_torch_manual_seed():
    d = small_sndcgan_d().double()
    real, fake = torch.rand(4, 3, 9, 9, dtype=torch.float64), torch.rand(4, 3, 9, 9, dtype=torch.float64)
    torch.manual_seed(11)
    first = gradient_penalty(d, real, fake)
    torch.manual_seed(11)
    assert torch.equal(gradient_penalty(d, real, fake), first)
    generator = torch.Generator().manual_seed(5)
    torch.testing.assert_close(gradient_penalty(d, real, fake, generator=generator), gradient_penalty(d, real, fake, generator=torch.Generator().manual_seed(5)))


# ---------------------------------------------------------------- gradcheck, opcheck


# The registered ops, and the entry points fastgan.penalties calls in eager mode (the same
# computation and autograd without the ops' dispatch): both must be right to second order.
PENALTY_ENTRY_POINTS = {"registered op": OPS.gp_penalty, "eager entry point": penalty_ops.penalty}
INTERPOLATE_ENTRY_POINTS = {"registered op": OPS.gp_interpolate, "eager entry point": penalty_ops.interpolate}


@pytest.mark.parametrize("entry", PENALTY_ENTRY_POINTS)
@pytest.mark.parametrize("squared_norm,one_sided", [(True, False), (False, False), (False, True)])
def test_gradcheck_penalty(squared_norm, one_sided, entry):
    grad = (torch.randn(4, 2, 3, dtype=torch.float64) * 0.5).requires_grad_()

    def penalty(g):  # both outputs: the penalty and sq, each sample's sum of g squared (whose gradient was dropped)
        return PENALTY_ENTRY_POINTS[entry](g, squared_norm, 1.0, 1e-4, one_sided)

    assert torch.autograd.gradcheck(penalty, (grad,))
    assert torch.autograd.gradgradcheck(penalty, (grad,))


@pytest.mark.parametrize("entry", PENALTY_ENTRY_POINTS)
@pytest.mark.parametrize("one_sided", [False, True])
def test_plain_norm_at_a_zero_gradient_has_a_finite_derivative(one_sided, entry):
    """eps=0 ("the plain ‖g‖") with a sample whose input gradient is exactly 0 (a ReLU D can
    give one): the derivative is torch.linalg.vector_norm's (0 at 0), as hand-written WGAN-GP
    code gets it, not NaN; its double backward stays finite. The zero sample is the point of
    the test; the other samples are random."""
    grad = torch.randn(5, 3, 7, dtype=torch.float64) * 0.5
    grad[2] = 0.0
    grad.requires_grad_()
    (got,) = torch.autograd.grad(PENALTY_ENTRY_POINTS[entry](grad, False, 1.0, 0.0, one_sided)[0], grad, create_graph=True)
    gap = torch.linalg.vector_norm(grad.flatten(1), dim=1) - 1.0
    (expected,) = torch.autograd.grad((gap.clamp(min=0) if one_sided else gap).square().mean(), grad)
    torch.testing.assert_close(got, expected, **TOL[torch.float64])
    (second,) = torch.autograd.grad((got * torch.randn_like(got)).sum(), grad)
    assert torch.isfinite(second).all()


def test_plain_norm_penalty_of_a_relu_discriminator_with_a_dead_sample():
    """End to end: a ReLU D whose hidden units are all off at one sample; with eps=0 the
    parameter gradients equal the hand-written (vector_norm) penalty's, NaN-free."""
    d = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 1)).double()
    with torch.no_grad():
        d[0].weight.copy_(torch.rand(5, 3, dtype=torch.float64) * 0.2 + 1.0)
        d[0].bias.fill_(-1.5)  # every unit on for inputs in [0.6, 1], off for inputs in [0, 0.3]
    real = torch.rand(7, 3, dtype=torch.float64) * 0.4 + 0.6
    real[4] = torch.rand(3, dtype=torch.float64) * 0.3  # every unit off: D's input gradient is 0 there
    fake = torch.rand(7, 3, dtype=torch.float64) * 0.4 + 0.6
    alpha = torch.rand(7, dtype=torch.float64)
    alpha[4] = 0.0
    point = (real + alpha[:, None] * (fake - real)).requires_grad_()
    (g,) = torch.autograd.grad(d(point).sum(), point, create_graph=True)
    assert g[4].abs().max() == 0 and (g.flatten(1).abs().sum(1) > 0).sum() == 6
    expected = param_grads((torch.linalg.vector_norm(g, dim=1) - 1).square().mean(), d)
    got = param_grads(gradient_penalty(d, real, fake, alpha=alpha, eps=0.0), d)
    for (name, _), x, e in zip(d.named_parameters(), got, expected):
        torch.testing.assert_close(x, e, **TOL[torch.float64], msg=name)


@pytest.mark.parametrize("entry", INTERPOLATE_ENTRY_POINTS)
def test_gradcheck_interpolate(entry):
    real, fake = (torch.rand(3, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    alpha = torch.rand(3, dtype=torch.float64, requires_grad=True)
    interpolate = INTERPOLATE_ENTRY_POINTS[entry]
    # both outputs: x-hat and the alpha used, the given one (whose gradient was dropped)
    assert torch.autograd.gradcheck(lambda r, f, a: interpolate(r, f, a, 0), (real, fake, alpha))


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def test_eager_penalty_skips_the_ops_dispatch_and_compiled_code_keeps_it():
    """In eager mode gradient_penalty reaches the kernels without the custom ops' dispatch
    (it costs more host time than the kernels in a D step); torch.compile still sees the
    registered ops (test_penalty_ops_compile_fullgraph compiles them)."""
    d = small_sndcgan_d().double()
    real, fake = torch.rand(4, 3, 9, 9, dtype=torch.float64), torch.rand(4, 3, 9, 9, dtype=torch.float64)
    with _OpNames() as seen:
        gradient_penalty(d, real, fake, "wgan-gp", generator=3).backward()
        gradient_penalty(d, real, None, "dragan", generator=3).backward()
    assert not {name for name in seen.names if name.startswith("fastgan.")}, seen.names
    with _OpNames() as seen:
        OPS.gp_penalty(torch.randn(4, 3, dtype=torch.float64), False, 1.0, 1e-4, False)
    assert "fastgan.gp_penalty.default" in seen.names


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
def test_opcheck(device, backend):
    real, fake = torch.rand(3, 2, 5, device=device), torch.rand(3, 2, 5, device=device)
    alpha = torch.rand(3, device=device)
    grad = torch.randn(3, 2, 5, device=device)
    with fastgan.use_backend(backend):
        torch.library.opcheck(OPS.gp_interpolate.default, (real, fake, None, 7))
        torch.library.opcheck(OPS.gp_interpolate.default, (real.requires_grad_(), fake, alpha, 7))
        torch.library.opcheck(OPS.dragan_perturb.default, (fake, 7))
        torch.library.opcheck(OPS.gp_penalty.default, (grad, False, 1.0, 1e-4, True))
        torch.library.opcheck(OPS.gp_penalty.default, (grad.requires_grad_(), True, 1.0, 0.0, False))


# ---------------------------------------------------------------- torch.compile


def test_compiled_discriminator_works_through_its_eager_module():
    """README claim: a torch.compile'd D may be passed to gradient_penalty."""
    d = small_sndcgan_d().double()
    compiled = torch.compile(d)
    real, fake = torch.rand(4, 3, 9, 9, dtype=torch.float64), torch.rand(4, 3, 9, 9, dtype=torch.float64)
    alpha = torch.rand(4, dtype=torch.float64)
    d_loss = compiled(fake).mean() - compiled(real).mean()
    got = torch.autograd.grad(d_loss + LAMBDA * gradient_penalty(compiled, real, fake, alpha=alpha), list(d.parameters()))
    eager_loss = d(fake).mean() - d(real).mean() + LAMBDA * plain_autograd_penalty(d, real, fake, "wgan-gp", alpha=alpha)
    expected = torch.autograd.grad(eager_loss, list(d.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


@pytest.mark.parametrize("how", ["D.compile()", "compiled submodule"])
def test_discriminator_compiled_in_place_works_too(how):
    """nn.Module.compile() (no _orig_mod to unwrap) and a D with a torch.compile'd part: the
    penalty runs them eagerly; before, its backward raised torch's 'does not currently support
    double backward'."""
    d = small_sndcgan_d().double()
    eager = small_sndcgan_d().double()
    eager.load_state_dict(d.state_dict())
    if how == "D.compile()":
        d.compile()
    else:
        d[2] = torch.compile(d[2])
    real, fake = torch.rand(5, 3, 9, 9, dtype=torch.float64), torch.rand(5, 3, 9, 9, dtype=torch.float64)
    alpha = torch.rand(5, dtype=torch.float64)
    loss = d(fake).mean() - d(real).mean() + LAMBDA * gradient_penalty(d, real, fake, alpha=alpha)
    got = torch.autograd.grad(loss, list(d.parameters()))
    eager_loss = eager(fake).mean() - eager(real).mean() + LAMBDA * plain_autograd_penalty(eager, real, fake, "wgan-gp", alpha=alpha)
    expected = torch.autograd.grad(eager_loss, list(eager.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


def test_penalty_ops_compile_fullgraph():
    """README claim: the fused ops compile (fullgraph) on a gradient tensor, forward and backward."""
    grad = (torch.randn(5, 3, 4, dtype=torch.float64)).requires_grad_()
    fn = lambda g: OPS.gp_penalty(g, False, 1.0, 1e-4, False)[0] + OPS.gp_interpolate(g, g * 2, None, 3)[0].sum()  # noqa: E731
    compiled = torch.compile(fn, fullgraph=True)
    torch.testing.assert_close(compiled(grad), fn(grad), **TOL[torch.float64])
    (g_c,) = torch.autograd.grad(compiled(grad), grad)
    (g_e,) = torch.autograd.grad(fn(grad), grad)
    torch.testing.assert_close(g_c, g_e, **TOL[torch.float64])


def test_compiling_the_penalty_itself_raises_instead_of_wrong_gradients():
    """README claim: compiling a function that calls gradient_penalty fails loudly (torch
    cannot trace autograd.grad with fullgraph, nor double-backward a compiled graph)."""
    d = small_sndcgan_d().double()
    real, fake = torch.rand(4, 3, 9, 9, dtype=torch.float64), torch.rand(4, 3, 9, 9, dtype=torch.float64)
    alpha = torch.rand(4, dtype=torch.float64)
    # torch 2.14 stops at autograd.grad; torch 2.11 one line earlier, at the interpolate's requires_grad_().
    # Either is dynamo refusing a graph break under fullgraph (Unsupported), not just any error that names
    # requires_grad (fastgan's own checks do, and so would a failure inside the penalty).
    with pytest.raises(torch._dynamo.exc.Unsupported, match="autograd.grad|requires_grad"):
        torch.compile(lambda: gradient_penalty(d, real, fake, alpha=alpha), fullgraph=True)()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.compile(lambda: gradient_penalty(d, real, fake, alpha=alpha))().backward()


# ---------------------------------------------------------------- DDP


def _ddp_worker(rank, world, init_file, real, fake, alpha, state, result_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    d = small_sndcgan_d().double()
    d.load_state_dict(state)
    ddp = nn.parallel.DistributedDataParallel(d)
    part = slice(rank * real.shape[0] // world, (rank + 1) * real.shape[0] // world)
    r, f = real[part], fake[part]
    loss = ddp(f).mean() - ddp(r).mean() + LAMBDA * gradient_penalty(ddp, r, f, alpha=alpha[part])
    loss.backward()
    if rank == 0:
        torch.save([p.grad for p in d.parameters()], result_file)
    exit_worker()


@pytest.mark.slow
def test_ddp_gradients_equal_single_process_on_the_whole_batch():
    d = small_sndcgan_d().double()
    real, fake = torch.rand(6, 3, 9, 9, dtype=torch.float64), torch.rand(6, 3, 9, 9, dtype=torch.float64)
    alpha = torch.rand(6, dtype=torch.float64)
    loss = d(fake).mean() - d(real).mean() + LAMBDA * gradient_penalty(d, real, fake, alpha=alpha)
    expected = torch.autograd.grad(loss, list(d.parameters()))
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "grads.pt")
        mp.spawn(_ddp_worker, args=(2, os.path.join(tmp, "init"), real, fake, alpha, d.state_dict(), result), nprocs=2)
        got = torch.load(result)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **TOL[torch.float64])


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_value_error():
    d = small_sndcgan_d()
    real, fake = torch.rand(4, 3, 9, 9), torch.rand(4, 3, 9, 9)
    with pytest.raises(ValueError, match="same shape and dtype"):
        gradient_penalty(d, real, fake[:3])
    with pytest.raises(ValueError, match="same shape and dtype"):
        gradient_penalty(d, real, fake.double())
    with pytest.raises(ValueError, match="floating-point"):
        gradient_penalty(d, (real * 255).to(torch.uint8), fake)
    with pytest.raises(ValueError, match="needs fake samples"):
        gradient_penalty(d, real, None, "wgan-gp")
    with pytest.raises(ValueError, match="needs fake samples"):
        gradient_penalty(d, real, None, "r2")
    with pytest.raises(ValueError, match="unknown gradient penalty kind"):
        gradient_penalty(d, real, fake, "wgan")
    with pytest.raises(ValueError, match=r"one value per sample.*\(4, 2\)"):
        gradient_penalty(lambda x: d(x).repeat(1, 2), real, fake)
    with pytest.raises(ValueError, match="alpha must be"):
        gradient_penalty(d, real, fake, alpha=torch.rand(3))
    with pytest.raises(ValueError, match=r"real must be a torch.Tensor, got numpy.ndarray.*from_numpy"):
        gradient_penalty(d, real.numpy(), fake)
    with pytest.raises(ValueError, match="0-d tensor"):
        gradient_penalty(lambda x: x.reshape(1), torch.tensor(0.5), None, "r1")
    with pytest.raises(TypeError, match="generator must be None, an int seed or a torch.Generator, got True"):
        gradient_penalty(d, real, fake, generator=True)
    assert gradient_penalty(d, real, None, "r1").ndim == 0
    assert gradient_penalty(d, real, None, "dragan").ndim == 0
    for setting in ({"eps": float("nan")}, {"eps": float("inf")}, {"center": float("nan")}):  # NaN'd every gradient
        with pytest.raises(ValueError, match="must be finite"):
            gradient_penalty(d, real, fake, **setting)


def test_a_batch_of_one_may_score_as_a_0d_tensor():
    """A D ending in .squeeze() gives shape () for one sample: one value per sample all the same."""
    d = nn.Sequential(nn.Flatten(), nn.Linear(12, 1)).double()
    real, fake = torch.rand(1, 3, 2, 2, dtype=torch.float64), torch.rand(1, 3, 2, 2, dtype=torch.float64)
    for kind in ("wgan-gp", "r1"):
        expected = gradient_penalty(d, real, fake, kind, generator=5)
        assert torch.equal(gradient_penalty(lambda x: d(x).squeeze(), real, fake, kind, generator=5), expected)


@pytest.mark.parametrize("kind", ["wgan-gp", "dragan", "r1", "r2"])
def test_discriminator_that_ignores_its_input_raises_a_clear_error(kind):
    """torch's own errors ('appears to not have been used in the graph. Set allow_unused=True',
    'element 0 of tensors does not require grad') name an argument the caller cannot pass."""
    d = small_sndcgan_d()
    real, fake = torch.rand(4, 3, 9, 9), torch.rand(4, 3, 9, 9)
    constant = nn.Parameter(torch.ones(1))
    for ignores_input in (lambda x: d(x.detach()), lambda x: constant.expand(x.shape[0]) * 2.0, lambda x: torch.ones(x.shape[0])):
        with pytest.raises(ValueError, match="does not depend on its input"):
            gradient_penalty(ignores_input, real, fake, kind)
    for no_autograd in (torch.no_grad, torch.inference_mode):
        with no_autograd(), pytest.raises(RuntimeError, match=r"needs autograd.*torch.no_grad\(\)"):
            gradient_penalty(d, real, fake, kind)
