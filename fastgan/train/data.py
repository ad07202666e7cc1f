"""Training data sets of the reference GAN training: uint8 images in memory or memory-mapped.

``load_dataset(name, ...)`` returns an :class:`ImageData`: N square RGB images as a
uint8 ``(N, S, S, 3)`` array, served as float32 ``(B, 3, S, S)`` batches in [0, 1].

``digits``
    scikit-learn's 1797 handwritten 8x8 digits (``sklearn.datasets.load_digits``),
    read from the package's own data, so it needs no download: the default data set
    for smoke tests and CPU runs. Values 0..16 are scaled to 0..255, resized to
    ``image_size`` and the gray channel is replicated to RGB. Needs
    ``pip install scikit-learn``.
``cifar10``
    The 50000 training images of CIFAR-10 (the five ``data_batch_*`` pickles of
    ``cifar-10-python.tar.gz``). ``root`` may hold the extracted
    ``cifar-10-batches-py/`` folder or the archive; otherwise the archive is downloaded
    there (``download=True``), checked by MD5, and its training batches are extracted
    next to it. The archive may be deleted afterwards. Without network access the error
    says where to put a copy (``root``, i.e. the config's ``data_root``).
``folder``
    Every png/jpg/jpeg/bmp/webp/tif/tiff/ppm/pgm file under the folder ``root`` (recursively,
    through links to folders, skipping hidden names; e.g. CelebA-HQ or LSUN bedrooms prepared
    as image folders), read as the metrics read images (16-bit grayscale scaled by 1/65535,
    transparency composited onto white; see
    ``fastgan.metrics.images.load_image``), center-cropped to a square.
    The decoded images are cached once as a ``.npy`` file in ``cache_dir`` and
    memory-mapped afterwards, so data sets larger than memory work. The cache file is
    named by a hash of the folder's absolute path, ``image_size`` and its sorted file
    list with sizes and modification times: any change to the folder makes a new cache
    (stale ones are not deleted).

Where files go: ``root`` defaults to ``$FASTGAN_DATA``, else ``~/.cache/fastgan/data``
(CIFAR-10); ``cache_dir`` defaults to ``<that>/folders`` (folder caches).

Resizing (any data set whose images are not already ``image_size`` square) uses PIL's
bicubic filter, which widens its kernel when shrinking, i.e. it is antialiased.
Downloads, extraction and caches are written to a temporary name and renamed into
place, so an interrupted run never leaves a partial archive, folder or cache behind
under the final name.
"""
from __future__ import annotations

import functools
import hashlib
import http.client
import json
import operator
import os
import pickle
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from numpy.lib.format import open_memmap
from PIL import Image
from tqdm import tqdm

from fastgan.files import atomic_file, atomic_folder, file_hash
from fastgan.metrics.images import load_image

__all__ = ["DATASETS", "ImageData", "load_dataset", "data_root"]

DATASETS = ("digits", "cifar10", "folder")

DATA_ENV_VAR = "FASTGAN_DATA"
MIN_IMAGE_SIZE = 4
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")  # pytorch-fid's
RESIZE_FILTER = Image.Resampling.BICUBIC

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_SIZE = 32
_DOWNLOAD_TIMEOUT_S = 60

# Bumped whenever folder decoding changes, so caches written by older code are not reused.
_FOLDER_CACHE_FORMAT = 2

Indices = Union[torch.Tensor, np.ndarray, Sequence[int]]


class ImageData:
    """N square RGB images: ``images`` is uint8 ``(N, S, S, 3)`` (possibly an ``np.memmap``).
    ``identity`` names the content (default ``name``; a folder's adds the hash of its file
    listing): what caches of statistics computed from the images are keyed on."""

    def __init__(self, images: np.ndarray, name: str, identity: Optional[str] = None):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
            raise ValueError(
                f"data set {name!r}: images must be uint8 (N, S, S, 3), got {images.dtype} {tuple(images.shape)}"
            )
        if images.shape[0] == 0:
            raise ValueError(f"data set {name!r} is empty")
        self.images = images
        self.name = name
        self.identity = identity or name

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def image_size(self) -> int:
        return self.images.shape[1]

    def __repr__(self) -> str:
        return f"ImageData({self.name!r}, {len(self)} images of {self.image_size}x{self.image_size})"

    def batch(self, indices: Indices) -> torch.Tensor:
        """Images ``indices`` (1-D integers in [0, N)) as a contiguous float32 (B, 3, S, S) CPU tensor in [0, 1]."""
        index = torch.as_tensor(indices)
        if index.ndim != 1:
            raise ValueError(f"batch indices must be 1-D, got shape {tuple(index.shape)}")
        if index.numel() == 0:  # torch.as_tensor([]) is float32; an empty batch is still valid
            index = index.to(torch.int64)
        if index.dtype == torch.bool or index.is_floating_point() or index.is_complex():
            raise ValueError(f"batch indices must be integers, got {index.dtype}")
        index = index.to("cpu", torch.int64).numpy()
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(
                f"batch indices must lie in [0, {len(self)}) for data set {self.name!r}; "
                f"got values from {index.min()} to {index.max()}"
            )
        pixels = np.asarray(self.images[index])  # fancy indexing copies, also out of a memmap
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255)


def load_dataset(name: str, *, root: Optional[str] = None, image_size: int = 32, download: bool = True,
                 cache_dir: Optional[str] = None) -> ImageData:
    """The data set ``name`` (one of :data:`DATASETS`) at ``image_size`` x ``image_size``.

    ``root``: ignored by ``digits``; CIFAR-10's directory for ``cifar10`` (default
    :func:`data_root`); the image folder for ``folder`` (required). ``download``
    (``cifar10`` only) allows fetching the archive. ``cache_dir`` (``folder`` only)
    is where decoded folders are cached (default ``data_root()/folders``).
    """
    try:
        image_size = operator.index(image_size)
    except TypeError:
        raise ValueError(f"image_size must be an integer, got {image_size!r}") from None
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")
    if name == "digits":
        return ImageData(_digits_images(image_size), "digits")
    if name == "cifar10":
        folder = Path(root).expanduser() if root is not None else data_root()
        return ImageData(_resize_all(_cifar10_images(folder, download), image_size), "cifar10")
    if name == "folder":
        if root is None:
            raise ValueError("the 'folder' data set needs root=<folder of images>")
        folder = Path(root).expanduser().resolve()
        cache = Path(cache_dir).expanduser() if cache_dir is not None else data_root() / "folders"
        images = _folder_images(folder, image_size, cache)  # a memmap of the cache named by the folder's listing
        return ImageData(images, f"folder:{folder}", identity=f"folder:{folder}:{Path(images.filename).stem}")
    raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def data_root() -> Path:
    """``$FASTGAN_DATA``, else ``~/.cache/fastgan/data``: CIFAR-10's default root and the folder caches' parent."""
    return Path(os.environ.get(DATA_ENV_VAR) or Path.home() / ".cache" / "fastgan" / "data").expanduser()


def _resize(image: Image.Image, size: int) -> np.ndarray:
    """A square PIL image as a ``size`` x ``size`` uint8 array (bicubic, antialiased when shrinking)."""
    if image.size != (size, size):
        image = image.resize((size, size), RESIZE_FILTER)
    return np.asarray(image, dtype=np.uint8)


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    """Square uint8 images (N, H, H) or (N, H, H, 3) resized to ``size``; returned as is when already that size."""
    if images.shape[1] == size:
        return images
    return np.stack([_resize(Image.fromarray(image), size) for image in images])


@functools.lru_cache(maxsize=None)
def _digits_images(size: int) -> np.ndarray:
    """scikit-learn's digits as uint8 (1797, size, size, 3), read-only because the cache shares it."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the 'digits' data set needs scikit-learn: pip install scikit-learn") from error
    gray = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)  # values 0..16
    # Resize the single gray channel, then replicate it: 3x less resizing, channels exactly equal.
    images = np.repeat(_resize_all(gray, size)[..., None], 3, axis=3)
    images.setflags(write=False)
    return images


def _cifar10_images(root: Path, download: bool) -> np.ndarray:
    """CIFAR-10's training images as uint8 (50000, 32, 32, 3), extracting or downloading the archive if needed."""
    folder = root / CIFAR10_FOLDER
    archive = root / CIFAR10_ARCHIVE
    if not folder.is_dir():
        if archive.is_file():
            digest = file_hash(archive, "md5").hexdigest()
            if digest != CIFAR10_MD5:
                raise ValueError(
                    f"{archive} is corrupt: MD5 {digest} instead of {CIFAR10_MD5}; delete it and load again to "
                    f"download a fresh copy"
                )
        elif download:
            _download_cifar10(archive)
        else:
            raise FileNotFoundError(
                f"CIFAR-10 not found: neither {folder} nor {archive} exists and download=False. Download "
                f"{CIFAR10_URL} into {root} (or pass download=True, or root=/path/to/its/folder; "
                f"${DATA_ENV_VAR} sets the default root)"
            )
        _extract_cifar10(archive, folder)
    return np.concatenate([_read_cifar10_batch(folder / batch) for batch in CIFAR10_TRAIN_BATCHES])


def _download_cifar10(archive: Path) -> None:
    """Download :data:`CIFAR10_URL` to ``archive``, renamed into place only once its MD5 is verified.

    A failed download (no network, a proxy, a timeout) raises ConnectionError saying where
    to put a copy instead; a failed write raises an OSError that names ``archive``
    (:func:`atomic_file` adds the name)."""
    try:
        _fetch_cifar10(archive)
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as error:
        reason = getattr(error, "reason", None) or error
        raise ConnectionError(
            f"cannot download CIFAR-10 from {CIFAR10_URL} ({reason}). Without network access, put "
            f"{CIFAR10_ARCHIVE} (or its extracted {CIFAR10_FOLDER}/ folder) into {archive.parent}, or set "
            f"data_root=FOLDER (default root: ${DATA_ENV_VAR}) to a folder that holds one"
        ) from error


def _fetch_cifar10(archive: Path) -> None:
    with atomic_file(archive) as partial:
        digest = hashlib.md5()
        with open(partial, "wb") as out, \
                urllib.request.urlopen(CIFAR10_URL, timeout=_DOWNLOAD_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            with tqdm(total=int(length) if length else None, desc=f"downloading {archive.name}", unit="B",
                      unit_scale=True, unit_divisor=1024, file=sys.stderr) as progress:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    progress.update(len(chunk))
        if digest.hexdigest() != CIFAR10_MD5:
            raise ValueError(
                f"download of {CIFAR10_URL} is corrupt: MD5 {digest.hexdigest()} instead of {CIFAR10_MD5}; "
                f"the file was deleted"
            )


def _extract_cifar10(archive: Path, folder: Path) -> None:
    """Extract the training batches of ``archive`` into ``folder``.

    Only the expected members are read, and written under names built here, never
    under the archive's own paths, so a crafted archive cannot write elsewhere. They
    go to a temporary folder renamed into place, so ``folder`` is complete if it exists.
    """
    with atomic_folder(folder) as partial, tarfile.open(archive, "r:gz") as tar:
        for batch in CIFAR10_TRAIN_BATCHES:
            try:
                member = tar.getmember(f"{CIFAR10_FOLDER}/{batch}")
            except KeyError:
                raise ValueError(f"{archive} lacks {CIFAR10_FOLDER}/{batch}") from None
            source = tar.extractfile(member) if member.isfile() else None
            if source is None:
                raise ValueError(f"{archive}: {member.name} is not a regular file")
            with source, open(partial / batch, "wb") as target:
                shutil.copyfileobj(source, target)


def _read_cifar10_batch(path: Path) -> np.ndarray:
    """One CIFAR-10 batch pickle as uint8 (n, 32, 32, 3); its rows are channel-major (CHW) 3072-byte images."""
    try:
        with open(path, "rb") as file:
            # The archive's MD5 was checked before extraction; a hand-placed folder is trusted like any local code.
            batch = pickle.load(file, encoding="bytes")
    except FileNotFoundError:
        raise FileNotFoundError(f"CIFAR-10 batch {path} is missing; delete {path.parent} to extract it again") from None
    except Exception as error:  # a damaged pickle can raise nearly anything (EOFError, UnpicklingError, ...)
        raise ValueError(f"CIFAR-10 batch {path} is corrupt: {error!r}") from error
    data = batch.get(b"data") if isinstance(batch, dict) else None
    pixels = 3 * CIFAR10_SIZE * CIFAR10_SIZE
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != pixels:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"CIFAR-10 batch {path} is corrupt: b'data' should be uint8 (n, {pixels}), found {found}")
    return np.ascontiguousarray(data.reshape(-1, 3, CIFAR10_SIZE, CIFAR10_SIZE).transpose(0, 2, 3, 1))


def images_below(folder: Path) -> List[Path]:
    """The image files below ``folder``, sorted (none for a missing folder): recursively, into
    symbolic links to folders too (each real folder once, so a link to an ancestor ends there),
    skipping hidden files and folders (a name starting with '.': macOS's ._x.png, .ipynb_checkpoints),
    which pytorch-fid's and clean-fid's globs do not match either."""
    found, visited = [], set()
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in visited:
            folders[:] = []
            continue
        visited.add(real)
        folders[:] = [name for name in folders if not name.startswith(".")]
        found += [Path(root, name) for name in files if not name.startswith(".")
                  and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES and os.path.isfile(os.path.join(root, name))]
    return sorted(found)


def image_files(folder: Path) -> List[Path]:
    """The image files below ``folder`` (recursively, sorted); errors for a missing folder or none found."""
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = images_below(folder)
    if not files:
        raise ValueError(f"{folder} contains no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _folder_cache_path(folder: Path, files: List[Path], size: int, cache_dir: Path) -> Path:
    """Cache file named by a hash of everything the decoded array depends on."""
    listing = []
    for path in files:
        stat = path.stat()
        listing.append([path.relative_to(folder).as_posix(), stat.st_size, stat.st_mtime_ns])
    key = json.dumps([_FOLDER_CACHE_FORMAT, str(folder), size, listing])
    return cache_dir / f"{folder.name}-{size}px-{hashlib.sha256(key.encode()).hexdigest()[:20]}.npy"


def _folder_images(folder: Path, size: int, cache_dir: Path) -> np.ndarray:
    """The folder's images as a read-only memmap (N, size, size, 3), decoding them into the cache first if needed."""
    files = image_files(folder)
    cache = _folder_cache_path(folder, files, size, cache_dir)
    if cache.is_file():
        try:
            images = np.load(cache, mmap_mode="r")
            if images.shape == (len(files), size, size, 3) and images.dtype == np.uint8:
                return images
        except (OSError, ValueError):  # unreadable cache: decode again and overwrite it
            pass
    with atomic_file(cache) as partial:
        images = open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))
        for i, path in enumerate(tqdm(files, desc=f"decoding {folder}", unit="img", file=sys.stderr)):
            images[i] = _decode_image(path, size)
        images.flush()
        del images  # close the memmap before renaming its file
    return np.load(cache, mmap_mode="r")


def _decode_image(path: Path, size: int) -> np.ndarray:
    """An image file as RGB, center-cropped to a square and resized: uint8 (size, size, 3).

    Read as the metrics read real images (:func:`fastgan.metrics.images.load_image`: 16-bit
    files scaled, transparency composited onto white), so that G learns the images FID
    compares it with; PIL's own RGB conversion clips 16-bit files to white and drops alpha."""
    rgb = load_image(path)
    height, width = rgb.shape[:2]
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    square = np.rint(rgb[top:top + side, left:left + side] * 255).astype(np.uint8)
    return _resize(Image.fromarray(square), size)
