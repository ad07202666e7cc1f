"""Hopper compile check, no GPU needed: every GPU kernel compiles for sm_90 without spills.

Triton: every specialization the launchers can emit on a GPU -- each dtype they
accept, each constexpr combination, each block/warp configuration -- taken from the
launchers' own tables (``gpu_specializations()`` of ``fastgan.kernels.spectral_norm``
and ``.gradient_penalty``; the frechet launcher's ``_blocks`` for its matmul) is
compiled ahead of time for sm_90 (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", 90, 32))``) and its cubin's resource usage read with
cuobjdump: it must compile, use no local memory (no register spills, no stack) and
fit the H100's 227 KB of shared memory per block. Integer arguments are compiled in
their general form (i32 sizes, i64 seeds and counts), pointers as 16-byte aligned, as
torch allocates them.

It runs twice: with the installed Triton and with the oldest one fastgan supports,
which ``make test`` installs into build/triton-oldest (Triton 3.6 refused a float64
``tl.dot`` accumulator that 3.8 takes: the GPU machines this project targets run 3.6).
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


def _specializations():
    """(label, kernel, signature, constexprs, num_warps) for every GPU launch of every Triton kernel."""
    import torch

    from fastgan.kernels import frechet, gradient_penalty, spectral_norm, triton_dtype

    for module in (spectral_norm, gradient_penalty):
        for kernel, signature, constexprs, num_warps in module.gpu_specializations():
            yield module.__name__, kernel, signature, constexprs, num_warps
    # The frechet launcher: _matmul_epilogue_kernel with _blocks(cuda) for float32 and float64.
    bm, bn, bk = frechet._blocks(torch.device("cuda"))
    for dtype in (torch.float32, torch.float64):
        t = triton_dtype(dtype).name
        signature = {name: f"*{t}" for name in ("a0_ptr", "b0_ptr", "c0_ptr", "a1_ptr", "b1_ptr", "c1_ptr")}
        signature.update(n="i32", alpha="fp32", beta="fp32", ACC="constexpr", BLOCK_M="constexpr", BLOCK_N="constexpr", BLOCK_K="constexpr")
        yield frechet.__name__, frechet._matmul_epilogue_kernel, signature, dict(ACC=triton_dtype(dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), 4


def _compile(index):
    """Compile the index-th specialization for sm_90; its description and cubin resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label, kernel, signature, constexprs, num_warps = _SPECIALIZATIONS[index]
    entry = dict(module=label, kernel=kernel.__name__, constexprs={k: str(v) for k, v in constexprs.items()},
                 num_warps=num_warps, signature={k: v for k, v in signature.items() if v != "constexpr"})
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if t.startswith("*")}
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


@pytest.mark.parametrize("triton_build", ["installed", "oldest supported"])
def test_every_triton_kernel_compiles_for_sm90_without_spills(triton_build):
    """One test per Triton (not a fixture shared by several) so that a parallel run compiles once."""
    if cuobjdump() is None:
        pytest.fail("no cuobjdump (neither triton's bundled one nor CUDA_HOME's): cannot read resource usage")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    expected_version = None
    if triton_build == "oldest supported":
        found = [name for name in os.listdir(OLDEST_TRITON)] if os.path.isdir(OLDEST_TRITON) else []
        versions = [m.group(1) for m in map(re.compile(r"triton-(.+)\.dist-info$").match, found) if m]
        if not versions:  # a machine whose own Triton is the oldest (make gpu-check's), or no `make test`
            pytest.skip(f"no Triton in {OLDEST_TRITON} (`make test` installs the oldest supported one there)")
        (expected_version,) = versions
        env["PYTHONPATH"] = os.pathsep.join([OLDEST_TRITON] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    output = json.loads(done.stdout.splitlines()[-1])
    results = output["results"]
    if expected_version is not None:
        assert output["triton"] == expected_version, f"compiled with Triton {output['triton']}, not {OLDEST_TRITON}'s"

    # Coverage: every kernel of the modules, every GPU tile width and dtype the launchers use.
    from fastgan.kernels import gradient_penalty, spectral_norm

    kernels = {(r["module"], r["kernel"]) for r in results}
    for module in (spectral_norm, gradient_penalty):
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
    assert ("fastgan.kernels.frechet", "_matmul_epilogue_kernel") in kernels

    failures = []
    for r in results:
        what = f"{r['module']}.{r['kernel']} {r['constexprs']} num_warps={r['num_warps']} {r['signature']}"
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


if __name__ == "__main__":
    import triton

    print(json.dumps({"triton": triton.__version__, "results": _compile_all()}))
