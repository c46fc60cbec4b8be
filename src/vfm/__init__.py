"""vfm: pretrain and evaluate vision foundation models from one Hydra command."""

__version__ = "0.1.0"
