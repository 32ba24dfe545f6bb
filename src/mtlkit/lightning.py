"""Balancers inside PyTorch Lightning (optional extra: ``pip install mtlkit[lightning]``).

A balancer writes the update into ``.grad`` itself (one backward pass, or per-task gradients
and their combination), so the ``LightningModule`` uses manual optimisation and calls
:func:`balanced_step` in ``training_step`` instead of returning a loss::

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False          # the balancer does the backward
            self.net = mtlkit.nn.HardSharing(encoder, heads)
            self.balancer = mtlkit.balancers.create("mgda", tasks=list(heads))

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.net(x)
            losses = {t: loss_fn[t](out[t], y[t]) for t in out}
            balanced_step(self, losses, shared=self.net.shared_parameters(),
                          features=self.net.features)

What Lightning's settings change:

* ``precision="bf16-mixed"``: Lightning runs ``training_step`` under autocast; the balancer
  computes its Gram matrices in float32 (as without Lightning).
* ``precision="16-mixed"``: Lightning's gradient scaler is handed to the balancer
  (``backward(..., scaler=...)`` where the balancer takes one), and the optimiser step goes
  through Lightning's precision plugin, which unscales, skips non-finite steps and updates the
  scale.
* ``strategy="ddp"``: Lightning runs ``training_step`` inside DDP's forward, where an
  ordinary DDP gradient hook cannot serve a balancer (its per-task passes never reach DDP's
  hooks, and its backward runs before DDP expects one). mtlkit therefore turns DDP's gradient
  synchronisation off and synchronises itself, exactly as under ``torchrun`` without
  Lightning: the balancer averages the loss values and per-task gradients over the ranks, and
  the gradients of an ordinary backward pass (loss weightings, GradNorm) are averaged here.
  Two processes with half a batch each train as one process with the whole batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from mtlkit.balancers import Balancer
from mtlkit.balancers._base import BalanceStep, Losses
from mtlkit.engine._dist import all_mean_list, world_size


def balanced_step(
    module: Any,
    losses: Losses,
    *,
    shared: Iterable[Tensor],
    features: Tensor | None = None,
    balancer: Balancer | None = None,
    optimizer: Any = None,
    after_step: Callable[[], Losses] | None = None,
    **context: Any,
) -> BalanceStep:
    """One training step of a manually optimised ``LightningModule`` with a balancer.

    Zeroes the gradients, lets the balancer write the update (``balancer.backward``), steps the
    optimiser through Lightning (precision plugin: unscaling, skipped steps), and, for methods
    that look at the post-step losses (FAMO), calls ``balancer.after_step(after_step())``.

    Args:
        module: the ``LightningModule`` (``automatic_optimization = False``).
        losses: task name -> scalar loss of this step.
        shared: the shared parameters.
        features: the last shared representation (for ``grad_on="features"``).
        balancer: the balancer; default ``module.balancer``.
        optimizer: the optimiser to step; default ``module.optimizers()`` (which must be one).
        after_step: recomputes the losses after the step (run under ``torch.no_grad``), for a
            balancer with ``needs_after_step``.
        **context: per-step inputs some methods need (e.g. ``kpi`` for DTP).

    Returns:
        The balancer's :class:`~mtlkit.balancers.BalanceStep`.

    Example:
        >>> import torch, lightning
        >>> from mtlkit import balancers
        >>> class Module(lightning.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.automatic_optimization = False
        ...         self.trunk, self.head = torch.nn.Linear(2, 3), torch.nn.Linear(3, 2)
        ...         self.balancer = balancers.create("mgda", tasks=["a", "b"])
        ...     def training_step(self, batch, batch_idx):
        ...         out = self.head(self.trunk(batch[0]))
        ...         balanced_step(self, {"a": out[:, 0].pow(2).mean(), "b": out[:, 1].abs().mean()},
        ...                       shared=self.trunk.parameters())
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 2)),
        ...                                    batch_size=4)
        >>> trainer = lightning.Trainer(max_epochs=1, logger=False, enable_checkpointing=False,
        ...                             enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(Module(), data)
        >>> trainer.global_step
        2
    """
    if getattr(module, "automatic_optimization", True):
        raise ValueError(
            "balanced_step needs manual optimisation: set self.automatic_optimization = False "
            "in the LightningModule's __init__ (the balancer writes the gradients itself)"
        )
    if balancer is None:
        balancer = getattr(module, "balancer", None)
        if not isinstance(balancer, Balancer):
            raise ValueError("pass balancer= or give the LightningModule a .balancer attribute")
    if optimizer is None:
        optimizer = module.optimizers()
        if isinstance(optimizer, (list, tuple)):
            raise ValueError(f"the module has {len(optimizer)} optimisers: pass optimizer=")
    trainer = module.trainer
    ddp = getattr(trainer.strategy, "model", None)
    if isinstance(ddp, nn.parallel.DistributedDataParallel):
        # mtlkit averages what it writes itself (module docstring); DDP must not wait for a
        # backward pass of its own.
        ddp.require_backward_grad_sync = False
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None:
        if "scaler" not in inspect.signature(balancer.backward).parameters:
            raise NotImplementedError(
                "precision='16-mixed' needs a balancer that takes the gradient scaler "
                "(backward(..., scaler=...)); use precision='bf16-mixed'"
            )
        context["scaler"] = scaler
    optimizer.zero_grad()
    step = balancer.backward(losses, shared=shared, features=features, **context)
    if world_size() > 1 and not balancer.takes_task_gradients:
        # An ordinary backward pass wrote this rank's gradients: average them (the engine
        # has already averaged those of per-task-gradient methods).
        params = [p for p in module.parameters() if p.grad is not None]
        for p, g in zip(params, all_mean_list([p.grad for p in params])):
            p.grad = g
    optimizer.step()
    if balancer.needs_after_step:
        if after_step is None:
            raise ValueError(f"{type(balancer).__name__} needs after_step=<a function that "
                             "recomputes the losses after the optimiser step>")
        with torch.no_grad():
            balancer.after_step(after_step())
    return step


__all__ = ["balanced_step"]
