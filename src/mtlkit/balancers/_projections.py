"""Directions defined by projections and angles on the task gradients: ConFIG, DualProj, PCD.

Each method's math is a pure function of the K x K Gram matrix (``*_weights``), tested on its
own; the classes only hold hyperparameters and state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mtlkit.balancers._base import GramianWeighting, positive
from mtlkit.balancers._functional import GRADIENT_EPS, cosine_gramian
from mtlkit.balancers._registry import register
from mtlkit.balancers._solvers import lower_bounded_qp, min_norm_simplex, to_host

_F64 = torch.float64


def _preference(values: Sequence[float] | Mapping[str, float] | None, tasks: Sequence[str],
                default: float, what: str) -> Tensor:
    """A positive per-task preference vector (K,), float64, from a sequence or a mapping."""
    if values is None:
        return torch.full((len(tasks),), default, dtype=_F64)
    if isinstance(values, Mapping):
        unknown = [k for k in values if k not in tasks]
        missing = [t for t in tasks if t not in values]
        if unknown or missing:
            raise ValueError(f"{what} must give a value for exactly the tasks {list(tasks)}; "
                             f"unknown {unknown}, missing {missing}")
        out = [float(values[t]) for t in tasks]
    else:
        out = [float(v) for v in values]
        if len(out) != len(tasks):
            raise ValueError(f"{what} has {len(out)} values for {len(tasks)} tasks")
    if not all(math.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"{what} must be finite and > 0, got {out}")
    return torch.tensor(out, dtype=_F64)


# ---------------------------------------------------------------------------- ConFIG
def config_weights(gramian: Tensor, pref: Tensor | None = None) -> Tensor:
    r"""ConFIG's weights on the task gradients, from their Gram matrix.

    The direction :math:`v` solves :math:`\hat U v = w` in the least-squares, minimum-norm sense,
    where the rows of :math:`\hat U` are the unit task gradients (so every task gets the cosine
    :math:`w_k / \|v\|` with the update when the unit gradients are independent). With the cosine
    matrix :math:`C = \hat U \hat U^\top`, :math:`v = \hat U^\top C^{+} w = \sum_k \alpha_k g_k`,
    :math:`\alpha_k = (C^+ w)_k / \|g_k\|`. The update is :math:`v` rescaled to the length
    :math:`\sum_i \langle g_i, v / \|v\| \rangle`, i.e. the weights
    :math:`\alpha\, \mathbf 1^\top G \alpha / \alpha^\top G \alpha`.

    A zero task gradient has no direction: it gets weight 0 (its row of :math:`\hat U` is 0). If
    :math:`v = 0` (e.g. two opposite gradients) every weight is 0.

    Args:
        gramian: (K, K) Gram matrix of the task gradients.
        pref: (K,) target cosines up to scale (default all ones).

    Returns:
        (K,) weights, in the dtype and on the device of ``gramian``.
    """
    k = gramian.shape[0]
    g = gramian.double()
    cosine, norms = cosine_gramian(g)
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(_F64).tiny), 0.0)
    target = torch.ones(k, dtype=_F64, device=g.device) if pref is None else pref.to(g)
    # Eigenvalues of C below the float32 noise of the gradients are rounding, not directions.
    pinv = torch.linalg.pinv(cosine, atol=k * k * GRADIENT_EPS, rtol=0.0, hermitian=True)
    alpha = pinv @ target * inv
    ga = g @ alpha
    vv = alpha @ ga  # ||v||^2
    ok = vv > 10 * GRADIENT_EPS * (alpha.abs() @ norms) ** 2  # v = 0 up to float32 rounding
    weights = torch.where(ok, alpha * ga.sum() / torch.where(ok, vv, 1.0), 0.0)
    return weights.to(gramian.dtype)


@register("config")
class ConFIG(GramianWeighting):
    r"""ConFIG: the conflict-free direction that has the same cosine with every task gradient.

    Proposed in Liu, Chu & Thuerey, *ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks* (ICLR 2025, arXiv:2408.11104), Equation 2. With unit task gradients
    :math:`\hat g_k = g_k / \|g_k\|`:

    .. math::  g_u = \frac{\tilde g}{\|\tilde g\|},\quad
        \tilde g = [\hat g_1, \dots, \hat g_K]^{+\top} w, \qquad
        d = \Big(\sum_k \langle g_k, g_u\rangle\Big) g_u,

    so every task has a positive inner product with the update, the same cosine for all tasks
    when ``pref`` is uniform (cosines proportional to ``pref`` otherwise). Computed exactly from
    the Gram matrix (:func:`config_weights`): the pseudo-inverse of the K x K cosine matrix
    replaces that of the K x P matrix of unit gradients.

    .. note:: The paper's default preference is all ones (as TorchJD's and the official code's);
       only the direction of ``pref`` matters. Its momentum variant (M-ConFIG, which updates one
       task gradient per step) is not implemented. A zero task gradient gets weight 0. Eigenvalues
       of the cosine matrix below ``100 K eps`` of the Gram matrix's dtype are treated as zero.

    Args:
        tasks: task names.
        pref: positive target cosines, one per task (sequence or task -> value mapping);
            default uniform.
        **options: engine options of :class:`~mtlkit.balancers.GradientBalancer` (``grad_on``,
            ``strategy``, ``chunk_size``, ``check_finite``).

    Example:
        >>> import torch
        >>> from mtlkit.balancers._projections import ConFIG
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
        >>> step = ConFIG(["a", "b"]).backward([p @ g1, p @ g2], shared=[p])
        >>> p.grad  # along (1, 1), of length <g1, u> + <g2, u> = 3 / sqrt(2)
        tensor([1.5000, 1.5000])
    """

    def __init__(self, tasks: Sequence[str], *,
                 pref: Sequence[float] | Mapping[str, float] | None = None,
                 **options: Any) -> None:
        super().__init__(tasks, **options)
        self.pref = None if pref is None else _preference(pref, self.tasks, 1.0, "pref")

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return config_weights(gramian, self.pref)

    def extra_repr(self) -> str:
        pref = None if self.pref is None else self.pref.tolist()
        return f"pref={pref}, {super().extra_repr()}"


# ---------------------------------------------------------------------------- DualProj
def dualproj_weights(gramian: Tensor, pref: Tensor | None = None, reg_eps: float = 1e-4) -> Tensor:
    r"""Weights of the projection of :math:`J^\top u` onto the dual cone of the task gradients.

    By Proposition 1 of Quinton & Rey (arXiv:2406.16232) the projection is :math:`J^\top w`,
    :math:`w = \arg\min_{w \ge u} w^\top G w`. With :math:`D = \mathrm{diag}(G)` and
    :math:`w = D^{-1/2} x` this is :math:`\min_{x \ge D^{1/2} u} x^\top C x` on the cosine matrix
    :math:`C`, solved exactly on the host (:func:`mtlkit.balancers._solvers.lower_bounded_qp`)
    with ``reg_eps`` (floor 1e-12) added to the diagonal of C: a ridge relative to each task's
    own scale, so a task of small gradients keeps its constraint. A zero task gradient keeps
    :math:`w_k = u_k` (its constraint holds trivially).

    Args:
        gramian: (K, K) Gram matrix.
        pref: (K,) vector to project (default the mean, ``1 / K``).
        reg_eps: ridge added to the cosine matrix.
    """
    k = gramian.shape[0]
    g = to_host(gramian)
    u = torch.full((k,), 1.0 / k, dtype=_F64) if pref is None else pref.to(_F64).cpu()
    w = u.clone()
    cosine, norms = cosine_gramian(g)
    live = ((norms > 0) & torch.isfinite(norms)).nonzero().flatten()
    if live.numel():
        n = norms[live]
        q = cosine[live][:, live] + max(reg_eps, 1e-12) * torch.eye(live.numel(), dtype=_F64)
        w[live] = lower_bounded_qp(q, (n * u[live])[None, :])[0] / n
    return w.to(device=gramian.device, dtype=gramian.dtype, non_blocking=True)


@register("dualproj")
class DualProj(GramianWeighting):
    r"""DualProj: the mean gradient projected onto the dual cone of the task gradients (the
    closest update to the mean that conflicts with no task).

    The projection is Equation 11 of Lopez-Paz & Ranzato, *Gradient Episodic Memory for
    Continual Learning* (NeurIPS 2017, arXiv:1706.08840), applied to the mean of the task
    gradients as in TorchJD (Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*,
    2024, arXiv:2406.16232, where it is named DualProj):

    .. math::  d = \arg\min_{x} \|x - J^\top u\|^2 \ \text{s.t.}\ \langle x, g_j\rangle \ge 0
        \ \forall j, \qquad d = J^\top v,\ v = \arg\min_{v \ge u} v^\top G v,

    with :math:`u = \mathbf 1 / K`. At the solution :math:`v \ge u`, :math:`G v \ge 0` and
    :math:`(v - u)_j (Gv)_j = 0` (the KKT conditions).

    .. note:: The programme is solved on the cosine matrix (each gradient scaled to unit norm,
       :func:`dualproj_weights`) with ``reg_eps`` added to its diagonal, which can leave
       :math:`\langle d, g_j\rangle` negative by at most ``reg_eps`` :math:`\|g_j\|^2 v_j`.
       TorchJD divides G by its trace instead and adds ``reg_eps`` there, a ridge that can
       swamp a task whose gradients are 1e4 times smaller than another's (its constraint is
       then lost); it also treats a Gram matrix of trace below 1e-4 as zero. With a negligible
       ridge the two solve the same problem.

    Args:
        tasks: task names.
        pref: the positive weights of the vector to project (default ``1 / K`` each).
        reg_eps: ridge added to the cosine matrix (default 1e-4, TorchJD's value).
        **options: engine options of :class:`~mtlkit.balancers.GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._projections import DualProj
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-2.0, 1.0])
        >>> step = DualProj(["a", "b"], reg_eps=0.0).backward([p @ g1, p @ g2], shared=[p])
        >>> {t: round(w, 4) for t, w in step.weights.items()}
        {'a': 1.0, 'b': 0.5}
        >>> p.grad  # the mean (-0.5, 0.5) projected: now orthogonal to g1, positive on g2
        tensor([0.0000, 0.5000])
    """

    def __init__(self, tasks: Sequence[str], *,
                 pref: Sequence[float] | Mapping[str, float] | None = None,
                 reg_eps: float = 1e-4, **options: Any) -> None:
        super().__init__(tasks, **options)
        self.pref = None if pref is None else _preference(pref, self.tasks, 1.0, "pref")
        self.reg_eps = positive("reg_eps", reg_eps, allow_zero=True)

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        return dualproj_weights(gramian, self.pref, self.reg_eps)

    def extra_repr(self) -> str:
        pref = None if self.pref is None else self.pref.tolist()
        return f"pref={pref}, reg_eps={self.reg_eps}, {super().extra_repr()}"


# ---------------------------------------------------------------------------- PCD
def nonneg_qp(h: np.ndarray, c: np.ndarray, *, tol: float = 1e-12) -> np.ndarray:
    r"""``argmin_{mu >= 0} mu^T H mu / 2 + c^T mu`` for a positive semi-definite H whose problem
    is bounded, by a primal active-set method (Lawson & Hanson's, for this quadratic): free the
    bound with the most negative gradient, solve the free set's equations (least squares, so a
    singular H is allowed), and step back to the feasible region when a free variable would
    turn negative."""
    k = c.shape[0]
    mu = np.zeros(k)
    free = np.zeros(k, dtype=bool)
    scale = max(float(np.abs(h).max(initial=0.0)), float(np.abs(c).max(initial=0.0)), 1e-300)
    for _ in range(3 * k + 3):
        grad = h @ mu + c
        candidates = ~free & (grad < -tol * scale)
        if not candidates.any():
            break
        free[int(np.argmin(np.where(candidates, grad, np.inf)))] = True
        for _ in range(k + 1):
            idx = np.flatnonzero(free)
            z = np.zeros(k)
            z[idx] = np.linalg.lstsq(h[np.ix_(idx, idx)], -c[idx], rcond=None)[0]
            if bool((z[idx] > 0).all()):
                mu = z
                break
            crossing = free & (z <= 0)
            step = float(np.min(mu[crossing] / np.maximum(mu[crossing] - z[crossing], 1e-300)))
            mu = mu + min(max(step, 0.0), 1.0) * (z - mu)
            free &= mu > 1e-300
            mu[~free] = 0.0
    return mu


def pcd_weights(gramian: Tensor, scales: Tensor, tau: Tensor) -> Tensor:
    r"""Priority-constrained descent's weights, given the normalising scales.

    With :math:`\tilde g_i = s_i g_i`, the direction

    .. math::  \tilde d = \arg\min_d \tfrac12 \|d - \tilde g_1\|^2 \ \text{s.t.}\
        \langle \tilde g_j, d\rangle \ge \tau_j \|\tilde g_j\|^2,\ j \ge 2,

    is :math:`\tilde g_1 + \sum_{j \ge 2} \mu_j \tilde g_j` with the multipliers :math:`\mu \ge 0`
    of the dual :math:`\min_{\mu \ge 0} \tfrac12 \mu^\top H \mu + c^\top \mu`,
    :math:`H = \tilde G_{SS}`, :math:`c_j = \tilde G_{j1} - \tau_j \tilde G_{jj}`
    (:func:`nonneg_qp`). The result is rescaled to :math:`\|g_1\|`. When :math:`g_1 = 0`, or
    :math:`\tilde d` vanishes, the weights are 0; when the constraints cannot all hold (0 is in
    the convex hull of the non-zero secondary gradients while some :math:`\tau_j > 0`), they are
    dropped and the update is :math:`g_1`. A zero secondary gradient has no constraint.

    Args:
        gramian: (K, K) Gram matrix; row 0 is the primary task.
        scales: (K,) positive scales :math:`s_i`.
        tau: (K - 1,) fractions :math:`\tau_j \in [0, 1]`.
    """
    k = gramian.shape[0]
    g = to_host(gramian)
    s = scales.detach().to(device="cpu", dtype=_F64)
    weights = torch.zeros(k, dtype=_F64)
    if not float(g[0, 0]) > 0:
        return weights.to(device=gramian.device, dtype=gramian.dtype)
    gt = (g * s[:, None] * s[None, :]).numpy()
    eps = 10 * GRADIENT_EPS  # the gradients carry float32 rounding
    secondary = [j for j in range(1, k) if gt[j, j] > eps * gt.diagonal().max()]
    w = np.zeros(k)
    w[0] = 1.0
    if secondary:
        idx = np.array(secondary)
        h = gt[np.ix_(idx, idx)]
        taus = tau.detach().to(device="cpu", dtype=_F64).numpy()[idx - 1]
        c = gt[idx, 0] - taus * h.diagonal()
        feasible = True
        if bool((taus > 0).any()):
            # Infeasible exactly when 0 is in the convex hull of the secondary gradients.
            lam = min_norm_simplex(torch.from_numpy(h)).numpy()
            feasible = float(lam @ h @ lam) > eps * float(h.diagonal().max()) * len(idx)
        if feasible:
            w[idx] = nonneg_qp(h, c)
    w = torch.from_numpy(w) * s
    norm2 = float(w @ g @ w)
    size2 = float(w.abs() @ g.diagonal().clamp_min(0).sqrt()) ** 2
    if norm2 > eps * size2:  # d~ = 0 up to the float32 rounding of the gradients
        weights = w * math.sqrt(float(g[0, 0]) / norm2)
    return weights.to(device=gramian.device, dtype=gramian.dtype)


@register("pcd")
class PCD(GramianWeighting):
    r"""Priority-constrained descent: follow the primary task's gradient as closely as possible
    while each secondary task keeps a fraction of the progress its own gradient would give.

    Proposed in Varam et al., *Not All Objectives Are Born Equal: Priority-Constrained Descent
    for Hierarchical Multi-Objective Optimization* (TMLR 2026, arXiv:2606.29521). The primary
    task is the first of ``tasks`` (or ``primary``). With :math:`\tilde g_i = s_i g_i`,
    :math:`s_i = 1/\sqrt{\hat v_i + \epsilon}` and :math:`\hat v_i` the bias-corrected moving
    average (decay :math:`\beta`) of :math:`\|g_i\|^2`:

    .. math::  \tilde d = \arg\min_d \tfrac12 \|d - \tilde g_1\|^2 \ \text{s.t.}\
        \langle \tilde g_j, d\rangle \ge \tau \|\tilde g_j\|^2 \ (j \ge 2), \qquad
        d = \frac{\|g_1\|}{\|\tilde d\|} \tilde d,

    solved exactly from the Gram matrix (:func:`pcd_weights`). Every secondary task then has
    :math:`\langle d, g_j\rangle \ge \tau \frac{\|g_1\|}{\|\tilde d\|} s_j \|g_j\|^2 > 0`.

    .. note:: Defaults :math:`\tau = 0.02`, :math:`\beta = 0.999`, as the paper and TorchJD;
       :math:`\epsilon = 0` by default where they use :math:`10^{-8}`: an absolute
       :math:`\epsilon` dominates :math:`\hat v` for gradients of norm below about 1e-4 and then
       turns the normalisation off (the direction changes with the scale of the losses). With
       :math:`\epsilon = 0` a task whose gradient has always been zero gets scale 0 (what
       :math:`\epsilon` guards against); ``eps=1e-8`` gives the paper's. The reference code enumerates the working sets of the QP; here a
       primal active-set method on its dual finds the same minimiser. When the constraints are
       infeasible they are dropped (the update is :math:`g_1`); a zero primary gradient gives a
       zero update.

    Args:
        tasks: task names.
        primary: the primary task (default the first task).
        tau: :math:`\tau \in [0, 1]`, one value or a task -> value mapping over the secondary
            tasks (default 0.02).
        beta: decay :math:`\beta \in [0, 1)` of the moving average (default 0.999).
        eps: :math:`\epsilon \ge 0` (default 0, see the note; the paper's is 1e-8).
        **options: engine options of :class:`~mtlkit.balancers.GradientBalancer`.

    State:
        ``sq_norm_ema`` (K,) float64, the moving average of the squared gradient norms (not
        bias-corrected; the correction uses ``step``).

    Example:
        >>> import torch
        >>> from mtlkit.balancers._projections import PCD
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
        >>> b = PCD(["main", "aux"], tau=0.5)
        >>> step = b.backward([p @ g1, p @ g2], shared=[p])
        >>> p.grad  # g1 tilted until <d~, g2~> = 0.5 ||g2~||^2, then rescaled to ||g1|| = 1
        tensor([0.1691, 0.9856])
    """

    sq_norm_ema: Tensor

    def __init__(self, tasks: Sequence[str], *, primary: str | None = None,
                 tau: float | Mapping[str, float] = 0.02, beta: float = 0.999,
                 eps: float = 0.0, **options: Any) -> None:
        super().__init__(tasks, **options)
        primary = self.tasks[0] if primary is None else primary
        if primary not in self.tasks:
            raise ValueError(f"primary must be one of the tasks {list(self.tasks)}, got {primary!r}")
        self.primary = primary
        # Task order with the primary first; the weights are permuted back.
        self.order = [self.tasks.index(primary)] + [
            i for i, t in enumerate(self.tasks) if t != primary]
        secondary = [self.tasks[i] for i in self.order[1:]]
        if isinstance(tau, Mapping):
            unknown = [k for k in tau if k not in secondary]
            missing = [t for t in secondary if t not in tau]
            if unknown or missing:
                raise ValueError(f"tau must give a value for exactly the secondary tasks "
                                 f"{secondary}; unknown {unknown}, missing {missing}")
            taus = [float(tau[t]) for t in secondary]
        else:
            taus = [float(tau)] * len(secondary)
        if not all(0.0 <= v <= 1.0 for v in taus):
            raise ValueError(f"tau must be in [0, 1], got {taus}")
        self.tau = torch.tensor(taus, dtype=_F64)
        beta = float(beta)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.eps = positive("eps", eps, allow_zero=True)
        self.register_buffer("sq_norm_ema", torch.zeros(self.num_tasks, dtype=_F64))

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        order = torch.tensor(self.order, device=gramian.device)
        g = gramian[order][:, order]
        sq = to_host(g.diagonal())
        ema = self.beta * self.sq_norm_ema.cpu() + (1.0 - self.beta) * sq
        self.sq_norm_ema.copy_(ema)
        debiased = ema / (1.0 - self.beta ** (int(self.step) + 1))
        root = (debiased + self.eps).sqrt()
        scales = torch.where(root > 0, 1.0 / root.clamp_min(1e-300), 0.0)
        w = pcd_weights(g, scales, self.tau)
        out = torch.empty_like(w)
        out[order] = w
        return out

    def extra_repr(self) -> str:
        return (f"primary={self.primary!r}, tau={self.tau.tolist()}, beta={self.beta}, "
                f"eps={self.eps}, {super().extra_repr()}")
