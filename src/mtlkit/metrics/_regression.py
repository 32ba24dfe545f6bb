"""Regression metrics: mean absolute error and root mean squared error."""

from __future__ import annotations

import torch
from torch import Tensor

from mtlkit.metrics._base import Metric
from mtlkit.metrics._utils import expand_mask, float_dtype, match_regression

NAN = float("nan")


class _ElementwiseError(Metric):
    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros((), dtype=torch.float64))  # sum of |e| or e^2
        self.add_state("count", torch.zeros((), dtype=torch.long))  # number of labelled values

    def _error(self, diff: Tensor) -> Tensor:
        raise NotImplementedError

    def _update(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> None:
        pred = match_regression(pred, target)
        dtype = float_dtype(pred.device)
        err = self._error(pred.to(dtype) - target.to(dtype))
        valid = expand_mask(mask, target.shape)
        if valid is None:
            self._add("total", err.sum())
            self._add("count", torch.tensor(err.numel(), device=err.device))
        else:
            self._add(
                "total",
                torch.where(valid, err, torch.zeros((), dtype=dtype, device=err.device)).sum(),
            )
            self._add("count", valid.sum())

    def _mean(self) -> Tensor | float:
        count = self._get("count")
        if int(count) == 0:
            return NAN
        return self._get("total") / count


class MAE(_ElementwiseError):
    """Mean absolute error over every labelled value (all outputs of all samples).

    ``pred`` must match ``target``'s shape (a trailing output dimension of size 1 is dropped, so
    a ``(N, 1)`` head output pairs with ``(N,)`` targets). ``mask`` is per sample or per value.

    Example:
        >>> import torch
        >>> from mtlkit.metrics import MAE
        >>> m = MAE()
        >>> m.update(torch.tensor([[1.0], [5.0], [0.0]]), torch.tensor([0.0, 2.0, 9.0]),
        ...          mask=torch.tensor([True, True, False]))
        >>> m.compute()  # (1 + 3) / 2; the unlabelled third sample is ignored
        2.0
    """

    name = "mae"

    def _error(self, diff: Tensor) -> Tensor:
        return diff.abs()

    def _compute(self) -> Tensor | float:
        return self._mean()


class RMSE(_ElementwiseError):
    """Root mean squared error over every labelled value (the root of the pooled mean).

    Same inputs as :class:`MAE`.

    Example:
        >>> import torch
        >>> from mtlkit.metrics import RMSE
        >>> m = RMSE()
        >>> m.update(torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0]))
        >>> round(m.compute(), 4)  # sqrt((9 + 16) / 2)
        3.5355
    """

    name = "rmse"

    def _error(self, diff: Tensor) -> Tensor:
        return diff.square()

    def _compute(self) -> Tensor | float:
        mean = self._mean()
        return mean if isinstance(mean, float) else mean.sqrt()
