"""Training data sets (fastgan.train.data), offline: CIFAR-10 and folders come from tiny fixtures made here."""
import hashlib
import io
import pickle
import sys
import tarfile

import numpy as np
import PIL.Image
import pytest
import torch

from conftest import FullDisk
from fastgan.train import data
from fastgan.train.data import DATASETS, ImageData, load_dataset

CIFAR_IMAGES_PER_BATCH = 7
CIFAR_N = 5 * CIFAR_IMAGES_PER_BATCH


# --------------------------------------------------------------------------- digits


@pytest.mark.parametrize("size", [16, 32])
def test_digits_shapes_and_content(size):
    digits = load_dataset("digits", image_size=size)
    assert len(digits) == 1797 and digits.image_size == size and digits.name == "digits"
    assert digits.images.shape == (1797, size, size, 3) and digits.images.dtype == np.uint8
    assert (digits.images[..., 0] == digits.images[..., 1]).all() and (digits.images[..., 0] == digits.images[..., 2]).all()
    assert digits.images.std() > 40 and digits.images.max() >= 250 and digits.images.min() == 0
    assert len({digits.images[i].tobytes() for i in range(100)}) > 90  # real, distinct images

    batch = digits.batch(torch.tensor([0, 17, 1796]))
    assert batch.shape == (3, 3, size, size) and batch.dtype == torch.float32 and batch.is_contiguous()
    assert batch.device.type == "cpu" and 0 <= batch.min() and batch.max() <= 1
    expected = torch.from_numpy(digits.images[17].astype(np.float32) / 255).permute(2, 0, 1)
    torch.testing.assert_close(batch[1], expected, rtol=0, atol=0)


def test_digits_at_native_size_are_the_scaled_originals():
    from sklearn.datasets import load_digits

    digits = load_dataset("digits", image_size=8, root="ignored")
    np.testing.assert_array_equal(digits.images[..., 0], np.rint(load_digits().images * 255 / 16))


def test_digits_without_sklearn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        load_dataset("digits", image_size=5)  # a size no other test caches


# --------------------------------------------------------------------------- ImageData and arguments


def test_batch_index_checks():
    digits = load_dataset("digits", image_size=8)
    assert digits.batch([3, 3]).shape == (2, 3, 8, 8)
    assert digits.batch(np.array([1796], dtype=np.int32)).shape == (1, 3, 8, 8)
    assert digits.batch([]).shape == (0, 3, 8, 8)
    with pytest.raises(IndexError, match=r"\[0, 1797\)"):
        digits.batch([0, 1797])
    with pytest.raises(IndexError):
        digits.batch(torch.tensor([-1]))
    with pytest.raises(ValueError, match="integers"):
        digits.batch(torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        digits.batch(torch.zeros(2, 2, dtype=torch.int64))


def test_argument_checks(tmp_path):
    with pytest.raises(ValueError, match="digits, cifar10, folder"):
        load_dataset("mnist")
    assert DATASETS == ("digits", "cifar10", "folder")
    with pytest.raises(ValueError, match="at least 4"):
        load_dataset("digits", image_size=3)
    with pytest.raises(ValueError, match="root"):
        load_dataset("folder")
    with pytest.raises(ValueError, match="empty"):
        ImageData(np.zeros((0, 4, 4, 3), np.uint8), "nothing")
    with pytest.raises(ValueError, match="uint8"):
        ImageData(np.zeros((2, 4, 4, 3), np.float32), "floats")


# --------------------------------------------------------------------------- cifar10


def _cifar_pixels(batch):
    """The fixture's batch ``batch`` (1..5): uint8 (7, 3072) rows, distinct across batches."""
    return np.random.default_rng(batch).integers(0, 256, (CIFAR_IMAGES_PER_BATCH, 3072), dtype=np.uint8)


def _add_file(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture
def cifar_archive(tmp_path, monkeypatch):
    """A cifar-10-python.tar.gz look-alike (5 batches of 7 images), its MD5 monkeypatched in as the expected one."""
    path = tmp_path / "source" / data.CIFAR10_ARCHIVE
    path.parent.mkdir()
    with tarfile.open(path, "w:gz") as tar:
        for batch in range(1, 6):
            content = {b"data": _cifar_pixels(batch), b"labels": [batch] * CIFAR_IMAGES_PER_BATCH}
            _add_file(tar, f"cifar-10-batches-py/data_batch_{batch}", pickle.dumps(content))
        _add_file(tar, "cifar-10-batches-py/test_batch", pickle.dumps({b"data": _cifar_pixels(6)}))
        _add_file(tar, "../escaped.txt", b"a member outside the archive's folder must not be extracted")
    monkeypatch.setattr(data, "CIFAR10_MD5", hashlib.md5(path.read_bytes()).hexdigest())
    monkeypatch.setattr(data, "CIFAR10_URL", path.as_uri())
    return path


def _assert_fixture_images(cifar):
    assert len(cifar) == CIFAR_N and cifar.image_size == 32 and cifar.name == "cifar10"
    assert cifar.images.shape == (CIFAR_N, 32, 32, 3) and cifar.images.dtype == np.uint8
    # Image 9 is batch 2's image 2; a row holds the red plane, then green, then blue, each row-major 32x32.
    row = _cifar_pixels(2)[2]
    for y, x, channel in [(0, 0, 0), (3, 5, 1), (31, 30, 2), (17, 2, 0)]:
        assert cifar.images[9, y, x, channel] == row[channel * 1024 + y * 32 + x]
    np.testing.assert_array_equal(cifar.images[-1, :, :, 2].ravel(), _cifar_pixels(5)[-1][2048:])


def test_cifar10_from_archive_extracts_only_training_batches(cifar_archive, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (root / data.CIFAR10_ARCHIVE).write_bytes(cifar_archive.read_bytes())
    _assert_fixture_images(load_dataset("cifar10", root=str(root), download=False))
    extracted = sorted(p.name for p in (root / "cifar-10-batches-py").iterdir())
    assert extracted == [f"data_batch_{i}" for i in range(1, 6)]
    assert sorted(p.name for p in root.iterdir()) == sorted([data.CIFAR10_ARCHIVE, "cifar-10-batches-py"])
    assert not (tmp_path / "escaped.txt").exists()


def test_cifar10_from_extracted_folder(cifar_archive, tmp_path):
    with tarfile.open(cifar_archive) as tar:
        tar.extractall(tmp_path / "root", members=[m for m in tar.getmembers() if "data_batch" in m.name])
    _assert_fixture_images(load_dataset("cifar10", root=str(tmp_path / "root"), download=False))


def test_cifar10_download_into_empty_root_honours_env(cifar_archive, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTGAN_DATA", str(tmp_path / "env root"))
    cifar = load_dataset("cifar10")
    _assert_fixture_images(cifar)
    assert (tmp_path / "env root" / data.CIFAR10_ARCHIVE).read_bytes() == cifar_archive.read_bytes()
    cifar_16 = load_dataset("cifar10", image_size=16, download=False)  # now read from the extracted folder
    assert cifar_16.images.shape == (CIFAR_N, 16, 16, 3)
    # Bicubic shrinking averages: the resized image's mean stays close to the original's.
    assert abs(float(cifar_16.images[9].mean()) - float(cifar.images[9].mean())) < 4


def test_cifar10_download_with_wrong_checksum_leaves_nothing(cifar_archive, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CIFAR10_MD5", "0" * 32)
    root = tmp_path / "root"
    with pytest.raises(ValueError, match="MD5"):
        load_dataset("cifar10", root=str(root))
    assert list(root.iterdir()) == []


def test_cifar10_without_network_says_where_to_put_a_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CIFAR10_URL", (tmp_path / "unreachable" / data.CIFAR10_ARCHIVE).as_uri())
    root = tmp_path / "root"
    with pytest.raises(ConnectionError, match="cannot download CIFAR-10") as error:
        load_dataset("cifar10", root=str(root))
    message = str(error.value)
    assert str(root) in message and "data_root=" in message and "FASTGAN_DATA" in message
    assert list(root.iterdir()) == []  # no partial archive left behind


def test_cifar10_write_failure_names_the_archive(cifar_archive, tmp_path, monkeypatch):
    """A full disk while downloading: an OSError that names the archive, and nothing left behind."""
    import builtins
    import errno

    real_open = builtins.open

    def open_full(path, mode="r", *args, **kwargs):
        file = real_open(path, mode, *args, **kwargs)
        return FullDisk(file) if "w" in mode and str(path).endswith(".part") else file

    monkeypatch.setattr(builtins, "open", open_full)
    root = tmp_path / "root"
    with pytest.raises(OSError) as error:
        load_dataset("cifar10", root=str(root))
    assert error.value.errno == errno.ENOSPC and error.value.filename == str(root / data.CIFAR10_ARCHIVE)
    assert list(root.iterdir()) == []


def test_cifar10_files_follow_the_umask(cifar_archive, tmp_path):
    import os

    previous = os.umask(0o022)
    try:
        load_dataset("cifar10", root=str(tmp_path / "root"))
    finally:
        os.umask(previous)
    assert (tmp_path / "root" / data.CIFAR10_ARCHIVE).stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "root" / data.CIFAR10_FOLDER).stat().st_mode & 0o777 == 0o755


def test_cifar10_local_archive_with_wrong_checksum_is_corrupt(cifar_archive, monkeypatch):
    monkeypatch.setattr(data, "CIFAR10_MD5", "0" * 32)
    with pytest.raises(ValueError, match="corrupt"):
        load_dataset("cifar10", root=str(cifar_archive.parent))
    assert cifar_archive.is_file()  # a file the user put there is not deleted


def test_cifar10_missing_without_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="download") as error:
        load_dataset("cifar10", root=str(tmp_path), download=False)
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("payload", [b"not a pickle", pickle.dumps({b"data": np.zeros((7, 100), np.uint8)})])
def test_cifar10_corrupt_batch_names_the_file(cifar_archive, tmp_path, payload):
    root = tmp_path / "root"
    load_dataset("cifar10", root=str(root))  # downloads and extracts
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(payload)
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", root=str(root))


# --------------------------------------------------------------------------- folder


@pytest.fixture
def image_folder(tmp_path):
    """Three images of different sizes and formats in nested folders, plus a file that is no image."""
    folder = tmp_path / "images"
    (folder / "a" / "b").mkdir(parents=True)
    # 30x10, red in the central 10x10 square and blue at the sides: center-cropping keeps only red.
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10, 2] = wide[:, 20:, 2] = 255
    wide[:, 10:20, 0] = 255
    PIL.Image.fromarray(wide).save(folder / "wide.png")
    PIL.Image.fromarray(np.full((50, 20, 3), 200, np.uint8)).save(folder / "a" / "tall.jpg", quality=95)
    PIL.Image.fromarray(np.full((16, 16), 80, np.uint8)).save(folder / "a" / "b" / "gray.BMP")
    (folder / "a" / "notes.txt").write_text("not an image")
    return folder


def _cache_files(cache_dir):
    return sorted(p.name for p in cache_dir.iterdir()) if cache_dir.exists() else []


def test_folder_decodes_crops_and_caches(image_folder, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    images = load_dataset("folder", root=str(image_folder), image_size=8, cache_dir=str(cache_dir))
    assert len(images) == 3 and images.image_size == 8 and images.name == f"folder:{image_folder}"
    assert images.images.shape == (3, 8, 8, 3) and isinstance(images.images, np.memmap)
    gray, tall, wide = images.images  # sorted paths: a/b/gray.BMP, a/tall.jpg, wide.png
    assert (gray == 80).all() and (np.abs(tall.astype(int) - 200) <= 2).all()
    assert (wide[..., 0] == 255).all() and (wide[..., 1:] == 0).all()
    assert images.batch([2]).shape == (1, 3, 8, 8)
    [cache_name] = _cache_files(cache_dir)
    assert cache_name.startswith("images-8px-") and cache_name.endswith(".npy")

    def no_decoding(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(PIL.Image, "open", no_decoding)
    cached = load_dataset("folder", root=str(image_folder), image_size=8, cache_dir=str(cache_dir))
    np.testing.assert_array_equal(cached.images, images.images)
    assert cached.identity == images.identity != images.name  # what FID statistics caches are keyed on
    monkeypatch.undo()

    PIL.Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(image_folder / "a" / "new.webp")
    grown = load_dataset("folder", root=str(image_folder), image_size=8, cache_dir=str(cache_dir))
    assert len(grown) == 4 and len(_cache_files(cache_dir)) == 2
    assert grown.name == images.name and grown.identity != images.identity


def test_folder_reads_16_bit_and_transparent_images_as_the_metrics_do(tmp_path):
    """A 16-bit gray PNG and an RGBA PNG whose transparent pixels store red: the training
    images are the metrics' reading of the files (PIL's RGB conversion made the 16-bit one
    white and showed the hidden red), so G learns what FID compares it with."""
    from fastgan.metrics.images import load_image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(7)
    deep = rng.integers(1000, 60000, (9, 9), dtype=np.uint16)
    PIL.Image.fromarray(deep).save(folder / "deep.png")
    rgba = rng.integers(1, 255, (9, 9, 4), dtype=np.uint8)
    rgba[:4, :, :3] = (255, 0, 0)
    rgba[:4, :, 3] = 0
    PIL.Image.fromarray(rgba, "RGBA").save(folder / "glass.png")
    images = load_dataset("folder", root=str(folder), image_size=9, cache_dir=str(tmp_path / "cache"))
    for decoded, name in zip(images.images, ("deep.png", "glass.png")):
        expected = np.rint(load_image(folder / name) * 255).astype(np.uint8)
        np.testing.assert_array_equal(decoded, expected)
    assert (images.images[1, :4] == 255).all()  # transparent rows white, not the stored red


def test_folder_cache_defaults_under_env_root(image_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTGAN_DATA", str(tmp_path / "data"))
    load_dataset("folder", root=str(image_folder), image_size=4)
    assert len(_cache_files(tmp_path / "data" / "folders")) == 1


def test_folder_corrupt_image_names_it_and_leaves_no_cache(image_folder, tmp_path):
    (image_folder / "a" / "broken.png").write_bytes(b"\x89PNG this is not really a png")
    cache_dir = tmp_path / "cache"
    with pytest.raises(ValueError, match="broken.png"):
        load_dataset("folder", root=str(image_folder), image_size=8, cache_dir=str(cache_dir))
    assert _cache_files(cache_dir) == []


def test_folder_missing_or_without_images(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset("folder", root=str(tmp_path / "missing"), cache_dir=str(tmp_path / "cache"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        load_dataset("folder", root=str(tmp_path / "empty"), cache_dir=str(tmp_path / "cache"))


def test_images_below_follows_folder_links_once_and_skips_hidden_names(tmp_path):
    """Path.rglob (Python 3.11) did not enter linked subfolders: a folder of links to class folders
    read as "contains no images", or silently as only its own few files; hidden files (macOS's
    ._x.png, .ipynb_checkpoints/) were read, and pytorch-fid's tif/tiff/ppm/pgm skipped."""
    pixels = np.random.default_rng(0).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    cats = tmp_path / "cats"
    cats.mkdir()
    for name in ("1.png", "2.TIF", "3.ppm", ".4.png", "._5.png", "notes.txt"):
        PIL.Image.fromarray(pixels).save(cats / name, format="PNG" if name.endswith("png") or name == "notes.txt"
                                         else PIL.Image.registered_extensions()[name[name.rindex("."):].lower()])
    (cats / ".ipynb_checkpoints").mkdir()
    PIL.Image.fromarray(pixels).save(cats / ".ipynb_checkpoints" / "1-checkpoint.png")
    root = tmp_path / "root"
    root.mkdir()
    (root / "cats").symlink_to(cats, target_is_directory=True)
    (root / "again").symlink_to(cats, target_is_directory=True)  # the same real folder: read once
    (cats / "loop").symlink_to(root, target_is_directory=True)   # a cycle ends where it began
    found = [p.relative_to(root).as_posix() for p in data.images_below(root)]
    assert found in (["again/1.png", "again/2.TIF", "again/3.ppm"], ["cats/1.png", "cats/2.TIF", "cats/3.ppm"])
    assert [p.name for p in data.images_below(cats)] == ["1.png", "2.TIF", "3.ppm"]
