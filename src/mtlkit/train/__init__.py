"""Training: the trainer, checkpoints, logs, and the comparison of balancers."""

from mtlkit.train.checkpoint import load_checkpoint, save_checkpoint
from mtlkit.train.trainer import RunResult, TrainConfig, Trainer, evaluate, select_epoch

__all__ = [
    "RunResult",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "select_epoch",
]
