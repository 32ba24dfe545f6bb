"""Stochastic multi-objective methods: MoCo (tracked gradients), MoDo and SDMGrad (two
independent mini-batches).

MoDo and SDMGrad weigh the tasks from :math:`A = J_1 J_2^\\top`, the cross products of the task
gradients of two *independent* mini-batches (an unbiased estimate of :math:`J J^\\top`, which
the Gram matrix of one batch is not). Their ``backward`` takes the second batch's task losses as
``second_losses=``; the class attribute ``needs_second_batch`` tells the trainer to draw it.
The update is :math:`\\sum_k w_k (g^{(1)}_k + g^{(2)}_k) / 2` (both batches' gradients, as the
two-batch form of MoDo), and each head receives the mean of its own loss's gradients on the two
batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from mtlkit.balancers._base import (
    BalanceStep,
    GramianWeighting,
    JacobianAggregator,
    positive,
)
from mtlkit.balancers._registry import register
from mtlkit.engine import task_gradients
from mtlkit.engine._grads import auto_strategy, graph_has, graph_nodes, unit_scale


# ---------------------------------------------------------------------------- pure functions
def project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of a vector onto the probability simplex (sort-based, no host
    synchronisation).

    >>> project_simplex(torch.tensor([2.0, 0.0, 0.5])).tolist()
    [1.0, 0.0, 0.0]
    """
    n = v.numel()
    # The projection commutes with adding a constant to every entry: shift the largest to 0,
    # so that entries of 1e27 keep their differences exact.
    v = v - v.max()
    u = torch.sort(v, descending=True).values
    css = u.cumsum(0) - 1
    idx = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    # The entries kept positive form a prefix of the sorted vector; its length k >= 1.
    k = (u - css / idx > 0).sum().clamp_min(1)
    theta = css.gather(0, (k - 1).reshape(1)) / k.to(v.dtype)
    return (v - theta).clamp_min(0)


def modo_step(weights: Tensor, cross: Tensor, gamma: float, rho: float) -> Tensor:
    r"""MoDo's weight update :math:`\Pi_\Delta(\lambda - \gamma (A \lambda + \rho \lambda))`.

    >>> modo_step(torch.tensor([0.5, 0.5]), torch.eye(2), 0.1, 0.0).tolist()
    [0.5, 0.5]
    """
    return project_simplex(weights - gamma * (cross @ weights + rho * weights))


def sdmgrad_solve(
    weights: Tensor, cross: Tensor, lambda_: float, lr: float, momentum: float, n_iter: int,
    preference: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""SDMGrad's inner solver: ``n_iter`` steps of projected heavy-ball SGD from ``weights`` on
    :math:`\tfrac12 \lVert G w + \lambda g_0 \rVert^2` over the simplex, with the stochastic
    gradient :math:`\hat A (w + \lambda \tilde w)` (:math:`\hat A` is ``cross`` divided by the
    mean of the square roots of its non-negative diagonal, :math:`\tilde w` the preference).

    Returns (the new simplex weights w, the update's weights :math:`(w + \lambda \tilde w) /
    (1 + \lambda)`).

    >>> w, eff = sdmgrad_solve(torch.tensor([0.5, 0.5]), torch.eye(2), 0.3, 10.0, 0.5, 20)
    >>> eff.tolist()
    [0.5, 0.5]
    """
    k = cross.shape[0]
    pref = torch.full((k,), 1.0 / k, dtype=cross.dtype, device=cross.device) \
        if preference is None else preference.to(cross)
    scale2 = cross.diagonal().clamp_min(0).sqrt().mean().square()
    # Divided only where the scale is positive (the authors add 1e-8, which freezes the
    # weights for gradients below 1e-4).
    a = cross / torch.where(scale2 > 0, scale2, torch.ones_like(scale2))
    velocity = torch.zeros_like(weights)
    for i in range(n_iter):
        grad = a @ (weights + lambda_ * pref)
        velocity = grad if i == 0 else momentum * velocity + grad
        weights = project_simplex(weights - lr * velocity)
    return weights, (weights + lambda_ * pref) / (1 + lambda_)


def moco_step(
    tracked: Tensor, weights: Tensor, grads: Tensor, beta: float, gamma: float, rho: float
) -> tuple[Tensor, Tensor]:
    r"""One MoCo step: :math:`Y \leftarrow Y - \beta (Y - G)`, then
    :math:`\lambda \leftarrow \Pi_\Delta(\lambda - \gamma (Y Y^\top + \rho I) \lambda)`.

    Returns (the new tracked gradients Y (K, P), the new weights (K,)); the update is
    :math:`Y^\top \lambda`.

    >>> y, lam = moco_step(torch.zeros(2, 2), torch.tensor([0.5, 0.5]), torch.eye(2), 1.0, 0.1, 0.0)
    >>> lam.tolist()
    [0.5, 0.5]
    """
    tracked = tracked - beta * (tracked - grads)
    gram = tracked @ tracked.T
    weights = project_simplex(weights - gamma * (gram @ weights + rho * weights))
    return tracked, weights


# ---------------------------------------------------------------------------- two batches
def _gram_and_cross(first: Sequence[Tensor], second: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """(:math:`J_1 J_1^\top`, :math:`J_1 J_2^\top`), float64, from two lists of (K, ...) blocks
    (one per parameter). Each batch's blocks are divided by its largest magnitude before the
    products (in the blocks' precision, at least float32), and the scales restored in float64:
    finite for every finite gradient, with one temporary block at a time.

    >>> a, b = [torch.tensor([[1.0, 0.0], [0.0, 2.0]])], [torch.tensor([[2.0, 1.0], [1.0, 1.0]])]
    >>> [m.tolist() for m in _gram_and_cross(a, b)]
    [[[1.0, 0.0], [0.0, 4.0]], [[2.0, 1.0], [2.0, 2.0]]]
    """
    k = first[0].shape[0]
    dtype = torch.float64 if first[0].dtype == torch.float64 else torch.float32
    s1, s2 = (unit_scale(torch.stack(torch._foreach_norm(list(blocks), float("inf"))), dtype)
              for blocks in (first, second))
    gram = torch.zeros((k, k), dtype=torch.float64, device=first[0].device)
    cross = torch.zeros_like(gram)
    for a, b in zip(first, second):
        a = a.reshape(k, -1).to(dtype) / s1
        b = b.reshape(k, -1).to(dtype) / s2
        gram += (a @ a.T).double()
        cross += (a @ b.T).double()
    return gram * s1.double() ** 2, cross * (s1.double() * s2.double())


def _graphs_overlap(first: Sequence[Tensor], second: Sequence[Tensor]) -> bool:
    """Whether the autograd graphs of two lists of losses share a node (leaves aside): a
    backward pass that frees the first graph would then break the second's."""
    nodes = set(graph_nodes(first))
    return bool(nodes) and graph_has(second, nodes.__contains__)


class _TwoBatchBalancer(GramianWeighting):
    """A gradient method that weighs the tasks from two independent mini-batches (see the
    module docstring): ``backward(losses, shared=..., second_losses=...)``. Hook:
    :meth:`cross_weights`."""

    #: The trainer draws a second, independent batch and passes its losses as ``second_losses``.
    needs_second_batch: ClassVar[bool] = True
    context_keys: ClassVar[tuple[str, ...]] = ("second_losses",)
    _hooks = ("cross_weights",)

    def __init__(self, tasks: Sequence[str], **options: Any) -> None:
        super().__init__(tasks, **options)
        if self.grad_on != "parameters":
            raise ValueError(
                f"{type(self).__name__} needs grad_on='parameters': the two batches have "
                "different shared representations"
            )

    def _validate_context(self, context: Mapping[str, Any]) -> None:
        if "second_losses" not in context:
            raise ValueError(
                f"{type(self).__name__} needs second_losses=<the task losses of a second, "
                "independent mini-batch> in backward() (the trainer draws one when "
                "balancer.needs_second_batch)"
            )
        self._check_losses(context["second_losses"])

    def cross_weights(self, cross: Tensor) -> Tensor:
        """Weights (K,) from :math:`A = J_1 J_2^\\top` (K x K float64, not symmetric in
        general)."""
        raise NotImplementedError

    def _balance(self, items: list[Tensor], stacked: Tensor, values: Tensor,
                 shared: Any, features: Tensor | None,
                 context: Mapping[str, Any]) -> BalanceStep:
        shared = self._shared_list(shared)
        second = self._loss_list(context["second_losses"])
        second_values = self._loss_values(torch.stack(second).detach())
        # Halved losses: every head receives the mean of its loss's gradients on the two
        # batches, and the weights w on each batch's halves give sum_k w_k (g1_k + g2_k) / 2.
        # One engine call per batch: a backward pass of one batch's losses never runs through
        # the other batch's graph. The first call keeps its graph only when the second batch's
        # graph shares nodes with it (e.g. the same losses passed twice).
        # "auto" chooses as for the K tasks of one batch (on CPU: a loop for few tasks).
        strategy, chunk = self.strategy, self.chunk_size
        if strategy == "auto":
            strategy, chunk = auto_strategy(len(items), shared[0].device.type, chunk)
        # Under a gradient scaler the losses carry its scale (Balancer.backward): the blocks
        # and the update written are scaled, the cross Gram matrix is read unscaled.
        scale = self._loss_scale
        half = 0.5 if scale is None else 0.5 * scale
        halves = [[half * loss for loss in batch] for batch in (items, second)]
        grads = [task_gradients(losses, shared, None, grad_on="parameters", strategy=strategy,
                                chunk_size=chunk, need_jacobian=True, need_gramian=False,
                                retain_graph=i == 0 and _graphs_overlap(items, second))
                 for i, losses in enumerate(halves)]
        with torch.no_grad():
            k = self.num_tasks
            gramian, cross = _gram_and_cross(grads[0].blocks, grads[1].blocks)
            gramian, cross = 4 * gramian, 4 * cross
            if scale is not None:
                cross = cross / scale.double() ** 2
                if not bool(torch.isfinite(cross).all()):  # overflow: the scaler skips
                    for g in grads:
                        g.apply_weights(torch.ones(k, dtype=values.dtype, device=values.device))
                    nan = torch.full_like(values, float("nan"))
                    return BalanceStep(self.tasks, nan.sum(), nan, cross)
            weights = self.cross_weights(cross)
            for g in grads:
                g.apply_weights(weights)
            weights = weights.to(values.dtype)
            if scale is not None:
                gramian = gramian / scale.double() ** 2
        mean_values = (values + second_values) / 2
        return BalanceStep(self.tasks, (weights * mean_values).sum(), weights, gramian)


@register("modo")
class MoDo(_TwoBatchBalancer):
    r"""MoDo: Multi-Objective gradient with DOuble sampling.

    Proposed in Chen, Fernando, Ying & Chen, *Three-Way Trade-Off in Multi-Objective Learning:
    Optimization, Generalization and Conflict-Avoidance* (NeurIPS 2023, arXiv:2305.20057),
    Algorithm 1: with :math:`A = J_{z_1} J_{z_2}^\top` from two independent batches,

    .. math:: \lambda_{t+1} = \Pi_\Delta\big(\lambda_t - \gamma (A \lambda_t + \rho \lambda_t)
       \big), \qquad d_t = \tfrac12 (J_{z_1} + J_{z_2})^\top \lambda_{t+1}.

    :math:`\lambda` moves a little each step towards the min-norm (MGDA) weights of the
    expected Gram matrix, without the bias a single batch's Gram matrix has.

    Args:
        tasks: task names.
        gamma: step size :math:`\gamma > 0` of the weights (LibMTL's port of the official
            code: 1e-3).
        rho: :math:`\ell_2` regularisation :math:`\rho \ge 0` of the weights (official: 0.1).
        grad_on, strategy, chunk_size, check_finite: engine options (see
            :class:`~mtlkit.balancers.GradientBalancer`); only ``grad_on="parameters"``.

    State:
        ``weights`` (K,): :math:`\lambda`, on the simplex, uniform at the start.

    .. note:: The paper's algorithm draws a third batch for the update; here the update uses the
       two batches that gave the weights (the two-batch form, one forward fewer).

    Example:
        >>> import torch
        >>> b = MoDo(["a", "b"], gamma=0.1, rho=0.0)
        >>> w = torch.ones(2, requires_grad=True)
        >>> step = b.backward({"a": w[0], "b": 2 * w[1]}, shared=[w],
        ...                   second_losses={"a": w[0], "b": 2 * w[1]})
        >>> [round(v, 4) for v in step.weight_tensor.tolist()]
        [0.575, 0.425]
    """

    weights: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        gamma: float = 1e-3,
        rho: float = 0.1,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        self.gamma = positive("gamma", gamma)
        self.rho = positive("rho", rho, allow_zero=True)
        k = self.num_tasks
        self.register_buffer("weights", torch.full((k,), 1.0 / k, dtype=torch.float64))

    def cross_weights(self, cross: Tensor) -> Tensor:
        new = modo_step(self.weights, cross.double(), self.gamma, self.rho)
        self.weights.copy_(new)
        return new

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, rho={self.rho}"


@register("sdmgrad")
class SDMGrad(_TwoBatchBalancer):
    r"""SDMGrad: stochastic direction-oriented multi-objective gradient descent.

    Proposed in Xiao, Ban & Ji, *Direction-oriented Multi-objective Learning: Simple and
    Provable Stochastic Algorithms* (NeurIPS 2023, arXiv:2305.18409), Algorithm 1: the weights
    minimise :math:`\tfrac12 \lVert J^\top w + \lambda g_0 \rVert^2` over the simplex
    (:math:`g_0 = J^\top \tilde w`, the mean gradient for a uniform preference), by projected
    SGD whose stochastic gradient :math:`J_{\xi} J_{\xi'}^\top (w + \lambda \tilde w)` uses two
    independent batches; the update is :math:`J^\top (w + \lambda \tilde w) / (1 + \lambda)`.
    :math:`\lambda = 0` is a stochastic MGDA; a large :math:`\lambda` tends to the mean gradient.

    Args:
        tasks: task names.
        lambda_: :math:`\lambda \ge 0`, the pull towards :math:`g_0` (the authors' experiments:
            0.3).
        lr: step size of the inner solver (10, as TorchJD's port of the official solver; LibMTL
            uses 5).
        momentum: heavy-ball momentum of the inner solver (0.5).
        n_iter: inner iterations per step (20).
        grad_on, strategy, chunk_size, check_finite: engine options; only
            ``grad_on="parameters"``.

    State:
        ``weights`` (K,): the simplex weights :math:`w`, warm-started from the last step.

    .. note:: As the official code, :math:`A` is divided by the squared mean of the square roots
       of its non-negative diagonal, so the inner step size does not depend on the gradients'
       scale (without its +1e-8, which would freeze the weights for tiny gradients). The update
       uses the two batches that gave the weights, not a third one. With the default inner step
       (as the official solver's) the last iterate can bounce between faces of the simplex
       rather than settle at the minimiser; a small ``lr`` with more iterations solves the
       problem (the example: the closed form [0.8, 0.2]).

    Example:
        >>> import torch
        >>> b = SDMGrad(["a", "b"], lr=0.1, n_iter=200)
        >>> w = torch.ones(2, requires_grad=True)
        >>> step = b.backward({"a": w[0], "b": 2 * w[1]}, shared=[w],
        ...                   second_losses={"a": w[0], "b": 2 * w[1]})
        >>> [round(v, 4) for v in step.weight_tensor.tolist()]
        [0.8, 0.2]
    """

    weights: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        lambda_: float = 0.3,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        self.lambda_ = positive("lambda_", lambda_, allow_zero=True)
        self.lr = positive("lr", lr)
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)
        if isinstance(n_iter, bool) or int(n_iter) != n_iter or n_iter < 1:
            raise ValueError(f"n_iter must be an integer >= 1, got {n_iter!r}")
        self.n_iter = int(n_iter)
        k = self.num_tasks
        self.register_buffer("weights", torch.full((k,), 1.0 / k, dtype=torch.float64))

    def cross_weights(self, cross: Tensor) -> Tensor:
        w, eff = sdmgrad_solve(self.weights, cross.double(), self.lambda_, self.lr,
                               self.momentum, self.n_iter)
        self.weights.copy_(w)
        return eff

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}, lr={self.lr}, n_iter={self.n_iter}"


# ---------------------------------------------------------------------------- MoCo
@register("moco")
class MoCo(JacobianAggregator):
    r"""MoCo: MGDA on tracked (moving-average) task gradients, to remove the bias of stochastic
    MGDA.

    Proposed in Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, *Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach* (ICLR 2023, arXiv:2210.12624),
    Algorithm 1: with step t = 1, 2, ..., :math:`\beta_t = \beta / t^{\sigma_\beta}` and
    :math:`\gamma_t = \gamma / t^{\sigma_\gamma}`,

    .. math:: Y \leftarrow Y - \beta_t (Y - G_t), \qquad
       \lambda \leftarrow \Pi_\Delta\big(\lambda - \gamma_t (Y Y^\top + \rho I)\lambda\big),
       \qquad d = Y^\top \lambda .

    Args:
        tasks: task names.
        beta, beta_sigma: step size of the tracking and its decay exponent (0.5, 0.5).
        gamma, gamma_sigma: step size of the weights and its decay exponent (0.1, 0.5).
        rho: :math:`\ell_2` regularisation of the weights (0).
        normalize: replace each task gradient by :math:`L_k g_k / \lVert g_k\rVert` before
            tracking, as the authors' multi-task code (default False: the paper's raw gradients;
            with it, a task whose loss is 0 contributes nothing).
        grad_on, strategy, chunk_size, check_finite: engine options; only
            ``grad_on="parameters"`` (the tracked gradients live in parameter space).

    State:
        ``tracked`` (K, P): Y, sized at the first step; ``weights`` (K,): :math:`\lambda`.
        Both are saved in ``state_dict`` (Y costs K times the shared parameters' memory).

    .. note:: The defaults are those of LibMTL's port of the authors' code, which projects with a
       softmax; here :math:`\lambda` is projected onto the simplex as in the paper. The reported
       weights are :math:`\lambda`, the weights of the *tracked* gradients.

    Example:
        >>> import torch
        >>> b = MoCo(["a", "b"])
        >>> w = torch.ones(2, requires_grad=True)
        >>> step = b.backward({"a": w[0], "b": 2 * w[1]}, shared=[w])
        >>> [round(v, 4) for v in step.weight_tensor.tolist()]
        [0.5188, 0.4812]
    """

    tracked: Tensor
    weights: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        normalize: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        if self.grad_on != "parameters":
            raise ValueError("MoCo needs grad_on='parameters': it tracks parameter gradients")
        self.beta = positive("beta", beta)
        if self.beta > 1:
            raise ValueError(f"beta must be in (0, 1], got {beta}")
        self.beta_sigma = positive("beta_sigma", beta_sigma, allow_zero=True)
        self.gamma = positive("gamma", gamma)
        self.gamma_sigma = positive("gamma_sigma", gamma_sigma, allow_zero=True)
        self.rho = positive("rho", rho, allow_zero=True)
        self.normalize = bool(normalize)
        k = self.num_tasks
        self.register_buffer("tracked", torch.zeros(k, 0))
        self.register_buffer("weights", torch.full((k,), 1.0 / k, dtype=torch.float64))

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str,
                              *args: Any, **kwargs: Any) -> None:
        # Y is sized at the first step: take the saved size before the copy.
        saved = state_dict.get(prefix + "tracked")
        if isinstance(saved, Tensor) and saved.shape != self.tracked.shape:
            self.tracked = torch.zeros_like(saved, device=self.tracked.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        grads = jacobian.double()
        if self.normalize:
            norms = grads.norm(dim=1, keepdim=True)
            unit = grads / torch.where(norms > 0, norms, torch.ones_like(norms))
            grads = unit * losses.double().unsqueeze(1)
        if self.tracked.shape != grads.shape:
            if self.tracked.numel():
                raise ValueError(
                    f"MoCo tracks gradients of {self.tracked.shape[1]} shared values, got "
                    f"{grads.shape[1]}: pass the same shared parameters at every step"
                )
            self.tracked = torch.zeros_like(grads, dtype=torch.float32)
        t = float(self.step) + 1
        tracked, weights = moco_step(
            self.tracked.double(), self.weights, grads, self.beta / t**self.beta_sigma,
            self.gamma / t**self.gamma_sigma, self.rho,
        )
        self.tracked.copy_(tracked)
        self.weights.copy_(weights)
        return (tracked.T @ weights).to(jacobian.dtype), weights

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, gamma={self.gamma}, rho={self.rho}, "
                f"normalize={self.normalize}")
