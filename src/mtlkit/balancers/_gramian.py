"""Weights from the Gram matrix of the task gradients: CAGrad, IMTL, Nash-MTL, Aligned-MTL,
UPGrad; and DB-MTL (which also keeps a moving average of the task gradients)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from mtlkit.balancers._base import GramianWeighting, JacobianAggregator, positive
from mtlkit.balancers._functional import (
    GRADIENT_EPS,
    cosine_gramian,
    normalize_gramian,
    numerical_rank,
    safe_row_norms,
)
from mtlkit.balancers._registry import register
from mtlkit.balancers._solvers import (
    BargainingFailure,
    cagrad_dual,
    lower_bounded_qp,
    nash_bargaining,
    to_host,
)


@register("cagrad")
class CAGrad(GramianWeighting):
    r"""Conflict-averse gradient descent: the direction within a ball around the average
    gradient that maximises the worst task's improvement.

    Proposed in Liu, Liu, Jin, Stone & Liu, *Conflict-Averse Gradient Descent for Multi-task
    Learning* (NeurIPS 2021, arXiv:2110.14048), Algorithm 1. With the mean gradient
    :math:`g_0 = \frac1K \sum_k g_k`:

    .. math::  \max_d \min_k \langle g_k, d\rangle \quad \text{s.t.}\quad
        \|d - g_0\| \le c\,\|g_0\|,

    solved through its dual :math:`w^\star = \arg\min_{w \in \Delta^K} \langle g_w, g_0\rangle
    + c\|g_0\|\,\|g_w\|` with :math:`g_w = \sum_k w_k g_k`, giving
    :math:`d = g_0 + \frac{c\|g_0\|}{\|g_w\|} g_w`, i.e. weights
    :math:`\frac1K + \frac{c\|g_0\|}{\|g_w\|} w^\star_k`, then divided by the ``rescale`` factor.
    The dual is solved exactly on the Gram matrix on the host (a root search over min-norm
    problems, see :func:`mtlkit.balancers._solvers.cagrad_dual`), after one K x K host transfer.

    .. note:: The official code solves the dual with SciPy's SLSQP, and TorchJD with cvxpy; the
       solver here is exact to rounding. When the optimum of the dual is the origin of the hull
       (``g_w = 0``, possible at a Pareto-stationary point), the direction is undefined: we
       return the mean gradient :math:`g_0` (then rescaled); TorchJD returns 0. ``rescale=1``
       (divide by :math:`1 + c^2`) is the default of the official code; the paper's Algorithm 1
       does not rescale (``rescale=0``, TorchJD's convention).

    Args:
        tasks: task names.
        c: radius :math:`c \ge 0` of the ball, relative to :math:`\|g_0\|` (paper: 0.4 on
            NYUv2 and Cityscapes). ``c = 0`` is the mean gradient.
        rescale: 0 (none), 1 (divide by :math:`1 + c^2`, default) or 2 (divide by
            :math:`1 + c`).
        grad_on, strategy, chunk_size, check_finite: see :class:`GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._gramian import CAGrad
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 1.0])
        >>> step = CAGrad(["a", "b"], c=0.4, rescale=0).backward([p @ g1, p @ g2], shared=[p])
        >>> {t: round(w, 4) for t, w in step.weights.items()}
        {'a': 0.7448, 'b': 0.6384}
        >>> torch.round(p.grad, decimals=4)
        tensor([0.4256, 0.6384])
    """

    def __init__(
        self,
        tasks: Sequence[str],
        c: float = 0.4,
        rescale: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        self.c = positive("c", c, allow_zero=True)
        if rescale not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}")
        self.rescale = int(rescale)

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        k = gramian.shape[0]
        g = to_host(gramian)
        w, lam = cagrad_dual(g, self.c)
        weights = 1.0 / k + lam * w
        if self.c >= 1 and (lam == 0 or bool(((g @ weights) < 0).any())):
            # With c >= 1 the ball contains d = 0, so the optimum conflicts with no task. A
            # conflicting solution means the hull holds the origin (up to rounding: no
            # direction improves every task, the optimal value is 0): d = 0 is optimal.
            return torch.zeros(k, dtype=gramian.dtype, device=gramian.device)
        if self.rescale == 1:
            weights = weights / (1 + self.c**2)
        elif self.rescale == 2:
            weights = weights / (1 + self.c)
        return weights.to(device=gramian.device, dtype=gramian.dtype, non_blocking=True)

    def extra_repr(self) -> str:
        return f"c={self.c}, rescale={self.rescale}, {super().extra_repr()}"


@register("imtl")
class IMTL(GramianWeighting):
    r"""Impartial multi-task learning: the update has the same projection on every task's unit
    gradient (IMTL-G), optionally with learned loss scales (IMTL-L).

    Proposed in Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, *Towards Impartial Multi-task
    Learning* (ICLR 2021, OpenReview IMPnRXEWpvr; there is no arXiv version). IMTL-G finds
    :math:`d = \sum_k \alpha_k g_k` with
    :math:`\sum_k \alpha_k = 1` and :math:`\langle d, g_k/\|g_k\|\rangle` equal for all k, whose
    closed form in terms of the Gram matrix is

    .. math::  \alpha = \frac{G^{+} n}{\mathbf 1^\top G^{+} n}, \qquad n_k = \|g_k\|,

    (the paper's expression with differences to the first task is the same solution when G is
    invertible; the pseudo-inverse extends it to dependent gradients, as in Quinton & Rey 2024).
    The direction of d does not change when a loss is multiplied by a constant. With
    ``loss_scale=True`` (IMTL-L, the paper's hybrid "IMTL"), each loss is replaced by
    :math:`e^{s_k} L_k - s_k` with a learnable :math:`s_k` (initialised at 0, a parameter of
    this module: give ``balancer.parameters()`` to the optimiser); :math:`s_k` then receives the
    gradient :math:`e^{s_k} L_k - 1` of its own task, and the heads the scaled gradients.

    .. note:: Computed on the device from the Gram matrix of the unit gradients
       (:math:`G^+ n = D^{-1} C^+ \mathbf 1` with :math:`C = D^{-1} G D^{-1}`,
       :math:`D = \mathrm{diag}(n)`), so that the weights are invariant to the scale of each loss
       separately (tested with scales from 1e-4 to 1e4 in float32); eigenvalues of C below the
       float32 resolution of the gradients count as zero. The weights are divided by
       :math:`|\mathbf 1^\top G^+ n|`: when that sum is negative (possible when the losses'
       scales differ), the paper's :math:`\sum_k \alpha_k = 1` would make every projection
       negative, an ascent direction for every task. When :math:`\mathbf 1^\top G^+ n` vanishes the condition has no solution with
       :math:`\sum_k \alpha_k = 1` and the weights are 0.

    Args:
        tasks: task names.
        loss_scale: also learn IMTL-L loss scales (default False: IMTL-G only).
        grad_on, strategy, chunk_size, check_finite: see :class:`GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._gramian import IMTL
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
        >>> step = IMTL(["a", "b"]).backward([p @ g1, p @ g2], shared=[p])
        >>> {t: round(w, 4) for t, w in step.weights.items()}
        {'a': 0.75, 'b': 0.25}
        >>> p.grad  # equal projections (0.75) on both unit gradients
        tensor([0.7500, 0.7500])
    """

    def __init__(
        self,
        tasks: Sequence[str],
        loss_scale: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        self.loss_scale = bool(loss_scale)
        self.log_scales: nn.Parameter | None = (
            nn.Parameter(torch.zeros(self.num_tasks)) if self.loss_scale else None
        )

    def transform_losses(
        self, losses: list[Tensor], values: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        if self.log_scales is None:
            return super().transform_losses(losses, values)
        s = self.log_scales.to(losses[0].dtype)
        # one exp per task, so that the tasks' graphs share no operation
        out = [torch.exp(s[k]) * loss - s[k] for k, loss in enumerate(losses)]
        return out, torch.exp(s.detach())

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        # On the unit gradients (the cosine matrix C = D^-1 G D^-1, D = diag of the norms):
        # G^+ n = D^-1 C^+ 1, and the pseudo-inverse's cut is then relative to C, whose
        # eigenvalues do not depend on the scale of any task's loss. (A cut relative to the
        # largest eigenvalue of G drops the direction of a task whose loss is 1e4 times
        # smaller.) A zero gradient gets weight 0.
        cosine, norms = cosine_gramian(gramian)
        lam, vec = torch.linalg.eigh(cosine)
        keep = lam > cosine.shape[0] ** 2 * GRADIENT_EPS
        inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
        active = (norms > 0).to(cosine.dtype)
        beta = vec @ (inv * (vec.T @ active))
        v = torch.where(norms > 0, beta / torch.where(norms > 0, norms, 1.0), 0.0)
        # J^T v has projection 1 on every unit gradient; dividing by |sum v| (the paper's
        # sum-to-one, up to the sign) keeps that projection positive.
        total = v.sum().abs()
        ok = total > 1e-9 * v.abs().sum()
        return torch.where(ok, v / torch.where(ok, total, 1.0), 0.0)

    def extra_repr(self) -> str:
        return f"loss_scale={self.loss_scale}, {super().extra_repr()}"


class BargainingWarning(UserWarning):
    """Nash-MTL's bargaining condition failed; the step used no shared update."""


@register("nash_mtl")
class NashMTL(GramianWeighting):
    r"""Nash-MTL: the update is the Nash bargaining solution between the tasks.

    Proposed in Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik & Fetaya, *Multi-Task
    Learning as a Bargaining Game* (ICML 2022, arXiv:2202.01017), Algorithm 1. The weights
    :math:`\alpha > 0` solve the bargaining condition

    .. math::  G\alpha = 1/\alpha \quad (\text{elementwise}), \qquad d = \sum_k \alpha_k g_k,

    so that every task's directional derivative :math:`\langle d, g_k\rangle = 1/\alpha_k` is
    positive. We solve it exactly as the minimiser of the strictly convex
    :math:`\tfrac12 \alpha^\top G \alpha - \sum_k \log \alpha_k` by damped Newton on the K weights
    (after one K x K host transfer), then **check the condition** (to 1e-8, relative). If it
    fails (no solution exists, e.g. two exactly opposite gradients), a :class:`BargainingWarning`
    is issued and the shared update of that step is 0, or, with ``on_failure="raise"``, a
    ``RuntimeError`` is raised; there is no silent fallback. Finally, as in the official code,
    if :math:`\|d\| > ` ``max_norm`` the weights are scaled so that :math:`\|d\| =` ``max_norm``
    (at the solution :math:`\|d\|^2 = \alpha^\top G \alpha = K`).

    .. note:: The official code runs a few iterations of a sequential convex programme with
       cvxpy (``optim_niter=20``) and clips the gradient norm of the shared parameters with
       ``max_norm``; it also scales the heads' gradients by :math:`\alpha`, whereas in mtlkit heads
       always receive their own task's plain gradient. A task whose gradient is exactly zero
       takes no part in the bargaining (its utility cannot change) and gets weight 0. When every
       gradient is zero, all weights are 0 without a warning. ``update_weights_every`` is not
       offered: the weights are solved every step.

    Args:
        tasks: task names.
        max_norm: bound on :math:`\|d\|` (official default 1.0; 0 disables it).
        on_failure: ``"warn"`` (default) or ``"raise"`` when the bargaining condition fails.
        grad_on, strategy, chunk_size, check_finite: see :class:`GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._gramian import NashMTL
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
        >>> b = NashMTL(["a", "b"], max_norm=0.0)
        >>> {t: round(w, 4) for t, w in b.backward([p @ g1, p @ g2], shared=[p]).weights.items()}
        {'a': 1.0, 'b': 0.5}
        >>> p.grad  # <d, g_k> = 1 / alpha_k
        tensor([1., 1.])
    """

    def __init__(
        self,
        tasks: Sequence[str],
        max_norm: float = 1.0,
        on_failure: Literal["warn", "raise"] = "warn",
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        self.max_norm = positive("max_norm", max_norm, allow_zero=True)
        if on_failure not in ("warn", "raise"):
            raise ValueError(f"on_failure must be 'warn' or 'raise', got {on_failure!r}")
        self.on_failure = on_failure

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        g = to_host(gramian)
        k = g.shape[0]
        alpha = torch.zeros(k, dtype=torch.float64)
        active = g.diagonal() > 0
        if bool(active.any()):
            idx = active.nonzero().flatten()
            try:
                alpha[idx] = nash_bargaining(g[idx][:, idx])
            except BargainingFailure as err:
                message = (
                    f"nash_mtl: the bargaining condition G a = 1/a has no solution at step "
                    f"{int(self.step)} ({err}); this step makes no shared update"
                )
                if self.on_failure == "raise":
                    raise RuntimeError(message) from err
                warnings.warn(message, BargainingWarning, stacklevel=4)
                alpha.zero_()
        if self.max_norm > 0:
            norm = math.sqrt(max(float(alpha @ g @ alpha), 0.0))
            if norm > self.max_norm:
                alpha = alpha * (self.max_norm / norm)
        return alpha.to(device=gramian.device, dtype=gramian.dtype, non_blocking=True)

    def extra_repr(self) -> str:
        return f"max_norm={self.max_norm}, on_failure={self.on_failure!r}, {super().extra_repr()}"


@register("aligned_mtl")
class AlignedMTL(GramianWeighting):
    r"""Aligned-MTL: make the task gradients orthogonal and of equal norm before combining
    them (the condition number of the aligned gradient matrix is 1).

    Proposed in Senushkin, Patakin, Kuznetsov & Konushin, *Independent Component Alignment for
    Multi-Task Learning* (CVPR 2023, arXiv:2305.19000), Algorithm 1. With the eigendecomposition
    :math:`G = V \Lambda V^\top` restricted to its rank r, the balance transformation
    :math:`B = \sqrt{\sigma}\, V \Lambda^{-1/2} V^\top` gives aligned gradients
    :math:`\hat J = B J` whose Gram matrix :math:`\hat J \hat J^\top = \sigma V V^\top` has r
    equal non-zero eigenvalues (orthogonal rows of norm :math:`\sqrt\sigma` when r = K); the
    update is :math:`d = \hat J^\top \omega = J^\top B \omega`, so the weights are
    :math:`B\omega` with :math:`\omega = \mathbf 1 / K`. The scale :math:`\sigma` is the smallest
    kept eigenvalue (``"min"``, the paper), their median (``"median"``) or mean (``"rmse"``, the
    name of this option in the authors' code).

    .. note:: :math:`\omega = \mathbf 1 / K` as in TorchJD; the authors' code sums the aligned
       gradients (:math:`\omega = \mathbf 1`), K times larger, same direction. Computed on the
       device in float64 with no host transfer. The rank r is that of the unit gradients'
       Gram matrix (eigenvalues above the float32 resolution of the gradients, independent of
       the losses' scales) and the r largest eigenvalues of G are kept, however small; if none
       is (all gradients zero), B is the identity.

    Args:
        tasks: task names.
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"``.
        grad_on, strategy, chunk_size, check_finite: see :class:`GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._gramian import AlignedMTL
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
        >>> step = AlignedMTL(["a", "b"]).backward([p @ g1, p @ g2], shared=[p])
        >>> {t: round(w, 4) for t, w in step.weights.items()}  # B = diag(1, 1/2)
        {'a': 0.5, 'b': 0.25}
        >>> p.grad
        tensor([0.5000, 0.5000])
    """

    def __init__(
        self,
        tasks: Sequence[str],
        scale_mode: Literal["min", "median", "rmse"] = "min",
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        if scale_mode not in ("min", "median", "rmse"):
            raise ValueError(f"scale_mode must be 'min', 'median' or 'rmse', got {scale_mode!r}")
        self.scale_mode = scale_mode

    def balance_transformation(self, gramian: Tensor) -> Tensor:
        """The K x K matrix B (float64) of the aligned gradients ``B J``."""
        g = gramian.double()
        k = g.shape[0]
        lam, vec = torch.linalg.eigh(g)
        # The rank is read on the unit gradients' Gram matrix, whose eigenvalues do not depend
        # on the scales of the losses; the r largest eigenvalues of G are then kept, however
        # small (a cut relative to G's largest eigenvalue drops a small task's direction).
        rank = numerical_rank(cosine_gramian(g)[0])
        keep = (torch.arange(k, device=g.device) >= k - rank) & (lam > 0)
        inv_sqrt = torch.where(keep, lam.clamp_min(torch.finfo(g.dtype).tiny).rsqrt(), 0.0)
        if self.scale_mode == "min":
            sigma = torch.where(keep, lam, torch.inf).min()
        elif self.scale_mode == "median":
            sigma = torch.where(keep, lam, torch.nan).nanmedian()
        else:
            sigma = torch.where(keep, lam, 0.0).sum() / keep.sum().clamp_min(1)
        any_kept = keep.any()
        sigma = torch.where(any_kept, sigma, 1.0)
        b = sigma.sqrt() * (vec * inv_sqrt) @ vec.T
        return torch.where(any_kept, b, torch.eye(k, dtype=g.dtype, device=g.device))

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        k = gramian.shape[0]
        pref = torch.full((k,), 1.0 / k, dtype=torch.float64, device=gramian.device)
        return (self.balance_transformation(gramian) @ pref).to(gramian.dtype)

    def extra_repr(self) -> str:
        return f"scale_mode={self.scale_mode!r}, {super().extra_repr()}"


@register("upgrad")
class UPGrad(GramianWeighting):
    r"""Unconflicting projection of gradients: project each (weighted) task gradient onto the
    dual cone of all task gradients and add the projections.

    Proposed in Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization* (2024,
    arXiv:2406.16232), Section 4. The dual cone is :math:`\{x : \langle x, g_j\rangle \ge 0\
    \forall j\}`; the projection of :math:`J^\top u` onto it is :math:`J^\top v` with

    .. math::  v = \arg\min_{v \ge u} v^\top G v \quad \text{(Proposition 1)}, \qquad
        d = \sum_k \pi(J^\top u_k) = J^\top \sum_k v^{(k)}, \quad u_k = e_k / K,

    so :math:`\langle d, g_j \rangle \ge 0` for every task: the update conflicts with none. The K
    quadratic programmes are solved exactly on the host by block principal pivoting, as one batch,
    after one K x K host transfer.

    .. note:: As in the authors' implementation (TorchJD), G is divided by its trace and
       ``reg_eps`` times the identity is added before solving (which makes the programme
       strictly convex and the weights unique); a floor of 1e-12 applies even with
       ``reg_eps=0``. The regularisation can leave :math:`\langle d, g_j\rangle` negative by at most
       ``reg_eps * trace(G) * v_j``. TorchJD treats a Gram matrix of trace below 1e-4 as zero
       (scale-dependent); here only an exactly zero trace gives the mean weights.

    Args:
        tasks: task names.
        reg_eps: ridge added to the normalised Gram matrix (default 1e-4, as the authors).
        grad_on, strategy, chunk_size, check_finite: see :class:`GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._gramian import UPGrad
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
        >>> step = UPGrad(["a", "b"], reg_eps=0.0).backward([p @ g1, p @ g2], shared=[p])
        >>> {t: round(w, 4) for t, w in step.weights.items()}
        {'a': 1.0, 'b': 0.75}
        >>> p.grad  # <d, g1> = 0.25 >= 0 and <d, g2> = 0.5 >= 0
        tensor([0.2500, 0.7500])
    """

    def __init__(
        self,
        tasks: Sequence[str],
        reg_eps: float = 1e-4,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        self.reg_eps = positive("reg_eps", reg_eps, allow_zero=True)

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        g, _ = normalize_gramian(to_host(gramian))  # zero when every gradient is
        k = g.shape[0]
        q = g + max(self.reg_eps, 1e-12) * torch.eye(k, dtype=g.dtype)
        lower = torch.eye(k, dtype=g.dtype) / k
        v = lower_bounded_qp(q, lower)
        return v.sum(0).to(device=gramian.device, dtype=gramian.dtype, non_blocking=True)

    def extra_repr(self) -> str:
        return f"reg_eps={self.reg_eps}, {super().extra_repr()}"


@register("db_mtl")
class DBMTL(JacobianAggregator):
    r"""Dual-balancing multi-task learning: balance loss scales with a log transform and
    gradient magnitudes by rescaling every task's (averaged) gradient to the largest norm.

    Proposed in Lin, Ye, Xu, Shi & Zhang, *Dual-Balancing for Multi-Task Learning*
    (2023, arXiv:2308.12029). With :math:`\tilde g_k(t) = \nabla \log(L_k + \epsilon)` and a
    moving average :math:`\hat g_k(t) = \beta_t \hat g_k(t-1) + (1 - \beta_t) \tilde g_k(t)`,
    :math:`\beta_t = \beta / t^{\sigma}`, :math:`\hat g_k(0) = 0`:

    .. math::  d = \sum_k \alpha_k \hat g_k, \qquad
        \alpha_k = \frac{\max_j \|\hat g_j\|}{\|\hat g_k\|}.

    The update uses the averaged gradients, not the current ones, so the method needs the
    K x P task gradients (``requires = "jacobian"``) and keeps their average as state. The
    reported effective weight of task k is :math:`\alpha_k / (L_k + \epsilon)`: its weight on the
    gradient of :math:`L_k` itself when the average equals the current gradient (:math:`\beta = 0`).

    .. note:: Defaults :math:`\beta = 0.9`, :math:`\sigma = 0` are those of the authors' library
       (LibMTL), whose code this follows (the average starts at 0 without bias correction). A
       zero average gets :math:`\alpha_k = 0` instead of dividing by :math:`\|\hat g_k\| + 10^{-8}`
       (scale-free). The log transform needs non-negative losses: a negative loss is an error
       (checked when ``check_finite``). In features mode the representation must keep its
       shape from step to step (the average is per coordinate).

    Args:
        tasks: task names.
        beta: :math:`\beta \in [0, 1)` (default 0.9).
        beta_sigma: :math:`\sigma \ge 0` (default 0).
        eps: :math:`\epsilon > 0` inside the log (default 1e-8).
        grad_on, strategy, chunk_size, check_finite: see :class:`GradientBalancer`.

    State:
        ``grad_ema`` (K, P), the averaged task gradients; sized at the first step.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._gramian import DBMTL
        >>> p = torch.nn.Parameter(torch.ones(2))
        >>> b = DBMTL(["a", "b"], beta=0.0)
        >>> step = b.backward([(p * torch.tensor([1.0, 0.0])).sum() ** 2,
        ...                    (p * torch.tensor([0.0, 3.0])).sum()], shared=[p])
        >>> p.grad  # grad log L: (2, 0) and (0, 1); both rescaled to norm 2
        tensor([2., 2.])
    """

    grad_ema: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        eps: float = 1e-8,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        beta = float(beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.beta_sigma = positive("beta_sigma", beta_sigma, allow_zero=True)
        self.eps = positive("eps", eps)
        self.register_buffer("grad_ema", torch.zeros(self.num_tasks, 0))

    def transform_losses(
        self, losses: list[Tensor], values: Tensor
    ) -> tuple[list[Tensor], Tensor]:
        if self.check_finite:
            negative = values < 0
            if bool(negative.any()):  # the finiteness check already synchronised this step
                bad = [t for t, n in zip(self.tasks, negative.tolist()) if n]
                raise ValueError(f"db_mtl takes the log of the losses: negative loss for {bad}")
        # L / stop_grad(L + eps) has the gradient of log(L + eps); with the slope taken from
        # the whole batch's values it stays exact under torch.distributed.
        slope = 1.0 / (values + self.eps)
        return [loss * slope[k] for k, loss in enumerate(losses)], slope

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        k, p = jacobian.shape
        if self.grad_ema.shape[1] != p:
            if self.grad_ema.shape[1] != 0:
                raise ValueError(
                    f"db_mtl averages task gradients of size {self.grad_ema.shape[1]}, but this "
                    f"step's have size {p} (features of a different shape?)"
                )
            self.grad_ema = torch.zeros(k, p, dtype=jacobian.dtype, device=jacobian.device)
        t = (self.step + 1).to(jacobian.dtype)
        beta_t = self.beta / t**self.beta_sigma
        ema = self.grad_ema
        ema.sub_(jacobian).mul_(beta_t).add_(jacobian)  # beta_t * ema + (1 - beta_t) * g
        norms = safe_row_norms(ema)  # a float32 sum of squares overflows from ~1e19
        alpha = torch.where(
            norms > 0, norms.max() / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0
        )
        return alpha @ ema, alpha

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        key = prefix + "grad_ema"
        if key in state_dict and state_dict[key].shape != self.grad_ema.shape:
            self.grad_ema = torch.zeros_like(state_dict[key], device=self.grad_ema.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, beta_sigma={self.beta_sigma}, eps={self.eps}, "
                f"{super().extra_repr()}")
