"""GO4Align: group risk minimisation with risk-guided indicators (Shen et al. 2024)."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.balancers._base import LossWeighting, positive
from mtlkit.balancers._functional import finfo, host_view, host_write
from mtlkit.balancers._registry import register


def _kmeans_1d_labels(values: Sequence[float], groups: int) -> list[int]:
    """Labels of the optimal 1-D K-means (see :func:`kmeans_1d`) of a few Python floats.

    Plain Python: for the K indicators of a step (K small) a loop over floats costs a few
    microseconds, where each array operation costs ~1 us or more (measured for 3 values in 2
    groups: ~6 us here, ~50 us for the same programme on NumPy arrays).
    """
    n = len(values)
    groups = min(groups, n)
    if groups <= 1:
        return [0] * n
    order = sorted(range(n), key=values.__getitem__)  # stable: ties keep the task order
    # Prefix sums of the sorted values and of their squares.
    pre, pre2 = [0.0], [0.0]
    a = b = 0.0
    for k in order:
        x = values[k]
        a += x
        b += x * x
        pre.append(a)
        pre2.append(b)
    if groups == 2:  # one cut: the earliest best of the n - 1 (the layer below, written flat)
        a, b = pre[n], pre2[n]
        bc, bi = math.inf, 0
        for i in range(1, n):
            e, tot = pre2[i] - pre[i] * pre[i] / i, a - pre[i]
            c = max(0.0, e) + max(0.0, b - pre2[i] - tot * tot / (n - i))
            if c < bc:
                bc, bi = c, i
        labels = [1] * n
        for k in order[:bi]:
            labels[k] = 0
        return labels
    inf = math.inf
    # cost[j]: the least within-group sum of squares of sorted[:j] in g groups (infinite where
    # j < g), here g = 1. The sum of squares of sorted[i:j] is
    # pre2[j] - pre2[i] - (pre[j] - pre[i])^2 / (j - i), at least 0 (written inline below).
    cost = [inf]
    for j in range(1, n + 1):
        e = pre2[j] - pre[j] * pre[j] / j
        cost.append(max(0.0, e))
    cuts = []
    for g in range(1, groups):
        # g+1 groups over sorted[:j]: the least over the last cut i of (g groups over
        # sorted[:i]) + the sum of squares of sorted[i:j], the earliest of equally good cuts
        # (i < g would leave a group empty); the last layer needs only j = n.
        new, best = [inf] * (n + 1), [0] * (n + 1)
        for j in range(g + 1, n + 1) if g < groups - 1 else (n,):
            bc, bi = inf, 0
            for i in range(g, j):
                tot = pre[j] - pre[i]
                e = pre2[j] - pre2[i] - tot * tot / (j - i)
                c = cost[i] + max(0.0, e)
                if c < bc:
                    bc, bi = c, i
            new[j], best[j] = bc, bi
        cost = new
        cuts.append(best)
    labels = [0] * n
    end = n
    for g in range(groups - 1, -1, -1):
        start = cuts[g - 1][end] if g > 0 else 0
        for k in order[start:end]:
            labels[k] = g
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
    labels = _kmeans_1d_labels(values.detach().double().cpu().tolist(), groups)
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


@functools.cache
def _limits(dtype: torch.dtype) -> tuple[float, float]:
    """(sqrt of the largest float, the smallest normal float) of a dtype."""
    info = finfo(dtype)
    return math.sqrt(info.max), info.tiny


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
       indicators (:func:`kmeans_1d`), so the weights are deterministic (computed on the
       host, with the K loss values). A zero loss makes :math:`\beta_k` infinite; a loss below
       the largest one over the square root of the largest float of the losses' dtype is
       raised to that floor first, so the weights stay finite in that dtype.

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

    def loss_weights(self, values: list[float], context: Mapping[str, Any]) -> list[float]:
        # K numbers, in Python floats (cheaper than array operations for a few values).
        # A loss below the largest over sqrt(float max) of the losses' dtype counts as that
        # floor: beta_k = sum / L_k stays finite in that dtype (a zero would make it infinite).
        root_max, tiny = _limits(self._loss_dtype)
        largest = max(values)
        floor = max(largest / root_max, tiny)
        safe = [max(floor, x) for x in values]
        largest = max(largest, floor)
        view = host_view(self, "omega")
        # omega <- normalise(omega * exp(-eta L)), each factor relative to the smallest loss's
        # (the largest factor is 1); in log space when the products come near underflow (huge
        # losses, or a tiny omega where the factor is 1).
        eta, low = self.step_size, min(safe)
        omega = [w * math.exp(eta * (low - x)) for w, x in zip(view.tolist(), safe)]
        total = sum(omega)
        if not total > 1e-200:
            logs = [(math.log(w) if w > 0.0 else -math.inf) - eta * x
                    for w, x in zip(view.tolist(), safe)]
            top = max(logs)
            omega = [math.exp(x - top) for x in logs]
            total = sum(omega)
        omega = [w / total for w in omega]
        host_write(view, omega)  # the state, written in place
        # indicator_k = beta_k omega_k with beta_k = sum_j L_j / L_k, the losses relative to the
        # largest (no overflow of the sum)
        ratio_sum = sum([x / largest for x in safe])
        indicators = [ratio_sum / (x / largest) * w for x, w in zip(safe, omega)]
        groups = self.num_groups
        if groups >= len(indicators):  # a group per task: its own indicator
            return indicators
        labels = _kmeans_1d_labels(indicators, groups)
        sums, counts = [0.0] * groups, [0] * groups
        for g, x in zip(labels, indicators):
            sums[g] += x
            counts[g] += 1
        return [sums[g] / counts[g] for g in labels]

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, step_size={self.step_size}"
