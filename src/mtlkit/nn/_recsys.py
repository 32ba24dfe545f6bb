"""Tabular inputs and recommendation architectures: embeddings, ESMM, AITM.

Binary outputs are two-class log-probabilities ``[log(1 - p), log p]``, so a plain
cross-entropy on them is the binary log loss of ``p`` and ``argmax`` / ``pred[:, 1] -
pred[:, 0]`` rank the samples as ``p`` does: they train with ``Task.classification(name, 2)``
like any other binary head.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.nn._base import MultiTaskModel, check_tasks, int_sequence, positive_int
from mtlkit.nn._utils import mlp


def binary_log_probs(logit: Tensor | None = None, *, log_p: Tensor | None = None) -> Tensor:
    """``(N, 2)`` log-probabilities ``[log(1 - p), log p]`` from a logit ``(N,)``/``(N, 1)`` or
    from ``log p``; stable for p near 0 and 1.

    Example:
        >>> import torch
        >>> from mtlkit.nn import binary_log_probs
        >>> binary_log_probs(torch.tensor([0.0])).exp()
        tensor([[0.5000, 0.5000]])
    """
    if logit is not None:
        z = logit.reshape(-1)
        return torch.stack([F.logsigmoid(-z), F.logsigmoid(z)], dim=1)
    assert log_p is not None
    lp = log_p.reshape(-1).clamp(max=-1e-7)  # p < 1 keeps log(1 - p) finite
    return torch.stack([torch.log(-torch.expm1(lp)), lp], dim=1)


class TabularEmbedding(nn.Module):
    """``[categorical codes | numbers]`` -> ``[embedding of each code | numbers]``.

    The input is what :func:`mtlkit.data.load` gives for tabular data: ``(N, C + M)`` floats,
    the first ``C`` columns integer codes (0 = out of vocabulary), the last ``M`` standardised
    numbers. Each categorical column has its own table of ``dim``-sized embeddings.

    Args:
        cardinalities: codes per categorical column (out-of-vocabulary code included).
        num_numeric: numeric columns after them.
        dim: embedding size.

    Example:
        >>> import torch
        >>> from mtlkit.nn import TabularEmbedding
        >>> emb = TabularEmbedding([3, 5], num_numeric=1, dim=4)
        >>> emb.out_features, tuple(emb(torch.tensor([[1.0, 4.0, 0.5]])).shape)
        (9, (1, 9))
    """

    def __init__(self, cardinalities: Sequence[int], num_numeric: int = 0, dim: int = 8) -> None:
        super().__init__()
        self.cardinalities = int_sequence("cardinalities", cardinalities)
        self.num_numeric = positive_int("num_numeric", num_numeric, minimum=0)
        positive_int("dim", dim)
        if not self.cardinalities and not self.num_numeric:
            raise ValueError("TabularEmbedding needs categorical or numeric columns")
        self.tables = nn.ModuleList(nn.Embedding(n, dim) for n in self.cardinalities)
        for t in self.tables:
            nn.init.normal_(t.weight, std=0.01)  # as ESMM / AITM's official code
        self.out_features = dim * len(self.cardinalities) + self.num_numeric

    def forward(self, x: Tensor) -> Tensor:
        c = len(self.cardinalities)
        if x.dim() != 2 or x.shape[1] != c + self.num_numeric:
            raise ValueError(f"TabularEmbedding expects (N, {c + self.num_numeric}) inputs, got "
                             f"{tuple(x.shape)}")
        codes = x[:, :c].long()
        parts = [table(codes[:, j]) for j, table in enumerate(self.tables)]
        parts.append(x[:, c:].to(parts[0].dtype if parts else x.dtype))
        return torch.cat(parts, dim=1)


class Embedded(MultiTaskModel):
    """Any vector-input multi-task model behind a shared :class:`TabularEmbedding`.

    ``Embedded(TabularEmbedding(...), MMoE(emb.out_features, ...))`` gives MMoE, CGC, PLE, hard
    sharing, ESMM or AITM tabular inputs. The embedding tables are shared (every task reads
    them); task parameters, outputs and :attr:`features` are the inner model's.

    Example:
        >>> import torch
        >>> from mtlkit.nn import MMoE, Embedded, TabularEmbedding
        >>> emb = TabularEmbedding([4], num_numeric=2, dim=3)
        >>> model = Embedded(emb, MMoE(emb.out_features, {"a": 2, "b": 1}, expert_hidden=(8,)))
        >>> {t: tuple(y.shape) for t, y in model(torch.tensor([[2.0, 0.1, -0.3]])).items()}
        {'a': (1, 2), 'b': (1, 1)}
    """

    def __init__(self, embedding: nn.Module, model: MultiTaskModel) -> None:
        if not isinstance(model, MultiTaskModel):
            raise TypeError(f"model must be a MultiTaskModel, got {type(model)}")
        if not isinstance(embedding, nn.Module):
            raise TypeError(f"embedding must be an nn.Module, got {type(embedding)}")
        super().__init__(model.tasks)
        self.embedding = embedding
        self.model = model

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out = self.model(self.embedding(x))
        self.features = self.model.features
        return out

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        return self.model._task_parameters(task)

    def _no_features_reason(self) -> str | None:
        return self.model._no_features_reason()


class ESMM(MultiTaskModel):
    """Entire Space Multi-task Model: ``pCTCVR = pCTR x pCVR``, both trained on every impression.

    Proposed in *Entire Space Multi-Task Model: An Effective Approach for Estimating Post-Click
    Conversion Rate* (Ma, Zhao, Huang, Wang, Hu, Zhu, Gai, SIGIR 2018, arXiv:1804.07931). A CTR
    tower and a CVR tower (MLPs) read the same input (the shared embeddings when wrapped in
    :class:`Embedded`). The two supervised outputs are ``pCTR`` (label: click) and
    ``pCTCVR = pCTR * pCVR`` (label: click and conversion), both over the entire impression
    space, so CVR is never fitted on the clicked sample only (the sample selection bias of
    a plain CVR model). ``pCVR`` has no loss of its own; it is kept in :attr:`cvr` after each
    forward (``p = exp(cvr[:, 1])``). The paper's towers are 360-200-80 ReLU MLPs with
    18-dimensional embeddings (its section 4.2).

    Args:
        in_features: input size.
        tasks: the two task names, ``(ctr, ctcvr)``.
        hidden: hidden sizes of each tower.

    Outputs: ``{ctr: (N, 2), ctcvr: (N, 2)}`` log-probabilities (see the module docstring).
    Shared parameters: the CTR tower (``pCTR`` is in both outputs). Task parameters: the CVR
    tower belongs to ``ctcvr`` (the only output it feeds); ``ctr`` has none of its own.
    ``features`` is None (the towers read the input directly).

    .. note:: Like the paper's Figure 2, both towers read the same input; the tasks share it
       through the embedding (:class:`Embedded`).

    Example:
        >>> import torch
        >>> from mtlkit.nn import ESMM
        >>> model = ESMM(6, ("ctr", "ctcvr"), hidden=(8,))
        >>> out = model(torch.randn(4, 6))
        >>> p_ctr, p_ctcvr = out["ctr"][:, 1].exp(), out["ctcvr"][:, 1].exp()
        >>> torch.allclose(p_ctcvr, p_ctr * model.cvr[:, 1].exp())
        True
    """

    def __init__(self, in_features: int, tasks: Sequence[str] = ("ctr", "ctcvr"), *,
                 hidden: Sequence[int] = (360, 200, 80)) -> None:
        names = check_tasks(tasks)
        if len(names) != 2:
            raise ValueError(f"ESMM has two tasks (ctr, ctcvr), got {list(names)}")
        super().__init__(names)
        positive_int("in_features", in_features)
        int_sequence("hidden", hidden)
        self.ctr_tower = mlp(in_features, hidden, 1)
        self.cvr_tower = mlp(in_features, hidden, 1)
        self.cvr: Tensor | None = None

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        ctr, ctcvr = self.tasks
        ctr_logit, cvr_logit = self.ctr_tower(x), self.cvr_tower(x)
        log_ctr = F.logsigmoid(ctr_logit)
        self.cvr = binary_log_probs(cvr_logit)
        log_ctcvr = log_ctr + F.logsigmoid(cvr_logit)  # log(pCTR * pCVR)
        return {ctr: binary_log_probs(ctr_logit), ctcvr: binary_log_probs(log_p=log_ctcvr)}

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        return self.cvr_tower.parameters() if task == self.tasks[1] else iter(())

    def _no_features_reason(self) -> str | None:
        return "ESMM's towers read the input directly (wrap it in Embedded to share embeddings)"


class _AIT(nn.Module):
    """AITM's attention over ``[q_t, p_{t-1}]``: scaled dot product of two projections of
    each input, softmax over the two, sum of a third projection (bias-free, as published)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.h1 = nn.Linear(dim, dim, bias=False)
        self.h2 = nn.Linear(dim, dim, bias=False)
        self.h3 = nn.Linear(dim, dim, bias=False)
        for lin in (self.h1, self.h2, self.h3):
            nn.init.normal_(lin.weight, std=0.01)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, own: Tensor, transferred: Tensor) -> Tensor:
        u = torch.stack([own, transferred], dim=1)  # (N, 2, d)
        w = torch.softmax((self.h1(u) * self.h2(u)).sum(-1) * self.scale, dim=1)  # (N, 2)
        return (w.unsqueeze(-1) * self.h3(u)).sum(1)


class AITM(MultiTaskModel):
    """Adaptive Information Transfer Multi-task framework for sequential conversion steps.

    Proposed in *Modeling the Sequential Dependence among Audience Multi-step Conversions with
    Multi-task Learning in Targeted Display Advertising* (Xi, Chen, Yan, Zhang, Zhu, Zhuang,
    Chen, KDD 2021, arXiv:2105.08489). Tasks are steps of one funnel in order (impression ->
    click -> purchase ...). Each task has a tower ``q_t``; from task 2 on, an Adaptive
    Information Transfer module attends over ``[q_t, p_{t-1}]`` where
    ``p_{t-1} = ReLU(W z_{t-1})`` carries what task ``t - 1`` learnt, and a linear layer maps
    the result ``z_t`` to the logit of ``ŷ_t``. The official code's sizes are the defaults:
    towers 128-64-32 with dropout (0.1, 0.3, 0.3), a 32-unit transfer layer, embeddings of 5.

    The paper's behavioural expectation calibrator (``ŷ_t <= ŷ_{t-1}``, weight 0.6) spans two
    tasks; it is :meth:`calibration_loss` of the last forward, for a training loop to add.

    Args:
        in_features: input size.
        tasks: the task names, in funnel order (two or more).
        hidden: tower hidden sizes; the last is the size of ``q_t`` and ``p_t``.
        dropout: dropout after each tower layer (one value, or one per layer).

    Outputs: ``{task: (N, 2)}`` log-probabilities (see the module docstring).
    Shared parameters: a task's tower and transfer layer feed the next task's output too, so
    for every task but the last they are shared; task parameters of task ``t``: its attention
    module and output layer (and, for the last task, its tower). ``features`` is None (each
    task reads its own tower).

    .. note:: The calibrator is not a per-task loss, so :class:`~mtlkit.train.Trainer` leaves
       it out; the per-task log losses are the paper's other terms.

    Example:
        >>> import torch
        >>> from mtlkit.nn import AITM
        >>> model = AITM(6, ["click", "buy"], hidden=(8,), dropout=0.0)
        >>> out = model(torch.randn(4, 6))
        >>> {t: tuple(y.shape) for t, y in out.items()}, model.calibration_loss().item() >= 0
        ({'click': (4, 2), 'buy': (4, 2)}, True)
    """

    def __init__(self, in_features: int, tasks: Sequence[str], *,
                 hidden: Sequence[int] = (128, 64, 32),
                 dropout: float | Sequence[float] = (0.1, 0.3, 0.3)) -> None:
        names = check_tasks(tasks)
        if len(names) < 2:
            raise ValueError(f"AITM needs two tasks or more (funnel steps), got {list(names)}")
        super().__init__(names)
        positive_int("in_features", in_features)
        sizes = int_sequence("hidden", hidden)
        if not sizes:
            raise ValueError("hidden must give at least one size")
        rates = [float(dropout)] * len(sizes) if isinstance(dropout, (int, float)) else list(dropout)
        if len(rates) != len(sizes) or not all(0 <= r < 1 for r in rates):
            raise ValueError(f"dropout must be in [0, 1), one value or one per hidden layer; got "
                             f"{dropout!r}")
        d = sizes[-1]

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            width = in_features
            for h, r in zip(sizes, rates):
                layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(r)]
                width = h
            return nn.Sequential(*layers)

        self.towers = nn.ModuleDict({t: tower() for t in names})
        self.transfer = nn.ModuleDict(
            {t: nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(rates[-1]))
             for t in names[:-1]}
        )
        self.ait = nn.ModuleDict({t: _AIT(d) for t in names[1:]})
        self.out = nn.ModuleDict({t: nn.Linear(d, 1) for t in names})
        self._probs: list[Tensor] = []

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        out, probs = {}, []
        z: Tensor | None = None
        for i, t in enumerate(self.tasks):
            q = self.towers[t](x)
            z = q if i == 0 else self.ait[t](q, self.transfer[self.tasks[i - 1]](z))
            logit = self.out[t](z)
            out[t] = binary_log_probs(logit)
            probs.append(torch.sigmoid(logit).reshape(-1))
        self._probs = probs
        return out

    def calibration_loss(self, weight: float = 0.6) -> Tensor:
        """``weight * sum_t mean(max(ŷ_t - ŷ_{t-1}, 0))`` of the last forward (the paper's
        behavioural expectation calibrator, weight 0.6 as its code)."""
        if not self._probs:
            raise ValueError("AITM.calibration_loss: run a forward pass first")
        p = self._probs
        return weight * sum(((p[i] - p[i - 1]).clamp_min(0).mean() for i in range(1, len(p))),
                            p[0].new_zeros(()))

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        yield from self.out[task].parameters()
        if task in self.ait:
            yield from self.ait[task].parameters()
        if task == self.tasks[-1]:
            yield from self.towers[task].parameters()

    def _no_features_reason(self) -> str | None:
        return "each AITM task reads its own tower"
