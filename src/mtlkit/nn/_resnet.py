"""ResNet encoders (no classifier), optionally dilated to output stride 8. No torchvision."""

from __future__ import annotations

from torch import Tensor, nn

from mtlkit.nn._base import positive_int


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        in_ch, out_ch, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


def _conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34).

    ``first_dilation`` applies to the first (possibly strided) convolution, ``dilation`` to
    the second; they differ in the first block of a stage whose stride became dilation.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        first_dilation: int | None = None,
    ) -> None:
        super().__init__()
        first = dilation if first_dilation is None else first_dilation
        self.conv1 = _conv3x3(in_channels, planes, stride, first)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: Tensor = self.relu(out + identity)
        return result


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50/101/152).

    The stride sits on the 3x3 convolution (the common "ResNet v1.5" placement); the paper puts
    it on the first 1x1. The parameter count is the same. The 3x3 convolution uses
    ``first_dilation`` when given (the first block of a stage whose stride became dilation).
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
        first_dilation: int | None = None,
    ) -> None:
        super().__init__()
        first = dilation if first_dilation is None else first_dilation
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, first)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        result: Tensor = self.relu(out + identity)
        return result


class ResNet(nn.Module):
    """A ResNet trunk without average pooling and classifier: image -> last feature map.

    Proposed in *Deep Residual Learning for Image Recognition* (He, Zhang, Ren, Sun, CVPR 2016,
    arXiv:1512.03385). With ``dilated=True`` the strides of the last two stages are replaced by
    dilation 2 and 4 (the formerly strided convolution keeps the previous dilation), so the
    output stride is 8 instead of 32, as in DeepLab (Chen et al., *Rethinking Atrous
    Convolution for Semantic Image Segmentation*, arXiv:1706.05587) and the dilated ResNets of
    Yu, Koltun, Funkhouser (*Dilated Residual Networks*, CVPR 2017, arXiv:1705.09914).
    Dilation changes no parameter count.

    Module names follow the common layout (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
    ``layerN.0.downsample.0/1``), so an ImageNet ResNet state dict without its ``fc.*`` entries
    loads with ``load_state_dict``.

    Args:
        block: :class:`BasicBlock` or :class:`Bottleneck`.
        layers: number of blocks in each of the four stages.
        in_channels: input channels (3 for RGB).
        dilated: output stride 8 instead of 32.

    Attributes:
        out_channels: channels of the output map (512 x ``block.expansion``).
        stage_channels: ``(channels of u, channels of p)`` per stage for :class:`~mtlkit.nn.MTAN`.

    Example:
        >>> import torch
        >>> from mtlkit.nn import resnet18
        >>> enc = resnet18(dilated=True)
        >>> tuple(enc(torch.randn(1, 3, 64, 64)).shape)
        (1, 512, 8, 8)
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: tuple[int, int, int, int],
        in_channels: int = 3,
        dilated: bool = False,
    ) -> None:
        super().__init__()
        if block not in (BasicBlock, Bottleneck):
            raise ValueError(f"block must be BasicBlock or Bottleneck, got {block!r}")
        if len(layers) != 4:
            raise ValueError(f"layers must give 4 stage depths, got {layers!r}")
        for i, n in enumerate(layers):
            positive_int(f"layers[{i}]", n)
        positive_int("in_channels", in_channels)
        self.dilated = bool(dilated)
        self._in = 64
        self._dilation = 1
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1, False)
        self.layer2 = self._make_layer(block, 128, layers[1], 2, False)
        self.layer3 = self._make_layer(block, 256, layers[2], 2, self.dilated)
        self.layer4 = self._make_layer(block, 512, layers[3], 2, self.dilated)
        self.out_channels = 512 * block.expansion
        stages = (self.layer1, self.layer2, self.layer3, self.layer4)
        self.stage_channels = tuple(
            (c if len(layer) > 1 else _in_channels(layer[0]), c)
            for layer, c in zip(stages, (64 * block.expansion * 2**i for i in range(4)))
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        blocks: int,
        stride: int,
        dilate: bool,
    ) -> nn.Sequential:
        previous = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        out = planes * block.expansion
        downsample = None
        if stride != 1 or self._in != out:
            downsample = nn.Sequential(_conv1x1(self._in, out, stride), nn.BatchNorm2d(out))
        mods: list[nn.Module] = [
            block(self._in, planes, stride, self._dilation, downsample, first_dilation=previous)
        ]
        self._in = out
        mods += [block(out, planes, 1, self._dilation) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def stem(self, x: Tensor) -> Tensor:
        """``conv1 -> bn1 -> relu -> maxpool`` (output stride 4)."""
        out: Tensor = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return out

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        out: Tensor = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return out

    def stages(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Per stage ``(u, p)``: ``u`` the output of all but the last block, ``p`` the stage
        output, as in the official MTAN-DeepLabv3 design (attention over the last block)."""
        pairs = []
        x = self.stem(x)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            u = layer[:-1](x) if len(layer) > 1 else x
            x = layer[-1](u)
            pairs.append((u, x))
        return pairs


def _in_channels(block: nn.Module) -> int:
    assert isinstance(block, (BasicBlock, Bottleneck))
    return block.conv1.in_channels


def resnet18(in_channels: int = 3, dilated: bool = False) -> ResNet:
    """ResNet-18 trunk (11,176,512 parameters without ``fc``); see :class:`ResNet`.

    Example:
        >>> from mtlkit.nn import resnet18
        >>> resnet18().out_channels
        512
    """
    return ResNet(BasicBlock, (2, 2, 2, 2), in_channels, dilated)


def resnet50(in_channels: int = 3, dilated: bool = False) -> ResNet:
    """ResNet-50 trunk (23,508,032 parameters without ``fc``); see :class:`ResNet`.

    Example:
        >>> from mtlkit.nn import resnet50
        >>> resnet50(dilated=True).out_channels
        2048
    """
    return ResNet(Bottleneck, (3, 4, 6, 3), in_channels, dilated)
