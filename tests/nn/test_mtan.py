"""MTAN: the published SegNet-MTAN, the generic trunk version, attention transitions."""

from __future__ import annotations

import pytest
import torch
from _models import TinyTrunk
from torch import nn

from mtlkit.nn import MTAN, AttentionTransition, SegNetMTAN, resnet18


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _segnet_mtan_parameters(filters: tuple[int, ...], outs: tuple[int, ...], c_in: int = 3) -> int:
    """SegNet-MTAN's parameter count worked out from the architecture of Liu, Johns, Davison,
    "End-to-End Multi-Task Learning with Attention" (CVPR 2019, arXiv:1803.10704) as built by
    the official im2im_pred/model_segnet_mtan.py (github.com/lorenmt/mtan)."""

    def cbr(i: int, o: int) -> int:  # 3x3 conv with bias + BN
        return 9 * i * o + o + 2 * o

    def att(i: int, mid: int, o: int) -> int:  # 1x1 conv + BN + ReLU + 1x1 conv + BN + sigmoid
        return i * mid + 3 * mid + mid * o + 3 * o

    f, depth = filters, (2, 2, 3, 3, 3)
    dec_out = [f[lvl - 1] if lvl else f[0] for lvl in range(5)]
    trunk, c = 0, c_in
    for lvl in range(5):  # encoder: VGG-16 convolutions
        trunk += cbr(c, f[lvl]) + (depth[lvl] - 1) * cbr(f[lvl], f[lvl])
        c = f[lvl]
    for lvl in reversed(range(5)):  # decoder: mirrored, first conv changes the channels
        trunk += cbr(f[lvl], dec_out[lvl]) + (depth[lvl] - 1) * cbr(dec_out[lvl], dec_out[lvl])
    # Shared attention blocks: encoder f_j -> f_j+1 (f4 -> f4 last), decoder f4 -> f3 first,
    # then the decoder levels downwards (f0 -> f0 last).
    shared = sum(cbr(f[j], f[j + 1]) for j in range(4)) + cbr(f[4], f[4])
    shared += cbr(f[4], dec_out[4]) + sum(
        cbr(dec_out[lvl], dec_out[lvl - 1]) for lvl in (4, 3, 2, 1)
    )
    # Per task: 5 encoder masks (f0 -> f0, then 2 f_j -> f_j) and 5 decoder masks
    # ([unpooled f_l, attention out_l] -> out_l), plus the head 3x3 conv f0 -> f0, 1x1 -> out.
    masks = att(f[0], f[0], f[0]) + sum(att(2 * f[j], f[j], f[j]) for j in range(1, 5))
    masks += sum(att(f[lvl] + dec_out[lvl], dec_out[lvl], dec_out[lvl]) for lvl in range(5))
    heads = sum(9 * f[0] * f[0] + f[0] + f[0] * n + n for n in outs)
    return trunk + shared + len(outs) * masks + heads


def test_segnet_mtan_has_the_published_parameter_count() -> None:
    # NYUv2, 3 tasks: 13-class segmentation, depth (1), surface normals (3). The official code
    # prints 44,229,076 parameters ("44.2M"), which includes its 3 uncertainty-weighting
    # log-variances; the network itself has 44,229,073. It also prints the count relative to its
    # single-task SegNet (24,981,069, see test_blocks.py): 44,229,076 / 24,981,069 = 1.7705.
    # The paper's own table was not available to re-check here; no discrepancy was found with
    # the official code.
    expected = _segnet_mtan_parameters((64, 128, 256, 512, 512), (13, 1, 3))
    assert expected == 44_229_073 == 44_229_076 - 3
    model = SegNetMTAN({"segmentation": 13, "depth": 1, "normal": 3})
    assert _count(model) == expected
    assert round((expected + 3) / 24_981_069, 2) == 1.77


def test_segnet_mtan_count_formula_holds_for_other_widths() -> None:
    filters, outs = (4, 6, 8, 10, 12), (2, 5)
    model = SegNetMTAN({"a": 2, "b": 5}, in_channels=1, filters=filters)
    assert _count(model) == _segnet_mtan_parameters(filters, outs, c_in=1)
    assert model(torch.randn(2, 1, 32, 32))["b"].shape == (2, 5, 32, 32)


def test_saturated_masks_reduce_mtan_to_hard_sharing() -> None:
    """With every mask at 1, each task head reads the trunk's last stage output."""
    model = MTAN(TinyTrunk(), {"a": nn.Conv2d(8, 2, 1), "b": nn.Conv2d(8, 1, 1)}).eval()
    for masks in model.attention.values():
        for g in masks:
            g[4].bias.data.fill_(50.0)  # last BN before the sigmoid: sigmoid(50) == 1 in fp32
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    last = model.trunk.stages(x)[-1][1]
    for t in model.tasks:
        torch.testing.assert_close(out[t], model.heads[t](last), rtol=0, atol=0)
    assert model.features is None


def test_attention_transition_runs_the_block_at_the_lower_resolution() -> None:
    seen = []

    class Probe(nn.Module):
        def forward(self, a: torch.Tensor) -> torch.Tensor:
            seen.append(tuple(a.shape[-2:]))
            return a

    h = AttentionTransition(Probe())
    a = torch.arange(16.0).view(1, 1, 4, 4)
    down = h(a, (2, 2))
    torch.testing.assert_close(down, torch.nn.functional.max_pool2d(a, 2))
    up = h(a, (8, 8))
    assert up.shape[-2:] == (8, 8) and up[0, 0, 0, 0] == 0 and up[0, 0, -1, -1] == 15
    same = h(a, (4, 4))
    assert torch.equal(same, a)
    assert seen == [(4, 4), (8, 8), (4, 4)]


def test_mtan_on_a_dilated_resnet_as_in_mtan_deeplabv3() -> None:
    trunk = resnet18(dilated=True)
    model = MTAN(trunk, {"seg": nn.Conv2d(512, 3, 1), "depth": nn.Conv2d(512, 1, 1)}, reduction=4)
    # Masks use the bottleneck width C/4 of the official MTAN-DeepLabv3.
    assert model.attention["seg"][3][0].out_channels == 512 // 4
    assert model.attention["seg"][3][0].in_channels == 2 * 512
    out = model.eval()(torch.randn(2, 3, 32, 32))
    assert out["seg"].shape == (2, 3, 4, 4) and out["depth"].shape == (2, 1, 4, 4)


def test_mtan_rejects_bad_trunks() -> None:
    with pytest.raises(TypeError, match="stages"):
        MTAN(nn.Linear(2, 2), {"a": nn.Identity()})
    trunk = TinyTrunk()
    with pytest.raises(ValueError, match="reduction"):
        MTAN(trunk, {"a": nn.Identity()}, reduction=0)
    model = MTAN(trunk, {"a": nn.Identity()}, stage_channels=trunk.stage_channels[:2])
    with pytest.raises(ValueError, match="3 stages, expected 2"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="tasks"):
        SegNetMTAN({"a": 0})
