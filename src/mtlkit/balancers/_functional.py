"""Helpers that several balancers share: one inner optimiser and one Gram preprocessing.

* :class:`InnerAdam`: Adam with bias correction for a balancer's own small parameter vector
  (GradNorm's weights on the device, FAMO's logits on the host), its moments registered as
  buffers so that they are saved with the balancer's ``state_dict()``.
* :func:`host_view`: a cached memoryview of a module's host buffer, :func:`host_write`,
  :func:`host_add`;
  :func:`softmax` of a few floats in plain Python.
* :func:`normalize_gramian`: the Gram matrix in float64 divided by its trace (most weightings
  are invariant to that scale; dividing first keeps the solvers' tolerances meaningful).
* :func:`cosine_gramian`: the Gram matrix of the unit task gradients, invariant to the scale of
  each task separately (IMTL-G, Aligned-MTL's rank).
* :func:`numerical_rank`: how many eigenvalues of a cosine Gram matrix are above the float32
  noise of the gradients it came from.
* :func:`safe_row_norms`: the norms of the rows of a matrix without overflow or underflow.
"""

from __future__ import annotations

import functools
import math
from array import array
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

#: Relative resolution of the task gradients the Gram matrices come from (float32: the engine
#: accumulates Gram matrices in float64, but the gradients themselves carry float32 rounding).
GRADIENT_EPS = torch.finfo(torch.float32).eps


class InnerAdam(nn.Module):
    """Adam with bias correction (Kingma & Ba, ICLR 2015, arXiv:1412.6980) for a balancer's own
    parameter vector, updated in place by :meth:`step`; the moments and the step count are
    buffers (``m``, ``v`` of shape (n,), ``t`` a scalar), so they are part of the balancer's
    ``state_dict()`` and a resumed run continues the same trajectory.

    :meth:`step` works on the device (torch tensors, no host synchronisation: GradNorm,
    Auto-Lambda) or on the host (FAMO's logits, a :func:`host_view` of a host buffer: the
    moments must then be host buffers too, read and written the same way), with the same
    formula (:meth:`_update`; written out per entry on the host, checked equal in the tests).

    Args:
        size: length of the parameter vector.
        lr: learning rate.
        betas: decay rates of the moments (default (0.9, 0.999)).
        eps: added to the square root of the second moment (default 1e-8).
        dtype: dtype of the moments (default float32).

    Example:
        >>> import torch
        >>> adam = InnerAdam(2, lr=0.1)
        >>> x = torch.tensor([1.0, 1.0])
        >>> adam.step(x, torch.tensor([3.0, -0.5]))  # the first step is lr * sign(grad)
        >>> x
        tensor([0.9000, 1.1000])
        >>> host = InnerAdam(2, lr=0.1, dtype=torch.float64)
        >>> y = torch.ones(2, dtype=torch.float64)
        >>> host.step(memoryview(y.numpy()), [3.0, -0.5])  # the same step on the host
        [0.9000000003333333, 1.099999998]
        >>> y, host.t.item()
        (tensor([0.9000, 1.1000], dtype=torch.float64), 1)
    """

    m: Tensor
    v: Tensor
    t: Tensor
    #: Buffer name -> (memoryview, buffer) for host steps (see :func:`host_view`). Not state.
    _views: dict[str, tuple[memoryview, Tensor]]

    def __init__(self, size: int, lr: float, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lr, self.betas, self.eps = lr, betas, eps
        self.register_buffer("m", torch.zeros(size, dtype=dtype))
        self.register_buffer("v", torch.zeros(size, dtype=dtype))
        self.register_buffer("t", torch.zeros((), dtype=torch.long))

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_views", None)  # views of this object's buffers, not of a copy's
        return state

    def step(self, param: Tensor | memoryview, grad: Tensor | Sequence[float]
             ) -> list[float] | None:
        """One Adam step of ``param`` (in place) along ``grad``: on the host (``param`` a
        memoryview, see :func:`host_view`; ``grad`` a list of floats: the formula runs on each
        entry in Python floats; returns the new values), or on the device (tensors: no host
        synchronisation, the bias corrections are computed there)."""
        b1, b2 = self.betas
        if not isinstance(param, Tensor):
            m, v, t = host_view(self, "m"), host_view(self, "v"), host_view(self, "t")
            t[()] = count = t[()] + 1
            # _update's formula written out per entry, each result written in place (a call
            # per entry, or three lists copied back, cost 20-80 % more, measured alone; the two
            # forms are checked equal in tests/balancers/test_host_weights.py)
            c1, c2, lr, eps, sqrt = 1 - b1**count, 1 - b2**count, self.lr, self.eps, math.sqrt
            new = []
            for k, (x, g, a, b) in enumerate(zip(param.tolist(), grad, m.tolist(), v.tolist())):
                m[k] = a = b1 * a + (1 - b1) * g
                v[k] = b = b2 * b + (1 - b2) * g * g
                param[k] = x = x - lr * (a / c1) / (sqrt(b / c2) + eps)
                new.append(x)
            return new
        with torch.no_grad():
            self.t += 1
            count = self.t.to(self.m.dtype)
            new = self._update(param, grad.to(self.m.dtype), self.m, self.v,  # type: ignore[union-attr]
                               1 - b1**count, 1 - b2**count, torch.sqrt)
            for old, value in zip((param, self.m, self.v), new):
                old.copy_(value)
        return None

    def _update(self, param: Any, grad: Any, m: Any, v: Any, c1: Any, c2: Any,
                sqrt: Callable[[Any], Any]) -> tuple[Any, Any, Any]:
        """The Adam update (torch.optim.Adam's form) of floats or tensors: (param, m, v) after
        it, with ``c1``, ``c2`` the bias corrections 1 - beta^t of this step."""
        b1, b2 = self.betas
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        param = param - self.lr * (m / c1) / (sqrt(v / c2) + self.eps)
        return param, m, v

    def extra_repr(self) -> str:
        return f"lr={self.lr}, betas={self.betas}"


@functools.cache
def finfo(dtype: torch.dtype) -> torch.finfo:
    """``torch.finfo(dtype)``, cached (it costs more than a step's K-sized host maths)."""
    return torch.finfo(dtype)


def softmax(values: list[float]) -> list[float]:
    """The softmax of a few floats in plain Python (K-sized host maths: a Python float
    operation costs ~0.05 us where a NumPy one costs ~0.5 us and a torch one 2-9 us).

    >>> softmax([0.0, 0.0])
    [0.5, 0.5]
    """
    top = max(values)
    e = [math.exp(v - top) for v in values]
    total = sum(e)
    return [v / total for v in e]


def host_view(module: nn.Module, name: str) -> memoryview:
    """A memoryview of the host buffer ``name`` of ``module``: ``view.tolist()``, ``view[k]``
    (``view[()]`` for a 0-d buffer) read the buffer, item assignments and :func:`host_write`
    write it in place. Cached in ``module._views`` and remade only when the buffer is another
    tensor (assigned, or moved). The step counter and the host state of loss weightings are
    read and written this way every step: inside a training step a NumPy or torch call costs
    ~4 us (its machinery touches memory the step evicted from the caches), an item access of a
    memoryview tens of ns. A module that uses it drops ``_views`` from its pickled state (a
    copy's views would not view the copy's buffers; :class:`~mtlkit.balancers.Balancer` and
    :class:`InnerAdam` do)."""
    views = module.__dict__.get("_views")
    if views is None:
        views = module.__dict__["_views"] = {}
    buffer = module._buffers[name]
    hit = views.get(name)
    if hit is None or hit[1] is not buffer:
        hit = views[name] = (memoryview(buffer.numpy()), buffer)  # type: ignore[union-attr]
    return hit[0]


def host_write(view: memoryview, values: Sequence[float]) -> None:
    """Write the floats ``values`` into the 1-D :func:`host_view` ``view`` (one copy)."""
    view[:] = array(view.format, values)


def host_add(view: memoryview, values: Sequence[float]) -> None:
    """Add the floats ``values`` to the 1-D :func:`host_view` ``view`` (a running sum)."""
    host_write(view, [a + b for a, b in zip(view.tolist(), values)])


def normalize_gramian(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """(G / trace(G) in float64, trace): a zero or non-finite trace gives the zero matrix, so
    that callers treat it as "all gradients zero" without a host branch.

    Example:
        >>> import torch
        >>> g, trace = normalize_gramian(torch.tensor([[3.0, 1.0], [1.0, 1.0]]))
        >>> g, trace
        (tensor([[0.7500, 0.2500],
                [0.2500, 0.2500]], dtype=torch.float64), tensor(4., dtype=torch.float64))
    """
    g = gramian.double()
    trace = g.diagonal(dim1=-2, dim2=-1).sum(-1)
    usable = (trace > 0) & torch.isfinite(trace)
    scale = torch.where(usable, trace, 1.0)
    out = torch.where(usable[..., None, None], g / scale[..., None, None], 0.0)
    return out, trace


def cosine_gramian(gramian: Tensor) -> tuple[Tensor, Tensor]:
    """(cosine matrix D^-1 G D^-1 in float64, norms D): the Gram matrix of the unit task
    gradients and the gradient norms. A zero gradient has a zero row and column (cosine 0 with
    every task, itself included). Rescaling one task's gradient leaves the cosine matrix as it
    is: rank decisions taken on it do not depend on the scales of the losses.

    Example:
        >>> import torch
        >>> c, n = cosine_gramian(torch.tensor([[4.0, 2.0, 0.0], [2.0, 4.0, 0.0], [0.0] * 3]))
        >>> c, n
        (tensor([[1.0000, 0.5000, 0.0000],
                [0.5000, 1.0000, 0.0000],
                [0.0000, 0.0000, 0.0000]], dtype=torch.float64), tensor([2., 2., 0.], dtype=torch.float64))
    """
    g = gramian.double()
    norms = g.diagonal().clamp_min(0).sqrt()
    inv = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(g.dtype).tiny), 0.0)
    return g * inv[:, None] * inv[None, :], norms


def numerical_rank(cosine: Tensor, eigenvalues: Tensor | None = None) -> Tensor:
    """The number of eigenvalues of a cosine Gram matrix (see :func:`cosine_gramian`) above
    ``K * eps(float32) * K``, the noise that float32 task gradients leave in it (its largest
    eigenvalue is at most K). A 0-d int64 tensor on the matrix's device (no host read)."""
    k = cosine.shape[-1]
    lam = torch.linalg.eigvalsh(cosine) if eigenvalues is None else eigenvalues
    return (lam > k * k * GRADIENT_EPS).sum(-1)


def safe_row_norms(matrix: Tensor) -> Tensor:
    """Euclidean norms of the rows of a (K, P) matrix, computed after dividing by its largest
    magnitude: finite for every finite input (a float32 sum of squares overflows from about
    1e19 and underflows below 1e-23). Zero rows have norm 0.

    Example:
        >>> import torch
        >>> safe_row_norms(torch.tensor([[3e30, 4e30], [0.0, 0.0]]))
        tensor([5.0000e+30, 0.0000e+00])
    """
    top = matrix.abs().amax()
    scale = torch.where(top > 0, top, 1.0)
    return (matrix / scale).norm(dim=1) * scale
