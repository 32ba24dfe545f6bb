"""Multi-task architectures and the building blocks they use (pure PyTorch, no torchvision).

Every architecture is a :class:`MultiTaskModel`: ``model(x)`` returns ``{task: output}``,
``model.features`` holds the last shared representation (or ``None``, documented per class),
and ``model.shared_parameters()`` / ``model.task_parameters(task)`` partition the parameters.
For ``grad_on="features"`` pass ``features=model.require_features()``, which raises with the
reason where an architecture has no such tensor (MTAN and SegNet-MTAN).

>>> import torch
>>> from mtlkit.nn import HardSharing, resnet18
>>> model = HardSharing(resnet18(dilated=True), {"seg": torch.nn.Conv2d(512, 13, 1)})
>>> tuple(model(torch.randn(1, 3, 32, 32))["seg"].shape)
(1, 13, 4, 4)
"""

from mtlkit.nn._aspp import ASPP, DeepLabHead
from mtlkit.nn._base import MultiTaskModel
from mtlkit.nn._cascade import Cascade, concat_channels
from mtlkit.nn._cross_stitch import CrossStitch, CrossStitchUnit, mixing_init
from mtlkit.nn._distill import MultiModalDistillation, deep_supervision_loss
from mtlkit.nn._experts import CGC, PLE, DSelectK, DSelectKGate, MMoE, SoftmaxGate, smooth_step
from mtlkit.nn._fafs import FullyAdaptiveSharing, branch_affinity, task_affinity, widen
from mtlkit.nn._hard import HardSharing
from mtlkit.nn._hrnet import HighResolutionModule, HRNet, hrnet_w18
from mtlkit.nn._mpnn import MPNN
from mtlkit.nn._mrn import MRN
from mtlkit.nn._mtan import MTAN, AttentionTransition, SegNetMTAN, attention_mask
from mtlkit.nn._mtinet import MTINet
from mtlkit.nn._nddr import NDDR, NDDRLayer
from mtlkit.nn._padnet import PADNet
from mtlkit.nn._recsys import AITM, ESMM, Embedded, TabularEmbedding, binary_log_probs
from mtlkit.nn._resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from mtlkit.nn._segnet import SegNet
from mtlkit.nn._sluice import Sluice

__all__ = [
    "AITM",
    "ASPP",
    "CGC",
    "ESMM",
    "MPNN",
    "MRN",
    "MTAN",
    "NDDR",
    "PLE",
    "AttentionTransition",
    "BasicBlock",
    "Bottleneck",
    "Cascade",
    "CrossStitch",
    "CrossStitchUnit",
    "DSelectK",
    "DSelectKGate",
    "DeepLabHead",
    "Embedded",
    "FullyAdaptiveSharing",
    "HRNet",
    "HardSharing",
    "HighResolutionModule",
    "MMoE",
    "MTINet",
    "MultiModalDistillation",
    "MultiTaskModel",
    "NDDRLayer",
    "PADNet",
    "ResNet",
    "SegNet",
    "SegNetMTAN",
    "Sluice",
    "SoftmaxGate",
    "TabularEmbedding",
    "attention_mask",
    "binary_log_probs",
    "branch_affinity",
    "concat_channels",
    "deep_supervision_loss",
    "hrnet_w18",
    "mixing_init",
    "resnet18",
    "resnet50",
    "smooth_step",
    "task_affinity",
    "widen",
]
