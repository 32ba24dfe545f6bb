"""Early stopping on validation (patience) and the still-improving flag of a run."""

from __future__ import annotations

import pytest
import torch
from _fakes import RegressionTask, TinyModel, TwoTaskData

from mtlkit import balancers
from mtlkit.train import TrainConfig, Trainer
from mtlkit.train import trainer as trainer_module
from mtlkit.train.trainer import epochs_since_best, still_improving

TASKS = [RegressionTask("a"), RegressionTask("b")]
DATA = (TwoTaskData(32, 0), TwoTaskData(16, 1), None)


def _history(maes):
    return [{"epoch": i + 1, "val": {"a/mae": m, "b/mae": m}} for i, m in enumerate(maes)]


def test_epochs_since_best_and_the_flag_by_hand():
    h = _history([3.0, 2.0, 2.5, 2.0, 2.6])  # best 2.0 first at epoch 2; a tie is no gain
    assert epochs_since_best(h, TASKS) == 3
    assert not still_improving(h, TASKS, None) and not still_improving(h, TASKS, 3)
    assert still_improving(h, TASKS, 4)  # patience 4 had not yet seen it level off
    rising = _history([3.0, 2.0, 1.0])
    assert epochs_since_best(rising, TASKS) == 0 and still_improving(rising, TASKS, None)
    assert still_improving(_history([3.0]), TASKS, 2)  # one epoch: nothing shows convergence


@pytest.fixture
def scripted_val(monkeypatch):
    """Validation MAE per epoch from a script (test: none), so stopping is exact."""
    script = [3.0, 2.0, 2.5, 2.6, 1.0, 0.5]

    def fake_evaluate(model, tasks, loader, device="cpu"):
        calls.append(1)
        m = script[len(calls) - 1]
        return {f"{t.name}/mae": m for t in tasks}

    calls: list[int] = []
    monkeypatch.setattr(trainer_module, "evaluate", fake_evaluate)
    return calls


def _fit(out, epochs, patience, resume=False):
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, batch_size=16, patience=patience, progress=False)
    t = Trainer(TinyModel(), TASKS, balancers.create("ew", tasks=["a", "b"]), cfg, out)
    return t.fit(*DATA, resume=resume)


def test_patience_stops_the_run_and_clears_the_flag(tmp_path, scripted_val):
    res = _fit(tmp_path, epochs=6, patience=2)
    # best at epoch 2, then two epochs without a better score: stops after epoch 4, though the
    # script would improve at epoch 5
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4]
    assert res.selected_epoch == 2 and not res.still_improving


def test_a_run_cut_by_the_budget_is_flagged(tmp_path, scripted_val):
    res = _fit(tmp_path, epochs=3, patience=2)
    assert len(res.history) == 3 and res.still_improving  # only 1 epoch since the best
    del scripted_val[:]
    # without early stopping only a best last epoch is flagged
    assert not _fit(tmp_path / "none", epochs=3, patience=None).still_improving


def test_a_resumed_run_stops_where_an_uninterrupted_one_does(tmp_path, scripted_val):
    _fit(tmp_path, epochs=3, patience=2)
    del scripted_val[:]  # the resumed run re-reads the script from its start: skip 3 epochs
    scripted_val += [1, 1, 1]
    res = _fit(tmp_path, epochs=6, patience=2, resume=True)
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4] and not res.still_improving


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_bad_patience_is_named(value):
    with pytest.raises(ValueError, match="patience must be an integer >= 1"):
        TrainConfig(patience=value).validate(["a", "b"])


def test_min_delta_counts_only_gains_above_it_since_the_last_counted_gain():
    # relative MAE gains: 3->2 (33 %), 2->1.99 (0.5 %), 1.99->1.97 (1 % of 1.99 but 1.5 % of
    # 2.0, the last counted gain), 1.97->1.96 (0.5 % of 1.97)
    h = _history([3.0, 2.0, 1.99, 1.97, 1.96])
    assert epochs_since_best(h, TASKS) == 0  # min_delta 0: any better score
    assert epochs_since_best(h, TASKS, 0.01) == 1  # the gain at epoch 4 counts, then none
    assert epochs_since_best(h, TASKS, 0.025) == 3  # only 3->2 counts
    assert not still_improving(h, TASKS, 3, 0.025) and still_improving(h, TASKS, 3, 0.01)
    # the mean over tasks: a gain on one task against a loss on the other is no gain
    mixed = [{"val": {"a/mae": 2.0, "b/mae": 2.0}}, {"val": {"a/mae": 1.0, "b/mae": 3.0}}]
    assert epochs_since_best(mixed, TASKS, 0.01) == 1


def test_min_delta_ends_a_run_that_only_creeps(tmp_path, monkeypatch):
    script = iter([3.0, 2.0, 1.995, 1.99, 1.985, 1.98, 1.975])
    monkeypatch.setattr(trainer_module, "evaluate",
                        lambda model, tasks, loader, device="cpu":
                        dict.fromkeys((f"{t.name}/mae" for t in tasks), next(script)))
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=7, batch_size=16, patience=3, min_delta=0.01, progress=False)
    t = Trainer(TinyModel(), TASKS, balancers.create("ew", tasks=["a", "b"]), cfg, tmp_path)
    res = t.fit(*DATA)
    assert [r["epoch"] for r in res.history] == [1, 2, 3, 4, 5]  # 3 epochs after epoch 2
    assert res.selected_epoch == 5 and not res.still_improving  # selection: best score
    with pytest.raises(ValueError, match="min_delta must be a number >= 0"):
        TrainConfig(min_delta=-1).validate(["a", "b"])


def _fit_schedule(out, epochs, schedule):
    from mtlkit.train.optimizers import Schedule

    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, batch_size=8, patience=2, lr=0.05, progress=False,
                      scheduler=Schedule(schedule, patience=0, factor=0.5))
    t = Trainer(TinyModel(), TASKS, balancers.create("rlw", tasks=["a", "b"]), cfg, out)
    return t.fit(*DATA), [p.detach().clone() for p in t.model.parameters()]


def test_an_unflagged_run_is_the_same_under_any_larger_budget(tmp_path, scripted_val):
    # With a schedule that does not depend on the budget (plateau, none), a run that early
    # stopping ended, so is not flagged, trains exactly the same steps under a budget four
    # times larger: only flagged runs can change when the budget grows. (The default comparison
    # relies on this; with cosine, whose length is the budget, every step's rate differs.)
    short, w_short = _fit_schedule(tmp_path / "a", 6, "plateau")
    assert len(short.history) == 4 and not short.still_improving
    del scripted_val[:]
    long, w_long = _fit_schedule(tmp_path / "b", 24, "plateau")
    assert long.history == short.history
    assert all(torch.equal(a, b) for a, b in zip(w_short, w_long))
    del scripted_val[:]
    _, c_short = _fit_schedule(tmp_path / "c", 6, "cosine")
    del scripted_val[:]
    _, c_long = _fit_schedule(tmp_path / "d", 24, "cosine")
    assert not all(torch.equal(a, b) for a, b in zip(c_short, c_long))
