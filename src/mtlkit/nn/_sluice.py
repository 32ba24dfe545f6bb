"""Sluice networks: cross-stitching of per-task subspaces plus learned layer skip-combinations."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from mtlkit.nn._base import MultiTaskModel, check_tasks, positive_int
from mtlkit.nn._cross_stitch import _check_init, mixing_init
from mtlkit.nn._utils import ColumnSpec, build_columns, module_list


class Sluice(MultiTaskModel):
    """Sluice network: per-task columns whose layer outputs are split into subspaces, mixed
    across all tasks and subspaces by learned ``alpha`` units, and combined across layers by
    learned ``beta`` weights before each task head.

    Proposed in *Latent Multi-task Architecture Learning* (Ruder, Bingel, Augenstein, Søgaard,
    AAAI 2019, arXiv:1705.08142; first titled *Sluice networks: Learning what to share between
    loosely related tasks*). Layer ``l`` of task ``k`` gives ``h_{k,l}``. Its channels (dim 1)
    are split into ``G = num_subspaces`` equal subspaces. An ``alpha`` unit, a ``KG x KG``
    matrix, replaces every subspace by a linear mix of all ``K G`` subspaces of that layer. The
    mixed outputs feed the next layer. Task ``k``'s head reads
    ``sum_l beta_{k,l} h~_{k,l}``, a weighted sum of its mixed layer outputs (so the layers
    must have equal shapes).

    Args:
        tasks: task names.
        column: a function ``task -> [layer modules]`` or a list of layer factories (called once
            per task); see :class:`~mtlkit.nn.CrossStitch`.
        heads: task name -> head on the ``beta``-combined representation.
        num_subspaces: ``G``; every layer's channel count must be divisible by it.
        alpha_init: ``(alpha_s, alpha_d)``: ``alpha_s`` on each subspace's own entry, the rest
            ``alpha_d`` spread evenly over the other ``K G - 1``. Default ``(0.9, 0.1)`` follows
            the official code's "imbalanced" scheme for one subspace. For two subspaces the
            official code uses a fixed 0.95/0.05 pattern instead. ``(1, 0)`` gives
            independent columns.
        beta_init: ``"balanced"`` (``1/L`` each, the official default) or ``"imbalanced"``
            (0.9 on the last layer, ``0.1/(L-1)`` on the others).

    :meth:`regularizer` is the paper's subspace orthogonality penalty, to add to the loss with
    a weight (the official example uses 0.1). It takes the last weight with at least two
    dimensions of every column layer, whose rows (output channels) produce the subspaces, and
    sums ``||W_g W_h^T||_F^2`` over subspace pairs ``g < h``. Such a weight must exist and its
    row count must be divisible by ``G``.

    .. note:: The official DyNet code applies the penalty to chosen LSTM matrices and writes
       the product as ``W_1^T W_2`` in its own layout. This version pushes the weight vectors
       of different subspaces to be orthogonal, for any layer type.

    ``features`` is the mixed layer outputs stacked over tasks and layers,
    ``(K, L, batch, ...)``: row ``k`` holds the ``h~_{k,l}`` that task ``k``'s ``beta`` combines.
    It is taken before the ``beta`` combination because the ``betas`` are task parameters: the
    part of the network behind ``features`` must be shared only. Shared parameters: every
    column layer (each one is followed by an ``alpha`` unit that feeds it to all tasks) and the
    ``alpha`` units. Task parameters: the task's ``beta`` and head.

    Example:
        >>> import torch
        >>> from mtlkit.nn import Sluice
        >>> layers = [lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()),
        ...           lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())]
        >>> heads = {"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 2)}
        >>> model = Sluice(["a", "b"], layers, heads)
        >>> out = model(torch.randn(3, 4))
        >>> tuple(out["b"].shape), tuple(model.features.shape)
        ((3, 2), (2, 2, 3, 8))
    """

    def __init__(
        self,
        tasks: Sequence[str],
        column: ColumnSpec,
        heads: Mapping[str, nn.Module],
        *,
        num_subspaces: int = 2,
        alpha_init: tuple[float, float] = (0.9, 0.1),
        beta_init: Literal["balanced", "imbalanced"] = "balanced",
    ) -> None:
        super().__init__(check_tasks(tasks))
        if not isinstance(heads, Mapping) or set(heads) != set(self.tasks):
            got = sorted(heads) if isinstance(heads, Mapping) else type(heads)
            raise ValueError(f"heads must map exactly the tasks {list(self.tasks)}, got {got}")
        positive_int("num_subspaces", num_subspaces)
        self.num_subspaces = num_subspaces
        self.columns = nn.ModuleDict(build_columns(self.tasks, column))
        depth = len(module_list(self.columns, self.tasks[0]))
        size = len(self.tasks) * num_subspaces
        init = _check_init(alpha_init)
        self.alphas = nn.ParameterList(nn.Parameter(mixing_init(size, init)) for _ in range(depth))
        if beta_init == "balanced":
            beta = torch.full((depth,), 1.0 / depth)
        elif beta_init == "imbalanced":
            beta = torch.full((depth,), 0.1 / (depth - 1) if depth > 1 else 0.0)
            beta[-1] = 0.9 if depth > 1 else 1.0
        else:
            raise ValueError(f"beta_init must be 'balanced' or 'imbalanced', got {beta_init!r}")
        self.betas = nn.ParameterDict({t: nn.Parameter(beta.clone()) for t in self.tasks})
        for t, h in heads.items():
            if not isinstance(h, nn.Module):
                raise TypeError(f"heads[{t!r}] must be an nn.Module, got {type(h)}")
        self.heads = nn.ModuleDict({t: heads[t] for t in self.tasks})
        self._check_partition()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        k, g = len(self.tasks), self.num_subspaces
        hs: Sequence[Tensor] = [x] * k
        mixed_layers = []
        for i, alpha in enumerate(self.alphas):
            outs = [module_list(self.columns, t)[i](h) for t, h in zip(self.tasks, hs)]
            shapes = {tuple(o.shape) for o in outs}
            if len(shapes) != 1:
                raise ValueError(f"layer {i} gives different shapes per task: {sorted(shapes)}")
            h = torch.stack(outs)  # (K, B, C, ...)
            c = h.shape[2]
            if c % g:
                raise ValueError(f"layer {i} has {c} channels, not divisible by num_subspaces={g}")
            rest = h.shape[3:]
            sub = h.reshape(k, h.shape[1], g, c // g, *rest).movedim(2, 1)  # (K, G, B, C/G, ...)
            sub = sub.reshape(k * g, *sub.shape[2:])
            mixed = torch.einsum("ij,j...->i...", alpha.to(sub.dtype), sub)
            mixed = mixed.reshape(k, g, *mixed.shape[1:]).movedim(1, 2).flatten(2, 3)  # (K,B,C,...)
            mixed_layers.append(mixed)
            hs = mixed.unbind(0)
        shapes = {tuple(m.shape) for m in mixed_layers}
        if len(shapes) != 1:
            raise ValueError(f"beta needs equal layer output shapes, got {sorted(shapes)}")
        layers = torch.stack(mixed_layers, dim=1)  # (K, L, B, C, ...)
        self.features = layers
        beta = torch.stack([self.betas[t] for t in self.tasks]).to(layers.dtype)  # (K, L)
        combined = torch.einsum("kl,kl...->k...", beta, layers)
        return {t: self.heads[t](combined[i]) for i, t in enumerate(self.tasks)}

    def regularizer(self) -> Tensor:
        """Subspace orthogonality penalty ``sum ||W_g W_h^T||_F^2`` (see the class docstring)."""
        g = self.num_subspaces
        terms = []
        for t in self.tasks:
            for i, layer in enumerate(module_list(self.columns, t)):
                weights = [p for p in layer.parameters() if p.dim() >= 2]
                if not weights:
                    raise ValueError(f"layer {i} of task {t!r} has no weight matrix to constrain")
                w = weights[-1].flatten(1)
                if w.shape[0] % g:
                    raise ValueError(
                        f"layer {i} of task {t!r}: {w.shape[0]} output rows, not divisible by "
                        f"num_subspaces={g}"
                    )
                blocks = w.reshape(g, w.shape[0] // g, w.shape[1])  # (G, rows/G, in)
                for a in range(g):
                    for b in range(a + 1, g):
                        terms.append((blocks[a] @ blocks[b].T).pow(2).sum())
        return torch.stack(terms).sum()

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        yield self.betas[task]
        yield from self.heads[task].parameters()
