"""Use any TorchJD weighting as an mtlkit balancer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from mtlkit.balancers._base import GramianWeighting
from mtlkit.balancers._registry import register

INSTALL_HINT = "pip install mtlkit[torchjd]"


def _torchjd_aggregation() -> Any:
    try:
        from torchjd import aggregation
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            f"TorchJDWeighting needs the optional dependency torchjd: {INSTALL_HINT}"
        ) from err
    return aggregation


@register("torchjd")
class TorchJDWeighting(GramianWeighting):
    r"""Any TorchJD :class:`~torchjd.aggregation.Weighting` of the Gram matrix, as a balancer.

    TorchJD (Quinton & Rey, *Jacobian Descent for Multi-Objective Optimization*, 2024,
    arXiv:2406.16232) maps the K x K Gram matrix of the task gradients to K weights with its
    ``Weighting`` classes (``UPGradWeighting``, ``MGDAWeighting``, ``DualProjWeighting``, ...).
    This class lets mtlkit's engine compute the Gram matrix (parameters or features mode,
    batched or looped) and write :math:`\sum_k w_k g_k`, with the weights from TorchJD:

    .. math::  w = \mathrm{weighting}(G), \qquad d = \sum_k w_k g_k.

    .. note:: Requires the optional dependency: ``pip install mtlkit[torchjd]`` (imported when
       the class is instantiated). The weighting is a child module, so its registered buffers
       are part of ``state_dict()``; state that TorchJD keeps in plain attributes (e.g. its
       ``NashMTL``, or the global random generator used by ``PCGradWeighting``) is not, and a
       resumed run can then differ. Weightings that need the Jacobian matrix itself rather
       than its Gram matrix are not supported.

    Args:
        tasks: task names.
        weighting: a TorchJD ``Weighting`` instance, or the name of one in
            ``torchjd.aggregation`` (e.g. ``"UPGradWeighting"``), built with ``options``.
        options: keyword arguments of the weighting's constructor when ``weighting`` is a name.
        grad_on, strategy, chunk_size, check_finite: see :class:`GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._torchjd import TorchJDWeighting
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
        >>> b = TorchJDWeighting(["a", "b"], weighting="MGDAWeighting")
        >>> {t: round(w, 4) for t, w in b.backward([p @ g1, p @ g2], shared=[p]).weights.items()}
        {'a': 0.8, 'b': 0.2}
    """

    def __init__(
        self,
        tasks: Sequence[str],
        weighting: Any = "UPGradWeighting",
        options: Mapping[str, Any] | None = None,
        **engine_options: Any,
    ) -> None:
        super().__init__(tasks, **engine_options)
        aggregation = _torchjd_aggregation()
        if isinstance(weighting, str):
            cls = getattr(aggregation, weighting, None)
            known = isinstance(cls, type) and issubclass(cls, aggregation.Weighting)
            if not known:
                names = sorted(n for n in dir(aggregation) if n.endswith("Weighting")
                               and n != "Weighting")
                raise ValueError(f"unknown TorchJD weighting {weighting!r}; available: {names}")
            weighting = cls(**dict(options or {}))
        elif options:
            raise ValueError("options apply only when weighting is given by name")
        if not isinstance(weighting, aggregation.Weighting):
            raise TypeError(
                f"weighting must be a torchjd.aggregation.Weighting or its name, got "
                f"{type(weighting).__name__}"
            )
        self.weighting: nn.Module = weighting

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        weights: Tensor = self.weighting(gramian)
        if weights.shape != (gramian.shape[0],):
            raise ValueError(
                f"{type(self.weighting).__name__} returned weights of shape "
                f"{tuple(weights.shape)}, expected ({gramian.shape[0]},)"
            )
        return weights.detach().to(device=gramian.device, dtype=gramian.dtype)

    def __str__(self) -> str:
        return f"torchjd:{type(self.weighting).__name__}"
