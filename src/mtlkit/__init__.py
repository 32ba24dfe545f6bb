"""mtlkit: multi-task learning for PyTorch.

Balancers (``mtlkit.balancers``) combine task losses or task gradients into one update; the
engine (``mtlkit.engine``) computes per-task gradients; ``mtlkit.nn`` holds architectures;
``mtlkit.optim`` builds per-task learning rates.
"""

from mtlkit import balancers, engine, optim

__version__ = "0.1.0"
__all__ = ["__version__", "balancers", "engine", "optim"]
