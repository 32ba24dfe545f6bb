"""Building blocks: ResNet encoders, SegNet, ASPP / DeepLab head."""

from __future__ import annotations

import pytest
import torch

from mtlkit.nn import ASPP, BasicBlock, DeepLabHead, ResNet, SegNet, resnet18, resnet50


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _bottleneck(c_in: int, planes: int, downsample: bool) -> int:
    """Parameters of one bottleneck: 1x1, 3x3, 1x1 (x4) convs without bias, a BN (2 per
    channel) after each, and a 1x1 conv + BN projection on the first block of a stage."""
    n = c_in * planes + 2 * planes + 9 * planes * planes + 2 * planes
    n += planes * 4 * planes + 2 * 4 * planes
    if downsample:
        n += c_in * 4 * planes + 2 * 4 * planes
    return n


def test_resnet50_has_the_published_parameter_count() -> None:
    # He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016, arXiv:1512.03385),
    # Table 1: ResNet-50 = 7x7/2 conv (64) + stages of 3, 4, 6, 3 bottlenecks (64, 128, 256,
    # 512 planes, expansion 4). The full ImageNet model has 25,557,032 parameters; without
    # the 2048 -> 1000 classifier (2,049,000) that leaves 23,508,032. Worked out block by block:
    stem = 7 * 7 * 3 * 64 + 2 * 64  # 9,536
    total, c = stem, 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        total += _bottleneck(c, planes, True) + (blocks - 1) * _bottleneck(
            4 * planes, planes, False
        )
        c = 4 * planes
    assert total == 23_508_032 == 25_557_032 - (2048 * 1000 + 1000)
    assert _count(resnet50()) == total
    assert _count(resnet50(dilated=True)) == total  # dilation adds no parameters


def test_resnet18_has_the_published_parameter_count() -> None:
    # ResNet-18: 11,689,512 parameters with its 512 -> 1000 classifier (513,000).
    def basic(c_in: int, planes: int, downsample: bool) -> int:
        n = 9 * c_in * planes + 9 * planes * planes + 4 * planes
        return n + (c_in * planes + 2 * planes if downsample else 0)

    total, c = 7 * 7 * 3 * 64 + 2 * 64, 64
    for planes in (64, 128, 256, 512):
        total += basic(c, planes, c != planes) + basic(planes, planes, False)
        c = planes
    assert total == 11_689_512 - 513_000 == 11_176_512
    assert _count(resnet18(dilated=True)) == total


@pytest.mark.parametrize("factory", [resnet18, resnet50])
def test_dilation_gives_output_stride_8_instead_of_32(factory) -> None:
    x = torch.randn(1, 3, 64, 64)
    plain, dilated = factory(), factory(dilated=True)
    assert plain(x).shape[-2:] == (2, 2)
    assert dilated(x).shape[-2:] == (8, 8)
    # Stage 3 runs at dilation 2 (its first block keeps 1), stage 4 at 4 (first block 2).
    convs3 = [
        m
        for m in dilated.layer3.modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    convs4 = [
        m
        for m in dilated.layer4.modules()
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
    ]
    assert [c.dilation[0] for c in convs3][:2] == [1, 2] and all(c.stride == (1, 1) for c in convs3)
    assert convs4[0].dilation[0] == 2 and all(c.dilation[0] == 4 for c in convs4[1:])


def test_resnet_uses_the_usual_state_dict_names() -> None:
    keys = set(resnet50().state_dict())
    for k in (
        "conv1.weight",
        "bn1.running_mean",
        "layer1.0.downsample.0.weight",
        "layer4.2.conv3.weight",
        "layer4.2.bn3.num_batches_tracked",
    ):
        assert k in keys
    assert not any(k.startswith("fc.") for k in keys)


def test_resnet_stages_end_at_the_forward_output() -> None:
    enc = resnet18(dilated=True).eval()
    x = torch.randn(2, 3, 32, 32)
    pairs = enc.stages(x)
    assert len(pairs) == 4
    torch.testing.assert_close(pairs[-1][1], enc(x))
    assert [(u.shape[1], p.shape[1]) for u, p in pairs] == list(enc.stage_channels)
    one_block = ResNet(BasicBlock, (1, 1, 1, 1))
    assert one_block.stage_channels[1] == (64, 128)  # u is the stage input when 1 block


def test_resnet_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="layers"):
        ResNet(BasicBlock, (2, 2, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="in_channels"):
        resnet18(in_channels=0)


def test_segnet_single_task_matches_the_official_parameter_count() -> None:
    # The official MTAN code (github.com/lorenmt/mtan, im2im_pred/model_segnet_single.py) reports
    # parameters relative to 24,981,069: its single-task SegNet with the 13-class NYUv2 head
    # (3x3 conv 64->64 with bias, then 1x1 conv 64->13).
    net = SegNet()
    head = (9 * 64 * 64 + 64) + (64 * 13 + 13)
    assert _count(net) + head == 24_981_069


def test_segnet_restores_any_input_size_and_mirrors_the_encoder() -> None:
    net = SegNet(filters=(4, 8, 8, 16, 16)).eval()
    for h, w in ((32, 32), (35, 45)):
        assert net(torch.randn(1, 3, h, w)).shape == (1, 4, h, w)
    assert [len(b) for b in net.encoder] == [2, 2, 3, 3, 3]
    assert [len(b) for b in net.decoder] == [3, 3, 3, 2, 2]
    with pytest.raises(ValueError, match="filters"):
        SegNet(filters=(4, 8))


def test_aspp_and_deeplab_head_parameter_counts_and_shapes() -> None:
    c_in, ch, rates, out = 32, 8, (1, 2, 3), 5
    head = DeepLabHead(c_in, out, rates=rates, channels=ch, dropout=0.0)
    branch = 2 * ch  # BN after every conv
    aspp = (c_in * ch + branch) + len(rates) * (9 * c_in * ch + branch) + (c_in * ch + branch)
    aspp += (len(rates) + 2) * ch * ch + branch
    assert _count(head[0]) == aspp
    assert _count(head) == aspp + 9 * ch * ch + 2 * ch + ch * out + out
    y = head(torch.randn(2, c_in, 7, 9))
    assert y.shape == (2, out, 7, 9)
    with pytest.raises(ValueError, match="dropout"):
        ASPP(4, dropout=1.0)
    with pytest.raises(ValueError, match="rates"):
        ASPP(4, rates=(0,))
