"""PAD-Net, MTI-Net, NDDR-CNN and HRNet: shapes, deep supervision, which loss reaches which
module, initialisation and checkpoint loading."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlkit.nn import NDDR, HRNet, MTINet, NDDRLayer, PADNet, deep_supervision_loss, hrnet_w18
from mtlkit.nn._complexity import count_macs, count_parameters
from mtlkit.tasks import Task

TINY = {"width": 4, "modules": (1, 1, 1), "blocks": 1, "stem_blocks": 1}
TASKS = {"seg": 3, "depth": 1, "edge": 1}


def _reached(loss: torch.Tensor, module: nn.Module) -> bool:
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return any(g is not None and bool(g.abs().sum() > 0) for g in grads)


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    net = HRNet(**TINY)
    pad = PADNet(net, net.out_channels, TASKS, channels=4)
    net = HRNet(**TINY)
    mti = MTINet(net, net.channels, TASKS)
    return {"pad_net": pad, "mti_net": mti}


@pytest.mark.parametrize("name", ["pad_net", "mti_net"])
def test_outputs_and_initial_predictions_have_the_input_size(name: str) -> None:
    model = _models()[name]
    out = model(torch.randn(2, 3, 32, 48))
    assert {t: tuple(y.shape) for t, y in out.items()} == {
        t: (2, n, 32, 48) for t, n in TASKS.items()
    }
    scales = 1 if name == "pad_net" else 4
    for t, n in TASKS.items():
        assert [tuple(a.shape) for a in model.aux_outputs[t]] == [(2, n, 32, 48)] * scales


@pytest.mark.parametrize("name", ["pad_net", "mti_net"])
def test_deep_supervision_reaches_the_initial_heads_and_final_losses_do_not(name: str) -> None:
    model = _models()[name]
    model.eval()  # fixed BN statistics: a bias before BN is then not cancelled
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    tasks = [Task.regression(t, dim=n) for t, n in TASKS.items()]
    targets = {t: torch.randn_like(y) for t, y in out.items()}
    # regression losses compare (N, C, H, W) maps elementwise
    aux = deep_supervision_loss(model, tasks, targets)
    assert aux is not None
    for t in TASKS:
        assert _reached(aux, model.initial[t]), t
        final = (out[t] - targets[t]).square().mean()
        assert not _reached(final, model.initial[t]), t
        assert set(map(id, model.initial[t].parameters())) <= set(
            map(id, model.task_parameters(t))
        )
    # the sum is weighted by aux_weight
    model.aux_weight = 0.25
    again = deep_supervision_loss(model, tasks, targets)
    torch.testing.assert_close(again, 0.25 * aux)


@pytest.mark.parametrize("name", ["pad_net", "mti_net"])
def test_each_final_loss_reaches_its_own_distillation_and_every_task_feature_block(
    name: str,
) -> None:
    model = _models()[name]
    model.eval()
    out = model(torch.randn(2, 3, 32, 32))
    for t in TASKS:
        loss = out[t].square().mean()
        for u in TASKS:
            assert _reached(loss, model.distill[u]) == (u == t), (t, u)
            blocks = list(model.refine[u]) if name == "mti_net" else [model.refine[u]]
            for s, block in enumerate(blocks):  # every task's features, at every scale
                assert _reached(loss, block), (t, u, s)
        if name == "mti_net":
            for fpm in model.propagate:  # feature propagation is shared by all tasks
                assert _reached(loss, fpm), t


def test_mti_net_distills_at_every_scale_from_the_other_tasks() -> None:
    model = _models()["mti_net"]
    for t in TASKS:
        scales = list(model.distill[t])
        assert len(scales) == 4
        assert all(set(d.sources) == set(TASKS) - {t} for d in scales)
        assert [d.gate[0].in_channels for d in scales] == [4, 8, 16, 32]


def test_distillation_adds_gated_messages_from_the_other_tasks() -> None:
    """D_t = F_t + sigmoid(BN(W_g F_t)) * sum_u BN(W_tu F_u), checked with identity-like
    weights set by hand: W_g = 0 gives a gate of 1/2."""
    from mtlkit.nn import MultiModalDistillation

    d = MultiModalDistillation("a", ["b", "c"], 2).eval()
    with torch.no_grad():
        d.gate[0].weight.zero_()
        for u, scale in (("b", 1.0), ("c", 2.0)):
            w = torch.zeros(2, 2, 3, 3)
            w[0, 0, 1, 1] = w[1, 1, 1, 1] = scale  # centre tap: scale * identity
            d.messages[u][0].weight.copy_(w)
    fa, fb, fc = (torch.randn(1, 2, 4, 4) for _ in range(3))
    bn_scale = 1 / (1 + 1e-5) ** 0.5  # eval BN with running var 1
    expected = fa + 0.5 * bn_scale * (fb + 2.0 * fc)
    torch.testing.assert_close(d({"a": fa, "b": fb, "c": fc}), expected)


def test_nddr_layer_initialisation_and_column_independence_at_identity() -> None:
    layer = NDDRLayer(3, 2, init=(0.9, 0.1))
    w = layer.convs[1].weight[:, :, 0, 0]
    expected = torch.tensor([[0.05, 0, 0.9, 0, 0.05, 0], [0, 0.05, 0, 0.9, 0, 0.05]])
    torch.testing.assert_close(w, expected)
    # With init (1, 0) the columns do not exchange anything: task a's loss ignores column b.
    torch.manual_seed(0)
    model = NDDR(
        ["a", "b"],
        [lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: nn.Conv2d(4, 1, 1)],
        channels=[4],
        init=(1.0, 0.0),
    ).eval()
    out = model(torch.randn(2, 3, 8, 8))
    loss_a = out["a"].square().mean()
    assert _reached(loss_a, model.columns["a"][0])
    assert not _reached(loss_a, model.columns["b"][0])
    assert not _reached(loss_a, model.layers[0].convs[1])  # task b's reduction


def test_nddr_rejects_bad_configuration() -> None:
    col = [lambda: nn.Conv2d(3, 4, 1), lambda: nn.Conv2d(4, 1, 1)]
    with pytest.raises(ValueError, match="channels must give one count per fused stage"):
        NDDR(["a", "b"], col, channels=[4, 4])
    with pytest.raises(ValueError, match="fuse_after"):
        NDDR(["a", "b"], col, channels=[4], fuse_after=[1])


def _hrnet_parameters(c: int, modules: tuple[int, int, int], blocks: int, stem: int) -> int:
    """HRNetV2 parameters from the architecture's description (Wang et al. 2020)."""
    bn = lambda n: 2 * n
    conv = lambda i, o, k: i * o * k * k
    basic = lambda n: 2 * (conv(n, n, 3) + bn(n))
    total = conv(3, 64, 3) + bn(64) + conv(64, 64, 3) + bn(64)  # stem
    bottleneck = conv(64, 64, 1) + conv(64, 64, 3) + conv(64, 256, 1) + bn(64) * 2 + bn(256)
    total += bottleneck + conv(64, 256, 1) + bn(256)  # first bottleneck with projection
    total += (stem - 1) * (conv(256, 64, 1) + conv(64, 64, 3) + conv(64, 256, 1) + 2 * bn(64) + bn(256))
    widths = [c * 2**i for i in range(4)]
    total += conv(256, c, 3) + bn(c) + conv(256, 2 * c, 3) + bn(2 * c)  # transition 1
    for s, n_modules in enumerate(modules):
        branches = widths[: s + 2]
        if s > 0:  # new branch from the lowest one
            total += conv(branches[-2], branches[-1], 3) + bn(branches[-1])
        per_module = sum(blocks * basic(w) for w in branches)
        for i, wi in enumerate(branches):
            for j, wj in enumerate(branches):
                if j > i:
                    per_module += conv(wj, wi, 1) + bn(wi)
                elif j < i:
                    per_module += (i - j - 1) * (conv(wj, wj, 3) + bn(wj))
                    per_module += conv(wj, wi, 3) + bn(wi)
        total += n_modules * per_module
    return total


def test_hrnet_w18_parameters_match_the_architecture_description() -> None:
    assert count_parameters(hrnet_w18()) == _hrnet_parameters(18, (1, 4, 3), 4, 4) == 9_562_260
    assert count_parameters(HRNet(**TINY)) == _hrnet_parameters(4, (1, 1, 1), 1, 1)


def test_hrnet_loads_an_imagenet_state_dict_and_names_a_mismatch(tmp_path) -> None:
    torch.manual_seed(0)
    source = HRNet(**TINY)
    state = dict(source.state_dict())
    state["classifier.weight"] = torch.zeros(1000, 2048)  # skipped, as ImageNet heads are
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    target = HRNet(**TINY)
    target.load_pretrained(path)
    x = torch.randn(1, 3, 32, 32)
    source.eval(), target.eval()
    for a, b in zip(source(x), target(x)):
        torch.testing.assert_close(a, b)
    torch.save({"conv1.weight": torch.zeros(64, 3, 3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="missing key"):
        target.load_pretrained(tmp_path / "bad.pth")
    with pytest.raises(FileNotFoundError, match="no file"):
        target.load_pretrained(tmp_path / "none.pth")


def test_complexity_counts_a_small_nddr_by_hand() -> None:
    """Two columns (conv 3->4 3x3, conv 4->1 1x1) and one NDDR layer, input 3x8x8:
    params 2 x (108 + 4 + 4 + 1) + 2 x (4 x 8) + 2 x (2 x 4) = 314;
    MACs 2 x 256 x 27 (first convs) + 2 x 256 x 8 (NDDR) + 2 x 64 x 4 (heads) = 18432."""
    model = NDDR(["a", "b"], [lambda: nn.Conv2d(3, 4, 3, padding=1), lambda: nn.Conv2d(4, 1, 1)],
                 channels=[4])
    assert count_parameters(model) == 314
    assert count_macs(model, (3, 8, 8)) == 18432


def test_survey_block_prints_ours_beside_the_survey_cells(monkeypatch) -> None:
    import mtlkit.train._dense_models as dm
    from mtlkit.data._pascal import PASCAL_TASKS, pascal_tasks
    from mtlkit.nn._complexity import Complexity
    from mtlkit.train.models import build_model

    # the survey code's set-ups: backbones per dataset and input sizes; no published cell filled
    nyud = [(r.model, r.backbone, r.input_shape) for r in dm.SURVEY_SETUPS if r.dataset == "nyud"]
    assert ("nddr", "resnet50", (3, 480, 640)) in nyud and ("mti_net", "hrnet_w18",
                                                            (3, 480, 640)) in nyud
    assert {r.backbone for r in dm.SURVEY_SETUPS if r.dataset == "pascal_context"} == {
        "hrnet_w18", "resnet18"}
    assert all(r.params_m is None and r.flops_g is None for r in dm.SURVEY_SETUPS)
    # another input size: nothing is built, ours is "—", the survey's "n/a"
    text = dm.survey_block("pascal_context", (3, 64, 64))
    assert text.splitlines()[3] == "| mti_net | hrnet_w18 | 3x512x512 | — | — | n/a | n/a |"
    # the survey's input size: counts given, or counted on the survey's tasks
    given = {("mti_net", "hrnet_w18"): Complexity("mti_net", 2_500_000, 7_250_000_000)}
    text = dm.survey_block("pascal_context", (3, 512, 512), {**{
        (r.model, r.backbone): Complexity(r.model, 1, 1) for r in dm.SURVEY_SETUPS}, **given})
    assert "| mti_net | hrnet_w18 | 3x512x512 | 2.50 | 7.25 | n/a | n/a |" in text
    tiny = dm.SurveySetup("pascal_context", "mti_net", "tiny", (3, 16, 16),
                          {"hrnet": {"width": 4, "modules": [1, 1, 1], "blocks": 1,
                                     "stem_blocks": 1}})
    monkeypatch.setattr(dm, "SURVEY_SETUPS", (tiny,))
    model = build_model("mti_net", pascal_tasks(PASCAL_TASKS), (3, 16, 16), **tiny.options)
    params, macs = count_parameters(model), count_macs(model, (3, 16, 16))
    row = dm.survey_block("pascal_context", (3, 16, 16)).splitlines()[2]
    assert row == (f"| mti_net | tiny | 3x16x16 | {params / 1e6:.2f} | {macs / 1e9:.2f} | n/a | "
                   "n/a |")
    with pytest.raises(ValueError, match="dataset must be one of"):
        dm.survey_block("cityscapes", (3, 16, 16))
