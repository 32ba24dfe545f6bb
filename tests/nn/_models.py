"""Every architecture built on a tiny input, with per-task losses, for reuse across tests.

``tiny_models()`` returns ``name -> (model, x, losses)`` where ``losses[task](output)`` is a
scalar loss of that task's output: MSE to a fixed target, the model's initial (training-mode)
output shifted by 1 plus noise of std 0.1, so the losses start near 1 and can be learned. A
training step reads::

    out = model(x)
    loss = sum(fn(out[t]) for t, fn in losses.items())
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.nn import (
    CGC,
    MRN,
    MTAN,
    NDDR,
    PLE,
    Cascade,
    CrossStitch,
    DeepLabHead,
    DSelectK,
    FullyAdaptiveSharing,
    HardSharing,
    HRNet,
    MMoE,
    MTINet,
    MultiTaskModel,
    PADNet,
    SegNetMTAN,
    Sluice,
    resnet18,
    widen,
)

LossFn = Callable[[Tensor], Tensor]
Entry = tuple[MultiTaskModel, Tensor, dict[str, LossFn]]

IN = 6  # input features of the vector models
BATCH = 4


def _mlp(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Linear(i, o), nn.ReLU())


def _conv(i: int, o: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())


def _build() -> dict[str, tuple[MultiTaskModel, Tensor]]:
    vec = torch.randn(BATCH, IN)
    img = torch.randn(BATCH, 3, 16, 16)
    models: dict[str, tuple[MultiTaskModel, Tensor]] = {}

    models["hard_sharing"] = (
        HardSharing(_mlp(IN, 16), {"a": nn.Linear(16, 1), "b": nn.Linear(16, 3)}),
        vec,
    )
    models["deeplab_resnet18"] = (
        HardSharing(
            resnet18(dilated=True),
            {
                "seg": DeepLabHead(512, 4, rates=(1, 2), channels=8, dropout=0.0),
                "depth": DeepLabHead(512, 1, rates=(1, 2), channels=8, dropout=0.0),
            },
        ),
        torch.randn(BATCH, 3, 32, 32),
    )
    models["segnet_mtan"] = (
        SegNetMTAN({"seg": 3, "depth": 1, "normal": 3}, filters=(4, 4, 8, 8, 8)),
        torch.randn(BATCH, 3, 32, 32),
    )
    models["mtan"] = (
        MTAN(TinyTrunk(), {"seg": nn.Conv2d(8, 3, 1), "depth": nn.Conv2d(8, 1, 1)}, reduction=2),
        img,
    )
    tasks = {"a": 1, "b": 2}
    models["mmoe"] = (MMoE(IN, tasks, num_experts=3, expert_hidden=(8,), tower_hidden=(4,)), vec)
    models["cgc"] = (CGC(IN, tasks, expert_hidden=(8,), tower_hidden=(4,)), vec)
    models["ple"] = (
        PLE(IN, {"a": 1, "b": 2, "c": 1}, num_levels=3, expert_hidden=(8,), tower_hidden=(4,)),
        vec,
    )
    models["dselect_k"] = (
        DSelectK(IN, tasks, num_experts=5, k=2, expert_hidden=(8,), tower_hidden=(4,)),
        vec,
    )
    models["dselect_k_static"] = (
        DSelectK(IN, tasks, num_experts=4, k=2, per_example=False, expert_hidden=(8,)),
        vec,
    )
    models["cascade"] = (
        Cascade(
            _mlp(IN, 8),
            {"a": nn.Linear(8, 2), "b": nn.Linear(8 + 2, 1), "c": nn.Linear(8 + 2 + 1, 1)},
            depends_on={"b": ["a"], "c": ["a", "b"]},
        ),
        vec,
    )
    models["cascade_no_detach"] = (
        Cascade(
            _mlp(IN, 8),
            {"a": nn.Linear(8, 2), "b": nn.Linear(8 + 2, 1), "c": nn.Linear(8, 1)},
            depends_on={"b": ["a"]},
            detach=False,
        ),
        vec,
    )
    tiny_hrnet = {"width": 4, "modules": (1, 1, 1), "blocks": 1, "stem_blocks": 1}
    net = HRNet(**tiny_hrnet)
    models["pad_net"] = (
        PADNet(net, net.out_channels, {"seg": 3, "edge": 1}, channels=4),
        img,
    )
    net = HRNet(**tiny_hrnet)
    models["mti_net"] = (MTINet(net, net.channels, {"seg": 3, "edge": 1}), img)
    models["nddr"] = (
        NDDR(
            ["a", "b", "c"],
            lambda t: [_conv(3, 4), _conv(4, 4), nn.Conv2d(4, 2 if t == "a" else 1, 1)],
            channels=(4, 4),
        ),
        img[:, :, :8, :8],
    )
    models["cross_stitch"] = (
        CrossStitch(
            ["a", "b", "c"],
            [lambda: _mlp(IN, 8), lambda: _mlp(8, 8), lambda: nn.Linear(8, 1)],
            init=(0.9, 0.1),
        ),
        vec,
    )
    models["cross_stitch_conv"] = (
        CrossStitch(
            ["a", "b"],
            lambda t: [_conv(3, 4), _conv(4, 4), nn.Conv2d(4, 2 if t == "a" else 1, 1)],
            channels=(4, 4),
            init=(0.9, 0.1),
        ),
        img[:, :, :8, :8],
    )
    models["sluice"] = (
        Sluice(
            ["a", "b"],
            [lambda: _mlp(IN, 8), lambda: _mlp(8, 8), lambda: _mlp(8, 8)],
            {"a": nn.Linear(8, 1), "b": nn.Linear(8, 2)},
            num_subspaces=2,
        ),
        vec,
    )
    models["mrn"] = (MRN(_mlp(IN, 8), 8, {"a": 2, "b": 2, "c": 2}, hidden=(4,)), vec)
    fafs = FullyAdaptiveSharing(
        [_mlp(IN, 8), _mlp(8, 8)], {t: nn.Linear(8, 1) for t in ("a", "b", "c", "d")}
    )
    models["fafs_thin"] = (fafs, vec)
    affinity = torch.tensor(
        [[1.0, 0.9, 0.2, 0.1], [0.9, 1.0, 0.1, 0.2], [0.2, 0.1, 1.0, 0.3], [0.1, 0.2, 0.3, 1.0]]
    )
    models["fafs_widened"] = (widen(widen(fafs, affinity), affinity, num_groups=2), vec)
    return models


class TinyTrunk(nn.Module):
    """A 3-stage conv trunk for MTAN: 16x16 -> 8x8 -> 8x8, each stage ``(u, p)`` = (first
    conv, second conv), so the transitions go down once and keep the size once."""

    stage_channels = ((4, 4), (8, 8), (8, 8))

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleList([_conv(3, 4), _conv(4, 8), _conv(8, 8)])
        self.tail = nn.ModuleList([_conv(4, 4), _conv(8, 8), _conv(8, 8)])

    def stages(self, x: Tensor) -> list[tuple[Tensor, Tensor]]:
        pairs = []
        for j, (body, tail) in enumerate(zip(self.body, self.tail)):
            if j == 1:
                x = F.max_pool2d(x, 2)
            u = body(x)
            x = tail(u)
            pairs.append((u, x))
        return pairs


def tiny_models(seed: int = 0) -> dict[str, Entry]:
    """``name -> (model, input, {task: loss_fn})`` for every architecture, deterministic in
    ``seed`` (the global RNG state is left untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        built = _build()
        result: dict[str, Entry] = {}
        for name, (model, x) in built.items():
            with torch.no_grad():
                out = model(x)
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.reset_running_stats()
            model.features = None
            # Learnable targets: the initial output shifted by 1 plus a little noise.
            targets = {t: y + 1 + 0.1 * torch.randn_like(y) for t, y in out.items()}
            result[name] = (model, x, {t: _mse(y) for t, y in targets.items()})
    return result


def _mse(target: Tensor) -> LossFn:
    def loss(output: Tensor) -> Tensor:
        return F.mse_loss(output.float(), target)

    return loss
