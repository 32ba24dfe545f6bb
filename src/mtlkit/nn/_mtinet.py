"""MTI-Net: multi-scale initial predictions, feature propagation and per-scale distillation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.nn._base import MultiTaskModel, check_out_features, int_sequence
from mtlkit.nn._distill import (
    MultiModalDistillation,
    check_aux_weight,
    conv_head,
    refine_block,
    resize,
)
from mtlkit.nn._resnet import BasicBlock
from mtlkit.nn._utils import module_list, pack_features


class SqueezeExcitation(nn.Module):
    """Channel gating ``x * sigmoid(W2 relu(W1 avgpool(x)))`` (Hu, Shen, Sun, CVPR 2018,
    arXiv:1709.01507), ``channels // reduction`` hidden units (at least 4)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, channels)
        )

    def forward(self, x: Tensor) -> Tensor:
        w = torch.sigmoid(self.fc(x.mean(dim=(-2, -1))))
        return x * w[:, :, None, None]


class FeaturePropagation(nn.Module):
    """MTI-Net's feature propagation module from scale ``s+1`` (coarser) to scale ``s``.

    The task features of the coarser scale are concatenated and turned into one shared
    representation (a residual basic block, ``K c_{s+1} -> c_{s+1}``); each task selects from it
    with its own squeeze-and-excitation gate, and the result is upsampled x2 and projected to
    ``c_s`` channels (1x1 conv-BN-ReLU). Its output for task ``t`` joins the backbone features
    of scale ``s`` as the input of ``t``'s features there.
    """

    def __init__(self, tasks: Sequence[str], in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        k = len(self.tasks)
        down = nn.Sequential(
            nn.Conv2d(k * in_channels, in_channels, 1, bias=False), nn.BatchNorm2d(in_channels)
        )
        self.shared = BasicBlock(k * in_channels, in_channels, downsample=down)
        self.select = nn.ModuleDict({t: SqueezeExcitation(in_channels) for t in self.tasks})
        self.project = nn.ModuleDict(
            {
                t: nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, bias=False),
                    nn.BatchNorm2d(out_channels),
                    nn.ReLU(inplace=True),
                )
                for t in self.tasks
            }
        )

    def forward(self, features: Mapping[str, Tensor], size: Sequence[int]) -> dict[str, Tensor]:
        shared = self.shared(torch.cat([features[t] for t in self.tasks], dim=1))
        return {
            t: self.project[t](
                F.interpolate(self.select[t](shared), size=tuple(size), mode="bilinear",
                              align_corners=False)
            )
            for t in self.tasks
        }


class MTINet(MultiTaskModel):
    """MTI-Net: task interactions distilled at every scale of a multi-scale backbone.

    Proposed in *MTI-Net: Multi-Scale Task Interaction Networks for Multi-Task Learning*
    (Vandenhende, Georgoulis, Van Gool, ECCV 2020, arXiv:2001.06902). On a backbone with
    ``S`` scales (HRNet: 4, at strides 4 to 32), from the coarsest scale to the finest:

    1. per task and scale, features ``F_t^s`` (:func:`~mtlkit.nn._distill.refine_block`, the
       scale's width ``c_s``) from the backbone features of that scale, concatenated with the
       :class:`FeaturePropagation` of the coarser scale's task features (none at the
       coarsest), and an initial prediction ``P_t^s`` (1x1 conv);
    2. per scale, multi-modal distillation (:class:`~mtlkit.nn._distill.MultiModalDistillation`)
       of the ``F^s`` into ``D_t^s``;
    3. feature aggregation: per task, the ``D_t^s`` of all scales upsampled to the finest and
       concatenated, then a head (:func:`~mtlkit.nn._distill.conv_head`) gives the final
       prediction, upsampled to the input size.

    Deep supervision: ``aux_outputs[t]`` holds the ``S`` initial predictions ``P_t^s``
    (upsampled to the input size, coarsest first); the trainer adds ``aux_weight`` times the
    sum of their task losses to the balanced objective, and balancers see the final losses.

    ``features`` packs every ``F_u^s``. Shared parameters: the backbone, every task's feature
    blocks and every feature propagation module (each reaches all tasks through the
    distillation and propagation). Task parameters of ``t``: its distillation modules, its
    aggregation head and its initial-prediction convolutions (:meth:`auxiliary_parameters`,
    reached only by its deep-supervision losses).

    Args:
        backbone: image -> list of ``S`` feature maps, finest first (e.g. :class:`HRNet`).
        backbone_channels: their channels ``c_s`` (HRNet-W18: 18, 36, 72, 144).
        tasks: task name -> output channels.
        aux_weight: weight of the deep-supervision losses (1).

    .. note:: The task features at each scale use the backbone's width there, and the
       propagation module uses a residual block with squeeze-and-excitation gates (reduction
       16); the paper describes these modules without fixing every width, and its ablations
       keep them small. The propagated features come from the initial (pre-distillation)
       task features, so that every task's distillation stays its own.

    Example:
        >>> import torch
        >>> from mtlkit.nn import HRNet, MTINet
        >>> net = HRNet(4, modules=(1, 1, 1), blocks=1, stem_blocks=1)
        >>> model = MTINet(net, net.channels, {"seg": 5, "depth": 1})
        >>> out = model(torch.randn(2, 3, 64, 64))
        >>> {t: tuple(y.shape) for t, y in out.items()}
        {'seg': (2, 5, 64, 64), 'depth': (2, 1, 64, 64)}
        >>> len(model.aux_outputs["depth"])
        4
    """

    aux_outputs: dict[str, list[Tensor]] | None

    def __init__(
        self,
        backbone: nn.Module,
        backbone_channels: Sequence[int],
        tasks: Mapping[str, int],
        *,
        aux_weight: float = 1.0,
    ) -> None:
        outs = check_out_features(tasks)
        super().__init__(outs)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone)}")
        chans = int_sequence("backbone_channels", backbone_channels)
        if not chans:
            raise ValueError("backbone_channels must give at least one scale")
        self.aux_weight = check_aux_weight(aux_weight)
        self.backbone = backbone
        self.scale_channels = chans
        n = len(chans)
        # refine[t][s]: input c_s, plus c_s from the propagation below unless s is the coarsest
        self.refine = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    refine_block(c * (1 if s == n - 1 else 2), c) for s, c in enumerate(chans)
                )
                for t in outs
            }
        )
        self.propagate = nn.ModuleList(
            FeaturePropagation(self.tasks, chans[s + 1], chans[s]) for s in range(n - 1)
        )
        self.initial = nn.ModuleDict(
            {t: nn.ModuleList(nn.Conv2d(c, k, 1) for c in chans) for t, k in outs.items()}
        )
        self.distill = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    MultiModalDistillation(t, [u for u in outs if u != t], c) for c in chans
                )
                for t in outs
            }
        )
        self.heads = nn.ModuleDict({t: conv_head(sum(chans), k) for t, k in outs.items()})
        self.aux_outputs = None
        self._check_partition()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        xs = self.backbone(x)
        if not isinstance(xs, (list, tuple)) or len(xs) != len(self.scale_channels):
            raise ValueError(
                f"the backbone must return {len(self.scale_channels)} feature maps, finest first"
            )
        n = len(xs)
        # Shared part, coarsest scale first: F[s][t].
        feats: list[dict[str, Tensor]] = [{} for _ in range(n)]
        for s in reversed(range(n)):
            extra = None if s == n - 1 else self.propagate[s](feats[s + 1], xs[s].shape[-2:])
            for t in self.tasks:
                inp = xs[s] if extra is None else torch.cat([xs[s], extra[t]], dim=1)
                feats[s][t] = module_list(self.refine, t)[s](inp)
        order = [(s, t) for s in range(n) for t in self.tasks]
        self.features, views = pack_features([feats[s][t] for s, t in order])
        cut: list[dict[str, Tensor]] = [{} for _ in range(n)]
        for (s, t), v in zip(order, views):
            cut[s][t] = v
        # Task-specific part reads only the views of the packed features.
        self.aux_outputs = {
            t: [resize(module_list(self.initial, t)[s](cut[s][t]), size)
                for s in reversed(range(n))]
            for t in self.tasks
        }
        out = {}
        for t in self.tasks:
            distilled = [module_list(self.distill, t)[s](cut[s]) for s in range(n)]
            fine = distilled[0].shape[-2:]
            agg = torch.cat([resize(d, fine) for d in distilled], dim=1)
            out[t] = resize(self.heads[t](agg), size)
        return out

    def auxiliary_parameters(self) -> Iterator[nn.Parameter]:
        """The initial-prediction layers: reached by the deep-supervision losses only."""
        return iter(list(self.initial.parameters()))

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        yield from self.distill[task].parameters()
        yield from self.heads[task].parameters()
        yield from self.initial[task].parameters()

    def __getstate__(self) -> dict[str, object]:
        state = super().__getstate__()
        state["aux_outputs"] = None
        return state
