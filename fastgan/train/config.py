"""The training configuration: one flat, typed dataclass, read from YAML with
``key=value`` overrides (``python -m fastgan train --config C.yaml loss=hinge steps=1000``).

Defaults are compare_gan's SNDCGAN CIFAR-10 settings except for the data set (the
embedded ``digits``, so a run needs no download). ``configs/`` holds the paper's
settings, one file each; ``configs/study/`` the study's grids.

Step counting: ``steps`` counts *discriminator* updates, like the paper-era
compare_gan's ``training_steps``. A training iteration is ``n_disc`` D updates and one
G update, so a run makes ``steps`` D updates and ``steps / n_disc`` G updates, and
``steps`` must be a multiple of ``n_disc``; the output frequencies (``log_every``,
``checkpoint_every``, ...) are in the same D-update steps and fire at the first
iteration that reaches a multiple of them.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

LOSSES = ("ns", "wgan", "lsgan", "hinge")
PENALTIES = ("none", "wgan-gp", "dragan", "r1", "l2")
Z_PRIORS = ("uniform", "normal")
DTYPES = ("float32", "float64")
# Keys of older fastgan versions, with their new names.
RENAMED = {"z_distribution": "z_prior"}


@dataclass
class Config:
    """Every setting of a training run (YAML keys and ``key=value`` overrides have these names).

    Model: ``architecture`` (sndcgan | resnet_cifar | resnet19), ``image_size``, ``z_dim``,
    ``z_prior`` (uniform: U[-1, 1), compare_gan's and the paper's; normal: N(0, 1)), ``d_norm``
    (none | batch | layer | spectral), ``width`` (channel multiplier). Objective: ``loss``
    (ns | wgan | lsgan | hinge), ``penalty`` (none | wgan-gp | dragan | r1 | l2) and its weight
    ``penalty_weight`` (λ). Adam: ``g_lr``, ``g_betas``, ``d_lr`` / ``d_betas`` (None: G's).
    Schedule: ``steps`` (D updates, the paper's ``training_steps``; a multiple of ``n_disc``),
    ``batch_size`` (global, over all processes), ``n_disc`` (D updates per G update). Data:
    ``dataset`` (digits | cifar10 | folder), ``data_root``, ``download``. Run: ``seed``,
    ``deterministic``, ``dtype`` (float32 | float64: parameters, data and losses end to end),
    ``device`` (auto | cpu | cuda | cuda:N). GPU speed (README, "Training at GPU speed"):
    ``cuda_graphs`` (D and G updates captured and replayed as CUDA graphs), ``channels_last``
    (NHWC models and batches), ``tf32`` (TensorFloat-32 matmuls and convolutions; off = full
    float32), ``amp`` (bfloat16 autocast of G and D; the penalty's gradient norm stays float32),
    ``compile`` (torch.compile of G and of D's first-order forwards). Outputs: ``out_dir``;
    ``log_every``, ``sample_every``, ``checkpoint_every``, ``fid_every`` in steps (each also at
    the last step; 0 = never, except that the last step is always logged and checkpointed); FID on ``fid_samples`` generated and
    ``fid_real_samples`` data images with ``inception_weights`` (None: found as
    ``fastgan.metrics.inception`` says); ``sample_grid`` images per grid; ``progress`` bars.
    """

    # model (fastgan.models)
    architecture: str = "sndcgan"
    image_size: int = 32
    z_dim: int = 128
    z_prior: str = "uniform"
    d_norm: str = "spectral"
    width: float = 1.0  # channel multiplier; 1 = the paper's models
    # objective
    loss: str = "ns"
    penalty: str = "none"
    penalty_weight: float = 10.0
    # Adam; d_lr / d_betas default to G's (compare_gan)
    g_lr: float = 2e-4
    d_lr: Optional[float] = None
    g_betas: Tuple[float, float] = (0.5, 0.999)
    d_betas: Optional[Tuple[float, float]] = None
    # schedule: steps counts D updates; each n_disc of them are followed by one G update
    steps: int = 200_000
    batch_size: int = 64
    n_disc: int = 1
    # data (fastgan.train.data)
    dataset: str = "digits"
    data_root: Optional[str] = None
    download: bool = True
    # reproducibility and speed
    seed: int = 0
    deterministic: bool = False
    dtype: str = "float32"
    # speed on GPUs (each changes the numbers only as documented in the README)
    cuda_graphs: bool = False
    channels_last: bool = False
    tf32: bool = False
    amp: bool = False
    compile: bool = False
    device: str = "auto"
    # outputs, every N steps (0 = never)
    out_dir: str = "runs/default"
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 1000
    fid_every: int = 10_000
    fid_samples: int = 10_000
    fid_real_samples: int = 10_000
    inception_weights: Optional[str] = None
    sample_grid: int = 64
    progress: bool = True

    def validate(self) -> "Config":
        from fastgan.models import ARCHITECTURES, D_NORMALIZATIONS, check_model_shape
        from fastgan.train.data import DATASETS

        choices = {"architecture": ARCHITECTURES, "d_norm": D_NORMALIZATIONS, "loss": LOSSES,
                   "penalty": PENALTIES, "z_prior": Z_PRIORS, "dtype": DTYPES, "dataset": DATASETS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        positive = ("image_size", "z_dim", "steps", "batch_size", "n_disc", "fid_samples", "fid_real_samples", "sample_grid")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("log_every", "sample_every", "checkpoint_every", "fid_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (0 = never), got {getattr(self, key)}")
        for key in ("g_lr", "d_lr"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"{key} must be > 0, got {value}")
        for key in ("g_betas", "d_betas"):
            value = getattr(self, key)
            if value is not None and not all(0 <= b < 1 for b in value):
                raise ValueError(f"{key} must be two numbers in [0, 1), got {value}")
        if not self.width > 0:
            raise ValueError(f"width must be > 0, got {self.width}")
        if self.penalty_weight < 0:
            raise ValueError(f"penalty_weight must be >= 0, got {self.penalty_weight}")
        if self.steps % self.n_disc:
            raise ValueError(f"steps={self.steps} must be a multiple of n_disc={self.n_disc}: steps counts "
                             f"discriminator updates (the paper's training_steps), n_disc of them per generator update")
        if self.compile and self.cuda_graphs:
            raise ValueError("compile=true and cuda_graphs=true cannot be combined (torch.compile brings its own CUDA "
                             "graphs with mode='reduce-overhead'); choose one")
        if self.amp and self.dtype != "float32":
            raise ValueError(f"amp (bfloat16 autocast) needs dtype=float32, got dtype={self.dtype}")
        check_model_shape(self.architecture, self.image_size, self.z_dim)
        if self.dataset == "folder" and not self.data_root:
            raise ValueError("dataset=folder needs data_root=PATH (a folder of images)")
        return self

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    @property
    def discriminator_lr(self) -> float:
        return self.g_lr if self.d_lr is None else self.d_lr

    @property
    def discriminator_betas(self) -> Tuple[float, float]:
        return self.g_betas if self.d_betas is None else self.d_betas

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "Config":
        return from_mapping({**self.to_dict(), **changes})


FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_HINTS = typing.get_type_hints(Config)


def _coerce(key: str, value: Any) -> Any:
    """``value`` as the type of field ``key`` (YAML gives ints for floats, lists for tuples)."""
    hint = _HINTS[key]
    optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
    if optional:
        if value is None:
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(hint)):
            raise ValueError(f"{key} must be a list of {len(typing.get_args(hint))} numbers, got {value!r}")
        return tuple(_coerce_scalar(key, a, v) for a, v in zip(typing.get_args(hint), value))
    return _coerce_scalar(key, hint, value)


def _coerce_scalar(key: str, kind: type, value: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ValueError(f"{key} must be {kind.__name__}, got {value!r}")


def from_mapping(values: Mapping[str, Any]) -> Config:
    unknown = sorted(set(values) - set(FIELDS))
    renamed = [f"{k} is now {RENAMED[k]}" for k in unknown if k in RENAMED]
    if renamed:
        raise ValueError(f"renamed config key(s): {', '.join(renamed)}")
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    return Config(**{k: _coerce(k, v) for k, v in values.items()}).validate()


def read_yaml(path: str) -> Dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(file) as f:
        values = yaml.safe_load(f)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: a config is a mapping of key: value, got {type(values).__name__}")
    return values


def parse_overrides(pairs: Iterable[str]) -> Dict[str, Any]:
    """``["loss=hinge", "g_betas=[0.5,0.9]"]`` -> typed values (YAML syntax on the right)."""
    import yaml

    values = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"an override is key=value, got {pair!r}")
        values[key.strip()] = yaml.safe_load(text) if text.strip() else None
    return values


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> Config:
    """The config of ``path`` (YAML; None = the defaults) with ``key=value`` overrides."""
    values = read_yaml(path) if path else {}
    return from_mapping({**values, **parse_overrides(overrides)})


def save_config(config: Config, path: str) -> None:
    import yaml

    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)


__all__ = ["Config", "DTYPES", "LOSSES", "PENALTIES", "Z_PRIORS", "FIELDS", "from_mapping", "load_config",
           "parse_overrides", "read_yaml", "save_config"]
