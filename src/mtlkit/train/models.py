"""The model registry of ``mtlkit compare`` / ``train``, and the default model, sized to the data.

``build_model(name, tasks, input_shape, **options)`` builds a registered model
(:func:`available_models`: ``default``, ``hard_sharing``, ``resnet18_deeplab``,
``resnet50_deeplab``, ``segnet_mtan``, ``mtan``, ``cross_stitch``, ``mmoe``, ``cgc``, ``ple``,
``dselect_k``, ``mrn``, ``celeba_cnn``) or a user's ``package.module:function`` called the same way.
:class:`~mtlkit.nn.Sluice`, :class:`~mtlkit.nn.Cascade` and
:class:`~mtlkit.nn.FullyAdaptiveSharing` need a layout only their user can give (subspaces, a
task graph, branch groups): build them in a function of yours and name it by module path.

The default model (``default``, the datasets' choice unless a protocol names another):

* Dense tasks (segmentation, depth, normals; e.g. NYUv2): a dilated ResNet-18 encoder (output
  stride 8) and one DeepLab-v3 head per task, upsampled to the image size: the layout of the
  NYUv2 benchmarks of MTAN (Liu et al., CVPR 2019) and LibMTL, with ResNet-18 instead of
  ResNet-50 to stay usable on a CPU.
* Other tasks on images (C, H, W): a small convolutional encoder and an MLP head per task.
* Vectors: the MLP trunk of the GradNorm synthetic benchmark (Chen et al. 2018: four
  fully-connected layers of 100 units) and an MLP head per task.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import Tensor, nn
from torch.nn import functional as F

from mtlkit.nn import (
    CGC,
    MRN,
    MTAN,
    PLE,
    CrossStitch,
    DeepLabHead,
    DSelectK,
    HardSharing,
    MMoE,
    ResNet,
    SegNetMTAN,
    resnet18,
    resnet50,
)
from mtlkit.tasks import Task

DENSE_KINDS = ("segmentation", "depth", "normals", "binary_map")

#: ``builder(tasks, input_shape, **options) -> nn.Module`` returning ``{task: output}``.
ModelBuilder = Callable[..., nn.Module]
M = TypeVar("M", bound=ModelBuilder)
_MODELS: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[M], M]:
    """Register ``builder(tasks, input_shape, **options)`` as the model ``name``."""

    def wrap(builder: M) -> M:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = builder
        return builder

    return wrap


def available_models() -> list[str]:
    """Names of the registered models, sorted."""
    return sorted(_MODELS)


def model_builder(name: str) -> ModelBuilder:
    """The builder registered as ``name``, or ``package.module:function`` imported from a user's
    module (called the same way: ``function(tasks, input_shape, **options)``)."""
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            builder = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"model {name!r}: cannot import {attr!r} from {module!r} ({exc})") from None
        if not callable(builder):
            raise ValueError(f"model {name!r} is not callable")
        return builder
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
    return _MODELS[name]


def build_model(
    name: str, tasks: Sequence[Task], input_shape: Sequence[int], **options: Any
) -> nn.Module:
    """Build the model ``name`` (registered, or ``package.module:function``) for the tasks.

    Example:
        >>> import torch
        >>> from mtlkit.tasks import Task
        >>> m = build_model("default", [Task.regression("y")], (4,))
        >>> tuple(m(torch.zeros(2, 4))["y"].shape)
        (2, 1)
    """
    return model_builder(name)(tasks, tuple(input_shape), **options)


def task_outputs(task: Task) -> int:
    """Number of outputs a head needs for ``task``."""
    return int(task.num_outputs)


class Resize(nn.Module):
    """Bilinear resizing of a dense prediction to a fixed ``size`` (the image's)."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


@register_model("default")
def _default(tasks: Sequence[Task], input_shape: Sequence[int]) -> nn.Module:
    return default_model(input_shape, tasks)


def default_model(input_shape: Sequence[int], tasks: Sequence[Task]) -> HardSharing:
    """A hard-sharing model for inputs of ``input_shape`` (without the batch dimension).

    Example:
        >>> from mtlkit.tasks import Task
        >>> m = default_model((1, 12, 12), [Task.classification("a", 10), Task.regression("b")])
        >>> import torch
        >>> {t: tuple(y.shape) for t, y in m(torch.zeros(2, 1, 12, 12)).items()}
        {'a': (2, 10), 'b': (2, 1)}
    """
    dense = [t.name for t in tasks if t.kind in DENSE_KINDS]
    if dense:
        if len(dense) != len(tasks) or len(input_shape) != 3:
            raise ValueError(
                f"the default dense model needs image inputs (C, H, W) and dense tasks only; "
                f"got input shape {tuple(input_shape)} and tasks "
                f"{[(t.name, t.kind) for t in tasks]}"
            )
        c, h, w = input_shape
        heads = {
            t.name: nn.Sequential(
                DeepLabHead(512, task_outputs(t), rates=(6, 12, 18), channels=128, dropout=0.1),
                Resize((h, w)),
            )
            for t in tasks
        }
        return HardSharing(resnet18(in_channels=c, dilated=True), heads)
    if len(input_shape) == 3:
        c, h, w = input_shape
        # Batch normalisation: without it the built-in comparison's plain sum needs about 50
        # epochs to level off, with it about 20 (README, "The default budget").
        encoder: nn.Module = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), 128), nn.ReLU(),
        )
        width = 128
    elif len(input_shape) == 1:
        width = 100
        encoder = nn.Sequential(
            nn.Linear(input_shape[0], width), nn.ReLU(),
            *[m for _ in range(3) for m in (nn.Linear(width, width), nn.ReLU())],
        )
    else:
        raise ValueError(f"no default model for inputs of shape {tuple(input_shape)}")
    heads = {
        t.name: nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, task_outputs(t)))
        for t in tasks
    }
    return HardSharing(encoder, heads)


# ---------------------------------------------------------------------- the registered models
# Every builder is ``builder(tasks, input_shape, **options)``. Inputs come in three kinds: flat
# vectors (D,), images (C, H, W) with per-sample tasks (classification, regression,
# multi-label), and images with dense tasks (segmentation, depth, normals; the prediction has
# the image's size). A builder that cannot serve a kind says so and names the ones that can.

def input_kind(tasks: Sequence[Task], input_shape: Sequence[int]) -> str:
    """``flat``, ``image`` or ``dense`` (see above); ValueError for a mix or another shape."""
    dense = [t.kind in DENSE_KINDS for t in tasks]
    if len(input_shape) == 1:
        if any(dense):
            raise ValueError(f"dense tasks need image inputs (C, H, W), got {tuple(input_shape)}")
        return "flat"
    if len(input_shape) == 3:
        if all(dense):
            return "dense"
        if not any(dense):
            return "image"
        raise ValueError(f"tasks mix dense and per-sample outputs "
                         f"{[(t.name, t.kind) for t in tasks]}; no registered model serves both")
    raise ValueError(f"no registered model for inputs of shape {tuple(input_shape)}")


def _need(name: str, kind: str, allowed: Sequence[str]) -> None:
    if kind not in allowed:
        raise ValueError(f"model {name!r} serves {' or '.join(allowed)} inputs, not {kind} "
                         f"(hard_sharing serves all three)")


def _mlp_head(width: int, task: Task) -> nn.Module:
    return nn.Sequential(nn.Linear(width, 64), nn.ReLU(), nn.Linear(64, task_outputs(task)))


def _pooled_head(channels: int, task: Task) -> nn.Module:
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), _mlp_head(channels, task))


def _dense_head(channels: int, task: Task, size: tuple[int, int], rates: Sequence[int],
                head_channels: int, dropout: float) -> nn.Module:
    return nn.Sequential(
        DeepLabHead(channels, task_outputs(task), rates=tuple(rates), channels=head_channels,
                    dropout=dropout),
        Resize(size),
    )


def _resnet(backbone: str, in_channels: int, dilated: bool) -> ResNet:
    if backbone == "resnet18":
        return resnet18(in_channels=in_channels, dilated=dilated)
    if backbone == "resnet50":
        return resnet50(in_channels=in_channels, dilated=dilated)
    raise ValueError(f"backbone must be resnet18 or resnet50, got {backbone!r}")


@register_model("hard_sharing")
def hard_sharing(tasks: Sequence[Task], input_shape: Sequence[int], *, backbone: str = "auto",
                 rates: Sequence[int] = (6, 12, 18), head_channels: int = 128,
                 dropout: float = 0.1) -> nn.Module:
    """Hard parameter sharing: one encoder, one head per task (Caruana, ICML 1993).

    ``backbone``: ``auto`` (the default model: an MLP trunk for flat inputs, a small CNN for
    images, a dilated ResNet-18 with DeepLab-v3 heads for dense tasks), ``mlp``, ``conv``,
    ``resnet18`` or ``resnet50`` (dilated, output stride 8, for dense tasks; pooled MLP heads
    otherwise), or ``hrnet_w18`` (dense tasks: the dense-prediction survey's HRNet-W18 with
    HRNet heads). ``rates``, ``head_channels``, ``dropout``: the dense heads' ASPP.

    Example:
        >>> import torch
        >>> m = build_model("hard_sharing", [Task.regression("y")], (3, 8, 8), backbone="resnet18")
        >>> tuple(m(torch.zeros(2, 3, 8, 8))["y"].shape)
        (2, 1)
    """
    kind = input_kind(tasks, input_shape)
    if backbone == "hrnet_w18":  # the dense-prediction survey's baseline (HRNet heads)
        from mtlkit.train._dense_models import hrnet_hard_sharing

        _need("hard_sharing with backbone hrnet_w18", kind, ("dense",))
        return hrnet_hard_sharing(tasks, input_shape)
    if backbone == "auto":
        if kind == "dense":
            backbone = "resnet18"
        else:
            return default_model(input_shape, tasks)
    if backbone in ("mlp", "conv"):
        want = "flat" if backbone == "mlp" else "image"
        if kind != want:
            raise ValueError(f"model_options.backbone {backbone!r} serves {want} inputs, "
                             f"not {kind}")
        return default_model(input_shape, tasks)
    if kind == "flat":
        raise ValueError(f"model_options.backbone {backbone!r} needs image inputs, got flat")
    encoder = _resnet(backbone, input_shape[0], dilated=kind == "dense")
    c = encoder.out_channels
    if kind == "dense":
        size = (int(input_shape[1]), int(input_shape[2]))
        heads = {t.name: _dense_head(c, t, size, rates, head_channels, dropout) for t in tasks}
    else:
        heads = {t.name: _pooled_head(c, t) for t in tasks}
    return HardSharing(encoder, heads)


@register_model("resnet50_deeplab")
def resnet50_deeplab(tasks: Sequence[Task], input_shape: Sequence[int], *,
                     rates: Sequence[int] = (12, 24, 36), head_channels: int = 256,
                     dropout: float = 0.5) -> nn.Module:
    """Dilated ResNet-50 (output stride 8) shared, one DeepLab-v3 (ASPP) head per task: the
    NYUv2 / Cityscapes model of LibMTL (Lin & Zhang, JMLR 2023, arXiv:2203.14338), after
    MTAN-DeepLabv3 (Liu et al., CVPR 2019, arXiv:1803.10704). Dense tasks only.

    .. note:: LibMTL starts the encoder from ImageNet weights; mtlkit has none (no
       torchvision), so the encoder starts from random weights unless you load some.
    """
    _need("resnet50_deeplab", input_kind(tasks, input_shape), ("dense",))
    return hard_sharing(tasks, input_shape, backbone="resnet50", rates=rates,
                        head_channels=head_channels, dropout=dropout)


@register_model("resnet18_deeplab")
def resnet18_deeplab(tasks: Sequence[Task], input_shape: Sequence[int], *,
                     rates: Sequence[int] = (6, 12, 18), head_channels: int = 128,
                     dropout: float = 0.1) -> nn.Module:
    """:func:`resnet50_deeplab` with a dilated ResNet-18 and smaller heads (the default dense
    model, usable on a CPU). Dense tasks only."""
    _need("resnet18_deeplab", input_kind(tasks, input_shape), ("dense",))
    return hard_sharing(tasks, input_shape, backbone="resnet18", rates=rates,
                        head_channels=head_channels, dropout=dropout)


@register_model("segnet_mtan")
def segnet_mtan(tasks: Sequence[Task], input_shape: Sequence[int], *,
                filters: Sequence[int] = (64, 128, 256, 512, 512)) -> nn.Module:
    """:class:`~mtlkit.nn.SegNetMTAN`, the NYUv2 model of MTAN (Liu, Johns, Davison, CVPR 2019,
    arXiv:1803.10704), also used by Nash-MTL and FAMO. Dense tasks only."""
    _need("segnet_mtan", input_kind(tasks, input_shape), ("dense",))
    if input_shape[1] % 32 or input_shape[2] % 32:
        raise ValueError(f"segnet_mtan pools five times: image height and width must be "
                         f"multiples of 32, got {tuple(input_shape[1:])}")
    return SegNetMTAN({t.name: task_outputs(t) for t in tasks}, in_channels=input_shape[0],
                      filters=tuple(filters))


@register_model("mtan")
def mtan(tasks: Sequence[Task], input_shape: Sequence[int], *, backbone: str = "resnet18",
         reduction: int = 4, rates: Sequence[int] = (6, 12, 18), head_channels: int = 128,
         dropout: float = 0.1) -> nn.Module:
    """:class:`~mtlkit.nn.MTAN` on a ResNet trunk (``resnet18`` or ``resnet50``; dilated for
    dense tasks, with DeepLab-v3 heads; pooled MLP heads for per-sample image tasks), as
    MTAN-DeepLabv3 (Liu et al., CVPR 2019, arXiv:1803.10704; ``reduction`` 4 as there)."""
    kind = input_kind(tasks, input_shape)
    _need("mtan", kind, ("image", "dense"))
    trunk = _resnet(backbone, input_shape[0], dilated=kind == "dense")
    c = trunk.stage_channels[-1][1]
    if kind == "dense":
        size = (int(input_shape[1]), int(input_shape[2]))
        heads = {t.name: _dense_head(c, t, size, rates, head_channels, dropout) for t in tasks}
    else:
        heads = {t.name: _pooled_head(c, t) for t in tasks}
    return MTAN(trunk, heads, reduction=reduction)


@register_model("cross_stitch")
def cross_stitch(tasks: Sequence[Task], input_shape: Sequence[int], *, width: int = 64,
                 init: Sequence[float] = (0.9, 0.1), backbone: str = "conv") -> nn.Module:
    """:class:`~mtlkit.nn.CrossStitch` (Misra et al., CVPR 2016, arXiv:1604.03539): one column
    per task, two stitched stages of ``width`` units (fully connected for flat inputs, 3x3
    convolutions for images) then the task's output stage; ``init`` as in the paper. For
    dense tasks ``backbone`` ``resnet18`` or ``resnet50`` instead gives one dilated ResNet per
    task, stitched after each of its four stages, with DeepLab-v3 heads (the dense-prediction
    survey's cross-stitch, :func:`mtlkit.train._dense_models.resnet_cross_stitch`)."""
    kind = input_kind(tasks, input_shape)
    init_pair(init)
    if backbone in ("resnet18", "resnet50"):  # one dilated ResNet per task (the survey's)
        from mtlkit.train._dense_models import resnet_cross_stitch

        _need(f"cross_stitch with backbone {backbone}", kind, ("dense",))
        return resnet_cross_stitch(tasks, input_shape, backbone, init)
    if backbone != "conv":
        raise ValueError(f"backbone must be conv, resnet18 or resnet50, got {backbone!r}")
    outs = {t.name: task_outputs(t) for t in tasks}

    def column(task: str) -> list[nn.Module]:
        if kind == "flat":
            return [nn.Sequential(nn.Linear(input_shape[0], width), nn.ReLU()),
                    nn.Sequential(nn.Linear(width, width), nn.ReLU()),
                    nn.Linear(width, outs[task])]
        c = input_shape[0]
        conv = [nn.Sequential(nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()),
                nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width),
                              nn.ReLU())]
        if kind == "dense":
            return [*conv, nn.Conv2d(width, outs[task], 1)]
        return [*conv, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(width, outs[task]))]

    return CrossStitch([t.name for t in tasks], column, init=init_pair(init))


def init_pair(init: Sequence[float]) -> tuple[float, float]:
    """``init`` of ``cross_stitch`` / ``nddr`` as two floats ``(alpha_s, alpha_d)``; a one-line
    error naming ``model_options.init`` otherwise.

    Example:
        >>> init_pair([0.8, 0.2])
        (0.8, 0.2)
    """
    try:
        if isinstance(init, (str, bytes)) or len(init) != 2:
            raise TypeError
        a, b = (float(v) for v in init)
    except (TypeError, ValueError):
        raise ValueError(f"model_options.init must be a pair (alpha_s, alpha_d), "
                         f"got {init!r}") from None
    if not (math.isfinite(a) and math.isfinite(b)):
        raise ValueError(f"model_options.init must be finite, got {init!r}")
    return a, b


def _experts(name: str, cls: type, tasks: Sequence[Task], input_shape: Sequence[int],
             **options: Any) -> nn.Module:
    _need(name, input_kind(tasks, input_shape), ("flat",))
    return cls(int(input_shape[0]), {t.name: task_outputs(t) for t in tasks}, **options)


@register_model("mmoe")
def mmoe(tasks: Sequence[Task], input_shape: Sequence[int], **options: Any) -> nn.Module:
    """:class:`~mtlkit.nn.MMoE` (Ma et al., KDD 2018) on flat inputs; options as the class."""
    return _experts("mmoe", MMoE, tasks, input_shape, **options)


@register_model("cgc")
def cgc(tasks: Sequence[Task], input_shape: Sequence[int], **options: Any) -> nn.Module:
    """:class:`~mtlkit.nn.CGC` (Tang et al., RecSys 2020) on flat inputs."""
    return _experts("cgc", CGC, tasks, input_shape, **options)


@register_model("ple")
def ple(tasks: Sequence[Task], input_shape: Sequence[int], **options: Any) -> nn.Module:
    """:class:`~mtlkit.nn.PLE` (Tang et al., RecSys 2020) on flat inputs."""
    return _experts("ple", PLE, tasks, input_shape, **options)


@register_model("dselect_k")
def dselect_k(tasks: Sequence[Task], input_shape: Sequence[int], **options: Any) -> nn.Module:
    """:class:`~mtlkit.nn.DSelectK` (Hazimeh et al., NeurIPS 2021) on flat inputs."""
    return _experts("dselect_k", DSelectK, tasks, input_shape, **options)


@register_model("mrn")
def mrn(tasks: Sequence[Task], input_shape: Sequence[int], **options: Any) -> nn.Module:
    """:class:`~mtlkit.nn.MRN` (Long et al., NeurIPS 2017) on the default model's encoder
    (MLP trunk for flat inputs, small CNN for images); options as the class."""
    kind = input_kind(tasks, input_shape)
    _need("mrn", kind, ("flat", "image"))
    encoder = default_model(input_shape, tasks).encoder
    width = 100 if kind == "flat" else 128
    return MRN(encoder, width, {t.name: task_outputs(t) for t in tasks}, **options)


@register_model("celeba_cnn")
def celeba_cnn(tasks: Sequence[Task], input_shape: Sequence[int]) -> nn.Module:
    """The CelebA network of FAMO's experiments (Liu et al., NeurIPS 2023, arXiv:2306.03792),
    after Sener & Koltun (NeurIPS 2018, arXiv:1810.04650): four conv-BN-ReLU stages of
    64, 128, 256 and 512 channels (one, two, two and two convolutions; 2x2 max-pooling after
    the first three), global average pooling, two bias-free 512-unit linear-BN-ReLU layers,
    then one linear head per task. Images only."""
    _need("celeba_cnn", input_kind(tasks, input_shape), ("image",))

    def cbr(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    def fc() -> list[nn.Module]:
        return [nn.Linear(512, 512, bias=False), nn.BatchNorm1d(512), nn.ReLU()]

    encoder = nn.Sequential(
        *cbr(input_shape[0], 64), nn.MaxPool2d(2),
        *cbr(64, 128), *cbr(128, 128), nn.MaxPool2d(2),
        *cbr(128, 256), *cbr(256, 256), nn.MaxPool2d(2),
        *cbr(256, 512), *cbr(512, 512), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        *fc(), *fc(),
    )
    return HardSharing(encoder, {t.name: nn.Linear(512, task_outputs(t)) for t in tasks})


# The benchmark protocols' models register themselves (kept in their own module).
# The dense-prediction survey's decoder-focused models and NDDR-CNN (pad_net, mti_net, nddr)
# register themselves on import.
from mtlkit.train import (
    _dense_models,  # noqa: F401
    protocol_models,  # noqa: F401
)
