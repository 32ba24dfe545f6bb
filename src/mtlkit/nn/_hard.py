"""Hard parameter sharing: one shared encoder, one head per task."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from mtlkit.nn._base import MultiTaskModel, check_tasks


class HardSharing(MultiTaskModel):
    """A shared encoder followed by one head per task.

    The classic multi-task network (Caruana, *Multitask Learning*, Machine Learning 1997): the
    encoder's parameters are shared, each head belongs to its task.

    Args:
        encoder: maps the input to the shared representation.
        heads: task name -> head, applied to the encoder's output.

    ``features`` is the encoder output. Shared parameters: the encoder's; task parameters: the
    task's head.

    Example:
        >>> import torch
        >>> from mtlkit.nn import HardSharing
        >>> model = HardSharing(
        ...     torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU()),
        ...     {"a": torch.nn.Linear(8, 1), "b": torch.nn.Linear(8, 3)},
        ... )
        >>> out = model(torch.randn(2, 4))
        >>> {t: tuple(y.shape) for t, y in out.items()}
        {'a': (2, 1), 'b': (2, 3)}
        >>> tuple(model.features.shape)
        (2, 8)
    """

    def __init__(self, encoder: nn.Module, heads: Mapping[str, nn.Module]) -> None:
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"encoder must be an nn.Module, got {type(encoder)}")
        if not isinstance(heads, Mapping):
            raise TypeError(f"heads must be a mapping task name -> module, got {type(heads)}")
        super().__init__(check_tasks(heads.keys(), "heads"))
        for t, h in heads.items():
            if not isinstance(h, nn.Module):
                raise TypeError(f"heads[{t!r}] must be an nn.Module, got {type(h)}")
        self.encoder = encoder
        self.heads = nn.ModuleDict(dict(heads))
        encoder_params = {id(p) for p in encoder.parameters()}
        for t, h in heads.items():
            if any(id(p) in encoder_params for p in h.parameters()):
                raise ValueError(f"heads[{t!r}] shares parameters with the encoder")
        self._check_partition()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.encoder(x)
        if torch.compiler.is_compiling():
            # Compile the trunk and the heads as two graphs: the features stay a node of the
            # autograd graph that the losses pass through (grad_on="features" needs it).
            torch._dynamo.graph_break()
        self.features = f
        return {t: self.heads[t](f) for t in self.tasks}

    def _task_parameters(self, task: str) -> Iterable[nn.Parameter]:
        return self.heads[task].parameters()
