"""GPU only (marked cuda, skipped where no GPU is visible): the trainer's D and G updates
captured as CUDA graphs (``cuda_graphs: true``) and replayed give what the eager updates
give from the same state and inputs, to float32 round-off, for the two benchmarked setups
(SNDCGAN NS + SN, n_disc 1; ResNet CIFAR WGAN-GP, n_disc 5) and with bf16 autocast.

Parameters are compared to 1e-3 absolute: Adam moves a weight by about ±lr (2e-4) whatever
its gradient's size, so the pure round-off gradients of biases before batch norm can
differ by a few lr between any two summation orders (cuDNN's backward kernels do not sum
in a fixed order). Logits and losses, which those weights feed, get 3e-3 absolute (on an
H200 they drifted apart by up to 9e-4 over six updates); under bf16 autocast also two
bf16 steps (2^-6) relative. A replay that read a stale batch or skipped an optimizer step
would be off by far more.

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
    close = dict(rtol=2.0 ** -6 if config.amp else 1e-3, atol=3e-3)
    with runtime.numerics(deterministic=False, tf32=False):
        for iteration in range(6):  # update 1 eager (warm-up), 2 captured, 3-6 replayed
            for _ in range(config.n_disc):
                real = torch.rand(16, 3, 32, 32, generator=draws).cuda()
                z = draw_latents(16, config, draws).cuda()
                alpha = torch.rand(16, generator=draws).cuda() if config.penalty == "wgan-gp" else None
                ours, theirs = captured.discriminator_update(real, z, alpha, 7), eager.discriminator_update(real, z, alpha, 7)
                for key in theirs:
                    torch.testing.assert_close(ours[key], theirs[key], **close,
                                               msg=lambda why: f"update {iteration}, {key}: {why}")
            z = draw_latents(16, config, draws).cuda()
            torch.testing.assert_close(captured.generator_update(z)["g_loss"], eager.generator_update(z)["g_loss"],
                                       **close, msg=lambda why: f"update {iteration}, g_loss: {why}")
    torch.cuda.synchronize()
    for a, b in ((G, G2), (D, D2)):
        for (key, ours), theirs in zip(b.state_dict().items(), a.state_dict().values()):
            if ours.is_floating_point():
                torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-3, msg=lambda why: f"{key}: {why}")


def test_a_captured_run_resumes_like_an_eager_one(tmp_path):
    """A trainer with cuda_graphs replays from its second iteration on; its checkpoint resumes."""
    overrides = ["image_size=32", "width=0.25", "batch_size=16", "device=cuda", "fid_every=0", "sample_every=0",
                 "log_every=1", "progress=false", "steps=6", "checkpoint_every=3", "cuda_graphs=true"]
    real = torch.rand(16, 3, 32, 32, device="cuda")
    run = Trainer(load_config(None, overrides + [f"out_dir={tmp_path / 'a'}"]), stream=RepeatedBatch(real))
    assert isinstance(run.updates, CapturedStep)
    assert run.fit()["finished"]
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
