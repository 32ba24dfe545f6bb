"""Synchronisation across data-parallel processes (``torch.distributed``), for the balancers.

Under DDP every rank must compute the same task weights, or the replicas drift apart. Each rank
holds the mean losses of its own part of the batch; with equal parts per rank the losses of the
whole batch are the means over ranks, and so are the gradients of the shared parameters. What a
balancer reads is therefore averaged before it is used: the K loss values (:func:`all_mean`),
the per-task gradients or their Gram matrix (in :mod:`mtlkit.engine._grads`), and the gradients
it writes itself (:func:`all_mean_list`). Every function is the identity in a single process, so the
single-process path pays nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


def world_size() -> int:
    """Number of processes of the default group; 1 when ``torch.distributed`` is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank in the default group; 0 when ``torch.distributed`` is not in use."""
    return dist.get_rank() if world_size() > 1 else 0


def all_mean(tensor: Tensor) -> Tensor:
    """The mean of ``tensor`` over the ranks (a new tensor; ``tensor`` itself when alone)."""
    n = world_size()
    if n == 1:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out.div_(n)


def all_mean_host(values: np.ndarray) -> np.ndarray:
    """The mean over the ranks of a float64 array on the host (through the default group's
    device: the current CUDA device under NCCL, else the host)."""
    if world_size() == 1:
        return values
    device = (torch.device("cuda", torch.cuda.current_device())
              if dist.get_backend() == "nccl" else torch.device("cpu"))
    return all_mean(torch.from_numpy(values).to(device)).cpu().numpy()


def all_mean_list(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The means over the ranks of several tensors (new tensors; the inputs themselves when
    alone), with one collective call per dtype and device."""
    n = world_size()
    if n == 1:
        return list(tensors)
    out: list[Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for index in groups.values():
        flat = torch.cat([tensors[i].detach().reshape(-1) for i in index])
        dist.all_reduce(flat)
        flat.div_(n)
        offset = 0
        for i in index:
            size = tensors[i].numel()
            out[i] = flat[offset : offset + size].view(tensors[i].shape)
            offset += size
    return [t for t in out if t is not None]
