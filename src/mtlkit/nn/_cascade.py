"""Task cascades: a task's head also reads the predictions of tasks before it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlkit.nn._base import MultiTaskModel, check_tasks
from mtlkit.nn._utils import pack_features

Combine = Callable[[Tensor, Sequence[Tensor]], Tensor]


def concat_channels(features: Tensor, predictions: Sequence[Tensor]) -> Tensor:
    """Default cascade input: ``cat([features, *predictions], dim=1)``."""
    return torch.cat([features, *predictions], dim=1)


class Cascade(MultiTaskModel):
    """A shared encoder and per-task heads, where some heads also read other tasks' predictions.

    The task-cascade pattern of e.g. *Instance-aware Semantic Segmentation via Multi-task
    Network Cascades* (Dai, He, Sun, CVPR 2016, arXiv:1512.04412) and the hierarchical NLP model
    of Hashimoto et al. (*A Joint Many-Task Model*, EMNLP 2017, arXiv:1611.01587): task ``B``
    with ``depends_on={"B": ["A"]}`` gets ``combine(features, [prediction of A])`` as input
    (default: concatenation along dim 1, so ``A``'s head must output the features' shape
    except for dim 1). Heads run in dependency order; cycles are rejected.

    With ``detach=True`` (default) the upstream prediction is detached before it enters the
    downstream head: ``B``'s loss trains ``B``'s head and the encoder, never ``A``'s head.
    With ``detach=False`` gradients flow into ``A``'s head as well.

    Args:
        encoder: maps the input to the shared features.
        heads: task name -> head.
        depends_on: task -> tasks whose predictions its head reads (in that order).
        detach: stop the downstream gradient at the upstream predictions.
        combine: ``(features, predictions) -> head input``; default :func:`concat_channels`.

    ``features`` is the encoder output. With ``detach=False`` and at least one dependency, the
    upstream heads serve several tasks but come after the encoder. The model then runs the
    encoder and those heads first, and ``features`` packs the encoder output and the upstream
    predictions into one ``(batch, N)`` tensor (see :func:`~mtlkit.nn._utils.pack_features`);
    the downstream heads and the outputs read views of it. Shared parameters: the encoder's,
    and with ``detach=False`` also the heads of tasks that feed another task. Task parameters:
    the task's head, unless it is shared as just described.

    Example:
        >>> import torch
        >>> from mtlkit.nn import Cascade
        >>> enc = torch.nn.Linear(4, 8)
        >>> heads = {"a": torch.nn.Linear(8, 2), "b": torch.nn.Linear(8 + 2, 1)}
        >>> model = Cascade(enc, heads, depends_on={"b": ["a"]})
        >>> {t: tuple(y.shape) for t, y in model(torch.randn(3, 4)).items()}
        {'a': (3, 2), 'b': (3, 1)}
    """

    def __init__(
        self,
        encoder: nn.Module,
        heads: Mapping[str, nn.Module],
        depends_on: Mapping[str, Sequence[str]],
        *,
        detach: bool = True,
        combine: Combine | None = None,
    ) -> None:
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder)}")
        if not isinstance(heads, Mapping):
            raise TypeError(f"heads must be a mapping task name -> module, got {type(heads)}")
        super().__init__(check_tasks(heads.keys(), "heads"))
        for t, h in heads.items():
            if not isinstance(h, nn.Module):
                raise TypeError(f"heads[{t!r}] must be an nn.Module, got {type(h)}")
        self.depends_on = _check_dependencies(self.tasks, depends_on)
        self.order = _topological_order(self.tasks, self.depends_on)
        self.detach = bool(detach)
        self.combine = combine if combine is not None else concat_channels
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        upstream = {u for deps in self.depends_on.values() for u in deps}
        self._owns_head = {t: self.detach or t not in upstream for t in self.tasks}
        encoder_params = {id(p) for p in encoder.parameters()}
        for t, h in heads.items():
            if any(id(p) in encoder_params for p in h.parameters()):
                raise ValueError(f"heads[{t!r}] shares parameters with the encoder")
        self._check_partition()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.encoder(x)
        preds: dict[str, Tensor] = {}
        # Shared heads first: a shared (upstream) head reads only shared tensors.
        for t in self.order:
            if not self._owns_head[t]:
                preds[t] = self._head(t, f, preds)
        if preds:
            self.features, (f, *ups) = pack_features([f, *preds.values()])
            preds = dict(zip(preds, ups))
        else:
            self.features = f
        for t in self.order:
            if self._owns_head[t]:
                preds[t] = self._head(t, f, preds)
        return self._output_dict(preds)

    def _head(self, task: str, f: Tensor, preds: Mapping[str, Tensor]) -> Tensor:
        deps = self.depends_on.get(task, ())
        if not deps:
            out: Tensor = self.heads[task](f)
            return out
        ups = [preds[u].detach() if self.detach else preds[u] for u in deps]
        out = self.heads[task](self.combine(f, ups))
        return out

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        return self.heads[task].parameters() if self._owns_head[task] else ()


def _check_dependencies(
    tasks: Sequence[str], depends_on: Mapping[str, Sequence[str]]
) -> dict[str, tuple[str, ...]]:
    if not isinstance(depends_on, Mapping):
        raise TypeError(f"depends_on must be a mapping task -> tasks, got {type(depends_on)}")
    result = {}
    for t, deps in depends_on.items():
        if t not in tasks:
            raise ValueError(f"depends_on: unknown task {t!r}; tasks are {list(tasks)}")
        if isinstance(deps, str):
            raise TypeError(f"depends_on[{t!r}] must be a sequence of task names, got {deps!r}")
        deps = tuple(deps)
        for u in deps:
            if u not in tasks:
                raise ValueError(f"depends_on[{t!r}]: unknown task {u!r}; tasks are {list(tasks)}")
            if u == t:
                raise ValueError(f"depends_on[{t!r}]: a task cannot depend on itself")
        if len(set(deps)) != len(deps):
            raise ValueError(f"depends_on[{t!r}] lists a task twice: {list(deps)}")
        result[t] = deps
    return result


def _topological_order(
    tasks: Sequence[str], depends_on: Mapping[str, Sequence[str]]
) -> tuple[str, ...]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(t: str, path: list[str]) -> None:
        if state.get(t) == 2:
            return
        if state.get(t) == 1:
            cycle = path[path.index(t) :] + [t]
            raise ValueError(f"depends_on has a cycle: {' -> '.join(cycle)}")
        state[t] = 1
        for u in depends_on.get(t, ()):
            visit(u, path + [t])
        state[t] = 2
        order.append(t)

    for t in tasks:
        visit(t, [])
    return tuple(order)
