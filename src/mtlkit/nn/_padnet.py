"""PAD-Net: initial task predictions, then multi-modal distillation, then the final predictions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from torch import Tensor, nn

from mtlkit.nn._base import MultiTaskModel, check_out_features, positive_int
from mtlkit.nn._distill import (
    MultiModalDistillation,
    check_aux_weight,
    conv_head,
    refine_block,
    resize,
)
from mtlkit.nn._hrnet import HRNet
from mtlkit.nn._utils import pack_features


class PADNet(MultiTaskModel):
    """PAD-Net: a shared backbone, per-task initial predictions, multi-modal distillation.

    Proposed in *PAD-Net: Multi-Tasks Guided Prediction-and-Distillation Network for
    Simultaneous Depth Estimation and Scene Parsing* (Xu, Ouyang, Wang, Sebe, CVPR 2018,
    arXiv:1805.04409). Every task ``t`` computes features ``F_t`` from the backbone output
    (:func:`~mtlkit.nn._distill.refine_block`: two residual blocks to ``channels``) and an
    initial prediction from them (a 1x1 convolution). The attention-guided
    :class:`~mtlkit.nn._distill.MultiModalDistillation` then gives ``D_t = F_t + sum_{u!=t}
    G_t * W_{t,u} F_u``, and the final prediction of ``t`` is ``head_t(D_t)``
    (:func:`~mtlkit.nn._distill.conv_head`). Predictions are upsampled to the input size.

    Deep supervision: after each forward ``aux_outputs[t]`` holds the initial prediction of
    ``t`` (upsampled to the input size). The trainer adds ``aux_weight`` times the sum of their
    task losses to the balanced objective (see :func:`~mtlkit.nn._distill.deep_supervision_loss`);
    balancers see only the final losses.

    ``features`` packs every ``F_t`` (the input of the distillation, see
    :func:`~mtlkit.nn._utils.pack_features`). Shared parameters: the backbone and every
    task's feature block (each ``F_u`` reaches all tasks through the distillation). Task
    parameters of ``t``: its distillation module, its final head, and its initial-prediction
    convolution (:meth:`auxiliary_parameters`, reached only by its deep-supervision loss).

    Args:
        backbone: image -> one feature map, or a list of maps (HRNet branches, concatenated
            with :meth:`HRNet.concat <mtlkit.nn.HRNet.concat>`).
        backbone_channels: channels of the (concatenated) backbone output.
        tasks: task name -> output channels.
        channels: width of the task features ``F_t`` (256; the paper's width on its ResNet-50
            backbone differs, and the survey's width was not checked for this build).
        aux_weight: weight of the deep-supervision losses (1 as in the paper).

    .. note:: The paper's backbone is a ResNet-50 with four intermediate tasks (depth,
       normals, segmentation, contours); here the intermediate tasks are the final tasks, as
       in the survey's comparison, and any backbone works (``pad_net`` uses HRNet-W18).

    Example:
        >>> import torch
        >>> from mtlkit.nn import HRNet, PADNet
        >>> net = HRNet(4, modules=(1, 1, 1), blocks=1, stem_blocks=1)
        >>> model = PADNet(net, net.out_channels, {"seg": 5, "depth": 1}, channels=8)
        >>> out = model(torch.randn(2, 3, 32, 32))
        >>> {t: tuple(y.shape) for t, y in out.items()}
        {'seg': (2, 5, 32, 32), 'depth': (2, 1, 32, 32)}
        >>> [tuple(a.shape) for a in model.aux_outputs["seg"]]
        [(2, 5, 32, 32)]
    """

    aux_outputs: dict[str, list[Tensor]] | None

    def __init__(
        self,
        backbone: nn.Module,
        backbone_channels: int,
        tasks: Mapping[str, int],
        *,
        channels: int = 256,
        aux_weight: float = 1.0,
    ) -> None:
        outs = check_out_features(tasks)
        super().__init__(outs)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module, got {type(backbone)}")
        positive_int("backbone_channels", backbone_channels)
        positive_int("channels", channels)
        self.aux_weight = check_aux_weight(aux_weight)
        self.backbone = backbone
        self.refine = nn.ModuleDict({t: refine_block(backbone_channels, channels) for t in outs})
        self.initial = nn.ModuleDict({t: nn.Conv2d(channels, n, 1) for t, n in outs.items()})
        self.distill = nn.ModuleDict(
            {t: MultiModalDistillation(t, [u for u in outs if u != t], channels) for t in outs}
        )
        self.heads = nn.ModuleDict({t: conv_head(channels, n) for t, n in outs.items()})
        self.aux_outputs = None
        self._check_partition()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        size = x.shape[-2:]
        b = self.backbone(x)
        if isinstance(b, (list, tuple)):
            b = HRNet.concat(b)
        shared = [self.refine[t](b) for t in self.tasks]
        self.features, views = pack_features(shared)
        feats = dict(zip(self.tasks, views))
        self.aux_outputs = {t: [resize(self.initial[t](feats[t]), size)] for t in self.tasks}
        return {t: resize(self.heads[t](self.distill[t](feats)), size) for t in self.tasks}

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
