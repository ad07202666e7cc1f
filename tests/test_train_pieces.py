"""The trainer's pieces through their public seams: the data stream, the runtime's switches,
the step builder's CUDA-graph fallback, the callbacks' schedule, the GPU-speed options on CPU.

CUDA-graph capture itself needs a GPU: tests/test_train_graphs.py (marked cuda)."""
import copy
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastgan.train.callbacks import Callback
from fastgan.train.config import load_config
from fastgan.train.data import ImageData
from fastgan.train.runtime import PATIENT_TIMEOUT, Runtime
from fastgan.train.step import CapturedStep, GANStep, adam_options, load_optimizer_state, build_step, why_not_capturable
from fastgan.train.stream import BatchStream, RepeatedBatch
from fastgan.train.trainer import Trainer, models_for
from training_support import TINY_TRAINING

TINY = TINY_TRAINING


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_config(tmp_path, *overrides):
    return load_config(None, TINY + [f"out_dir={tmp_path / 'run'}", *overrides])


def random_images(count=37, size=6, seed=0):
    return ImageData(np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8), "random")


# ------------------------------------------------------------------ the data stream


def test_stream_batches_are_the_data_sets_images_in_a_seeded_epoch_order():
    data = random_images()
    stream = BatchStream(data, batch_size=8, seed=3, runtime=Runtime())
    assert len(stream) == 4  # 37 // 8, the last partial batch dropped
    seen = []
    for position in range(4):
        batch = stream.next()
        indices = stream.indices(position)
        assert batch.dtype == torch.float32 and batch.shape == (8, 3, 6, 6)
        assert torch.equal(batch, data.batch(indices))  # x / 255, the same values ImageData serves
        seen += indices.tolist()
    assert len(set(seen)) == 32  # one epoch: no image twice
    assert not torch.equal(stream.indices(4), stream.indices(0))  # the next epoch is reshuffled
    again = BatchStream(data, batch_size=8, seed=3, runtime=Runtime())
    assert torch.equal(again.indices(2), stream.indices(2))


def test_a_read_only_data_set_is_served_without_a_warning():
    """A memory-mapped data set opened read-only is copied whole to the device without torch's
    non-writable-array warning (it warns once per process, hence a fresh one)."""
    script = (
        "import warnings, numpy as np, torch\n"
        "from fastgan.train.data import ImageData\n"
        "from fastgan.train.runtime import Runtime\n"
        "from fastgan.train.stream import BatchStream\n"
        "images = np.random.default_rng(0).integers(0, 256, (9, 4, 4, 3), dtype=np.uint8)\n"
        "images.flags.writeable = False\n"
        "warnings.simplefilter('error')\n"
        "stream = BatchStream(ImageData(images, 'read-only'), 4, 0, Runtime(), resident=True)\n"
        "assert torch.equal(stream.next(), stream.data.batch(stream.indices(0)))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)


def test_stream_resident_gathered_float64_channels_last_and_resume_agree():
    data = random_images()
    gathered = BatchStream(data, 8, 0, Runtime(), resident=False)
    resident = BatchStream(data, 8, 0, Runtime(), resident=True)  # the whole uint8 set as one tensor
    wide = BatchStream(data, 8, 0, Runtime(), torch.float64, channels_last=True)
    for _ in range(6):
        a, b, c = gathered.next(), resident.next(), wide.next()
        assert torch.equal(a, b)
        assert c.dtype == torch.float64 and c.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(c, a.double(), rtol=0, atol=1e-7)  # float32 rounding of x / 255
    resumed = BatchStream(data, 8, 0, Runtime())
    resumed.load_state_dict(gathered.state_dict())
    assert torch.equal(resumed.next(), gathered.next())


def test_stream_serves_each_rank_its_share_of_the_global_batch():
    data = random_images()
    whole = BatchStream(data, 8, 0, Runtime()).next()
    halves = [BatchStream(data, 8, 0, Runtime(rank=r, world=2)).next() for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)


def test_stream_refuses_a_batch_larger_than_the_data_set():
    with pytest.raises(ValueError, match="fewer than batch_size"):
        BatchStream(random_images(5), 8, 0, Runtime())


# ------------------------------------------------------------------ the runtime


def test_numerics_set_tf32_determinism_and_autotuning_for_the_run_and_restore_them():
    def switches():
        return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark)

    before = switches()
    with Runtime().numerics(deterministic=True, tf32=True):
        assert switches() == (True, True, True, False)
    with Runtime().numerics(deterministic=False, tf32=False):
        assert switches()[:3] == (False, False, False)
    with Runtime().numerics(deterministic=False, tf32=True, cudnn_benchmark=True):
        assert switches() == (True, True, False, True)
    with Runtime().numerics(deterministic=True, tf32=False, cudnn_benchmark=True):  # determinism wins
        assert switches() == (False, False, True, False)
    assert switches() == before


def test_config_refuses_autotuning_with_determinism():
    with pytest.raises(ValueError, match="cudnn_benchmark=true .* deterministic=true"):
        load_config(None, ["cudnn_benchmark=true", "deterministic=true"])


def test_runtime_slices_and_agrees_in_one_process():
    assert Runtime().any(True) and not Runtime().any(False)
    assert torch.equal(Runtime(rank=2, world=3).rank_share(torch.arange(6)), torch.tensor([4, 5]))


@pytest.mark.parametrize("world,local_rank,expected", [(1, None, "cuda:0"), (2, "1", "cuda:1")])
def test_runtime_gives_the_gpu_an_index_and_picks_the_process_groups_backend(world, local_rank, expected, monkeypatch):
    """``device=auto``/``cuda`` name no GPU index, which torch.cuda.set_device refuses: the runtime
    takes the current GPU in one process and LOCAL_RANK's under torchrun (faked GPU: none is here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    selected, groups = [], []
    monkeypatch.setattr(torch.cuda, "set_device", selected.append)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: bool(groups))
    monkeypatch.setattr(torch.distributed, "init_process_group", groups.append)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: int(local_rank))
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: world)
    monkeypatch.setattr(torch.distributed, "new_group", lambda **options: options)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    if local_rank is not None:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    for device in ("auto", "cuda"):
        groups.clear()
        runtime = Runtime.from_environment(device)
        assert runtime.device == torch.device(expected) and selected[-1] == torch.device(expected)
        assert groups == (["nccl"] if world > 1 else [])
        # the patient barrier's group: gloo (it waits on the host), with the long timeout
        assert runtime.patient_group == ({"backend": "gloo", "timeout": PATIENT_TIMEOUT} if world > 1 else None)
    groups.clear()
    assert Runtime.from_environment("cpu").device == torch.device("cpu")  # gloo for a CPU run, GPU or not
    assert groups == (["gloo"] if world > 1 else [])


def test_optimizer_state_resumes_across_eager_and_captured_runs(tmp_path):
    """A checkpoint's Adam state keeps the resuming step's ``capturable`` (torch's load_state_dict
    would take the saved one): a captured GPU run resumed eagerly or on the CPU still steps, and an
    eager run resumed with CUDA graphs gets capturable optimizers with float32 step counts
    (what capture needs; the capture itself is tests/test_train_graphs.py's, on a GPU)."""
    config = tiny_config(tmp_path, "z_dim=8")
    torch.manual_seed(0)
    G, D = models_for(config)
    eager = GANStep(G, D, config)
    eager.discriminator_update(torch.rand(8, 3, 16, 16), torch.randn(8, 8))
    eager.generator_update(torch.randn(8, 8))
    saved = eager.state_dict()
    as_if_captured = copy.deepcopy(saved)  # a captured run's checkpoint, as torch.load(map_location="cpu") gives it
    for optimizer in as_if_captured.values():
        for group in optimizer["param_groups"]:
            group["capturable"] = True
        for per_param in optimizer["state"].values():
            per_param["step"] = per_param["step"].to(torch.float32)

    resumed = GANStep(*models_for(config), config)
    resumed.load_state_dict(as_if_captured)
    for optimizer in (resumed.g_optimizer, resumed.d_optimizer):
        assert not optimizer.param_groups[0]["capturable"]
    resumed.discriminator_update(torch.rand(8, 3, 16, 16), torch.randn(8, 8))  # raised before: capturable on the CPU
    resumed.generator_update(torch.randn(8, 8))

    capturing = GANStep(*models_for(config), config, capturable=True)
    capturing.load_state_dict(saved)
    for optimizer in (capturing.g_optimizer, capturing.d_optimizer):
        assert optimizer.param_groups[0]["capturable"]
        assert all(st["step"].dtype == torch.float32 and st["step"].item() == 1 for st in optimizer.state.values())


def test_optimizer_state_resumes_into_and_out_of_a_fused_adam():
    """Eager GPU updates use the fused Adam, whose step counts live on the parameters' device:
    an unfused run's checkpoint loads into it and steps, and back (the CPU's fused Adam stands in)."""
    def adam(fused):
        return torch.optim.Adam([torch.nn.Parameter(torch.randn(5, 3, generator=torch.Generator().manual_seed(1)))],
                                lr=1e-3, betas=(0.5, 0.999), **adam_options(False, "cuda" if fused else "cpu"))

    def one_update(optimizer):
        param = optimizer.param_groups[0]["params"][0]
        param.grad = torch.randn(5, 3, generator=torch.Generator().manual_seed(2))
        optimizer.step()
        return param.detach().clone()

    plain, fused = adam(fused=False), adam(fused=True)
    assert fused.param_groups[0]["fused"] and not plain.param_groups[0]["fused"]
    torch.testing.assert_close(one_update(fused), one_update(plain))  # the same algorithm
    resumed_fused, resumed_plain = adam(fused=True), adam(fused=False)
    load_optimizer_state(resumed_fused, plain.state_dict())
    load_optimizer_state(resumed_plain, fused.state_dict())
    assert resumed_fused.param_groups[0]["fused"] and not resumed_plain.param_groups[0]["fused"]
    (fused_state,), (plain_state,) = resumed_fused.state.values(), resumed_plain.state.values()
    assert fused_state["step"].dtype == torch.float32 and plain_state["step"].device.type == "cpu"
    torch.testing.assert_close(one_update(resumed_fused), one_update(resumed_plain))


# ------------------------------------------------------------------ CUDA graphs: when they fall back


def test_why_a_setup_is_not_captured(tmp_path):
    config = tiny_config(tmp_path, "cuda_graphs=true")
    G, D = models_for(config)
    assert "need a GPU" in why_not_capturable(config, Runtime(), G, D)
    gpu = Runtime(device=torch.device("cuda"))  # only the device type is looked at
    assert why_not_capturable(config, gpu, G, D) is None
    assert "multi-process" in why_not_capturable(config, Runtime(rank=0, world=2, device=torch.device("cuda")), G, D)
    assert "DRAGAN" in why_not_capturable(config.replace(penalty="dragan"), gpu, G, D)
    handle = D.layers[3].register_forward_hook(lambda module, inputs, output: None)
    assert re.search(r"SNDCGANDiscriminator\.layers\.3 has a user hook", why_not_capturable(config, gpu, G, D))
    handle.remove()
    assert why_not_capturable(config, gpu, G, D) is None  # spectral norm's own hooks are fastgan's
    handle = torch.nn.modules.module.register_module_forward_hook(lambda module, inputs, output: None)
    try:
        assert "global module hook" in why_not_capturable(config, gpu, G, D)
    finally:
        handle.remove()


def test_cuda_graphs_on_the_cpu_train_eagerly_and_say_why_in_one_line(tmp_path, capsys):
    trainer = Trainer(tiny_config(tmp_path, "cuda_graphs=true", "steps=2"))
    assert isinstance(trainer.updates, GANStep) and not isinstance(trainer.updates, CapturedStep)
    lines = [line for line in capsys.readouterr().err.splitlines() if "cuda_graphs" in line]
    assert lines == ["cuda_graphs: running eagerly: CUDA graphs need a GPU; the device is cpu"]
    assert trainer.fit()["finished"]
    config = tiny_config(tmp_path, "cuda_graphs=true")
    said = []
    assert isinstance(build_step(*models_for(config), config, announce=said.append), GANStep) and len(said) == 1
    assert build_step(*models_for(config), config, cuda_graphs=False, announce=said.append) and len(said) == 1


def test_compile_and_cuda_graphs_are_not_combined():
    with pytest.raises(ValueError, match="compile=true and cuda_graphs=true cannot be combined"):
        load_config(None, ["compile=true", "cuda_graphs=true"])


# ------------------------------------------------------------------ options on the CPU


def _parameters_after(tmp_path, name, *overrides, steps=2):
    torch.manual_seed(0)
    trainer = Trainer(tiny_config(tmp_path, f"steps={steps}", f"out_dir={tmp_path / name}", *overrides))
    trainer.fit()
    return {f"{m}.{k}": v for m, module in (("G", trainer.G), ("D", trainer.D)) for k, v in module.state_dict().items()}


def _assert_same_training(a, b):
    """To round-off, in float64: in float32, Adam turns the pure round-off gradients of biases
    before batch norm into ±lr steps, so two summation orders part at ~lr."""
    scale = max(float(v.abs().max()) for v in a.values() if v.is_floating_point())
    for key, value in a.items():
        if value.is_floating_point():
            torch.testing.assert_close(b[key], value, rtol=0, atol=1e-10 * scale, msg=key)


def test_channels_last_gives_the_same_training(tmp_path):
    _assert_same_training(_parameters_after(tmp_path, "nchw", "penalty=wgan-gp", "dtype=float64"),
                          _parameters_after(tmp_path, "nhwc", "penalty=wgan-gp", "dtype=float64", "channels_last=true"))


@pytest.mark.slow
def test_compiled_forwards_give_the_same_training(tmp_path, monkeypatch):
    """torch.compile of G and of D's first-order forwards (the penalty double-backwards
    through the eager D): the same parameters as eager after two iterations. Compiled with
    the aot_eager backend: dynamo's capture (spectral norm's hooks included) and AOTAutograd's
    forward/backward split are what the trainer relies on; inductor's code generation would
    take minutes of this CPU for tiny models."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    _assert_same_training(_parameters_after(tmp_path, "eager", "penalty=wgan-gp", "dtype=float64"),
                          _parameters_after(tmp_path, "compiled", "penalty=wgan-gp", "dtype=float64", "compile=true"))


# ------------------------------------------------------------------ the loop's seams


class Record(Callback):
    def __init__(self):
        self.events = []

    def start(self, trainer):
        self.events.append(("start", trainer.step))

    def after(self, trainer, out):
        self.events.append(("after", trainer.step, sorted(out)))

    def end(self, trainer):
        self.events.append(("end", trainer.step))


def test_callbacks_see_every_iteration_and_frequencies_count_discriminator_updates(tmp_path):
    record = Record()
    real = torch.rand(8, 3, 16, 16)
    trainer = Trainer(tiny_config(tmp_path, "n_disc=3", "steps=12", "log_every=4"), stream=RepeatedBatch(real),
                      callbacks=[record])
    trainer.fit()
    keys = ["d_loss", "fake_logit", "g_loss", "real_logit"]
    assert record.events == [("start", 0), *[("after", s, keys) for s in (3, 6, 9, 12)], ("end", 12)]
    assert trainer.stream.batches_drawn == 12  # the repeated batch stands in for the data
    # log_every=4 with 3 steps per iteration: logged when an iteration reaches 4, 8, 12
    assert [r["step"] for r in trainer.log.records] == [6, 9, 12]


def test_a_run_trains_under_its_numerics_and_restores_the_callers(tmp_path):
    class Switches(Callback):
        def start(self, trainer):
            self.seen = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)

    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32)
    switches = Switches()
    Trainer(tiny_config(tmp_path, "steps=1", "cudnn_benchmark=true", "tf32=true"), callbacks=[switches]).fit()
    assert switches.seen == (True, True)
    assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32) == before


def test_the_progress_bar_shows_images_per_second(tmp_path, capsys):
    Trainer(tiny_config(tmp_path, "steps=3", "progress=true")).fit()
    assert re.search(r"img/s=\d+", capsys.readouterr().err)


def test_the_progress_bars_gpu_memory_is_the_peak_of_this_run(monkeypatch, capsys):
    """Runs in one process (a study's trials) share CUDA's peak counter: without a reset at
    the start, each run's bar showed the largest peak of any earlier run. Stands in for CUDA's
    counters on a CPU-only machine."""
    from types import SimpleNamespace

    from fastgan.train.callbacks import Progress

    memory = {"allocated": 0, "peak": 0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: memory["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device=None: memory.update(peak=memory["allocated"]))

    def run(peak_gib):
        trainer = SimpleNamespace(step=0, config=SimpleNamespace(steps=1, progress=True, batch_size=8),
                                  runtime=SimpleNamespace(rank=0, device=torch.device("cuda", 0)))
        progress = Progress()
        progress.start(trainer)
        memory["allocated"], memory["peak"] = 2**30, max(memory["peak"], peak_gib * 2**30)
        trainer.step = 1
        progress.after(trainer, {})
        shown = progress.postfix["mem"]
        progress.end(trainer)
        memory["allocated"] = 0  # the run's tensors freed
        return shown

    assert run(peak_gib=5) == "5.00GiB"
    assert run(peak_gib=2) == "2.00GiB"


def _patient_worker(rank, world, init_file, result_pattern, wait):
    import datetime
    import time

    import torch.distributed as dist
    from conftest import exit_worker

    # a collective timeout far shorter than rank 0's work, as NCCL's 10 minutes are for decoding LSUN
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=2))
    runtime = Runtime.from_environment("cpu")
    if rank == 0:
        time.sleep(6)  # the long work rank 0 does alone
    getattr(runtime, wait)()
    with open(result_pattern.format(rank), "w") as done:
        done.write("through")
    exit_worker()


def test_processes_wait_for_rank_zeros_long_work_beyond_the_collective_timeout(tmp_path):
    """While rank 0 alone decodes a data set or extracts the FID's real features, the others wait
    in patient_barrier, whose gloo group outlasts the process group's collective timeout (here
    2 s against 6 s of work; a plain barrier there fails at the timeout)."""
    import torch.multiprocessing as mp

    pattern = str(tmp_path / "rank{}.txt")
    mp.spawn(_patient_worker, args=(2, str(tmp_path / "init"), pattern, "patient_barrier"), nprocs=2)
    assert [open(pattern.format(r)).read() for r in range(2)] == ["through", "through"]
