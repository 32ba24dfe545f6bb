"""GO4Align: group risk minimisation with risk-guided indicators (Shen et al. 2024)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.balancers._base import LossWeighting, positive
from mtlkit.balancers._registry import register


def kmeans_1d(values: Tensor, groups: int) -> Tensor:
    """Exact K-means of scalars: the group index (0..groups-1, in increasing order of value) of
    each entry, minimising the within-group sum of squares.

    In one dimension an optimal clustering splits the sorted values into contiguous runs, so
    dynamic programming over the split points finds the global optimum (no random restart).
    Ties between equally good splits go to the earliest split.

    >>> kmeans_1d(torch.tensor([5.0, 1.0, 1.2, 5.1]), 2).tolist()
    [1, 0, 0, 1]
    """
    n = values.numel()
    groups = min(groups, n)
    v = values.detach().double().cpu()
    order = torch.argsort(v, stable=True)
    s = v[order].tolist()
    pre, pre2 = [0.0], [0.0]
    for x in s:
        pre.append(pre[-1] + x)
        pre2.append(pre2[-1] + x * x)

    def sse(i: int, j: int) -> float:  # values s[i:j]
        tot = pre[j] - pre[i]
        return max(pre2[j] - pre2[i] - tot * tot / (j - i), 0.0)

    inf = float("inf")
    cost = [[inf] * (n + 1) for _ in range(groups + 1)]
    cut = [[0] * (n + 1) for _ in range(groups + 1)]
    cost[0][0] = 0.0
    for g in range(1, groups + 1):
        for j in range(g, n + 1):
            for i in range(g - 1, j):
                c = cost[g - 1][i] + sse(i, j)
                if c < cost[g][j] - 1e-12 * (1.0 + abs(c)):
                    cost[g][j], cut[g][j] = c, i
    labels = [0] * n
    j = n
    for g in range(groups, 0, -1):
        i = cut[g][j]
        for pos in range(i, j):
            labels[order[pos]] = g - 1
        j = i
    return torch.tensor(labels, dtype=torch.long)


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
        losses = values
        # A loss below the largest over sqrt(float max) counts as that floor: beta_k = sum / L_k
        # stays finite in the losses' dtype (an exact zero would make it infinite).
        info = torch.finfo(losses.dtype)
        top = losses.double().max()
        floor = torch.clamp_min(top / math.sqrt(info.max), info.tiny)
        safe = losses.double().clamp_min(floor)
        # Multiplicative update in log space: exp(-eta L) underflows for huge losses.
        log_omega = self.omega.log() - self.step_size * safe
        self.omega.copy_(torch.softmax(log_omega, dim=0))
        # beta_k = sum_j L_j / L_k, computed relative to the largest loss (no overflow).
        ratio = safe / safe.max()
        indicators = (ratio.sum() / ratio) * self.omega
        labels = kmeans_1d(indicators, self.num_groups)
        return group_means(indicators, labels).to(losses.dtype)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, step_size={self.step_size}"
