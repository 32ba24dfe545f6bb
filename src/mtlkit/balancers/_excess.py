"""ExcessMTL: task weights driven by each task's estimated excess risk (a pure update,
:func:`excess_risks`, and the stateful class)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.balancers._base import JacobianAggregator, positive
from mtlkit.balancers._registry import register


def excess_risks(jacobian: Tensor, sq_grad_sum: Tensor) -> Tensor:
    r"""The excess-risk proxy of each task, :math:`g_k^\top H_k^{-1} g_k` with the diagonal
    AdaGrad preconditioner :math:`H_k = \mathrm{diag}(\sqrt{S_k})`, :math:`S_k` the running sum
    of :math:`g_k^2` (this step included). Coordinates where :math:`S_k = 0` contribute 0.

    Computed one task at a time, so that the temporaries are of size P, not K x P.

    Args:
        jacobian: (K, P) task gradients.
        sq_grad_sum: (K, P) running sum of their squares.
    """
    out = jacobian.new_empty(jacobian.shape[0])
    for k, (g, s) in enumerate(zip(jacobian, sq_grad_sum)):
        # g^2 / sqrt(s); where s = 0, g = 0 too and 0 * inf gives nan: count it as 0
        ratio = s.rsqrt().mul_(g).mul_(g).nan_to_num_(nan=0.0)
        out[k] = ratio.sum()
    return out


@register("excess_mtl")
class ExcessMTL(JacobianAggregator):
    r"""ExcessMTL: weigh each task by its excess risk (its distance to its own optimum) with
    exponentiated-gradient updates, so that tasks far from convergence get more weight.

    Proposed in He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, *Robust Multi-Task Learning with
    Excess Risks* (ICML 2024, arXiv:2402.02009), Algorithm 1. Each step, with
    :math:`S_k \mathrel{+}= g_k^2` (elementwise),

    .. math::  E_k = g_k^\top \mathrm{diag}(\sqrt{S_k})^{-1} g_k \ \text{(Eqs. 6-7)},\quad
        r_k = E_k / E_k^{(0)} \ \text{(Sec. 3.2)},\quad
        w_k \propto w_k \exp(\eta\, r_k) \ \text{(Eq. 9)}, \qquad d = \sum_k w_k g_k,

    where :math:`E^{(0)}` is the baseline excess risk: the first step's, or the mean over the
    first ``warmup_steps`` steps (during which the weights stay uniform). The weights start at
    :math:`1/K` and stay on the simplex.

    .. note:: The official code and LibMTL use the first step's raw :math:`E` (not divided by the
       baseline) in the first update, and add 1e-7 inside the square root and to the baseline;
       TorchJD follows them. Here the first update also uses :math:`r = E / E^{(0)} = 1` (the
       weights stay uniform), which makes the method invariant to the scale of each loss; this
       equals TorchJD with ``n_warmup_steps=1``. Coordinates or tasks with a zero sum count 0
       instead of being divided by 1e-7. The weights are kept as log-weights (no underflow).
       The K x P squared-gradient sum is state: memory as large as the Jacobian.

    Args:
        tasks: task names.
        robust_step_size: :math:`\eta > 0` (default 1.0, as the official code).
        warmup_steps: steps of uniform weights whose mean excess risk is the baseline
            (default 0: the first step's; the paper's Appendix C.1 suggests three epochs).
        **options: engine options of :class:`~mtlkit.balancers.GradientBalancer`.

    State:
        ``sq_grad_sum`` (K, P), sized at the first step; ``log_weights`` (K,); ``baseline`` (K,),
        the sum of the warm-up excess risks until the baseline is set.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._excess import ExcessMTL
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> b = ExcessMTL(["a", "b"])
        >>> for scale_b in (1.0, 2.0):  # task b's gradient doubles: its excess risk doubles
        ...     p.grad = None
        ...     step = b.backward([p @ torch.tensor([1.0, 0.0]),
        ...                        p @ torch.tensor([0.0, scale_b])], shared=[p])
        >>> # risks (1/sqrt(2), 4/sqrt(5)) over the baseline (1, 1); weights 1/2 before
        >>> {t: round(w, 4) for t, w in step.weights.items()}
        {'a': 0.2532, 'b': 0.7468}
    """

    sq_grad_sum: Tensor
    log_weights: Tensor
    baseline: Tensor

    def __init__(self, tasks: Sequence[str], *, robust_step_size: float = 1.0,
                 warmup_steps: int = 0, **options: Any) -> None:
        super().__init__(tasks, **options)
        self.robust_step_size = positive("robust_step_size", robust_step_size)
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.warmup_steps = int(warmup_steps)
        k = self.num_tasks
        self.register_buffer("sq_grad_sum", torch.zeros(k, 0))
        self.register_buffer("log_weights", torch.full((k,), -math.log(k)))
        self.register_buffer("baseline", torch.zeros(k))

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        k, p = jacobian.shape
        if self.sq_grad_sum.shape[1] != p:
            if self.sq_grad_sum.shape[1] != 0:
                raise ValueError(f"excess_mtl accumulates task gradients of size "
                                 f"{self.sq_grad_sum.shape[1]}, but this step's have size {p}")
            self.sq_grad_sum = jacobian.new_zeros(k, p)
        self.sq_grad_sum.addcmul_(jacobian, jacobian)
        risks = excess_risks(jacobian, self.sq_grad_sum).to(self.baseline.dtype)
        t = int(self.step)  # completed steps
        if t < self.warmup_steps or (self.warmup_steps == 0 and t == 0):
            self.baseline.add_(risks)
        if t >= self.warmup_steps:
            base = self.baseline / max(self.warmup_steps, 1)
            ratio = torch.where(base > 0, risks / base.clamp_min(torch.finfo(base.dtype).tiny),
                                0.0)
            logits = self.log_weights + self.robust_step_size * ratio
            self.log_weights.copy_(logits - torch.logsumexp(logits, 0))
        weights = self.log_weights.exp().to(jacobian.dtype)
        return weights @ jacobian, weights

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        key = prefix + "sq_grad_sum"
        if key in state_dict and state_dict[key].shape != self.sq_grad_sum.shape:
            self.sq_grad_sum = torch.zeros_like(state_dict[key], device=self.sq_grad_sum.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (f"robust_step_size={self.robust_step_size}, warmup_steps={self.warmup_steps}, "
                f"{super().extra_repr()}")
