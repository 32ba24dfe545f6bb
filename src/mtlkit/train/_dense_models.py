"""The dense-prediction survey's models, registered for ``mtlkit train|compare --model NAME``.

Vandenhende et al., *Multi-Task Learning for Dense Prediction Tasks: A Survey* (TPAMI 2021,
arXiv:2004.13379) compares encoder-focused models (a shared trunk, cross-stitch, MTAN,
NDDR-CNN) with decoder-focused ones (PAD-Net, MTI-Net) on NYUD-v2 and PASCAL-Context:

========================  ================================================================
``pad_net``               :class:`~mtlkit.nn.PADNet` on HRNet-W18 (task features: 256)
``mti_net``               :class:`~mtlkit.nn.MTINet` on HRNet-W18
``nddr``                  :class:`~mtlkit.nn.NDDR`, one dilated ResNet-50 per task
``hard_sharing``          registered in :mod:`mtlkit.train.models`; ``backbone: hrnet_w18``
                          gives the survey's HRNet-W18 baseline (:func:`hrnet_hard_sharing`)
``mtan``                  registered in :mod:`mtlkit.train.models` (dilated ResNet, DeepLab-v3
                          heads; ``backbone: resnet50`` for the MTAN-DeepLabv3 size)
``cross_stitch``          registered in :mod:`mtlkit.train.models`; ``backbone: resnet18 |
                          resnet50`` gives one dilated ResNet per task
                          (:func:`resnet_cross_stitch`)
========================  ================================================================

Every builder is ``builder(tasks, input_shape, **options)``; every output is at the input's
resolution. Options here: ``hrnet`` (a dict of :class:`~mtlkit.nn.HRNet` arguments, e.g.
``{"width": 18}``), ``pretrained`` (a local ImageNet state dict for the backbone),
``resnet`` (``"resnet50"`` or ``"resnet18"``), ``layers`` (ResNet stage depths, overriding
``resnet``'s), ``head_channels`` (DeepLab-v3 head width, 256), ``channels`` (PAD-Net's task
features), ``aux_weight`` (deep supervision of PAD-Net and MTI-Net, 1), ``init`` (NDDR's
``(alpha, beta)``, ``(0.9, 0.1)``; ``cross_stitch`` takes the same).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlkit.nn import (
    NDDR,
    CrossStitch,
    DeepLabHead,
    HardSharing,
    HRNet,
    MTINet,
    PADNet,
    ResNet,
)
from mtlkit.nn._complexity import Complexity, count_macs, count_parameters
from mtlkit.nn._distill import conv_head
from mtlkit.nn._resnet import BasicBlock, Bottleneck
from mtlkit.tasks import Task
from mtlkit.train.models import Resize, _need, init_pair, input_kind, register_model

RESNETS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


def _outputs(tasks: Sequence[Task]) -> dict[str, int]:
    return {t.name: int(t.num_outputs) for t in tasks}


def _image(input_shape: Sequence[int], model: str, tasks: Sequence[Task] = ()) -> tuple[int, int, int]:
    """``(C, H, W)``; with ``tasks``, a clear error unless every task is dense."""
    if tasks:
        _need(model, input_kind(tasks, input_shape), ("dense",))
    if len(input_shape) != 3:
        raise ValueError(f"model {model!r} needs image inputs (C, H, W), got {tuple(input_shape)}")
    c, h, w = (int(v) for v in input_shape)
    return c, h, w


def make_hrnet(in_channels: int, hrnet: Mapping[str, Any] | None,
               pretrained: str | Path | None) -> HRNet:
    """HRNet-W18 (or the architecture ``hrnet`` describes), with local weights if given."""
    kwargs = dict(hrnet or {})
    try:
        net = HRNet(in_channels=in_channels, **kwargs)
    except TypeError as err:
        raise ValueError(f"hrnet: {err}") from None
    if pretrained is not None:
        net.load_pretrained(pretrained)
    return net


def make_resnet(in_channels: int, resnet: str, layers: Sequence[int] | None,
                pretrained: str | Path | None) -> ResNet:
    """A dilated ResNet (output stride 8), with local ImageNet weights if given."""
    if resnet not in RESNETS:
        raise ValueError(f"resnet must be one of {sorted(RESNETS)}, got {resnet!r}")
    block, depth = RESNETS[resnet]
    net = ResNet(block, tuple(layers) if layers is not None else depth,  # type: ignore[arg-type]
                 in_channels, dilated=True)
    if pretrained is not None:
        p = Path(pretrained).expanduser()
        if not p.is_file():
            raise FileNotFoundError(f"pretrained: no file {p}")
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        net.load_state_dict(state)
    return net


def _deeplab(in_channels: int, out: int, size: tuple[int, int], channels: int) -> nn.Module:
    return nn.Sequential(
        DeepLabHead(in_channels, out, rates=(6, 12, 18), channels=channels, dropout=0.1),
        Resize(size),
    )


def hrnet_hard_sharing(tasks: Sequence[Task], input_shape: Sequence[int], *,
                       hrnet: Mapping[str, Any] | None = None,
                       pretrained: str | Path | None = None) -> HardSharing:
    """A shared HRNet-W18 and one HRNet head per task (1x1 conv-BN-ReLU, 1x1 conv on the 270
    concatenated channels), upsampled to the input size: the survey's multi-task baseline
    (``hard_sharing`` with ``backbone: hrnet_w18``)."""
    c, h, w = _image(input_shape, "hard_sharing")
    net = make_hrnet(c, hrnet, pretrained)
    encoder = nn.Sequential(net, _Concat())
    heads = {t: nn.Sequential(conv_head(net.out_channels, n), Resize((h, w)))
             for t, n in _outputs(tasks).items()}
    return HardSharing(encoder, heads)


class _Concat(nn.Module):
    """HRNet branch outputs -> the HRNetV2 representation."""

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        return HRNet.concat(xs)


@register_model("pad_net")
def pad_net(tasks: Sequence[Task], input_shape: Sequence[int], *,
            hrnet: Mapping[str, Any] | None = None, pretrained: str | Path | None = None,
            channels: int = 256, aux_weight: float = 1.0) -> PADNet:
    """PAD-Net on HRNet-W18 (see :class:`~mtlkit.nn.PADNet`)."""
    c, _, _ = _image(input_shape, "pad_net", tasks)
    net = make_hrnet(c, hrnet, pretrained)
    return PADNet(net, net.out_channels, _outputs(tasks), channels=channels,
                  aux_weight=aux_weight)


@register_model("mti_net")
def mti_net(tasks: Sequence[Task], input_shape: Sequence[int], *,
            hrnet: Mapping[str, Any] | None = None, pretrained: str | Path | None = None,
            aux_weight: float = 1.0) -> MTINet:
    """MTI-Net on HRNet-W18 (see :class:`~mtlkit.nn.MTINet`)."""
    c, _, _ = _image(input_shape, "mti_net", tasks)
    net = make_hrnet(c, hrnet, pretrained)
    return MTINet(net, net.channels, _outputs(tasks), aux_weight=aux_weight)


def _resnet_column(c: int, size: tuple[int, int], resnet: str, layers: Sequence[int] | None,
                   pretrained: str | Path | None, head_channels: int, outputs: Mapping[str, int]):
    def column(task: str) -> list[nn.Module]:
        net = make_resnet(c, resnet, layers, pretrained)
        return [
            nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1),
            net.layer2, net.layer3, net.layer4,
            _deeplab(net.out_channels, outputs[task], size, head_channels),
        ]

    probe = make_resnet(c, resnet, layers, None)
    return column, [ch for _, ch in probe.stage_channels]


def resnet_cross_stitch(tasks: Sequence[Task], input_shape: Sequence[int], resnet: str,
                        init: Sequence[float] = (0.9, 0.1), *, layers: Sequence[int] | None = None,
                        head_channels: int = 256) -> CrossStitch:
    """One dilated ResNet per task with per-channel cross-stitch units after each of its four
    stages, initialised ``init`` (default ``(0.9, 0.1)``, the paper's); DeepLab-v3 heads
    (``cross_stitch`` with ``backbone: resnet18 | resnet50``)."""
    c, h, w = _image(input_shape, "cross_stitch")
    pair = init_pair(init)
    outputs = _outputs(tasks)
    column, chans = _resnet_column(c, (h, w), resnet, layers, None, head_channels, outputs)
    return CrossStitch(list(outputs), column, stitch_after=(0, 1, 2, 3), channels=chans,
                       init=pair)


@register_model("nddr")
def nddr(tasks: Sequence[Task], input_shape: Sequence[int], *, resnet: str = "resnet50",
         layers: Sequence[int] | None = None, pretrained: str | Path | None = None,
         head_channels: int = 256, init: Sequence[float] = (0.9, 0.1)) -> NDDR:
    """One dilated ResNet per task with an NDDR layer after each of its four stages, initialised
    ``init = (alpha, beta)`` (default ``(0.9, 0.1)``, the paper's; ``beta`` is split evenly
    over the other tasks, see :class:`~mtlkit.nn.NDDRLayer`); DeepLab-v3 heads."""
    c, h, w = _image(input_shape, "nddr", tasks)
    pair = init_pair(init)
    outputs = _outputs(tasks)
    column, chans = _resnet_column(c, (h, w), resnet, layers, pretrained, head_channels, outputs)
    return NDDR(list(outputs), column, chans, fuse_after=(0, 1, 2, 3), init=pair)


#: the model choices of the survey's protocol configs
DENSE_MODELS = ("mti_net", "pad_net", "nddr", "mtan", "cross_stitch", "hard_sharing")
#: ``model_options`` giving the survey's backbones to the models registered elsewhere
SURVEY_OPTIONS: dict[str, dict[str, Any]] = {
    "hard_sharing": {"backbone": "hrnet_w18"},
    "cross_stitch": {"backbone": "resnet50"},
    "mtan": {"backbone": "resnet50", "head_channels": 256},
}


def complexity_table(
    input_shape: Sequence[int],
    dataset: str = "pascal_context",
    models: Sequence[str] = DENSE_MODELS,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Complexity]:
    """Parameters and multiply-accumulates of each model for the survey tasks of ``dataset``
    (``pascal_context`` or ``nyud``; no data is read) and one input of ``input_shape``, built
    with ``options[model]`` (default :data:`SURVEY_OPTIONS`).

    Example:
        >>> rows = complexity_table((3, 32, 32), "nyud", ["mti_net"],
        ...                         {"mti_net": {"hrnet": {"width": 4, "modules": [1, 1, 1],
        ...                                                "blocks": 1, "stem_blocks": 1}}})
        >>> rows[0].model, rows[0].parameters > 0, rows[0].macs > 0
        ('mti_net', True, True)
    """
    from mtlkit.data._nyud import NYUD_TASKS, nyud_tasks
    from mtlkit.data._pascal import PASCAL_TASKS, pascal_tasks
    from mtlkit.train.models import build_model

    tables = {"pascal_context": lambda: pascal_tasks(PASCAL_TASKS),
              "nyud": lambda: nyud_tasks(NYUD_TASKS)}
    if dataset not in tables:
        raise ValueError(f"dataset must be one of {sorted(tables)}, got {dataset!r}")
    tasks = tables[dataset]()
    rows = []
    for name in models:
        chosen = SURVEY_OPTIONS if options is None else options
        model = build_model(name, tasks, input_shape, **dict(chosen.get(name, {})))
        rows.append(Complexity(name, count_parameters(model), count_macs(model, input_shape)))
    return rows

@dataclass(frozen=True)
class SurveySetup:
    """One architecture + backbone + input size of the survey's experiments, with the
    parameters (M) and FLOPs (G) the survey publishes for it (None: not confirmed from a source
    by this build, printed ``n/a``).

    The set-ups (backbone per dataset, input size) are those of the survey's public code,
    github.com/SimonVandenhende/Multi-Task-Learning-PyTorch (``configs/nyud/{hrnet18,resnet50}``,
    ``configs/pascal/{hrnet18,resnet18}``, ``utils/config.py`` for the input sizes).
    """

    dataset: str
    model: str
    backbone: str
    input_shape: tuple[int, int, int]
    options: Mapping[str, Any]
    params_m: float | None = None
    flops_g: float | None = None
    source: str = ("Vandenhende et al. 2021, arXiv:2004.13379, NYUD-v2 and PASCAL-Context "
                   "results tables: not confirmed")


def _setups(dataset: str, size: tuple[int, int, int], resnet: str) -> tuple[SurveySetup, ...]:
    hr = "hrnet_w18"
    return (
        SurveySetup(dataset, "hard_sharing", hr, size, {"backbone": hr}),
        SurveySetup(dataset, "mti_net", hr, size, {}),
        SurveySetup(dataset, "pad_net", hr, size, {}),
        SurveySetup(dataset, "hard_sharing", resnet, size, {"backbone": resnet,
                                                            "head_channels": 256}),
        SurveySetup(dataset, "mtan", resnet, size, {"backbone": resnet, "head_channels": 256}),
        SurveySetup(dataset, "cross_stitch", resnet, size, {"backbone": resnet}),
        SurveySetup(dataset, "nddr", resnet, size, {"resnet": resnet}),
    )


#: The tasks of the survey's NYUD-v2 runs (its code's task_dictionary): two of the loader's four.
SURVEY_NYUD_TASKS = ("semseg", "depth")
#: The survey's set-ups: NYUD-v2 at 480 x 640 with HRNet-W18 or ResNet-50, PASCAL-Context at
#: 512 x 512 with HRNet-W18 or ResNet-18. No published count is filled in: the survey's tables
#: could not be read from a source this build can cite (see :data:`SURVEY_NOTE`).
SURVEY_SETUPS: tuple[SurveySetup, ...] = (
    *_setups("nyud", (3, 480, 640), "resnet50"),
    *_setups("pascal_context", (3, 512, 512), "resnet18"),
)


def survey_block(dataset: str, input_shape: Sequence[int],
                 counted: Mapping[tuple[str, str], Complexity] | None = None) -> str:
    """The survey's set-ups of ``dataset`` as a Markdown table: ours (parameters, MACs; counted
    only where ``input_shape`` is the survey's input, else ``—``; for the survey's tasks:
    :data:`SURVEY_NYUD_TASKS` on NYUD-v2, the five on PASCAL-Context) beside the survey's
    published parameters and FLOPs (``n/a`` where not confirmed). ``counted`` maps
    ``(model, backbone)`` to counts already made (tests pass them; else they are counted).

    Example:
        >>> print(survey_block("nyud", (3, 8, 8)).splitlines()[2])
        | hard_sharing | hrnet_w18 | 3x480x640 | — | — | n/a | n/a |
    """
    from mtlkit.data._nyud import nyud_tasks
    from mtlkit.data._pascal import PASCAL_TASKS, pascal_tasks
    from mtlkit.train.models import build_model

    rows = [r for r in SURVEY_SETUPS if r.dataset == dataset]
    if not rows:
        raise ValueError(f"dataset must be one of {sorted({r.dataset for r in SURVEY_SETUPS})}, "
                         f"got {dataset!r}")
    counted = dict(counted or {})
    head = ("| model | backbone | survey input | ours: parameters (M) | ours: GMACs | "
            "survey: parameters (M) | survey: GFLOPs |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in rows:
        same = tuple(input_shape) == r.input_shape
        key = (r.model, r.backbone)
        if same and key not in counted:
            tasks = nyud_tasks(SURVEY_NYUD_TASKS) if dataset == "nyud" else pascal_tasks(
                PASCAL_TASKS)
            model = build_model(r.model, tasks, r.input_shape, **dict(r.options))
            counted[key] = Complexity(r.model, count_parameters(model),
                                      count_macs(model, r.input_shape))
        ours = counted.get(key) if same else None
        cells = [r.model, r.backbone, "x".join(str(v) for v in r.input_shape),
                 f"{ours.parameters / 1e6:.2f}" if ours else "—",
                 f"{ours.macs / 1e9:.2f}" if ours else "—",
                 "n/a" if r.params_m is None else f"{r.params_m:g}",
                 "n/a" if r.flops_g is None else f"{r.flops_g:g}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Printed under ``mtlkit models``.
SURVEY_NOTE = (
    "Ours count parameters, and multiply-accumulates (MACs: one multiply and one add) of the "
    "convolutions and linear layers in one forward pass; batch norm, activations and resizing "
    "are not counted. The survey (Vandenhende et al., TPAMI 2021, arXiv:2004.13379) gives "
    "parameters and FLOPs beside its NYUD-v2 and PASCAL-Context results, but its tables could "
    "not be read from a citable source in this build, so every published cell is n/a (not "
    "confirmed), and whether its FLOPs count MACs or 2 x MACs is not known; when filled in, "
    "a 2x gap between the two FLOP columns means the other convention. Ours are counted "
    "('—': run with --input-size at the survey's input to count them) for the survey code's "
    "set-ups (github.com/SimonVandenhende/Multi-Task-Learning-PyTorch: NYUD-v2 480x640 with "
    "HRNet-W18 or ResNet-50, PASCAL-Context 512x512 with HRNet-W18 or ResNet-18), with "
    "the survey's task sets (NYUD-v2: semseg and depth; PASCAL-Context: all five) and mtlkit's "
    "own layers, which differ from the survey's code in detail (e.g. its PAD-Net fuses the "
    "HRNet scales first); the table above uses --tasks' full task set."
)
