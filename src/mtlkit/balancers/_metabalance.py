"""MetaBalance: auxiliary-task gradients rescaled towards the target task's magnitude, per
block of shared parameters (a pure ``norms -> weights`` rule, :func:`metabalance_weights`, and
the stateful class)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.balancers._base import BlockGramianWeighting
from mtlkit.balancers._registry import register


def metabalance_weights(norm_ema: Tensor, target: int, relax: float) -> Tensor:
    r"""Per-block weights (B, K) from the moving averages of the gradient norms (B, K):
    :math:`w_{b,k} = r\, m_{b,\mathrm{tar}} / m_{b,k} + (1 - r)` for every auxiliary task, 1 for
    the target task. An auxiliary task with a zero average (its gradient has always been zero in
    that block, so its weight multiplies zero) gets weight 1."""
    ratio = norm_ema[:, target : target + 1] / norm_ema.clamp_min(torch.finfo(norm_ema.dtype).tiny)
    weights = torch.where(norm_ema > 0, relax * ratio + (1.0 - relax), 1.0)
    weights[:, target] = 1.0
    return weights


@register("metabalance")
class MetaBalance(BlockGramianWeighting):
    r"""MetaBalance: for auxiliary tasks that serve one target task, bring each auxiliary
    gradient's magnitude closer to the target gradient's, separately in every block of shared
    parameters.

    Proposed in He, Feng, Cheng, Ji, Guo & Caverlee, *MetaBalance: Improving Multi-Task
    Recommendations via Adapting Gradient Magnitudes of Auxiliary Tasks* (WWW 2022,
    arXiv:2203.06801), Algorithm 1. In each block b (one shared parameter tensor) and for each task
    k, a moving average of the gradient norm
    :math:`m_{b,k} \leftarrow \beta m_{b,k} + (1 - \beta)\|g^{(b)}_k\|` (from 0) sets the update

    .. math::  d^{(b)} = g^{(b)}_{\mathrm{tar}} + \sum_{k \ne \mathrm{tar}}
        \Big(r\,\frac{m_{b,\mathrm{tar}}}{m_{b,k}} + 1 - r\Big) g^{(b)}_k,

    so with the relax factor :math:`r = 1` every auxiliary gradient gets the target's (averaged)
    magnitude in every block, and with :math:`r = 0` the update is the plain sum. The norms come
    from the diagonals of the per-block Gram matrices (a block Gram weighting).

    .. note:: Defaults :math:`r = 0.7`, :math:`\beta = 0.9`, as the authors' code (the paper
       tunes r per dataset). The paper also studies adapting only the auxiliary gradients larger
       (or only those smaller) than the target's; here all are adapted, as the authors' code. The average starts at
       0 without bias correction, which leaves the ratios unchanged at the first step. An
       auxiliary task whose averaged norm is 0 in a block gets weight 1 there (its gradient is
       zero). MetaBalance has no TorchJD or LibMTL counterpart. The reported effective weight of
       a task blends its per-block weights by its squared gradient norm in each block.

    Args:
        tasks: task names.
        target: the target task (default the first task); the others are auxiliary.
        relax_factor: :math:`r \in [0, 1]` (default 0.7).
        beta: :math:`\beta \in [0, 1)` (default 0.9).
        **options: engine options of :class:`~mtlkit.balancers.GradientBalancer`.

    State:
        ``norm_ema`` (B, K), the averaged gradient norm of each task in each block; sized at the
        first step.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._metabalance import MetaBalance
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> b = MetaBalance(["buy", "click"], relax_factor=1.0)
        >>> step = b.backward([p @ torch.tensor([1.0, 0.0]), p @ torch.tensor([0.0, 4.0])],
        ...                   shared=[p])
        >>> step.weights  # the auxiliary gradient is scaled to the target's norm
        {'buy': 1.0, 'click': 0.25}
        >>> p.grad
        tensor([1., 1.])
    """

    norm_ema: Tensor

    def __init__(self, tasks: Sequence[str], *, target: str | None = None,
                 relax_factor: float = 0.7, beta: float = 0.9, **options: Any) -> None:
        super().__init__(tasks, **options)
        target = self.tasks[0] if target is None else target
        if target not in self.tasks:
            raise ValueError(f"target must be one of the tasks {list(self.tasks)}, got {target!r}")
        self.target = target
        relax_factor, beta = float(relax_factor), float(beta)
        if not 0.0 <= relax_factor <= 1.0:
            raise ValueError(f"relax_factor must be in [0, 1], got {relax_factor}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.relax_factor = relax_factor
        self.beta = beta
        self.register_buffer("norm_ema", torch.zeros(0, self.num_tasks))

    def block_weights(self, gramians: Tensor, losses: Tensor) -> Tensor:
        b = gramians.shape[0]
        if self.norm_ema.shape[0] != b:
            if self.norm_ema.shape[0] != 0:
                raise ValueError(f"metabalance averages norms over {self.norm_ema.shape[0]} "
                                 f"blocks of shared parameters, but this step has {b}")
            self.norm_ema = gramians.new_zeros(b, self.num_tasks)
        norms = gramians.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        self.norm_ema.mul_(self.beta).add_((1.0 - self.beta) * norms.to(self.norm_ema.dtype))
        target = self.tasks.index(self.target)
        return metabalance_weights(self.norm_ema, target, self.relax_factor)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        key = prefix + "norm_ema"
        if key in state_dict and state_dict[key].shape != self.norm_ema.shape:
            self.norm_ema = torch.zeros_like(state_dict[key], device=self.norm_ema.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (f"target={self.target!r}, relax_factor={self.relax_factor}, beta={self.beta}, "
                f"{super().extra_repr()}")
