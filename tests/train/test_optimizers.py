"""Optimisers and learning-rate schedules: the per-step rule against torch's own schedulers,
warm-up by hand, and the trainer applying both (resumed runs continue the same curve)."""

from __future__ import annotations

import math

import pytest
import torch
from _fakes import RegressionTask, TinyModel, TwoTaskData

from mtlkit import balancers
from mtlkit.train import TrainConfig, Trainer
from mtlkit.train.optimizers import Schedule, scheduled_lr

SPE = 7  # steps per epoch


def _torch_rates(make, epochs: int, per_step: bool) -> list[float]:
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.1)
    sched = make(opt)
    rates = []
    for _ in range(epochs):
        for _ in range(SPE):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            if per_step:
                sched.step()
        if not per_step:
            sched.step()
    return rates


@pytest.mark.parametrize(
    ("schedule", "make", "per_step"),
    [
        (Schedule("step", step_size=3, gamma=0.5),
         lambda o: torch.optim.lr_scheduler.StepLR(o, 3, 0.5), False),
        (Schedule("multistep", milestones=[2, 5], gamma=0.1),
         lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 5], 0.1), False),
        (Schedule("cosine", min_lr=0.01),
         lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 8 * SPE, eta_min=0.01), True),
        (Schedule("none"), lambda o: torch.optim.lr_scheduler.ConstantLR(o, 1.0, 0), False),
    ],
)
def test_schedules_match_torch_schedulers(schedule, make, per_step):
    ours = [scheduled_lr(0.1, schedule, s, steps_per_epoch=SPE, total_steps=8 * SPE)
            for s in range(8 * SPE)]
    assert ours == pytest.approx(_torch_rates(make, 8, per_step), rel=1e-12, abs=1e-15)


def test_linear_warmup_by_hand():
    s = Schedule("step", step_size=100, gamma=0.5, warmup_epochs=0.5)  # 3.5 steps of warm-up
    rates = [scheduled_lr(1.0, s, step, steps_per_epoch=SPE, total_steps=100) for step in range(6)]
    assert rates == pytest.approx([1 / 3.5, 2 / 3.5, 3 / 3.5, 1.0, 1.0, 1.0])
    cos = Schedule("cosine", warmup_epochs=1)
    assert scheduled_lr(1.0, cos, 0, steps_per_epoch=10, total_steps=100) == pytest.approx(
        0.1 * 0.5 * (1 + math.cos(0)))


DATA = (TwoTaskData(64, 0), TwoTaskData(16, 1), TwoTaskData(16, 2))


def _trainer(out, epochs, **cfg) -> Trainer:
    torch.manual_seed(0)
    config = TrainConfig(epochs=epochs, batch_size=16, lr=0.05, seed=1, cosine_every=0, **cfg)
    return Trainer(TinyModel(), [RegressionTask("a"), RegressionTask("b")],
                   balancers.create("ew", tasks=["a", "b"]), config, out)


def test_trainer_applies_the_schedule_to_every_group_and_resumes_on_the_curve(tmp_path):
    sched = Schedule("step", step_size=1, gamma=0.5)
    full = _trainer(tmp_path / "full", 3, scheduler=sched, task_lr={"b": 0.2})
    full.fit(*DATA)
    # the last step (epoch 3) ran at lr * 0.5**2 in each group
    assert {g["name"]: g["lr"] for g in full.optimizer.param_groups} == pytest.approx(
        {"shared": 0.0125, "a": 0.0125, "b": 0.05})
    part = _trainer(tmp_path / "part", 1, scheduler=Schedule("step", step_size=1, gamma=0.5),
                    task_lr={"b": 0.2})
    part.fit(*DATA)
    resumed = _trainer(tmp_path / "part", 3, scheduler=Schedule("step", step_size=1, gamma=0.5),
                       task_lr={"b": 0.2})
    resumed.fit(*DATA, resume=True)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(("name", "kw", "cls"), [
    ("sgd", {"momentum": 0.9, "nesterov": True}, torch.optim.SGD),
    ("adamw", {"weight_decay": 0.01}, torch.optim.AdamW),
    ("adam", {"betas": (0.8, 0.9)}, torch.optim.Adam),
])
def test_optimizer_choice_reaches_torch(tmp_path, name, kw, cls):
    t = _trainer(tmp_path, 1, optimizer=name, **kw)
    assert type(t.optimizer) is cls
    group = t.optimizer.param_groups[0]
    for k, v in kw.items():
        assert group[k] == v


def test_grad_clip_bounds_the_update_norm(tmp_path):
    t = _trainer(None, 1, optimizer="sgd", grad_clip=1e-3)
    before = [p.detach().clone() for p in t.model.parameters()]
    t.config.max_steps = 1
    t.fit(*DATA)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(t.model.parameters(), before)])
    # plain SGD: the update is lr * clipped gradient, so its norm is at most lr * max_norm
    assert 0 < step.norm() <= 0.05 * 1e-3 * (1 + 1e-5)


def test_eval_every_evaluates_those_epochs_and_the_last(tmp_path):
    t = _trainer(tmp_path, 5, eval_every=2)
    res = t.fit(*DATA)
    assert [r["epoch"] for r in res.history] == [2, 4, 5]
    assert res.selected_epoch in (2, 4, 5)
    logged = (tmp_path / "epochs.jsonl").read_text().splitlines()
    assert [__import__("json").loads(x)["epoch"] for x in logged] == [2, 4, 5]


def test_poly_schedule_by_hand_and_as_torch_polynomial_lr():
    """The survey's poly rule: lr (1 - e / E)^0.9 at epoch e of E, constant within an epoch."""
    s = Schedule("poly")
    lrs = [scheduled_lr(0.01, s, step, steps_per_epoch=2, total_steps=8) for step in range(8)]
    by_hand = [0.01, 0.01, 0.01 * 0.75 ** 0.9, 0.01 * 0.75 ** 0.9,
               0.01 * 0.5 ** 0.9, 0.01 * 0.5 ** 0.9, 0.01 * 0.25 ** 0.9, 0.01 * 0.25 ** 0.9]
    assert lrs == pytest.approx(by_hand, rel=1e-12)
    assert lrs[2] == pytest.approx(0.0077189, rel=1e-4)  # 0.01 x 0.75^0.9
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([w], lr=0.01)
    ref = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=4, power=0.9)
    for epoch in range(4):
        assert lrs[2 * epoch] == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        ref.step()
    linear = Schedule("poly", power=1.0)
    assert scheduled_lr(1.0, linear, 3, steps_per_epoch=1, total_steps=4) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="scheduler.power must be a number > 0"):
        Schedule("poly", power=0).validate()
