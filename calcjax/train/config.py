"""Which keys a whole training config holds: blocks ``model``, ``loss``, ``data``, ``train``, each read
strictly into its dataclass (``calcjax.core.config.fields_of``) before a trainer uses it."""

from __future__ import annotations

from collections.abc import Mapping

from calcjax.core.config import ConfigError, check_keys, fields_of
from calcjax.data import input_pipeline
from calcjax.model import network as model_lib
from calcjax.train import step as train_step


def check_config(config: Mapping) -> None:
    """Every key of a training config is read by someone: blocks ``model``, ``loss``, ``data``, ``train``."""
    check_keys(config, "config", ("model", "loss", "data", "train"))
    fields_of(model_lib.ModelConfig, config["model"], "model")
    fields_of(train_step.LossConfig, config["loss"], "loss")
    fields_of(input_pipeline.AugmentConfig, config["data"], "data", also=input_pipeline.DATA_KEYS)
    check_keys(config["train"], "train", TRAIN_KEYS)
    missing = [k for k in TRAIN_KEYS if k not in config["train"]]
    if missing:
        raise ConfigError(f"config block train lacks {', '.join(missing)} (configs/default.py has them all)")


# The train block, read by calcjax.train and the PyTorch twin's trainer.
TRAIN_KEYS = (
    "batch_size",
    "steps",
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "grad_clip",
    "eval_every",
    "eval_max_scans",
    "checkpoint_every",
    "max_to_keep",
    "log_every",
    "max_bad_steps",
    "seed",
    "init_from",
    "ema_decay",
)
