"""Small exact solvers on K x K Gram matrices, shared by the gradient balancers.

They run on the host in float64: the Gram matrix is copied from the device once per step
(:func:`to_host`), the solver iterates on K numbers with ordinary Python control flow (no device
synchronisation inside the loop), and the K weights go back with one asynchronous copy. Wolfe's
algorithm, the lower-bounded QPs and CAGrad's dual iterate on NumPy arrays (about 1 us an
operation on K x K problems, against 5-10 us for a torch operation).

* :func:`min_norm_simplex`: the minimum-norm point of the convex hull of the task gradients
  (MGDA), by Wolfe's exact active-set algorithm.
* :func:`frank_wolfe_min_norm`: the same problem by Frank-Wolfe with the exact two-point line
  search, as in Sener & Koltun's Algorithm 2 (stops at a tolerance, near the minimiser).
* :func:`lower_bounded_qp`: ``min_v v^T Q v`` subject to ``v >= lower`` (UPGrad's projection onto
  the dual cone), by block principal pivoting, for several bounds at once (a primal
  active-set method as the fallback).
* :func:`cagrad_dual`: CAGrad's dual ``min_{w in simplex} w^T G 1/K + rho ||J^T w||``, reduced to
  a one-dimensional root search over warm-started min-norm problems.
* :func:`nash_bargaining`: the solution of ``G a = 1 / a`` (Nash-MTL) by damped Newton.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.linalg import lapack
from torch import Tensor

from mtlkit.balancers._functional import normalize_gramian

_F64 = torch.float64


def to_host(gramian: Tensor) -> Tensor:
    """The K x K Gram matrix as a float64 CPU tensor.

    This is the one device-to-host transfer of a step for the solver-based methods (K x K
    numbers); everything after it runs on the host without further synchronisation.
    """
    return gramian.detach().to(device="cpu", dtype=_F64)


def _np(t: Tensor) -> np.ndarray:
    """A float64 CPU tensor as a NumPy array (no copy when it already is one): the solvers
    iterate on NumPy arrays, whose per-operation overhead (about 1 us) is a fraction of torch's
    on K x K problems."""
    return t.detach().to(device="cpu", dtype=_F64).numpy()


def _solve(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int]:
    """``a^{-1} b`` by LAPACK's LU solver, called directly (a third of ``np.linalg.solve``'s
    overhead on these small systems); ``info > 0`` when ``a`` is exactly singular."""
    _, _, x, info = lapack.dgesv(a, b)
    return x, int(info)


def _affine_min(m: np.ndarray) -> np.ndarray:
    """Barycentric weights of the point of minimum norm in the affine hull of points with Gram
    matrix ``m``: ``min mu^T m mu`` subject to ``sum(mu) = 1``."""
    n = m.shape[0]
    kkt = np.empty((n + 1, n + 1))
    kkt[:n, :n] = m
    kkt[:n, n] = 1.0
    kkt[n, :n] = 1.0
    kkt[n, n] = 0.0
    rhs = np.zeros(n + 1)
    rhs[n] = 1.0
    sol, info = _solve(kkt, rhs)
    if info != 0 or not bool(np.isfinite(sol).all()):  # exactly singular, or overflow
        sol = np.linalg.lstsq(kkt, rhs, rcond=None)[0]
    mu = sol[:n]
    return mu / mu.sum()


_TINY = 1e-14


def _corral(g: np.ndarray, support: list[int], lam: np.ndarray) -> tuple[list[int], np.ndarray]:
    """Wolfe's minor cycle: from the point with weights ``lam`` (positive, summing to 1) on
    ``support``, move towards the affine minimiser of the support, dropping the vertices whose
    weight reaches 0, until the affine minimiser lies inside the simplex of what is left."""
    for _ in range(len(support) + 1):  # at most one removal per pass
        idx = np.array(support)
        mu = _affine_min(g.take(idx, 0).take(idx, 1))
        if bool((mu > _TINY).all()):
            return support, mu
        bad = mu <= _TINY
        theta = float((lam[bad] / np.maximum(lam[bad] - mu[bad], _TINY)).min())
        theta = min(max(theta, 0.0), 1.0)
        lam = lam + theta * (mu - lam)
        keep = lam > _TINY
        if not bool(keep.any()):
            keep[int(np.argmax(lam))] = True
        support = [s for s, kp in zip(support, keep.tolist()) if kp]
        lam = lam[keep]
        lam = lam / lam.sum()
    return support, lam


def _wolfe(
    gramian: np.ndarray, tol: float, start: tuple[list[int], np.ndarray] | None = None
) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Wolfe's algorithm on a (K, K) NumPy Gram matrix: the full weights, and the final support
    and its weights (a corral, to warm-start a nearby problem with ``start``).

    ``start`` is a support and positive weights on it: any affinely independent set of vertices
    is a valid start (a minor cycle first makes it a corral). Without it, the vertex of least
    norm."""
    k = gramian.shape[0]
    scale = float(gramian.diagonal().max()) if k else 0.0
    if not scale > 0 or not math.isfinite(scale):
        return np.full(k, 1.0 / k), list(range(k)), np.full(k, 1.0 / k)
    g = gramian / scale
    if start is None or not start[0]:
        support, lam = [int(np.argmin(g.diagonal()))], np.ones(1)
    else:
        support, lam = list(start[0]), start[1]
        if len(support) > 1:
            support, lam = _corral(g, support, lam)
    for _ in range(50 * k + 50):
        x_dot = g[:, support] @ lam  # <g_i, x> for every vertex i
        xx = float(lam @ x_dot[support])
        i = int(np.argmin(x_dot))
        if xx - float(x_dot[i]) <= tol or i in support:
            break
        support.append(i)
        lam = np.append(lam, 0.0)
        support, lam = _corral(g, support, lam)
    lam = np.maximum(lam, 0.0)
    out = np.zeros(k)
    out[support] = lam
    return out / out.sum(), support, lam / lam.sum()


def min_norm_simplex(gramian: Tensor, *, tol: float = 1e-13) -> Tensor:
    """Weights ``a`` on the simplex minimising ``a^T G a``: the min-norm point of the convex hull.

    Wolfe's algorithm (*Finding the nearest point in a polytope*, Math. Programming 1976) on
    the Gram matrix: it keeps a set of affinely independent vertices (a "corral"), moves to the
    affine minimiser of that set, and adds the vertex most opposed to the current point until
    no vertex improves it. It terminates after finitely many steps at the exact minimiser (up
    to rounding); ``tol`` is the optimality gap ``||x||^2 - min_i <x, g_i>`` relative to the
    largest squared norm. Ties are broken towards the lowest index, so the output is
    deterministic. Runs on NumPy arrays.

    Args:
        gramian: (K, K) float64 CPU, symmetric positive semi-definite.

    Returns:
        (K,) float64 weights, non-negative, summing to 1 (uniform when every gradient is zero).
    """
    return torch.from_numpy(_wolfe(_np(gramian), tol)[0])


def frank_wolfe_min_norm(gramian: Tensor, *, max_iter: int = 250, tol: float = 1e-5) -> Tensor:
    """Weights on the simplex approximately minimising ``a^T G a``, by Frank-Wolfe.

    Algorithm 2 of Sener & Koltun (NeurIPS 2018): start at the uniform weights; at each step
    take the vertex ``t`` most opposed to the current point ``x`` (``argmin_t <x, g_t>``) and
    move to the min-norm point of the segment ``[x, g_t]``, whose step ``gamma`` has the
    two-point closed form. Stops when the weights change by less than ``tol`` (L1) or after
    ``max_iter`` steps (the constants of the authors' code). Converges sublinearly: the result
    is near the minimiser, not on it (:func:`min_norm_simplex` is exact).

    Args:
        gramian: (K, K) float64 CPU, symmetric positive semi-definite.

    Returns:
        (K,) float64 weights, non-negative, summing to 1.
    """
    k = gramian.shape[0]
    a = torch.full((k,), 1.0 / k, dtype=_F64)
    scale = float(gramian.diagonal().max()) if k else 0.0
    if not scale > 0 or not math.isfinite(scale):
        return a
    g = gramian / scale
    for _ in range(max_iter):
        x_dot = g @ a  # <g_i, x>
        t = int(torch.argmin(x_dot))
        xx, xt, tt = float(a @ x_dot), float(x_dot[t]), float(g[t, t])
        denom = xx + tt - 2 * xt
        # min over gamma in [0, 1] of ||(1 - gamma) x + gamma g_t||^2
        gamma = min(max((xx - xt) / denom, 0.0), 1.0) if denom > 0 else 0.0
        new = (1 - gamma) * a
        new[t] += gamma
        change = float((new - a).abs().sum())
        a = new
        if change < tol:
            break
    return a / a.sum()


def lower_bounded_qp(q: Tensor, lower: Tensor, *, tol: float = 1e-13) -> Tensor:
    """``argmin_v v^T Q v`` subject to ``v >= lower``, for a positive definite ``Q``; several
    problems sharing ``Q`` at once (one per row of ``lower``).

    With ``u = v - lower`` the optimality conditions are a linear complementarity problem:
    ``u >= 0``, ``y = Q u + Q lower >= 0`` (the multipliers of the bounds) and ``u_i y_i = 0``.
    It is solved by block principal pivoting (Judice & Pires 1994; Kim & Park 2011, for
    non-negative least squares): guess the free set (first, the variables whose multiplier is
    negative at ``u = 0``), solve ``Q_FF u_F = -(Q lower)_F``, and move every variable that
    violates its condition to the other set; when that does not reduce the number of violations
    for three steps, only the last violating variable moves (Murty's rule, which terminates for
    a positive definite ``Q``). The answer is exact (the linear system of the final free set);
    on this problem a few steps suffice. The problems are solved together on NumPy arrays, as
    one batch of linear systems of the size of the largest free set. A problem that has not
    finished after ``10 K + 30`` steps (or whose systems fail) falls back to a primal active-set
    method (:func:`_lower_bounded_qp_primal`).

    Args:
        q: (K, K) float64 CPU, positive definite (regularise a PSD Gram matrix first).
        lower: (N, K) float64 lower bounds, one problem per row.

    Returns:
        (N, K) solutions.
    """
    qn, low = _np(q), _np(lower)
    n, k = low.shape
    v = low.copy()
    scale = float(qn.diagonal().max()) if k else 0.0
    if not scale > 0 or n == 0:
        return torch.from_numpy(v)
    lmax = max(float(np.abs(low).max()), 1e-300)
    y_tol = tol * scale * lmax  # multipliers this negative are violations
    u_tol = 1e-13 * lmax  # free variables this negative are violations
    ql = low @ qn  # y at u = 0 (q is symmetric)
    free = ql < -y_tol
    todo = np.arange(n)
    best = np.full(n, k + 1)
    backup = np.full(n, 3)
    eye_k = np.eye(k, dtype=bool)
    for _ in range(10 * k + 30):
        if todo.size == 0:
            break
        f = free[todo]
        count = f.sum(1)
        m = int(count.max())
        u = np.zeros((todo.size, k))
        if m > 0:
            # each problem's free indices first (in order), padded with identity rows
            order = np.argsort(~f, axis=1, kind="stable")[:, :m]
            valid = np.arange(m)[None, :] < count[:, None]
            system = qn[order[:, :, None], order[:, None, :]]
            system *= valid[:, :, None] & valid[:, None, :]
            diag = np.arange(m)
            system[:, diag, diag] += ~valid
            rhs = -np.take_along_axis(ql[todo], order, 1) * valid
            try:
                sol = np.linalg.solve(system, rhs[:, :, None])[:, :, 0]
            except np.linalg.LinAlgError:
                break
            if not bool(np.isfinite(sol).all()):
                break
            np.put_along_axis(u, order, sol * valid, 1)
        y = u @ qn + ql[todo]
        bad = (f & (u < -u_tol)) | (~f & (y < -y_tol))
        nbad = bad.sum(1)
        done = nbad == 0
        v[todo[done]] = low[todo[done]] + np.maximum(u[done], 0.0)
        keep = ~done
        todo, bad, nbad = todo[keep], bad[keep], nbad[keep]
        if todo.size == 0:
            break
        better = nbad < best[todo]
        exchange_all = better | (backup[todo] > 0)
        backup[todo] = np.where(better, 3, backup[todo] - 1)
        best[todo] = np.minimum(best[todo], nbad)
        last = k - 1 - np.argmax(bad[:, ::-1], axis=1)
        free[todo] ^= np.where(exchange_all[:, None], bad, eye_k[last])
    if todo.size:
        rest = _lower_bounded_qp_primal(q, lower[torch.from_numpy(todo)], tol=tol)
        v[todo] = rest.numpy()
    return torch.from_numpy(v)


def _lower_bounded_qp_primal(q: Tensor, lower: Tensor, *, tol: float = 1e-13) -> Tensor:
    """:func:`lower_bounded_qp` by a primal active-set method (as Lawson and Hanson's for
    non-negative least squares), all problems together in torch: the fallback for the problems
    on which block pivoting does not finish.

    Start at ``v = lower`` with every bound active, free the bound with the most negative
    multiplier ``(Q v)_i``, solve the equality-constrained problem on the free set, and step back
    to the feasible region when a free variable would cross its bound. Exact after finitely many
    steps. The per-problem systems are solved as one batch: the rows of the bound variables are
    replaced by identity rows.
    """
    n, k = lower.shape
    v = lower.clone()
    scale = float(q.diagonal().max()) if k else 0.0
    if not scale > 0 or n == 0:
        return v
    free = torch.zeros(n, k, dtype=torch.bool)
    eye = torch.eye(k, dtype=torch.bool)
    bound_tol = 1e-15 * max(float(lower.abs().max()), 1e-300)
    tol = tol * scale * max(float(lower.abs().max()), 1e-300)

    def solve_free() -> Tensor:
        both = free[:, :, None] & free[:, None, :]
        system = torch.where(both, q, 0.0) + torch.where(~free, 1.0, 0.0).diag_embed()
        fixed = torch.where(free, 0.0, lower)
        rhs = torch.where(free, -(fixed @ q), lower)
        return torch.linalg.solve(system, rhs)

    for _ in range(3 * k + 3):
        grad = v @ q  # the multipliers of the active bounds are (Q v)_i (objective / 2)
        cand = (~free) & (grad < -tol)
        todo = cand.any(1)
        if not bool(todo.any()):
            break
        pick = torch.argmin(torch.where(cand, grad, torch.inf), dim=1)
        free |= todo[:, None] & eye[pick]
        pending = todo
        for _ in range(k + 1):
            z = solve_free()
            below = free & (z <= lower)
            ok = pending & ~below.any(1)
            v = torch.where(ok[:, None], z, v)
            pending = pending & ~ok
            if not bool(pending.any()):
                break
            ratio = torch.where(below, (v - lower) / (v - z).clamp_min(1e-300), torch.inf)
            step = ratio.min(1).values.clamp(0, 1)
            moved = v + step[:, None] * (z - v)
            v = torch.where(pending[:, None], moved, v)
            free = torch.where(pending[:, None], free & (v > lower + bound_tol), free)
            v = torch.where(free, v, lower)
    return v


def _corral_root(g: np.ndarray, b: np.ndarray, support: list[int], rho: float) -> float | None:
    """The root of ``s(tau) = rho tau`` if ``support`` stayed the corral of the shifted problems.

    On a fixed corral the affine minimiser's weights are affine in ``tau`` (they solve
    ``G_S w + tau b_S + z 1 = 0``, ``1^T w = 1``), so ``s(tau)^2 = A + 2 B tau + C tau^2`` and the
    root is that of a quadratic. None when it has no positive crossing (or the system fails)."""
    n = len(support)
    kkt = np.empty((n + 1, n + 1))
    idx = np.array(support)
    sub = g.take(idx, 0).take(idx, 1)
    kkt[:n, :n] = sub
    kkt[:n, n] = 1.0
    kkt[n, :n] = 1.0
    kkt[n, n] = 0.0
    rhs = np.zeros((n + 1, 2))
    rhs[n, 0] = 1.0
    rhs[:n, 1] = -b[support]
    sol, info = _solve(kkt, rhs)
    sol = sol[:n]
    if info != 0 or not bool(np.isfinite(sol).all()):
        return None
    w0, w1 = sol[:, 0], sol[:, 1]
    gw1 = sub @ w1
    a, bb, cc = float(w0 @ sub @ w0), float(w0 @ gw1), float(w1 @ gw1)
    d = cc - rho * rho
    if not d < 0 or not a >= 0:
        return None
    sq = math.sqrt(bb * bb - a * d)
    if bb >= 0:
        return (bb + sq) / -d
    return a / (sq - bb)


def cagrad_dual(gramian: Tensor, c: float) -> tuple[Tensor, float]:
    """Solve CAGrad's dual: ``w = argmin_{w in simplex} w^T b + rho ||J^T w||``.

    Here ``b = G 1 / K`` (the inner products with the mean gradient ``g0``) and ``rho = c ||g0||``.
    For ``x = J^T w`` the problem is ``min_{x in hull} <x, g0> + rho ||x||``. Its minimiser also
    minimises ``<x, g0> + ||x||^2 / (2 tau)`` with ``tau = ||x*|| / rho``, whose solution is the
    min-norm point of the hull shifted by ``tau g0`` (Wolfe's algorithm on a shifted Gram
    matrix, as :func:`min_norm_simplex`). ``s(tau) = ||x(tau)||`` is non-decreasing, so the fixed
    point ``s(tau) = rho tau`` is bracketed. Each step proposes the root that the last corral
    (the support of the min-norm point) would give, in closed form (:func:`_corral_root`), and
    stops when the min-norm problem at that root has the same corral: the root is then exact.
    When the proposal leaves the bracket, a regula falsi step (Illinois variant) replaces it.
    Each min-norm problem is warm-started from the previous corral (a translation of the
    points keeps it affinely independent).

    Returns:
        (w, lam): the dual weights and ``lam = rho / ||J^T w||``, so that CAGrad's update is
        ``J^T (1/K + lam w)``. ``lam`` is 0 when ``g0 = 0`` or when the optimum is the origin of
        the hull (the direction ``x / ||x||`` is then undefined).
    """
    normalized, trace = normalize_gramian(gramian)  # the weights are invariant to its scale
    k = normalized.shape[0]
    uniform = torch.full((k,), 1.0 / k, dtype=_F64)
    if not float(trace) > 0 or not math.isfinite(float(trace)):
        return uniform, 0.0
    g = _np(normalized)
    b = g.mean(1)
    g0_sq = float(g.mean())
    rho = c * math.sqrt(max(g0_sq, 0.0))
    if not rho > 0:
        return uniform, 0.0
    bb = b[:, None] + b[None, :]

    Corral = tuple[list[int], np.ndarray]

    def solve(tau: float, start: Corral | None) -> tuple[np.ndarray, float, Corral]:
        w, support, lam = _wolfe(g + tau * bb + tau * tau * g0_sq, 1e-13, start)
        return w, math.sqrt(max(float(w @ g @ w), 0.0)), (support, lam)

    max_norm = math.sqrt(float(g.diagonal().max()))
    hi = 2.0 * max_norm / rho  # s <= max_norm, so s(hi) - rho hi < 0
    f_hi: float | None = None  # computed when a regula falsi step needs it
    lo = 0.0
    w, s, corral = solve(lo, None)
    f_lo = s
    if not f_lo > 1e-6 * max_norm:
        # The hull contains (almost) the origin, so tau = 0 is a root too: start the bracket at
        # a tau > 0 where s(tau) > rho tau, or the search can end at the origin. Wolfe's
        # algorithm leaves ~1e-9 of the origin in such hulls (a tighter threshold missed 10 of
        # 600 random problems with K > P + 1).
        for j in range(1, 13):
            t = hi * 10.0**-j
            w_t, s_t, c_t = solve(t, corral)
            if s_t - rho * t > 0:
                lo, f_lo = t, s_t - rho * t
                w, s, corral = w_t, s_t, c_t
                break
        else:
            return torch.from_numpy(w), 0.0
    side = 0
    for _ in range(200):
        tau = _corral_root(g, b, corral[0], rho)
        exact = tau is not None and lo < tau < hi
        if not exact:
            if f_hi is None:
                f_hi = solve(hi, corral)[1] - rho * hi
            tau = (lo * f_hi - hi * f_lo) / (f_hi - f_lo)
        previous = sorted(corral[0])
        w, s, corral = solve(tau, corral)
        f = s - rho * tau
        if (f == 0 or hi - lo <= 1e-15 * hi or abs(f) <= 1e-15 * max_norm
                or (exact and sorted(corral[0]) == previous)):
            break
        if f > 0:
            lo, f_lo = tau, f
            if side == 1 and f_hi is not None:
                f_hi /= 2
            side = 1 if not exact else 0
        else:
            hi, f_hi = tau, f
            if side == -1:
                f_lo /= 2
            side = -1 if not exact else 0
    return torch.from_numpy(w), (rho / s if s > 0 else 0.0)


class BargainingFailure(Exception):
    """No weights with ``G a = 1 / a``: the Nash bargaining problem has no solution."""


def nash_bargaining(gramian: Tensor, *, tol: float = 1e-10, max_iter: int = 200) -> Tensor:
    """The positive solution of ``G a = 1 / a`` (Nash-MTL's bargaining condition).

    It is the minimiser of the strictly convex ``f(a) = a^T G a / 2 - sum_i log a_i``; damped
    Newton steps (``f`` is self-concordant, so the damped step stays positive and converges from
    any start) reach it quadratically. Works on ``G / ||G||_F`` and rescales (``a`` scales as
    ``1 / sqrt(scale)``).

    Raises:
        BargainingFailure: when ``f`` is unbounded below (for example two exactly opposite
            gradients: no direction improves both tasks) and the iteration diverges, or when the
            returned point does not satisfy the condition to ``tol``.
    """
    k = gramian.shape[0]
    scale = float(torch.linalg.matrix_norm(gramian))
    if not scale > 0 or not math.isfinite(scale):
        raise BargainingFailure(f"the Gram matrix has norm {scale}")
    g = gramian / scale
    diag = g.diagonal().clamp_min(1e-300)
    a = 1.0 / torch.sqrt(diag * k)
    for _ in range(max_iter):
        ga = g @ a
        grad = ga - 1.0 / a
        hess = g + torch.diag(1.0 / (a * a))
        step, info = torch.linalg.solve_ex(hess, grad)
        if int(info) != 0:
            break
        decrement = math.sqrt(max(float(step @ grad), 0.0))
        a = a - step / (1.0 + decrement) if decrement > 0.25 else a - step
        a = a.clamp_min(1e-300)
        if float(a.max()) > 1e12:
            break
        if float((a * (g @ a) - 1.0).abs().max()) <= tol:
            break
    residual = float((a * (g @ a) - 1.0).abs().max())
    if not residual <= tol * 100:
        raise BargainingFailure(
            f"G a = 1/a does not hold after solving (max |a_i (G a)_i - 1| = {residual:.3g}); "
            "typically some task gradients cancel exactly (0 is in their convex hull)"
        )
    return a / math.sqrt(scale)
