"""Mixtures of experts with per-task gates: MMoE, CGC, PLE and DSelect-k."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import torch
from torch import Tensor, nn

from mtlkit.nn._base import MultiTaskModel, check_out_features, int_sequence, positive_int
from mtlkit.nn._utils import mlp, module_list, pack_features


class SoftmaxGate(nn.Module):
    """``softmax(W x + b)`` over ``num_experts``: the MMoE / CGC / PLE gate.

    Example:
        >>> import torch
        >>> from mtlkit.nn import SoftmaxGate
        >>> w = SoftmaxGate(4, 3)(torch.randn(2, 4))
        >>> tuple(w.shape), torch.allclose(w.sum(dim=1), torch.ones(2))
        ((2, 3), True)
    """

    def __init__(self, in_features: int, num_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_experts)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.linear(x), dim=-1)


def _mix(weights: Tensor, experts: Tensor) -> Tensor:
    """``sum_e weights[b, e] * experts[b, e, :]`` for weights (B, E), experts (B, E, D)."""
    return torch.einsum("be,bed->bd", weights.to(experts.dtype), experts)


class MMoE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts: shared experts, one softmax gate and one tower per task.

    Proposed in *Modeling Task Relationships in Multi-task Learning with Multi-gate
    Mixture-of-Experts* (Ma, Zhao, Yi, Chen, Hong, Chi, KDD 2018, doi:10.1145/3219819.3220007;
    no arXiv version). Task ``k`` outputs ``tower_k(sum_e g_k(x)_e f_e(x))`` with
    ``g_k(x) = softmax(W_k x)``.

    Args:
        in_features: input size; the input is ``(batch, in_features)``.
        tasks: task name -> output size.
        num_experts: number of experts.
        expert_hidden: hidden sizes of each expert MLP (ReLU); the last is the expert output size.
        tower_hidden: hidden sizes of each task tower before its output layer.

    ``features`` is the stacked expert outputs, shape ``(batch, num_experts, expert_dim)``: the
    experts are the only shared parameters and reach every loss through it. Shared parameters:
    the experts. Task parameters: the task's gate and tower.

    Example:
        >>> import torch
        >>> from mtlkit.nn import MMoE
        >>> model = MMoE(6, {"ctr": 1, "cvr": 1}, num_experts=3, expert_hidden=(8,))
        >>> out = model(torch.randn(5, 6))
        >>> {t: tuple(y.shape) for t, y in out.items()}, tuple(model.features.shape)
        ({'ctr': (5, 1), 'cvr': (5, 1)}, (5, 3, 8))
    """

    def __init__(
        self,
        in_features: int,
        tasks: Mapping[str, int],
        *,
        num_experts: int = 4,
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (32,),
    ) -> None:
        outs = check_out_features(tasks)
        super().__init__(outs)
        positive_int("in_features", in_features)
        positive_int("num_experts", num_experts)
        hidden = int_sequence("expert_hidden", expert_hidden)
        if not hidden:
            raise ValueError("expert_hidden must give at least one size")
        int_sequence("tower_hidden", tower_hidden, minimum=1)
        self.experts = nn.ModuleList(mlp(in_features, hidden) for _ in range(num_experts))
        self.gates = nn.ModuleDict({t: self._make_gate(in_features, num_experts) for t in outs})
        self.towers = nn.ModuleDict({t: mlp(hidden[-1], tower_hidden, n) for t, n in outs.items()})

    def _make_gate(self, in_features: int, num_experts: int) -> nn.Module:
        return SoftmaxGate(in_features, num_experts)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        experts = torch.stack([e(x) for e in self.experts], dim=1)
        self.features = experts
        return {t: self.towers[t](_mix(self.gates[t](x), experts)) for t in self.tasks}

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        yield from self.gates[task].parameters()
        yield from self.towers[task].parameters()


class _ExtractionLayer(nn.Module):
    """One PLE level: shared experts, per-task experts, per-task gates, optional shared gate."""

    def __init__(
        self,
        in_features: int,
        tasks: Sequence[str],
        num_shared: int,
        num_task: int,
        hidden: Sequence[int],
        shared_gate: bool,
    ) -> None:
        super().__init__()
        self.shared_experts = nn.ModuleList(mlp(in_features, hidden) for _ in range(num_shared))
        self.task_experts = nn.ModuleDict(
            {t: nn.ModuleList(mlp(in_features, hidden) for _ in range(num_task)) for t in tasks}
        )
        self.task_gates = nn.ModuleDict(
            {t: SoftmaxGate(in_features, num_task + num_shared) for t in tasks}
        )
        total = num_task * len(tasks) + num_shared
        self.shared_gate = SoftmaxGate(in_features, total) if shared_gate else None

    def forward(
        self, inputs: Mapping[str, Tensor], shared_input: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None, Tensor]:
        shared = [e(shared_input) for e in self.shared_experts]
        stacked_shared = torch.stack(shared, dim=1)
        own = {t: [e(inputs[t]) for e in module_list(self.task_experts, t)] for t in inputs}
        outputs = {
            t: _mix(
                self.task_gates[t](inputs[t]),
                torch.cat([torch.stack(own[t], 1), stacked_shared], 1),
            )
            for t in inputs
        }
        shared_out = None
        if self.shared_gate is not None:
            everything = [e for t in inputs for e in own[t]] + shared
            shared_out = _mix(self.shared_gate(shared_input), torch.stack(everything, dim=1))
        return outputs, shared_out, stacked_shared


def _stack_experts(experts: nn.ModuleList, x: Tensor) -> Tensor:
    """``(batch, num_experts, expert_dim)``: every expert applied to ``x``."""
    return torch.stack([e(x) for e in experts], dim=1)


class PLE(MultiTaskModel):
    """Progressive Layered Extraction: stacked levels of shared and task-specific experts.

    Proposed in *Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model
    for Personalized Recommendations* (Tang, Liu, Zhao, Gong, RecSys 2020,
    doi:10.1145/3383313.3412236; no arXiv version). Each level has ``num_shared_experts`` shared
    experts and ``num_task_experts`` experts per task. Task ``k``'s gate mixes its own experts
    and the shared ones, from task ``k``'s previous-level output. Below the last level, a
    shared gate mixes *all* experts of the level from the previous shared output, and feeds
    the next level's shared experts. A tower per task reads its last-level output.
    ``num_levels=1`` is the Customized Gate Control model, :class:`CGC`.

    Args:
        in_features: input size; the input is ``(batch, in_features)``.
        tasks: task name -> output size.
        num_levels: number of extraction levels.
        num_shared_experts: shared experts per level.
        num_task_experts: experts per task per level.
        expert_hidden: hidden sizes of each expert MLP; the last is the expert output size.
        tower_hidden: hidden sizes of each task tower before its output layer.

    Shared and task parameters follow the rule "shared = used by more than one task". A shared
    gate feeds *all* experts of its level to the next level's shared experts, and so to every
    task. Task ``k``'s experts below the last level are therefore shared, and so are its gates
    below the last two levels (they feed those experts). Task parameters: the task's last-level
    experts, its gates of the last two levels, and its tower. Everything else is shared.

    ``features``: for one level (CGC), the stacked shared-expert outputs
    ``(batch, num_shared_experts, expert_dim)``, the only route from the shared parameters to
    the losses. For more levels the shared parameters reach the task-specific ones through
    several tensors: the outputs of every expert of the next-to-last level (read by the task
    gates there), the last level's shared experts, and, with three levels or more, each task's
    input of the next-to-last level (read by its gate). The model runs all of the shared part
    first, and ``features`` packs those tensors into one ``(batch, N)`` tensor (see
    :func:`~mtlkit.nn._utils.pack_features`) whose views feed the task-specific part.

    Example:
        >>> import torch
        >>> from mtlkit.nn import PLE
        >>> model = PLE(6, {"a": 1, "b": 2}, num_levels=2, expert_hidden=(8,))
        >>> {t: tuple(y.shape) for t, y in model(torch.randn(5, 6)).items()}
        {'a': (5, 1), 'b': (5, 2)}
    """

    def __init__(
        self,
        in_features: int,
        tasks: Mapping[str, int],
        *,
        num_levels: int = 2,
        num_shared_experts: int = 2,
        num_task_experts: int = 2,
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (32,),
    ) -> None:
        outs = check_out_features(tasks)
        super().__init__(outs)
        positive_int("in_features", in_features)
        positive_int("num_levels", num_levels)
        positive_int("num_shared_experts", num_shared_experts)
        positive_int("num_task_experts", num_task_experts)
        hidden = int_sequence("expert_hidden", expert_hidden)
        if not hidden:
            raise ValueError("expert_hidden must give at least one size")
        int_sequence("tower_hidden", tower_hidden)
        self.levels = nn.ModuleList(
            _ExtractionLayer(
                in_features if i == 0 else hidden[-1],
                self.tasks,
                num_shared_experts,
                num_task_experts,
                hidden,
                shared_gate=i < num_levels - 1,
            )
            for i in range(num_levels)
        )
        self.towers = nn.ModuleDict({t: mlp(hidden[-1], tower_hidden, n) for t, n in outs.items()})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        levels = [cast(_ExtractionLayer, level) for level in self.levels]
        inputs = {t: x for t in self.tasks}
        if len(levels) == 1:
            inputs, _, self.features = levels[0](inputs, x)
            return {t: self.towers[t](inputs[t]) for t in self.tasks}
        shared = x
        for level in levels[:-2]:  # entirely shared
            inputs, shared_out, _ = level(inputs, shared)
            assert shared_out is not None
            shared = shared_out
        # The last two levels, shared part first: every expert of the next-to-last level and
        # its shared gate, then the last level's shared experts.
        pen, last = levels[-2], levels[-1]
        assert pen.shared_gate is not None
        own = {t: _stack_experts(module_list(pen.task_experts, t), inputs[t]) for t in self.tasks}
        pen_shared = _stack_experts(pen.shared_experts, shared)
        mixed = _mix(pen.shared_gate(shared), torch.cat([*own.values(), pen_shared], 1))
        last_shared = _stack_experts(last.shared_experts, mixed)
        # The cut: what the task-specific gates and experts read. The tasks' inputs of the
        # next-to-last level are shared too (and in the graph) when a level lies below it.
        gated = list(inputs.values()) if len(levels) > 2 else []
        self.features, views = pack_features([*gated, *own.values(), pen_shared, last_shared])
        if gated:
            inputs = dict(zip(self.tasks, views[: len(gated)]))
            views = views[len(gated) :]
        own = dict(zip(self.tasks, views[: len(own)]))
        pen_shared, last_shared = views[len(own) :]
        out = {}
        for t in self.tasks:
            h = _mix(pen.task_gates[t](inputs[t]), torch.cat([own[t], pen_shared], 1))
            experts = torch.cat(
                [_stack_experts(module_list(last.task_experts, t), h), last_shared], 1
            )
            out[t] = self.towers[t](_mix(last.task_gates[t](h), experts))
        return out

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        levels = [cast(_ExtractionLayer, level) for level in self.levels]
        for level in levels[-2:]:
            yield from level.task_gates[task].parameters()
        yield from levels[-1].task_experts[task].parameters()
        yield from self.towers[task].parameters()


class CGC(PLE):
    """Customized Gate Control: PLE with a single extraction level.

    From *Progressive Layered Extraction (PLE)* (Tang, Liu, Zhao, Gong, RecSys 2020,
    doi:10.1145/3383313.3412236), Section 4.2. Task ``k`` outputs
    ``tower_k(sum_e g_k(x)_e f_e(x))``, where ``g_k`` mixes task ``k``'s own experts and the
    shared experts. Shared parameters: the shared experts. Task parameters: the task's experts,
    gate and tower. ``features`` is the stacked shared-expert outputs.

    Args:
        in_features: input size.
        tasks: task name -> output size.
        num_shared_experts: shared experts.
        num_task_experts: experts per task.
        expert_hidden: hidden sizes of each expert MLP.
        tower_hidden: hidden sizes of each task tower.

    Example:
        >>> import torch
        >>> from mtlkit.nn import CGC
        >>> model = CGC(6, {"a": 1, "b": 1}, expert_hidden=(8,))
        >>> _ = model(torch.randn(5, 6)); tuple(model.features.shape)
        (5, 2, 8)
    """

    def __init__(
        self,
        in_features: int,
        tasks: Mapping[str, int],
        *,
        num_shared_experts: int = 2,
        num_task_experts: int = 2,
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (32,),
    ) -> None:
        super().__init__(
            in_features,
            tasks,
            num_levels=1,
            num_shared_experts=num_shared_experts,
            num_task_experts=num_task_experts,
            expert_hidden=expert_hidden,
            tower_hidden=tower_hidden,
        )


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """The cubic smooth-step: 0 below ``-gamma/2``, 1 above ``gamma/2``, and
    ``-2 t^3 / gamma^3 + 3 t / (2 gamma) + 1/2`` in between (C1-continuous)."""
    inner = -2.0 / gamma**3 * t**3 + 1.5 / gamma * t + 0.5
    return torch.where(
        t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), inner)
    )


class DSelectKGate(nn.Module):
    """DSelect-k gate: a differentiable, sparse choice of at most ``k`` of ``n`` experts.

    Proposed in *DSelect-k: Differentiable Selection in the Mixture of Experts with
    Applications to Multi-Task Learning* (Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen,
    Mazumder, Hong, Chi, NeurIPS 2021, arXiv:2106.03760). Each of ``k`` single-expert selectors
    holds ``m = ceil(log2 n)`` logits ``z``. Expert ``i`` gets
    ``r_i = prod_j (S(z_j) if bit j of i else 1 - S(z_j))``, with ``S`` the smooth-step. The
    gate is ``sum_s softmax(w)_s r^(s)``. With ``per_example=True`` (the paper's
    per-example gating), ``z`` and ``w`` are linear functions of the input; otherwise they are
    free parameters (static gating). Initialisation as in the official code: ``z`` uniform in
    ``±gamma/100`` and ``w`` uniform in ``±0.05``.

    :meth:`regularization` returns the gate's extra loss from the last forward:
    ``entropy_weight`` times the summed entropy of the selectors (pushes them to one-hot). If
    ``n`` is not a power of two, it adds ``sum_s 1 / sum_i r_i^(s)``, which keeps the selectors
    off the unused codes.

    .. note:: The official code sums both terms over the batch; here they are averaged over the
       batch, so the weight does not depend on the batch size.

    Args:
        in_features: input size (used when ``per_example``).
        num_experts: ``n >= 2``.
        k: number of selectors (at most ``k`` experts get a nonzero weight).
        gamma: smooth-step width.
        entropy_weight: weight of the entropy term (0 disables it, the official default).
        per_example: per-example (True) or static (False) gating.

    Example:
        >>> import torch
        >>> from mtlkit.nn import DSelectKGate
        >>> g = DSelectKGate(4, num_experts=5, k=2)
        >>> w = g(torch.randn(3, 4))
        >>> tuple(w.shape), bool((w >= 0).all()), bool((w.sum(1) <= 1 + 1e-6).all())
        ((3, 5), True, True)
    """

    codes: Tensor

    def __init__(
        self,
        in_features: int,
        num_experts: int,
        k: int = 2,
        *,
        gamma: float = 1.0,
        entropy_weight: float = 0.0,
        per_example: bool = True,
    ) -> None:
        super().__init__()
        positive_int("in_features", in_features)
        positive_int("num_experts", num_experts, minimum=2)
        positive_int("k", k)
        if not gamma > 0:
            raise ValueError(f"gamma must be > 0, got {gamma!r}")
        if not entropy_weight >= 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight!r}")
        self.num_experts = num_experts
        self.k = k
        self.gamma = float(gamma)
        self.entropy_weight = float(entropy_weight)
        self.per_example = bool(per_example)
        self.num_bits = math.ceil(math.log2(num_experts))
        bits = [
            [(i >> (self.num_bits - 1 - j)) & 1 for j in range(self.num_bits)]
            for i in range(num_experts)
        ]
        self.register_buffer("codes", torch.tensor(bits, dtype=torch.bool), persistent=False)
        bound = self.gamma / 100
        self.z: nn.Module | nn.Parameter
        self.w: nn.Module | nn.Parameter
        if self.per_example:
            self.z = nn.Linear(in_features, k * self.num_bits)
            self.w = nn.Linear(in_features, k)
            for p in (self.z.weight, self.z.bias):
                nn.init.uniform_(p, -bound, bound)
            for p in (self.w.weight, self.w.bias):
                nn.init.uniform_(p, -0.05, 0.05)
        else:
            self.z = nn.Parameter(torch.empty(k, self.num_bits).uniform_(-bound, bound))
            self.w = nn.Parameter(torch.empty(k).uniform_(-0.05, 0.05))
        self._selectors: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Expert weights ``(batch, num_experts)``, each row >= 0 and summing to at most 1."""
        if isinstance(self.z, nn.Linear) and isinstance(self.w, nn.Linear):
            z = self.z(x).view(x.shape[0], self.k, self.num_bits)
            w = torch.softmax(self.w(x), dim=-1)
        else:
            assert isinstance(self.z, Tensor) and isinstance(self.w, Tensor)
            z = self.z.expand(x.shape[0], -1, -1)
            w = torch.softmax(self.w, dim=-1).expand(x.shape[0], -1)
        s = smooth_step(z, self.gamma).unsqueeze(2)  # (B, k, 1, m)
        selectors = torch.where(self.codes, s, 1 - s).prod(dim=-1)  # (B, k, n)
        self._selectors = selectors
        return torch.einsum("bs,bsn->bn", w, selectors)

    def regularization(self) -> Tensor:
        """The extra loss of the last forward (0 before any forward)."""
        r = self._selectors
        if r is None:
            return next(self.parameters()).new_zeros(())
        loss = r.new_zeros(())
        if self.entropy_weight > 0:
            entropy = -(r * torch.log(r + 1e-6)).sum(dim=(1, 2)).mean()
            loss = loss + self.entropy_weight * entropy
        if self.num_experts != 2**self.num_bits:
            loss = loss + (1 / r.sum(dim=-1)).sum(dim=1).mean()
        return loss

    def __getstate__(self) -> dict[str, object]:
        state = dict(super().__getstate__())  # type: ignore[no-untyped-call]
        state["_selectors"] = None
        return state


class DSelectK(MMoE):
    """MMoE with DSelect-k gates: each task mixes a learned sparse subset of the experts.

    *DSelect-k: Differentiable Selection in the Mixture of Experts with Applications to
    Multi-Task Learning* (Hazimeh et al., NeurIPS 2021, arXiv:2106.03760): shared experts, one
    :class:`DSelectKGate` and one tower per task. Add :meth:`regularizer` to the loss.

    Args:
        in_features: input size; the input is ``(batch, in_features)``.
        tasks: task name -> output size.
        num_experts: number of experts (>= 2).
        k: experts selected per task (per example when ``per_example``).
        gamma: smooth-step width.
        entropy_weight: weight of the selectors' entropy in :meth:`regularizer`.
        per_example: per-example (True) or static (False) gates.
        expert_hidden: hidden sizes of each expert MLP.
        tower_hidden: hidden sizes of each task tower.

    ``features`` is the stacked expert outputs ``(batch, num_experts, expert_dim)``; shared
    parameters are the experts, task parameters the task's gate and tower.

    Example:
        >>> import torch
        >>> from mtlkit.nn import DSelectK
        >>> model = DSelectK(6, {"a": 1, "b": 1}, num_experts=4, k=2, expert_hidden=(8,))
        >>> out = model(torch.randn(5, 6))
        >>> tuple(out["a"].shape), model.regularizer().item()
        ((5, 1), 0.0)
    """

    def __init__(
        self,
        in_features: int,
        tasks: Mapping[str, int],
        *,
        num_experts: int = 4,
        k: int = 2,
        gamma: float = 1.0,
        entropy_weight: float = 0.0,
        per_example: bool = True,
        expert_hidden: Sequence[int] = (64,),
        tower_hidden: Sequence[int] = (32,),
    ) -> None:
        positive_int("num_experts", num_experts, minimum=2)
        self._gate_options = {
            "k": k,
            "gamma": gamma,
            "entropy_weight": entropy_weight,
            "per_example": per_example,
        }
        super().__init__(
            in_features,
            tasks,
            num_experts=num_experts,
            expert_hidden=expert_hidden,
            tower_hidden=tower_hidden,
        )

    def _make_gate(self, in_features: int, num_experts: int) -> nn.Module:
        opts = self._gate_options
        return DSelectKGate(in_features, num_experts, **opts)  # type: ignore[arg-type]

    def regularizer(self) -> Tensor:
        """Sum of the gates' :meth:`DSelectKGate.regularization` from the last forward."""
        terms = [gate.regularization() for gate in self.gates.values()]  # type: ignore[operator]
        return torch.stack(terms).sum()
