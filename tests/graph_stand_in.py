"""A CUDA graph's contract on the CPU, for tests of what captures and replays: fastgan.graphs,
apply_spectral_norm's replayed refresh, the trainer's captured updates and the benchmarks'
graphed entries. CI has no GPU; with this stand-in the code around every capture runs there.
Also the hand-written update those tests capture, on the CPU and on the GPU alike."""
from torch.utils import _pytree as pytree

from fastgan import graphs
from fastgan.penalties import gradient_penalty
from fastgan.train import step


class RerunGraph:
    """Capturing runs nothing; each replay reruns the recorded work and writes its result into
    the output tensors of the first replay (any nesting), as a replay rewrites a graph's outputs."""

    replays = 0

    def __init__(self, record, device):
        self.record, self.output = record, None

    def replay(self):
        RerunGraph.replays += 1
        result = self.record()
        if self.output is None:
            self.output = result
        else:
            for static, new in zip(pytree.tree_leaves(self.output), pytree.tree_leaves(result)):
                static.copy_(new)
        return self.output


def use_stand_in_graphs(monkeypatch) -> None:
    """fastgan.graphs captures with :class:`RerunGraph` wherever it is asked to, CPU tensors included."""
    monkeypatch.setattr(graphs, "capture_refusal", lambda device: None)
    monkeypatch.setattr(graphs, "CapturedGraph", RerunGraph)
    monkeypatch.setattr(graphs, "on_side_stream", lambda fn: fn())


def use_stand_in_training_graphs(monkeypatch) -> None:
    """The same for the trainer's ``cuda_graphs``, on the CPU: its setups count as capturable, and
    its updates use plain Adam (torch's capturable Adam runs on GPUs only)."""
    use_stand_in_graphs(monkeypatch)
    monkeypatch.setattr(step, "why_not_capturable", lambda *args, **kwargs: None)
    monkeypatch.setattr(step, "adam_options", lambda capturable, device_type: {})
    monkeypatch.setattr(step, "GraphedStep", graphs.GraphedStep)




def wgan_gp_update(d, optimizer):
    """A hand-written WGAN-GP update of ``d``: (real, fake, alpha, weight=10) -> {"loss", "penalty": [...]}
    (a keyword argument and a nested output, which GraphedStep must carry through)."""
    def update(real, fake, alpha, *, weight=10.0):
        optimizer.zero_grad(set_to_none=True)
        penalty = gradient_penalty(d, real, fake, "wgan-gp", alpha=alpha)
        loss = d(fake).mean() - d(real).mean() + weight * penalty
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach(), "penalty": [penalty.detach()]}
    return update
