"""The lens of tempered adversarial networks (fastgan.models.lens, fastgan.tempered)."""
import io
import math

import pytest
import torch

from fastgan.models import Lens, build_models
from fastgan.tempered import lens_loss, lens_weight, reconstruction_error
from fastgan.train.losses import discriminator_loss

SIZE = 8


def _images(n, generator=None, dtype=torch.float64):
    return torch.rand(n, 3, SIZE, SIZE, generator=generator, dtype=dtype)


def _lens(seed=0):
    torch.manual_seed(seed)
    return Lens(hidden=8).double()


def test_the_lens_is_the_identity_at_init_exactly():
    lens = _lens()
    x = _images(5)
    assert torch.equal(lens(x), x)
    assert torch.equal(Lens()(x.float()), x.float())
    # ... but it is not a constant function of its parameters: the last layer gets a gradient.
    reconstruction_error(lens(x), x + 0.1).backward()
    assert lens.residual[-1].weight.grad.abs().sum() > 0


def test_the_schedule_falls_from_the_initial_weight_to_zero_at_k():
    assert lens_weight(0, 100) == 1.0
    assert lens_weight(0, 100, initial=2.5) == 2.5
    assert math.isclose(lens_weight(50, 100), 1 - math.sin(math.pi / 4), rel_tol=1e-15)
    weights = [lens_weight(t, 100) for t in range(101)]
    assert all(a > b for a, b in zip(weights[:100], weights[1:]))  # strictly decreasing up to K
    assert lens_weight(100, 100) == 0.0 and lens_weight(10**6, 100) == 0.0
    for call, message in ((lambda: lens_weight(0, 0), "steps"), (lambda: lens_weight(-1, 5), "step must be"),
                          (lambda: lens_weight(0, 5, initial=-1.0), "initial adversarial weight")):
        with pytest.raises(ValueError, match=message):
            call()


def test_the_loss_is_the_reconstruction_minus_the_weighted_d_loss():
    real = _images(4)
    lensed = real + 0.01 * torch.randn_like(real)
    d_loss = torch.tensor(1.3, dtype=torch.float64)
    reconstruction = (lensed - real).square().sum((1, 2, 3)).mean()
    torch.testing.assert_close(reconstruction_error(lensed, real), reconstruction, rtol=1e-14, atol=0)
    torch.testing.assert_close(lens_loss(d_loss, lensed, real, 0.25), reconstruction - 0.25 * 1.3, rtol=1e-14, atol=0)
    assert torch.equal(lens_loss(None, lensed, real, 0.0), reconstruction_error(lensed, real))
    weight = torch.tensor(0.25, dtype=torch.float64)  # as a CUDA graph's static input
    assert torch.equal(lens_loss(d_loss, lensed, real, weight), lens_loss(d_loss, lensed, real, 0.25))
    with pytest.raises(ValueError, match="adversarial_weight must be >= 0"):
        lens_loss(d_loss, lensed, real, -0.5)
    with pytest.raises(ValueError, match="discriminator_loss must be D's scalar"):
        lens_loss(None, lensed, real, 0.5)
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_error(lensed[:2], real)


@pytest.mark.parametrize("loss", ("ns", "wgan", "hinge", "lsgan"))
def test_a_lens_step_raises_ds_loss_on_lensed_reals(loss):
    """The lens's gradient pushes against D: one SGD step on L increases L_D(D(L(x)), D(fake))."""
    _, D = build_models("sndcgan", SIZE, 16, "spectral", 1 / 16)
    D = D.double().eval()  # fixed D: no power iteration between the two evaluations
    lens = _lens()
    real, fake = _images(8), _images(8)
    fake_logits = D(fake).detach()

    def d_loss():
        return discriminator_loss(loss, D(lens(real)), fake_logits)

    before = d_loss()
    lens_loss(before, lens(real), real, lens_weight(0, 1000)).backward()
    with torch.no_grad():
        for parameter in lens.parameters():
            parameter -= 1e-2 * parameter.grad
    assert d_loss() > before


def test_past_the_schedule_the_reconstruction_returns_the_lens_to_the_identity():
    generator = torch.Generator().manual_seed(0)
    lens = Lens(hidden=8)
    with torch.no_grad():  # a lens far from the identity, as adversarial training leaves it
        lens.residual[-1].weight.normal_(0, 0.3, generator=generator)
        lens.residual[-1].bias.normal_(0, 0.3, generator=generator)
    held_out = _images(16, generator, torch.float32)
    assert (lens(held_out) - held_out).abs().max() > 0.3
    optimizer = torch.optim.Adam(lens.parameters(), lr=3e-2)
    steps = 1000
    for step in range(steps, steps + 150):
        assert lens_weight(step, steps) == 0.0
        real = _images(8, generator, torch.float32)
        loss = lens_loss(None, lens(real), real, lens_weight(step, steps))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Measured: 1.5e-5 after these 150 steps (float32); 1e-3 of the [0, 1] pixel range leaves room.
    assert (lens(held_out) - held_out).abs().max() < 1e-3


def test_state_dict_round_trip_is_bit_exact():
    lens = _lens()
    with torch.no_grad():
        lens.residual[-1].weight.normal_(0, 0.1)
    buffer = io.BytesIO()
    torch.save(lens.state_dict(), buffer)
    buffer.seek(0)
    restored = _lens(seed=1)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    x = _images(3)
    assert torch.equal(restored(x), lens(x))
    assert all(torch.equal(a, b) for a, b in zip(lens.state_dict().values(), restored.state_dict().values()))


def test_bad_lenses_and_inputs_are_refused():
    with pytest.raises(ValueError, match="depth"):
        Lens(depth=1)
    with pytest.raises(ValueError, match="hidden"):
        Lens(hidden=0)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        Lens()(torch.rand(2, 1, 8, 8))


def test_an_empty_batch_is_refused_not_averaged_into_nan():
    empty = _images(0)
    with pytest.raises(ValueError, match="at least one image"):
        reconstruction_error(empty, empty)
    with pytest.raises(ValueError, match="at least one image"):
        lens_loss(torch.tensor(1.0, dtype=torch.float64), empty, empty, 0.5)
