"""Cross-stitch networks: one column per task, linearly mixed after chosen stages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from mtlkit.nn._base import MultiTaskModel, check_tasks, positive_int
from mtlkit.nn._utils import ColumnSpec, build_columns, module_list


def mixing_init(size: int, init: tuple[float, float]) -> Tensor:
    """A ``size x size`` matrix with ``alpha_s`` on the diagonal and ``alpha_d / (size - 1)``
    elsewhere, so every row sums to ``alpha_s + alpha_d`` (for two columns: exactly the
    paper's ``[[alpha_s, alpha_d], [alpha_d, alpha_s]]``)."""
    alpha_s, alpha_d = (float(v) for v in init)
    off = alpha_d / (size - 1) if size > 1 else 0.0
    m = torch.full((size, size), off)
    m.fill_diagonal_(alpha_s)
    return m


def _check_init(init: tuple[float, float]) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in init)
    except (TypeError, ValueError):
        raise ValueError(f"init must be a pair (alpha_s, alpha_d), got {init!r}") from None
    return a, b


class CrossStitchUnit(nn.Module):
    """A learned linear mix of ``K`` same-shaped activations: ``y_k = sum_j alpha[k, j] x_j``.

    With ``channels`` the mix is per channel (``alpha`` has shape ``(channels, K, K)`` and
    mixes each channel of dim 1 separately, as in the paper's units for conv layers);
    otherwise one ``K x K`` matrix for the whole layer.

    Args:
        num_columns: ``K``.
        channels: channels of dim 1 for a per-channel mix, or None for per-layer.
        init: ``(alpha_s, alpha_d)``, see :func:`mixing_init`; ``(1, 0)`` is the identity.

    Example:
        >>> import torch
        >>> from mtlkit.nn import CrossStitchUnit
        >>> unit = CrossStitchUnit(2, init=(0.9, 0.1))
        >>> unit(torch.stack([torch.ones(1, 3), torch.zeros(1, 3)]))[:, 0, 0]
        tensor([0.9000, 0.1000], grad_fn=<SelectBackward0>)
    """

    def __init__(
        self, num_columns: int, channels: int | None = None, init: tuple[float, float] = (1.0, 0.0)
    ) -> None:
        super().__init__()
        positive_int("num_columns", num_columns)
        m = mixing_init(num_columns, _check_init(init))
        if channels is not None:
            positive_int("channels", channels)
            m = m.expand(channels, -1, -1).clone()
        self.alpha = nn.Parameter(m)
        self.per_channel = channels is not None

    def forward(self, x: Tensor) -> Tensor:
        """Mix ``x`` of shape ``(K, batch, channels, ...)``; returns the same shape."""
        a = self.alpha.to(x.dtype)
        if self.per_channel:
            if x.dim() < 3 or x.shape[2] != a.shape[0]:
                raise ValueError(
                    f"cross-stitch unit expects {a.shape[0]} channels in dim 1 of each input, "
                    f"got input of shape {tuple(x.shape[1:])}"
                )
            return torch.einsum("ckj,jbc...->kbc...", a, x)
        return torch.einsum("kj,j...->k...", a, x)


class CrossStitch(MultiTaskModel):
    """Cross-stitch network: task columns exchanging activations through learned mixing.

    Proposed in *Cross-stitch Networks for Multi-task Learning* (Misra, Shrivastava, Gupta,
    Hebert, CVPR 2016, arXiv:1604.03539). Each task has its own column of stages (same
    architecture, separate weights). After each stage listed in ``stitch_after``, a
    :class:`CrossStitchUnit` replaces the ``K`` activations by linear mixes of them. The last
    stage of each column gives the task output.

    Args:
        tasks: task names.
        column: a function ``task -> [stage modules]`` or a list of stage factories (called once
            per task). All columns need the same depth, and a stitched stage must give the same
            shape for every task.
        stitch_after: stage indices followed by a unit (default: every stage but the last).
            The last stage cannot be stitched.
        channels: per-channel mixing, giving the channels (dim 1) after each stitched stage.
            None (default): one ``K x K`` matrix per unit.
        init: ``(alpha_s, alpha_d)``. ``(1, 0)`` (default) is the identity: the network starts
            as independent single-task columns. The paper's ``(0.9, 0.1)`` starts mixed. For
            ``K > 2``, ``alpha_d`` is split evenly over the other columns (:func:`mixing_init`).

    The paper trains the units with a learning rate about 10^2-10^3 times the network's; put
    :meth:`stitch_parameters` in their own optimizer group for that.

    ``features`` is the output of the last unit, stacked over tasks:
    ``(K, batch, ...)``, with row ``k`` feeding task ``k``'s remaining stages. Shared
    parameters: the units and every column stage up to the last stitched one (the units feed
    them to all tasks). Task parameters: the task's stages after the last unit.

    Example:
        >>> import torch
        >>> from mtlkit.nn import CrossStitch
        >>> stages = [lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()),
        ...           lambda: torch.nn.Linear(8, 1)]
        >>> model = CrossStitch(["a", "b"], stages, init=(0.9, 0.1))
        >>> out = model(torch.randn(3, 4))
        >>> tuple(out["a"].shape), tuple(model.features.shape)
        ((3, 1), (2, 3, 8))
    """

    def __init__(
        self,
        tasks: Sequence[str],
        column: ColumnSpec,
        *,
        stitch_after: Sequence[int] | None = None,
        channels: Sequence[int] | None = None,
        init: tuple[float, float] = (1.0, 0.0),
    ) -> None:
        super().__init__(check_tasks(tasks))
        self.columns = nn.ModuleDict(build_columns(self.tasks, column))
        depth = len(module_list(self.columns, self.tasks[0]))
        if stitch_after is None:
            stitch_after = tuple(range(depth - 1))
        after = tuple(int(i) for i in stitch_after)
        if not after:
            raise ValueError(
                "stitch_after is empty: a cross-stitch network needs at least one unit"
            )
        if sorted(set(after)) != list(after):
            raise ValueError(f"stitch_after must be strictly increasing, got {list(after)}")
        if after[0] < 0 or after[-1] > depth - 2:
            raise ValueError(
                f"stitch_after indices must lie in [0, {depth - 2}] (the last stage, {depth - 1}, "
                f"is the task output and cannot be stitched), got {list(after)}"
            )
        if channels is not None and len(channels) != len(after):
            raise ValueError(
                f"channels must give one count per stitched stage ({len(after)}), "
                f"got {list(channels)}"
            )
        _check_init(init)
        self.stitch_after = after
        self.units = nn.ModuleList(
            CrossStitchUnit(len(self.tasks), None if channels is None else channels[i], init)
            for i in range(len(after))
        )

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        hs: list[Tensor] | Tensor = [x] * len(self.tasks)
        unit_at = {s: u for s, u in zip(self.stitch_after, self.units)}
        columns = [module_list(self.columns, t) for t in self.tasks]
        for i in range(len(columns[0])):
            hs = [col[i](h) for col, h in zip(columns, hs)]
            if i in unit_at:
                stacked = unit_at[i](_stack(hs, i))
                if i == self.stitch_after[-1]:
                    self.features = stacked
                hs = stacked.unbind(0)
        return dict(zip(self.tasks, hs))

    def stitch_parameters(self) -> Iterable[nn.Parameter]:
        """The cross-stitch units' parameters (for a separate learning rate)."""
        return self.units.parameters()

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        for stage in module_list(self.columns, task)[self.stitch_after[-1] + 1 :]:
            yield from stage.parameters()


def _stack(hs: Sequence[Tensor], stage: int) -> Tensor:
    shapes = {tuple(h.shape) for h in hs}
    if len(shapes) != 1:
        raise ValueError(
            f"stage {stage} gives different shapes per task, cannot mix: {sorted(shapes)}"
        )
    return torch.stack(list(hs))
