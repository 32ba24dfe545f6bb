"""Optimisers and learning-rate schedules: the per-step rule against torch's own schedulers,
warm-up by hand, and the trainer applying both (resumed runs continue the same curve)."""

from __future__ import annotations

import math

import pytest
import torch
from _fakes import RegressionTask, TinyModel, TwoTaskData

from mtlkit import balancers
from mtlkit.train import TrainConfig, Trainer
from mtlkit.train.optimizers import Plateau, Schedule, scheduled_lr

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


# ------------------------------------------------------------------ plateau (ReduceLROnPlateau)
def _plateau_rates(schedule: Schedule, scores, base=0.1) -> list[float]:
    """The rate after each evaluation's score, by Plateau + scheduled_lr."""
    p = Plateau(schedule)
    rates = []
    for s in scores:
        p.step(s)
        rates.append(scheduled_lr(base, schedule, 0, steps_per_epoch=1, total_steps=1,
                                  reductions=p.reductions))
    return rates


def test_plateau_by_hand():
    s = Schedule("plateau", factor=0.5, patience=2, min_lr=0.03)
    scores = [0.0, 1.0, 1.0, 0.5, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 2.0]
    # best 1.0 at eval 2; a tie is no gain; the 3rd evaluation without gain (> patience 2)
    # halves the rate (eval 5) and restarts the count; eval 8 halves again: 0.025 < min_lr
    # gives 0.03; eval 11 would halve again and stays at the floor; a new best never raises it
    assert _plateau_rates(s, scores) == pytest.approx(
        [0.1, 0.1, 0.1, 0.1, 0.05, 0.05, 0.05, 0.03, 0.03, 0.03, 0.03, 0.03], abs=1e-15)


def test_plateau_matches_torch_reduce_lr_on_plateau():
    s = Schedule("plateau", factor=0.7, patience=5, min_lr=1e-5)  # Nash-MTL's QM9 rule
    g = torch.Generator().manual_seed(0)
    # a noisy, slowly rising score with long flat stretches: many decays, down to the floor
    scores = (torch.rand(300, generator=g) + torch.linspace(0, 1, 300) ** 4).tolist()
    w = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([w], lr=1e-3)
    ref = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.7, patience=5,
                                                     threshold=0.0, min_lr=1e-5)
    theirs = []
    for v in scores:
        ref.step(v)
        theirs.append(opt.param_groups[0]["lr"])
    ours = _plateau_rates(s, scores, base=1e-3)
    assert ours == pytest.approx(theirs, rel=1e-12)
    assert min(ours) == pytest.approx(1e-5) and ours[0] == 1e-3  # it reaches the floor


@pytest.mark.parametrize(("field", "value", "message"), [
    ("factor", 1.0, r"scheduler.factor must be a number in \(0, 1\), got 1.0"),
    ("factor", 0, r"scheduler.factor must be a number in \(0, 1\), got 0"),
    ("factor", "0.7x", r"scheduler.factor must be a number in \(0, 1\), got '0.7x'"),
    ("patience", -1, "scheduler.patience must be an integer >= 0, got -1"),
    ("patience", 1.5, "scheduler.patience must be an integer >= 0, got 1.5"),
    ("patience", True, "scheduler.patience must be an integer >= 0, got True"),
])
def test_bad_plateau_fields_are_named(field, value, message):
    from mtlkit.experiment import Experiment

    with pytest.raises(ValueError, match=message):
        Experiment.from_dict({"scheduler": {"name": "plateau", field: value}})


# validation MAE of both tasks per evaluation: best at 2, no gain at 3-5 (> patience 1 at 4:
# decay), best at 6, no gain at 7-10 (decays after 8 and 10)
VAL = [3.0, 2.0, 2.5, 2.6, 2.7, 1.0, 1.5, 1.6, 1.7, 1.8]


@pytest.fixture
def scripted_val(monkeypatch):
    from mtlkit.train import trainer as trainer_module

    calls: list[int] = []

    def fake_evaluate(model, tasks, loader, device="cpu"):
        calls.append(1)
        return {f"{t.name}/mae": VAL[len(calls) - 1] for t in tasks}

    monkeypatch.setattr(trainer_module, "evaluate", fake_evaluate)
    return calls


def _plateau_run(out, epochs, resume=False):
    t = _trainer(out, epochs, scheduler=Schedule("plateau", factor=0.5, patience=1, min_lr=0.02),
                 task_lr={"b": 0.2})
    rates: list[dict[str, float]] = []
    step = t.optimizer.step

    def recording_step(*a, **kw):
        rates.append({g["name"]: g["lr"] for g in t.optimizer.param_groups})
        return step(*a, **kw)

    t.optimizer.step = recording_step
    t.fit(DATA[0], DATA[1], resume=resume)
    return t, rates


def test_trainer_steps_plateau_on_validation_and_resumes_exactly(tmp_path, scripted_val):
    full, rates = _plateau_run(tmp_path / "full", 10)
    spe = 64 // 16
    per_epoch = [rates[e * spe] for e in range(10)]
    assert all(rates[e * spe + i] == per_epoch[e] for e in range(10) for i in range(spe))
    # by hand: 0.05 for epochs 1-4, halved after epoch 4, halved after epoch 8 to 0.0125,
    # below min_lr 0.02 (the task group b at 0.2: 0.1 then 0.05)
    assert [r["shared"] for r in per_epoch] == pytest.approx([0.05] * 4 + [0.025] * 4 + [0.02] * 2)
    assert [r["b"] for r in per_epoch] == pytest.approx([0.2] * 4 + [0.1] * 4 + [0.05] * 2)
    assert full.plateau is not None and full.plateau.state_dict() == {
        "best": pytest.approx(2 / 3), "bad": 0, "reductions": 3}  # (3.0 - 1.0) / 3.0; 3rd decay: epoch 10
    # interrupted after epoch 7 (one evaluation into a count): resuming must keep best,
    # count and decays, else the decay after epoch 8 moves
    del scripted_val[:]
    _, first = _plateau_run(tmp_path / "part", 7)
    scripted_val[:] = [1] * 7  # the resumed run's evaluations are epochs 8-10
    resumed, rest = _plateau_run(tmp_path / "part", 10, resume=True)
    assert first + rest == rates
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    assert resumed.plateau.state_dict() == full.plateau.state_dict()


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
