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
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

from fastgan.files import write_text_atomic

LOSSES = ("ns", "wgan", "lsgan", "hinge")
PENALTIES = ("none", "wgan-gp", "dragan", "r1", "r2", "l2")
Z_PRIORS = ("uniform", "normal")
DTYPES = ("float32", "float64")
MODELS = ("gan", "vae")
MIXED_BATCH_LOSSES = ("pooled", "ensemble")  # how a symmetric D's per-element logits meet the proportion
# Keys that only a GAN (G and D) has, refused with model: vae when set to anything but their default.
GAN_ONLY = ("architecture", "d_norm", "loss", "penalty", "penalty_weight", "d_lr", "d_betas", "n_disc", "z_prior",
            "generator_jacobian_clamping_weight", "cuda_graphs", "compile", "amp", "mixed_batches", "lens_steps")
VAE_ONLY = ("beta", "vae_likelihood", "vae_marginal", "vae_components")
# Keys of older fastgan versions, with their new names.
RENAMED = {"z_distribution": "z_prior"}


@dataclass
class Config:
    """Every setting of a training run (YAML keys and ``key=value`` overrides have these names).

    Model: ``architecture`` (sndcgan | resnet_cifar | resnet19), ``image_size``, ``z_dim``,
    ``z_prior`` (uniform: U[-1, 1), compare_gan's and the paper's; normal: N(0, 1)), ``d_norm``
    (none | batch | layer | spectral), ``width`` (channel multiplier). Objective: ``loss``
    (ns | wgan | lsgan | hinge), ``penalty`` (none | wgan-gp | dragan | r1 | r2 | l2) and its weight
    ``penalty_weight`` (λ). Adam: ``g_lr``, ``g_betas``, ``d_lr`` / ``d_betas`` (None: G's).
    Schedule: ``steps`` (D updates, the paper's ``training_steps``; a multiple of ``n_disc``),
    ``batch_size`` (global, over all processes), ``n_disc`` (D updates per G update). Data:
    ``dataset`` (digits | cifar10 | folder), ``data_root``, ``download``. Run: ``seed``,
    ``deterministic``, ``dtype`` (float32 | float64: parameters, data and losses end to end),
    ``device`` (auto | cpu | cuda | cuda:N). GPU speed (README, "Training at GPU speed"):
    ``cuda_graphs`` (D and G updates captured and replayed as CUDA graphs), ``channels_last``
    (NHWC models and batches), ``tf32`` (TensorFloat-32 matmuls and convolutions; off = full
    float32), ``cudnn_benchmark`` (cuDNN autotunes its convolution algorithms; not with
    ``deterministic``), ``amp`` (bfloat16 autocast of G and D; the penalty's gradient norm stays float32),
    ``compile`` (torch.compile of G and of D's first-order forwards). Outputs: ``out_dir``;
    ``log_every``, ``sample_every``, ``checkpoint_every``, ``fid_every`` in steps (each also at
    the last step; 0 = never, except that the last step is always logged and checkpointed); FID on ``fid_samples`` generated and
    ``fid_real_samples`` data images with ``inception_weights`` (None: found as
    ``fastgan.metrics.inception`` says), the images resized to Inception's input as
    ``fid_resize`` says (a convention of ``fastgan.metrics.images``; compare_gan's
    ``tf-bilinear`` by default); ``sample_grid`` images per grid; ``progress`` bars.
    Generator conditioning: ``diagnostics_condition_number_every`` (steps; 0 = never) and
    ``diagnostics_condition_number_samples`` (the fixed z batch); Jacobian clamping of G,
    ``generator_jacobian_clamping_{weight,eps,lambda_min,lambda_max}`` (weight 0 = off).
    What is trained: ``model`` (gan | vae); a VAE's ``beta`` (objective D + β·R),
    ``vae_likelihood``, ``vae_marginal``, ``vae_components``. Mixed batches (Lucas et al. 2018,
    :mod:`fastgan.mixed_batches`): ``mixed_batches`` (a symmetric D predicts each batch's proportion
    of real images), ``batch_smoothing`` (p ~ U[0, 1]; off: pure batches), ``mixed_batch_loss``
    (pooled: one logit per batch; ensemble: the loss on each element's logit, averaged); these
    three may also sit in a ``discriminator`` section (``discriminator.mixed_batches=true``). The
    lens of tempered GANs (Sajjadi et al. 2018, :mod:`fastgan.tempered`): ``lens_steps`` (K, the
    schedule's length in D updates; 0 = no lens), ``lens_weight`` (λ0), ``lens_lr`` / ``lens_betas``
    (None: G's), ``lens_hidden``, ``lens_depth``. A key written ``a_b`` may also be
    given as a section, ``a: {b: ...}`` in YAML or ``a.b=...`` as an override (e.g.
    ``generator: {jacobian_clamping: {weight: 1}}``, ``vae.marginal=vamp``).
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
    cudnn_benchmark: bool = False
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
    fid_resize: str = "tf-bilinear"  # compare_gan's preprocessing (TF1 resize_bilinear); fastgan.metrics.images
    sample_grid: int = 64
    progress: bool = True
    # generator conditioning (fastgan.diagnostics): YAML ``diagnostics: {condition_number_every, condition_number_samples}``
    diagnostics_condition_number_every: int = 0  # 0 = never
    diagnostics_condition_number_samples: int = 16
    # Jacobian clamping of G (fastgan.penalties.jacobian_clamping), Odena et al.'s defaults;
    # YAML ``generator: {jacobian_clamping: {weight, eps, lambda_min, lambda_max}}``
    generator_jacobian_clamping_weight: float = 0.0  # 0 = off
    generator_jacobian_clamping_eps: float = 1.0
    generator_jacobian_clamping_lambda_min: float = 1.0
    generator_jacobian_clamping_lambda_max: float = 20.0
    # what is trained: a GAN (G and D) or a β-VAE (fastgan.models.vae; YAML ``vae: {likelihood, marginal, components}``)
    model: str = "gan"
    beta: float = 1.0
    vae_likelihood: str = "logistic"
    vae_marginal: str = "gaussian"
    vae_components: int = 16
    # mixed batches and a symmetric D (fastgan.mixed_batches)
    mixed_batches: bool = False
    batch_smoothing: bool = True
    mixed_batch_loss: str = "pooled"
    # the lens of tempered adversarial networks (fastgan.tempered); YAML ``lens: {steps, weight, ...}``
    lens_steps: int = 0  # K; 0 = no lens
    lens_weight: float = 1.0
    lens_lr: Optional[float] = None
    lens_betas: Optional[Tuple[float, float]] = None
    lens_hidden: int = 32
    lens_depth: int = 3

    def validate(self) -> "Config":
        from fastgan.metrics.images import RESIZE_CONVENTIONS
        from fastgan.models import ARCHITECTURES, D_NORMALIZATIONS, check_model_shape
        from fastgan.models.vae import LIKELIHOODS, MARGINALS
        from fastgan.train.data import DATASETS
        from fastgan.train.stream import MAX_SEED

        choices = {"architecture": ARCHITECTURES, "d_norm": D_NORMALIZATIONS, "loss": LOSSES,
                   "penalty": PENALTIES, "z_prior": Z_PRIORS, "dtype": DTYPES, "dataset": DATASETS, "model": MODELS,
                   "vae_likelihood": LIKELIHOODS, "vae_marginal": MARGINALS,
                   "mixed_batch_loss": MIXED_BATCH_LOSSES, "fid_resize": RESIZE_CONVENTIONS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {', '.join(allowed)}")
        positive = ("image_size", "z_dim", "steps", "batch_size", "n_disc", "fid_samples", "fid_real_samples", "sample_grid",
                    "diagnostics_condition_number_samples", "vae_components")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("fid_samples", "fid_real_samples"):  # a covariance needs two images; fail now, not at the first FID
            if self.fid_every and getattr(self, key) < 2:
                raise ValueError(f"{key} must be >= 2 (FID compares feature covariances), got {getattr(self, key)}")
        # (mixed batches need 2 images per process and say so themselves, in the Trainer)
        if self.batch_size < 2 and self.architecture == "sndcgan" and not self.mixed_batches:
            raise ValueError(f"batch_size={self.batch_size} is too small for sndcgan (and the VAE built from its blocks): "
                             "its generator batch-normalizes a feature vector per image, which needs batch_size >= 2")
        self._validate_device()
        for key in ("log_every", "sample_every", "checkpoint_every", "fid_every", "diagnostics_condition_number_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0 (0 = never), got {getattr(self, key)}")
        for key in ("g_lr", "d_lr", "lens_lr"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a finite number > 0, got {value}")
        for key in ("g_betas", "d_betas", "lens_betas"):
            value = getattr(self, key)
            if value is not None and not all(0 <= b < 1 for b in value):
                raise ValueError(f"{key} must be two numbers in [0, 1), got {value}")
        if not (math.isfinite(self.width) and self.width > 0):
            raise ValueError(f"width must be a finite number > 0, got {self.width}")
        if not (math.isfinite(self.penalty_weight) and self.penalty_weight >= 0):
            raise ValueError(f"penalty_weight must be a finite number >= 0, got {self.penalty_weight}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        self._validate_jacobian_clamping()
        self._validate_model()
        self._validate_mixed_batches_and_lens()
        if self.steps % self.n_disc:
            raise ValueError(f"steps={self.steps} must be a multiple of n_disc={self.n_disc}: steps counts "
                             f"discriminator updates (the paper's training_steps), n_disc of them per generator update")
        if self.compile and self.cuda_graphs:
            raise ValueError("compile=true and cuda_graphs=true cannot be combined (torch.compile brings its own CUDA "
                             "graphs with mode='reduce-overhead'); choose one")
        if self.cudnn_benchmark and self.deterministic:
            raise ValueError("cudnn_benchmark=true picks convolution algorithms by timing them, which deterministic=true "
                             "rules out; choose one")
        if self.amp and self.dtype != "float32":
            raise ValueError(f"amp (bfloat16 autocast) needs dtype=float32, got dtype={self.dtype}")
        check_model_shape(self.architecture, self.image_size, self.z_dim)
        if self.dataset == "folder" and not self.data_root:
            raise ValueError("dataset=folder needs data_root=PATH (a folder of images)")
        return self

    def _validate_device(self) -> None:
        """A misspelled device fails here naming the key (torch's own error lists every backend it knows)."""
        if self.device == "auto":
            return
        import torch

        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device={self.device!r} is not a device: use auto, cpu, cuda or cuda:N") from None

    def _validate_jacobian_clamping(self) -> None:
        prefix = "generator_jacobian_clamping_"
        weight, eps = self.generator_jacobian_clamping_weight, self.generator_jacobian_clamping_eps
        low, high = self.generator_jacobian_clamping_lambda_min, self.generator_jacobian_clamping_lambda_max
        if not (math.isfinite(weight) and weight >= 0):
            raise ValueError(f"{prefix}weight (generator.jacobian_clamping.weight) must be a finite number >= 0 "
                             f"(0 = off), got {weight}")
        if not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"{prefix}eps (generator.jacobian_clamping.eps, the norm of the perturbation of z) "
                             f"must be > 0, got {eps}")
        if not (0 <= low <= high and math.isfinite(high)):
            raise ValueError(f"{prefix}lambda_min and {prefix}lambda_max (generator.jacobian_clamping.lambda_min, "
                             f".lambda_max) need 0 <= lambda_min <= lambda_max < inf, got {low} and {high}")

    def _validate_model(self) -> None:
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta (the weight of the rate in the beta-VAE objective D + beta*R) must be > 0, got {self.beta}")
        defaults = Config.__dataclass_fields__
        other = {"gan": VAE_ONLY, "vae": GAN_ONLY}[self.model]
        stray = [k for k in other if getattr(self, k) != defaults[k].default]
        if stray:
            kind = "a GAN's (G and D)" if self.model == "vae" else "the VAE's"
            raise ValueError(f"model={self.model} does not use {', '.join(stray)} ({kind} keys); remove them "
                             f"or set model={'gan' if self.model == 'vae' else 'vae'}")

    def _validate_mixed_batches_and_lens(self) -> None:
        if self.mixed_batches:
            from fastgan.mixed_batches import check_loss

            check_loss(self.loss)
            if self.penalty not in ("none", "l2"):
                raise ValueError(f"penalty={self.penalty} needs one D output per sample; with mixed_batches=true D gives "
                                 f"one per batch: use penalty=none or l2")
        for key, least in (("lens_steps", 0), ("lens_hidden", 1), ("lens_depth", 2)):
            if getattr(self, key) < least:
                raise ValueError(f"{key} must be >= {least}, got {getattr(self, key)}")
        if not (math.isfinite(self.lens_weight) and self.lens_weight >= 0):
            raise ValueError(f"lens_weight (λ0, the lens's initial adversarial weight) must be a finite number >= 0, "
                             f"got {self.lens_weight}")

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

    @property
    def lens_learning_rate(self) -> float:
        return self.g_lr if self.lens_lr is None else self.lens_lr

    @property
    def lens_adam_betas(self) -> Tuple[float, float]:
        return self.g_betas if self.lens_betas is None else self.lens_betas

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


# Mixed batches change what D judges, so they may also be written in D's section
# (``discriminator: {mixed_batches: true}``, ``discriminator.mixed_batches=true``).
SECTION_ALIASES = {f"discriminator_{key}": key for key in ("mixed_batches", "batch_smoothing", "mixed_batch_loss")}


def _flatten(values: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Sections as flat keys: ``{"vae": {"marginal": "vamp"}}`` and ``{"vae.marginal": "vamp"}``
    (the form of a ``key=value`` override) both give ``{"vae_marginal": "vamp"}``, and
    :data:`SECTION_ALIASES` name their flat keys; later entries win."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{str(key).replace('.', '_')}"
        if isinstance(value, Mapping) and name not in FIELDS:
            flat.update(_flatten(value, f"{name}_"))
        else:
            flat[SECTION_ALIASES.get(name, name)] = value
    return flat


def from_mapping(values: Mapping[str, Any]) -> Config:
    values = _flatten(values)
    unknown = sorted(set(values) - set(FIELDS))
    renamed = [f"{k} is now {RENAMED[k]}" for k in unknown if k in RENAMED]
    if renamed:
        raise ValueError(f"renamed config key(s): {', '.join(renamed)}")
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    return Config(**{k: _coerce(k, v) for k, v in values.items()}).validate()


def _yaml_problem(error: Exception) -> str:
    """A ``yaml.YAMLError`` in one line: where (1-based) and what."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or problem is None:
        return " ".join(str(error).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def read_yaml(path: str) -> Dict[str, Any]:
    import yaml

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(file) as f:
        try:
            values = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {_yaml_problem(error)}") from error
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
        try:
            values[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise ValueError(f"override {pair!r}: the value is not valid YAML ({_yaml_problem(error)})") from error
    return values


def merge_settings(*layers: Mapping[str, Any]) -> Dict[str, Any]:
    """Config mappings merged key by key, later layers winning: each is flattened first, so a
    section (``vae: {marginal: vamp}``) sets only its own keys and never replaces a whole
    section of an earlier layer, and ``vae.marginal=vamp`` and ``vae_marginal`` are one key."""
    merged = {}
    for layer in layers:
        merged.update(_flatten(layer))
    return merged


def load_config(path: Optional[str] = None, overrides: Iterable[str] = ()) -> Config:
    """The config of ``path`` (YAML; None = the defaults) with ``key=value`` overrides."""
    values = read_yaml(path) if path else {}
    return from_mapping(merge_settings(values, parse_overrides(overrides)))


def save_config(config: Config, path: str) -> None:
    """``config`` as YAML, written atomically (a kill never leaves a torn ``config.yaml``)."""
    import yaml

    write_text_atomic(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))


__all__ = ["Config", "DTYPES", "LOSSES", "MIXED_BATCH_LOSSES", "PENALTIES", "Z_PRIORS", "FIELDS", "from_mapping", "load_config",
           "merge_settings", "parse_overrides", "read_yaml", "save_config"]
