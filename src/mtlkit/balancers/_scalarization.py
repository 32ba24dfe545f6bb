"""Preference-based scalarizations: STCH, COSMOS and PBI.

Each turns the K loss values into one scalar ``s(L)`` given a preference vector. The update is
the gradient of ``s(L(theta))``, i.e. ``sum_k w_k grad L_k`` with ``w = ds/dL`` at the current
losses: these are loss weightings (one backward pass, like a plain sum), whose effective
weights are the partial derivatives of the scalarization. The pure functions below return
those weights; the classes add the preference and the validation.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor

from mtlkit.balancers._base import LossWeighting, positive
from mtlkit.balancers._functional import finfo, host_view, softmax
from mtlkit.balancers._registry import register


# ---------------------------------------------------------------------------- pure functions
# K numbers in, K numbers out. The maths runs on Python floats (float64): for the few loss
# values of a step, a float operation costs ~0.05 us where an operation on a small NumPy array
# costs 1-5 us (measured in a training loop on the tiny suite of the speed benchmark), and that
# difference is the method's whole overhead over a plain sum. The public functions take and
# return float64 NumPy arrays; the classes call the list forms with the step's loss values.
def _floats(x: ArrayLike) -> list[float]:
    return np.asarray(x, dtype=np.float64).tolist()


def _stch(losses: list[float], pref: list[float], mu: float, ref: list[float]) -> list[float]:
    # (the softmax subtracts the maximum: finite for any finite losses and any mu > 0)
    x = softmax([p * (v - z) / mu for v, p, z in zip(losses, pref, ref)])
    return [p * v for p, v in zip(pref, x)]


def stch_weights(losses: ArrayLike, preference: ArrayLike, mu: float,
                 reference: ArrayLike) -> np.ndarray:
    r"""d/dL of :math:`\mu \log \sum_k \exp(\lambda_k (L_k - z_k) / \mu)`:
    :math:`w_k = \lambda_k\, \mathrm{softmax}(\lambda (L - z) / \mu)_k` (float64).

    >>> stch_weights(np.array([1.0, 1.0]), np.array([0.5, 0.5]), 1.0, np.zeros(2))
    array([0.25, 0.25])
    """
    return np.array(_stch(_floats(losses), _floats(preference), mu, _floats(reference)))


def _cosmos(losses: list[float], r: list[float], penalty: float) -> list[float]:
    top = max(map(abs, losses))
    if not top > 0:
        return list(r)
    # Work on L / max|L|: the cosine is scale-invariant, and its gradient scales as 1/||L||,
    # so computing at unit scale and dividing once keeps 1e-300 or 1e300 losses finite.
    unit = [v / top for v in losses]
    norm_l = math.hypot(*unit)
    norm_r = math.hypot(*r)
    l_hat = [u / norm_l for u in unit]
    cos = sum(map(operator.mul, r, l_hat)) / norm_r
    scale = norm_l * top
    return [a - penalty * ((a / norm_r - cos * h) / scale) for a, h in zip(r, l_hat)]


def cosmos_weights(losses: ArrayLike, preference: ArrayLike, penalty: float) -> np.ndarray:
    r"""d/dL of :math:`r^\top L - \lambda\, r^\top L / (\lVert r\rVert \lVert L\rVert)` (float64).

    The cosine term's derivative is :math:`(r - \cos(r, L) \lVert r\rVert\, \hat L)
    / (\lVert r\rVert \lVert L\rVert)`, with :math:`\hat L = L / \lVert L\rVert`; where all
    losses are 0 the cosine is undefined and only the linear part is kept.

    >>> cosmos_weights(np.array([1.0, 1.0]), np.array([0.5, 0.5]), 1.0)
    array([0.5, 0.5])
    """
    return np.array(_cosmos(_floats(losses), _floats(preference), penalty))


def _pbi(losses: list[float], w: list[float], theta: float, ref: list[float],
         eps: float) -> list[float]:
    norm_w = math.hypot(*w)
    w_hat = [x / norm_w for x in w]
    r = [v - z for v, z in zip(losses, ref)]
    # d2's direction does not depend on the scale of r: normalise first so that 1e-300 and
    # 1e300 losses give the same finite weights.
    top = max(map(abs, r))
    if top > 0:
        r = [x / top for x in r]
    d1 = sum(map(operator.mul, r, w_hat))
    perp = [x - d1 * h for x, h in zip(r, w_hat)]
    d2 = math.hypot(*perp)
    # d2 below the rounding of r is a point on the ray: no perpendicular direction.
    if d2 <= 4 * eps * math.hypot(*r):
        return w_hat
    return [h + theta * (p / d2) for h, p in zip(w_hat, perp)]


def pbi_weights(losses: ArrayLike, preference: ArrayLike, theta: float, reference: ArrayLike,
                eps: float | None = None) -> np.ndarray:
    r"""d/dL of :math:`d_1 + \theta d_2`, with :math:`r = L - z`, :math:`\hat w = w/\lVert w\rVert`,
    :math:`d_1 = r^\top \hat w` and :math:`d_2 = \lVert r - d_1 \hat w\rVert`:
    :math:`\hat w + \theta (r - d_1 \hat w) / d_2` (float64); where :math:`d_2 = 0` (the losses
    on the preference ray) the perpendicular part's subgradient 0 is taken.

    ``eps`` is the relative rounding of the losses (default: the machine epsilon of their dtype,
    float64 for anything but a float array): a :math:`d_2` within 4 ``eps`` of
    :math:`\lVert r\rVert` counts as a point on the ray.

    >>> pbi_weights(np.array([1.0, 1.0]), np.array([0.5, 0.5]), 5.0, np.zeros(2)).round(4)
    array([0.7071, 0.7071])
    """
    losses = np.asarray(losses)
    if eps is None:
        eps = float(np.finfo(losses.dtype if losses.dtype.kind == "f" else np.float64).eps)
    return np.array(_pbi(_floats(losses), _floats(preference), theta, _floats(reference), eps))


# ---------------------------------------------------------------------------- classes
class _PreferenceScalarization(LossWeighting):
    """Shared validation of a preference vector (one positive number per task)."""

    preference: Tensor

    def _preference(self, preference: float | Mapping[str, float] | None) -> Tensor:
        """The preference as a float64 buffer value (of the float32 numbers the options give)."""
        if preference is None:
            return torch.full((self.num_tasks,), 1.0 / self.num_tasks).double()
        pref = self._task_values(preference, "preference")
        if bool((pref < 0).any()) or not bool((pref > 0).any()):
            raise ValueError(f"preference must be >= 0 with one entry > 0, got {pref.tolist()}")
        return pref.double()


@register("stch")
class STCH(_PreferenceScalarization):
    r"""Smooth Tchebycheff scalarization: minimise a smooth maximum of the weighted losses.

    Proposed in Lin, Zhang, Yang, Liu, Wang & Zhang, *Smooth Tchebycheff Scalarization for
    Multi-Objective Optimization* (ICML 2024, arXiv:2402.19078), eq. (7):

    .. math:: g_\mu(L) = \mu \log \sum_k \exp\big(\lambda_k (L_k - z^*_k) / \mu\big),
       \qquad w_k = \partial g_\mu / \partial L_k
       = \lambda_k\, \mathrm{softmax}\big(\lambda (L - z^*) / \mu\big)_k .

    As :math:`\mu \to 0` it tends to the Tchebycheff scalarization
    :math:`\max_k \lambda_k (L_k - z^*_k)` (all the weight on the worst weighted loss); the
    weights always sum to at most :math:`\max_k \lambda_k` and are never negative.

    Args:
        tasks: task names.
        mu: smoothing parameter :math:`\mu > 0` (the paper studies 0.01 to 1 and finds no
            single best; 1.0 here, LibMTL's default for its MTL experiments).
        preference: :math:`\lambda`, one number per task (default uniform :math:`1/K`, the
            centre of the simplex).
        reference: the ideal point :math:`z^*` (default 0, a lower bound of every loss).

    .. note:: The authors' multi-task code also replaces :math:`L_k` by
       :math:`\log(L_k / \bar L_k)` with :math:`\bar L` the mean loss of a warm-up epoch, and
       multiplies by K; this class is the paper's scalarization of the raw losses (pass
       log-losses yourself for that variant).

    Example:
        >>> import torch
        >>> b = STCH(["a", "b"], mu=1.0)
        >>> w = torch.ones(2, requires_grad=True)
        >>> step = b.backward({"a": 3 * w[0] ** 2, "b": w[1] ** 2})
        >>> [round(v, 4) for v in step.weight_tensor.tolist()]
        [0.3655, 0.1345]
    """

    reference: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        mu: float = 1.0,
        preference: float | Mapping[str, float] | None = None,
        reference: float | Mapping[str, float] = 0.0,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        self.mu = positive("mu", mu)
        # (host buffers: float64 state of the host maths, read through host_view)
        self.register_buffer("preference", self._preference(preference), persistent=False)
        self.register_buffer("reference", self._task_values(reference, "reference").double(),
                             persistent=False)

    def loss_weights(self, values: list[float], context: Mapping[str, Any]) -> list[float]:
        return _stch(values, host_view(self, "preference").tolist(), self.mu,
                     host_view(self, "reference").tolist())

    def extra_repr(self) -> str:
        return f"mu={self.mu}, preference={self.preference.tolist()}"


@register("cosmos")
class COSMOS(_PreferenceScalarization):
    r"""COSMOS: a linear scalarization rewarded for pointing the loss vector along the preference.

    Proposed in Ruchte & Grabocka, *Scalable Pareto Front Approximation for Deep
    Multi-Objective Learning* (ICDM 2021, arXiv:2103.13392), eq. (4):

    .. math:: s(L) = r^\top L - \lambda \cos(r, L), \qquad
       w = r - \lambda \frac{r/\lVert r\rVert - \cos(r, L)\, L/\lVert L\rVert}{\lVert L\rVert}.

    The preference :math:`r` is drawn from :math:`\mathrm{Dir}(\alpha)` at every step, as in the
    paper (the draw of step t depends only on ``(seed, t)``, so a resumed run draws the same
    preferences; :meth:`preference_at` tells a preference-conditioned model which one comes
    next), or is fixed with ``preference=``.

    Args:
        tasks: task names.
        penalty: :math:`\lambda \ge 0`, the weight of the cosine term (the paper tunes it per
            dataset, 0.01 to 8; default 1.0).
        alpha: Dirichlet concentration of the sampled preferences (paper: 1.2 for its image
            datasets).
        preference: a fixed :math:`r` instead of sampling (one number per task).
        seed: seed of the preference sequence.

    .. note:: The full method also feeds :math:`r` to the network (input conditioning), so one
       model covers the Pareto front; that is the model's business: condition it on
       ``balancer.preference_at(int(balancer.step))`` before the forward pass.
       The weights can be negative when :math:`\lambda` is large (the cosine term then pushes
       a loss that is small relative to its preference up, towards the preference ray).

    Example:
        >>> import torch
        >>> b = COSMOS(["a", "b"], preference={"a": 0.5, "b": 0.5}, penalty=1.0)
        >>> w = torch.ones(2, requires_grad=True)
        >>> step = b.backward({"a": 3 * w[0] ** 2, "b": w[1] ** 2})
        >>> [round(v, 4) for v in step.weight_tensor.tolist()]
        [0.5447, 0.3658]
    """

    def __init__(
        self,
        tasks: Sequence[str],
        penalty: float = 1.0,
        alpha: float = 1.2,
        preference: float | Mapping[str, float] | None = None,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        self.penalty = positive("penalty", penalty, allow_zero=True)
        self.alpha = positive("alpha", alpha)
        self.seed = int(seed)
        self.fixed = preference is not None
        pref = (self._preference(preference) if self.fixed
                else torch.zeros(self.num_tasks, dtype=torch.float64))
        self.register_buffer("preference", pref, persistent=False)
        # The Dirichlet concentration, made once (not state: it follows from alpha).
        self._concentration = torch.full((self.num_tasks,), self.alpha, dtype=torch.float64)

    def preference_at(self, step: int) -> Tensor:
        """The preference :math:`r` used at step ``step`` (float64, on the host)."""
        return torch.tensor(self._preference_list(int(step)), dtype=torch.float64)

    def _preference_list(self, step: int) -> list[float]:
        if self.fixed:
            return host_view(self, "preference").tolist()
        # Dirichlet(alpha) as normalised Gamma(alpha) draws (counter-based: the same for a
        # step whatever step the run started or resumed at).
        g = self._host_draws(step, lambda gen, n: torch._standard_gamma(
            self._concentration.expand(n, -1).contiguous(), generator=gen))
        total = sum(g)
        return [x / total for x in g]

    def loss_weights(self, values: list[float], context: Mapping[str, Any]) -> list[float]:
        return _cosmos(values, self._preference_list(host_view(self, "step")[()]),
                       self.penalty)

    def extra_repr(self) -> str:
        r = self.preference.tolist() if self.fixed else f"Dir({self.alpha})"
        return f"penalty={self.penalty}, preference={r}"


@register("pbi")
class PBI(_PreferenceScalarization):
    r"""Penalty-based boundary intersection: progress along the preference ray, plus a penalty
    on the distance to it.

    Proposed in Zhang & Li, *MOEA/D: A Multiobjective Evolutionary Algorithm Based on
    Decomposition* (IEEE Transactions on Evolutionary Computation 2007, no arXiv version),
    Section II-C: with :math:`r = L - z^*` and :math:`\hat w = w/\lVert w\rVert`,

    .. math:: d_1 = r^\top \hat w,\quad d_2 = \lVert r - d_1 \hat w\rVert,\quad
       s = d_1 + \theta d_2,\qquad
       w_{\mathrm{eff}} = \hat w + \theta\, \frac{r - d_1 \hat w}{d_2}.

    The weights do not depend on the scale of :math:`r` (``s`` is positively homogeneous), and
    a loss above the ray gets a larger weight than one below it; they can be negative.

    Args:
        tasks: task names.
        theta: penalty :math:`\theta \ge 0` on the perpendicular distance (paper: 5).
        preference: the direction :math:`w` (default uniform).
        reference: the ideal point :math:`z^*` (default 0, a lower bound of every loss).

    .. note:: MOEA/D takes :math:`d_1` as :math:`|r^\top \hat w|` and updates :math:`z^*` to the
       best values found by its population; with one model and losses >= 0, the fixed lower
       bound 0 keeps :math:`r^\top \hat w \ge 0`, where the two agree. At :math:`d_2 = 0` the
       subgradient 0 of the perpendicular term is used.

    Example:
        >>> import torch
        >>> b = PBI(["a", "b"], theta=5.0)
        >>> w = torch.ones(2, requires_grad=True)
        >>> step = b.backward({"a": 3 * w[0] ** 2, "b": w[1] ** 2})
        >>> [round(v, 4) for v in step.weight_tensor.tolist()]
        [4.2426, -2.8284]
    """

    reference: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        theta: float = 5.0,
        preference: float | Mapping[str, float] | None = None,
        reference: float | Mapping[str, float] = 0.0,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        self.theta = positive("theta", theta, allow_zero=True)
        # (host buffers: float64 state of the host maths, read through host_view)
        self.register_buffer("preference", self._preference(preference), persistent=False)
        self.register_buffer("reference", self._task_values(reference, "reference").double(),
                             persistent=False)

    def loss_weights(self, values: list[float], context: Mapping[str, Any]) -> list[float]:
        # On the ray within the rounding of the losses' own dtype (the values are float64).
        return _pbi(values, host_view(self, "preference").tolist(), self.theta,
                    host_view(self, "reference").tolist(), finfo(self._loss_dtype).eps)

    def extra_repr(self) -> str:
        return f"theta={self.theta}, preference={self.preference.tolist()}"
