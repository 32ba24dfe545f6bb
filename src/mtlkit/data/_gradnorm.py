"""The synthetic regression benchmark of GradNorm (Chen et al., ICML 2018), section 4."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path

import torch

from mtlkit.data._bundle import DatasetBundle, MultiTaskTensorDataset
from mtlkit.data._registry import register
from mtlkit.tasks import Task


def _positive(value: object, arg: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ValueError(f"{arg} must be a positive number, got {value!r}")
    return float(value)


@register("gradnorm_toy")
def gradnorm_toy(
    root: str | Path | None = None,
    seed: int = 0,
    *,
    num_tasks: int = 2,
    sigmas: Sequence[float] | None = None,
    sizes: Sequence[int] = (10_000, 2_000, 2_000),
    input_dim: int = 250,
    output_dim: int = 100,
    b_std: float = 10.0,
    eps_std: float = 3.5,
) -> DatasetBundle:
    """T regression tasks ``f_i(x) = σ_i tanh((B + ε_i) x)`` that share ``B`` but differ in scale.

    From Chen, Badrinarayanan, Lee and Rabinovich, *GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks* (ICML 2018, arXiv:1711.02257),
    section 4: inputs of dimension 250, outputs of dimension 100, ``B`` and ``ε_i`` constant
    matrices with i.i.d. entries from N(0, 10) and N(0, 3.5), trained with squared loss. The
    ``σ_i`` set each task's output scale, hence its loss scale (∝ σ_i²): with the paper's
    two-task setting σ = (1, 100) the second loss is ~10⁴ times larger.

    .. note:: The paper writes N(0, 10) and N(0, 3.5) without saying whether the second number
       is a variance or a standard deviation; here they are standard deviations (``b_std``,
       ``eps_std``), as in the public re-implementations. Inputs are x ~ N(0, I). Without
       ``sigmas``, two tasks get (1, 100) as in the paper; other task counts get σ_i drawn
       log-uniformly in [1, 100] from the seed (mtlkit's choice).

    Each task is :meth:`Task.regression` with ``dim=output_dim`` and MSE, named ``t0``,
    ``t1``, ... ``B``, ``ε`` and the inputs come from ``torch.Generator().manual_seed(seed)``
    (drawn σ from a second generator), so they are deterministic for a given PyTorch version.
    ``info`` holds ``sigmas``, ``B`` ``(output_dim, input_dim)`` and ``eps`` ``(T, output_dim,
    input_dim)`` (float64), so targets can be recomputed from the stored inputs exactly.

    Args:
        root: must be None (the data are generated).
        seed: seeds B, ε, the σ draw and the inputs.
        num_tasks: T.
        sigmas: the T output scales (positive); default see the note.
        sizes: samples in train, val, test.
        input_dim, output_dim: dimensions of x and of each f_i(x).
        b_std, eps_std: standard deviations of the entries of B and ε_i.

    Example:
        >>> from mtlkit.data import gradnorm_toy
        >>> b = gradnorm_toy(sizes=(20, 5, 5))
        >>> x, y = b.train[0]
        >>> tuple(x.shape), {t: tuple(v.shape) for t, v in y.items()}, b.info["sigmas"]
        ((250,), {'t0': (100,), 't1': (100,)}, (1.0, 100.0))
    """
    if root is not None:
        raise ValueError(f"gradnorm_toy is generated and takes no root (got root={root!r})")
    for arg, value in (
        ("num_tasks", num_tasks),
        ("input_dim", input_dim),
        ("output_dim", output_dim),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be an integer >= 1, got {value!r}")
    if (
        not isinstance(sizes, (list, tuple))
        or len(sizes) != 3
        or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes)
    ):
        raise ValueError(f"sizes must be three integers >= 1 (train, val, test), got {sizes!r}")
    b_std = _positive(b_std, "b_std")
    eps_std = _positive(eps_std, "eps_std")

    g = torch.Generator().manual_seed(seed)  # B, then ε, then x
    if sigmas is None:
        if num_tasks == 2:
            sig = (1.0, 100.0)
        else:
            # a stream of its own, so B, ε and x do not depend on num_tasks being 2 or not
            gs = torch.Generator().manual_seed(seed + 7919)
            draws = torch.rand(num_tasks, generator=gs, dtype=torch.float64)
            sig = tuple(float(v) for v in 100.0**draws)
    else:
        if not isinstance(sigmas, (list, tuple)) or len(sigmas) != num_tasks:
            raise ValueError(
                f"sigmas must be a sequence of num_tasks={num_tasks} numbers, got {sigmas!r}"
            )
        sig = tuple(_positive(s, f"sigmas[{i}]") for i, s in enumerate(sigmas))

    B = torch.randn(output_dim, input_dim, generator=g, dtype=torch.float64) * b_std
    eps = torch.randn(num_tasks, output_dim, input_dim, generator=g, dtype=torch.float64) * eps_std
    total = sum(sizes)
    x = torch.randn(total, input_dim, generator=g, dtype=torch.float64).float()
    xd = x.double()
    targets = {
        f"t{i}": (sig[i] * torch.tanh(xd @ (B + eps[i]).T)).float() for i in range(num_tasks)
    }
    bounds = [0, sizes[0], sizes[0] + sizes[1], total]
    splits = [
        MultiTaskTensorDataset(x[a:b], {t: y[a:b] for t, y in targets.items()})
        for a, b in pairwise(bounds)
    ]
    tasks = tuple(Task.regression(f"t{i}", dim=output_dim) for i in range(num_tasks))
    info = {
        "sigmas": sig,
        "B": B,
        "eps": eps,
        "seed": seed,
        "reference": "arXiv:1711.02257, sec. 4",
    }
    return DatasetBundle("gradnorm_toy", *splits, tasks, (input_dim,), info)
