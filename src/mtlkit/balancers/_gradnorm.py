"""Gradient-magnitude balancing: GradNorm and the static gradient-norm scaling."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.balancers._base import GramianWeighting, LastLayerWeighting, positive
from mtlkit.balancers._functional import InnerAdam, safe_row_norms
from mtlkit.balancers._registry import register
from mtlkit.balancers._scaling import LOSS_FLOOR

#: Smallest task weight before GradNorm's renormalisation (weights stay positive).
MIN_WEIGHT = 1e-3


@register("gradnorm")
class GradNorm(LastLayerWeighting):
    r"""GradNorm: learn loss weights that bring every task's gradient norm at the last shared
    layer to a common value, scaled by how slowly the task is training.

    Proposed in Chen, Badrinarayanan, Lee & Rabinovich, *GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks* (ICML 2018, arXiv:1711.02257),
    Algorithm 1. With W the last shared layer, :math:`G_k = \|\nabla_W\, w_k L_k\| = w_k
    \|\nabla_W L_k\|`, :math:`\bar G = \frac1K \sum_k G_k`, the loss ratio
    :math:`\tilde L_k = L_k(t) / L_k(0)` and the relative inverse training rate
    :math:`r_k = \tilde L_k / \frac1K\sum_j \tilde L_j`:

    .. math::  L_{grad} = \sum_k \big| G_k - \bar G\, r_k^{\alpha} \big|_1, \qquad
        \frac{\partial L_{grad}}{\partial w_k} = \mathrm{sign}\big(G_k - \bar G r_k^\alpha\big)
        \, \|\nabla_W L_k\|,

    the target :math:`\bar G r_k^\alpha` being a constant. The model is updated with one backward
    pass of :math:`\sum_k w_k(t) L_k`; then the weights take one step of their own optimiser on
    :math:`L_{grad}` and are renormalised to :math:`\sum_k w_k = K`. Because
    :math:`\|\nabla_W\, w_k L_k\| = w_k \|\nabla_W L_k\|`, the gradient of :math:`L_{grad}` is
    exact without a double backward: the only extra work is one vectorised backward from the K
    losses down to W (through the heads and W, not the trunk below it).

    **Which layer is W.** ``shared`` (as passed to :meth:`backward`) is an ordered list of
    tensors; W is its trailing part. By default (``last_shared=None``) W starts at the last
    tensor with two or more dimensions (the last weight matrix or convolution kernel) and
    includes everything after it (its bias, a following norm layer's affine parameters). An
    integer ``last_shared=n`` takes exactly the last n tensors instead. "Last" is in the order
    of ``shared`` (for ``module.parameters()``, registration order), which is not always the
    order of computation: in a residual block that registers its shortcut projection last, the
    default picks the shortcut; pass ``last_shared`` (or order ``shared``) to choose.

    .. note:: The paper leaves the weights' optimiser open; here they have their own Adam
       (learning rate ``lr``, betas (0.9, 0.999)), whose moments are buffers of this module,
       so the step size does not depend on the scale of the gradient norms. Weights are clamped
       at 1e-3 before the renormalisation, so they stay positive (a plain renormalisation
       lets them go negative). :math:`L_k(0)` is the loss of the first step. The loss ratios
       assume positive losses; losses are floored at 1e-12 in them.

    Args:
        tasks: task names.
        alpha: asymmetry :math:`\alpha \ge 0` (paper: 1.5 on NYUv2; 0 equalises the norms).
        lr: learning rate of the weights' Adam (default 0.025).
        last_shared: number of trailing tensors of ``shared`` forming W, or None (see above).

    State:
        ``task_weights`` (K,) the weights :math:`w_k`; ``initial_losses`` (K,)
        :math:`L_k(0)`; ``adam`` the weights' :class:`~mtlkit.balancers._functional.InnerAdam`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._gradnorm import GradNorm
        >>> trunk, head = torch.nn.Linear(2, 2), torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> x = torch.tensor([[1.0, 0.0]])
        >>> z = (trunk(x) @ head).pow(2) + 1
        >>> b = GradNorm(["a", "b"], alpha=1.5, lr=0.1)
        >>> b.backward({"a": z, "b": 3 * z}, shared=trunk.parameters()).weights
        {'a': 1.0, 'b': 1.0}
        >>> [round(w, 4) for w in b.task_weights.tolist()]  # the larger gradient loses weight
        [1.1, 0.9]
    """

    task_weights: Tensor
    initial_losses: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        alpha: float = 1.5,
        lr: float = 0.025,
        last_shared: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        self.alpha = positive("alpha", alpha, allow_zero=True)
        self.lr = positive("lr", lr)
        if last_shared is not None and (
            isinstance(last_shared, bool) or int(last_shared) != last_shared or last_shared < 1
        ):
            raise ValueError(f"last_shared must be a positive integer or None, got {last_shared!r}")
        self.last_shared = None if last_shared is None else int(last_shared)
        k = self.num_tasks
        self.register_buffer("task_weights", torch.ones(k))
        self.register_buffer("initial_losses", torch.ones(k))
        self.adam = InnerAdam(k, lr=self.lr)

    def select_layer(self, shared: list[Tensor]) -> list[Tensor]:
        if self.last_shared is not None:
            if self.last_shared > len(shared):
                raise ValueError(
                    f"gradnorm: last_shared={self.last_shared} but shared has only "
                    f"{len(shared)} tensors"
                )
            return shared[-self.last_shared :]
        return super().select_layer(shared)

    def layer_objective(
        self, losses: Tensor, values: Tensor, grads: list[Tensor], context: Mapping[str, Any]
    ) -> tuple[Tensor, Tensor]:
        k = self.num_tasks
        weights = self.task_weights.to(losses.dtype).clone()
        with torch.no_grad():
            norms = safe_row_norms(torch.cat([g.reshape(k, -1).float() for g in grads], dim=1))
            values = values.float().clamp_min(LOSS_FLOOR)
            first = self.step == 0
            self.initial_losses.copy_(torch.where(first, values, self.initial_losses))
            ratio = values / self.initial_losses.clamp_min(LOSS_FLOOR)
            inverse_rate = ratio / ratio.mean().clamp_min(LOSS_FLOOR)
            current = self.task_weights * norms
            target = current.mean() * inverse_rate.pow(self.alpha)
            updated = self.task_weights.clone()
            self.adam.step(updated, torch.sign(current - target) * norms)
            updated = updated.clamp_min(MIN_WEIGHT)
            self.task_weights.copy_(updated * (k / updated.sum()))
        return losses @ weights.detach(), weights.detach()

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, lr={self.lr}, last_shared={self.last_shared}"


@register("grad_norm_scaling")
class GradNormScaling(GramianWeighting):
    r"""Gradient-norm scaling, :math:`w_k = 1 / \mathrm{stop\_grad}(\|g_k\|)`: every task
    contributes a unit vector, :math:`d = \sum_k g_k / \|g_k\|`.

    The static form of gradient-magnitude balancing (what GradNorm's :math:`\alpha = 0` target
    aims at, reached in one step), and the ``"l2"`` gradient normalisation of Sener & Koltun's
    MGDA code used on its own. The norms are the square roots of the Gram matrix's diagonal,
    computed on the device with no host transfer; ``grad_on="features"`` makes it nearly as
    cheap as a plain sum.

    .. note:: A common baseline rather than the method of one paper; we know of no canonical
       reference for it. A task whose gradient is exactly zero gets weight 0.

    Args:
        tasks: task names.
        grad_on, strategy, chunk_size, check_finite: see :class:`GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._gradnorm import GradNormScaling
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> g1, g2 = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.5])
        >>> step = GradNormScaling(["a", "b"]).backward([p @ g1, p @ g2], shared=[p])
        >>> {t: round(w, 4) for t, w in step.weights.items()}
        {'a': 0.2, 'b': 2.0}
        >>> p.grad
        tensor([0.6000, 1.8000])
    """

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        norms = gramian.double().diagonal().clamp_min(0).sqrt()
        inv = 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny)
        return torch.where(norms > 0, inv, 0.0).to(gramian.dtype)
