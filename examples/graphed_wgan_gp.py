"""Example: a hand-written WGAN-GP discriminator update, eager and replayed from a CUDA graph.

The update is what a GAN script writes by hand: G's samples, D on real and fake, the
gradient penalty (fastgan.penalties, with its double backward) and an Adam step. Wrapped
in ``fastgan.graphs.GraphedStep`` it runs eagerly once, is captured once, and is replayed
from then on. Both copies start from the same SNDCGAN weights and see the same batches,
z and α (α passed in as a tensor, as the trainer does), so their losses agree to float32
round-off; the script prints the time per update of each and how far apart they end.

    python examples/graphed_wgan_gp.py [--steps N] [--batch B] [--device cpu|cuda]

On a CPU there is no graph to replay: GraphedStep says so and runs the update eagerly.
"""
import argparse
import copy
import time

import torch

from fastgan.graphs import GraphedStep
from fastgan.models import build_models
from fastgan.penalties import gradient_penalty


def discriminator_update(G, D, optimizer, penalty_weight=10.0):
    """One WGAN-GP update of D on ``real``, G(``z``) and the interpolation weights ``alpha``."""
    def update(real, z, alpha):
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            fake = G(z)
        loss = D(fake).mean() - D(real).mean()
        penalty = gradient_penalty(D, real, fake, "wgan-gp", alpha=alpha)
        (loss + penalty_weight * penalty).backward()
        optimizer.step()
        return loss.detach(), penalty.detach()
    return update


def timed(update, batches, device):
    """(ms per update after the first two, the last update's (loss, penalty) as floats)."""
    out, start = None, None
    for i, (real, z, alpha) in enumerate(batches):
        if i == 2:  # the first two: warm-up (and, for GraphedStep, the capture)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        out = update(real, z, alpha)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1e3 / (len(batches) - 2), [float(x) for x in out]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="D updates of each copy (default 50; at least 3)")
    parser.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when a GPU is visible)")
    args = parser.parse_args(argv)
    if args.steps < 3:
        parser.error("--steps must be at least 3 (two warm-up updates, then the timed ones)")
    device = torch.device(args.device)
    torch.manual_seed(0)
    G, D = (m.to(device) for m in build_models("sndcgan", 32, d_norm="none"))
    # capturable: Adam's step count stays on the GPU, which a graph needs (torch supports it on GPUs only)
    adam = dict(lr=2e-4, betas=(0.5, 0.999), capturable=device.type == "cuda")
    D_graphed = copy.deepcopy(D)
    eager = discriminator_update(G, D, torch.optim.Adam(D.parameters(), **adam))
    graphed_optimizer = torch.optim.Adam(D_graphed.parameters(), **adam)
    graphed = GraphedStep(discriminator_update(G, D_graphed, graphed_optimizer),
                          optimizers=[graphed_optimizer] if adam["capturable"] else ())

    draws = torch.Generator().manual_seed(1)
    batches = [(torch.rand(args.batch, 3, 32, 32, generator=draws).to(device),
                torch.randn(args.batch, 128, generator=draws).to(device),
                torch.rand(args.batch, generator=draws).to(device)) for _ in range(args.steps)]
    eager_ms, eager_out = timed(eager, batches, device)
    graphed_ms, graphed_out = timed(graphed, batches, device)
    print(f"{device}, batch {args.batch}, {args.steps} D updates of SNDCGAN with WGAN-GP:")
    print(f"  eager:        {eager_ms:8.2f} ms per update   last loss {eager_out[0]:+.5f}, penalty {eager_out[1]:.5f}")
    print(f"  GraphedStep:  {graphed_ms:8.2f} ms per update   last loss {graphed_out[0]:+.5f}, penalty {graphed_out[1]:.5f}"
          + ("" if graphed.captured else "   (ran eagerly: no GPU)"))
    with torch.no_grad():
        apart = max(float((a - b).abs().max()) for a, b in zip(D.parameters(), D_graphed.parameters()))
    speed_up = f"speed-up {eager_ms / graphed_ms:.2f}x" if graphed.captured else "no speed-up to measure"
    print(f"  {speed_up}; weights apart by at most {apart:.1e}")
    return eager_out, graphed_out, apart


if __name__ == "__main__":
    main()
