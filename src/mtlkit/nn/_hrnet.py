"""HRNet: parallel high-to-low resolution branches with repeated multi-scale fusion. No torchvision."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.nn._base import int_sequence, positive_int
from mtlkit.nn._resnet import BasicBlock, Bottleneck

#: Keys of an ImageNet HRNet classification checkpoint that the backbone does not have.
_CLASSIFIER_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _branch(channels: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*[BasicBlock(channels, channels) for _ in range(blocks)])


class HighResolutionModule(nn.Module):
    """One HRNet module: ``blocks`` basic blocks on each branch, then every branch receives the
    sum of all branches resized to its resolution (strided 3x3 convolutions going down, a 1x1
    convolution then nearest upsampling going up), followed by ReLU."""

    def __init__(self, channels: Sequence[int], blocks: int) -> None:
        super().__init__()
        self.channels = tuple(channels)
        n = len(self.channels)
        self.branches = nn.ModuleList(_branch(c, blocks) for c in self.channels)
        fuse: list[nn.ModuleList] = []
        for i in range(n):
            row: list[nn.Module] = []
            for j in range(n):
                if j > i:  # lower resolution -> higher: 1x1 conv + BN, upsampled in forward
                    row.append(_conv_bn(self.channels[j], self.channels[i], 1, relu=False))
                elif j == i:
                    row.append(nn.Identity())
                else:  # higher -> lower: i - j strided 3x3 convolutions
                    steps: list[nn.Module] = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        out = self.channels[i] if last else self.channels[j]
                        steps.append(_conv_bn(self.channels[j], out, 3, 2, relu=not last))
                    row.append(nn.Sequential(*steps))
            fuse.append(nn.ModuleList(row))
        self.fuse_layers = nn.ModuleList(fuse)
        self.relu = nn.ReLU(inplace=False)

    def forward(self, xs: Sequence[Tensor]) -> list[Tensor]:
        ys = [branch(x) for branch, x in zip(self.branches, xs)]
        out = []
        for i, row in enumerate(self.fuse_layers):
            total = ys[i]
            for j, layer in enumerate(row):
                if j == i:
                    continue
                z = layer(ys[j])
                if j > i:
                    z = F.interpolate(z, size=ys[i].shape[-2:], mode="nearest")
                total = total + z
            out.append(self.relu(total))
        return out


class HRNet(nn.Module):
    """HRNetV2 backbone: four parallel branches of halving resolution (output strides 4 to 32).

    Proposed in *Deep High-Resolution Representation Learning for Visual Recognition* (Wang,
    Sun, Cheng, Jiang, Deng, Zhao, Liu, Mu, Tan, Wang, Liu, Xiao; TPAMI 2020,
    arXiv:1908.07919). A stem of two stride-2 3x3 convolutions (64 channels) and one stage of
    four bottlenecks (256 channels), then stages 2, 3, 4 of 1, 4 and 3 modules with 2, 3 and 4
    branches; each module runs 4 basic blocks per branch and fuses the branches. Branch
    widths are ``(C, 2C, 4C, 8C)``; ``C = 18`` is HRNet-W18 (:func:`hrnet_w18`).

    ``forward(x)`` returns the four branch outputs, high to low resolution; :meth:`concat`
    upsamples and concatenates them (the HRNetV2 representation, ``15 C`` channels at stride 4).

    Module names follow the official HRNet code (``conv1``, ``bn1``, ``conv2``, ``bn2``,
    ``layer1``, ``transitionN``, ``stageN.M.branches``, ``stageN.M.fuse_layers``), so an
    ImageNet classification state dict loads with :meth:`load_pretrained` (its classifier
    entries are skipped).

    Args:
        width: ``C``, the width of the highest-resolution branch.
        in_channels: input channels.
        modules: modules in stages 2, 3, 4.
        blocks: basic blocks per branch in every module (the paper's 4; 2 in "small" HRNets).
        stem_blocks: bottlenecks in stage 1.

    Attributes:
        channels: the four branch widths.

    .. note:: Upsampling in the fusion is nearest-neighbour as in the official classification
       code; the transition layers and fusion convolutions have no bias, as there.

    Example:
        >>> import torch
        >>> from mtlkit.nn import HRNet
        >>> net = HRNet(width=4, modules=(1, 1, 1), blocks=1, stem_blocks=1)
        >>> [tuple(y.shape) for y in net(torch.randn(1, 3, 64, 64))]
        [(1, 4, 16, 16), (1, 8, 8, 8), (1, 16, 4, 4), (1, 32, 2, 2)]
        >>> tuple(net.concat(net(torch.randn(1, 3, 64, 64))).shape)
        (1, 60, 16, 16)
    """

    def __init__(
        self,
        width: int = 18,
        in_channels: int = 3,
        modules: Sequence[int] = (1, 4, 3),
        blocks: int = 4,
        stem_blocks: int = 4,
    ) -> None:
        super().__init__()
        positive_int("width", width)
        positive_int("in_channels", in_channels)
        mods = int_sequence("modules", modules)
        if len(mods) != 3:
            raise ValueError(f"modules must give the module counts of stages 2, 3, 4, got {mods}")
        positive_int("blocks", blocks)
        positive_int("stem_blocks", stem_blocks)
        self.channels = tuple(width * 2**i for i in range(4))
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        down = nn.Sequential(nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256))
        self.layer1 = nn.Sequential(
            Bottleneck(64, 64, downsample=down),
            *[Bottleneck(256, 64) for _ in range(stem_blocks - 1)],
        )
        previous = [256]
        for s in range(3):
            current = list(self.channels[: s + 2])
            setattr(self, f"transition{s + 1}", self._transition(previous, current))
            stage = nn.Sequential(*[HighResolutionModule(current, blocks) for _ in range(mods[s])])
            setattr(self, f"stage{s + 2}", stage)
            previous = current
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _transition(previous: Sequence[int], current: Sequence[int]) -> nn.ModuleList:
        layers: list[nn.Module] = []
        for i, c in enumerate(current):
            if i < len(previous):
                same = previous[i] == c
                layers.append(nn.Identity() if same else _conv_bn(previous[i], c, 3))
            else:  # a new, lower branch from the lowest existing one
                layers.append(nn.Sequential(_conv_bn(previous[-1], c, 3, 2)))
        return nn.ModuleList(layers)

    @property
    def out_channels(self) -> int:
        """Channels of :meth:`concat`: the sum of the branch widths."""
        return sum(self.channels)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]
        for s in range(3):
            transition = getattr(self, f"transition{s + 1}")
            inputs = [
                layer(xs[i] if i < len(xs) else xs[-1]) for i, layer in enumerate(transition)
            ]
            xs = getattr(self, f"stage{s + 2}")(inputs)
        return xs

    @staticmethod
    def concat(features: Sequence[Tensor]) -> Tensor:
        """Upsample every branch output bilinearly to the first's size and concatenate."""
        size = features[0].shape[-2:]
        ups = [features[0]] + [
            F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in features[1:]
        ]
        return torch.cat(ups, dim=1)

    def load_pretrained(self, path: str | Path) -> None:
        """Load ImageNet weights from a state dict file (e.g. the official
        ``hrnetv2_w18_imagenet_pretrained.pth``); classifier entries are skipped.

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file does not hold a state dict of this backbone (the message
                names the first missing or unexpected key).
        """
        p = Path(path).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"hrnet weights: no file {p}")
        state = torch.load(p, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"hrnet weights: {p} does not hold a state dict")  # noqa: TRY004
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith(_CLASSIFIER_PREFIXES)}
        missing, unexpected = self.load_state_dict(state, strict=False)
        if missing or unexpected:
            what = f"missing key {missing[0]!r}" if missing else f"unexpected key {unexpected[0]!r}"
            raise ValueError(f"hrnet weights: {p} does not match this HRNet ({what})")


def hrnet_w18(in_channels: int = 3, pretrained: str | Path | None = None) -> HRNet:
    """HRNetV2-W18 (9,562,260 parameters without a classifier); see :class:`HRNet`.

    Args:
        in_channels: input channels.
        pretrained: a local ImageNet state dict to load (e.g. the official HRNetV2-W18
            classification weights); ``None`` for random initialisation.

    Example:
        >>> from mtlkit.nn import hrnet_w18
        >>> hrnet_w18().channels
        (18, 36, 72, 144)
    """
    net = HRNet(18, in_channels)
    if pretrained is not None:
        net.load_pretrained(pretrained)
    return net
