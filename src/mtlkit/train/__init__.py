"""Training: the trainer, checkpoints, logs, and the comparison of balancers.

The package is callable: ``mtlkit.train(config)`` trains one run of an experiment and returns
its :class:`RunResult` (:func:`mtlkit.experiment.train`), while ``mtlkit.train.Trainer`` and
the other names below stay importable as usual.
"""

import sys
import types
from typing import Any

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


class _CallableModule(types.ModuleType):
    # ``mtlkit.train`` is both this package and the documented entry point train(config):
    # Python binds the package to that name on import, so the package itself is callable.
    def __call__(self, config: Any = None, **kwargs: Any) -> RunResult:
        from mtlkit.experiment import train

        return train(config, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
