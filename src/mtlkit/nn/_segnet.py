"""SegNet encoder-decoder, the shared network of the MTAN paper's NYUv2 experiments."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.nn._base import int_sequence, positive_int
from mtlkit.nn._utils import conv_bn_relu

#: Convolutions per encoder block (VGG-16's 13 convolutions); the decoder mirrors them.
ENCODER_DEPTHS = (2, 2, 3, 3, 3)


class SegNet(nn.Module):
    """SegNet: a VGG-16-style encoder with max-pooling indices reused by the decoder.

    Proposed in *SegNet: A Deep Convolutional Encoder-Decoder Architecture for Image
    Segmentation* (Badrinarayanan, Kendall, Cipolla, TPAMI 2017, arXiv:1511.00561). This is the
    variant of the MTAN paper (Liu, Johns, Davison, CVPR 2019, arXiv:1803.10704) and its official
    code: five encoder blocks of 2, 2, 3, 3, 3 ``conv3x3-BN-ReLU`` layers with ``filters``
    channels, each followed by 2x2 max-pooling; five decoder blocks that unpool with the stored
    indices and apply 3, 3, 3, 2, 2 layers, the first of each block changing the channels to
    those of the matching encoder level. Output: ``filters[0]`` channels at the input
    resolution. Convolutions are Xavier-normal initialised with zero bias, as in the official
    code. Any input size works (unpooling restores the exact pre-pooling size).

    Args:
        in_channels: input channels.
        filters: channels of the five levels (published: 64, 128, 256, 512, 512).

    Attributes:
        out_channels: ``filters[0]``.
        stage_channels: ``(channels of u, channels of p)`` for the 10 stages used by
            :class:`~mtlkit.nn.MTAN`: encoder ``u`` is the block's first layer output, decoder
            ``u`` the unpooled block input; ``p`` is the block output.

    Example:
        >>> import torch
        >>> from mtlkit.nn import SegNet
        >>> net = SegNet(filters=(4, 8, 8, 16, 16))
        >>> tuple(net(torch.randn(2, 3, 32, 32)).shape)
        (2, 4, 32, 32)
    """

    def __init__(
        self, in_channels: int = 3, filters: Sequence[int] = (64, 128, 256, 512, 512)
    ) -> None:
        super().__init__()
        positive_int("in_channels", in_channels)
        f = int_sequence("filters", filters)
        if len(f) != 5:
            raise ValueError(f"filters must give 5 channel counts, got {filters!r}")
        self.filters = f
        encoder = []
        c = in_channels
        for level, depth in enumerate(ENCODER_DEPTHS):
            encoder.append(_block(c, f[level], depth))
            c = f[level]
        decoder = []
        for level in reversed(range(5)):  # decoder stage j works at encoder level 4 - j
            out = f[level - 1] if level > 0 else f[0]
            decoder.append(_block(f[level], out, ENCODER_DEPTHS[level]))
        self.encoder = nn.ModuleList(encoder)
        self.decoder = nn.ModuleList(decoder)
        self.out_channels = f[0]
        enc = [(f[i], f[i]) for i in range(5)]
        dec = [(f[level], f[level - 1] if level > 0 else f[0]) for level in reversed(range(5))]
        self.stage_channels = tuple(enc + dec)
        xavier_init(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(x)[-1][1]

    def stages(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """The 10 ``(u, p)`` pairs of the encoder and decoder blocks (see ``stage_channels``)."""
        pairs = []
        pooled = []
        for block in self.encoder:
            assert isinstance(block, nn.Sequential)
            u = block[0](x)
            p = block[1:](u)
            pairs.append((u, p))
            x, idx = F.max_pool2d(p, 2, 2, return_indices=True)
            pooled.append((idx, p.shape[-2:]))
        for block in self.decoder:
            idx, size = pooled.pop()
            u = F.max_unpool2d(x, idx, (2, 2), (2, 2), output_size=size)
            x = block(u)
            pairs.append((u, x))
        return pairs


def _block(in_channels: int, out_channels: int, depth: int) -> nn.Sequential:
    layers = [conv_bn_relu(in_channels, out_channels)]
    layers += [conv_bn_relu(out_channels, out_channels) for _ in range(depth - 1)]
    return nn.Sequential(*layers)


def xavier_init(module: nn.Module) -> None:
    """The MTAN code's initialisation: Xavier-normal conv/linear weights, zero biases, BN 1/0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_normal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
