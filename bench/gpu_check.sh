#!/usr/bin/env bash
# `make gpu-check`: the one command to run wherever a GPU is available.
#
#   bench/gpu_check.sh PYTHON [INSTALL_STAMP]
#
# Phases, each under its own wall-clock budget so that the whole check ends in about
# 8 minutes on an H100 even when one phase hangs (a phase over budget is stopped and
# reported, and the next one still runs):
#   1. build  -- the C++/CUDA extension for sm_90a (TORCH_CUDA_ARCH_LIST=9.0a unless set),
#                in place (pip install --no-build-isolation --no-deps -e .; no registry needed);
#   2. tests  -- the whole suite on the GPU, in two phases: tests-gpu (the `cuda`-marked
#                tests: what only a GPU can check) first, then tests-rest; a per-test timeout
#                when pytest-timeout is installed and 8 workers when pytest-xdist is;
#   3. bench  -- every benchmark in quick mode, rendered into bench/results/*-cuda-<date>.{md,json};
#   4. profile -- where the eager workloads' host time goes (bench/profile_host.py), into
#                build/gpu-check/profile.md.
# A failed build skips phases 2-4 (they would time the fallbacks) and shows the end of its log.
# Then one screen: phase status, test counts and failures, each target against what was measured.
# Logs and the raw JSON stay in build/gpu-check/.
#
# A machine without a package registry may lack test dependencies (gudhi, pytorch-msssim): run `make wheels`
# where pip can download, bring build/wheels along, and this script installs them first.
# Budgets (seconds; 550 in all with the extension check's 20, so one 10-minute remote command always ends with its archive) and knobs:
# GPU_CHECK_BUILD_S (100: 64 s on a fresh H100 machine), GPU_CHECK_GPU_TEST_S (100), GPU_CHECK_REST_TEST_S (120, plus what tests-gpu
# left unused), GPU_CHECK_BENCH_S (150: the Triton launch-config sweep compiles on a fresh machine), GPU_CHECK_PROFILE_S (60: 40 s stopped the
# 2026-11-28 run after its report was written, in the profiler's teardown or just before it),
# GPU_CHECK_TEST_TIMEOUT (per test, 150: torch.compile tests take ~80 s on a cold cache), GPU_CHECK_WORKERS (8: first Triton compiles run in parallel),
# GPU_CHECK_TEST_ARGS (extra pytest arguments for both test phases, shell-quoted: '-k "spectral or penalty"').
# A phase over budget gets SIGINT first, so pytest still writes its report of what ran.
# GPU_CHECK_ARCHIVE=FILE.tgz: also pack the logs and the new bench/results files into one archive
# (to copy back from a remote GPU machine).
set -u
PY=${1:?usage: bench/gpu_check.sh PYTHON [INSTALL_STAMP]}
STAMP=${2:-}
OUT=build/gpu-check
mkdir -p "$OUT"
rm -f "$OUT"/*.log "$OUT"/*.xml "$OUT"/*.md "$OUT"/bench.json
: > "$OUT/phases.tsv"
touch "$OUT/started"  # results newer than this are this run's
started=$(date +%s)

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: torch sees no CUDA device here; run it on a GPU machine (make test covers the CPU)." >&2
    exit 2
fi
has() { "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)"; }

# phase NAME BUDGET CMD...: run CMD under BUDGET seconds, log to $OUT/NAME.log, record the outcome.
phase() {
    local name=$1 budget=$2 t0 rc status
    shift 2
    t0=$(date +%s)
    echo "== $name (budget ${budget} s): $*"
    timeout --signal=INT --kill-after=20 "$budget" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124|137) status="stopped at ${budget} s budget" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - t0 ))" >> "$OUT/phases.tsv"
    tail -n 3 "$OUT/$name.log"
    return $rc
}

# Wheels brought from a machine with a registry (`make wheels`): installed into a folder of their own that
# comes first on the path, so the machine's torch, numpy, ... stay as they are (--no-deps).
if compgen -G "build/wheels/*.whl" > /dev/null; then
    echo "== wheels: $(cd build/wheels && ls -- *.whl | tr '\n' ' ')"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target build/wheels/site build/wheels/*.whl \
        && export PYTHONPATH="$PWD/build/wheels/site${PYTHONPATH:+:$PYTHONPATH}"
fi

export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0a}
export MAX_JOBS=${GPU_CHECK_BUILD_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
if phase build "${GPU_CHECK_BUILD_S:-100}" "$PY" -m pip install --verbose --no-build-isolation --no-deps -e . \
   && phase extension 20 "$PY" -c "import fastgan._C as c, subprocess; assert c.built_with_cuda(), 'fastgan._C was built without CUDA'; print('fastgan._C built with CUDA for', '$TORCH_CUDA_ARCH_LIST'); print(subprocess.run(['readelf', '-d', c.__file__], capture_output=True, text=True).stdout)"; then
    built=1
    [ -n "$STAMP" ] && mkdir -p "$(dirname "$STAMP")" && touch "$STAMP"
else
    # Without the extension (and the installed package that maps fastgan.kernels) the tests and
    # benchmarks would only measure the fallbacks: keep the GPU time for a rerun after the fix.
    built=0
    echo "== the build failed: tests, benchmarks and the profile are skipped; the end of $OUT/build.log:"
    tail -n 25 "$OUT/build.log"
    printf 'tests, bench, profile\tskipped: the build failed\t0\n' >> "$OUT/phases.tsv"
fi

if [ "$built" = 1 ]; then
    # failures NAME: the failed tests of phase NAME with their one-line reasons, on the screen.
    failures() {
        grep -E '^(FAILED|ERROR) ' "$OUT/$1.log" | cut -c1-200 | head -n 40
    }

    # no pytest-benchmark in the test phases: the suite has no benchmarks, and under xdist it warns once per worker
    test_args=(-q -p no:cacheprovider -p no:benchmark -rfE --durations=15)
    export COLUMNS=${COLUMNS:-220}  # pytest's short summary keeps each failure's reason only within the width
    has pytest_timeout && test_args+=(--timeout="${GPU_CHECK_TEST_TIMEOUT:-150}")
    workers=${GPU_CHECK_WORKERS:-8}
    if has xdist && [ "$workers" -gt 1 ]; then
        test_args+=(-n "$workers")
        # the workers share the machine's cores instead of each starting one torch thread per core
        export OMP_NUM_THREADS=$(( ($(nproc) + workers - 1) / workers ))
    fi
    eval "extra_test_args=(${GPU_CHECK_TEST_ARGS:-})"  # shell words: -k "spectral or penalty" stays one pattern
    gpu_budget=${GPU_CHECK_GPU_TEST_S:-100}
    t0=$(date +%s)
    phase tests-gpu "$gpu_budget" "$PY" -m pytest tests -m cuda "${test_args[@]}" --junitxml="$OUT/tests-gpu.xml" \
        "${extra_test_args[@]}"
    failures tests-gpu
    # The backend and compile checks first: what they check differs where a GPU is visible.
    rest_budget=$(( ${GPU_CHECK_REST_TEST_S:-120} + gpu_budget - ($(date +%s) - t0) ))
    phase tests-rest "$rest_budget" "$PY" -m pytest tests/test_backends.py tests/test_hopper_compile.py tests -m "not cuda" \
        "${test_args[@]}" --junitxml="$OUT/tests-rest.xml" "${extra_test_args[@]}"
    failures tests-rest
    unset OMP_NUM_THREADS

    # Entries that would start in the last 30 s of the budget are skipped, so the run still writes its results.
    bench_budget=${GPU_CHECK_BENCH_S:-150}
    phase bench "$bench_budget" "$PY" -m pytest bench -q -p no:cacheprovider -rfEs --benchmark-only \
        --bench-quick --bench-device cuda --bench-budget $(( bench_budget - 30 )) --benchmark-json="$OUT/bench.json" \
        --benchmark-columns=median,iqr,rounds --junitxml="$OUT/bench.xml"
    phase profile "${GPU_CHECK_PROFILE_S:-60}" "$PY" bench/profile_host.py --device cuda --calls 12 --out "$OUT/profile.md"
fi

"$PY" bench/report.py "$OUT/bench.json" --summary --device cuda --junit "$OUT/tests-gpu.xml" --junit "$OUT/tests-rest.xml" --bench-junit "$OUT/bench.xml" \
    --phases "$OUT/phases.tsv"
if [ -s "$OUT/profile.md" ]; then  # each workload's heading and its time/launch line, on one line
    echo "host profile ($OUT/profile.md):"
    awk '/^### /{name=substr($0, 5)} /per call \(wall/{print "  " name ": " $0}' "$OUT/profile.md"
fi
echo "gpu-check took $(( $(date +%s) - started )) s; logs in $OUT/"
if [ -n "${GPU_CHECK_ARCHIVE:-}" ]; then
    tar -czf "$GPU_CHECK_ARCHIVE" "$OUT" $(find bench/results -name '*-cuda-*' -newer "$OUT/started" 2>/dev/null) \
        && echo "packed into $GPU_CHECK_ARCHIVE"
fi
! grep -qv $'\tok\t' "$OUT/phases.tsv"
