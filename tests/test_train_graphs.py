"""GPU only (marked cuda, skipped where no GPU is visible): the trainer's D and G updates
captured as CUDA graphs (``cuda_graphs: true``) and replayed give what the eager updates
give from the same state and inputs, for the two benchmarked setups (SNDCGAN NS + SN,
n_disc 1; ResNet CIFAR WGAN-GP, n_disc 5) and with bf16 autocast.

Every update starts from the same state: the eager step's weights, buffers and Adam moments
are copied into the captured step's (in place, where its graphs read them) first. Left to
run side by side the two drift apart however right the graphs are -- cuDNN's backward
kernels do not sum in a fixed order, and Adam turns a round-off gradient into a step of
±lr -- and on an H200 six updates took logits 4e-3 apart. From the same state, what an
update reports (logits, losses, penalties, computed before its optimizer step) agrees to
float32 round-off (bf16 under autocast), and the weights it leaves to 1e-3: a few lr
(2e-4), where Adam saw a gradient of pure round-off. A replay that read a stale batch, a
stale weight or skipped an optimizer step would be off by far more.

Also here: the data stream's two GPU paths (the uint8 set resident on the device, and
pinned host batches prefetched by a thread) serve exactly the CPU's batches."""
import copy

import numpy as np
import pytest
import torch

from conftest import CUDA_ONLY
from fastgan.train.data import ImageData
from fastgan.train.stream import BatchStream
from fastgan.train.config import load_config
from fastgan.train.runtime import Runtime
from fastgan.train.step import CapturedStep, GANStep, build_step
from fastgan.train.stream import RepeatedBatch
from fastgan.train.trainer import Trainer, draw_latents, models_for

pytestmark = CUDA_ONLY

SETUPS = {
    "sndcgan-ns-sn": ["architecture=sndcgan", "loss=ns", "d_norm=spectral", "penalty=none", "n_disc=1"],
    "resnet-wgan-gp": ["architecture=resnet_cifar", "loss=wgan", "d_norm=none", "penalty=wgan-gp", "n_disc=5"],
    "sndcgan-hinge-r1-amp": ["architecture=sndcgan", "loss=hinge", "d_norm=spectral", "penalty=r1", "n_disc=1", "amp=true"],
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_captured_updates_equal_eager_ones(tmp_path, setup):
    config = load_config(None, SETUPS[setup] + ["image_size=32", "width=0.5", "batch_size=16", "device=cuda",
                                                f"out_dir={tmp_path}", "tf32=false"])
    runtime = Runtime(device=torch.device("cuda"))
    torch.manual_seed(0)
    G, D = (m.cuda() for m in models_for(config))
    G2, D2 = copy.deepcopy(G), copy.deepcopy(D)
    eager = GANStep(G, D, config, runtime)
    captured = build_step(G2, D2, config, runtime, cuda_graphs=True)
    assert isinstance(captured, CapturedStep)
    draws = torch.Generator().manual_seed(1)
    reported = dict(rtol=2.0 ** -7, atol=1e-3) if config.amp else dict(rtol=1e-4, atol=1e-5)

    def update(kind, *inputs):
        _copy_state(eager, captured.step)
        ours = getattr(captured, kind)(*inputs)
        theirs = getattr(eager, kind)(*inputs)
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], **reported,
                                       msg=lambda why: f"update {iteration} {kind}, {key}: {why}")
        for model in ("G", "D"):
            mine, its = getattr(captured, model).state_dict(), getattr(eager, model).state_dict()
            for key, value in its.items():
                if value.is_floating_point():
                    torch.testing.assert_close(mine[key], value, rtol=1e-3, atol=1e-3,
                                               msg=lambda why: f"update {iteration} {kind}, {model}.{key}: {why}")

    with runtime.numerics(deterministic=False, tf32=False):
        for iteration in range(6):  # update 1 eager (warm-up), 2 captured, 3-6 replayed
            for _ in range(config.n_disc):
                real = torch.rand(16, 3, 32, 32, generator=draws).cuda()
                z = draw_latents(16, config, draws).cuda()
                alpha = torch.rand(16, generator=draws).cuda() if config.penalty == "wgan-gp" else None
                update("discriminator_update", real, z, alpha, 7)
            update("generator_update", draw_latents(16, config, draws).cuda())
    assert captured.captured  # replayed, not fallen back to eager


@torch.no_grad()
def _copy_state(source: GANStep, target: GANStep) -> None:
    """``target`` takes ``source``'s weights, buffers and optimizer moments, in place."""
    for model in ("G", "D"):
        theirs = getattr(source, model).state_dict()
        for key, mine in getattr(target, model).state_dict().items():
            mine.copy_(theirs[key])
    for optimizer in ("g_optimizer", "d_optimizer"):
        source_optimizer, target_optimizer = getattr(source, optimizer), getattr(target, optimizer)
        for theirs, mine in zip(source_optimizer.param_groups[0]["params"], target_optimizer.param_groups[0]["params"]):
            for key, value in source_optimizer.state[theirs].items():
                target_optimizer.state[mine][key].copy_(value)

def test_a_captured_run_resumes_like_an_eager_one(tmp_path):
    """A trainer with cuda_graphs replays from its second iteration on; its checkpoint resumes."""
    overrides = ["image_size=32", "width=0.25", "batch_size=16", "device=cuda", "fid_every=0", "sample_every=0",
                 "log_every=1", "progress=false", "steps=6", "checkpoint_every=3", "cuda_graphs=true"]
    real = torch.rand(16, 3, 32, 32, device="cuda")
    run = Trainer(load_config(None, overrides + [f"out_dir={tmp_path / 'a'}"]), stream=RepeatedBatch(real))
    assert isinstance(run.updates, CapturedStep)
    assert run.fit()["finished"] and run.updates.captured
    first = Trainer(load_config(None, overrides + ["steps=3", f"out_dir={tmp_path / 'b'}"]), stream=RepeatedBatch(real))
    first.fit()
    resumed = Trainer(load_config(None, overrides + [f"out_dir={tmp_path / 'b'}"]), stream=RepeatedBatch(real), resume=True)
    resumed.fit()
    for key, value in run.G.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(resumed.G.state_dict()[key], value, rtol=1e-3, atol=1e-3, msg=lambda why: f"{key}: {why}")


def test_the_streams_gpu_paths_serve_the_cpus_batches():
    data = ImageData(np.random.default_rng(0).integers(0, 256, (50, 8, 8, 3), dtype=np.uint8), "random")
    gpu = Runtime(device=torch.device("cuda"))
    cpu = BatchStream(data, 16, 0, Runtime())
    resident = BatchStream(data, 16, 0, gpu)  # 9.6 kB: resident by size
    prefetched = BatchStream(data, 16, 0, gpu, resident=False)
    assert resident.resident and not prefetched.resident
    for _ in range(7):  # over two epochs
        expected = cpu.next()
        assert torch.equal(resident.next().cpu(), expected)
        assert torch.equal(prefetched.next().cpu(), expected)
    prefetched.close()
