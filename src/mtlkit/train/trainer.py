"""The trainer: one model, its tasks, one balancer; epochs, evaluation, logs, checkpoints, resume.

A run lasts ``epochs`` epochs, or stops after ``max_steps`` optimiser steps if that comes first
(the last epoch is then partial, and is evaluated and checkpointed like a full one).

Every run is repeatable from its seed: data order comes from a generator seeded by
``(seed, epoch)``, the global RNG state (dropout) is saved in the checkpoint, and the balancer's
state round-trips through ``state_dict``. A run resumed from the checkpoint of epoch e therefore
follows the same trajectory as an uninterrupted one.

Under ``torchrun`` (``torch.distributed`` initialised, as ``mtlkit train`` and ``mtlkit compare``
do when started by it) the model is wrapped in DDP, every rank draws the same batches and
trains on its own slice of each (so two processes with batch B/2 each follow the run of one
process with batch B: tested), evaluation runs on every rank, and rank 0 alone writes logs and
checkpoints. Batch norm statistics are per rank, as in plain DDP. A loss over a mask of missing
labels is the mean over the labelled samples of the whole batch, as in one process (each rank
rescales its own mean by its share of the labelled samples; tested).

Model selection uses the validation split only (never test): the selected epoch maximises the
mean over tasks of the primary validation metric's relative improvement over the first evaluated
epoch (sign-corrected for lower-is-better metrics), or is the last epoch with ``select="last"``.
Evaluation runs every ``eval_every`` epochs and always after the last one.

Checkpoints: ``checkpoint.pt`` is written after every epoch, so an interrupted run can resume.
When the run finishes, ``result.json`` records its result and settings, and ``keep`` says which
checkpoint stays: ``last`` (``checkpoint.pt``), ``best`` (``best.pt``, the selected epoch's;
``checkpoint.pt`` is removed) or ``none``. A checkpoint stores the run's settings (optimiser,
schedule, batch size, method, model, ...): resuming with other settings is an error naming them.
The ``plateau`` schedule is stepped after each evaluation on the score selection and early
stopping use, and its state is saved in the checkpoint, so a resumed run keeps its rate.
A loss that becomes non-finite stops the run with an error naming the task and the step; the
last good checkpoint stays on disk.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from mtlkit.balancers import Balancer
from mtlkit.data._multi_input import MultiInputDataset
from mtlkit.engine import cosine_from_gramian, task_jacobian
from mtlkit.engine._dist import all_mean, rank, world_size
from mtlkit.nn._distill import deep_supervision_loss
from mtlkit.optim import model_param_groups
from mtlkit.train.checkpoint import load_checkpoint, remove_stale_temporaries, save_checkpoint
from mtlkit.train.logs import RunLog
from mtlkit.train.optimizers import (
    Plateau,
    Schedule,
    build_optimizer,
    check_optimizer,
    scheduled_lr,
)

if TYPE_CHECKING:
    from mtlkit.tasks import Task

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
RESULT = "result.json"
KEEP = ("last", "best", "none")


class NonFiniteLossError(ValueError):
    """A task's loss became NaN or infinite during training (the message says which and when)."""


def check_device(device: str, name: str = "device") -> None:
    """Raise ValueError unless ``device`` names a device this machine has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: {device!r} is not a device name (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {device!r} is not available: this machine has no CUDA "
                             f"device (torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {device!r} is not available: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: 'mps' is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{name}: device type {dev.type!r} is not supported (cpu, cuda, mps)")


#: ``amp`` setting -> autocast dtype
AMP: dict[str | None, torch.dtype] = {None: torch.float32, "bf16": torch.bfloat16,
                                      "fp16": torch.float16}


@dataclass
class TrainConfig:
    """How to train one run. Every field is validated by :meth:`validate`."""

    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    shared_lr: float | None = None
    task_lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    optimizer: str = "adam"
    momentum: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    scheduler: Schedule = field(default_factory=Schedule)
    grad_clip: float | None = None
    eval_every: int = 1
    keep: str = "last"
    seed: int = 0
    log_every: int = 10
    cosine_every: int = 25
    select: Literal["val", "last"] = "val"
    #: early stopping: end the run after this many epochs without a better validation score
    patience: int | None = None
    #: the smallest gain that counts as better for early stopping and the still-improving
    #: flag: the mean over tasks of the primary validation metric's relative change since the
    #: last such gain (0: any better validation score; see :func:`epochs_since_best`)
    min_delta: float = 0.0
    device: str = "cpu"
    progress: bool = True
    #: mixed precision: None (float32), "bf16" (autocast) or "fp16" (autocast and a gradient
    #: scaler that the balancer drives, see Balancer.backward)
    amp: str | None = None

    def validate(self, tasks: Sequence[str]) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be an integer >= 1, got {self.epochs!r}")
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int)
            or self.max_steps < 1
        ):
            raise ValueError(f"max_steps must be an integer >= 1 or None, got {self.max_steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")
        for name in ("lr", "shared_lr"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and 0 < v < math.inf):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        for t, v in self.task_lr.items():
            if t not in tasks:
                raise ValueError(f"task_lr names unknown task {t!r}; tasks are {list(tasks)}")
            if not (isinstance(v, (int, float)) and 0 < v < math.inf):
                raise ValueError(f"task_lr.{t} must be a positive number, got {v!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        for name in ("log_every", "cosine_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {v!r}")
        if self.select not in ("val", "last"):
            raise ValueError(f"select must be 'val' or 'last', got {self.select!r}")
        if self.patience is not None and (
            isinstance(self.patience, bool) or not isinstance(self.patience, int)
            or self.patience < 1
        ):
            raise ValueError(f"patience must be an integer >= 1 or None, got {self.patience!r}")
        if isinstance(self.min_delta, bool) or not (
                isinstance(self.min_delta, (int, float)) and 0 <= self.min_delta < math.inf):
            raise ValueError(f"min_delta must be a number >= 0, got {self.min_delta!r}")
        check_optimizer(self.optimizer, self.momentum, self.nesterov, self.betas, "optimizer")
        if not isinstance(self.scheduler, Schedule):
            raise ValueError(f"scheduler must be a Schedule, got {self.scheduler!r}")  # noqa: TRY004
        self.scheduler.validate()
        g = self.grad_clip
        if g is not None and (isinstance(g, bool) or not isinstance(g, (int, float))
                              or not 0 < g < math.inf):
            raise ValueError(f"grad_clip must be a positive number or None, got {g!r}")
        if isinstance(self.eval_every, bool) or not isinstance(self.eval_every, int) \
                or self.eval_every < 1:
            raise ValueError(f"eval_every must be an integer >= 1, got {self.eval_every!r}")
        if self.keep not in KEEP:
            raise ValueError(f"keep_checkpoint must be one of {list(KEEP)}, got {self.keep!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string, got {self.device!r}")  # noqa: TRY004
        check_device(self.device)
        if self.amp not in AMP:
            raise ValueError(f"amp must be one of {list(AMP)[1:]} or None, got {self.amp!r}")

    def settings(self) -> dict[str, Any]:
        """The fields a resumed run must share with the saved one (not the budget, the
        device or the logging)."""
        keys = ("batch_size", "lr", "shared_lr", "task_lr", "weight_decay", "optimizer",
                "momentum", "nesterov", "betas", "grad_clip", "seed")
        out = {k: getattr(self, k) for k in keys}
        out["scheduler"] = self.scheduler.settings()
        return out


@dataclass
class RunResult:
    """What a finished run reports."""

    method: str
    tasks: list[str]
    selected_epoch: int
    val: dict[str, float]
    test: dict[str, float]
    step_time: float
    history: list[dict[str, Any]]
    #: the budget ended the run while its validation score was still rising (see
    #: :func:`still_improving`): its numbers are not converged
    still_improving: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Trainer:
    """Train a multi-task model with a balancer.

    Args:
        model: a model with ``forward(x) -> {task: output}``, ``features`` (last shared
            representation, or None), ``shared_parameters()`` and ``task_parameters(task)``.
        tasks: the tasks (name, loss, metrics) in the model's order.
        balancer: how the task losses are combined.
        config: a :class:`TrainConfig`.
        out_dir: where logs and the checkpoint go (None: keep nothing on disk).
        settings: what else names this run (``{"model": ..., "dataset": ...}``), stored in the
            checkpoint beside the optimiser settings, the method and its hyperparameters, and
            compared on resume.

    Example:
        >>> # trainer = Trainer(model, tasks, mtlkit.balancers.create("dwa", [t.name for t in tasks]),
        >>> #                   TrainConfig(epochs=5), out_dir="runs/dwa")
        >>> # result = trainer.fit(train_set, val_set, test_set)
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[Task],
        balancer: Balancer,
        config: TrainConfig,
        out_dir: str | Path | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.tasks = list(tasks)
        self.names = [t.name for t in self.tasks]
        if list(balancer.tasks) != self.names:
            raise ValueError(
                f"balancer tasks {list(balancer.tasks)} differ from the tasks {self.names}"
            )
        config.validate(self.names)
        self.config = config
        # Under torchrun every process trains on its slice of each batch (see _my_part).
        self.ranks, self.rank = world_size(), rank()
        if config.batch_size % self.ranks:
            raise ValueError(f"batch_size {config.batch_size} must split evenly over "
                             f"{self.ranks} processes")
        self.device = torch.device(config.device)
        if self.ranks > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.model = model.to(self.device)
        #: what the training step calls: the model itself, or its DDP wrapper under torchrun
        self.forward_model: nn.Module = self.model
        if self.ranks > 1:
            self.forward_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.balancer = balancer.to(self.device)
        groups = model_param_groups(
            model, lr=config.lr, shared_lr=config.shared_lr, task_lr=config.task_lr
        )
        extra = [p for p in balancer.parameters() if p.requires_grad]
        if extra:
            groups.append({"name": "balancer", "params": extra, "lr": config.lr})
        self.optimizer = build_optimizer(
            groups, config.optimizer, weight_decay=config.weight_decay, momentum=config.momentum,
            nesterov=config.nesterov, betas=config.betas,
        )
        #: fp16: the scaler the balancer scales its losses with (Balancer.backward)
        self.scaler = torch.amp.GradScaler(self.device.type) if config.amp == "fp16" else None
        for g in self.optimizer.param_groups:  # the schedule scales each group's own base rate
            g.setdefault("initial_lr", g["lr"])
        #: the ``plateau`` schedule's state, stepped on the validation score of each evaluation
        self.plateau = Plateau(config.scheduler) if config.scheduler.name == "plateau" else None
        self.steps_per_epoch = 1
        self.settings: dict[str, Any] = json.loads(json.dumps({
            **config.settings(), "method": repr(balancer),
            "model": f"{type(model).__name__} ({sum(p.numel() for p in model.parameters())} "
                     f"parameters)",
            **dict(settings or {}),
        }))
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.log = RunLog(self.out_dir if self.rank == 0 else None)  # one writer
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.step_times: list[float] = []
        self._multi_input = False

    # ------------------------------------------------------------------ public
    def fit(
        self,
        train: Dataset,
        val: Dataset,
        test: Dataset | None = None,
        *,
        resume: bool = False,
    ) -> RunResult:
        """Train for ``config.epochs`` epochs (continuing from the checkpoint with ``resume``)."""
        writer = self.out_dir is not None and self.rank == 0
        if writer:
            remove_stale_temporaries(self.out_dir / CHECKPOINT)  # left by a killed write
        if resume:
            self._resume()
        else:
            self.log.truncate(0, 0)  # a fresh run into a used folder starts fresh logs
            if writer:
                for name in (RESULT, BEST):
                    (self.out_dir / name).unlink(missing_ok=True)
        eval_batch = max(self.config.batch_size, 256)
        multi = self._multi_input = isinstance(train, MultiInputDataset)
        if multi and self.balancer.grad_on == "features":
            raise ValueError("grad_on='features' needs one shared representation of every "
                             "task's samples; with multi-input data each task has its own "
                             "inputs: use grad_on='parameters'")
        val_loader = _eval_loader(val, eval_batch)
        test_loader = _eval_loader(test, eval_batch) if test is not None else None
        drop_last = len(train) > self.config.batch_size
        self.steps_per_epoch = max(1, len(train) // self.config.batch_size if drop_last else 1)
        while (self.epoch < self.config.epochs and not self._out_of_steps()
               and not self._stalled()):
            gen = torch.Generator().manual_seed(self.config.seed * 100_003 + self.epoch)
            if multi:
                loader: Iterable = PerTaskBatches(train, self.names, self.config.batch_size,
                                                  gen)
                self.steps_per_epoch = len(loader)  # type: ignore[arg-type]
            else:
                loader = DataLoader(train, batch_size=self.config.batch_size, shuffle=True,
                                    generator=gen, drop_last=drop_last)
            self._extra = self._extra_loader(train)
            self._train_epoch(loader)
            last = self.epoch + 1 >= self.config.epochs or self._out_of_steps()
            best = False
            if (self.epoch + 1) % self.config.eval_every == 0 or last:
                record: dict[str, Any] = {"epoch": self.epoch + 1}
                record["val"] = evaluate(self.model, self.tasks, val_loader, self.device)
                if test_loader is not None:
                    record["test"] = evaluate(self.model, self.tasks, test_loader, self.device)
                self.history.append(record)
                self.log.epoch(record)
                best = select_epoch(self.history, self.tasks, self.config.select) \
                    == len(self.history) - 1
                if self.plateau is not None:  # the score selection and early stopping use
                    self.plateau.step(validation_scores(self.history, self.tasks)[-1])
            self.epoch += 1
            self.balancer.new_epoch()
            if writer:
                self._save(best=best and self.config.keep == "best")
        result = self.result()
        if writer:
            self._finish(result)
        return result

    def result(self) -> RunResult:
        if not self.history:
            raise RuntimeError("no epoch has been trained yet")
        best = select_epoch(self.history, self.tasks, self.config.select)
        rec = self.history[best]
        return RunResult(
            method=str(self.balancer),
            tasks=self.names,
            selected_epoch=rec["epoch"],
            val=rec["val"],
            test=rec.get("test", {}),
            step_time=statistics.median(self.step_times) if self.step_times else float("nan"),
            history=self.history,
            still_improving=still_improving(self.history, self.tasks, self.config.patience,
                                            self.config.min_delta),
        )

    def _finish(self, result: RunResult) -> None:
        """Record the finished run (``result.json``) and apply the ``keep`` policy."""
        assert self.out_dir is not None
        (self.out_dir / RESULT).write_text(
            json.dumps({"settings": self.settings,
                        "budget": {"epochs": self.config.epochs,
                                   "max_steps": self.config.max_steps},
                        "global_step": self.global_step, "result": result.to_json()}, indent=1)
        )
        if self.config.keep != "last":
            (self.out_dir / CHECKPOINT).unlink(missing_ok=True)

    # ------------------------------------------------------------------ training
    def _extra_loader(self, train: Dataset) -> DataLoader | None:
        """A second, independently shuffled pass over the training set, for balancers that
        need a second batch (``needs_second_batch``: MoDo, SDMGrad) or a held-out batch
        (``needs_held_out_batch``: Auto-Lambda, whose official code also draws it from the
        training set; the validation split stays for model selection). Seeded by
        ``(seed, epoch)`` like the main loader, so a resumed run draws the same batches."""
        if not (self.balancer.needs_second_batch or self.balancer.needs_held_out_batch):
            return None
        gen = torch.Generator().manual_seed(self.config.seed * 100_003 + self.epoch + 7_777_777)
        if isinstance(train, MultiInputDataset):
            return PerTaskBatches(train, self.names, self.config.batch_size, gen)  # type: ignore[return-value]
        return DataLoader(train, batch_size=self.config.batch_size, shuffle=True, generator=gen,
                          drop_last=len(train) > self.config.batch_size)

    def _extra_context(self, batch: Any) -> dict[str, Any]:
        """``second_losses`` or ``held_out`` + ``parameters`` from the extra loader's batch."""
        x, y, mask = self._batch(batch)

        def losses() -> dict[str, Tensor]:
            return self._losses(_forward(self.forward_model, x), y, mask)

        if self.balancer.needs_second_batch:
            no_sync = self.ranks > 1 and self.balancer.takes_task_gradients
            with self.forward_model.no_sync() if no_sync else contextlib.nullcontext():  # type: ignore[operator]
                return {"second_losses": losses()}

        def held_out() -> dict[str, Tensor]:
            # At the virtual parameters: batch-norm statistics must not remember this pass. The
            # pass updates copies of the buffers, never the buffers themselves: the graph kept
            # for the update's backward saved them, and an in-place change would void it.
            kept = [(m._buffers, name, b) for m in self.model.modules()
                    for name, b in m._buffers.items() if b is not None]
            for buffers, name, b in kept:
                buffers[name] = b.clone()
            try:
                return losses()
            finally:
                for buffers, name, b in kept:
                    buffers[name] = b

        return {"held_out": held_out,
                "parameters": [p for p in self.model.parameters() if p.requires_grad]}

    def _train_epoch(self, loader: Iterable) -> None:
        self.model.train()
        n = len(loader)  # type: ignore[arg-type]
        extra = getattr(self, "_extra", None)  # set by fit() from _extra_loader
        extra_batches = iter(extra) if extra is not None else None
        for i, batch in enumerate(loader):
            if self._out_of_steps():
                break
            x, y, mask = self._batch(batch)
            t0 = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            # Under DDP, a balancer that computes per-task gradients itself averages them; DDP's
            # hooks must then not wait for an ordinary backward pass (Balancer docs).
            no_sync = self.ranks > 1 and self.balancer.takes_task_gradients
            autocast = torch.autocast(self.device.type, dtype=AMP[self.config.amp],
                                      enabled=self.config.amp is not None)
            with self.forward_model.no_sync() if no_sync else contextlib.nullcontext(), autocast:  # type: ignore[operator]
                out = _forward(self.forward_model, x)
                losses = self._losses(out, y, mask)
            # Diagnostics, every ``cosine_every`` steps, always in the same space (the shared
            # parameters) so that methods can be compared: free where the balancer computes
            # that Gram matrix itself, else K extra backward passes left out of the step time.
            want_cosine = self._want_cosine()
            cosine = None
            if want_cosine and not self._balancer_has_parameter_gramian():
                c0 = time.perf_counter()
                cosine = parameter_cosine(losses, list(self.model.shared_parameters()))
                t0 += time.perf_counter() - c0
            # Deep supervision (PAD-Net, MTI-Net): the initial predictions' losses are added to
            # the balanced update with the model's aux_weight; balancers see the K final losses.
            aux = deep_supervision_loss(self.model, self.tasks, y, mask)
            if aux is not None:
                if self.ranks > 1:  # a second backward of one DDP forward would desync ranks
                    raise ValueError("deep supervision (PAD-Net, MTI-Net) is not supported "
                                     "under torchrun yet; train in one process")
                # under fp16 the scaler's scale, like the balanced losses (it unscales both)
                scaled = aux if self.scaler is None else self.scaler.scale(aux)
                scaled.backward(retain_graph=True)
            context = self._context(out, y, mask)
            features = self._features()  # before a second forward pass replaces them
            if extra_batches is not None:
                context.update(self._extra_context(next(extra_batches)))
            try:
                with autocast:
                    step = self.balancer.backward(
                        losses, shared=self.model.shared_parameters(), features=features,
                        scaler=self.scaler, **context,
                    )
            except FloatingPointError as err:
                raise NonFiniteLossError(self._non_finite_message(err)) from None
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)  # clip (and step) the true gradients
            if self.config.grad_clip is not None:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
            self._set_lr()
            if self.scaler is not None:
                self.scaler.step(self.optimizer)  # skipped on non-finite gradients
                self.scaler.update()
            else:
                self.optimizer.step()
            if self.balancer.needs_after_step:
                with torch.no_grad():
                    out2 = _forward(self.model, x)
                    self.balancer.after_step(self._losses(out2, y, mask))
            self.step_times.append(time.perf_counter() - t0)
            self.global_step += 1
            if want_cosine and cosine is None:
                cosine = step.cosine
            if self.config.log_every and (self.global_step % self.config.log_every == 0
                                          or cosine is not None):
                self.log.step(self._step_record(losses, step.weight_tensor, cosine))
            if self.config.progress and sys.stderr.isatty():
                print(f"\r  epoch {self.epoch + 1}/{self.config.epochs} "
                      f"step {i + 1}/{n}", end="", file=sys.stderr)
        if self.config.progress and sys.stderr.isatty():
            print(file=sys.stderr)

    def _losses(self, out: Mapping[str, Tensor], y: Mapping[str, Tensor],
                mask: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each task's loss. Under torchrun a masked loss is rescaled from the mean over this
        rank's labelled samples to its share of the mean over the whole batch's: the ranks'
        average (what the balancers and DDP take) is then that whole-batch mean."""
        losses = {t.name: t.loss(out[t.name], y[t.name], mask.get(t.name)) for t in self.tasks}
        masked = [t for t in self.names if t in mask]
        if self.ranks == 1 or not masked:
            return losses
        counts = torch.stack([mask[t].sum() for t in masked]).double()
        share = counts * self.ranks / all_mean(counts).mul(self.ranks).clamp_min(1)
        for t, f in zip(masked, share):
            losses[t] = losses[t] * f.to(losses[t].dtype)
        return losses

    def _batch(self, batch: Any) -> tuple[Tensor | dict[str, Tensor], dict[str, Tensor],
                                          dict[str, Tensor]]:
        """``(x, y, mask)`` of this rank; for multi-input data ``x`` is ``{task: inputs}``."""
        if not isinstance(batch, dict):
            return self._my_part(*_unpack(batch, self.device))
        xs, ys, masks = {}, {}, {}
        for t, part in batch.items():  # each task's own batch
            x, y, mask = self._my_part(*_unpack(part, self.device))
            xs[t], ys[t] = x, y[t]
            if t in mask:
                masks[t] = mask[t]
        return xs, ys, masks

    def _set_lr(self) -> None:
        """The schedule's rate for this step, in every parameter group."""
        cfg = self.config
        if cfg.scheduler.name == "none" and not cfg.scheduler.warmup_epochs:
            return
        total = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            total = min(total, cfg.max_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = scheduled_lr(g["initial_lr"], cfg.scheduler, self.global_step,
                                   steps_per_epoch=self.steps_per_epoch, total_steps=total,
                                   reductions=self.plateau.reductions if self.plateau else 0)

    def _non_finite_message(self, err: FloatingPointError) -> str:
        where = f"at step {self.global_step + 1} (epoch {self.epoch + 1})"
        path = self.out_dir / CHECKPOINT if self.out_dir is not None else None
        if path is not None and path.is_file():
            kept = f"the last good checkpoint (epoch {self.epoch}) is kept at {path}"
        else:
            kept = "no checkpoint had been written yet"
        return (f"{err} {where}; {kept}. Lower the learning rate or set grad_clip")

    def _my_part(self, x: Tensor, y: dict[str, Tensor], mask: dict[str, Tensor]
                 ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """This rank's contiguous slice of a batch (all of it in one process). Every rank
        draws the same batches (same seed), so the ranks' slices make up the batch that one
        process would train on, and the balancers' averages over the ranks are its means."""
        if self.ranks == 1:
            return x, y, mask

        def part(t: Tensor) -> Tensor:
            return t.tensor_split(self.ranks)[self.rank]

        return (part(x), {k: part(v) for k, v in y.items()},
                {k: part(v) for k, v in mask.items()})

    def _features(self) -> Tensor | None:
        """The model's shared representation; where the balancer needs it and the model has
        ``require_features`` (every ``mtlkit.nn`` model), the model says why it has none.
        None for multi-input data (the last forward saw only the last task's inputs)."""
        if self._multi_input:
            return None
        if self.balancer.grad_on == "features" and hasattr(self.model, "require_features"):
            return self.model.require_features()
        return getattr(self.model, "features", None)

    def _stalled(self) -> bool:
        """Early stopping: ``patience`` epochs have passed without a better validation score
        (computed from the history, so a resumed run stops where an uninterrupted one does)."""
        patience = self.config.patience
        return patience is not None and epochs_since_best(
            self.history, self.tasks, self.config.min_delta) >= patience

    def _out_of_steps(self) -> bool:
        return self.config.max_steps is not None and self.global_step >= self.config.max_steps

    def _want_cosine(self) -> bool:
        every = self.config.cosine_every
        return bool(every) and self.global_step % every == 0

    def _balancer_has_parameter_gramian(self) -> bool:
        return (self.balancer.requires in ("gramian", "block_gramian", "jacobian")
                and self.balancer.grad_on == "parameters")

    def _context(self, out: Mapping[str, Tensor], y: Mapping[str, Tensor],
                 mask: Mapping[str, Tensor]) -> dict[str, Any]:
        """The per-step context the balancer declares; each task supplies its own KPI."""
        if "kpi" not in self.balancer.context_keys:
            return {}
        return {"kpi": {t.name: t.kpi(out[t.name], y[t.name], mask.get(t.name))
                        for t in self.tasks}}

    def _step_record(self, losses: Mapping[str, Tensor], weights: Tensor,
                     cosine: Tensor | None) -> dict[str, Any]:
        rec: dict[str, Any] = {"step": self.global_step, "epoch": self.epoch + 1}
        rec["loss"] = {t: float(v.detach()) for t, v in losses.items()}
        rec["weight"] = dict(zip(self.names, weights.detach().cpu().tolist()))
        if cosine is not None:
            c = cosine.detach().cpu()
            rec["cosine"] = {f"{a}|{b}": float(c[i, j]) for i, a in enumerate(self.names)
                             for j, b in enumerate(self.names) if i < j}
        return rec

    # ------------------------------------------------------------------ checkpoints
    def _save(self, best: bool = False) -> None:
        assert self.out_dir is not None
        state = {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "balancer": self.balancer.state_dict(),
                "epoch": self.epoch,
                "global_step": self.global_step,
                "rng": torch.get_rng_state(),
                "history": json.dumps(self.history),
                "step_times": self.step_times,
                "settings": json.dumps(self.settings),
            }
        if self.plateau is not None:
            state["plateau"] = self.plateau.state_dict()
        if self.scaler is not None:  # fp16: its scale and growth tracker, for an exact resume
            state["scaler"] = self.scaler.state_dict()
        save_checkpoint(state, self.out_dir / CHECKPOINT)
        if best:
            save_checkpoint(state, self.out_dir / BEST)

    def _resume(self) -> None:
        if self.out_dir is None:
            raise ValueError("resume needs an out_dir holding a checkpoint")
        path = self.out_dir / CHECKPOINT
        state = load_checkpoint(path)
        if "settings" not in state or "model" not in state:
            raise ValueError(f"checkpoint {path}: not a checkpoint of an mtlkit training run")
        check_same_settings(json.loads(state["settings"]), self.settings, path)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.balancer.load_state_dict(state["balancer"])
        except (RuntimeError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"checkpoint {path}: does not fit this model ({first})") from None
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        torch.set_rng_state(state["rng"])
        if self.plateau is not None:
            if "plateau" not in state:
                raise ValueError(f"checkpoint {path}: holds no state of the plateau schedule")
            self.plateau.load_state_dict(state["plateau"])
        if self.scaler is not None:
            if "scaler" not in state:
                raise ValueError(f"checkpoint {path}: holds no gradient-scaler state (it was "
                                 "not written by an fp16 run)")
            self.scaler.load_state_dict(state["scaler"])
        self.history = json.loads(state["history"])
        self.step_times = list(state["step_times"])
        self.log.truncate(self.global_step, self.epoch)


def _forward(model: nn.Module, x: Tensor | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The model's outputs; for multi-input data each task's output on its own inputs."""
    if isinstance(x, Mapping):
        return {t: model(xt)[t] for t, xt in x.items()}
    return model(x)


class PerTaskBatches:
    """One epoch of multi-input training: each step a batch of every task's own samples.

    An epoch lasts as long as the largest task's shuffled pass (as LibMTL); a smaller task
    starts a new shuffled pass when its samples run out. Shuffles come from ``generator``.
    """

    def __init__(self, data: MultiInputDataset, tasks: Sequence[str], batch_size: int,
                 generator: torch.Generator) -> None:
        self.loaders = {
            t: DataLoader(data.datasets[t], batch_size=batch_size, shuffle=True,
                          generator=generator,
                          drop_last=len(data.datasets[t]) > batch_size)  # type: ignore[arg-type]
            for t in tasks
        }

    def __len__(self) -> int:
        return max(len(loader) for loader in self.loaders.values())

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iterators = {t: iter(loader) for t, loader in self.loaders.items()}
        for _ in range(len(self)):
            step = {}
            for t, it in iterators.items():
                try:
                    step[t] = next(it)
                except StopIteration:
                    iterators[t] = iter(self.loaders[t])
                    step[t] = next(iterators[t])
            yield step


class _PerTaskLoader:
    """Evaluation over multi-input data: each task on its own split (see :func:`evaluate`)."""

    def __init__(self, data: MultiInputDataset, batch_size: int) -> None:
        self.loaders = {t: DataLoader(d, batch_size=batch_size) for t, d in data.datasets.items()}


def _eval_loader(data: Dataset, batch_size: int) -> Iterable:
    if isinstance(data, MultiInputDataset):
        return _PerTaskLoader(data, batch_size)
    return DataLoader(data, batch_size=batch_size)

def check_same_settings(saved: Mapping[str, Any], now: Mapping[str, Any], path: Path) -> None:
    """Raise ValueError naming every setting that differs between a saved run and this one."""
    diff = [f"{k}: {saved.get(k)!r} (saved) != {now.get(k)!r} (now)"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        raise ValueError(f"cannot resume {path}: it was saved by a run with other settings "
                         f"({'; '.join(diff)}); use the saved settings, or run without --resume")


def _unpack(batch: Any, device: torch.device) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
    if isinstance(batch, (list, tuple)) and len(batch) == 3:
        x, y, mask = batch
    else:
        x, y = batch
        mask = {}
    return (x.to(device), {k: v.to(device) for k, v in y.items()},
            {k: v.to(device) for k, v in mask.items()})


@torch.no_grad()
def evaluate(model: nn.Module, tasks: Sequence[Task], loader: Iterable,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Every task's metrics (and mean loss) over a whole split, accumulated exactly.

    Keys are ``"task/metric"``; ``"task/loss"`` is the sample-weighted mean loss. For
    multi-input data (a loader over a :class:`~mtlkit.data.MultiInputDataset`) each task is
    evaluated on its own samples.
    """
    if isinstance(loader, _PerTaskLoader):
        result: dict[str, float] = {}
        for t in tasks:
            result.update(evaluate(model, [t], loader.loaders[t.name], device))
        return result
    was_training = model.training
    model.eval()
    metrics = {t.name: t.metrics() for t in tasks}
    loss_sum = dict.fromkeys(metrics, 0.0)
    count = 0
    for batch in loader:
        x, y, mask = _unpack(batch, torch.device(device))
        out = model(x)
        n = x.shape[0]
        count += n
        for t in tasks:
            m = mask.get(t.name)
            loss_sum[t.name] += float(t.loss(out[t.name], y[t.name], m)) * n
            for metric in metrics[t.name].values():
                metric.update(out[t.name], y[t.name], m)
    model.train(was_training)
    result = {}
    for t in tasks:
        for name, metric in metrics[t.name].items():
            result[f"{t.name}/{name}"] = float(metric.compute())
        result[f"{t.name}/loss"] = loss_sum[t.name] / max(count, 1)
    return result


def select_epoch(history: Sequence[Mapping[str, Any]], tasks: Sequence[Task], select: str) -> int:
    """Index of the selected epoch: on validation only (see the module docstring)."""
    if select == "last" or len(history) == 1:
        return len(history) - 1
    scores = validation_scores(history, tasks)
    return max(range(len(history)), key=lambda i: (scores[i], i))


def epochs_since_best(history: Sequence[Mapping[str, Any]], tasks: Sequence[Task],
                      min_delta: float = 0.0) -> int:
    """Epochs trained since the last improvement (0: the last epoch improved).

    With ``min_delta`` 0 an improvement is a better validation score (the first epoch with the
    best score counts). With ``min_delta`` > 0 it is an epoch whose primary validation metrics
    beat those of the previous improvement by more than ``min_delta`` in relative terms, on
    average over the tasks (sign-corrected: a lower error is a gain), so that a run creeping
    up by tiny amounts, as under a decaying learning rate, counts as levelled off.

    Example:
        >>> from mtlkit.tasks import Task
        >>> t = [Task.regression("y")]
        >>> h = [{"val": {"y/mae": v}} for v in (3.0, 2.0, 1.99, 1.985)]
        >>> epochs_since_best(h, t), epochs_since_best(h, t, min_delta=0.01)
        (0, 2)
    """
    if not history:
        return 0
    if not min_delta:
        scores = validation_scores(history, tasks)
        return len(history) - 1 - scores.index(max(scores))
    ref = 0
    for i in range(1, len(history)):
        if relative_gain(history[i]["val"], history[ref]["val"], tasks) > min_delta:
            ref = i
    return len(history) - 1 - ref


def relative_gain(now: Mapping[str, float], before: Mapping[str, float],
                  tasks: Sequence[Task]) -> float:
    """Mean over tasks of the sign-corrected relative change of the primary metric."""
    total = 0.0
    for t in tasks:
        key = f"{t.name}/{t.primary}"
        sign = 1.0 if t.metrics()[t.primary].higher_is_better else -1.0
        total += sign * (now[key] - before[key]) / (abs(before[key]) or 1.0)
    return total / len(tasks)


def still_improving(history: Sequence[Mapping[str, Any]], tasks: Sequence[Task],
                    patience: int | None, min_delta: float = 0.0) -> bool:
    """Whether a run ended while its validation score was still rising: its last improvement
    (see :func:`epochs_since_best`) lies within the last ``patience`` epochs (the last epoch
    itself without early stopping), so the early-stopping rule had not yet seen it level off.
    A run of one epoch counts as improving.

    Example:
        >>> from mtlkit.tasks import Task
        >>> t = [Task.regression("y")]
        >>> h = [{"val": {"y/mae": v}} for v in (3.0, 2.0, 1.5, 1.6)]
        >>> still_improving(h, t, None), still_improving(h, t, 2), still_improving(h, t, 1)
        (False, True, False)
    """
    return epochs_since_best(history, tasks, min_delta) < (patience or 1)


def validation_scores(history: Sequence[Mapping[str, Any]], tasks: Sequence[Task]) -> list[float]:
    """Per epoch, the mean over tasks of the primary validation metric's sign-corrected
    relative change since epoch 1 (higher is better): what selection and early stopping use."""
    first = history[0]["val"]

    def score(rec: Mapping[str, Any]) -> float:
        total = 0.0
        for t in tasks:
            key = f"{t.name}/{t.primary}"
            sign = 1.0 if t.metrics()[t.primary].higher_is_better else -1.0
            base = abs(first[key]) or 1.0
            total += sign * (rec["val"][key] - first[key]) / base
        return total / len(tasks)

    return [score(r) for r in history]


def parameter_cosine(losses: Mapping[str, Tensor], shared: Sequence[Tensor]) -> Tensor | None:
    """Pairwise cosine similarity (K x K) of the task gradients with respect to the shared
    parameters (diagnostics: no ``.grad`` is touched and the graph is kept for the real
    backward); None without shared parameters."""
    shared = [p for p in shared if p.requires_grad]
    if not shared:
        return None
    k = len(losses)
    blocks = task_jacobian(list(losses.values()), shared, chunk_size=1)  # K plain passes
    flat = torch.cat([b.reshape(k, -1).float() for b in blocks], dim=1)
    return cosine_from_gramian(flat @ flat.T)
