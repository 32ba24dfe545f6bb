"""Byzantine-robust aggregation rules applied to task gradients: Krum and the coordinate-wise
trimmed mean (from distributed learning, where some workers' gradients may be arbitrary).

Each rule is a pure function (``krum_weights`` of the Gram matrix, ``trimmed_mean`` of the
Jacobian); the classes hold the hyperparameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.balancers._base import GramianWeighting, JacobianAggregator
from mtlkit.balancers._registry import register


def krum_scores(gramian: Tensor, n_byzantine: int) -> Tensor:
    r"""Krum's score of each task gradient: the sum of its squared distances to its
    :math:`K - f - 2` nearest other gradients, with
    :math:`\|g_i - g_j\|^2 = G_{ii} + G_{jj} - 2 G_{ij}` (in float64)."""
    k = gramian.shape[0]
    g = gramian.double()
    sq = g.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2 * g).clamp_min(0)
    # the distance of a gradient to itself is excluded, whatever rounding left on the diagonal
    dist = dist.masked_fill(torch.eye(k, dtype=torch.bool, device=g.device), torch.inf)
    nearest = torch.topk(dist, k - n_byzantine - 2, dim=1, largest=False).values
    return nearest.sum(1)


def krum_weights(gramian: Tensor, n_byzantine: int, n_selected: int = 1) -> Tensor:
    """Multi-Krum's weights: ``1 / m`` on the ``m = n_selected`` gradients of lowest score
    (ties to the lower index), 0 elsewhere."""
    scores = krum_scores(gramian, n_byzantine)
    # a stable sort: equal scores keep the task order, so identical inputs pick the same tasks
    chosen = torch.sort(scores, stable=True).indices[:n_selected]
    weights = torch.zeros_like(scores)
    weights[chosen] = 1.0 / n_selected
    return weights.to(gramian.dtype)


@register("krum")
class Krum(GramianWeighting):
    r"""Krum: the update is the task gradient closest to its neighbours (Multi-Krum: the mean of
    the ``n_selected`` closest ones), robust to ``n_byzantine`` arbitrary gradients.

    Proposed in Blanchard, El Mhamdi, Guerraoui & Stainer, *Machine Learning with Adversaries:
    Byzantine Tolerant Gradient Descent* (NeurIPS 2017, arXiv:1703.02757), Section 4. The score
    of gradient i is

    .. math::  s(i) = \sum_{j \in N_i} \|g_i - g_j\|^2,

    where :math:`N_i` are the :math:`K - f - 2` gradients closest to :math:`g_i`; Krum returns
    the gradient of least score, Multi-Krum the mean of the m gradients of least score. Computed
    from the Gram matrix (:func:`krum_weights`).

    .. note:: The paper's guarantee needs :math:`K > 2f + 2`; the score is defined for
       :math:`K \ge f + 3`, which is what is required here (as TorchJD). TorchJD sums distances
       instead of the paper's squared distances, so its choice can differ from ours. Ties go to
       the first task in order. With f = 0 (the default) Krum picks the most central task
       gradient; it is a robust-aggregation baseline, not a balancing method.

    Args:
        tasks: task names (at least ``n_byzantine + 3``).
        n_byzantine: f, the number of gradients that may be arbitrary (default 0).
        n_selected: m, how many gradients Multi-Krum averages (default 1: Krum).
        **options: engine options of :class:`~mtlkit.balancers.GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._robust import Krum
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> gs = [torch.tensor([1.0, 0.0]), torch.tensor([1.2, 0.1]), torch.tensor([-9.0, 9.0])]
        >>> step = Krum(["a", "b", "c"]).backward([p @ g for g in gs], shared=[p])
        >>> step.weights
        {'a': 1.0, 'b': 0.0, 'c': 0.0}
        >>> p.grad
        tensor([1., 0.])
    """

    def __init__(self, tasks: Sequence[str], *, n_byzantine: int = 0, n_selected: int = 1,
                 **options: Any) -> None:
        super().__init__(tasks, **options)
        if int(n_byzantine) != n_byzantine or n_byzantine < 0:
            raise ValueError(f"n_byzantine must be an integer >= 0, got {n_byzantine!r}")
        if int(n_selected) != n_selected or not 1 <= n_selected <= self.num_tasks:
            raise ValueError(f"n_selected must be an integer in [1, {self.num_tasks}] (the "
                             f"number of tasks), got {n_selected!r}")
        if self.num_tasks < n_byzantine + 3:
            raise ValueError(f"krum with n_byzantine={n_byzantine} needs at least "
                             f"{n_byzantine + 3} tasks, got {self.num_tasks}")
        self.n_byzantine = int(n_byzantine)
        self.n_selected = int(n_selected)

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return krum_weights(gramian, self.n_byzantine, self.n_selected)

    def extra_repr(self) -> str:
        return (f"n_byzantine={self.n_byzantine}, n_selected={self.n_selected}, "
                f"{super().extra_repr()}")


def trimmed_mean(jacobian: Tensor, trim: int) -> tuple[Tensor, Tensor]:
    """Coordinate-wise trimmed mean of the rows of a (K, P) Jacobian: in every coordinate the
    ``trim`` largest and ``trim`` smallest values are dropped and the others averaged.

    Returns (the (P,) mean, the (K,) effective weights: the mean over the coordinates of the
    weight each row received there, ``1 / (K - 2 trim)`` or 0; they sum to 1). Among equal
    values, which row counts as kept is the sort's choice (the mean does not depend on it).
    """
    k, p = jacobian.shape
    kept = k - 2 * trim
    values, rows = torch.sort(jacobian, dim=0)
    vector = values[trim: trim + kept].mean(0)
    counts = torch.bincount(rows[trim: trim + kept].reshape(-1), minlength=k)
    return vector, counts.to(jacobian.dtype) / max(kept * p, 1)


@register("trimmed_mean")
class TrimmedMean(JacobianAggregator):
    r"""Coordinate-wise trimmed mean of the task gradients: in every coordinate, drop the
    ``trim_number`` largest and smallest values and average the rest.

    Proposed in Yin, Chen, Ramchandran & Bartlett, *Byzantine-Robust Distributed Learning:
    Towards Optimal Statistical Rates* (ICML 2018, arXiv:1803.01498), Definition 2 (with
    :math:`\beta K` = ``trim_number``). Each coordinate of the update lies between the smallest
    and the largest value of the task gradients that were kept there, so ``trim_number``
    arbitrary gradients cannot move it outside the range of the others.

    The update is not a linear combination of the task gradients (a Jacobian aggregator);
    the reported weight of a task is the mean over the coordinates of the weight its value
    received (:math:`1/(K - 2b)` where kept, 0 where trimmed).

    .. note:: The paper states the trimming as a fraction :math:`\beta`; the count is given
       here, as TorchJD. With 3 tasks, ``trim_number=1`` (the default) is the coordinate-wise
       median. Among equal values, which task counts as kept (for the reported weights) is
       the sort's choice.

    Args:
        tasks: task names (more than ``2 * trim_number``).
        trim_number: how many values to drop at each end of every coordinate (default 1).
        **options: engine options of :class:`~mtlkit.balancers.GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._robust import TrimmedMean
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> gs = [torch.tensor([1.0, 5.0]), torch.tensor([2.0, -1.0]), torch.tensor([9.0, 0.0])]
        >>> step = TrimmedMean(["a", "b", "c"]).backward([p @ g for g in gs], shared=[p])
        >>> p.grad  # the coordinate-wise median
        tensor([2., 0.])
        >>> step.weights
        {'a': 0.0, 'b': 0.5, 'c': 0.5}
    """

    def __init__(self, tasks: Sequence[str], *, trim_number: int = 1, **options: Any) -> None:
        super().__init__(tasks, **options)
        if int(trim_number) != trim_number or trim_number < 0:
            raise ValueError(f"trim_number must be an integer >= 0, got {trim_number!r}")
        if self.num_tasks <= 2 * trim_number:
            raise ValueError(f"trimmed_mean with trim_number={trim_number} needs more than "
                             f"{2 * trim_number} tasks, got {self.num_tasks}")
        self.trim_number = int(trim_number)

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        return trimmed_mean(jacobian, self.trim_number)

    def extra_repr(self) -> str:
        return f"trim_number={self.trim_number}, {super().extra_repr()}"
