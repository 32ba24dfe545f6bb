"""Multilinear Relationship Networks: a tensor-normal prior over the task-specific layers."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from mtlkit.nn._base import MultiTaskModel, check_out_features, int_sequence, positive_int
from mtlkit.nn._utils import module_list


def _mode_product(t: Tensor, m: Tensor, mode: int) -> Tensor:
    """Multiply tensor ``t`` along ``mode`` by the square matrix ``m``."""
    out: Tensor = torch.movedim(torch.tensordot(m, t, dims=([1], [mode])), 0, mode)
    return out


def _mode_covariance(t: Tensor, inverses: Sequence[Tensor | None], mode: int) -> Tensor:
    """``T_(mode) (kron of the other modes' inverses) T_(mode)^T``: the mode-``mode`` scatter of
    ``t`` whitened along the other modes (``inverses[mode]`` is ignored)."""
    w = t
    for other, inv in enumerate(inverses):
        if other != mode and inv is not None:
            w = _mode_product(w, inv, other)
    dims = [d for d in range(t.dim()) if d != mode]
    out: Tensor = torch.tensordot(t, w, dims=(dims, dims))
    return out


def _linear(m: nn.Module) -> nn.Linear:
    assert isinstance(m, nn.Linear)
    return m


class MRN(MultiTaskModel):
    """Multilinear Relationship Network: a shared encoder, task-specific fully connected
    layers, and a tensor-normal prior that learns how the tasks' layers relate.

    Proposed in *Learning Multiple Tasks with Multilinear Relationship Networks* (Long, Cao,
    Wang, Yu, NeurIPS 2017, arXiv:1506.02117). For each task-specific layer ``l``, the weights
    of the ``K`` tasks form a tensor ``W`` of shape ``D1 x D2 x K`` (input features x outputs x
    tasks). The prior is ``vec(W) ~ N(0, Sigma_1 ⊗ Sigma_2 ⊗ Sigma_3)`` with feature, output
    (class) and task covariances. :meth:`regularizer` is the prior's negative log-density
    without the constants, ``1/2 sum_l vec(W)^T (Sigma_1 ⊗ Sigma_2 ⊗ Sigma_3)^-1 vec(W)``.
    Biases are not regularised. :meth:`update_covariances` runs the paper's flip-flop
    maximum-likelihood updates (Eq. 7), each factor given the newest others::

        Sigma_1 = W_(1) (Sigma_3 ⊗ Sigma_2)^-1 W_(1)^T / (D2 K) + eps I
        Sigma_2 = W_(2) (Sigma_3 ⊗ Sigma_1)^-1 W_(2)^T / (D1 K) + eps I
        Sigma_3 = W_(3) (Sigma_2 ⊗ Sigma_1)^-1 W_(3)^T / (D1 D2) + eps I

    ``W_(n)`` is the mode-``n`` unfolding. The Kronecker products are never formed. The paper
    alternates: a few SGD steps on ``loss + regularizer``, then ``update_covariances()``.

    .. note:: The official PyTorch code (github.com/thuml/MTlearn) differs. It updates the three
       factors from the previous values at once, adds ``1e-5 I`` before inverting, drops the
       ``1/(D K)`` factors, and rescales each inverse covariance to unit trace. That keeps the
       penalty small. With the paper's ML covariances, the penalty is about ``D1 D2 K / 2`` per
       layer at the fixed point whatever the weight scale, so weight it to taste.

    Args:
        encoder: shared network, input -> ``(batch, in_features)``.
        in_features: the encoder's output size.
        tasks: task name -> output size. All tasks need the same size, because the prior stacks
            their layers.
        hidden: sizes of task-specific hidden layers (ReLU) before the output layer. The paper's
            ``fc7``/``fc8`` setting is ``hidden=(D,)``.
        eps: ridge ``eps I`` added in every covariance update.

    Buffers (per task-specific layer ``l``): ``cov_feature_l`` ``(D1, D1)``, ``cov_output_l``
    ``(D2, D2)``, ``cov_task_l`` ``(K, K)``, all starting at the identity, and their inverses
    ``inv_*_l``. They are created as float64 (``model.to(dtype)`` casts them like any buffer),
    and :meth:`update_covariances` always computes in float64.

    ``features`` is the encoder output. Shared parameters: the encoder. Task parameters: the
    task's layers. The prior couples tasks through the regulariser only.

    Example:
        >>> import torch
        >>> from mtlkit.nn import MRN
        >>> model = MRN(torch.nn.Linear(5, 8), 8, {"a": 3, "b": 3}, hidden=(4,))
        >>> tuple(model(torch.randn(2, 5))["a"].shape)
        (2, 3)
        >>> reg = model.regularizer()  # identity covariances: 1/2 ||W||^2
        >>> w2 = sum(layer.weight.pow(2).sum() for t in model.tasks for layer in model.layers[t])
        >>> torch.allclose(reg, 0.5 * w2)
        True
        >>> model.update_covariances()
        >>> tuple(model.cov_task_0.shape)
        (2, 2)
    """

    def __init__(
        self,
        encoder: nn.Module,
        in_features: int,
        tasks: Mapping[str, int],
        *,
        hidden: Sequence[int] = (),
        eps: float = 1e-5,
    ) -> None:
        outs = check_out_features(tasks)
        super().__init__(outs)
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder)}")
        positive_int("in_features", in_features)
        sizes = set(outs.values())
        if len(sizes) != 1:
            raise ValueError(
                f"tasks: all tasks need the same output size for the stacked prior, got {outs}"
            )
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        self.eps = float(eps)
        dims = (in_features, *int_sequence("hidden", hidden), sizes.pop())
        self.dims = dims
        self.encoder = encoder
        self.layers = nn.ModuleDict(
            {
                t: nn.ModuleList(nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1))
                for t in self.tasks
            }
        )
        k = len(self.tasks)
        for i in range(len(dims) - 1):
            for name, n in (("feature", dims[i]), ("output", dims[i + 1]), ("task", k)):
                eye = torch.eye(n, dtype=torch.float64)
                self.register_buffer(f"cov_{name}_{i}", eye)
                self.register_buffer(f"inv_{name}_{i}", eye.clone())

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.encoder(x)
        self.features = f
        out = {}
        for t in self.tasks:
            h = f
            layers = module_list(self.layers, t)
            for i, layer in enumerate(layers):
                h = layer(h)
                if i < len(layers) - 1:
                    h = torch.relu(h)
            out[t] = h
        return out

    def stacked_weights(self, layer: int) -> Tensor:
        """The ``D1 x D2 x K`` weight tensor of task-specific layer ``layer``."""
        weights = [_linear(module_list(self.layers, t)[layer]).weight.T for t in self.tasks]
        return torch.stack(weights, dim=-1)

    def _inverses(self, layer: int) -> list[Tensor]:
        return [getattr(self, f"inv_{n}_{layer}") for n in ("feature", "output", "task")]

    def regularizer(self) -> Tensor:
        """``1/2 sum_l vec(W_l)^T (Sigma_1 ⊗ Sigma_2 ⊗ Sigma_3)^-1 vec(W_l)``."""
        total = []
        for i in range(len(self.dims) - 1):
            w = self.stacked_weights(i)
            m = w
            for mode, inv in enumerate(self._inverses(i)):
                m = _mode_product(m, inv.to(w.dtype), mode)
            total.append((w * m).sum())
        return 0.5 * torch.stack(total).sum()

    @torch.no_grad()
    def update_covariances(self, iterations: int = 1) -> None:
        """Run ``iterations`` rounds of the flip-flop updates (feature, output, task) on the
        current weights, in float64, and store covariances and inverses in the buffers."""
        positive_int("iterations", iterations)
        for i in range(len(self.dims) - 1):
            w = self.stacked_weights(i).detach().to(torch.float64)
            names = ("feature", "output", "task")
            invs: list[Tensor | None] = [
                getattr(self, f"inv_{n}_{i}").to(torch.float64) for n in names
            ]
            covs: list[Tensor] = [getattr(self, f"cov_{n}_{i}").to(torch.float64) for n in names]
            for _ in range(iterations):
                for mode in range(3):
                    scale = w.numel() // w.shape[mode]
                    cov = _mode_covariance(w, invs, mode) / scale
                    cov = cov + self.eps * torch.eye(
                        w.shape[mode], dtype=torch.float64, device=w.device
                    )
                    cov = 0.5 * (cov + cov.T)
                    covs[mode] = cov
                    invs[mode] = torch.linalg.inv(cov)
            for n, cov, inv in zip(names, covs, invs):
                assert inv is not None
                getattr(self, f"cov_{n}_{i}").copy_(cov)
                getattr(self, f"inv_{n}_{i}").copy_(0.5 * (inv + inv.T))

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        return self.layers[task].parameters()
