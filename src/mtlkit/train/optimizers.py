"""The optimiser and the learning-rate schedule of a run, as the papers' protocols name them.

``build_optimizer`` makes Adam, AdamW or SGD (momentum, Nesterov) over the trainer's parameter
groups. A :class:`Schedule` gives the learning rate at every optimiser step as a pure function
of the step (:func:`scheduled_lr`), so a resumed run needs no scheduler state beyond its step
count. Epoch-based rules (``step``, ``multistep``) change the rate at epoch boundaries exactly
as ``torch.optim.lr_scheduler.StepLR`` / ``MultiStepLR`` stepped once per epoch do; ``cosine``
anneals per step over the whole run like ``CosineAnnealingLR`` with ``T_max`` = total steps;
``poly`` sets ``lr (1 - e / E)^power`` at each epoch ``e`` of ``E`` (the dense-prediction
survey's schedule, Vandenhende et al. 2021, arXiv:2004.13379, power 0.9).
A linear warm-up over ``warmup_epochs`` (fractions allowed) multiplies any of them.

``plateau`` is the one rule driven by results rather than by the step: :class:`Plateau` counts
the evaluations since the validation score last improved and, as
``torch.optim.lr_scheduler.ReduceLROnPlateau``, multiplies the rate by ``factor`` once more
than ``patience`` evaluations in a row have not improved it, never below ``min_lr``. Its state
(three numbers) is saved with the run's checkpoint; the rate of a step is then a pure function
of the step and that state's reduction count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "step", "multistep", "cosine", "plateau", "poly")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class Schedule:
    """A learning-rate schedule (the ``scheduler`` section of an experiment).

    Attributes:
        name: ``none`` (constant), ``step`` (times ``gamma`` every ``step_size`` epochs),
            ``multistep`` (times ``gamma`` at each epoch of ``milestones``), ``cosine``
            (from the base rate down to ``min_lr`` over the run, per step) or ``plateau``
            (times ``factor`` when the validation score has not improved for more than
            ``patience`` evaluations in a row, down to ``min_lr``; see :class:`Plateau`) or ``poly``
            (times ``(1 - epoch / epochs) ** power``, set at each epoch boundary; ``epochs`` is
            the run's length in epochs, fractional when ``max_steps`` cuts it).
        step_size: epochs between decays, for ``step``.
        milestones: epochs at which the rate decays, for ``multistep``.
        gamma: decay factor, for ``step`` and ``multistep``.
        warmup_epochs: linear warm-up from ~0 to the scheduled rate over this many epochs
            (0: none).
        min_lr: the final rate of ``cosine``; the floor of ``plateau``.
        factor: decay factor of ``plateau``.
        patience: evaluations without a better validation score that ``plateau`` tolerates;
            the rate drops at the next one (torch's ``ReduceLROnPlateau`` semantics).
        power: the exponent of ``poly`` (0.9, the survey's).

    Example:
        >>> s = Schedule("step", step_size=100, gamma=0.5)   # MTAN's NYUv2 protocol
        >>> [scheduled_lr(1e-4, s, step, steps_per_epoch=10, total_steps=2000)
        ...  for step in (0, 999, 1000)]
        [0.0001, 0.0001, 5e-05]
    """

    name: str = "none"
    step_size: int = 1
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    factor: float = 0.1
    patience: int = 10
    power: float = 0.9

    def validate(self, prefix: str = "scheduler") -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"{prefix}.name must be one of {list(SCHEDULES)}, got {self.name!r}")
        if isinstance(self.step_size, bool) or not isinstance(self.step_size, int) \
                or self.step_size < 1:
            raise ValueError(f"{prefix}.step_size must be an integer >= 1, got {self.step_size!r}")
        ms = self.milestones
        if not isinstance(ms, (list, tuple)) or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ms
        ) or list(ms) != sorted(set(ms)):
            raise ValueError(
                f"{prefix}.milestones must be increasing epochs >= 1, got {self.milestones!r}"
            )
        if self.name == "multistep" and not ms:
            raise ValueError(f"{prefix}.milestones must name at least one epoch for multistep")
        if not _number(self.gamma) or not 0 < self.gamma <= 1:
            raise ValueError(f"{prefix}.gamma must be a number in (0, 1], got {self.gamma!r}")
        if not _number(self.warmup_epochs) or self.warmup_epochs < 0:
            raise ValueError(
                f"{prefix}.warmup_epochs must be a number >= 0, got {self.warmup_epochs!r}"
            )
        if not _number(self.min_lr) or self.min_lr < 0:
            raise ValueError(f"{prefix}.min_lr must be a number >= 0, got {self.min_lr!r}")
        if not _number(self.factor) or not 0 < self.factor < 1:
            raise ValueError(f"{prefix}.factor must be a number in (0, 1), got {self.factor!r}")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) \
                or self.patience < 0:
            raise ValueError(f"{prefix}.patience must be an integer >= 0, got {self.patience!r}")
        if not _number(self.power) or self.power <= 0:
            raise ValueError(f"{prefix}.power must be a number > 0, got {self.power!r}")

    def settings(self) -> dict[str, Any]:
        """The fields that define this schedule, as plain data (what a resumed run must
        share): ``factor`` and ``patience`` only for ``plateau``, ``power`` only for ``poly``,
        so checkpoints written before these schedules existed still resume."""
        out = asdict(self)
        if self.name != "plateau":
            del out["factor"], out["patience"]
        if self.name != "poly":
            del out["power"]
        return out


class Plateau:
    """The state of a ``plateau`` schedule: the best validation score so far, the evaluations
    since it (``bad``), and how often the rate has been reduced (``reductions``).

    :meth:`step` takes one evaluation's score (higher is better; the trainer passes the score
    that model selection and early stopping use). A score strictly above the best resets the
    count; otherwise the count grows, and when it exceeds ``patience`` the rate is reduced
    once and the count restarts, as ``torch.optim.lr_scheduler.ReduceLROnPlateau`` with
    ``mode="max", threshold=0, cooldown=0`` does. The rate of a group with base rate ``lr``
    is then ``max(lr * factor ** reductions, min_lr)`` (:func:`scheduled_lr`).

    Example:
        >>> p = Plateau(Schedule("plateau", factor=0.5, patience=1))
        >>> [p.step(s) for s in (0.0, 1.0, 0.5, 0.9, 0.8, 2.0)]   # True: reduced here
        [False, False, False, True, False, False]
        >>> p.reductions, p.bad
        (1, 0)
    """

    def __init__(self, schedule: Schedule) -> None:
        self.patience = schedule.patience
        self.best = -math.inf
        self.bad = 0
        self.reductions = 0

    def step(self, score: float) -> bool:
        """Record one evaluation's score; True when it reduces the rate."""
        if score > self.best:
            self.best, self.bad = float(score), 0
            return False
        self.bad += 1
        if self.bad > self.patience:
            self.reductions += 1
            self.bad = 0
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad, "reductions": self.reductions}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = float(state["best"])
        self.bad = int(state["bad"])
        self.reductions = int(state["reductions"])


def scheduled_lr(base_lr: float, schedule: Schedule, step: int, *, steps_per_epoch: int,
                 total_steps: int, reductions: int = 0) -> float:
    """The learning rate of optimiser step ``step`` (0-based) for a group whose base rate is
    ``base_lr``: a pure function, so resuming at step ``s`` continues the same curve.
    ``reductions`` is the :class:`Plateau` count of a ``plateau`` schedule (ignored by the
    others)."""
    epoch = step // steps_per_epoch  # completed epochs, as an epoch-stepped torch scheduler sees
    if schedule.name == "step":
        lr = base_lr * schedule.gamma ** (epoch // schedule.step_size)
    elif schedule.name == "multistep":
        lr = base_lr * schedule.gamma ** sum(m <= epoch for m in schedule.milestones)
    elif schedule.name == "cosine":
        progress = min(step / max(total_steps, 1), 1.0)
        lr = schedule.min_lr + (base_lr - schedule.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    elif schedule.name == "plateau":
        # torch: new = max(old * factor, min_lr); a rate already below min_lr is left alone
        lr = max(base_lr * schedule.factor ** reductions, min(base_lr, schedule.min_lr))
    elif schedule.name == "poly":
        epochs = max(total_steps, 1) / steps_per_epoch
        lr = base_lr * max(0.0, 1.0 - epoch / epochs) ** schedule.power
    else:
        lr = base_lr
    warmup = schedule.warmup_epochs * steps_per_epoch
    if warmup > 0 and step < warmup:
        lr *= min(1.0, (step + 1) / warmup)
    return lr


def build_optimizer(groups: Sequence[dict[str, Any]], name: str, *, weight_decay: float,
                    momentum: float, nesterov: bool,
                    betas: Sequence[float]) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` / ``AdamW`` / ``SGD`` over ``groups`` (each with its own ``lr``).

    Example:
        >>> w = torch.nn.Parameter(torch.zeros(2))
        >>> opt = build_optimizer([{"params": [w], "lr": 0.1}], "sgd", weight_decay=0.0,
        ...                       momentum=0.9, nesterov=True, betas=(0.9, 0.999))
        >>> type(opt).__name__, opt.param_groups[0]["nesterov"]
        ('SGD', True)
    """
    groups = [dict(g) for g in groups]
    if name == "adam":
        return torch.optim.Adam(groups, betas=tuple(betas), weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, betas=tuple(betas), weight_decay=weight_decay)
    if name == "sgd":
        lr = groups[0]["lr"] if groups else 0.0
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov,
                               weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZERS)}, got {name!r}")


def check_optimizer(name: Any, momentum: Any, nesterov: Any, betas: Any,
                    prefix: str = "optimizer") -> None:
    """Field checks of the optimiser settings; errors name the field."""
    if name not in OPTIMIZERS:
        raise ValueError(f"{prefix}.name must be one of {list(OPTIMIZERS)}, got {name!r}")
    if not _number(momentum) or not 0 <= momentum < 1:
        raise ValueError(f"{prefix}.momentum must be a number in [0, 1), got {momentum!r}")
    if not isinstance(nesterov, bool):
        raise ValueError(f"{prefix}.nesterov must be true or false, got {nesterov!r}")  # noqa: TRY004
    if nesterov and (name != "sgd" or momentum == 0):
        raise ValueError(f"{prefix}.nesterov needs name: sgd and a momentum > 0")
    if momentum and name != "sgd":
        raise ValueError(f"{prefix}.momentum is for sgd; {name} has betas")
    if (not isinstance(betas, (list, tuple)) or len(betas) != 2
            or not all(_number(b) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"{prefix}.betas must be two numbers in [0, 1), got {betas!r}")
