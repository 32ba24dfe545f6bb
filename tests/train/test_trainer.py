"""Trainer: resume exactness, logs, model selection on validation, config errors."""

from __future__ import annotations

import json

import pytest
import torch
from _fakes import RegressionTask, TinyModel, TwoTaskData

from mtlkit import balancers
from mtlkit.train import TrainConfig, Trainer
from mtlkit.train.trainer import select_epoch

TASKS = [RegressionTask("a"), RegressionTask("b")]


def make(method: str, out, epochs: int, **hp) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, seed=3, log_every=1, cosine_every=4)
    return Trainer(TinyModel(), TASKS, balancers.create(method, tasks=["a", "b"], **hp), cfg, out)


DATA = (TwoTaskData(96, 0), TwoTaskData(32, 1), TwoTaskData(32, 2))


@pytest.mark.parametrize("method", ["dwa", "uw", "famo", "rlw"])
def test_resume_after_epoch_1_equals_uninterrupted(tmp_path, method):
    full = make(method, tmp_path / "full", 3)
    ref = full.fit(*DATA)

    first = make(method, tmp_path / "resumed", 1)
    first.fit(*DATA)
    torch.manual_seed(1234)  # a fresh process has other RNG state; resume must restore it
    resumed = make(method, tmp_path / "resumed", 3)
    res = resumed.fit(*DATA, resume=True)

    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    assert res.history == ref.history
    steps = lambda d: [json.loads(l) for l in (d / "steps.jsonl").read_text().splitlines()]
    assert steps(tmp_path / "resumed") == steps(tmp_path / "full")


def test_logs_hold_losses_weights_cosines_and_csv(tmp_path):
    t = make("dwa", tmp_path, 2)
    res = t.fit(*DATA)
    steps = [json.loads(l) for l in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2 * (96 // 16)
    assert set(steps[0]["weight"]) == {"a", "b"} and set(steps[0]["loss"]) == {"a", "b"}
    assert "cosine" in steps[0] and -1 <= steps[0]["cosine"]["a|b"] <= 1
    header = (tmp_path / "epochs.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "val/a/mae", "test/b/loss"} <= set(header)
    assert res.selected_epoch in (1, 2) and res.step_time > 0


def test_cosine_is_logged_in_parameter_space_for_every_kind_of_method(tmp_path):
    def steps(method):
        t = make(method, tmp_path / method, 1)
        t.fit(*DATA)
        lines = (tmp_path / method / "steps.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

    ew, mgda = steps("ew"), steps("mgda")
    # every cosine_every=4 steps, for a loss method (diagnostic backward passes) and for a
    # gradient method (its own Gram matrix)
    for logged in (ew, mgda):
        assert [s["step"] for s in logged if "cosine" in s] == [1, 5]
    # same seed, same first batch, same parameters: both ways give the same number
    assert ew[0]["cosine"]["a|b"] == pytest.approx(mgda[0]["cosine"]["a|b"], abs=1e-5)


def test_selection_uses_validation_never_test():
    history = [
        {"epoch": 1, "val": {"a/mae": 1.0, "b/mae": 1.0}, "test": {"a/mae": 9.0, "b/mae": 9.0}},
        {"epoch": 2, "val": {"a/mae": 0.5, "b/mae": 0.9}, "test": {"a/mae": 0.1, "b/mae": 0.1}},
        {"epoch": 3, "val": {"a/mae": 0.4, "b/mae": 0.8}, "test": {"a/mae": 5.0, "b/mae": 5.0}},
    ]
    assert select_epoch(history, TASKS, "val") == 2  # best on val, though worst on test
    assert select_epoch(history, TASKS, "last") == 2
    history[2]["val"] = {"a/mae": 0.9, "b/mae": 0.95}
    assert select_epoch(history, TASKS, "val") == 1


@pytest.mark.parametrize(
    ("field", "value", "msg"),
    [("lr", -1.0, "lr must be a positive"), ("epochs", 0, "epochs must be"),
     ("task_lr", {"c": 1.0}, "unknown task 'c'"), ("batch_size", 0, "batch_size"),
     ("select", "test", "select must be 'val' or 'last'"), ("amp", "fp8", "amp must be one of")],
)
def test_bad_config_is_named(field, value, msg):
    cfg = TrainConfig(**{field: value})
    with pytest.raises(ValueError, match=msg):
        Trainer(TinyModel(), TASKS, balancers.create("ew", tasks=["a", "b"]), cfg)


def test_resume_without_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make("ew", tmp_path, 2).fit(*DATA, resume=True)



class NoFeaturesModel(TinyModel):
    def require_features(self):
        raise ValueError("this model has no single shared tensor: the trunk is task-attended")


def test_features_mode_on_a_model_without_features_says_why():
    cfg = TrainConfig(epochs=1, batch_size=16)
    mgda = balancers.create("mgda", tasks=["a", "b"], grad_on="features")
    with pytest.raises(ValueError, match="the trunk is task-attended"):
        Trainer(NoFeaturesModel(), TASKS, mgda, cfg).fit(*DATA)
    # in parameters mode the model's features are not needed, and training runs
    mgda = balancers.create("mgda", tasks=["a", "b"])
    assert Trainer(NoFeaturesModel(), TASKS, mgda, cfg).fit(*DATA).selected_epoch == 1


@pytest.mark.parametrize("method", ["geometric", "mgda"])
def test_amp_fp16_and_bf16_train_as_float32(method):
    """amp: fp16 (autocast + the scaler the balancer drives) and bf16 move the parameters as
    float32 does, to autocast tolerance (a scale-invariant method under a scaler used to move
    them 65536x too little)."""
    moved = {}
    for amp in (None, "fp16", "bf16"):
        torch.manual_seed(0)
        model = TinyModel()
        start = [p.detach().clone() for p in model.parameters()]
        cfg = TrainConfig(epochs=3, batch_size=16, lr=1e-2, seed=3, log_every=0, cosine_every=0,
                          amp=amp, progress=False)
        Trainer(model, TASKS, balancers.create(method, tasks=["a", "b"]), cfg).fit(*DATA)
        moved[amp] = torch.cat([(p.detach() - q).flatten()
                                for p, q in zip(model.parameters(), start)])
    # fp16: the scaler skips the first steps while its scale settles (from 2^16; task b's
    # targets are ~50), so Adam takes fewer steps: comparable, not equal.
    for amp, rel, cos in (("fp16", 0.5, 0.5), ("bf16", 0.1, 0.98)):
        d, ref = moved[amp], moved[None]
        assert float(d.norm() / ref.norm()) == pytest.approx(1.0, rel=rel), amp
        assert float(d @ ref / (d.norm() * ref.norm())) > cos, amp


def test_fp16_run_resumes_exactly_with_the_scaler_state(tmp_path):
    """The gradient scaler's scale and growth tracker are checkpointed: 2 epochs then 2 more
    equal 4 epochs straight (without the scaler state the resumed run restarts at 2^16 and
    skips steps again)."""
    def fit(out, epochs, resume=False):
        torch.manual_seed(0)
        model = TinyModel()
        cfg = TrainConfig(epochs=epochs, batch_size=16, lr=1e-2, seed=3, log_every=0,
                          cosine_every=0, amp="fp16", progress=False)
        t = Trainer(model, TASKS, balancers.create("geometric", tasks=["a", "b"]), cfg, out)
        t.fit(*DATA, resume=resume)
        return model, t

    straight, t1 = fit(tmp_path / "a", 4)
    fit(tmp_path / "b", 2)
    resumed, t2 = fit(tmp_path / "b", 4, resume=True)
    assert t1.scaler.get_scale() == t2.scaler.get_scale()
    for p, q in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
