"""Fixed loss scalings: equal, user-given, initial-loss, prior-loss and geometric weighting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit.balancers._base import LossWeighting, positive
from mtlkit.balancers._functional import host_add, host_view
from mtlkit.balancers._registry import register

#: Smallest loss a reciprocal weight divides by (keeps 1/L finite when a loss is exactly 0).
LOSS_FLOOR = 1e-12


@register("ew")
class EqualWeighting(LossWeighting):
    """Equal weighting: the plain sum of the task losses, ``w_k = 1``.

    The baseline every method is compared with.

    Example:
        >>> import torch
        >>> from mtlkit.balancers import EqualWeighting
        >>> p = torch.nn.Parameter(torch.tensor(1.0))
        >>> EqualWeighting(["a", "b"]).backward({"a": p * 2, "b": p * 3}).weights
        {'a': 1.0, 'b': 1.0}
        >>> p.grad
        tensor(5.)
    """

    reads_values = False

    def loss_weights(self, values: None, context: Mapping[str, Any]) -> np.ndarray:
        return self._constant(lambda: np.ones(self.num_tasks))


@register("fixed")
class FixedWeighting(LossWeighting):
    """Fixed user weights, ``w_k`` given per task (e.g. from a grid search).

    Args:
        tasks: task names.
        weights: task -> weight (finite, >= 0), for exactly the tasks.

    Example:
        >>> import torch
        >>> from mtlkit.balancers import FixedWeighting
        >>> p = torch.nn.Parameter(torch.tensor(1.0))
        >>> FixedWeighting(["a", "b"], weights={"a": 0.5, "b": 2.0}).backward([p, p]).weights
        {'a': 0.5, 'b': 2.0}
    """

    weight_values: Tensor

    def __init__(
        self, tasks: Sequence[str], weights: Mapping[str, float], **options: Any
    ) -> None:
        super().__init__(tasks, **options)
        if not isinstance(weights, Mapping):
            raise TypeError("weights must be a mapping task -> weight")
        values = self._task_values(weights, "weights")
        for t, v in zip(self.tasks, values.tolist()):
            positive(f"weights[{t!r}]", v, allow_zero=True)
        self.register_buffer("weight_values", values)

    reads_values = False

    def loss_weights(self, values: None, context: Mapping[str, Any]) -> np.ndarray:
        return self._constant(lambda: self.weight_values.tolist())

    def extra_repr(self) -> str:
        return f"weights={dict(zip(self.tasks, self.weight_values.tolist()))}"


@register("initial_loss")
class InitialLossWeighting(LossWeighting):
    """Initial-loss weighting, ``w_k = 1 / L_k(0)``: every task starts at unit scale.

    ``L_k(0)`` is the mean loss over the first ``num_batches`` steps (while they run, the mean
    so far is used), or given with ``initial``. The weighting makes the update invariant to a
    constant rescaling of any task's loss. Used as a baseline in e.g. Chen et al., *GradNorm*
    (ICML 2018, arXiv:1711.02257), where the ratio ``L_k(t)/L_k(0)`` measures training progress.

    Args:
        tasks: task names.
        num_batches: how many first steps estimate ``L_k(0)`` (default 1).
        initial: task -> ``L_k(0)`` given up front (then nothing is estimated).

    State:
        ``initial_sum`` (K,) sum of the first losses; ``initial_count`` () how many.

    Example:
        >>> import torch
        >>> from mtlkit.balancers import InitialLossWeighting
        >>> p = torch.nn.Parameter(torch.tensor(1.0))
        >>> b = InitialLossWeighting(["a", "b"])
        >>> b.backward([p * 4, p * 0.5]).weights
        {'a': 0.25, 'b': 2.0}
    """

    initial_sum: Tensor
    initial_count: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        num_batches: int = 1,
        initial: Mapping[str, float] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        if int(num_batches) != num_batches or num_batches < 1:
            raise ValueError(f"num_batches must be an integer >= 1, got {num_batches}")
        self.num_batches = int(num_batches)
        self.register_buffer("initial_sum", torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("initial_count", torch.zeros((), dtype=torch.long))
        if initial is not None:
            values = self._task_values(initial, "initial")
            for t, v in zip(self.tasks, values.tolist()):
                positive(f"initial[{t!r}]", v)
            self.initial_sum.copy_(values * self.num_batches)
            self.initial_count.fill_(self.num_batches)

    def loss_weights(self, values: list[float], context: Mapping[str, Any]) -> np.ndarray:
        count = host_view(self, "initial_count")
        if count[()] < self.num_batches:
            host_add(host_view(self, "initial_sum"), values)
            count[()] += 1
        else:  # L(0) is complete: the same weights every step
            return self._constant(self._weights)
        return self._weights()

    def _weights(self) -> np.ndarray:
        mean = np.asarray(host_view(self, "initial_sum")) / max(int(self.initial_count), 1)
        return 1.0 / np.maximum(mean, LOSS_FLOOR)

    def extra_repr(self) -> str:
        return f"num_batches={self.num_batches}"


@register("prior_loss")
class PriorLossWeighting(LossWeighting):
    """Prior-loss weighting, ``w_k = 1 / L_k^prior``.

    ``L_k^prior`` is the loss of a predictor that knows only the label distribution: the entropy
    of the class frequencies for classification, the variance of the targets for regression
    (mean-squared error of predicting the mean). :func:`mtlkit.functional.prior_loss` computes
    it from labels. It measures each loss relative to what is achievable without learning.

    .. note:: This is a common heuristic baseline, not a method from one paper; we know of no
       canonical reference for it, so none is cited.

    Args:
        tasks: task names.
        priors: task -> prior loss (> 0).

    Example:
        >>> import torch
        >>> from mtlkit.balancers import PriorLossWeighting
        >>> p = torch.nn.Parameter(torch.tensor(1.0))
        >>> PriorLossWeighting(["a", "b"], priors={"a": 2.0, "b": 0.5}).backward([p, p]).weights
        {'a': 0.5, 'b': 2.0}
    """

    priors: Tensor

    def __init__(
        self, tasks: Sequence[str], priors: Mapping[str, float], **options: Any
    ) -> None:
        super().__init__(tasks, **options)
        if not isinstance(priors, Mapping):
            raise TypeError("priors must be a mapping task -> prior loss")
        values = self._task_values(priors, "priors")
        for t, v in zip(self.tasks, values.tolist()):
            positive(f"priors[{t!r}]", v)
        self.register_buffer("priors", values)

    @classmethod
    def from_labels(
        cls,
        tasks: Sequence[str],
        labels: Mapping[str, Tensor],
        kinds: Mapping[str, str],
        **kwargs: Any,
    ) -> PriorLossWeighting:
        """Build the weighting from training labels with :func:`prior_loss` per task."""
        return cls(tasks, {t: prior_loss(labels[t], kinds[t]) for t in tasks}, **kwargs)

    reads_values = False

    def loss_weights(self, values: None, context: Mapping[str, Any]) -> np.ndarray:
        return self._constant(lambda: [1.0 / p for p in self.priors.tolist()])

    def extra_repr(self) -> str:
        return f"priors={dict(zip(self.tasks, self.priors.tolist()))}"


@register("geometric")
class GeometricWeighting(LossWeighting):
    """Geometric loss strategy (GLS), ``w_k = 1 / stop_grad(L_k)``.

    The update is the gradient of ``sum_k log L_k``, i.e. of the geometric mean of the losses up
    to a positive factor, so it is invariant to rescaling any task's loss. Proposed in Chennupati
    et al., *MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy for
    Multi-Task Learning* (CVPR Workshops 2019, arXiv:1904.08492); also known as real-time or
    log-loss weighting.

    .. note:: A loss of exactly 0 is floored at 1e-12 so the weight stays finite.

    Example:
        >>> import torch
        >>> from mtlkit.balancers import GeometricWeighting
        >>> p = torch.nn.Parameter(torch.tensor(1.0))
        >>> GeometricWeighting(["a", "b"]).backward([p * 4, p * 0.5]).weights
        {'a': 0.25, 'b': 2.0}
    """

    def loss_weights(self, values: list[float], context: Mapping[str, Any]) -> list[float]:
        return [1.0 / max(v, LOSS_FLOOR) for v in values]


def prior_loss(labels: Tensor, kind: str) -> float:
    """The loss of a predictor that knows only the label distribution.

    * ``"classification"``: entropy (nats) of the class frequencies, the cross-entropy of always
      predicting them; ``labels`` are class indices.
    * ``"multilabel"``: mean over attributes of the binary entropy of each attribute's rate;
      ``labels`` is (N, A) in {0, 1}.
    * ``"regression"``: variance of the targets (population variance, the mean-squared error of
      always predicting the mean), averaged over output dimensions.

    A prior of 0 (a constant label) is floored at 1e-12 so its weight stays finite.

    Example:
        >>> import torch
        >>> round(prior_loss(torch.tensor([0, 0, 1, 1]), "classification"), 4)  # log 2
        0.6931
        >>> prior_loss(torch.tensor([1.0, 3.0]), "regression")
        1.0
    """
    if kind == "classification":
        counts = torch.bincount(labels.reshape(-1).long())
        freq = counts[counts > 0].double() / counts.sum()
        value = float(-(freq * freq.log()).sum())
    elif kind == "multilabel":
        rate = labels.double().reshape(labels.shape[0], -1).mean(0).clamp(1e-12, 1 - 1e-12)
        value = float((-(rate * rate.log()) - (1 - rate) * (1 - rate).log()).mean())
    elif kind == "regression":
        y = labels.double().reshape(labels.shape[0], -1)
        value = float(y.var(dim=0, unbiased=False).mean())
    else:
        raise ValueError(f"kind must be 'classification', 'multilabel' or 'regression', got {kind!r}")
    return max(value, LOSS_FLOOR)
