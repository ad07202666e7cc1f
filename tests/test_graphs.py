"""fastgan.graphs.GraphedStep and the penalties' draws under capture, on the CPU.

A CUDA graph needs a GPU; here a stand-in keeps its contract (tests/graph_stand_in.py:
capturing runs nothing, each replay reruns the recorded step on the static inputs and
rewrites the same output tensors),
so what GraphedStep itself does -- warm-up, static input buffers, argument checks, the
optimizers' gradients, the outputs it hands back -- is checked against the eager step.
The real capture runs in tests/test_cuda_graphs.py (GPU only)."""
import contextlib
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import fastgan
from fastgan import graphs
from fastgan.penalties import gradient_penalty
from fastgan.reference import gradient_penalty as gp_reference
from fastgan.train.step import CapturedStep
from fastgan.train.config import load_config
from fastgan.train.stream import RepeatedBatch
from fastgan.train.trainer import Trainer
from graph_stand_in import use_stand_in_graphs, use_stand_in_training_graphs, wgan_gp_update


@pytest.fixture
def stand_in_graphs(monkeypatch):
    use_stand_in_graphs(monkeypatch)


def _discriminator():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 8, 3, 2, 1), nn.LeakyReLU(0.2),
                         nn.Flatten(), nn.Linear(8 * 2 * 2, 1))


def test_graphed_step_gives_the_eager_steps(stand_in_graphs):
    """Four updates with new batches each: the same losses, weights and gradients as eager,
    bit for bit; the outputs are the graph's own tensors, rewritten by each call."""
    eager_d = _discriminator()
    graphed_d = copy.deepcopy(eager_d)
    eager_opt = torch.optim.SGD(eager_d.parameters(), lr=0.1, momentum=0.9)
    graphed_opt = torch.optim.SGD(graphed_d.parameters(), lr=0.1, momentum=0.9)
    eager, graphed = wgan_gp_update(eager_d, eager_opt), graphs.GraphedStep(wgan_gp_update(graphed_d, graphed_opt))
    outputs = []
    for call in range(4):
        real, fake, alpha = torch.rand(5, 3, 8, 8), torch.rand(5, 3, 8, 8), torch.rand(5)
        ours, theirs = graphed(real, fake, alpha, weight=10.0), eager(real, fake, alpha, weight=10.0)
        assert graphed.captured == (call >= 1)
        outputs.append(ours)
        for a, b in zip(pytree.tree_leaves(ours), pytree.tree_leaves(theirs)):
            assert torch.equal(a, b), f"call {call}"
        for (name, a), b in zip(graphed_d.named_parameters(), eager_d.parameters()):
            assert torch.equal(a, b) and torch.equal(a.grad, b.grad), f"call {call}: {name}"
    assert outputs[1]["loss"] is outputs[3]["loss"]  # replays rewrite the captured outputs


def test_graphed_step_refuses_arguments_its_graph_was_not_captured_with(stand_in_graphs):
    d = _discriminator()
    step = graphs.GraphedStep(wgan_gp_update(d, torch.optim.SGD(d.parameters(), lr=0.1)))
    real, fake, alpha = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), torch.rand(4)
    for _ in range(2):
        step(real, fake, alpha, weight=10.0)
    with pytest.raises(ValueError, match=r"argument 0 is \(3, 3, 8, 8\).*captured with \(4, 3, 8, 8\)"):
        step(real[:3], fake[:3], alpha[:3], weight=10.0)
    with pytest.raises(ValueError, match="argument 2 is .*float64"):
        step(real, fake, alpha.double(), weight=10.0)
    with pytest.raises(ValueError, match="non-tensor argument 3 is 5.0.*captured with 10.0"):
        step(real, fake, alpha, weight=5.0)
    with pytest.raises(ValueError, match="argument 2 is None|structured as"):  # None: a leaf or a node, by torch version
        step(real, fake, None, weight=10.0)
    with pytest.raises(ValueError, match="structured as"):
        step(real, fake, alpha)
    step(real, fake, alpha, weight=10.0)  # what it was captured with still replays


def test_graphed_step_checks_optimizers_and_devices():
    off_cpu = nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(ValueError, match="capturable=True"):
        graphs.GraphedStep(lambda x: x, optimizers=[torch.optim.Adam([off_cpu])])
    graphs.GraphedStep(lambda x: x, optimizers=[torch.optim.Adam([off_cpu], capturable=True)])
    # SGD has no capturable option (no step count to keep on the GPU): torch captures it as it is
    graphs.GraphedStep(lambda x: x, optimizers=[torch.optim.SGD([off_cpu], lr=0.1, momentum=0.9)])
    with pytest.raises(ValueError, match="several devices"):
        graphs.GraphedStep(lambda x, y: x)(torch.ones(2), torch.ones(2, device="meta"))


def test_graphed_step_runs_a_cpu_update_eagerly_with_a_plain_optimizer():
    """On the CPU torch's capturable optimizers do not run; a plain one is taken and the
    update runs eagerly, with one warning saying why."""
    p = nn.Parameter(torch.randn(3, dtype=torch.float64))
    optimizer = torch.optim.Adam([p], lr=0.1)
    reference = p.detach().clone().requires_grad_()
    reference_optimizer = torch.optim.Adam([reference], lr=0.1)

    def update(param, opt, x):
        opt.zero_grad()
        loss = (param * x).square().sum()
        loss.backward()
        opt.step()
        return loss.detach()

    step = graphs.GraphedStep(lambda x: update(p, optimizer, x), optimizers=[optimizer])
    with pytest.warns(RuntimeWarning, match="running eagerly: CUDA graphs need a GPU"):
        for _ in range(3):
            x = torch.randn(3, dtype=torch.float64)
            torch.testing.assert_close(step(x), update(reference, reference_optimizer, x), rtol=0, atol=0)
    assert torch.equal(p, reference) and not step.captured


def test_graphed_step_refuses_an_optimizer_state_loaded_after_its_capture(stand_in_graphs):
    p = nn.Parameter(torch.randn(3))
    optimizer = torch.optim.Adam([p], capturable=True)  # (its step runs on GPUs only; this update never steps)
    step = graphs.GraphedStep(lambda x: (p * x).sum().detach(), optimizers=[optimizer])
    x = torch.randn(3)
    for _ in range(3):
        step(x)
    optimizer.load_state_dict(optimizer.state_dict())
    with pytest.raises(RuntimeError, match="Adam's state was loaded after the capture"):
        step(x)


def test_graphed_step_runs_eagerly_off_the_gpu_and_says_why_once():
    d = _discriminator()
    eager_d = copy.deepcopy(d)
    step = graphs.GraphedStep(wgan_gp_update(d, torch.optim.SGD(d.parameters(), lr=0.1)))
    eager = wgan_gp_update(eager_d, torch.optim.SGD(eager_d.parameters(), lr=0.1))
    with pytest.warns(RuntimeWarning, match="running eagerly: CUDA graphs need a GPU; the tensors are on cpu") as said:
        for _ in range(3):
            real, fake, alpha = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), torch.rand(4)
            assert torch.equal(step(real, fake, alpha)["loss"], eager(real, fake, alpha)["loss"])
    assert len([w for w in said if "GraphedStep" in str(w.message)]) == 1 and not step.captured


def test_capture_refusal_answers_under_torch_compile(monkeypatch):
    """Every drop-in SN layer asks capture_refusal in its forward on a GPU, so torch.compile
    traces it: under tracing it must answer before the capture query, which dynamo cannot
    trace (a torch function returning a bool: fullgraph raised, and without it every layer
    broke the graph). The GPU is faked by its device name and a capture query saying no."""
    monkeypatch.setattr(torch.cuda.graphs, "_cuda_isCurrentStreamCapturing", lambda: False)
    cuda = torch.device("cuda", 0)
    assert graphs.capture_refusal(cuda) is None  # eagerly, a GPU that is not capturing can capture
    compiled = torch.compile(lambda x: x + (1 if graphs.capture_refusal(cuda) else 2), fullgraph=True)
    assert compiled(torch.zeros(2)).tolist() == [1.0, 1.0]


def test_a_step_whose_capture_fails_runs_eagerly_and_says_why_once(stand_in_graphs, monkeypatch):
    def refused(record, device):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "CapturedGraph", refused)
    d = _discriminator()
    eager_d = copy.deepcopy(d)
    step = graphs.GraphedStep(wgan_gp_update(d, torch.optim.SGD(d.parameters(), lr=0.1)))
    eager = wgan_gp_update(eager_d, torch.optim.SGD(eager_d.parameters(), lr=0.1))
    with pytest.warns(RuntimeWarning, match=r"running eagerly: the capture failed \(CUDA error: operation not") as said:
        for _ in range(4):
            real, fake, alpha = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), torch.rand(4)
            assert torch.equal(step(real, fake, alpha)["loss"], eager(real, fake, alpha)["loss"])
    assert len([w for w in said if "GraphedStep" in str(w.message)]) == 1 and not step.captured


@pytest.mark.parametrize("setup", [["architecture=sndcgan", "loss=ns", "d_norm=spectral", "penalty=none", "n_disc=1"],
                                   ["architecture=resnet_cifar", "loss=wgan", "d_norm=none", "penalty=wgan-gp", "n_disc=2"],
                                   ["architecture=sndcgan", "mixed_batches=true", "lens_steps=3", "n_disc=1"]])
def test_the_trainers_captured_updates_are_graphed_steps(monkeypatch, tmp_path, setup):
    """The trainer with cuda_graphs runs its D and G updates through GraphedSteps: with the
    stand-in graph (and plain Adam: torch's capturable Adam runs on GPUs only) four iterations
    give the eager trainer's numbers bit for bit, both kinds of update end up replayed, and
    the penalty seed the trainer draws anew each update stays out of the graph's arguments."""
    use_stand_in_training_graphs(monkeypatch)
    common = setup + ["device=cpu", "image_size=32", "width=0.125", "batch_size=4", "fid_every=0",
                      "sample_every=0", "checkpoint_every=0", "log_every=0", "progress=false"]
    real = torch.rand(4, 3, 32, 32)
    eager = Trainer(load_config(None, common + [f"out_dir={tmp_path / 'eager'}"]), stream=RepeatedBatch(real))
    graphed = Trainer(load_config(None, common + [f"out_dir={tmp_path / 'graphed'}", "cuda_graphs=true"]),
                      stream=RepeatedBatch(real))
    assert isinstance(graphed.updates, CapturedStep)
    for iteration in range(4):
        ours, theirs = graphed.train_step(), eager.train_step()
        assert all(torch.equal(ours[key], theirs[key]) for key in theirs), (iteration, ours, theirs)
    assert graphed.updates.captured
    # the captured updates keep their optimizers' guards: a parameter moved after the capture is refused
    weight = next(graphed.D.parameters())
    weight.data = weight.data.clone()
    with pytest.raises(RuntimeError, match="moved to new memory after the capture"):
        graphed.train_step()


@pytest.fixture
def capturing(monkeypatch):
    """gradient_penalty called as if a CUDA graph were recording it."""
    monkeypatch.setattr(graphs, "is_capturing", lambda device: True)


def _penalty_at(d, point, kind):
    point = point.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(d(point).sum(), point, create_graph=True)
    return gp_reference.penalty(grad, kind in gp_reference.SQUARED_NORM_KINDS, 1.0, 1e-4, False)[0]


def test_captured_penalty_draws_alpha_and_noise_from_torchs_generator(capturing):
    """Under capture α and DRAGAN's noise come from torch.rand on the tensors' device (drawn
    anew by every replay), not from a host seed a graph would keep."""
    d = _discriminator().double()
    real, fake = torch.rand(6, 3, 8, 8, dtype=torch.float64), torch.rand(6, 3, 8, 8, dtype=torch.float64)
    torch.manual_seed(11)
    captured = gradient_penalty(d, real, fake, "wgan-gp")
    torch.manual_seed(11)
    alpha = torch.rand(6).double().view(-1, 1, 1, 1)
    torch.testing.assert_close(captured, _penalty_at(d, real + alpha * (fake - real), "wgan-gp"), rtol=1e-12, atol=0)
    torch.manual_seed(12)
    captured = gradient_penalty(d, real, None, "dragan")
    torch.manual_seed(12)
    point = gp_reference.dragan_with_noise(real, torch.rand(real.shape))
    torch.testing.assert_close(captured, _penalty_at(d, point, "dragan"), rtol=1e-12, atol=0)


def test_captured_penalty_keeps_int_seeds_and_refuses_generators(monkeypatch):
    d = _discriminator()
    real, fake = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    eager = gradient_penalty(d, real, fake, "wgan-gp", generator=5)
    monkeypatch.setattr(graphs, "is_capturing", lambda device: True)
    assert torch.equal(gradient_penalty(d, real, fake, "wgan-gp", generator=5), eager)
    with pytest.raises(ValueError, match="torch.Generator is read on the host once"):
        gradient_penalty(d, real, fake, "wgan-gp", generator=torch.Generator().manual_seed(0))
    gradient_penalty(d, real, fake, "r1", generator=torch.Generator())  # R1 draws nothing


def test_graphs_is_part_of_the_package():
    assert fastgan.graphs is graphs and "GraphedStep" in graphs.__all__


def test_the_graphed_wgan_gp_example_runs():
    """examples/graphed_wgan_gp.py on the CPU: GraphedStep runs eagerly (and says so), so the
    two copies take exactly the same updates."""
    path = Path(__file__).resolve().parent.parent / "examples" / "graphed_wgan_gp.py"
    spec = importlib.util.spec_from_file_location("graphed_wgan_gp", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.warns(RuntimeWarning, match="running eagerly"):
        eager, graphed, apart = example.main(["--steps", "3", "--batch", "2", "--device", "cpu"])
    assert eager == graphed and apart == 0.0


def test_a_warm_up_that_raised_is_retried_before_the_capture(stand_in_graphs):
    """A first call that raised (a bad batch, an OOM) warmed nothing up: the next call is
    the warm-up again, not the capture (a capture records Adam's lazy state initialisation,
    which every replay would then rerun, zeroing its moments)."""
    d = _discriminator()
    update = wgan_gp_update(d, torch.optim.SGD(d.parameters(), lr=0.1))
    step = graphs.GraphedStep(update)
    real, fake, alpha = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), torch.rand(4)
    with pytest.raises(ValueError, match="same shape"):
        step(real[:, :2], fake, alpha)
    step(real, fake, alpha)
    assert not step.captured
    step(real, fake, alpha)
    assert step.captured


def test_graphed_step_keeps_an_input_that_requires_grad(stand_in_graphs):
    """An update that differentiates with respect to an input the caller marked (an R1-style
    penalty on ``real.requires_grad_()``): the graph's input buffer requires grad as the
    argument did, and copying the next argument into it is not an autograd in-place error."""
    d = _discriminator().double()

    def update(real):
        (grad,) = torch.autograd.grad(d(real).sum(), real, create_graph=True)
        return grad.square().sum().detach()

    step = graphs.GraphedStep(update)
    for call in range(4):
        real = torch.rand(3, 3, 8, 8, dtype=torch.float64).requires_grad_()
        torch.testing.assert_close(step(real), update(real), rtol=1e-12, atol=0, msg=f"call {call}")
    assert step.captured


@pytest.mark.parametrize("change", ["to_double", "channels_last", "data"])
def test_graphed_step_refuses_parameters_moved_after_its_capture(stand_in_graphs, change):
    """A graph reads and updates the parameters' memory of its capture: after model.double(),
    model.to(memory_format=...) or ``p.data = ...`` a replay would update freed memory while the
    model never trains, so it raises instead."""
    d = _discriminator()
    optimizer = torch.optim.SGD(d.parameters(), lr=0.1)
    step = graphs.GraphedStep(wgan_gp_update(d, optimizer), optimizers=[optimizer])
    real, fake, alpha = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8), torch.rand(4)
    for _ in range(3):
        step(real, fake, alpha)
    if change == "to_double":
        d.double()
    elif change == "channels_last":
        d.to(memory_format=torch.channels_last)
    else:
        d[-1].bias.data = d[-1].bias.data.clone()
    with pytest.raises(RuntimeError, match="SGD's parameter .* moved to new memory after the capture"):
        step(real, fake, alpha)


def test_each_gpu_captures_on_a_side_stream_of_its_own(monkeypatch):
    """torch.cuda.graph's default capture stream is one per process, on the GPU current at the
    first capture, and entering it switches to that GPU: a capture for another GPU would record
    nothing. CapturedGraph passes a stream of its own device (made once per GPU). CUDA is
    replaced by recorders here; what is checked is which stream each capture is given."""
    made, captures = [], []

    class Stream:
        def __init__(self, device):
            self.device = device
            made.append(self)

    @contextlib.contextmanager
    def graph(cuda_graph, stream=None, capture_error_mode="global"):
        captures.append((stream, capture_error_mode))
        yield

    monkeypatch.setattr(graphs, "_CAPTURE_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", object)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    for index in (1, 0, 1):
        assert graphs.CapturedGraph(lambda: "recorded", torch.device("cuda", index)).output == "recorded"
    assert [stream.device for stream in made] == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert [stream for stream, _ in captures] == [made[0], made[1], made[0]]
    assert {mode for _, mode in captures} == {"thread_local"}
