"""Backend selection: what is built, the defaults per device, and the overrides."""
import pytest
import torch

import fastgan
from fastgan import _backend
from conftest import HAS_CUDA, KERNEL_BACKENDS


def test_every_kernel_backend_is_usable_here():
    report = fastgan.backends()
    devices = ["cpu"] + (["cuda"] if HAS_CUDA else [])
    for device in devices:
        for name in KERNEL_BACKENDS[device]:
            assert report[name][device], f"{name} on {device} unusable: {report[name]['why_not'].get(device)}"


def test_report_explains_what_is_missing():
    report = fastgan.backends()
    assert set(report) == set(fastgan.BACKENDS)
    assert report["reference"]["cpu"]
    assert "CPU" in report["cpp"]["why_not"]["cuda"] or "CUDA" in report["cpp"]["why_not"]["cuda"]


def test_default_choice_per_device():
    assert _backend.select(torch.device("cpu")) == "cpp"
    assert _backend.select(torch.device("cpu"), ("reference", "triton")) == "reference"


def test_context_manager_overrides_environment(monkeypatch):
    monkeypatch.setenv("FASTGAN_BACKEND", "reference")
    assert _backend.select(torch.device("cpu")) == "reference"
    with fastgan.use_backend("triton"):
        assert _backend.select(torch.device("cpu")) == "triton"
        with fastgan.use_backend(None):
            assert _backend.select(torch.device("cpu")) == "reference"


def test_forcing_a_backend_that_cannot_run_raises(monkeypatch):
    with fastgan.use_backend("cuda"), pytest.raises(RuntimeError, match="cannot run on cpu"):
        _backend.select(torch.device("cpu"))
    monkeypatch.setenv("FASTGAN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="unknown fastgan backend 'bogus'"):
        _backend.select(torch.device("cpu"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = _backend._status("triton", "cpu")
    assert not ok and "TRITON_INTERPRET=1" in why
