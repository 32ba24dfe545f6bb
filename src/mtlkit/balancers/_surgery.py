"""Gradient surgery: PCGrad, GradDrop and GradVac."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from mtlkit.balancers._base import BlockGramianWeighting, GramianWeighting, JacobianAggregator
from mtlkit.balancers._functional import normalize_gramian
from mtlkit.balancers._registry import register


def _random_orders(gen: torch.Generator, shape: tuple[int, ...], k: int) -> Tensor:
    """For every leading index and every task i, the other K-1 tasks in a random order:
    a (*shape, K, K-1) int64 tensor (CPU), independent across all leading indices."""
    keys = torch.rand((*shape, k, k), generator=gen, dtype=torch.float64)
    keys = keys + torch.eye(k, dtype=torch.float64) * 2.0  # task i itself sorts last
    return keys.argsort(dim=-1)[..., : k - 1]


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copy a small CPU tensor to ``device`` without making the host wait for the device (a
    copy from pageable memory to a GPU waits for the stream; from pinned memory it does not)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


@register("pcgrad")
class PCGrad(GramianWeighting):
    r"""Projecting conflicting gradients: remove from each task gradient its component along
    every other task gradient it conflicts with, in random order.

    Proposed in Yu, Kumar, Gupta, Levine, Hausman & Finn, *Gradient Surgery for Multi-Task
    Learning* (NeurIPS 2020, arXiv:2001.06782), Algorithm 1. For every task i, with
    :math:`g_i^{PC} \leftarrow g_i`, and for every other task j in a random order:

    .. math::  \text{if } \langle g_i^{PC}, g_j \rangle < 0: \quad
        g_i^{PC} \leftarrow g_i^{PC} - \frac{\langle g_i^{PC}, g_j\rangle}{\|g_j\|^2}\, g_j,
        \qquad d = \sum_i g_i^{PC}.

    Each task is projected against the *original* gradients of the others, as in the paper.
    Every :math:`g_i^{PC}` is a linear combination :math:`\sum_j C_{ij} g_j`, whose inner
    products follow from the Gram matrix (:math:`\langle g_i^{PC}, g_j\rangle = (C G)_{ij}`), so
    the update is :math:`d = \sum_j w_j g_j` with :math:`w = C^\top \mathbf 1`, computed on the
    device with no host synchronisation; the K tasks are processed in parallel.

    The random orders are drawn from a generator seeded by ``(seed, step)``: a run is
    reproducible, and a resumed run draws the same orders as an uninterrupted one. Each task
    gets its own order.

    Args:
        tasks: task names.
        seed: seed of the projection orders (default 0).
        grad_on, strategy, chunk_size, check_finite: see :class:`GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._surgery import PCGrad
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
        >>> step = PCGrad(["a", "b"]).backward([p @ g1, p @ g2], shared=[p])
        >>> {t: round(w, 4) for t, w in step.weights.items()}  # <g1, g2> = -1
        {'a': 2.0, 'b': 1.5}
        >>> p.grad  # (g1 + g2/2) + (g2 + g1)
        tensor([0.5000, 1.5000])
    """

    def __init__(
        self,
        tasks: Sequence[str],
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        self.seed = _check_seed(seed)

    def gramian_weights(self, gramian: Tensor, losses: Tensor) -> Tensor:
        k = gramian.shape[0]
        g = gramian.double()
        if k == 1:
            return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
        order = _to_device(_random_orders(self._rng(), (), k), g.device)
        rows = torch.arange(k, device=g.device)
        coef = torch.eye(k, dtype=g.dtype, device=g.device)
        dots = g.clone()  # dots[i, j] = <g_i^PC, g_j>
        sq = g.diagonal()
        tiny = torch.finfo(g.dtype).tiny
        for step in range(k - 1):
            j = order[:, step]
            dot = dots[rows, j]
            sq_j = sq[j]
            t = torch.where((dot < 0) & (sq_j > 0), -dot / sq_j.clamp_min(tiny), 0.0)
            coef[rows, j] += t
            dots += t[:, None] * g[j]
        return coef.sum(0).to(gramian.dtype)

    def extra_repr(self) -> str:
        return f"seed={self.seed}, {super().extra_repr()}"


@register("graddrop")
class GradDrop(JacobianAggregator):
    r"""Gradient sign dropout: at every coordinate, keep only the task gradients of one sign,
    chosen at random in proportion to how consistent the signs are.

    Proposed in Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, *Just Pick a Sign:
    Optimizing Deep Multitask Models with Gradient Sign Dropout* (NeurIPS 2020,
    arXiv:2010.06808), Algorithm 1. Per coordinate, with the positive sign purity
    :math:`P = \frac12 \big(1 + \sum_i g_i / \sum_i |g_i|\big)` and :math:`U \sim U(0, 1)`:

    .. math::  M_i = \mathbb 1[P > U]\, \mathbb 1[g_i > 0] + \mathbb 1[P < U]\, \mathbb 1[g_i < 0],
        \qquad d = \sum_i \big(\ell_i + (1 - \ell_i) M_i\big)\, g_i,

    with leak :math:`\ell_i` (the share of task i's gradient that always passes). The update
    is not a linear combination of whole task gradients, so this method needs the K x P task
    gradients themselves (``requires = "jacobian"``). The effective weight reported for task i
    is the share of its squared gradient norm that was kept,
    :math:`\langle d_i, g_i\rangle / \|g_i\|^2` with :math:`d_i = (\ell_i + (1-\ell_i) M_i) g_i`.

    .. note:: The paper applies GradDrop at an activation layer (``grad_on="features"``: the
       coordinates are those of the shared representation) and uses the identity for its
       monotone function f, as here. For gradients that are separate per example, LibMTL's
       implementation first sums them over the batch dimension, weighted by the sign of the
       activations, and shares one mask across the batch; that variant is not implemented: P
       and the mask are computed per coordinate of the chosen space (every example's features,
       or every shared parameter). ``U`` is drawn from a generator seeded by
       ``(seed, step)``, on the gradients' device.

    Args:
        tasks: task names.
        leak: :math:`\ell_i \in [0, 1]`, one value or per task (paper default 0).
        seed: seed of the dropout draws (default 0).
        grad_on, strategy, chunk_size, check_finite: see :class:`GradientBalancer`.

    Example:
        >>> import torch
        >>> from mtlkit.balancers._surgery import GradDrop
        >>> p = torch.nn.Parameter(torch.zeros(3))
        >>> g1, g2 = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([3.0, 1.0, -2.0])
        >>> GradDrop(["a", "b"]).backward([p @ g1, p @ g2], shared=[p]).weights  # no conflict
        {'a': 1.0, 'b': 1.0}
        >>> p.grad
        tensor([ 4.,  3., -3.])
    """

    leak: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        leak: float | Mapping[str, float] = 0.0,
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        values = self._task_values(leak, "leak")
        for t, v in zip(self.tasks, values.tolist()):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"leak for task {t!r} must be in [0, 1], got {v}")
        self.register_buffer("leak", values, persistent=False)
        self.seed = _check_seed(seed)

    def _uniform(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The U(0, 1) draws of the current step (exposed for tests)."""
        return torch.rand(shape, generator=self._rng(device=device), device=device, dtype=dtype)

    def aggregate(self, jacobian: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        j = jacobian
        total = j.sum(0)
        magnitude = j.abs().sum(0)
        purity = torch.where(
            magnitude > 0, 0.5 * (1 + total / magnitude.clamp_min(torch.finfo(j.dtype).tiny)), 0.5
        )
        u = self._uniform(purity.shape, j.device, j.dtype)
        keep = ((purity > u) & (j > 0)) | ((purity < u) & (j < 0))
        leak = self.leak.to(device=j.device, dtype=j.dtype)[:, None]
        share = leak + (1 - leak) * keep
        # <kept_i, g_i> / ||g_i||^2 on the gradients divided by their largest magnitude (a
        # float32 sum of squares overflows from ~1e19)
        top = j.abs().amax()
        unit_sq = (j / torch.where(top > 0, top, 1.0)).square()
        sq = unit_sq.sum(1)
        weights = torch.where(sq > 0, (share * unit_sq).sum(1) / torch.where(sq > 0, sq, 1.0), 0.0)
        return (share * j).sum(0), weights

    def extra_repr(self) -> str:
        return f"leak={self.leak.tolist()}, seed={self.seed}, {super().extra_repr()}"


@register("gradvac")
class GradVac(BlockGramianWeighting):
    r"""Gradient Vaccine: raise the cosine similarity of each pair of task gradients to an
    adaptive target, a moving average of the similarities seen so far.

    Proposed in Wang, Tsvetkov, Firat & Cao, *Gradient Vaccine: Investigating and Improving
    Multi-task Optimization in Massively Multilingual Models* (ICLR 2021, arXiv:2010.05874),
    Algorithm 1. Per parameter group, for every task i and every other task j in a random
    order, with :math:`\phi_{ij} = \cos(g_i^{PC}, g_j)` and target :math:`\hat\phi_{ij}`:

    .. math::  \text{if } \phi_{ij} < \hat\phi_{ij}: \quad g_i^{PC} \leftarrow g_i^{PC} +
        \frac{\|g_i^{PC}\| \big(\hat\phi_{ij}\sqrt{1-\phi_{ij}^2} - \phi_{ij}
        \sqrt{1-\hat\phi_{ij}^2}\big)}{\|g_j\| \sqrt{1-\hat\phi_{ij}^2}}\, g_j, \qquad
        \hat\phi_{ij} \leftarrow (1-\beta)\,\hat\phi_{ij} + \beta\, \phi_{ij},

    and the group's update is :math:`\sum_i g_i^{PC}`. As for :class:`PCGrad`, every step is
    expressed with coefficients on the original gradients, so only each group's Gram matrix is
    needed; the tasks and groups are processed in parallel on the device.

    Groups (``group``), as the paper's granularities (it found the finest, per layer, best):
    ``"layer"`` (default) starts a group at every shared tensor with two or more dimensions (a
    weight matrix or kernel) and adds the tensors that follow it (its bias, a following norm
    layer's affine parameters), in the order of ``shared`` (tensors before the first such one
    join its group; as for GradNorm's ``last_shared``, registration order is not always the
    order of computation); ``"tensor"`` gives every shared
    tensor its own group; ``"whole"`` treats the shared parameters as one group; a sequence of
    integers gives the sizes of consecutive groups of ``shared`` explicitly (e.g. ``(2, 2, 4)``).
    Each group has its own targets and Gram matrix and draws its own random orders (sharing one
    order across groups was a bug of a public implementation). With ``grad_on="features"``
    there is a single group, the representation.

    .. note:: The paper's targets start at 0. We compute cosines from each group's Gram matrix
       divided by its trace (cosines and the correction coefficients are invariant to that
       scale), so no epsilon is added to the denominators; a zero gradient has cosine 0. The
       target of a pair is updated at every step, whether or not it was corrected, as in
       Algorithm 1 (LibMTL updates it only after a correction). The orders come from a
       generator seeded by ``(seed, step)``.

    Args:
        tasks: task names.
        beta: EMA rate :math:`\beta \in [0, 1]` of the targets (default 0.01, a slow average;
            LibMTL and TorchJD default to 0.5).
        group: ``"layer"`` (default), ``"tensor"``, ``"whole"`` or group sizes (see above).
        seed: seed of the orders (default 0).
        grad_on, strategy, chunk_size, check_finite: see :class:`GradientBalancer`.

    State:
        ``targets`` (B, K, K) float64, :math:`\hat\phi` per group and ordered pair; sized at the
        first step (B groups), and resized when loading a state dict. The grouping must stay
        the same from step to step (an error otherwise).

    Example:
        >>> import torch
        >>> from mtlkit.balancers._surgery import GradVac
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
        >>> b = GradVac(["a", "b"], beta=0.5)
        >>> {t: round(w, 4) for t, w in b.backward([p @ g1, p @ g2], shared=[p]).weights.items()}
        {'a': 2.0, 'b': 1.5}
        >>> round(b.targets[0, 0, 1].item(), 4)  # 0.5 * 0 + 0.5 * cos(g1, g2)
        -0.3536
    """

    targets: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        beta: float = 0.01,
        group: Literal["layer", "tensor", "whole"] | Sequence[int] = "layer",
        seed: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(tasks, **options)
        beta = float(beta)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {beta}")
        self.beta = beta
        if isinstance(group, str):
            if group not in ("layer", "tensor", "whole"):
                raise ValueError(
                    f"group must be 'layer', 'tensor', 'whole' or a sequence of group sizes, "
                    f"got {group!r}"
                )
        else:
            sizes = tuple(group)
            if not sizes or any(isinstance(n, bool) or int(n) != n or n < 1 for n in sizes):
                raise ValueError(f"group sizes must be positive integers, got {group!r}")
            group = tuple(int(n) for n in sizes)
        self.group: str | tuple[int, ...] = group
        self.seed = _check_seed(seed)
        k = self.num_tasks
        self.register_buffer("targets", torch.zeros(0, k, k, dtype=torch.float64))

    def _group_ids(self, n_blocks: int) -> list[int]:
        """The group of every block (shared tensor, or the single features block)."""
        if self.grad_on == "features" or self.group == "whole":
            return [0] * n_blocks
        if self.group == "tensor" or (self.group == "layer" and len(self.block_shapes) != n_blocks):
            return list(range(n_blocks))
        if self.group == "layer":
            dims = [len(shape) for shape in self.block_shapes]
            ids, current = [], 0
            for i, d in enumerate(dims):
                if d >= 2 and i > 0 and any(x >= 2 for x in dims[:i]):
                    current += 1
                ids.append(current)
            return ids
        sizes = self.group
        assert isinstance(sizes, tuple)
        if sum(sizes) != n_blocks:
            raise ValueError(
                f"gradvac: group sizes {list(sizes)} cover {sum(sizes)} shared tensors, but "
                f"shared has {n_blocks}"
            )
        return [i for i, n in enumerate(sizes) for _ in range(n)]

    def block_weights(self, gramians: Tensor, losses: Tensor) -> Tensor:
        n_blocks, k = gramians.shape[0], gramians.shape[1]
        host_ids = self._group_ids(n_blocks)  # built on the host from shapes: no sync
        b = host_ids[-1] + 1
        ids = torch.tensor(host_ids, device=gramians.device)
        g = torch.zeros(b, k, k, dtype=torch.float64, device=gramians.device)
        g.index_add_(0, ids, gramians.double())
        if self.targets.shape[0] != b:
            if self.targets.shape[0] != 0:
                raise ValueError(
                    f"gradvac has targets for {self.targets.shape[0]} parameter groups but this "
                    f"step has {b}: the shared parameters changed"
                )
            self.targets = torch.zeros(b, k, k, dtype=torch.float64, device=g.device)
        if k == 1:
            return torch.ones(n_blocks, 1, dtype=gramians.dtype, device=gramians.device)
        tiny = torch.finfo(g.dtype).tiny
        g, _ = normalize_gramian(g)
        targets = self.targets.to(g.device)
        order = _to_device(_random_orders(self._rng(), (b,), k), g.device)
        bi = torch.arange(b, device=g.device)[:, None].expand(b, k)
        ii = torch.arange(k, device=g.device)[None, :].expand(b, k)
        coef = torch.eye(k, dtype=g.dtype, device=g.device).repeat(b, 1, 1)  # coef[b, i, :]
        dots = g.clone()  # dots[b, i, j] = <g_i^PC, g_j> in group b
        norms = g.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        for step in range(k - 1):
            j = order[:, :, step]
            dot = dots[bi, ii, j]
            norm_i = (dots * coef).sum(-1).clamp_min(0).sqrt()
            norm_j = norms[bi, j]
            denom = norm_i * norm_j
            phi = torch.where(denom > 0, dot / denom.clamp_min(tiny), 0.0).clamp(-1, 1)
            target = targets[bi, ii, j]
            root_phi = (1 - phi * phi).clamp_min(0).sqrt()
            root_target = (1 - target * target).clamp_min(0).sqrt()
            scale = norm_j * root_target
            w = norm_i * (target * root_phi - phi * root_target) / scale.clamp_min(tiny)
            w = torch.where((phi < target) & (scale > 0), w, 0.0)
            coef[bi, ii, j] += w
            dots += w[..., None] * g[bi, j]
            targets[bi, ii, j] = (1 - self.beta) * target + self.beta * phi
        self.targets.copy_(targets)
        weights = coef.sum(1)  # (b, K): total coefficient of each original gradient
        return weights[ids].to(gramians.dtype)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        key = prefix + "targets"
        if key in state_dict and state_dict[key].shape != self.targets.shape:
            self.targets = torch.zeros_like(state_dict[key], device=self.targets.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[arg-type]

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, group={self.group!r}, seed={self.seed}, "
                f"{super().extra_repr()}")
