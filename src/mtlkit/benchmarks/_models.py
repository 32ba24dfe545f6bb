"""Benchmark models in plain torch: a small ResNet-style encoder with dense or linear heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class PassCounter:
    """Counts the backward passes through a tensor (a gradient hook; a vectorised backward over
    several tasks counts once)."""

    calls = 0

    @staticmethod
    def hook(grad: Tensor) -> None:
        PassCounter.calls += 1

    @staticmethod
    def watch(x: Tensor) -> Tensor:
        if x.requires_grad:
            x.register_hook(PassCounter.hook)
        return x


class Block(nn.Module):
    """Two 3x3 convolutions with batch norm and a residual connection (1x1 projection when the
    shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.skip(x))


class Encoder(nn.Module):
    """Stem and four residual blocks; output stride 4, ``4 * width`` channels. A
    :class:`PassCounter` after the stem counts the backward passes through the trunk."""

    def __init__(self, width: int) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU())
        self.blocks = nn.Sequential(Block(w, w), Block(w, 2 * w, 2), Block(2 * w, 2 * w),
                                    Block(2 * w, 4 * w, 2))

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.blocks(PassCounter.watch(self.stem(x)))
        return out


@dataclass(frozen=True)
class Suite:
    """One benchmark problem."""

    name: str
    tasks: tuple[str, ...]
    batch: int
    size: int
    width: int | None

    def describe(self) -> str:
        encoder = f"encoder width {self.width}" if self.width else "ResNet-18 encoder"
        return (f"{self.name}: K={len(self.tasks)}, batch {self.batch}, input 3x{self.size}x"
                f"{self.size}, {encoder}")


class DenseMTL(nn.Module):
    """Encoder plus three dense heads (conv-BN-ReLU-conv): 7-class segmentation (cross-entropy),
    depth (L1) and surface normals (1 - cosine), at the encoder's resolution."""

    tasks = ("segmentation", "depth", "normals")

    def __init__(self, width: int, classes: int = 7) -> None:
        super().__init__()
        self.encoder = Encoder(width)
        c = 4 * width
        outs = {"segmentation": classes, "depth": 1, "normals": 3}
        self.heads = nn.ModuleDict({
            t: nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                             nn.Conv2d(c, n, 1))
            for t, n in outs.items()
        })
        self.classes = classes

    def make_batch(self, suite: Suite, device: torch.device) -> tuple[Tensor, dict[str, Tensor]]:
        g = torch.Generator().manual_seed(0)
        b, s = suite.batch, suite.size // 4
        x = torch.randn(b, 3, suite.size, suite.size, generator=g)
        y = {"segmentation": torch.randint(0, self.classes, (b, s, s), generator=g),
             "depth": torch.rand(b, 1, s, s, generator=g),
             "normals": F.normalize(torch.randn(b, 3, s, s, generator=g), dim=1)}
        return x.to(device), {k: v.to(device) for k, v in y.items()}

    def losses(self, x: Tensor, y: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        z = self.encoder(x)
        out = {t: h(z) for t, h in self.heads.items()}
        return {
            "segmentation": F.cross_entropy(out["segmentation"], y["segmentation"]),
            "depth": (out["depth"] - y["depth"]).abs().mean(),
            "normals": 1 - F.cosine_similarity(out["normals"], y["normals"], dim=1).mean(),
        }, z


class ResNet18Encoder(nn.Module):
    """:func:`mtlkit.nn.resnet18` (11.2M parameters, 512 output channels) with a
    :class:`PassCounter` after its stem."""

    def __init__(self) -> None:
        super().__init__()
        from mtlkit.nn import resnet18

        self.net = resnet18()

    def forward(self, x: Tensor) -> Tensor:
        n = self.net
        out: Tensor = n.layer4(n.layer3(n.layer2(n.layer1(PassCounter.watch(n.stem(x))))))
        return out


class ManyTaskClassifier(nn.Module):
    """Encoder, global average pooling, and one linear binary classifier per task (as the 40
    attributes of CelebA), with binary cross-entropy. ``width=None``: a ResNet-18 encoder."""

    def __init__(self, width: int | None, tasks: tuple[str, ...]) -> None:
        super().__init__()
        self.tasks = tasks
        self.encoder: nn.Module = Encoder(width) if width else ResNet18Encoder()
        channels = 4 * width if width else 512
        self.heads = nn.ModuleDict({t: nn.Linear(channels, 1) for t in tasks})

    def make_batch(self, suite: Suite, device: torch.device) -> tuple[Tensor, Tensor]:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(suite.batch, 3, suite.size, suite.size, generator=g)
        y = torch.randint(0, 2, (suite.batch, len(self.tasks)), generator=g).float()
        return x.to(device), y.to(device)

    def losses(self, x: Tensor, y: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        z = self.encoder(x).mean((2, 3))
        return {t: F.binary_cross_entropy_with_logits(h(z).squeeze(-1), y[:, i])
                for i, (t, h) in enumerate(self.heads.items())}, z


def build(suite: Suite) -> DenseMTL | ManyTaskClassifier:
    if suite.name == "dense":
        return DenseMTL(suite.width)
    return ManyTaskClassifier(suite.width, suite.tasks)


def suites(quick: bool) -> dict[str, Suite]:
    many = tuple(f"attr{i:02d}" for i in range(40))
    if quick:
        return {"dense": Suite("dense", DenseMTL.tasks, 2, 16, 4),
                "many": Suite("many", many, 4, 8, 4),
                "resnet18": Suite("resnet18", many, 2, 32, None)}
    # Sized so that a full run with --peers fits in 10 minutes on 2 shared CPU cores
    # (see the table in mtlkit.benchmarks.speed).
    return {"dense": Suite("dense", DenseMTL.tasks, 8, 48, 8),
            "many": Suite("many", many, 16, 16, 8),
            # issue 13's case (opt in: --suites resnet18; minutes per method on CPU)
            "resnet18": Suite("resnet18", many, 8, 64, None)}
