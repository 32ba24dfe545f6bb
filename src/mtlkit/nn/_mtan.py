"""Multi-Task Attention Network (MTAN): a shared trunk with per-task soft-attention modules."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtlkit.nn._base import MultiTaskModel, check_out_features, check_tasks, positive_int
from mtlkit.nn._segnet import SegNet, xavier_init
from mtlkit.nn._utils import conv_bn_relu, module_list

TransitionBlock = Callable[[int, int], nn.Module]


class StagedTrunk(Protocol):
    """What :class:`MTAN` needs from a trunk: ``stages(x) -> [(u_j, p_j), ...]``."""

    def stages(self, x: Tensor) -> list[tuple[Tensor, Tensor]]: ...


def attention_mask(in_channels: int, hidden: int, out_channels: int) -> nn.Sequential:
    """MTAN's attention module ``g``: ``1x1 conv-BN-ReLU -> 1x1 conv-BN -> sigmoid``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden, 1),
        nn.BatchNorm2d(hidden),
        nn.ReLU(inplace=True),
        nn.Conv2d(hidden, out_channels, 1),
        nn.BatchNorm2d(out_channels),
        nn.Sigmoid(),
    )


class AttentionTransition(nn.Module):
    """MTAN's shared block ``h`` between two attention stages: a conv block plus resizing.

    ``forward(a, size)`` maps an attended feature to the next stage's channels and spatial
    ``size``. The block runs at the lower of the two resolutions: block then max-pooling when
    going down (encoder), bilinear upsampling (``align_corners=True``) then block when going up
    (decoder), as in the official MTAN code.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, a: Tensor, size: Sequence[int]) -> Tensor:
        h, w = int(size[0]), int(size[1])
        out: Tensor
        if tuple(a.shape[-2:]) == (h, w):
            out = self.block(a)
        elif h <= a.shape[-2] and w <= a.shape[-1]:
            out = F.adaptive_max_pool2d(self.block(a), (h, w))
        else:
            out = self.block(F.interpolate(a, size=(h, w), mode="bilinear", align_corners=True))
        return out


class _Bridge(nn.Module):
    """Encoder-to-decoder transition of SegNet-MTAN: pool by 2 with one block, then upsample
    to the decoder's size with a second block (the official code's last encoder and first
    decoder attention blocks)."""

    def __init__(self, down: AttentionTransition, up: AttentionTransition) -> None:
        super().__init__()
        self.down = down
        self.up = up

    def forward(self, a: Tensor, size: Sequence[int]) -> Tensor:
        a = self.down(a, (a.shape[-2] // 2, a.shape[-1] // 2))
        out: Tensor = self.up(a, size)
        return out


class MTAN(MultiTaskModel):
    """Multi-Task Attention Network on any trunk that exposes its stages.

    Proposed in *End-to-End Multi-Task Learning with Attention* (Liu, Johns, Davison, CVPR 2019,
    arXiv:1803.10704). The trunk is shared. At each stage ``j`` it provides ``u_j`` (an
    intermediate feature) and ``p_j`` (the stage output). Task ``t`` learns a soft mask
    ``a_j = g_j^t([u_j, h_{j-1}(a_{j-1})]) * p_j`` with ``g`` = :func:`attention_mask`
    (``[u_0]`` alone at the first stage). The shared transition ``h_{j-1}`` (an
    :class:`AttentionTransition`) maps the previous attended feature to ``p_j``'s channels
    and size. The head of task ``t`` reads the last ``a_J``.

    Args:
        trunk: a module with ``stages(x) -> [(u_j, p_j), ...]``, e.g. :class:`~mtlkit.nn.SegNet`
            or :class:`~mtlkit.nn.ResNet`.
        heads: task name -> head applied to the last attended feature.
        stage_channels: ``(channels of u_j, channels of p_j)`` per stage; defaults to
            ``trunk.stage_channels``.
        reduction: hidden channels of ``g_j`` are ``C(p_j) // reduction``. SegNet-MTAN uses 1;
            the official MTAN-DeepLabv3 uses 4.
        transition_block: ``(in_channels, out_channels) -> module``, the conv block inside each
            ``h`` (default ``conv3x3-BN-ReLU``; MTAN-DeepLabv3 uses a ResNet bottleneck).

    ``features`` is ``None``: the tasks read the trunk at every stage, so no single tensor
    carries all of the shared computation. Shared parameters: the trunk and the transitions
    ``h``. Task parameters: that task's attention modules ``g`` and its head.

    Example:
        >>> import torch
        >>> from mtlkit.nn import MTAN, SegNet
        >>> trunk = SegNet(filters=(4, 8, 8, 16, 16))
        >>> heads = {"seg": torch.nn.Conv2d(4, 5, 1), "depth": torch.nn.Conv2d(4, 1, 1)}
        >>> out = MTAN(trunk, heads)(torch.randn(2, 3, 32, 32))
        >>> {t: tuple(y.shape) for t, y in out.items()}
        {'seg': (2, 5, 32, 32), 'depth': (2, 1, 32, 32)}
    """

    def __init__(
        self,
        trunk: nn.Module,
        heads: Mapping[str, nn.Module],
        *,
        stage_channels: Sequence[tuple[int, int]] | None = None,
        reduction: int = 1,
        transition_block: TransitionBlock | None = None,
    ) -> None:
        if not isinstance(heads, Mapping):
            raise TypeError(f"heads must be a mapping task name -> module, got {type(heads)}")
        super().__init__(check_tasks(heads.keys(), "heads"))
        if not isinstance(trunk, nn.Module) or not callable(getattr(trunk, "stages", None)):
            raise TypeError("trunk must be an nn.Module with a stages(x) -> [(u, p), ...] method")
        if stage_channels is None:
            stage_channels = getattr(trunk, "stage_channels", None)
            if stage_channels is None:
                raise ValueError("stage_channels is required: the trunk has no stage_channels")
        channels = tuple(
            (
                positive_int(f"stage_channels[{j}][0]", int(u)),
                positive_int(f"stage_channels[{j}][1]", int(p)),
            )
            for j, (u, p) in enumerate(stage_channels)
        )
        if not channels:
            raise ValueError("stage_channels must describe at least one stage")
        positive_int("reduction", reduction)
        block = transition_block if transition_block is not None else conv_bn_relu
        self.trunk = trunk
        self.stage_channels = channels
        self.transitions = nn.ModuleList(self._make_transitions(channels, block))
        self.attention = nn.ModuleDict(
            {
                t: nn.ModuleList(
                    attention_mask(u + (p if j > 0 else 0), max(1, p // reduction), p)
                    for j, (u, p) in enumerate(channels)
                )
                for t in self.tasks
            }
        )
        for t, h in heads.items():
            if not isinstance(h, nn.Module):
                raise TypeError(f"heads[{t!r}] must be an nn.Module, got {type(h)}")
        self.heads = nn.ModuleDict(dict(heads))
        self._check_partition()

    def _make_transitions(
        self, channels: Sequence[tuple[int, int]], block: TransitionBlock
    ) -> list[nn.Module]:
        return [
            AttentionTransition(block(channels[j][1], channels[j + 1][1]))
            for j in range(len(channels) - 1)
        ]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        pairs = cast(StagedTrunk, self.trunk).stages(x)
        if len(pairs) != len(self.stage_channels):
            raise ValueError(
                f"trunk.stages returned {len(pairs)} stages, expected {len(self.stage_channels)}"
            )
        self.features = None
        out = {}
        for t in self.tasks:
            a: Tensor | None = None
            for j, (u, p) in enumerate(pairs):
                if a is None:
                    inp = u
                else:
                    inp = torch.cat([u, self.transitions[j - 1](a, u.shape[-2:])], dim=1)
                a = module_list(self.attention, t)[j](inp) * p
            assert a is not None
            out[t] = self.heads[t](a)
        return out

    def _no_features_reason(self) -> str | None:
        return (
            "every task's attention modules read the trunk at every stage, and the shared "
            "transitions run on task-specific attended features"
        )

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        yield from self.attention[task].parameters()
        yield from self.heads[task].parameters()


class SegNetMTAN(MTAN):
    """MTAN on SegNet, the published NYUv2 model of Liu, Johns, Davison (CVPR 2019).

    *End-to-End Multi-Task Learning with Attention* (arXiv:1803.10704), as in the official
    code (``im2im_pred/model_segnet_mtan.py`` of github.com/lorenmt/mtan): the trunk is
    :class:`~mtlkit.nn.SegNet`. There are 10 attention stages (5 encoder, 5 decoder), with
    ``g_j`` hidden width = ``C(p_j)``. The shared blocks ``h`` are ``conv3x3-BN-ReLU``: in the
    encoder, block then 2x2 max-pooling; in the decoder, bilinear upsampling then block. Between
    encoder and decoder both are applied (block + pool, then upsample + block). Each task head
    is ``conv3x3(f0, f0) -> conv1x1(f0, out)`` (no BN or activation between, as published).
    Convolutions are Xavier-normal initialised.

    With ``filters=(64, 128, 256, 512, 512)`` and NYUv2's three tasks (13 classes, depth 1,
    normals 3) this has 44,229,073 parameters. The official code prints 44,229,076 because it
    also counts its 3 uncertainty-weighting log-variances, which live in the balancer here.
    The official code also prints it relative to its single-task SegNet of 24,981,069
    parameters: 1.77.

    Outputs are raw: apply ``log_softmax`` for segmentation or L2-normalise normals in the
    loss, as the official code does inside the model.

    Args:
        tasks: task name -> output channels.
        in_channels: input channels.
        filters: SegNet channels of the five levels; ``filters[3] == filters[4]`` is not
            required here (the official code assumes it).

    Example:
        >>> import torch
        >>> from mtlkit.nn import SegNetMTAN
        >>> model = SegNetMTAN({"seg": 13, "depth": 1}, filters=(4, 8, 8, 16, 16))
        >>> out = model(torch.randn(2, 3, 32, 32))
        >>> {t: tuple(y.shape) for t, y in out.items()}
        {'seg': (2, 13, 32, 32), 'depth': (2, 1, 32, 32)}
    """

    def __init__(
        self,
        tasks: Mapping[str, int],
        in_channels: int = 3,
        filters: Sequence[int] = (64, 128, 256, 512, 512),
    ) -> None:
        outs = check_out_features(tasks)
        trunk = SegNet(in_channels, filters)
        f0 = trunk.filters[0]
        heads = {
            t: nn.Sequential(nn.Conv2d(f0, f0, 3, padding=1), nn.Conv2d(f0, n, 1))
            for t, n in outs.items()
        }
        super().__init__(trunk, heads, reduction=1)
        xavier_init(self)

    def _make_transitions(
        self, channels: Sequence[tuple[int, int]], block: TransitionBlock
    ) -> list[nn.Module]:
        # channels[j][1] = C(p_j): encoder levels 0..4 are stages 0..4, decoder stages 5..9.
        c = [p for _, p in channels]
        result: list[nn.Module] = []
        for j in range(len(c) - 1):
            if j == 4:  # last encoder stage -> first decoder stage
                down = AttentionTransition(block(c[4], c[4]))
                up = AttentionTransition(block(c[4], c[5]))
                result.append(_Bridge(down, up))
            else:
                result.append(AttentionTransition(block(c[j], c[j + 1])))
        return result
