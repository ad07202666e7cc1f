"""Mixed batches and symmetric discriminators (fastgan.mixed_batches, fastgan.models.symmetric)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICES
from fastgan import mixed_batches as mb
from fastgan.models import build_models, make_symmetric
from fastgan.models.symmetric import BatchPooledConv2d, SymmetricDiscriminator
from fastgan.train import losses

# Tiny models: 8×8 images, 1/16 of the channels.
SIZE, WIDTH = 8, 1 / 16
ARCHITECTURES = ("sndcgan", "resnet_cifar")


def _images(n, dtype=torch.float64, generator=None):
    return torch.rand(n, 3, SIZE, SIZE, dtype=dtype, generator=generator)


def _symmetric(architecture, d_norm="spectral"):
    _, D = build_models(architecture, SIZE, 16, d_norm, WIDTH, symmetric=True)
    return D.double()


# --- drawing and mixing ---------------------------------------------------------------------------

def test_the_target_is_the_proportion_of_the_mask_and_the_batch_follows_it():
    real, fake = _images(13), _images(13)
    batch = mb.mixed_batch(real, fake, generator=torch.Generator().manual_seed(3))
    mask = batch.mask
    assert mask.dtype == torch.bool and mask.shape == (13,)
    assert batch.target.dtype == torch.float64 and batch.target.dim() == 0
    assert batch.target.item() == mask.sum().item() / 13
    assert torch.equal(batch.images[mask], real[mask]) and torch.equal(batch.images[~mask], fake[~mask])


@pytest.mark.parametrize("p, expected", [(0.0, 0.0), (1.0, 1.0)])
def test_p_0_is_all_fake_and_p_1_all_real(p, expected):
    real, fake = _images(9), _images(9)
    batch = mb.mixed_batch(real, fake, p=p)
    assert batch.target.item() == expected
    assert torch.equal(batch.images, real if p == 1 else fake)


def test_draws_are_reproducible_with_a_generator():
    real, fake = _images(32), _images(32)
    first = mb.mixed_batch(real, fake, generator=torch.Generator().manual_seed(7))
    second = mb.mixed_batch(real, fake, generator=torch.Generator().manual_seed(7))
    other = mb.mixed_batch(real, fake, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first.mask, second.mask) and torch.equal(first.images, second.images)
    assert not torch.equal(first.mask, other.mask)


def test_batch_smoothing_makes_the_number_of_real_elements_uniform():
    """p ~ U[0, 1], β_i ~ Bernoulli(p): the count of reals is Beta-Binomial(1, 1), uniform on {0, …, B}."""
    generator, batch, draws = torch.Generator().manual_seed(0), 4, 5000
    counts = torch.stack([mb.draw_mask(batch, generator=generator).sum() for _ in range(draws)])
    frequencies = torch.bincount(counts, minlength=batch + 1).double() / draws
    # Each frequency's standard error is sqrt(0.2 · 0.8 / 5000) ≈ 0.0057: 4 of them.
    assert torch.allclose(frequencies, torch.full_like(frequencies, 1 / (batch + 1)), atol=0.023)


def test_without_smoothing_batches_are_pure_and_each_kind_half_the_time():
    generator, batch, draws = torch.Generator().manual_seed(1), 6, 2000
    counts = torch.stack([mb.draw_mask(batch, smoothing=False, generator=generator).sum() for _ in range(draws)])
    assert set(counts.tolist()) == {0, batch}
    assert abs((counts == batch).double().mean().item() - 0.5) < 4 * math.sqrt(0.25 / draws)


@pytest.mark.parametrize("device", DEVICES)
def test_a_generator_draws_on_its_device_and_the_mask_goes_where_asked(device):
    mask = mb.draw_mask(9, generator=torch.Generator().manual_seed(3), device=device)
    assert mask.device.type == device
    assert torch.equal(mask.cpu(), mb.draw_mask(9, generator=torch.Generator().manual_seed(3)))


def test_gradients_reach_the_fake_elements_taken():
    real, fake = _images(6), _images(6).requires_grad_()
    mask = torch.tensor([True, False, True, False, False, True])
    mb.mix(real, fake, mask).images.sum().backward()
    assert torch.equal(fake.grad.flatten(1).amax(1) > 0, ~mask)


@pytest.mark.parametrize("call, message", [
    (lambda: mb.draw_mask(0), "batch_size"),
    (lambda: mb.draw_mask(4, p=1.5), "p must be a probability"),
    (lambda: mb.mix(_images(4), _images(3), torch.ones(4, dtype=torch.bool)), "same shape"),
    (lambda: mb.mix(_images(4), _images(4), torch.ones(4)), "mask must be a bool"),
    (lambda: mb.mix(_images(4), _images(4), torch.ones(3, dtype=torch.bool)), "mask must be a bool"),
])
def test_bad_inputs_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_empty_batches_are_refused_not_averaged_into_nan():
    """A mean over no elements is NaN: an empty batch has no proportion of reals and no logit."""
    empty = _images(0)
    t = torch.tensor(0.5, dtype=torch.float64)
    for call in (lambda: mb.mix(empty, empty, torch.ones(0, dtype=torch.bool)),
                 lambda: mb.discriminator_loss("ns", torch.randn(0, dtype=torch.float64), t),
                 lambda: mb.generator_loss("lsgan", torch.randn(0, dtype=torch.float64))):
        with pytest.raises(ValueError, match="empty"):
            call()
    with pytest.raises(ValueError, match="empty"):
        _symmetric("sndcgan")(empty)


# --- losses ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", mb.MIXED_BATCH_LOSSES)
def test_on_pure_batches_the_losses_are_fastgans_real_and_fake_terms(kind):
    x = torch.randn(7, dtype=torch.float64)
    real_term = losses.discriminator_loss(kind, x, torch.full_like(x, -torch.inf))
    fake_term = losses.discriminator_loss(kind, torch.full_like(x, torch.inf), x)
    one, zero = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    torch.testing.assert_close(mb.discriminator_loss(kind, x, one), real_term, rtol=1e-14, atol=0)
    torch.testing.assert_close(mb.discriminator_loss(kind, x, zero), fake_term, rtol=1e-14, atol=0)
    torch.testing.assert_close(mb.generator_loss(kind, x), losses.generator_loss(kind, x), rtol=1e-14, atol=0)


def test_the_ns_loss_is_the_cross_entropy_with_the_proportion():
    logits, target = torch.randn(11, dtype=torch.float64), torch.tensor(5 / 13, dtype=torch.float64)
    d = logits.sigmoid()
    expected = -(target * d.log() + (1 - target) * (1 - d).log()).mean()
    torch.testing.assert_close(mb.discriminator_loss("ns", logits, target), expected, rtol=1e-13, atol=0)
    pooled = logits.mean()
    torch.testing.assert_close(mb.discriminator_loss("ns", pooled, target),
                               -(target * pooled.sigmoid().log() + (1 - target) * (-pooled).sigmoid().log()), rtol=1e-13, atol=0)


@pytest.mark.parametrize("kind", mb.MIXED_BATCH_LOSSES)
def test_ds_loss_is_smallest_when_it_predicts_the_proportion(kind):
    target = torch.tensor(0.3, dtype=torch.float64)
    logit = torch.logit(target).clone().requires_grad_()
    mb.discriminator_loss(kind, logit, target).backward()
    assert abs(logit.grad.item()) < 1e-15
    for offset in (-0.5, 0.5):
        assert mb.discriminator_loss(kind, logit.detach() + offset, target) > mb.discriminator_loss(kind, logit.detach(), target)


@pytest.mark.parametrize("kind", ("wgan", "hinge"))
def test_losses_without_a_probability_are_rejected_naming_the_key(kind):
    x, t = torch.randn(4), torch.tensor(0.5)
    for call in (lambda: mb.discriminator_loss(kind, x, t), lambda: mb.generator_loss(kind, x), lambda: mb.check_loss(kind)):
        with pytest.raises(ValueError, match=f"loss='{kind}' does not apply to mixed batches"):
            call()
    with pytest.raises(ValueError, match="unknown loss"):
        mb.check_loss("softplus")


def test_loss_shapes_are_checked():
    with pytest.raises(ValueError, match=r"shape \(\) or \(B,\)"):
        mb.discriminator_loss("ns", torch.randn(2, 2), torch.tensor(0.5))
    with pytest.raises(ValueError, match="target must be the batch's proportion"):
        mb.discriminator_loss("ns", torch.randn(4), torch.rand(4))


@pytest.mark.parametrize("target", [1.5, -1.0, float("nan"), torch.tensor(1.5), torch.tensor(float("nan"))])
def test_a_target_outside_0_1_is_refused(target):
    """A proportion of real elements is in [0, 1]; 1.5 gave a loss (0.693), NaN gave NaN."""
    for kind in ("ns", "lsgan"):
        with pytest.raises(ValueError, match=r"proportion of real elements, in \[0, 1\], got"):
            mb.discriminator_loss(kind, torch.randn(4), target)


def test_a_number_is_a_target_too():
    logits = torch.randn(5, dtype=torch.float64)
    for kind in ("ns", "lsgan"):
        assert mb.discriminator_loss(kind, logits, 0.4) == mb.discriminator_loss(kind, logits, torch.tensor(0.4))


# --- the symmetric discriminator ------------------------------------------------------------------

@pytest.mark.parametrize("d_norm", ("spectral", "none", "batch", "layer"))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_batch_logit_is_invariant_to_permutations_in_float64(architecture, d_norm):
    """Exact in real arithmetic; in float64 the batch means sum in a different order: ≤ 1e-12 relative."""
    D = _symmetric(architecture, d_norm)
    x = _images(17)
    state = copy.deepcopy(D.state_dict())  # spectral norm's u, v and BN statistics move at each forward
    reference = D(x)
    assert reference.shape == ()
    for seed in range(3):
        D.load_state_dict(state)
        permuted = D(x[torch.randperm(17, generator=torch.Generator().manual_seed(seed))])
        torch.testing.assert_close(permuted, reference, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_every_layer_is_permutation_equivariant(architecture):
    D = _symmetric(architecture).eval()  # eval: SN's power iteration does not move between the two passes
    layers = [m for m in D.modules() if isinstance(m, BatchPooledConv2d)]
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in layers]
    x, permutation = _images(9), torch.randperm(9)
    D(x)
    D(x[permutation])
    for hook in hooks:
        hook.remove()
    plain, permuted = outputs[:len(layers)], outputs[len(layers):]
    for a, b in zip(plain, permuted):
        torch.testing.assert_close(b, a[permutation], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(D(x[permutation], pool=False), D(x, pool=False)[permutation], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_elements_logit_depends_on_the_rest_of_the_batch(architecture):
    D = _symmetric(architecture).eval()
    x = _images(5)
    y = x.clone()
    y[1:] = _images(4)
    first = D(x, pool=False)[0]
    assert abs(D(y, pool=False)[0].item() - first.item()) > 1e-6 * abs(first.item())


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_the_conversion_keeps_ds_layers_each_element_sees_them_unchanged(architecture):
    """With Γ = 0 the symmetric D's per-element logits are the original D's."""
    _, D = build_models(architecture, SIZE, 16, "none", WIDTH)
    D = D.double()
    x = _images(6)
    expected = D(x)
    symmetric = make_symmetric(D)
    layers = [m for m in symmetric.modules() if isinstance(m, BatchPooledConv2d)]
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in symmetric.modules())
    assert len(layers) == convs // 2  # every conv converted: each layer holds the original and Γ
    with torch.no_grad():
        for layer in layers:
            layer.pooled.weight.zero_()
    torch.testing.assert_close(symmetric(x, pool=False), expected, rtol=0, atol=0)
    torch.testing.assert_close(symmetric(x), expected.mean(), rtol=0, atol=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_spectral_norm_covers_the_pooled_kernels(architecture):
    D = _symmetric(architecture, "spectral")
    layers = [m for m in D.modules() if isinstance(m, BatchPooledConv2d)]
    assert all(torch.nn.utils.parametrize.is_parametrized(m.pooled, "weight") for m in layers)
    D.eval()  # reading the weights runs no power iteration
    for layer in layers:
        pooled = layer.pooled
        original = pooled.parametrizations.weight.original
        sigma = [torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2).item() for w in (pooled.weight, original)]
        # The power iteration's estimate of σ is low, never high (float32 u, v: to 1e-6), and after SN's
        # 15 warm-up iterations within ~10 %: the normalized kernel's σ is in [1, 1.15); the N(0, 0.02)
        # kernel's own is far below 1.
        assert 1 - 1e-6 < sigma[0] < 1.15 and sigma[1] < 0.5, sigma


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_gradients_reach_every_parameter_and_the_inputs(architecture):
    D = _symmetric(architecture)
    x = _images(6).requires_grad_()
    F.binary_cross_entropy_with_logits(D(x), torch.tensor(0.5, dtype=torch.float64)).backward()
    for name, parameter in D.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()


def test_state_dict_round_trip_and_build_options():
    D = _symmetric("sndcgan")
    assert isinstance(D, SymmetricDiscriminator) and D.image_size == SIZE and D.normalization == "spectral"
    _, other = build_models("sndcgan", SIZE, 16, "spectral", WIDTH, symmetric=True)
    other = other.double()
    other.load_state_dict(D.state_dict())
    x = _images(4)
    assert torch.equal(D.eval()(x), other.eval()(x))


def test_bad_conversions_are_refused():
    D = _symmetric("sndcgan")
    with pytest.raises(ValueError, match="already symmetric"):
        make_symmetric(D.discriminator)
    with pytest.raises(ValueError, match="fastgan discriminator"):
        make_symmetric(torch.nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="expects images"):
        D(_images(2)[:, :2])


def test_the_collapse_example_runs(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "mixed_batches_collapse.py"
    spec = importlib.util.spec_from_file_location("mixed_batches_collapse", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(["--steps", "2", "--batch", "4", "--eval-batches", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["per-sample D", "symmetric D"]


@pytest.mark.parametrize("kind", mb.MIXED_BATCH_LOSSES)
def test_a_gan_iteration_on_mixed_batches_with_a_lens(kind):
    """The pieces in the order the trainer's step uses them (see docs/icml2018.md): a D update on a
    mixed batch of lensed reals, then G's and the lens's updates through the frozen D."""
    from fastgan.models import Lens
    from fastgan.tempered import lens_loss, lens_weight

    G, D = build_models("sndcgan", SIZE, 16, "spectral", WIDTH, symmetric=True)
    lens = Lens(hidden=4)
    models = {"G": G, "D": D, "lens": lens}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=1e-3) for name, m in models.items()}
    # Parameters, not state dicts: SN's u, v and batch norm's statistics move at every forward, so
    # a state dict changes even when no optimizer step did anything.
    before = {name: {key: p.detach().clone() for key, p in m.named_parameters()} for name, m in models.items()}
    generator = torch.Generator().manual_seed(0)
    real, z = _images(8, torch.float32, generator), torch.rand(8, 16, generator=generator) * 2 - 1
    mask = mb.draw_mask(8, generator=generator)

    with torch.no_grad():
        fake, lensed = G(z), lens(real)
    batch = mb.mix(lensed, fake, mask)
    d_loss = mb.discriminator_loss(kind, D(batch.images), batch.target)
    optimizers["D"].zero_grad()
    d_loss.backward()
    optimizers["D"].step()
    d_updated = [p.detach().clone() for p in D.parameters()]

    D.requires_grad_(False)
    g_loss = mb.generator_loss(kind, D(G(z)))
    lensed = lens(real)
    lensed_batch = mb.mix(lensed, fake, mask)
    lens_objective = lens_loss(mb.discriminator_loss(kind, D(lensed_batch.images), lensed_batch.target), lensed, real,
                               lens_weight(0, 100))
    for name, loss in (("G", g_loss), ("lens", lens_objective)):
        optimizers[name].zero_grad()
        loss.backward()
        optimizers[name].step()
    D.requires_grad_(True)

    assert all(torch.isfinite(loss) for loss in (d_loss, g_loss, lens_objective))
    for name, model in models.items():
        moved = {key for key, p in model.named_parameters() if not torch.equal(p, before[name][key])}
        if name == "lens":  # the identity at init: only its zero last layer has a gradient at first
            last = f"residual.{len(lens.residual) - 1}."
            assert moved == {key for key in before[name] if key.startswith(last)}, moved
        else:
            assert moved == set(before[name]), f"{name}: did not move: {sorted(set(before[name]) - moved)}"
    assert all(torch.equal(a, b) for a, b in zip(D.parameters(), d_updated))  # frozen through G's and the lens's updates
