"""Backend selection: what is built, each op's own defaults per device, and the overrides."""
import os
import subprocess
import sys

import pytest
import torch

import fastgan
from fastgan import _backend
from conftest import HAS_CUDA, KERNEL_BACKENDS, device_backends, kernel_backends

OPS = (
    "spectral_norm_power_iteration", "spectral_norm_power_iteration_multi", "gp_interpolate", "dragan_perturb",
    "gp_penalty", "newton_schulz_steps", "feature_moments",
)


def test_every_kernel_backend_is_usable_here():
    report = fastgan.backends()["backends"]
    devices = ["cpu"] + (["cuda"] if HAS_CUDA else [])
    for device in devices:
        for name in KERNEL_BACKENDS[device]:
            assert report[name][device], f"{name} on {device} unusable: {report[name]['why_not'].get(device)}"


def test_triton_is_a_cpu_test_backend_only_under_the_interpreter():
    """On a GPU machine without TRITON_INTERPRET=1 no cpu-triton case may be generated."""
    assert "triton" not in kernel_backends(triton_interpreted=False)["cpu"]
    assert "triton" in kernel_backends(triton_interpreted=True)["cpu"]
    assert KERNEL_BACKENDS["cpu"] == kernel_backends(_backend.triton_interpreted())["cpu"]


def test_triton_kernels_are_tested_on_some_device_here():
    """Without a GPU the Triton cases exist only under the interpreter: a TRITON_INTERPRET=0 left in
    the environment (conftest only sets it when unset) would drop every triton case and empty the
    interpreter-only parametrizations, and the suite would pass without running one Triton kernel."""
    assert "triton" in KERNEL_BACKENDS["cpu"] or HAS_CUDA, (
        f"no device runs the triton cases here (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}, no GPU)")


def test_report_explains_what_is_missing():
    report = fastgan.backends()
    assert set(report["backends"]) == set(fastgan.BACKENDS)
    assert report["backends"]["reference"]["cpu"]
    assert "CPU" in report["backends"]["cpp"]["why_not"]["cuda"] or "CUDA" in report["backends"]["cpp"]["why_not"]["cuda"]


def test_report_says_per_op_what_runs_where_and_why():
    report = fastgan.backends()
    assert set(OPS) <= set(report["ops"])
    assert report["forced"] is None
    for op in OPS:
        choice = report["ops"][op]["cpu"]
        assert choice["runs"] == "cpp"
        assert "bench/results" in choice["why"] or "not measured" in choice["why"], choice
    if not HAS_CUDA:
        assert "cuda" not in report["ops"]["gp_penalty"]


def test_each_op_has_its_own_order_per_device():
    ops = _backend.registered()
    for name in OPS:
        op = ops[name]
        assert op.order["cpu"][0] == "cpp" and op.order["cpu"][-1] == "reference"
        assert "reference" in op.order["cuda"]
    # FID's float64 products prefer cuBLAS to the untuned float64 Triton matmul.
    assert ops["newton_schulz_steps"].order["cuda"].index("cuda") < ops["newton_schulz_steps"].order["cuda"].index("triton")
    assert "triton" not in ops["feature_moments"].impls
    assert ops["spectral_norm_power_iteration"].choose("cpu")[0] == "cpp"


@pytest.mark.parametrize("device,backend", device_backends(include_reference=True))
def test_the_backend_a_test_forces_is_the_one_that_runs(device, backend):
    """The op tests force their case's backend with use_backend and compare with the reference: a
    case whose forcing did not take (the op's default ran instead, the reference itself for a
    "reference" case) would compare a kernel with itself. Every op that has the backend runs it."""
    assert set(OPS) <= set(_backend.registered())
    with fastgan.use_backend(backend):
        for name, op in _backend.registered().items():
            if backend in op.impls:
                assert op.choose(device) == (backend, "forced (use_backend)"), name
                assert op(torch.device(device)) is op.impls[backend], name


def test_register_rejects_an_order_without_an_implementation():
    with pytest.raises(ValueError, match="without an implementation"):
        _backend.register("bogus_op", {"reference": abs}, {"cuda": ("triton", "reference")}, "test")
    with pytest.raises(ValueError, match="include 'reference'"):
        _backend.register("bogus_op", {"cpp": abs}, {"cpu": ("cpp",)}, "test")
    assert "bogus_op" not in _backend.registered()


def test_context_manager_overrides_environment(monkeypatch):
    op = _backend.registered()["gp_penalty"]
    monkeypatch.setenv("FASTGAN_BACKEND", "reference")
    assert op.choose("cpu")[0] == "reference"
    with fastgan.use_backend("cpp"):
        assert op.choose("cpu") == ("cpp", "forced (use_backend)")
        with fastgan.use_backend(None):
            assert op.choose("cpu")[0] == "reference"


def test_use_backend_is_the_calling_threads_own():
    """A use_backend in one thread neither reaches threads started inside it nor a thread
    already running (a metric computed beside the training loop)."""
    import threading

    op = _backend.registered()["gp_penalty"]
    inside, entered, release, seen = threading.Event(), threading.Event(), threading.Event(), {}

    def other():
        entered.set()
        inside.wait(10)
        seen["during"] = op.choose("cpu")[0]
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    entered.wait(10)
    with fastgan.use_backend("reference"):
        inside.set()
        release.wait(10)
        child = threading.Thread(target=lambda: seen.setdefault("child", op.choose("cpu")[0]))
        child.start()
        child.join()
        assert op.choose("cpu")[0] == "reference"
    thread.join()
    assert seen == {"during": "cpp", "child": "cpp"}


# Where triton runs here: CPU tensors under the interpreter, else a GPU.
TRITON_DEVICE = "cpu" if _backend.triton_interpreted() else ("cuda" if HAS_CUDA else None)
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="triton cannot run here (no GPU, no TRITON_INTERPRET=1)")


@needs_triton
@pytest.mark.slow
def test_under_torch_compile_without_contextvar_tracing_the_forced_backend_is_a_trace_constant(monkeypatch):
    """Dynamo before torch 2.14 cannot trace ContextVar.get, which use_backend's override is:
    there the override is read once, at trace time, as a constant (torch.compile(fullgraph=True)
    of an apply_spectral_norm model failed on torch 2.11). That path, taken here on any torch."""
    monkeypatch.setattr(_backend, "_DYNAMO_TRACES_CONTEXTVARS", False)
    monkeypatch.delenv("FASTGAN_BACKEND", raising=False)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: x + (1 if _backend.forced_backend() == "reference" else 2), fullgraph=True)
    with fastgan.use_backend("reference"):
        assert compiled(torch.zeros(1)).item() == 1
    torch._dynamo.reset()


def test_forcing_a_backend_an_op_lacks_falls_back_to_its_default(monkeypatch):
    monkeypatch.setenv("FASTGAN_BACKEND", "triton")
    default = "cpp" if TRITON_DEVICE == "cpu" else "cuda"
    backend, why = _backend.registered()["feature_moments"].choose(TRITON_DEVICE)
    assert backend == default and "has no feature_moments kernel" in why
    report = fastgan.backends()
    assert report["forced"] == "triton"
    assert report["ops"]["feature_moments"][TRITON_DEVICE]["runs"] == default
    assert report["ops"]["gp_penalty"][TRITON_DEVICE]["runs"] == "triton"
    # The op itself runs (this crashed FeatureStatistics.update, i.e. a training run's first FID).
    features = torch.randn(7, 5, dtype=torch.float64, device=TRITON_DEVICE)
    total, outer = torch.ops.fastgan.feature_moments(features)
    torch.testing.assert_close(outer, features.T @ features, rtol=1e-12, atol=1e-12)


@needs_triton
def test_feature_statistics_update_under_a_forced_backend_it_lacks(monkeypatch):
    from fastgan.metrics.fid import FeatureStatistics

    monkeypatch.setenv("FASTGAN_BACKEND", "triton")
    features = torch.randn(9, 6, device=TRITON_DEVICE)
    stats = FeatureStatistics().update(features)
    torch.testing.assert_close(stats.mean.double(), features.double().mean(0), rtol=1e-6, atol=1e-6)


def test_forcing_a_backend_that_cannot_run_raises(monkeypatch):
    with fastgan.use_backend("cuda"), pytest.raises(RuntimeError, match="cannot run on cpu"):
        _backend.registered()["gp_penalty"].choose("cpu")
    with fastgan.use_backend("cuda"):
        assert "error" in fastgan.backends()["ops"]["gp_penalty"]["cpu"]
    monkeypatch.setenv("FASTGAN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown fastgan backend 'bogus'"):
        _backend.registered()["gp_penalty"].choose("cpu")


@pytest.mark.skipif(not _backend.extension().built_with_cuda(), reason="fastgan._C was built without CUDA")
def test_a_gpu_the_build_has_no_code_for_falls_back_from_cuda(monkeypatch):
    """A build made without a visible GPU holds Hopper's sm_90a only: on another GPU the cuda backend
    was still chosen first and every launch failed with "no kernel image is available"."""
    class Build:
        def __init__(self, runs):
            self.runs = runs

        def built_with_cuda(self):
            return True

        def cuda_kernels_run_on(self, device):
            return self.runs

    assert callable(_backend.extension().cuda_kernels_run_on)  # the real probe is built in
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    for runs, expected in ((False, "triton"), (True, "cuda")):
        monkeypatch.setattr(_backend, "_cannot_run_on_gpu", {})
        monkeypatch.setattr(_backend, "_load_extension", lambda: (Build(runs), ""))
        monkeypatch.setattr(_backend, "_load_triton", lambda: (True, ""))
        backend, why = _backend.registered()["gp_penalty"].choose("cuda")
        assert backend == expected, why
        if not runs:
            assert "no CUDA code for this GPU (sm_80)" in why and "TORCH_CUDA_ARCH_LIST=8.0" in why


def test_a_backend_named_by_a_non_string_is_a_type_error():
    """use_backend(1) raised AttributeError: 'int' object has no attribute 'strip'."""
    with pytest.raises(TypeError, match="named by a string, one of triton, cuda, cpp, reference; got 1"):
        with fastgan.use_backend(1):
            pass


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = _backend._status("triton", "cpu")
    assert not ok and "TRITON_INTERPRET=1" in why
    assert _backend.registered()["gp_penalty"].choose("cpu")[0] == "cpp"


@pytest.mark.parametrize("value", ["1", "0", "", "true", "True", "ON", "yes", "y", "false", "off", "2", " 1"])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value):
    """TRITON_INTERPRET=true interprets Triton's kernels as =1 does: fastgan refused triton on
    CPU tensors then ("runs on CPU tensors only under TRITON_INTERPRET=1")."""
    triton = pytest.importorskip("triton")
    if not _backend.triton_interpreted():
        pytest.skip("this session imported triton compiled (a GPU machine): see the subprocess test below")
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert _backend.triton_interpreted() == bool(triton.knobs.runtime.interpret)
    assert _backend._status("triton", "cpu")[0] == bool(triton.knobs.runtime.interpret)


TRITON_INTERPRET_LATE = """
import os, torch, fastgan
from fastgan import _backend
os.environ["TRITON_INTERPRET"] = "1"
print(fastgan.backends()["backends"]["triton"]["cpu"])
try:
    with fastgan.use_backend("triton"):
        fastgan.ops.gradient_penalty.gp_penalty(torch.randn(3, 5), False, 1.0, 1e-12, False)
except RuntimeError as error:
    print("refused:", error)
"""


def test_triton_interpret_set_after_import_is_refused_with_the_reason():
    """TRITON_INTERPRET=1 set after ``import fastgan`` (which imports triton through torch's compiler):
    backends() said triton ran on the CPU, and a forced triton op failed inside the interpreter with
    "Cannot call @triton.jit'd outside of the scope of a kernel" (triton's own tl.sum was compiled)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", TRITON_INTERPRET_LATE], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    usable, refusal = run.stdout.splitlines()[:2]
    assert usable == "False"
    assert refusal.startswith("refused:") and "set it before importing fastgan" in refusal


def test_a_forced_backend_an_op_lacks_falls_back_even_where_it_cannot_run(monkeypatch):
    """FASTGAN_BACKEND=triton on a CPU without the interpreter still computes the ops that have
    no Triton kernel, as documented; the ops that have one raise."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("FASTGAN_BACKEND", "triton")
    for op in ("feature_moments", "spectral_normalize"):
        backend, why = _backend.registered()[op].choose("cpu")
        assert backend == "cpp" and f"has no {op} kernel" in why
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        _backend.registered()["gp_penalty"].choose("cpu")


def test_memory_order_reads_dense_layouts_and_rejects_gaps():
    x = torch.empty(4, 3, 5, 6).to(memory_format=torch.channels_last)
    assert _backend.memory_order(x) == (0, 2, 3, 1)
    assert _backend.memory_order(torch.empty(4, 3)) == (0, 1)
    assert _backend.memory_order(torch.empty(4, 6)[:, ::2]) is None


def test_import_fastgan_registers_the_ops_under_another_packages_python_m(tmp_path):
    """`python -m mygan` (or `-m mygan.train`) imports mygan, which imports fastgan, while argv[0]
    is still "-m": fastgan took that for its own CLI and left the ops unregistered."""
    (tmp_path / "mygan").mkdir()
    (tmp_path / "mygan" / "__init__.py").write_text("import fastgan\n")
    (tmp_path / "mygan" / "run.py").write_text("import torch\nprint(torch.ops.fastgan.gp_penalty.__name__)\n")
    run = subprocess.run([sys.executable, "-m", "mygan.run"], cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0 and "gp_penalty" in run.stdout, run.stderr[-2000:]
