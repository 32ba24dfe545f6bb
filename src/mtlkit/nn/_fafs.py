"""Fully-adaptive feature sharing: start thin, widen top-down by grouping related tasks."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlkit.nn._base import MultiTaskModel, check_tasks
from mtlkit.nn._utils import module_list, pack_features

Groups = Sequence[Sequence[Sequence[str]]]
#: Task groups per depth, as stored on the model.
Partition = tuple[tuple[tuple[str, ...], ...], ...]


def task_affinity(errors: Mapping[str, Tensor]) -> Tensor:
    """Task affinity from co-occurring errors: ``A(i, j) = P(e_i = e_j)``.

    Lu et al. (CVPR 2017, arXiv:1611.05377), Section 3.4. With ``e_i`` the indicator that
    example ``n`` is an error (a "difficult" example) for task ``i``,
    ``A(i, j) = P(e_i = 1, e_j = 1) + P(e_i = 0, e_j = 0)``, estimated over the examples.

    Args:
        errors: task -> boolean (or 0/1) tensor of per-example errors; all of the same length.

    Returns:
        ``(K, K)`` float64 affinity in the mapping's task order; 1 on the diagonal.

    Example:
        >>> import torch
        >>> from mtlkit.nn import task_affinity
        >>> task_affinity({"a": torch.tensor([1, 0, 1, 0]), "b": torch.tensor([1, 0, 0, 0])})
        tensor([[1.0000, 0.7500],
                [0.7500, 1.0000]], dtype=torch.float64)
    """
    if not isinstance(errors, Mapping) or not errors:
        raise ValueError("errors must be a non-empty mapping task -> per-example error indicators")
    rows = []
    for t, e in errors.items():
        e = torch.as_tensor(e).flatten()
        if e.dtype != torch.bool and not bool(((e == 0) | (e == 1)).all()):
            raise ValueError(f"errors[{t!r}] must hold booleans or 0/1 values")
        rows.append(e.to(torch.float64))
    lengths = {len(r) for r in rows}
    if len(lengths) != 1 or 0 in lengths:
        raise ValueError(
            f"errors: every task needs the same, non-zero number of examples, got {lengths}"
        )
    e = torch.stack(rows, dim=1)  # (N, K)
    n = e.shape[0]
    return (e.T @ e + (1 - e).T @ (1 - e)) / n


def branch_affinity(affinity: Tensor, a: Sequence[int], b: Sequence[int]) -> float:
    """Affinity of two branches (task index sets): ``(Ã(a, b) + Ã(b, a)) / 2`` with
    ``Ã(a, b) = mean_{i in a} min_{j in b} A(i, j)`` (Lu et al., Section 3.4)."""
    sub = affinity[list(a)][:, list(b)]
    return 0.5 * (sub.min(dim=1).values.mean().item() + sub.min(dim=0).values.mean().item())


class FullyAdaptiveSharing(MultiTaskModel):
    """A tree-shaped multi-task network grown from a thin, fully shared one.

    Proposed in *Fully-adaptive Feature Sharing in Multi-Task Networks with Applications in
    Person Attribute Classification* (Lu, Kumar, Zhai, Cheng, Javidi, Feris, CVPR 2017,
    arXiv:1611.05377). The model starts as ``layers`` shared by all tasks plus one head per task.
    :func:`widen` branches it one layer at a time, top-down. At the active layer it clusters
    the branches above by task affinity and gives each cluster its own copy of the layer.

    Structure: ``groups[d]`` partitions the tasks at depth ``d``. Each group owns one copy of
    layer ``d`` (``branches[d][g]``), which reads the output of the depth ``d - 1`` group
    containing its tasks. Partitions are nested, so the network is a tree. ``active_depth``
    is the next layer :func:`widen` will split (-1 when done).

    Args:
        layers: the thin trunk, applied in order.
        heads: task name -> head on the last layer's output.
        groups: optional partition of the tasks per depth, to rebuild a widened structure,
            e.g. before loading its ``state_dict``. Each layer is copied once per group.
            Default: one group per depth.
        active_depth: the next depth to widen (default: the top layer, or -1 with ``groups``).

    ``features`` is the last layer's output while that layer is shared by all tasks. Once a
    task has its own layers, the shared computation reaches the task-specific part through the
    output of each task's deepest shared branch. The model then runs every shared branch
    first, and ``features`` packs those outputs into one ``(batch, N)`` tensor (see
    :func:`~mtlkit.nn._utils.pack_features`) whose views feed the task-specific layers; it is
    ``None`` only if no layer is shared. Shared parameters: layer copies used by two or more
    tasks. Task parameters: its head and the layer copies only it uses.

    .. note:: Not implemented from the paper: the thin-model initialisation by simultaneous
       orthogonal matching pursuit from a pre-trained wide network.

    Example:
        >>> import torch
        >>> from mtlkit.nn import FullyAdaptiveSharing
        >>> layers = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()),
        ...           torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())]
        >>> heads = {t: torch.nn.Linear(8, 1) for t in "abc"}
        >>> model = FullyAdaptiveSharing(layers, heads)
        >>> model.groups[1], model.active_depth
        ((('a', 'b', 'c'),), 1)
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        heads: Mapping[str, nn.Module],
        *,
        groups: Groups | None = None,
        active_depth: int | None = None,
    ) -> None:
        if not isinstance(heads, Mapping):
            raise TypeError(f"heads must be a mapping task name -> module, got {type(heads)}")
        super().__init__(check_tasks(heads.keys(), "heads"))
        layers = list(layers)
        if not layers or not all(isinstance(m, nn.Module) for m in layers):
            raise ValueError("layers must be a non-empty sequence of nn.Module")
        for t, h in heads.items():
            if not isinstance(h, nn.Module):
                raise TypeError(f"heads[{t!r}] must be an nn.Module, got {type(h)}")
        depth = len(layers)
        parts: Partition
        if groups is None:
            parts = tuple((self.tasks,) for _ in range(depth))
        else:
            parts = _check_groups(self.tasks, groups, depth)
        if active_depth is None:
            active_depth = depth - 1 if groups is None else -1
        if not -1 <= active_depth < depth:
            raise ValueError(f"active_depth must be in [-1, {depth - 1}], got {active_depth}")
        self.groups = parts
        self.active_depth = int(active_depth)
        self.branches = nn.ModuleList(
            nn.ModuleList(layer if i == 0 else copy.deepcopy(layer) for i in range(len(parts[d])))
            for d, layer in enumerate(layers)
        )
        self.heads = nn.ModuleDict(dict(heads))
        self._check_partition()

    @property
    def can_widen(self) -> bool:
        """Whether :func:`widen` has a junction to split: the active layer is still one branch
        and at least two branches sit above it."""
        d = self.active_depth
        return d >= 0 and len(self.groups[d]) == 1 and len(self._children(d)) > 1

    def _children(self, depth: int) -> tuple[tuple[str, ...], ...]:
        """The branches above layer ``depth`` as task groups (tasks themselves at the top)."""
        if depth == len(self.groups) - 1:
            return tuple((t,) for t in self.tasks)
        return tuple(self.groups[depth + 1])

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        # Shared branches (groups of two or more tasks) first, depth by depth. A task's input
        # at the next depth is then the output of its deepest shared branch (its part of the
        # cut between shared and task-specific layers) or x.
        outputs: dict[tuple[int, int], Tensor] = {}
        last: dict[str, tuple[int, int] | None] = {t: None for t in self.tasks}
        for d, parts in enumerate(self.groups):
            for g, group in enumerate(parts):
                if len(group) > 1:
                    src = last[group[0]]
                    outputs[(d, g)] = self._branch(d, g)(x if src is None else outputs[src])
                    for t in group:
                        last[t] = (d, g)
        cut = sorted({key for key in last.values() if key is not None})
        if len(cut) > 1:
            self.features, views = pack_features([outputs[key] for key in cut])
            outputs.update(zip(cut, views))
        else:
            self.features = outputs[cut[0]] if cut else None
        # Then each task's own branches above its cut, and its head.
        out = {}
        for t in self.tasks:
            key = last[t]
            h = x if key is None else outputs[key]
            for d in range(0 if key is None else key[0] + 1, len(self.groups)):
                h = self._branch(d, self.groups[d].index((t,)))(h)
            out[t] = self.heads[t](h)
        return out

    def _branch(self, depth: int, group: int) -> nn.Module:
        return module_list(self.branches, depth)[group]

    def _no_features_reason(self) -> str | None:
        if any(len(g) > 1 for g in self.groups[0]):
            return None
        return "no layer is shared by two or more tasks"

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        for d, parts in enumerate(self.groups):
            for g, group in enumerate(parts):
                if group == (task,):
                    yield from module_list(self.branches, d)[g].parameters()
        yield from self.heads[task].parameters()


def _check_groups(tasks: Sequence[str], groups: Groups, depth: int) -> Partition:
    if len(groups) != depth:
        raise ValueError(f"groups must give one partition per layer ({depth}), got {len(groups)}")
    result: list[tuple[tuple[str, ...], ...]] = []
    for d, parts in enumerate(groups):
        parts_t = tuple(tuple(g) for g in parts)
        flat = [t for g in parts_t for t in g]
        if sorted(flat) != sorted(tasks) or any(not g for g in parts_t):
            raise ValueError(f"groups[{d}] must partition the tasks {list(tasks)}, got {parts_t}")
        if d > 0:
            for g in parts_t:
                if not any(set(g) <= set(p) for p in result[-1]):
                    raise ValueError(
                        f"groups[{d}]: group {g} spans several groups of depth {d - 1}; "
                        "partitions must be nested (a tree)"
                    )
        result.append(parts_t)
    return tuple(result)


def widen(
    model: FullyAdaptiveSharing,
    affinity: Tensor | Mapping[str, Tensor],
    *,
    num_groups: int | None = None,
    branch_cost: float = 0.1,
) -> FullyAdaptiveSharing:
    """One top-down widening round of fully-adaptive feature sharing; returns a new model.

    Lu et al. (CVPR 2017, arXiv:1611.05377), Section 3.3. At the active layer ``d`` (the top one
    first), the branches above it are clustered into ``c`` groups. Layer ``d`` is replaced by
    ``c`` copies of its current weights, one per group, and the active layer moves to
    ``d - 1``. The input model is left unchanged. Build a new optimizer for the result.

    The clustering, a simplified but faithful version of the paper's:

    * task affinity ``A`` from co-occurring errors (:func:`task_affinity`), or given directly;
    * branch affinity ``A_b`` between task groups, from the mean-min linkage of
      :func:`branch_affinity`;
    * candidate groupings for every ``c`` from agglomerative clustering, which merges the two
      clusters of highest ``A_b``. The paper minimises the same loss over groupings directly;
    * ``c`` minimising the paper's loss ``(c - 1) * branch_cost + (1/c) sum_k (1 - s_k)``.
      The first term is the cost of new branches (the paper's ``L_0 2^{p_l}``, with ``p_l``
      pooling layers above the layer). ``s_k`` is the within-group affinity: the mean over
      the group's branches of their minimum ``A_b`` to the other members (1 for one branch).
      Pass ``num_groups`` to fix ``c``.

    Args:
        model: the current network.
        affinity: a ``(K, K)`` task affinity in ``model.tasks`` order (values in [0, 1]), or
            task -> per-example error indicators, turned into one by :func:`task_affinity`.
        num_groups: fix the number of groups (1 to the number of branches).
        branch_cost: cost of each extra branch, relative to the separation term in [0, 1].

    Raises:
        ValueError: nothing left to widen (``model.can_widen`` is False), or bad arguments.

    Example:
        >>> import torch
        >>> from mtlkit.nn import FullyAdaptiveSharing, widen
        >>> layers = [torch.nn.Linear(4, 8), torch.nn.Linear(8, 8)]
        >>> model = FullyAdaptiveSharing(layers, {t: torch.nn.Linear(8, 1) for t in "abcd"})
        >>> errors = {"a": torch.tensor([1, 1, 0, 0]), "b": torch.tensor([1, 1, 0, 0]),
        ...           "c": torch.tensor([0, 1, 1, 1]), "d": torch.tensor([0, 1, 1, 1])}
        >>> wider = widen(model, errors)
        >>> wider.groups[1], wider.active_depth
        ((('a', 'b'), ('c', 'd')), 0)
    """
    if not isinstance(model, FullyAdaptiveSharing):
        raise TypeError(f"model must be a FullyAdaptiveSharing, got {type(model)}")
    if not model.can_widen:
        raise ValueError(
            "model cannot be widened further: the active layer (active_depth="
            f"{model.active_depth}) is not a single branch below two or more branches"
        )
    if not branch_cost >= 0:
        raise ValueError(f"branch_cost must be >= 0, got {branch_cost!r}")
    a = _affinity_matrix(model.tasks, affinity)
    d = model.active_depth
    children = model._children(d)
    index = {t: i for i, t in enumerate(model.tasks)}
    kids = [[index[t] for t in g] for g in children]
    n = len(kids)
    if num_groups is not None and (isinstance(num_groups, bool) or not 1 <= num_groups <= n):
        raise ValueError(f"num_groups must be an int in [1, {n}], got {num_groups!r}")
    candidates = _agglomerate(a, kids)  # c -> list of clusters (lists of child indices)
    if num_groups is not None:
        clusters = candidates[num_groups]
    else:

        def loss(cl: list[list[int]]) -> float:
            sep = sum(1 - _within(a, [kids[i] for i in c]) for c in cl) / len(cl)
            return (len(cl) - 1) * branch_cost + sep

        clusters = min((candidates[c] for c in sorted(candidates)), key=loss)
    new = copy.deepcopy(model)
    layer = module_list(new.branches, d)[0]
    groups = tuple(tuple(t for i in sorted(c) for t in children[i]) for c in clusters)
    groups = tuple(sorted(groups, key=lambda g: index[g[0]]))
    new.branches[d] = nn.ModuleList(
        layer if i == 0 else copy.deepcopy(layer) for i in range(len(groups))
    )
    new.groups = new.groups[:d] + (groups,) + new.groups[d + 1 :]
    new.active_depth = d - 1
    new.features = None
    new._check_partition()
    return new


def _affinity_matrix(tasks: Sequence[str], affinity: Tensor | Mapping[str, Tensor]) -> Tensor:
    if isinstance(affinity, Mapping):
        if set(affinity) != set(tasks):
            raise ValueError(
                f"affinity: errors must be given for exactly the tasks {list(tasks)}, "
                f"got {sorted(affinity)}"
            )
        return task_affinity({t: affinity[t] for t in tasks})
    a = torch.as_tensor(affinity, dtype=torch.float64)
    k = len(tasks)
    if a.shape != (k, k):
        raise ValueError(
            f"affinity must be a ({k}, {k}) matrix in model.tasks order, got shape {tuple(a.shape)}"
        )
    if not bool(torch.isfinite(a).all()) or bool((a < 0).any()) or bool((a > 1).any()):
        raise ValueError("affinity values must be finite and in [0, 1]")
    if not torch.allclose(a, a.T):
        raise ValueError("affinity must be symmetric")
    return a


def _within(a: Tensor, branches: list[list[int]]) -> float:
    """Mean over branches of their minimum branch affinity to the other members (1 if alone)."""
    if len(branches) == 1:
        return 1.0
    vals = []
    for i, b in enumerate(branches):
        vals.append(min(branch_affinity(a, b, o) for j, o in enumerate(branches) if j != i))
    return sum(vals) / len(vals)


def _agglomerate(a: Tensor, kids: list[list[int]]) -> dict[int, list[list[int]]]:
    """Agglomerative clustering of the child branches; returns the clusters for every count."""
    clusters = [[i] for i in range(len(kids))]
    result = {len(clusters): [list(c) for c in clusters]}
    while len(clusters) > 1:
        best = None
        for i in range(len(clusters)):
            for j in range(i + 1, len(clusters)):
                ti = [t for k in clusters[i] for t in kids[k]]
                tj = [t for k in clusters[j] for t in kids[k]]
                s = branch_affinity(a, ti, tj)
                if best is None or s > best[0]:
                    best = (s, i, j)
        assert best is not None
        _, i, j = best
        clusters[i] = clusters[i] + clusters[j]
        del clusters[j]
        result[len(clusters)] = [list(c) for c in clusters]
    return result
