"""DeepLab-v3 atrous spatial pyramid pooling (ASPP) and the dense prediction head built on it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.nn._base import int_sequence, positive_int


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling.

    Proposed in *Rethinking Atrous Convolution for Semantic Image Segmentation* (Chen,
    Papandreou, Schroff, Adam, arXiv:1706.05587, 2017), Section 3.3: parallel branches, each
    ``conv -> BN -> ReLU`` with ``channels`` outputs (a 1x1 convolution, one 3x3 convolution per
    atrous rate, and image pooling: global average -> 1x1 conv -> BN -> ReLU -> bilinear
    upsampling), concatenated and projected by ``1x1 conv -> BN -> ReLU -> dropout``. The paper
    uses rates (6, 12, 18) at output stride 16 and (12, 24, 36) at output stride 8.

    Args:
        in_channels: input channels.
        rates: atrous rates of the 3x3 branches.
        channels: channels of every branch and of the output (paper: 256).
        dropout: dropout after the projection (0.5 in common implementations; 0 disables).

    The image-pooling branch has batch normalisation over a 1x1 map, so training mode needs
    more than one example per batch.

    Example:
        >>> import torch
        >>> from mtlkit.nn import ASPP
        >>> aspp = ASPP(16, rates=(2, 4), channels=8)
        >>> tuple(aspp(torch.randn(2, 16, 9, 9)).shape)
        (2, 8, 9, 9)
    """

    def __init__(
        self,
        in_channels: int,
        rates: Sequence[int] = (12, 24, 36),
        channels: int = 256,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        positive_int("in_channels", in_channels)
        positive_int("channels", channels)
        rates = int_sequence("rates", rates)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        branches: list[nn.Module] = [_cbr(nn.Conv2d(in_channels, channels, 1, bias=False))]
        for r in rates:
            conv = nn.Conv2d(in_channels, channels, 3, padding=r, dilation=r, bias=False)
            branches.append(_cbr(conv))
        self.branches = nn.ModuleList(branches)
        self.pooling = _cbr(nn.Conv2d(in_channels, channels, 1, bias=False))
        self.project = nn.Sequential(
            nn.Conv2d(channels * (len(rates) + 2), channels, 1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
        )

    def forward(self, x: Tensor) -> Tensor:
        outs = [b(x) for b in self.branches]
        pooled = self.pooling(F.adaptive_avg_pool2d(x, 1))
        outs.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False))
        out: Tensor = self.project(torch.cat(outs, dim=1))
        return out


class DeepLabHead(nn.Sequential):
    """DeepLab-v3 dense prediction head: ``ASPP -> 3x3 conv -> BN -> ReLU -> 1x1 conv``.

    The head of Chen et al. (arXiv:1706.05587), as used per task by MTAN-DeepLabv3 and most
    NYUv2/Cityscapes multi-task benchmarks on a dilated ResNet-50. The output has the
    resolution of the input feature map; upsample it to the image size in the loss.

    Args:
        in_channels: input channels (2048 for ResNet-50).
        out_channels: prediction channels (classes, 1 for depth, 3 for normals).
        rates: ASPP atrous rates (12, 24, 36 for output stride 8).
        channels: ASPP and hidden channels.
        dropout: ASPP dropout.

    Example:
        >>> import torch
        >>> from mtlkit.nn import DeepLabHead
        >>> head = DeepLabHead(16, 3, rates=(2,), channels=8)
        >>> tuple(head(torch.randn(2, 16, 5, 5)).shape)
        (2, 3, 5, 5)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: Sequence[int] = (12, 24, 36),
        channels: int = 256,
        dropout: float = 0.5,
    ) -> None:
        positive_int("out_channels", out_channels)
        super().__init__(
            ASPP(in_channels, rates, channels, dropout),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, out_channels, 1),
        )


def _cbr(conv: nn.Conv2d) -> nn.Sequential:
    return nn.Sequential(conv, nn.BatchNorm2d(conv.out_channels), nn.ReLU(inplace=True))
