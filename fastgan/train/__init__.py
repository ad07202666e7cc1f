"""Reference GAN training: config, data, trainer, checkpoints, logging, study."""
