"""GPU only (marked cuda, skipped where no GPU is visible; `make gpu-check` runs them):

* a whole WGAN-GP discriminator step -- ``apply_spectral_norm``'s grouped power
  iteration, D on real and fake, ``gradient_penalty`` with its double backward, and
  the parameter gradients -- captured in a ``torch.cuda.CUDAGraph`` and replayed gives
  what the same step gives eagerly (same kernels, so to float32 round-off at most);
* ``fastgan.graphs.GraphedStep`` on a hand-written WGAN-GP update (spectral-norm D, the
  penalty, capturable Adam) gives the eager update's numbers from the same state, and the
  penalty's default α is drawn anew at every replay (an int seed keeps its one draw);
* spectral norm and the penalty ops are bit-identical from run to run on the GPU
  (no floating-point atomics decide a result), on every GPU backend.
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from conftest import CUDA_ONLY
from graph_stand_in import wgan_gp_update
import fastgan
from fastgan.penalties import gradient_penalty
from fastgan.reference import gradient_penalty as gp_reference
from fastgan.reference import spectral_norm as sn_reference
from fastgan.train.runtime import Runtime
from fastgan.graphs import GraphedStep, on_side_stream

pytestmark = CUDA_ONLY

GPU_BACKENDS = ["cuda", "triton"]
OPS = torch.ops.fastgan


def sndcgan_discriminator(width=64):
    """SNDCGAN's D (compare_gan) for 32x32 images; width 64 is the paper's."""
    c = width
    return nn.Sequential(
        nn.Conv2d(3, c, 3, 1, 1), nn.LeakyReLU(0.1),
        nn.Conv2d(c, 2 * c, 4, 2, 1), nn.LeakyReLU(0.1),
        nn.Conv2d(2 * c, 2 * c, 3, 1, 1), nn.LeakyReLU(0.1),
        nn.Conv2d(2 * c, 4 * c, 4, 2, 1), nn.LeakyReLU(0.1),
        nn.Conv2d(4 * c, 4 * c, 3, 1, 1), nn.LeakyReLU(0.1),
        nn.Conv2d(4 * c, 8 * c, 4, 2, 1), nn.LeakyReLU(0.1),
        nn.Conv2d(8 * c, 8 * c, 3, 1, 1), nn.LeakyReLU(0.1),
        nn.Flatten(), nn.Linear(8 * c * 4 * 4, 1),
    )


def d_step(d, real, fake):
    """WGAN-GP discriminator loss and its gradients (returned, so a graph can hold them)."""
    loss = d(fake).mean() - d(real).mean() + 10.0 * gradient_penalty(d, real, fake, "wgan-gp", generator=1234)
    return (loss,) + torch.autograd.grad(loss, [p for p in d.parameters()])


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_wgan_gp_step_with_spectral_norm_replays_like_eager(backend, memory_format):
    torch.manual_seed(0)
    base = sndcgan_discriminator(width=16).cuda().to(memory_format=memory_format)
    eager, graphed = copy.deepcopy(base), copy.deepcopy(base)
    with fastgan.use_backend(backend):
        for d in (eager, graphed):
            torch.manual_seed(1)  # the same u, v draws
            fastgan.nn.apply_spectral_norm(d)
    real = torch.rand(8, 3, 32, 32, device="cuda").to(memory_format=memory_format)
    fake = torch.rand(8, 3, 32, 32, device="cuda").to(memory_format=memory_format)

    with fastgan.use_backend(backend):
        # Warm-up on a side stream (compiles kernels, builds the cached layer tables),
        # as torch.cuda.graph requires; the eager twin takes the same steps.
        on_side_stream(lambda: [d_step(graphed, real, fake) for _ in range(3)])
        for _ in range(3):
            d_step(eager, real, fake)

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = d_step(graphed, real, fake)
        for step in range(2):
            graph.replay()
            expected = d_step(eager, real, fake)
            torch.cuda.synchronize()
            for name, got, want in zip(["loss"] + [n for n, _ in graphed.named_parameters()], static, expected):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")
            for (name, got), want in zip(graphed.named_buffers(), eager.buffers()):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")


@torch.no_grad()
def _copy_into(source, source_optimizer, target, target_optimizer):
    """``target`` takes ``source``'s weights, buffers and Adam state, in place."""
    for mine, theirs in zip(target.state_dict().values(), source.state_dict().values()):
        mine.copy_(theirs)
    for p_target, p_source in zip(target.parameters(), source.parameters()):
        for key, value in source_optimizer.state[p_source].items():
            target_optimizer.state[p_target][key].copy_(value)


@pytest.fixture
def full_float32():
    """cuDNN's TF32 convolutions (torch's default) would set the tolerances here, not the graphs."""
    with Runtime(device=torch.device("cuda")).numerics(deterministic=False, tf32=False):
        yield


def test_graphed_step_gives_the_eager_updates(full_float32):
    """Each update from the same state (weights, u and v, Adam's moments copied into the eager
    twin first: side by side the two would drift by round-off Adam amplifies): the same loss
    and penalty to float32 round-off, and weights within a few lr."""
    torch.manual_seed(0)
    graphed_d = fastgan.nn.apply_spectral_norm(sndcgan_discriminator(width=16).cuda())
    eager_d = copy.deepcopy(graphed_d)
    graphed_opt = torch.optim.Adam(graphed_d.parameters(), lr=2e-4, betas=(0.5, 0.999), capturable=True)
    eager_opt = torch.optim.Adam(eager_d.parameters(), lr=2e-4, betas=(0.5, 0.999), capturable=True)
    step, eager = GraphedStep(wgan_gp_update(graphed_d, graphed_opt), optimizers=[graphed_opt]), wgan_gp_update(eager_d, eager_opt)
    for call in range(5):  # 1 eager warm-up, 2 captured, 3-5 replayed
        real, fake, alpha = torch.rand(8, 3, 32, 32, device="cuda"), torch.rand(8, 3, 32, 32, device="cuda"), torch.rand(8, device="cuda")
        if call:
            _copy_into(graphed_d, graphed_opt, eager_d, eager_opt)
        ours, theirs = step(real, fake, alpha), eager(real, fake, alpha)
        for name, a, b in zip(("loss", "penalty"), pytree.tree_leaves(ours), pytree.tree_leaves(theirs)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda why: f"call {call}, {name}: {why}")
        for (name, a), b in zip(graphed_d.state_dict().items(), eager_d.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=lambda why: f"call {call}, {name}: {why}")
    assert step.captured


def test_graphed_step_captures_plain_sgd(full_float32):
    """SGD takes no capturable option (it keeps no step count) and is captured as it is, as in
    torch's whole-network capture example: side by side with its eager twin, the same losses
    and weights at every call (SGD does not amplify round-off as Adam does)."""
    torch.manual_seed(0)
    graphed_d = sndcgan_discriminator(width=8).cuda()
    eager_d = copy.deepcopy(graphed_d)
    graphed_opt = torch.optim.SGD(graphed_d.parameters(), lr=1e-3, momentum=0.9)
    eager_opt = torch.optim.SGD(eager_d.parameters(), lr=1e-3, momentum=0.9)
    step, eager = GraphedStep(wgan_gp_update(graphed_d, graphed_opt), optimizers=[graphed_opt]), wgan_gp_update(eager_d, eager_opt)
    for call in range(4):  # 1 eager warm-up, 2 captured, 3-4 replayed
        real, fake, alpha = torch.rand(7, 3, 32, 32, device="cuda"), torch.rand(7, 3, 32, 32, device="cuda"), torch.rand(7, device="cuda")
        ours, theirs = step(real, fake, alpha), eager(real, fake, alpha)
        torch.testing.assert_close(ours["loss"], theirs["loss"], rtol=1e-4, atol=1e-5, msg=lambda why: f"call {call}: {why}")
        for (name, a), b in zip(graphed_d.named_parameters(), eager_d.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda why: f"call {call}, {name}: {why}")
    assert step.captured


def test_captured_penalty_draws_alpha_anew_at_every_replay():
    """D(x) = Σ x² (elementwise, deterministic, and its gradient norm moves with the
    interpolation point): replays with the same batches differ by their α, unless the
    seed is an int, whose one draw every replay keeps."""
    def d(x):
        return x.square().flatten(1).sum(1)

    real, fake = torch.rand(8, 3, 32, 32, device="cuda"), torch.rand(8, 3, 32, 32, device="cuda")
    drawn = GraphedStep(lambda r, f: gradient_penalty(d, r, f, "wgan-gp").detach())
    seeded = GraphedStep(lambda r, f: gradient_penalty(d, r, f, "wgan-gp", generator=7).detach())
    drawn_values = [float(drawn(real, fake)) for _ in range(4)]  # 1 eager, 2 captured, 3-4 replayed
    seeded_values = [float(seeded(real, fake)) for _ in range(4)]
    assert drawn.captured and seeded.captured
    assert abs(drawn_values[2] - drawn_values[3]) > 1e-4 * abs(drawn_values[3]), drawn_values
    assert seeded_values[1:] == [seeded_values[1]] * 3, seeded_values
    assert seeded_values[3] == pytest.approx(seeded_values[0], rel=1e-6)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_spectral_norm_is_bit_identical_run_to_run(backend, dtype):
    """The paper's SNDCGAN D (width 64: a 512 x 4608 layer, 4.7 K columns summed over
    many row blocks), all layers in one multi-tensor op, ten times."""
    d = sndcgan_discriminator(width=64).cuda().to(dtype)
    layers = [m for m in d.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    weights = [m.weight.detach() for m in layers]
    us = [torch.nn.functional.normalize(torch.randn(w.shape[0], device="cuda"), dim=0).to(dtype) for w in weights]
    vs = [torch.nn.functional.normalize(torch.randn(w[0].numel(), device="cuda"), dim=0).to(dtype) for w in weights]
    with fastgan.use_backend(backend):
        runs = [OPS.spectral_norm_power_iteration_multi(weights, us, vs, [0] * len(weights), 1, 1e-12, True) for _ in range(10)]
        single = [OPS.spectral_norm_power_iteration(weights[-2], us[-2], vs[-2], 0, 2, 1e-12, False) for _ in range(10)]
    for results in (runs, single):
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert torch.equal(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shape", [(64, 3, 32, 32), (3, 100003), (1024, 7)])
def test_penalty_ops_are_bit_identical_run_to_run(backend, shape):
    """Includes the CUDA penalty's multi-chunk path (3 x 100003: 25 chunks on an H100) and many samples per block (1024 x 7)."""
    grad = torch.randn(shape, device="cuda") * 0.1
    real, fake = torch.rand(shape, device="cuda"), torch.rand(shape, device="cuda")
    with fastgan.use_backend(backend):
        runs = [
            OPS.gp_penalty(grad, False, 1.0, 1e-4, False) + OPS.gp_penalty(grad, True, 1.0, 0.0, False)
            + OPS.gp_interpolate(real, fake, None, 9) + (OPS.dragan_perturb(real, 9),)
            for _ in range(10)
        ]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_launches_go_to_the_tensors_device(backend):
    """Tensors on a GPU that is not the current one: results land on (and are computed by) their device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    weight = torch.randn(37, 5, 3, 3, device="cuda:1")
    u = torch.nn.functional.normalize(torch.randn(37, device="cuda:1"), dim=0)
    v = torch.nn.functional.normalize(torch.randn(45, device="cuda:1"), dim=0)
    grad = torch.randn(4, 3, 8, 8, device="cuda:1")
    with torch.cuda.device(0), fastgan.use_backend(backend):
        got = OPS.spectral_norm_power_iteration(weight, u, v, 0, 1, 1e-12, True)
        penalty, sq = OPS.gp_penalty(grad, False, 1.0, 1e-4, False)
    expected = sn_reference.power_iteration(weight, u, v, 0, 1, 1e-12, True)
    for a, e in zip(got, expected):
        assert a.device == weight.device
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(penalty, gp_reference.penalty(grad, False, 1.0, 1e-4, False)[0])


def test_frechet_triton_matmul_launches_on_the_tensors_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from fastgan.kernels import frechet as frechet_kernels

    a, b = torch.randn(2, 67, 67, dtype=torch.float64, device="cuda:1")
    with torch.cuda.device(0):
        out = frechet_kernels.matmul(a, b, alpha=0.5, beta=1.0)
    assert out.device == a.device
    torch.testing.assert_close(out, 0.5 * a @ b + torch.eye(67, dtype=torch.float64, device=a.device))
