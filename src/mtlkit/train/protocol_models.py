"""The benchmark protocols' models, registered for ``mtlkit train`` / ``compare``.

Each builder is ``builder(tasks, input_shape, **options)`` (see :mod:`mtlkit.train.models`);
a :class:`~mtlkit.data.DatasetBundle` names its protocol's model in ``bundle.model``:

==========================  ===============================================================
``multilenet``              MultiMNIST: the LeNet of Sener & Koltun (2018)
``resnet18_multi_input``    Office-31 / Office-Home: ResNet-18 + 512-unit layer (LibMTL)
``mpnn``                    QM9: NNConv + GRU + Set2Set (Nash-MTL, FAMO)
``tabular_mlp``             tabular: embeddings + shared MLP + a head per task (shared bottom)
``tabular_mmoe``, ...       tabular: embeddings + MMoE / CGC / PLE (``tabular_cgc``, ``tabular_ple``)
``esmm``, ``aitm``          tabular: embeddings + ESMM (Ma et al. 2018) / AITM (Xi et al. 2021)
==========================  ===============================================================

Cityscapes uses :mod:`mtlkit.train.models`' ``segnet_mtan`` and ``resnet50_deeplab``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mtlkit.nn import (
    AITM,
    CGC,
    ESMM,
    MPNN,
    PLE,
    Embedded,
    HardSharing,
    MMoE,
    TabularEmbedding,
    resnet18,
)
from mtlkit.nn._utils import mlp
from mtlkit.tasks import Task
from mtlkit.train.models import register_model, task_outputs


class MultiLeNetTrunk(nn.Module):
    """The shared part of Sener & Koltun's MultiMNIST LeNet: conv(10, 5x5) - pool - ReLU -
    conv(20, 5x5) - dropout2d - pool - ReLU - linear to 50 - ReLU (28x28 inputs)."""

    def __init__(self, in_channels: int = 1, size: int = 28) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 10, 5)
        self.conv2 = nn.Conv2d(10, 20, 5)
        self.drop = nn.Dropout2d()
        side = ((size - 4) // 2 - 4) // 2
        self.fc = nn.Linear(20 * side * side, 50)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.drop(self.conv2(x)), 2))
        return F.relu(self.fc(x.flatten(1)))


@register_model("multilenet")
def multilenet(tasks: Sequence[Task], input_shape: Sequence[int]) -> HardSharing:
    """MultiMNIST LeNet (Sener & Koltun, NeurIPS 2018, arXiv:1810.04650, their code): the
    :class:`MultiLeNetTrunk` and per task ``Linear(50, 50) - ReLU - Dropout - Linear(50, C)``."""
    c, h, _ = input_shape
    heads = {t.name: nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Dropout(),
                                   nn.Linear(50, task_outputs(t))) for t in tasks}
    return HardSharing(MultiLeNetTrunk(c, h), heads)


class PooledResNet18(nn.Module):
    """ResNet-18, global average pooling, ``Linear(512, 512) - BN - ReLU - Dropout(0.5)``: the
    encoder of LibMTL's Office example (the linear layer initialised N(0, 0.005), bias 0.1)."""

    def __init__(self, in_channels: int = 3, pretrained: str | None = None) -> None:
        super().__init__()
        self.resnet = resnet18(in_channels=in_channels)
        if pretrained is not None:
            load_resnet_weights(self.resnet, pretrained)
        self.hidden = nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(),
                                    nn.Dropout(0.5))
        nn.init.normal_(self.hidden[0].weight, 0.0, 0.005)
        nn.init.constant_(self.hidden[0].bias, 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return self.hidden(self.resnet(x).mean(dim=(2, 3)))


def load_resnet_weights(model: nn.Module, file: str) -> None:
    """Load an ImageNet ResNet state dict in torchvision's format from a local file (its
    ``fc.*`` entries are dropped); never downloads."""
    path = Path(file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"pretrained: missing file {path} (a torchvision ResNet state dict)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"pretrained: {path} does not hold a state dict")  # noqa: TRY004
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"pretrained: {path} does not match the ResNet (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")


@register_model("resnet18_multi_input")
def resnet18_multi_input(tasks: Sequence[Task], input_shape: Sequence[int],
                         pretrained: str | None = None) -> HardSharing:
    """Office-31 / Office-Home (LibMTL's example): :class:`PooledResNet18` and a
    ``Linear(512, C)`` per domain; ImageNet weights from ``pretrained`` when given."""
    heads = {t.name: nn.Linear(512, task_outputs(t)) for t in tasks}
    return HardSharing(PooledResNet18(input_shape[0], pretrained), heads)


@register_model("mpnn")
def mpnn(tasks: Sequence[Task], input_shape: Sequence[int], dim: int = 64) -> MPNN:
    """QM9's message-passing network (Nash-MTL / FAMO); see :class:`mtlkit.nn.MPNN`."""
    return MPNN([t.name for t in tasks], num_features=11, dim=dim)


def _embedding(input_shape: Sequence[int], cardinalities: Sequence[int], num_numeric: int,
               embed_dim: int) -> TabularEmbedding:
    if len(input_shape) != 1 or input_shape[0] != len(cardinalities) + num_numeric:
        raise ValueError(f"tabular models need (C + M,) inputs with C = {len(cardinalities)} "
                         f"categorical and M = {num_numeric} numeric columns; got {input_shape}")
    return TabularEmbedding(cardinalities, num_numeric, embed_dim)


@register_model("tabular_mlp")
def tabular_mlp(tasks: Sequence[Task], input_shape: Sequence[int], *,
                cardinalities: Sequence[int] = (), num_numeric: int = 0, embed_dim: int = 8,
                hidden: Sequence[int] = (256, 128), tower_hidden: Sequence[int] = (64,)
                ) -> Embedded:
    """Shared bottom: embeddings and an MLP shared by all tasks, an MLP tower per task."""
    emb = _embedding(input_shape, cardinalities, num_numeric, embed_dim)
    heads = {t.name: mlp(hidden[-1], tower_hidden, task_outputs(t)) for t in tasks}
    return Embedded(emb, HardSharing(mlp(emb.out_features, hidden), heads))


@register_model("tabular_mmoe")
def tabular_mmoe(tasks: Sequence[Task], input_shape: Sequence[int], *,
         cardinalities: Sequence[int] = (), num_numeric: int = 0, embed_dim: int = 8,
         num_experts: int = 8, expert_hidden: Sequence[int] = (16,),
         tower_hidden: Sequence[int] = (8,)) -> Embedded:
    """Embeddings + :class:`mtlkit.nn.MMoE` (Ma et al., KDD 2018)."""
    emb = _embedding(input_shape, cardinalities, num_numeric, embed_dim)
    outs = {t.name: task_outputs(t) for t in tasks}
    return Embedded(emb, MMoE(emb.out_features, outs, num_experts=num_experts,
                              expert_hidden=expert_hidden, tower_hidden=tower_hidden))


@register_model("tabular_cgc")
def tabular_cgc(tasks: Sequence[Task], input_shape: Sequence[int], *,
        cardinalities: Sequence[int] = (), num_numeric: int = 0, embed_dim: int = 8,
        num_shared_experts: int = 2, num_task_experts: int = 2,
        expert_hidden: Sequence[int] = (16,), tower_hidden: Sequence[int] = (8,)) -> Embedded:
    """Embeddings + :class:`mtlkit.nn.CGC` (Tang et al., RecSys 2020)."""
    emb = _embedding(input_shape, cardinalities, num_numeric, embed_dim)
    outs = {t.name: task_outputs(t) for t in tasks}
    return Embedded(emb, CGC(emb.out_features, outs, num_shared_experts=num_shared_experts,
                             num_task_experts=num_task_experts, expert_hidden=expert_hidden,
                             tower_hidden=tower_hidden))


@register_model("tabular_ple")
def tabular_ple(tasks: Sequence[Task], input_shape: Sequence[int], *,
        cardinalities: Sequence[int] = (), num_numeric: int = 0, embed_dim: int = 8,
        num_levels: int = 2, num_shared_experts: int = 2, num_task_experts: int = 2,
        expert_hidden: Sequence[int] = (16,), tower_hidden: Sequence[int] = (8,)) -> Embedded:
    """Embeddings + :class:`mtlkit.nn.PLE` (Tang et al., RecSys 2020)."""
    emb = _embedding(input_shape, cardinalities, num_numeric, embed_dim)
    outs = {t.name: task_outputs(t) for t in tasks}
    return Embedded(emb, PLE(emb.out_features, outs, num_levels=num_levels,
                             num_shared_experts=num_shared_experts,
                             num_task_experts=num_task_experts, expert_hidden=expert_hidden,
                             tower_hidden=tower_hidden))


def _binary_only(tasks: Sequence[Task], model: str) -> list[str]:
    bad = [t.name for t in tasks if t.kind != "classification" or t.num_outputs != 2]
    if bad:
        raise ValueError(f"{model} predicts binary tasks only; {bad} are not binary")
    return [t.name for t in tasks]


@register_model("esmm")
def esmm(tasks: Sequence[Task], input_shape: Sequence[int], *,
         cardinalities: Sequence[int] = (), num_numeric: int = 0, embed_dim: int = 18,
         hidden: Sequence[int] = (360, 200, 80)) -> Embedded:
    """Embeddings + :class:`mtlkit.nn.ESMM`: tasks ``(ctr, ctcvr)`` in that order, the second
    labelled on the entire space (a tabular task with ``entire_space``)."""
    names = _binary_only(tasks, "esmm")
    emb = _embedding(input_shape, cardinalities, num_numeric, embed_dim)
    return Embedded(emb, ESMM(emb.out_features, names, hidden=hidden))


@register_model("aitm")
def aitm(tasks: Sequence[Task], input_shape: Sequence[int], *,
         cardinalities: Sequence[int] = (), num_numeric: int = 0, embed_dim: int = 5,
         hidden: Sequence[int] = (128, 64, 32),
         dropout: float | Sequence[float] = (0.1, 0.3, 0.3)) -> Embedded:
    """Embeddings + :class:`mtlkit.nn.AITM`: tasks in funnel order."""
    names = _binary_only(tasks, "aitm")
    emb = _embedding(input_shape, cardinalities, num_numeric, embed_dim)
    return Embedded(emb, AITM(emb.out_features, names, hidden=hidden, dropout=dropout))
