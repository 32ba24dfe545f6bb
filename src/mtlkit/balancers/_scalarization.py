"""Preference-based scalarizations: STCH, COSMOS and PBI.

Each turns the K loss values into one scalar ``s(L)`` given a preference vector. The update is
the gradient of ``s(L(theta))``, i.e. ``sum_k w_k grad L_k`` with ``w = ds/dL`` at the current
losses: these are loss weightings (one backward pass, like a plain sum), whose effective
weights are the partial derivatives of the scalarization. The pure functions below return
those weights; the classes add the preference and the validation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from mtlkit.balancers._base import LossWeighting, positive
from mtlkit.balancers._registry import register


# ---------------------------------------------------------------------------- pure functions
def stch_weights(losses: Tensor, preference: Tensor, mu: float, reference: Tensor) -> Tensor:
    r"""d/dL of :math:`\mu \log \sum_k \exp(\lambda_k (L_k - z_k) / \mu)`:
    :math:`w_k = \lambda_k\, \mathrm{softmax}(\lambda (L - z) / \mu)_k`.

    >>> stch_weights(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5]), 1.0, torch.zeros(2))
    tensor([0.2500, 0.2500])
    """
    # softmax subtracts the maximum first: finite for any finite losses and any mu > 0.
    return preference * torch.softmax(preference * (losses - reference) / mu, dim=0)


def cosmos_weights(losses: Tensor, preference: Tensor, penalty: float) -> Tensor:
    r"""d/dL of :math:`r^\top L - \lambda\, r^\top L / (\lVert r\rVert \lVert L\rVert)`.

    The cosine term's derivative is :math:`(r - \cos(r, L) \lVert r\rVert\, \hat L)
    / (\lVert r\rVert \lVert L\rVert)`, with :math:`\hat L = L / \lVert L\rVert`; where all
    losses are 0 the cosine is undefined and only the linear part is kept.

    >>> cosmos_weights(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5]), 1.0)
    tensor([0.5000, 0.5000])
    """
    # Work on L / max|L|: the cosine is scale-invariant, and its gradient scales as 1/||L||,
    # so computing at unit scale and dividing once keeps 1e-30 or 1e30 losses finite.
    top = losses.abs().max()
    unit = losses / torch.where(top > 0, top, torch.ones_like(top))
    norm_l = unit.norm()
    norm_r = preference.norm()
    safe = torch.where(norm_l > 0, norm_l, torch.ones_like(norm_l))
    l_hat = unit / safe
    cos = (preference @ l_hat) / norm_r
    d_cos = (preference / norm_r - cos * l_hat) / (safe * torch.where(top > 0, top, 1.0))
    d_cos = torch.where(norm_l > 0, d_cos, torch.zeros_like(d_cos))
    return preference - penalty * d_cos


def pbi_weights(losses: Tensor, preference: Tensor, theta: float, reference: Tensor) -> Tensor:
    r"""d/dL of :math:`d_1 + \theta d_2`, with :math:`r = L - z`, :math:`\hat w = w/\lVert w\rVert`,
    :math:`d_1 = r^\top \hat w` and :math:`d_2 = \lVert r - d_1 \hat w\rVert`:
    :math:`\hat w + \theta (r - d_1 \hat w) / d_2`; where :math:`d_2 = 0` (the losses on the
    preference ray) the perpendicular part's subgradient 0 is taken.

    >>> pbi_weights(torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.5]), 5.0, torch.zeros(2))
    tensor([0.7071, 0.7071])
    """
    w_hat = preference / preference.norm()
    r = losses - reference
    # d2's direction does not depend on the scale of r: normalise first so that 1e-30 and
    # 1e30 losses give the same finite weights.
    top = r.abs().max()
    r = r / torch.where(top > 0, top, torch.ones_like(top))
    perp = r - (r @ w_hat) * w_hat
    d2 = perp.norm()
    unit_perp = perp / torch.where(d2 > 0, d2, torch.ones_like(d2))
    # d2 below float rounding of r is a point on the ray: no perpendicular direction.
    on_ray = d2 <= 4 * torch.finfo(r.dtype).eps * r.norm()
    return w_hat + theta * torch.where(on_ray, torch.zeros_like(unit_perp), unit_perp)


# ---------------------------------------------------------------------------- classes
class _PreferenceScalarization(LossWeighting):
    """Shared validation of a preference vector (one positive number per task)."""

    preference: Tensor

    def _preference(self, preference: float | Mapping[str, float] | None) -> Tensor:
        if preference is None:
            return torch.full((self.num_tasks,), 1.0 / self.num_tasks)
        pref = self._task_values(preference, "preference")
        if bool((pref < 0).any()) or not bool((pref > 0).any()):
            raise ValueError(f"preference must be >= 0 with one entry > 0, got {pref.tolist()}")
        return pref


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
        self.register_buffer("preference", self._preference(preference), persistent=False)
        self.register_buffer("reference", self._task_values(reference, "reference"),
                             persistent=False)

    def loss_weights(self, values: Tensor, context: Mapping[str, Any]) -> Tensor:
        return stch_weights(values, self.preference.to(values.dtype), self.mu,
                            self.reference.to(values.dtype))

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
        pref = self._preference(preference) if self.fixed else torch.zeros(self.num_tasks)
        self.register_buffer("preference", pref, persistent=False)

    def preference_at(self, step: int) -> Tensor:
        """The preference :math:`r` used at step ``step`` (float64, on the host)."""
        if self.fixed:
            return self.preference.double().cpu()
        gen = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + int(step) * 7919) % (2**63 - 1)
        )
        # Dirichlet(alpha) as normalised Gamma(alpha) draws, from our own generator.
        conc = torch.full((self.num_tasks,), self.alpha, dtype=torch.float64)
        g = torch._standard_gamma(conc, generator=gen)
        return g / g.sum()

    def loss_weights(self, values: Tensor, context: Mapping[str, Any]) -> Tensor:
        pref = self.preference_at(int(self.step)).to(values.device, values.dtype)
        return cosmos_weights(values, pref, self.penalty)

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
        self.register_buffer("preference", self._preference(preference), persistent=False)
        self.register_buffer("reference", self._task_values(reference, "reference"),
                             persistent=False)

    def loss_weights(self, values: Tensor, context: Mapping[str, Any]) -> Tensor:
        return pbi_weights(values, self.preference.to(values.dtype), self.theta,
                           self.reference.to(values.dtype))

    def extra_repr(self) -> str:
        return f"theta={self.theta}, preference={self.preference.tolist()}"
