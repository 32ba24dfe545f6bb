"""Per-task gradient engine: Jacobians, Gram matrices and the features mode."""

from mtlkit.engine._grads import (
    GRAD_ON,
    STRATEGIES,
    GradOn,
    Strategy,
    TaskGradients,
    cosine_from_gramian,
    task_gradients,
    task_jacobian,
)

__all__ = [
    "GRAD_ON",
    "STRATEGIES",
    "GradOn",
    "Strategy",
    "TaskGradients",
    "cosine_from_gramian",
    "task_gradients",
    "task_jacobian",
]
