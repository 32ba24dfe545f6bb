"""NDDR-CNN: task columns fused by neural discriminative dimensionality reduction layers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from mtlkit.nn._base import MultiTaskModel, check_tasks, int_sequence
from mtlkit.nn._utils import ColumnSpec, build_columns, module_list


class NDDRLayer(nn.Module):
    """One NDDR layer: for each of ``K`` tasks, ``ReLU(BN(W_k [x_1, ..., x_K]))`` with ``W_k`` a
    1x1 convolution from the ``K C`` concatenated channels back to ``C``.

    ``W_k`` starts as ``alpha I`` on task ``k``'s own channels and ``beta / (K - 1) I`` on each
    other task's (the paper's diagonal initialisation, ``(alpha, beta) = (0.9, 0.1)`` for two
    tasks). Batch norm as in the paper; ``bn_momentum`` is PyTorch's (0.1).

    Args:
        num_tasks: ``K``.
        channels: ``C``, the channels of each column at this layer.
        init: ``(alpha, beta)``.

    Example:
        >>> import torch
        >>> from mtlkit.nn import NDDRLayer
        >>> layer = NDDRLayer(2, 3)
        >>> w = layer.convs[0].weight[:, :, 0, 0]
        >>> [round(v, 4) for v in w[0].tolist()]  # channel 0 of task 0: 0.9 own, 0.1 task 1's
        [0.9, 0.0, 0.0, 0.1, 0.0, 0.0]
    """

    def __init__(self, num_tasks: int, channels: int, init: tuple[float, float] = (0.9, 0.1)):
        super().__init__()
        if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be an int >= 1, got {num_tasks!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an int >= 1, got {channels!r}")
        try:
            alpha, beta = (float(v) for v in init)
        except (TypeError, ValueError):
            raise ValueError(f"init must be a pair (alpha, beta), got {init!r}") from None
        k = num_tasks
        self.convs = nn.ModuleList(nn.Conv2d(k * channels, channels, 1, bias=False) for _ in range(k))
        self.bns = nn.ModuleList(nn.BatchNorm2d(channels) for _ in range(k))
        eye = torch.eye(channels)
        with torch.no_grad():
            for i, conv in enumerate(self.convs):
                blocks = [
                    (alpha if j == i else beta / max(k - 1, 1)) * eye for j in range(k)
                ]
                conv.weight.copy_(torch.cat(blocks, dim=1)[:, :, None, None])

    def forward(self, stacked: Tensor) -> list[Tensor]:
        """``stacked``: the columns' features concatenated on channels; one output per task."""
        return [torch.relu(bn(conv(stacked))) for conv, bn in zip(self.convs, self.bns)]


class NDDR(MultiTaskModel):
    """NDDR-CNN: one column per task, fused after chosen stages by :class:`NDDRLayer`.

    Proposed in *NDDR-CNN: Layerwise Feature Fusing in Multi-Task CNNs by Neural
    Discriminative Dimensionality Reduction* (Gao, Ma, Zhao, Liu, Yuille, CVPR 2019,
    arXiv:1801.08297). Each task has its own column of stages (same architecture, separate
    weights). After each stage in ``fuse_after`` the ``K`` column outputs are concatenated on
    channels and every task gets its own 1x1 conv-BN-ReLU reduction of the concatenation.

    ``features`` is the concatenation fed to the last NDDR layer. Shared parameters: every
    column stage up to the last fused one and every NDDR layer but the last (they reach all
    tasks). Task parameters: the task's reduction in the last NDDR layer and its stages after.

    Args:
        tasks: task names.
        column: per-task stages (see :class:`~mtlkit.nn.CrossStitch`); the last stage is the
            task's head.
        channels: channels of each column after each fused stage.
        fuse_after: stage indices followed by an NDDR layer (default: every stage but the
            last, as the paper places one after every block group).
        init: ``(alpha, beta)`` of :class:`NDDRLayer` (paper: 0.9, 0.1).

    .. note:: The paper trains the NDDR layers faster than the pretrained columns; put
       :meth:`nddr_parameters` in their own optimiser group for a separate learning rate. With
       more than two tasks, ``beta`` is split evenly over the other tasks.

    Example:
        >>> import torch
        >>> from mtlkit.nn import NDDR
        >>> stage = lambda: torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1),
        ...                                     torch.nn.ReLU())
        >>> model = NDDR(["a", "b"], [stage, lambda: torch.nn.Conv2d(4, 1, 1)], channels=[4])
        >>> out = model(torch.randn(2, 3, 8, 8))
        >>> tuple(out["a"].shape), tuple(model.features.shape)
        ((2, 1, 8, 8), (2, 8, 8, 8))
    """

    def __init__(
        self,
        tasks: Sequence[str],
        column: ColumnSpec,
        channels: Sequence[int],
        *,
        fuse_after: Sequence[int] | None = None,
        init: tuple[float, float] = (0.9, 0.1),
    ) -> None:
        super().__init__(check_tasks(tasks))
        self.columns = nn.ModuleDict(build_columns(self.tasks, column))
        depth = len(module_list(self.columns, self.tasks[0]))
        after = tuple(range(depth - 1)) if fuse_after is None else tuple(int(i) for i in fuse_after)
        if not after or sorted(set(after)) != list(after) or after[0] < 0 or after[-1] > depth - 2:
            raise ValueError(
                f"fuse_after must be strictly increasing stage indices in [0, {depth - 2}], "
                f"got {list(after)}"
            )
        chans = int_sequence("channels", channels)
        if len(chans) != len(after):
            raise ValueError(
                f"channels must give one count per fused stage ({len(after)}), got {list(chans)}"
            )
        self.fuse_after = after
        self.layers = nn.ModuleList(NDDRLayer(len(self.tasks), c, init) for c in chans)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        hs = [x] * len(self.tasks)
        layer_at = dict(zip(self.fuse_after, self.layers))
        columns = [module_list(self.columns, t) for t in self.tasks]
        for i in range(len(columns[0])):
            hs = [col[i](h) for col, h in zip(columns, hs)]
            if i in layer_at:
                stacked = torch.cat(hs, dim=1)
                if i == self.fuse_after[-1]:
                    self.features = stacked
                hs = layer_at[i](stacked)
        return dict(zip(self.tasks, hs))

    def nddr_parameters(self) -> Iterable[nn.Parameter]:
        """The NDDR layers' parameters (for their own learning rate)."""
        return self.layers.parameters()

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        k = self.tasks.index(task)
        last = self.layers[-1]
        assert isinstance(last, NDDRLayer)
        yield from last.convs[k].parameters()
        yield from last.bns[k].parameters()
        for stage in module_list(self.columns, task)[self.fuse_after[-1] + 1 :]:
            yield from stage.parameters()
