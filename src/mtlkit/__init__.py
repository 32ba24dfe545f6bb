"""mtlkit: multi-task learning for PyTorch.

Balancers (``mtlkit.balancers``) combine task losses or task gradients into one update; the
engine (``mtlkit.engine``) computes per-task gradients; ``mtlkit.nn`` holds architectures;
``mtlkit.optim`` builds per-task learning rates. :func:`compare` and :func:`train` run an
experiment (:mod:`mtlkit.experiment`) and return its results; ``mtlkit.train`` is also the
package of the trainer, and calling it trains.

The core needs torch, numpy and scipy only: importing ``mtlkit`` or ``mtlkit.balancers``
loads neither PyYAML, matplotlib nor scikit-learn (extras ``mtlkit[cli]``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mtlkit import balancers, engine, optim

if TYPE_CHECKING:
    from mtlkit.experiment import Experiment

__version__ = "0.1.0"
__all__ = ["Experiment", "__version__", "balancers", "compare", "engine", "optim", "train"]


def compare(config: Any = None, **kwargs: Any) -> dict[str, Any]:
    """Run a comparison and return its results: :func:`mtlkit.experiment.compare`.

    Example:
        >>> # results = mtlkit.compare("configs/default.yaml", epochs=2, out="runs/c")
    """
    from mtlkit.experiment import compare as run

    return run(config, **kwargs)


def __getattr__(name: str) -> Any:
    # Lazy: ``mtlkit.train`` (the trainer package, callable as mtlkit.train(config)) and
    # ``mtlkit.Experiment`` load the data and trainer modules only when asked for.
    if name == "train":
        return importlib.import_module("mtlkit.train")
    if name == "Experiment":
        return importlib.import_module("mtlkit.experiment").Experiment
    raise AttributeError(f"module 'mtlkit' has no attribute {name!r}")
