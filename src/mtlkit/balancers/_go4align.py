"""GO4Align: group risk minimisation with risk-guided indicators (Shen et al. 2024)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit.balancers._base import LossWeighting, positive
from mtlkit.balancers._registry import register


def _kmeans_1d_labels(v: np.ndarray, groups: int) -> np.ndarray:
    """Labels of the optimal 1-D K-means (see :func:`kmeans_1d`), in NumPy (K values)."""
    n = v.size
    groups = min(groups, n)
    order = np.argsort(v, kind="stable")
    s = v[order]
    pre = np.concatenate([[0.0], np.cumsum(s)])
    pre2 = np.concatenate([[0.0], np.cumsum(s * s)])
    i, j = np.arange(n + 1)[:, None], np.arange(n + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        tot = pre[j] - pre[i]
        sse = np.where(j > i, np.maximum(pre2[j] - pre2[i] - tot * tot / (j - i), 0.0), np.inf)
    cost = sse[0].copy()  # one group over s[:j]
    cuts = []
    for _ in range(1, groups):
        # cost of g groups over s[:j] = min over the last cut i of (g-1 groups over s[:i]) + sse
        total = cost[:, None] + sse
        best = np.argmin(total, axis=0)  # the earliest of equally good cuts
        cost = total[best, np.arange(n + 1)]
        cuts.append(best)
    labels = np.empty(n, dtype=np.int64)
    end = n
    for g in range(groups - 1, -1, -1):
        start = int(cuts[g - 1][end]) if g > 0 else 0
        labels[order[start:end]] = g
        end = start
    return labels


def kmeans_1d(values: Tensor, groups: int) -> Tensor:
    """Exact K-means of scalars: the group index (0..groups-1, in increasing order of value) of
    each entry, minimising the within-group sum of squares.

    In one dimension an optimal clustering splits the sorted values into contiguous runs, so
    dynamic programming over the split points finds the global optimum (no random restart).
    Ties between equally good splits go to the earliest split.

    >>> kmeans_1d(torch.tensor([5.0, 1.0, 1.2, 5.1]), 2).tolist()
    [1, 0, 0, 1]
    """
    return torch.from_numpy(_kmeans_1d_labels(values.detach().double().cpu().numpy(), groups))


def group_means(indicators: Tensor, labels: Tensor) -> Tensor:
    """Each entry replaced by the mean of its group.

    >>> group_means(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([0, 0, 1])).tolist()
    [2.0, 2.0, 10.0]
    """
    labels = labels.to(indicators.device)
    groups = int(labels.max()) + 1
    total = torch.zeros(groups, dtype=indicators.dtype, device=indicators.device)
    count = torch.zeros_like(total)
    total.index_add_(0, labels, indicators)
    count.index_add_(0, labels, torch.ones_like(indicators))
    return (total / count)[labels]


@register("go4align")
class GO4Align(LossWeighting):
    r"""GO4Align: weight tasks by group, grouping tasks whose risk-guided indicators agree.

    Proposed in Shen, Wang, Xiao, Van Noord & Worring, *GO4Align: Group Optimization for
    Multi-Task Alignment* (NeurIPS 2024, arXiv:2404.06486). Each step:

    1. risk-guided indicator :math:`\gamma_k = \beta_k \omega_k`, the product of a scale
       balance :math:`\beta_k = \sum_j L_j / L_k` and a smoothed risk history
       :math:`\omega \leftarrow \mathrm{normalise}(\omega \odot \exp(-\eta L))`
       (:math:`\omega_0` uniform);
    2. dynamical group assignment: K-means of the K indicators into N groups;
    3. each task's weight is its group's mean indicator (the cluster centre), and the update
       is the gradient of :math:`\sum_k w_k L_k`.

    With N = K groups, :math:`w_k L_k = \omega_k \sum_j L_j`: every task contributes in
    proportion to its risk weight, whatever the scales of the losses.

    Args:
        tasks: task names.
        num_groups: N, the number of groups (at most K; 1 gives every task the mean indicator).
            The official code takes it per experiment; default 2.
        step_size: :math:`\eta`, the step of the risk history (official code: 1e-4).

    State:
        ``omega`` (K,): the risk history, saved in ``state_dict``.

    .. note:: The official code clusters with a randomly initialised K-means; in one dimension
       the optimal clustering is found exactly by dynamic programming over the sorted
       indicators (:func:`kmeans_1d`), so the weights are deterministic. That takes the K
       indicators to the host once per step. A zero loss makes :math:`\beta_k` infinite;
       a loss below the largest one over the square root of the dtype's largest float is raised
       to that floor first, so the weights stay finite.

    Example:
        >>> import torch
        >>> b = GO4Align(["a", "b", "c"], num_groups=2)
        >>> w = torch.ones(3, requires_grad=True)
        >>> step = b.backward({"a": 1.0 * w[0], "b": 1.1 * w[1], "c": 100.0 * w[2]})
        >>> [round(v, 4) for v in step.weight_tensor.tolist()]
        [32.5933, 32.5933, 0.3381]
    """

    omega: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        num_groups: int = 2,
        step_size: float = 1e-4,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        if isinstance(num_groups, bool) or int(num_groups) != num_groups or num_groups < 1:
            raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
        self.num_groups = min(int(num_groups), self.num_tasks)
        self.step_size = positive("step_size", step_size, allow_zero=True)
        self.register_buffer("omega", torch.full((self.num_tasks,), 1.0 / self.num_tasks,
                                                 dtype=torch.float64))

    def loss_weights(self, values: Tensor, context: Mapping[str, Any]) -> Tensor:
        # K numbers: computed on the host (one read of the losses), where the clustering is.
        losses = values.detach().double().cpu().numpy()
        info = torch.finfo(values.dtype)
        # A loss below the largest over sqrt(float max) counts as that floor: beta_k = sum / L_k
        # stays finite in the losses' dtype (an exact zero would make it infinite).
        safe = np.maximum(losses, max(losses.max() / math.sqrt(info.max), info.tiny))
        # Multiplicative update in log space: exp(-eta L) underflows for huge losses.
        with np.errstate(divide="ignore"):
            log_omega = np.log(self.omega.cpu().numpy()) - self.step_size * safe
        omega = np.exp(log_omega - log_omega.max())
        omega /= omega.sum()
        self.omega.copy_(torch.from_numpy(omega))
        ratio = safe / safe.max()  # beta_k = sum_j L_j / L_k, relative to the largest loss
        indicators = ratio.sum() / ratio * omega
        labels = _kmeans_1d_labels(indicators, self.num_groups)
        means = np.bincount(labels, indicators) / np.bincount(labels)
        return torch.from_numpy(means[labels]).to(values.device, values.dtype)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, step_size={self.step_size}"
