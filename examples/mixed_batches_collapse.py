"""Example: a symmetric discriminator sees what no per-sample discriminator can.

The "generator" here returns real handwritten digits (scikit-learn's 8x8 digits), all of
one class per batch, the class drawn uniformly for each batch. Every single fake is
then distributed exactly like the data: a discriminator that scores samples one at a
time can do no better than a constant. Within a batch, though, the fakes lack the data's
diversity. Both discriminators below are SNDCGAN's (a quarter of its channels, no
normalization) and are trained on mixed
batches (fastgan.mixed_batches, batch smoothing) to predict the proportion of real
digits; the symmetric one (fastgan.models.make_symmetric) reads batch statistics, the
per-sample one averages its per-sample logits. The script prints each one's mean
absolute error |σ(ℓ) − p̄| on held-out mixed batches, beside the constant ½'s.

    python examples/mixed_batches_collapse.py [--steps N] [--batch B] [--lr LR] [--seed S]

(On a shared CPU, OMP_NUM_THREADS=1 can be much faster for models this small.)
"""
import argparse

import torch
from sklearn.datasets import load_digits

from fastgan import mixed_batches
from fastgan.models import build_models, make_symmetric


def digits():
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).div(16).unsqueeze(1).expand(-1, 3, -1, -1)
    return images.contiguous(), torch.tensor(data.target)


def collapsed_batch(images, labels, size, generator):
    """``size`` digits of one class, the class drawn uniformly."""
    pool = images[labels == torch.randint(0, 10, (), generator=generator)]
    return pool[torch.randint(0, len(pool), (size,), generator=generator)]


def batches(images, labels, size, generator):
    real = images[torch.randint(0, len(images), (size,), generator=generator)]
    fake = collapsed_batch(images, labels, size, generator)
    return mixed_batches.mixed_batch(real, fake, generator=generator)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1500, help="D updates (default 1500)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the models and draws (default 0)")
    parser.add_argument("--eval-batches", type=int, default=200, help="held-out mixed batches (default 200)")
    parser.add_argument("--verbose", action="store_true", help="print the loss every 100 updates")
    args = parser.parse_args(argv)

    images, labels = digits()
    held_out = torch.arange(len(images)) % 5 == 0
    torch.manual_seed(args.seed)
    per_sample = build_models("sndcgan", 8, 16, "none", 0.25)[1]
    symmetric = make_symmetric(build_models("sndcgan", 8, 16, "none", 0.25)[1])
    models = {"per-sample D": (per_sample, lambda x: per_sample(x).mean()), "symmetric D": (symmetric, symmetric)}

    for name, (model, batch_logit) in models.items():
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.5, 0.999))
        generator = torch.Generator().manual_seed(args.seed)
        for step in range(args.steps):
            batch = batches(images[~held_out], labels[~held_out], args.batch, generator)
            loss = mixed_batches.discriminator_loss("ns", batch_logit(batch.images), batch.target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if args.verbose and step % 100 == 0:
                print(f"  {name} step {step}: loss {loss.item():.4f}", flush=True)
        model.eval()
        errors, constant = [], []
        evaluation = torch.Generator().manual_seed(10_000 + args.seed)
        with torch.no_grad():
            for _ in range(args.eval_batches):
                batch = batches(images[held_out], labels[held_out], args.batch, evaluation)
                errors.append((batch_logit(batch.images).sigmoid() - batch.target).abs())
                constant.append((0.5 - batch.target).abs())
        print(f"{name}: mean |prediction - proportion| = {torch.stack(errors).mean():.3f} "
              f"(constant 1/2: {torch.stack(constant).mean():.3f}) after {args.steps} updates, batch {args.batch}")


if __name__ == "__main__":
    main()
