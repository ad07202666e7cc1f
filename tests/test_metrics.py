"""Inception Score, KID and MS-SSIM against independent float64 numpy implementations.

The references below are written from the papers' formulas (and, for MS-SSIM, the TF /
compare_gan conventions stated in fastgan/metrics/ms_ssim.py): plain numpy, a
non-separable 2-D Gaussian window applied with sliding windows, explicit loops over
splits, subsets and pairs. Where fastgan draws random subsets, the test replays the
documented draws (a fresh ``torch.Generator().manual_seed(seed)``, one ``randperm``
per draw) and computes everything else in numpy.

Inputs are fresh random tensors of odd sizes (never zeros). Tolerances: float64
results to rtol 1e-10 / atol 1e-12 (observed differences are ~1e-15); against
pytorch-msssim (only if installed; not a dependency) to 1e-10 with a float64 window.
The distributed test runs 2 gloo processes that each update half of the data.
"""
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view

from fastgan.metrics.inception_score import InceptionScore
from fastgan.metrics.kid import KID
from fastgan.metrics.ms_ssim import MSSSIM, MS_SSIM_WEIGHTS, ms_ssim
from conftest import exit_worker

TOL = dict(rtol=1e-10, atol=1e-12)


def assert_close(actual, expected, tol=TOL):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64), **tol)


def replay_randperm_draws(seed, draws):
    """The index draws of a metric's compute(): one randperm per (population, take) in order."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(population, generator=generator)[:take].numpy() for population, take in draws]


# ---------------------------------------------------------------- numpy references


def inception_score_numpy(logits, splits):
    """The original improved-gan recipe on float64 softmax probabilities."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(shifted)
    probs /= probs.sum(axis=1, keepdims=True)
    n = probs.shape[0]
    scores = []
    for i in range(splits):
        part = probs[i * n // splits:(i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        kl = part * (np.log(part) - np.log(marginal))
        scores.append(np.exp(np.mean(np.sum(kl, axis=1))))
    return np.mean(scores), np.std(scores)


def mmd2_unbiased_numpy(real, fake, degree=3, gamma=None, coef0=1.0):
    """Unbiased MMD^2 (cross term over all pairs), polynomial kernel, explicit off-diagonal masks."""
    gamma = 1.0 / real.shape[1] if gamma is None else gamma

    def kernel(a, b):
        return (gamma * np.einsum("id,jd->ij", a, b) + coef0) ** degree

    m, n = real.shape[0], fake.shape[0]
    off_real = ~np.eye(m, dtype=bool)
    off_fake = ~np.eye(n, dtype=bool)
    within_real = kernel(real, real)[off_real].sum() / (m * (m - 1))
    within_fake = kernel(fake, fake)[off_fake].sum() / (n * (n - 1))
    across = kernel(real, fake).sum() / (m * n)
    return within_real + within_fake - 2.0 * across


def gaussian_window_2d(taps, sigma=1.5):
    coords = np.arange(taps) - (taps - 1) / 2.0
    window = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2.0 * sigma ** 2))
    return window / window.sum()


def filter_valid_2d(image, window):
    return np.einsum("ijkl,kl->ij", sliding_window_view(image, window.shape), window)


def halve_2d(image):
    height, width = image.shape
    image = np.pad(image, ((0, height % 2), (0, width % 2)), mode="symmetric")
    return image.reshape(image.shape[0] // 2, 2, image.shape[1] // 2, 2).mean(axis=(1, 3))


def ms_ssim_numpy(x, y, data_range=1.0, weights=MS_SSIM_WEIGHTS, window_size=11, k1=0.01, k2=0.03):
    """MS-SSIM of two (C, H, W) images, Wang et al. with the conventions of ms_ssim.py."""
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    per_channel = []
    for a, b in zip(x, y):
        product = 1.0
        for scale, weight in enumerate(weights):
            if scale > 0:
                a, b = halve_2d(a), halve_2d(b)
            window = gaussian_window_2d(min(window_size, *a.shape))
            mu_a, mu_b = filter_valid_2d(a, window), filter_valid_2d(b, window)
            var_a = filter_valid_2d(a * a, window) - mu_a ** 2
            var_b = filter_valid_2d(b * b, window) - mu_b ** 2
            cov = filter_valid_2d(a * b, window) - mu_a * mu_b
            contrast_structure = (2 * cov + c2) / (var_a + var_b + c2)
            if scale == len(weights) - 1:
                luminance = (2 * mu_a * mu_b + c1) / (mu_a ** 2 + mu_b ** 2 + c1)
                value = np.mean(luminance * contrast_structure)
            else:
                value = np.mean(contrast_structure)
            product *= max(value, 0.0) ** weight
        per_channel.append(product)
    return np.mean(per_channel)


def mean_pairwise_ms_ssim_numpy(images):
    n = images.shape[0]
    return np.mean([ms_ssim_numpy(images[i], images[j]) for i in range(n) for j in range(n) if i != j])


def similar_images(n, channels, height, width, dtype=torch.float64):
    """n images in (0, 1) sharing one smooth random layout, each with its own noise, so that
    MS-SSIM between them lies well inside (0, 1) (independent noise images are clipped to 0)."""
    layout = F.interpolate(torch.rand(1, channels, 5, 4, dtype=torch.float64), size=(height, width),
                           mode="bilinear", align_corners=False)
    mix = torch.rand(n, 1, 1, 1, dtype=torch.float64) * 0.5 + 0.3
    images = mix * layout + (1 - mix) * torch.rand(n, channels, height, width, dtype=torch.float64)
    return images.clamp(1e-3, 1 - 1e-3).to(dtype)


# ---------------------------------------------------------------- Inception Score


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inception_score_matches_numpy(dtype):
    logits = (torch.randn(53, 1008, dtype=torch.float64) * 3 + 0.5).to(dtype)
    metric = InceptionScore(splits=10)
    for batch in (logits[:17], logits[17:18], logits[18:]):
        metric.update(batch)
    mean, std = metric.compute()
    assert mean.dtype == std.dtype == torch.float64
    expected_mean, expected_std = inception_score_numpy(logits.double().numpy(), 10)
    assert_close(mean, expected_mean)
    assert_close(std, expected_std)
    assert 1.0 < mean.item() < 1008.0


def test_inception_score_known_values():
    # identical predictions: p(y|x) = p(y), KL = 0, IS = 1 in every split
    metric = InceptionScore(splits=3)
    metric.update(torch.randn(1, 1008, dtype=torch.float64).expand(11, 1008))
    mean, std = metric.compute()
    assert_close(mean, 1.0)
    assert_close(std, 0.0)
    # 13 confident predictions on distinct classes: IS = 13 (the other classes underflow to
    # probability 0 in float64, where the original's log(0) would give NaN)
    metric = InceptionScore(splits=1)
    metric.update(torch.eye(13, 1008, dtype=torch.float64) * 1000.0)
    mean, std = metric.compute()
    assert_close(mean, 13.0)
    assert_close(std, 0.0)


def test_inception_score_reset():
    metric = InceptionScore(splits=2, num_classes=7)
    metric.update(torch.randn(5, 7) * 10)
    metric.reset()
    logits = torch.randn(9, 7, dtype=torch.float64)
    metric.update(logits)
    assert_close(metric.compute(), inception_score_numpy(logits.numpy(), 2))


# ---------------------------------------------------------------- KID


def test_kid_whole_sets_matches_numpy():
    # subset_size equal to both counts: every subset is the whole set (in some order)
    real = torch.randn(19, 67, dtype=torch.float64) + 0.2
    fake = torch.randn(19, 67, dtype=torch.float64) * 1.3
    metric = KID(subsets=3, subset_size=19)
    metric.update(real_features=real[:10])
    metric.update(real_features=real[10:], fake_features=fake[:7])
    metric.update(fake_features=fake[7:])
    mean, std = metric.compute()
    assert mean.dtype == torch.float64
    assert_close(mean, mmd2_unbiased_numpy(real.numpy(), fake.numpy()))
    assert_close(std, 0.0)


def test_kid_refuses_a_subset_larger_than_a_side():
    metric = KID(subsets=3, subset_size=20)
    metric.update(real_features=torch.randn(23, 5, dtype=torch.float64), fake_features=torch.randn(19, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"subset_size=20 exceeds the samples available \(23 real, 19 fake\).*<= 19"):
        metric.compute()


def test_kid_random_subsets_match_numpy():
    real = torch.rand(31, 45, dtype=torch.float64)
    fake = torch.rand(29, 45, dtype=torch.float32) * 1.1
    kernel = dict(degree=2, gamma=0.05, coef0=0.5)
    metric = KID(subsets=4, subset_size=11, seed=7, **kernel)
    metric.update(real_features=real, fake_features=fake)
    mean, std = metric.compute()
    draws = replay_randperm_draws(7, [(31, 11), (29, 11)] * 4)
    real_np, fake_np = real.numpy(), fake.double().numpy()
    estimates = [mmd2_unbiased_numpy(real_np[draws[2 * s]], fake_np[draws[2 * s + 1]], **kernel) for s in range(4)]
    assert_close(mean, np.mean(estimates))
    assert_close(std, np.std(estimates))
    assert std.item() > 0


def test_kid_separates_distributions():
    same = KID(subsets=10, subset_size=50)
    same.update(real_features=torch.randn(200, 33, dtype=torch.float64),
                fake_features=torch.randn(200, 33, dtype=torch.float64))
    shifted = KID(subsets=10, subset_size=50)
    shifted.update(real_features=torch.randn(200, 33, dtype=torch.float64),
                   fake_features=torch.randn(200, 33, dtype=torch.float64) + 1.0)
    assert abs(same.compute()[0].item()) < 0.1 * shifted.compute()[0].item()


# ---------------------------------------------------------------- MS-SSIM


@pytest.mark.parametrize("shape", [(3, 37, 29), (1, 32, 32), (2, 5, 7), (1, 131, 135)],
                         ids=["37x29", "32x32", "5x7", "131x135"])
def test_ms_ssim_matches_numpy(shape):
    # 37x29: odd sides at every scale; 32x32: the coarse windows shrink to 8, 4, 2 taps;
    # 5x7: windows of 5, 3, 2, 1, 1 taps; 131x135: the convolution path (sides > 128) at full resolution
    images = similar_images(6, *shape)
    x, y = images[:3], images[3:]
    got = ms_ssim(x, y)
    expected = [ms_ssim_numpy(a, b) for a, b in zip(x.numpy(), y.numpy())]
    assert_close(got, expected)
    assert ((0.05 < got) & (got < 0.95)).all()
    assert_close(ms_ssim(x, x), np.ones(3))


def test_ms_ssim_clips_negative_contrast_structure_to_zero():
    x = similar_images(2, 3, 37, 29)
    got = ms_ssim(x, 1.0 - x)   # inverted images: negative cs at every scale
    assert_close(got, [ms_ssim_numpy(a, b) for a, b in zip(x.numpy(), 1.0 - x.numpy())])
    assert_close(got, np.zeros(2))


def test_ms_ssim_matches_pytorch_msssim():
    pytorch_msssim = pytest.importorskip("pytorch_msssim")
    # 176 = 11 * 16: every scale even and at least 11 px, where both conventions agree
    images = similar_images(4, 3, 176, 176)
    x, y = images[:2], images[2:]
    coords = torch.arange(11, dtype=torch.float64) - 5
    window = torch.exp(-coords ** 2 / (2 * 1.5 ** 2))
    window = (window / window.sum()).view(1, 1, 1, 11).repeat(3, 1, 1, 1)
    expected = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False, win=window)
    got = ms_ssim(x, y)
    assert_close(got, expected)
    assert ((0.05 < got) & (got < 0.95)).all()


@pytest.mark.parametrize("shape", [(3, 37, 29), (1, 32, 32)], ids=["37x29", "32x32"])
def test_msssim_all_pairs_matches_numpy(shape):
    images = similar_images(7, *shape, dtype=torch.float32)
    metric = MSSSIM(subsets=1, subset_size=64)   # capped at the 7 images: all 21 pairs
    metric.update(images[:3])
    metric.update(images[3:])
    mean, std = metric.compute()
    assert mean.dtype == torch.float64
    expected = mean_pairwise_ms_ssim_numpy(images.double().numpy())
    assert_close(mean, expected)
    assert_close(std, 0.0)
    assert 0.05 < mean.item() < 0.95


def test_msssim_random_subsets_match_numpy():
    images = similar_images(9, 2, 23, 19)
    metric = MSSSIM(subsets=3, subset_size=4, seed=11)
    metric.update(images)
    mean, std = metric.compute()
    draws = replay_randperm_draws(11, [(9, 4)] * 3)
    subset_means = [mean_pairwise_ms_ssim_numpy(images.numpy()[index]) for index in draws]
    assert_close(mean, np.mean(subset_means))
    assert_close(std, np.std(subset_means))
    assert std.item() > 0


# ---------------------------------------------------------------- distributed


def make_metrics():
    return {
        "inception_score": InceptionScore(splits=10),
        "kid": KID(subsets=5, subset_size=15, seed=3),
        "ms_ssim": MSSSIM(subsets=3, subset_size=6, seed=5),
    }


def feed(metrics, data, part, world):
    """Update every metric with the part-th of `world` contiguous blocks, in two uneven calls each."""
    logits, real, fake, images = data

    def block(tensor):
        n = tensor.shape[0]
        return tensor[part * n // world:(part + 1) * n // world]

    def two_calls(tensor):
        return tensor[:3], tensor[3:]

    for batch in two_calls(block(logits)):
        metrics["inception_score"].update(batch)
    for real_batch, fake_batch in zip(two_calls(block(real)), two_calls(block(fake))):
        metrics["kid"].update(real_features=real_batch, fake_features=fake_batch)
    for batch in two_calls(block(images)):
        metrics["ms_ssim"].update(batch)


def _distributed_worker(rank, world, init_file, data, result_pattern):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    metrics = make_metrics()
    feed(metrics, data, rank, world)
    torch.save({name: metric.compute() for name, metric in metrics.items()}, result_pattern.format(rank))
    exit_worker()


@pytest.mark.slow
def test_two_processes_compute_what_one_process_computes_on_all_data():
    data = (torch.randn(57, 1008, dtype=torch.float64) * 2,
            torch.randn(41, 29, dtype=torch.float64),
            torch.randn(33, 29, dtype=torch.float64) + 0.3,
            similar_images(11, 3, 21, 17))
    single = make_metrics()
    feed(single, data, 0, 1)
    expected = {name: metric.compute() for name, metric in single.items()}
    with tempfile.TemporaryDirectory() as tmp:
        pattern = os.path.join(tmp, "rank{}.pt")
        mp.spawn(_distributed_worker, args=(2, os.path.join(tmp, "init"), data, pattern), nprocs=2)
        per_rank = [torch.load(pattern.format(rank)) for rank in range(2)]
    for got in per_rank:
        for name, (mean, std) in expected.items():
            assert_close(got[name][0], mean)
            assert_close(got[name][1], std)


# ---------------------------------------------------------------- bad input


def test_inception_score_bad_input():
    metric = InceptionScore(splits=10)
    with pytest.raises(ValueError, match=r"shape \(N, 1008\)"):
        metric.update(torch.randn(1008))
    with pytest.raises(ValueError, match=r"shape \(N, 1008\), got \(4, 1000\)"):
        metric.update(torch.randn(4, 1000))
    with pytest.raises(ValueError, match="floating-point, got dtype torch.int64"):
        metric.update(torch.ones(4, 1008, dtype=torch.int64))
    metric.reset()
    metric.update(torch.randn(3, 1008))
    bad = torch.randn(3, 1008)
    bad[1, 5] = float("nan")
    with pytest.raises(ValueError, match="batch 2 .*NaN or Inf"):
        metric.update(bad)
    with pytest.raises(ValueError, match="at least splits=10 samples .* got 3"):
        metric.compute()
    with pytest.raises(ValueError, match="splits must be a positive int"):
        InceptionScore(splits=0)


def test_kid_bad_input():
    metric = KID()
    with pytest.raises(ValueError, match="needs real_features or fake_features"):
        metric.update()
    with pytest.raises(ValueError, match=r"shape \(N, d\)"):
        metric.update(real_features=torch.randn(2, 3, 5))
    metric.reset()
    metric.update(real_features=torch.randn(4, 9))
    with pytest.raises(ValueError, match="fake_features has 8 features per sample in batch 2"):
        metric.update(fake_features=torch.randn(4, 8))
    bad = torch.randn(4, 9)
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="fake_features of batch 3 .*NaN or Inf"):
        metric.update(real_features=torch.randn(4, 9), fake_features=bad)
    assert sum(t.shape[0] for t in metric.real_features) == 4   # the rejected call stored nothing
    with pytest.raises(ValueError, match="floating-point"):
        metric.update(fake_features=torch.ones(4, 9, dtype=torch.int32))
    metric.update(fake_features=torch.randn(1, 9))
    with pytest.raises(ValueError, match="at least 2 real and 2 fake samples, got 4 real and 1 fake"):
        metric.compute()
    with pytest.raises(ValueError, match="subset_size must be an int >= 2"):
        KID(subset_size=1)
    fresh = KID()  # a rejected first call does not fix the width either
    nan = torch.full((4, 8), float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        fresh.update(real_features=torch.randn(4, 8), fake_features=nan)
    fresh.update(real_features=torch.randn(4, 16), fake_features=torch.randn(4, 16))


def test_msssim_bad_input():
    metric = MSSSIM()
    with pytest.raises(ValueError, match=r"shape \(N, C, H, W\)"):
        metric.update(torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="floating-point"):
        metric.update(torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"outside \[0, data_range=1\]; map tanh outputs"):
        metric.update(torch.rand(2, 3, 16, 16) * 2 - 1)
    metric.reset()
    metric.update(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"batch 2 have shape \(C, H, W\) = \(3, 15, 16\)"):
        metric.update(torch.rand(2, 3, 15, 16))
    bad = torch.rand(2, 3, 16, 16)
    bad[1, 2, 3, 4] = float("nan")
    with pytest.raises(ValueError, match="images of batch 3 .*NaN or Inf"):
        metric.update(bad)
    with pytest.raises(ValueError, match="at least 2 images to form a pair, got 1"):
        metric.compute()
    with pytest.raises(ValueError, match="same shape"):
        ms_ssim(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 15))


def test_inception_score_shuffles_by_a_seeded_permutation_before_splitting():
    """The `is` command read folders in name order and split them consecutively: class-ordered images
    put one class in each split (IS near 1 per split). shuffle_seed orders the samples as
    numpy's RandomState(seed).permutation does first, torch-fidelity's convention."""
    classes = torch.arange(40) // 4  # 10 classes in runs of 4
    logits = torch.nn.functional.one_hot(classes, 1008).double() * 50 + torch.randn(40, 1008, dtype=torch.float64)
    ordered = InceptionScore(splits=10)
    ordered.update(logits)
    shuffled = InceptionScore(splits=10, shuffle_seed=2020)
    shuffled.update(logits)
    permutation = np.random.RandomState(2020).permutation(40)
    assert_close(shuffled.compute(), inception_score_numpy(logits.numpy()[permutation], 10))
    assert ordered.compute()[0] < 1.1 < shuffled.compute()[0]
    for seed in (-1, 2**32, 1.5):
        with pytest.raises(ValueError, match="shuffle_seed must be None or an int"):
            InceptionScore(shuffle_seed=seed)
