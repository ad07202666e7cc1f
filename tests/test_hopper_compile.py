"""Hopper compile check, no GPU needed: every GPU kernel compiles for sm_90 without spills.

Triton: every specialization the launchers can emit on a GPU -- each dtype they
accept, each constexpr combination, each block/warp configuration -- taken from the
launchers' own tables (``gpu_specializations()`` of ``fastgan.kernels.spectral_norm``,
``.gradient_penalty`` and ``.frechet``) is compiled ahead of time for sm_90
(``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``) and its cubin's
resource usage read with cuobjdump: it must compile, use no local memory (no register
spills, no stack) and fit the H100's 227 KB of shared memory per block. Each form
Triton gives an argument at a launch is a kernel of its own, so each is compiled: an int
as i32 or i64 by its value, 1 as a constant, a multiple of 16 marked divisible; a
pointer 16-byte aligned or not. ``test_every_launch_is_a_compiled_specialization``
checks that the tables list every form the launchers' calls take.

It runs twice: with the installed Triton and with the oldest one fastgan supports,
which ``make test`` installs into build/triton-oldest (Triton 3.6 refused a float64
``tl.dot`` accumulator that 3.8 takes: the GPU machines this project targets run 3.6).
The oldest Triton's interpreter also runs a kernel, as the CPU tests run them with the installed one.
The compile runs in a subprocess: the test session sets TRITON_INTERPRET=1 on CPU
machines, under which ``@triton.jit`` gives interpreter objects that cannot be
compiled. It takes 10-60 s per Triton on a 2-core CPU the first time (triton caches
the results in ~/.triton afterwards).

CUDA C++: when ``fastgan._C`` was built with CUDA, every kernel in it must use no
stack and no local memory (``cuobjdump --dump-resource-usage``), and the build must
contain Hopper SASS for sm_90a.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

H100_SHARED_PER_BLOCK = 232448  # bytes: 227 KB, the opt-in maximum per block on sm_90
OLDEST_TRITON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "triton-oldest")


def cuobjdump(toolkit_first=False):
    """triton's bundled cuobjdump (it matches triton's ptxas), else the CUDA toolkit's; with
    ``toolkit_first`` the other way round (for what nvcc built: an older bundled cuobjdump,
    Triton 3.6's, names sm_90a code sm_90)."""
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    toolkit = shutil.which("cuobjdump") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")
    found = [path for path in ((toolkit, bundled) if toolkit_first else (bundled, toolkit)) if os.path.exists(path)]
    return found[0] if found else None


def resource_usage(path, tool=None):
    """{function: {REG, STACK, SHARED, LOCAL}} from ``cuobjdump --dump-resource-usage``."""
    out = subprocess.run([tool or cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                         check=True).stdout
    usage = {}
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*(REG:.*)", out):
        usage[name.rstrip(":")] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", fields)}
    return usage


# ------------------------------------------------------------------ the worker (subprocess)


def _kernel_modules():
    from fastgan.kernels import frechet, gradient_penalty, spectral_norm

    return spectral_norm, gradient_penalty, frechet


def _specializations():
    """(label, kernel, signature, constexprs, num_warps, divisible) for every GPU launch of every Triton kernel."""
    for module in _kernel_modules():
        for kernel, signature, constexprs, num_warps, divisible in module.gpu_specializations():
            yield module.__name__, kernel, signature, constexprs, num_warps, divisible


def _compile(index):
    """Compile the index-th specialization for sm_90; its description and cubin resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label, kernel, signature, constexprs, num_warps, divisible = _SPECIALIZATIONS[index]
    entry = dict(module=label, kernel=kernel.__name__, constexprs={k: str(v) for k, v in constexprs.items()},
                 num_warps=num_warps, signature={k: v for k, v in signature.items() if v != "constexpr"},
                 divisible=sorted(divisible))
    # 16-byte aligned pointers and multiples of 16 among the ints, as Triton marks them at a launch
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(signature) if name in divisible}
    try:
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps},
        )
    except Exception as exc:  # reported per specialization, asserted by the test
        entry["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return entry
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        (usage,) = resource_usage(cubin.name).values()
    entry.update(usage, triton_shared=compiled.metadata.shared)
    return entry


def _compile_all():
    """Every specialization, compiled by a pool of processes (forked after the kernels' import)."""
    import concurrent.futures
    import multiprocessing

    global _SPECIALIZATIONS
    _SPECIALIZATIONS = list(_specializations())
    workers = max(1, min(8, os.cpu_count() or 1))
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile, range(len(_SPECIALIZATIONS))))


_SPECIALIZATIONS = []


# ------------------------------------------------------------------ the tests


def _use_the_oldest_triton(env) -> str:
    """Puts build/triton-oldest first on ``env``'s PYTHONPATH and returns its version (skips
    where there is none)."""
    found = [name for name in os.listdir(OLDEST_TRITON)] if os.path.isdir(OLDEST_TRITON) else []
    versions = [m.group(1) for m in map(re.compile(r"triton-(.+)\.dist-info$").match, found) if m]
    if not versions:  # a machine whose own Triton is the oldest (make gpu-check's), or no `make test`
        pytest.skip(f"no Triton in {OLDEST_TRITON} (`make test` installs the oldest supported one there)")
    env["PYTHONPATH"] = os.pathsep.join([OLDEST_TRITON] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    (version,) = versions
    return version


@pytest.mark.parametrize("triton_build", ["installed", "oldest supported"])
def test_every_triton_kernel_compiles_for_sm90_without_spills(triton_build):
    """One test per Triton (not a fixture shared by several) so that a parallel run compiles once."""
    if cuobjdump() is None:
        pytest.fail("no cuobjdump (neither triton's bundled one nor CUDA_HOME's): cannot read resource usage")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    expected_version = None
    if triton_build == "oldest supported":
        expected_version = _use_the_oldest_triton(env)
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    output = json.loads(done.stdout.splitlines()[-1])
    results = output["results"]
    if expected_version is not None:
        assert output["triton"] == expected_version, f"compiled with Triton {output['triton']}, not {OLDEST_TRITON}'s"

    # Coverage: every kernel of the modules, every GPU tile width and dtype the launchers use.
    from fastgan.kernels import spectral_norm

    kernels = {(r["module"], r["kernel"]) for r in results}
    for module in _kernel_modules():
        jitted = {name for name, obj in vars(module).items() if name.endswith("_kernel") and callable(obj)}
        assert jitted == {k for m, k in kernels if m == module.__name__}, "a kernel is never compile-checked"
    block_bs = {r["constexprs"]["BLOCK_B"] for r in results if r["kernel"] == "_row_pass_kernel"}
    candidates = spectral_norm.GPU_CANDIDATES  # the benchmark's launch configurations, float32 only
    widths = range(spectral_norm.MIN_BLOCK_B.bit_length() - 1, spectral_norm.GPU.block_b_max.bit_length())
    assert block_bs == {str(1 << i) for i in widths} | {str(c.block_b_max) for c in candidates}
    launched = {(r["constexprs"]["BLOCK_M"], r["num_warps"]) for r in results if r["kernel"] == "_row_pass_kernel"}
    assert {(str(c.block_m), c.num_warps) for c in candidates} <= launched, "a benchmarked configuration is never compiled"
    dtypes = {r["signature"]["w_typed_ptr"] for r in results if r["kernel"] == "_row_pass_kernel"}
    assert dtypes == {"*fp16", "*bf16", "*fp32", "*fp64"}

    failures = []
    for r in results:
        what = (f"{r['module']}.{r['kernel']} {r['constexprs']} num_warps={r['num_warps']} {r['signature']} "
                f"divisible by 16: {r['divisible']}")
        if "error" in r:
            failures.append(f"{what}: does not compile: {r['error']}")
        elif r["LOCAL"] or r["STACK"]:
            failures.append(f"{what}: spills (local {r['LOCAL']} B, stack {r['STACK']} B, {r['REG']} registers)")
        elif max(r["SHARED"], r["triton_shared"]) > H100_SHARED_PER_BLOCK:
            failures.append(f"{what}: {r['SHARED']} B of shared memory > {H100_SHARED_PER_BLOCK}")
    assert not failures, (f"Triton {output['triton']}: {len(failures)} of {len(results)} specializations fail:\n"
                          + "\n".join(failures))


def _extension_path():
    import fastgan._C

    return fastgan._C.__file__


def test_cuda_extension_kernels_use_no_local_memory():
    from fastgan import _backend

    module = _backend.extension()
    if not module.built_with_cuda():
        pytest.skip("fastgan._C was built without CUDA: no CUDA kernels to check")
    tool = cuobjdump(toolkit_first=True)
    if tool is None:
        pytest.fail("fastgan._C has CUDA kernels but no cuobjdump is available to check them")
    path = _extension_path()
    usage = resource_usage(path, tool)
    assert usage, "cuobjdump found no kernels in the CUDA build"
    bad = {name: u for name, u in usage.items() if u.get("STACK") or u.get("LOCAL")}
    assert not bad, f"kernels with stack/local memory (spills): {bad}"
    assert all(u.get("SHARED", 0) <= H100_SHARED_PER_BLOCK for u in usage.values())
    elves = subprocess.run([tool, "--list-elf", path], capture_output=True, text=True, check=True).stdout
    assert "sm_90a" in elves, (f"no sm_90a SASS in {path} (build with TORCH_CUDA_ARCH_LIST=9.0a; a CUDA 12 cuobjdump "
                               f"(12.8 included) names sm_90a code sm_90, and this one is {tool}):\n{elves}")


def _form_key(kernel, num_warps, forms):
    return kernel.__name__, num_warps, tuple(sorted(forms.items()))


class _Recorder:
    """Stands in for a kernel: records each launch's specialization (as Triton computes it) instead of running it."""

    def __init__(self, kernel, seen):
        import inspect

        self.kernel, self.seen = kernel, seen
        fn = kernel.fn
        self.params = list(inspect.signature(fn).parameters.values())
        options = getattr(kernel, "kwargs", None) or {}  # the interpreter's stand-in keeps jit's arguments there
        self.not_specialized = set(getattr(kernel, "do_not_specialize", None) or options.get("do_not_specialize") or ())

    def __getitem__(self, grid):
        return self.launch

    def launch(self, *args, num_warps=4, **kwargs):
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import _normalize_ty, native_specialize_impl

        values = dict(zip((p.name for p in self.params), args), **kwargs)
        forms = {}
        for index, param in enumerate(self.params):
            value = values[param.name]
            if "constexpr" in str(param.annotation):
                forms[param.name] = ("constexpr", str(value))
                continue
            annotated = "" if param.annotation is param.empty else _normalize_ty(param.annotation)
            if annotated[:2] in ("fp", "bf"):  # an annotated float argument takes its annotation's type
                forms[param.name] = (annotated, False)
                continue
            specialize = param.name not in self.not_specialized and index not in self.not_specialized
            kind, key = native_specialize_impl(BaseBackend, value, False, specialize, True)
            forms[param.name] = ("constexpr", str(key)) if kind == "constexpr" else (kind, key == "D")
        self.seen.append(_form_key(self.kernel, num_warps, forms))


def _unaligned(*shape, dtype="float32"):
    import torch

    dtype = getattr(torch, dtype)
    numel = 1
    for size in shape:
        numel *= size
    return torch.randn(numel + 1, dtype=torch.float64).to(dtype)[1:].view(shape)  # 4 or 2 bytes past an aligned start


def test_every_launch_is_a_compiled_specialization(monkeypatch):
    """The launchers, called with the GPU's launch configuration on what users pass them --
    sizes of 1, multiples of 16 and odd ones, sizes past 2**31 (meta tensors), views at an
    odd offset, int seeds small and large, int eps / center / alpha -- launch only
    specializations that the compile check compiles: Triton compiles each form of an
    argument (i32 or i64, the constant 1, divisible by 16 or not) as a kernel of its own."""
    import torch

    from fastgan.kernels import frechet, gradient_penalty, spectral_norm

    compiled = set()
    for module in _kernel_modules():
        for kernel, signature, constexprs, num_warps, divisible in module.gpu_specializations():
            forms = {name: ("constexpr", str(constexprs[name])) if kind == "constexpr" else (kind, name in divisible)
                     for name, kind in signature.items()}
            compiled.add(_form_key(kernel, num_warps, forms))
    seen = []
    for module in _kernel_modules():
        for name, obj in list(vars(module).items()):
            if name.endswith("_kernel"):
                monkeypatch.setattr(module, name, _Recorder(obj, seen))
    monkeypatch.setattr(spectral_norm, "config_for", lambda device: spectral_norm.GPU)
    monkeypatch.setattr(gradient_penalty, "config_for", lambda device: gradient_penalty.GPU)
    cuda_blocks = frechet._blocks(torch.device("cuda"))
    monkeypatch.setattr(frechet, "_blocks", lambda device: cuda_blocks)
    monkeypatch.setattr(spectral_norm, "_TABLES", type(spectral_norm._TABLES)())

    big = 2**31 + 16  # elements per sample past 32 bits (meta tensors: nothing is allocated)
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        weights = [_unaligned(7, 11, dtype=dtype), _unaligned(5, 3, 3, 3, dtype=dtype), _unaligned(3, 3000, dtype=dtype)]
        dims = [0, 1, 0]
        us = [torch.randn(w.shape[d]).to(w.dtype) for w, d in zip(weights, dims)]
        vs = [torch.randn(w.numel() // w.shape[d]).to(w.dtype) for w, d in zip(weights, dims)]
        for n, u_first in ((0, True), (1, True), (2, True), (1, False), (2, False)):
            spectral_norm.power_iteration_multi(weights, us, vs, dims, n, 0, u_first)
            spectral_norm.power_iteration_multi(weights[:1], us[:1], vs[:1], dims[:1], n, 1e-12, u_first)
        reals = [torch.randn(3, 1, dtype=getattr(torch, dtype)), torch.randn(5, 17, dtype=getattr(torch, dtype)),
                 torch.randn(4, 3, 4, 4, dtype=getattr(torch, dtype)), _unaligned(5, 17, dtype=dtype),
                 _unaligned(4, 48, dtype=dtype), torch.randn(1, 1, dtype=getattr(torch, dtype)),
                 torch.empty(2, big, dtype=getattr(torch, dtype), device="meta"),
                 torch.empty(1, big + 1, dtype=getattr(torch, dtype), device="meta")]
        for real in reals:
            for seed in (0, 1, 17, 2**40 + 1):
                gradient_penalty.gp_interpolate(real, real, None, seed)
                gradient_penalty.dragan_perturb(real, seed)
            gradient_penalty.gp_interpolate(real, real, torch.rand(real.shape[0], dtype=torch.float64), 0)
            for squared_norm, one_sided in ((True, False), (False, False), (False, True)):
                gradient_penalty.gp_penalty(real, squared_norm, 1, 0, one_sided)
                gradient_penalty.gp_penalty(real, squared_norm, 1.0, 1e-4, one_sided)
        for size in (16, 100, 1000, 3000):
            for batch in (1, 16):
                gradient_penalty.gp_penalty(torch.randn(batch, size, dtype=getattr(torch, dtype)), False, 1.0, 1e-4, False)
    for dtype in ("float32", "float64"):
        for n in (1, 5, 32, 33):
            a = torch.randn(n, n, dtype=getattr(torch, dtype))
            frechet.matmul(a, a)
            frechet.matmul(_unaligned(n, n, dtype=dtype), a, 1, 0)
            frechet.newton_schulz_steps(a, a, 2)
    missing = sorted(set(seen) - compiled)
    assert not missing, f"{len(missing)} launched specializations are never compiled, e.g.:\n" + "\n".join(
        map(str, missing[:10]))



_LOOP_TYPES = """
import json, triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastgan.kernels import gradient_penalty as gp
sizes = {"per_sample": "i32", "RANDOM": "constexpr", "ACC": "constexpr", "BLOCK": "constexpr"}
signature = dict({f"{n}_ptr": "*fp32" for n in ("real", "fake", "alpha", "out", "alpha_out")}, seed="i64", **sizes)
source = ASTSource(fn=gp._interpolate_kernel, signature=signature, constexprs={"RANDOM": True, "ACC": tl.float32, "BLOCK": 1024})
ttir = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ttir"]
print(json.dumps([line.strip() for line in ttir.splitlines() if "scf.for" in line]))
"""


def test_a_samples_loop_counts_in_64_bits():
    """The interpolation's grid-stride loop over a sample of under 2**31 elements counted in 32 bits:
    a sample within one stride of 2**31 wrapped the counter negative, which passed the mask and
    addressed memory before the sample (seen in the sm_90 code, not in the interpreter, whose loop
    is Python's)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _LOOP_TYPES], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    (loop,) = json.loads(done.stdout.splitlines()[-1])
    assert loop.endswith(": i64 {"), loop


_INTERPRETED = """
import torch, triton, fastgan
from fastgan.reference import spectral_norm as reference
print(triton.__version__)
weight = torch.randn(37, 53, dtype=torch.float64)
u, v = torch.randn(37, dtype=torch.float64), torch.randn(53, dtype=torch.float64)
with fastgan.use_backend("triton"):
    got = torch.ops.fastgan.spectral_norm_power_iteration(weight, u, v, 0, 2, 1e-12, True)
for a, e in zip(got, reference.power_iteration(weight, u, v, 0, 2, 1e-12, True)):
    torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
"""


def test_the_oldest_triton_runs_the_kernels_in_its_interpreter():
    """The CPU tests run the Triton kernels in the interpreter of the installed Triton; this runs
    one with the oldest supported one. Triton < 3.8's interpreter read a runtime int as a loop
    bound with int() of a 1-element array, which NumPy >= 2.4 refuses: every kernel with a loop
    over a runtime size failed (fastgan.kernels gives it Triton 3.8's reading)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    version = _use_the_oldest_triton(env)
    done = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [version]

if __name__ == "__main__":
    import triton

    print(json.dumps({"triton": triton.__version__, "results": _compile_all()}))
