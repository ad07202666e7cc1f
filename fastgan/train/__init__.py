"""Reference GAN training: config, data, trainer, checkpoints, logging, study."""
from fastgan.train.config import Config, load_config
from fastgan.train.trainer import Trainer, load_generator

__all__ = ["Config", "Trainer", "load_config", "load_generator"]
