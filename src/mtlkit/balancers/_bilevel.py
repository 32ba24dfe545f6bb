"""Bilevel task weighting: Auto-Lambda (Liu, Li, Kuang & Davison 2022).

The weights are meta-learned: they move so that one virtual training step with them lowers the
losses on a held-out batch. ``backward`` therefore takes a closure that returns the held-out
batch's task losses at the *current* parameters (``held_out=``) and the parameters the virtual
step moves (``parameters=``); the class attribute ``needs_held_out_batch`` tells the trainer to
supply both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from mtlkit.balancers._base import LossWeighting, positive
from mtlkit.balancers._functional import InnerAdam
from mtlkit.balancers._registry import register
from mtlkit.engine import task_jacobian
from mtlkit.engine._dist import world_size

HeldOut = Callable[[], Mapping[str, Tensor]]


def lookahead_hypergradient(per_task: Sequence[Tensor], held_out_grad: Sequence[Tensor],
                            virtual_lr: float) -> Tensor:
    r"""d L_val(theta') / d lambda for theta' = theta - alpha sum_k lambda_k g_k: since theta' is
    linear in lambda, it is exactly :math:`-\alpha \langle g_k, \nabla L_{val}(\theta')\rangle`.

    ``per_task``: blocks (K, *shape) of the task gradients g_k; ``held_out_grad``: the blocks of
    the held-out gradient at theta'.

    >>> lookahead_hypergradient([torch.eye(2)], [torch.tensor([1.0, -2.0])], 0.5).tolist()
    [-0.5, 1.0]
    """
    k = per_task[0].shape[0]
    return -virtual_lr * sum(
        (b.reshape(k, -1).double() @ h.reshape(-1).double() for b, h in zip(per_task, held_out_grad)),
        torch.zeros(k, dtype=torch.float64, device=per_task[0].device),
    )


@register("auto_lambda")
class AutoLambda(LossWeighting):
    r"""Auto-Lambda: task weights meta-learned on a held-out batch by a one-step lookahead.

    Proposed in Liu, Li, Kuang & Davison, *Auto-Lambda: Disentangling Dynamic Task
    Relationships* (TMLR 2022, arXiv:2202.03091), eq. (3)-(5): with the training losses
    :math:`L_k` and weights :math:`\lambda`, a virtual step
    :math:`\theta' = \theta - \alpha \nabla_\theta \sum_k \lambda_k L_k(\theta)`, then
    :math:`\lambda` takes an Adam step along :math:`\nabla_\lambda \sum_{k \in P}
    L^{val}_k(\theta')` (P: the primary tasks), and the model is updated with
    :math:`\sum_k \lambda_k \nabla L_k` at the new :math:`\lambda`.

    Every parameter in ``parameters`` (heads included) receives :math:`\lambda_k \nabla L_k`
    of each task that reaches it, as in the paper's code.

    Args:
        tasks: task names.
        lr: Adam learning rate of :math:`\lambda` (the paper's dense-prediction experiments:
            1e-4).
        init: initial value of every :math:`\lambda_k` (paper: 0.1).
        virtual_lr: :math:`\alpha`, the step size of the virtual step (the paper uses the model
            optimiser's learning rate: set it to yours; default 1e-3, the trainer's).
        primary: the tasks whose held-out losses :math:`\lambda` serves (default: all, the
            multi-task setting; a subset for auxiliary learning).

    Call ``backward(losses, held_out=f, parameters=params)`` where ``f()`` runs the model on a
    held-out batch and returns its task losses (at whatever parameters the model holds when
    called), and ``params`` are the model's trainable parameters.

    State:
        ``weights`` (K,): :math:`\lambda`; ``adam``: its
        :class:`~mtlkit.balancers._functional.InnerAdam` (moments and step count).

    .. note:: The paper approximates the inner product
       :math:`\langle \nabla L_k(\theta), \nabla L^{val}(\theta')\rangle` by central finite
       differences of the training losses at :math:`\theta \pm \epsilon \nabla L^{val}`
       (two more forward passes of the training batch, as DARTS). Since :math:`\theta'` is
       linear in :math:`\lambda` the inner product is the exact hypergradient, and it is
       computed here from the per-task gradients of every parameter (one vectorised backward
       of the K losses, graph kept), before the one backward pass of the update. The virtual step is plain SGD (the official
       code also adds the momentum and weight decay of its SGD optimiser). The held-out batch
       is an independent batch of the *training* set in the trainer (as the official code,
       which shuffles a second copy of the training loader), which keeps the validation split
       for model selection only. The weights are not constrained, as in the paper.

    Example:
        >>> import torch
        >>> b = AutoLambda(["a", "b"], lr=0.01, virtual_lr=0.1)
        >>> w = torch.ones(2, requires_grad=True)
        >>> held_out = lambda: {"a": (w[0] - 2) ** 2, "b": (w[1] + 1) ** 2}
        >>> step = b.backward({"a": w[0] ** 2, "b": w[1] ** 2}, held_out=held_out, parameters=[w])
        >>> [round(v, 4) for v in step.weight_tensor.tolist()]
        [0.09, 0.11]
    """

    needs_held_out_batch: ClassVar[bool] = True
    context_keys: ClassVar[tuple[str, ...]] = ("held_out", "parameters")

    weights: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        lr: float = 1e-4,
        init: float = 0.1,
        virtual_lr: float = 1e-3,
        primary: Sequence[str] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        self.lr = positive("lr", lr)
        self.virtual_lr = positive("virtual_lr", virtual_lr)
        init = positive("init", init)
        if primary is None:
            primary = self.tasks
        if isinstance(primary, str) or not primary or any(t not in self.tasks for t in primary):
            raise ValueError(f"primary must name some of the tasks {list(self.tasks)}, "
                             f"got {primary!r}")
        self.primary = tuple(t for t in self.tasks if t in primary)
        self.register_buffer("weights", torch.full((self.num_tasks,), init))
        self.adam = InnerAdam(self.num_tasks, lr=self.lr)

    def _validate_context(self, context: Mapping[str, Any]) -> None:
        missing = [key for key in self.context_keys if key not in context]
        if missing:
            raise ValueError(
                f"AutoLambda needs {missing} in backward(): held_out=<a function returning the "
                "task losses of a held-out batch at the current parameters> and "
                "parameters=<the model's trainable parameters> (the trainer passes both when "
                "balancer.needs_held_out_batch)"
            )
        if not callable(context["held_out"]):
            raise TypeError("held_out must be a function returning the held-out task losses")
        params = context["parameters"]
        if isinstance(params, Tensor) or not isinstance(params, Iterable):
            raise TypeError("parameters must be an iterable of tensors")
        if world_size() > 1:
            raise NotImplementedError(
                "AutoLambda does not run under torch.distributed (its virtual step would "
                "need the held-out gradient of every rank)"
            )

    def objective(self, losses: Tensor, values: Tensor, context: Mapping[str, Any]
                  ) -> tuple[Tensor, Tensor]:
        params = [p for p in context["parameters"] if p.requires_grad]
        if not params:
            raise ValueError("parameters contains no tensor that requires grad")
        held_out: HeldOut = context["held_out"]
        # Per-task gradients of every parameter (graph kept for the update's backward pass).
        per_task = task_jacobian(list(losses.unbind()), params)
        # The virtual step swaps each parameter's data for theta' and back: an in-place update
        # would bump the version of tensors the kept graph saved, and its backward would refuse.
        with torch.no_grad():
            lam = self.weights.to(per_task[0].dtype)
            saved = [p.data for p in params]
            for p, b in zip(params, per_task):
                p.data = p.data - self.virtual_lr * torch.tensordot(lam, b, dims=1)
        try:  # at theta': the held-out losses and their gradient
            with torch.enable_grad():
                val = self._loss_list(held_out())
            self._loss_values(torch.stack(val).detach())  # finite, or a clear error
            target = torch.stack([v for t, v in zip(self.tasks, val) if t in self.primary]).sum()
            grad_val = torch.autograd.grad(target, params, allow_unused=True,
                                           materialize_grads=True)
        finally:
            for p, s in zip(params, saved):
                p.data = s
        with torch.no_grad():
            self.adam.step(self.weights, lookahead_hypergradient(per_task, grad_val,
                                                                 self.virtual_lr))
            weights = self.weights.to(losses.dtype)
        return losses @ weights, weights

    def extra_repr(self) -> str:
        return (f"lr={self.lr}, virtual_lr={self.virtual_lr}, "
                f"primary={list(self.primary)}")
