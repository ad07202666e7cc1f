"""fastgan's command line: ``python -m fastgan COMMAND ...`` (``--help`` on each command).

  train --config C [key=value ...]    train a GAN of "The GAN Landscape" (configs/*.yaml)
  sample --checkpoint CKPT            a PNG grid of samples from a trained generator
  study --grid G [--index I]          run a study grid (configs/study/*.yaml), write its FID table
  fid PATH_A PATH_B                   FID between two image folders or .npz statistics files
  is PATH                             Inception Score of an image folder
  kid PATH_A PATH_B                   Kernel Inception Distance between two image folders
  stats PATH OUT.npz                  save a folder's FID statistics (pytorch-fid's .npz format)
  backends                            which kernels are built and usable here

Images are read from folders (recursively; png, jpg, jpeg, bmp, webp), converted to
RGB in [0, 1] and resized to 299x299 like pytorch-fid. Inception weights: see
``fastgan.metrics.inception`` (``--weights``, ``FASTGAN_INCEPTION``, or a download).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterator, List

import torch

def image_files(folder: str) -> List[Path]:
    from fastgan.train.data import image_files as images_below

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder} is neither an image folder nor an .npz statistics file")
    return images_below(Path(folder))


def image_batches(files: List[Path], batch_size: int, device: torch.device, desc: str) -> Iterator[torch.Tensor]:
    """(B, 3, 299, 299) float batches in [0, 1], with a progress bar."""
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from fastgan.metrics.inception import InceptionV3

    for start in tqdm(range(0, len(files), batch_size), desc=desc, unit="batch", file=sys.stderr):
        batch = []
        for path in files[start : start + batch_size]:
            try:
                with Image.open(path) as image:
                    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
            except OSError as exc:
                raise ValueError(f"cannot read image {path}: {exc}") from exc
            tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)
            batch.append(InceptionV3.resize(tensor))
        yield torch.cat(batch).to(device)


def _network(args):
    from fastgan.metrics.inception import InceptionV3

    return InceptionV3.load(args.weights).to(args.device).eval()


def _statistics(path: str, args, network=None):
    from fastgan.metrics import FeatureStatistics

    if path.endswith(".npz"):
        return FeatureStatistics.load(path)
    network = network or _network(args)
    stats = FeatureStatistics()
    with torch.no_grad():
        for images in image_batches(image_files(path), args.batch_size, args.device, f"features of {path}"):
            stats.update(network(images).double().cpu())
    return stats


def command_fid(args) -> None:
    from fastgan.metrics import frechet_distance

    network = None if all(p.endswith(".npz") for p in (args.path_a, args.path_b)) else _network(args)
    a = _statistics(args.path_a, args, network)
    if args.save_stats:
        a.save(args.save_stats)
        print(f"statistics of {args.path_a} written to {args.save_stats}", file=sys.stderr)
    b = _statistics(args.path_b, args, network)
    print(f"FID: {frechet_distance(a, b, args.method):.6f}")


def command_stats(args) -> None:
    _statistics(args.path, args).save(args.out)
    print(f"statistics written to {args.out}")


def command_is(args) -> None:
    from fastgan.metrics.inception_score import InceptionScore

    network, metric = _network(args), InceptionScore(splits=args.splits)
    with torch.no_grad():
        for images in image_batches(image_files(args.path), args.batch_size, args.device, "Inception logits"):
            metric.update(network.logits(images, bias=False).cpu())
    mean, std = metric.compute()
    print(f"IS: {float(mean):.4f} ± {float(std):.4f}")


def command_kid(args) -> None:
    from fastgan.metrics.kid import KID

    network, metric = _network(args), KID(subsets=args.subsets, subset_size=args.subset_size)
    with torch.no_grad():
        for side, path in (("real_features", args.path_a), ("fake_features", args.path_b)):
            for images in image_batches(image_files(path), args.batch_size, args.device, f"features of {path}"):
                metric.update(**{side: network(images).cpu()})
    mean, std = metric.compute()
    print(f"KID: {float(mean):.6f} ± {float(std):.6f}")


def command_train(args) -> None:
    from fastgan.train.config import load_config
    from fastgan.train.trainer import Trainer

    import torch.distributed as dist

    trainer = Trainer(load_config(args.config, args.overrides), resume=args.resume)
    summary = trainer.fit()
    if trainer.rank == 0:
        _print_run_outputs(summary)
    if dist.is_initialized():  # joined from torchrun's environment by the trainer
        dist.destroy_process_group()


def _print_run_outputs(summary: dict) -> None:
    out = Path(summary["out_dir"])
    fid = summary["final_fid"]
    print(f"step {summary['step']}/{summary['steps']}" + (f", FID {fid:.3f}" if fid is not None else ""))
    if summary["best_fid"] is not None:
        print(f"best FID {summary['best_fid']:.3f} at step {summary['best_step']} (generator in {out / 'best.pt'})")
    for name, what in (("samples.png", "latest sample grid"), ("samples", "sample grids by step"),
                       ("curves.png", "losses and FID against step"), ("metrics.jsonl", "metrics, one JSON line per log step"),
                       ("tensorboard", "TensorBoard scalars (tensorboard --logdir ...)"),
                       ("checkpoint.pt", "checkpoint (continue with --resume)")):
        if (out / name).exists():
            print(f"  {out / name}: {what}")


def command_sample(args) -> None:
    from fastgan.train.outputs import save_image_grid
    from fastgan.train.trainer import draw_latents, load_generator

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    generator, config = load_generator(args.checkpoint, args.device)
    z = draw_latents(args.n, config, torch.Generator().manual_seed(args.seed))
    device = next(generator.parameters()).device
    with torch.no_grad():
        images = torch.cat([generator(chunk.to(device)).cpu() for chunk in z.split(256)])
    save_image_grid(images, Path(args.out), columns=args.columns)
    print(f"{args.n} samples written to {args.out}")


def command_study(args) -> None:
    from fastgan.train.study import read_study, run_study, write_results

    study = read_study(args.grid, args.overrides)
    if args.list:
        for trial in study.trials:
            status = "finished" if trial.finished else "to run"
            print(f"{trial.index:4d}  {status:<9} {trial.describe()}")
        return
    if not args.summarize:
        run_study(study, args.index)
    print(f"results: {write_results(study)} and {study.out_dir / 'results.csv'}")


def command_backends(args) -> None:
    import fastgan

    for name, status in fastgan.backends().items():
        usable = [d for d in ("cpu", "cuda") if status[d]]
        print(f"{name:<10} {'usable on ' + ', '.join(usable) if usable else 'not usable'}")
        for device, why in status["why_not"].items():
            print(f"{'':<10}   {device}: {why}")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m fastgan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def inception_options(p):
        p.add_argument("--batch-size", type=int, default=50, help="images per Inception batch (default 50)")
        p.add_argument("--device", type=torch.device, default=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                       help="device for the Inception network (default: cuda when visible, else cpu)")
        p.add_argument("--weights", default=None, help="Inception weights file (default: FASTGAN_INCEPTION, the cache, or a download)")

    overrides_help = "config overrides, YAML values (e.g. loss=hinge steps=1000 g_betas=[0.5,0.9])"
    train = commands.add_parser(
        "train", help="train a GAN (SNDCGAN / ResNet; losses, normalizations, penalties of the study)",
        description="Train G and D as a config says. Every key of fastgan.train.config.Config can be set in the "
                    "YAML file or overridden as key=value. Outputs (checkpoint, samples, metrics, curves) go to out_dir. "
                    "Ctrl-C or SIGTERM ends the current step, writes a checkpoint and exits; --resume continues.")
    train.add_argument("--config", help="YAML config (configs/*.yaml); default: the built-in defaults")
    train.add_argument("--resume", action="store_true",
                       help="continue from out_dir/checkpoint.pt (bit-for-bit on CPU; starts afresh when there is none)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    train.set_defaults(run=command_train)

    sample = commands.add_parser("sample", help="a PNG grid of samples from a trained generator")
    sample.add_argument("--checkpoint", required=True, help="checkpoint.pt or best.pt of a training run")
    sample.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", default="samples.png", help="output PNG (default samples.png)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the latent draws (default 0)")
    sample.add_argument("--columns", type=int, default=None, help="images per row (default: a square grid)")
    sample.add_argument("--device", default="auto", help="device (default: cuda when visible, else cpu)")
    sample.set_defaults(run=command_sample)

    study = commands.add_parser(
        "study", help="run a study grid; write final and best FID per trial (CSV and markdown)",
        description="Run the trials of a grid file (configs/study/*.yaml; format in fastgan.train.study). Finished "
                    "trials are skipped, interrupted ones resume. --index runs one trial (for cluster job arrays).")
    study.add_argument("--grid", required=True, help="grid YAML file")
    study.add_argument("--index", type=int, default=None, help="run only this trial (0-based), e.g. $SLURM_ARRAY_TASK_ID")
    study.add_argument("--list", action="store_true", help="list the trials and their status, run nothing")
    study.add_argument("--summarize", action="store_true", help="only (re)write the results table")
    study.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every trial; " + overrides_help)
    study.set_defaults(run=command_study)

    fid = commands.add_parser("fid", help="FID between two folders or .npz statistics files")
    fid.add_argument("path_a", metavar="PATH_A", help="image folder or .npz statistics (the reference side)")
    fid.add_argument("path_b", metavar="PATH_B", help="image folder or .npz statistics")
    fid.add_argument("--save-stats", metavar="OUT.npz", help="also save PATH_A's statistics, to compare against later")
    fid.add_argument("--method", default="auto", choices=["auto", "symmetric", "newton-schulz"], help="matrix square root (default auto)")
    inception_options(fid)
    fid.set_defaults(run=command_fid)

    stats = commands.add_parser("stats", help="save an image folder's FID statistics")
    stats.add_argument("path", metavar="PATH", help="image folder")
    stats.add_argument("out", metavar="OUT.npz", help="output file")
    inception_options(stats)
    stats.set_defaults(run=command_stats)

    inception_score = commands.add_parser("is", help="Inception Score of an image folder")
    inception_score.add_argument("path", metavar="PATH", help="image folder")
    inception_score.add_argument("--splits", type=int, default=10, help="splits (default 10)")
    inception_options(inception_score)
    inception_score.set_defaults(run=command_is)

    kid = commands.add_parser("kid", help="Kernel Inception Distance between two image folders")
    kid.add_argument("path_a", metavar="PATH_A")
    kid.add_argument("path_b", metavar="PATH_B")
    kid.add_argument("--subsets", type=int, default=100, help="random subsets (default 100)")
    kid.add_argument("--subset-size", type=int, default=1000, help="samples per subset (default 1000)")
    inception_options(kid)
    kid.set_defaults(run=command_kid)

    commands.add_parser("backends", help="which kernels are built and usable here").set_defaults(run=command_backends)
    return main


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
