"""fastgan.models: shapes, ranges, parameter counts, normalization layers, init,
gradient flow and argument / input checks of the compare_gan reference models."""
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from fastgan.models import ARCHITECTURES, D_NORMALIZATIONS, Discriminator, Generator, build_models
from fastgan.models.resnet import Unpool

# (architecture, image_size) -> (G parameters, D parameters for "none" / "spectral",
# D parameters for "batch" / "layer"); the same numbers as the model docstrings.
PARAMETER_COUNTS = {
    ("sndcgan", 32): (3_828_739, 5_860_865, 5_864_449),
    ("sndcgan", 128): (19_926_019, 5_983_745, 5_987_329),
    ("resnet_cifar", 32): (5_849_603, 1_483_137, 1_484_935),
    ("resnet19", 128): (13_786_115, 15_086_529, 15_092_423),
}
DEFAULT_SIZES = list(PARAMETER_COUNTS)
BATCH = 2
WEIGHT_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def size_id(case):
    return f"{case[0]}-{case[1]}"


def test_public_constants():
    assert ARCHITECTURES == ("sndcgan", "resnet_cifar", "resnet19")
    assert D_NORMALIZATIONS == ("none", "batch", "layer", "spectral")


@pytest.mark.parametrize("architecture, image_size", DEFAULT_SIZES, ids=map(size_id, DEFAULT_SIZES))
def test_generator(architecture, image_size):
    g, _ = build_models(architecture, image_size, d_norm="none")
    assert isinstance(g, Generator) and (g.z_dim, g.image_size) == (128, image_size)
    assert trainable_parameters(g) == PARAMETER_COUNTS[architecture, image_size][0]
    with torch.no_grad():
        images = g(torch.randn(BATCH, 128))
    assert images.shape == (BATCH, 3, image_size, image_size)
    assert images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("d_norm", D_NORMALIZATIONS)
@pytest.mark.parametrize("architecture, image_size", DEFAULT_SIZES, ids=map(size_id, DEFAULT_SIZES))
def test_discriminator(architecture, image_size, d_norm):
    _, d = build_models(architecture, image_size, d_norm=d_norm)
    assert isinstance(d, Discriminator) and (d.image_size, d.normalization) == (image_size, d_norm)
    _, plain, normalized = PARAMETER_COUNTS[architecture, image_size]
    assert trainable_parameters(d) == (normalized if d_norm in ("batch", "layer") else plain)

    weight_layers = [m for m in d.modules() if isinstance(m, WEIGHT_LAYERS)]
    assert all(parametrize.is_parametrized(m, "weight") == (d_norm == "spectral") for m in weight_layers)
    assert any(isinstance(m, nn.BatchNorm2d) for m in d.modules()) == (d_norm == "batch")
    assert any(isinstance(m, nn.GroupNorm) for m in d.modules()) == (d_norm == "layer")

    with torch.no_grad():
        logits = d(torch.rand(BATCH, 3, image_size, image_size))
    assert logits.shape == (BATCH,)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("architecture", ["sndcgan", "resnet_cifar"])
def test_small_images(architecture):
    g, d = build_models(architecture, 16)
    images = g(torch.randn(BATCH, 128))
    assert images.shape == (BATCH, 3, 16, 16)
    assert d(images).shape == (BATCH,)


def test_initialisation():
    g, d = build_models("sndcgan", 32, d_norm="batch")
    big_conv = next(m for m in d.modules() if isinstance(m, nn.Conv2d) and m.weight.shape == (512, 512, 3, 3))
    assert big_conv.weight.std().item() == pytest.approx(0.02, rel=0.01)
    assert abs(big_conv.weight.mean().item()) < 1e-4
    for model in (g, d):
        for module in model.modules():
            if isinstance(module, WEIGHT_LAYERS):
                assert torch.count_nonzero(module.bias) == 0
            elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                assert (module.weight == 1).all() and (module.bias == 0).all()
                assert (module.momentum, module.eps) == (0.1, 1e-5)


def test_gradients_reach_every_parameter():
    g, d = build_models("sndcgan", 32)
    d(g(torch.randn(BATCH, 128))).sum().backward()
    for name, parameter in [*g.named_parameters(), *d.named_parameters()]:
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_unpool_inserts_zeros():
    x = torch.arange(1.0, 5.0).reshape(1, 1, 2, 2)
    expected = torch.tensor([[1.0, 0, 2, 0], [0, 0, 0, 0], [3, 0, 4, 0], [0, 0, 0, 0]])
    assert torch.equal(Unpool()(x), expected.reshape(1, 1, 4, 4))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(architecture="dcgan"), "unknown architecture 'dcgan'; choose one of"),
        (dict(architecture="sndcgan", d_norm="weight"), "unknown discriminator normalization 'weight'; choose one of"),
        (dict(architecture="sndcgan", image_size=20), "multiple of 8"),
        (dict(architecture="sndcgan", image_size=0), "multiple of 8"),
        (dict(architecture="resnet_cifar", image_size=36), "multiple of 8"),
        (dict(architecture="resnet19", image_size=96), "multiple of 64"),
        (dict(architecture="resnet19", image_size=32), "multiple of 64"),
        (dict(architecture="sndcgan", image_size=32.0), "multiple of 8"),
        (dict(architecture="sndcgan", z_dim=0), "z_dim"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_models(**kwargs)


@pytest.fixture(scope="module")
def small_sndcgan():
    return build_models("sndcgan", 16, d_norm="none")


@pytest.mark.parametrize("shape", [(BATCH, 3, 32, 32), (BATCH, 1, 16, 16), (3, 16, 16), (BATCH, 3, 16, 8)])
def test_discriminator_rejects_wrong_images(small_sndcgan, shape):
    _, d = small_sndcgan
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, 16, 16\), got"):
        d(torch.rand(shape))


@pytest.mark.parametrize("shape", [(BATCH, 64), (BATCH, 128, 1), (128,)])
def test_generator_rejects_wrong_latents(small_sndcgan, shape):
    g, _ = small_sndcgan
    with pytest.raises(ValueError, match=r"expects z of shape \(B, 128\), got"):
        g(torch.randn(shape))


def tf_layer_norm(x, weight, bias):
    """float64 reference of tf.contrib.layers.layer_norm on NCHW features (compare_gan's D
    layer norm): statistics over C, H, W of each sample, biased variance, its fixed
    variance_epsilon 1e-12, then a scale and shift per channel."""
    x = x.double()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    var = (x - mean).square().mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-12) * weight.double().view(1, -1, 1, 1) + bias.double().view(1, -1, 1, 1)


@pytest.mark.parametrize("architecture, image_size", [("sndcgan", 16), ("resnet_cifar", 16)])
def test_layer_norm_is_tf_layer_norm(architecture, image_size):
    """Every layer norm of D against the float64 reference, to 1e-9 (the float64 error is
    ~1e-12). Low-contrast features (a flat image: per-sample variance 1e-6 and below) are where
    the epsilon shows: torch's default 1e-5 shrank them 3× and more; TF's 1e-12 does not."""
    _, d = build_models(architecture, image_size, d_norm="layer", width=0.25)
    norms = [m for m in d.modules() if isinstance(m, nn.GroupNorm)]
    assert norms
    for norm in norms:
        norm.double()
        with torch.no_grad():
            norm.weight.copy_(torch.rand(norm.num_channels, dtype=torch.float64) + 0.5)
            norm.bias.copy_(torch.randn(norm.num_channels, dtype=torch.float64))
        # odd spatial size, per-sample scales from 1 down to 1e-4
        scales = torch.tensor([1.0, 1e-2, 1e-3, 1e-4], dtype=torch.float64).view(-1, 1, 1, 1)
        x = 0.5 + scales * torch.randn(4, norm.num_channels, 5, 7, dtype=torch.float64)
        torch.testing.assert_close(norm(x), tf_layer_norm(x, norm.weight, norm.bias), rtol=1e-9, atol=1e-9)
