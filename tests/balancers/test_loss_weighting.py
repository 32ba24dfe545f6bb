"""Loss-weighting balancers: paper formulas worked by hand, pass counts, invariances, resume."""

from __future__ import annotations

import copy
import io
import itertools
import math

import pytest
import torch
from _problems import TinyMTL, make_batches, train

from mtlkit import balancers
from mtlkit.balancers import (
    FAMO,
    DynamicTaskPrioritization,
    DynamicWeightAverage,
    GeometricWeighting,
    InitialLossWeighting,
    LossBalancedTaskWeighting,
    PriorLossWeighting,
    RandomLossWeighting,
    UncertaintyWeighting,
    prior_loss,
)

TASKS = ["a", "b", "c"]


def kpi_context(step: int) -> dict:
    return {"kpi": {"a": 0.5 + 0.01 * (step % 7), "b": 0.9, "c": 0.2 + 0.02 * (step % 5)}}


# name -> (hyperparameters, per-step context)
LOSS_BALANCERS_UNDER_TEST = {
    "ew": ({}, None),
    "fixed": ({"weights": {"a": 1.0, "b": 0.5, "c": 2.0}}, None),
    "initial_loss": ({"num_batches": 3}, None),
    "prior_loss": ({"priors": {"a": 1.0, "b": 2.0, "c": 0.25}}, None),
    "geometric": ({}, None),
    "uw": ({"kinds": {"a": "regression", "b": "classification", "c": "regression"}}, None),
    "dwa": ({"temperature": 2.0}, None),
    "dtp": ({"gamma": {"a": 1.0, "b": 2.0, "c": 0.5}}, kpi_context),
    "lbtw": ({"alpha": 0.5}, None),
    "rlw": ({"seed": 3}, None),
    "famo": ({}, None),
    "famo:next_batch": ({"update": "next_batch"}, None),  # "name:variant" runs name
}


def method(key: str) -> str:
    """The registry name of a key of LOSS_BALANCERS_UNDER_TEST."""
    return key.split(":")[0]


def step(b, losses, **ctx):
    """One backward on leaf 'losses' (each loss = value * p for a shared scalar p)."""
    p = torch.nn.Parameter(torch.tensor(1.0))
    return b.backward({t: v * p for t, v in zip(b.tasks, losses)}, **ctx)


def close(weights: dict[str, float], expected: list[float]) -> bool:
    return all(math.isclose(weights[t], e, rel_tol=1e-5, abs_tol=1e-7) for t, e in zip(weights, expected))


def test_create_names_the_problem():
    with pytest.raises(ValueError, match="unknown balancer 'nope'.*available: "):
        balancers.create("nope", tasks=TASKS)
    with pytest.raises(TypeError, match=r"unknown hyperparameter\(s\) \['temp'\]; accepted: "
                                        r"\['temperature', 'per_batch', 'check_finite'\]"):
        balancers.create("dwa", tasks=TASKS, temp=2)


# ------------------------------------------------------------------ formulas by hand
def test_equal_and_fixed_weights_and_gradient():
    p = torch.nn.Parameter(torch.tensor(2.0))
    s = balancers.create("fixed", tasks=["a", "b"], weights={"a": 0.5, "b": 3.0}).backward(
        {"a": p**2, "b": 4 * p}
    )
    assert s.weights == {"a": 0.5, "b": 3.0}
    assert p.grad.item() == pytest.approx(0.5 * 2 * 2.0 + 3.0 * 4)  # d/dp (0.5 p^2 + 12 p)
    assert s.loss.item() == pytest.approx(0.5 * 4 + 3.0 * 8)


def test_initial_loss_is_mean_of_first_batches():
    b = InitialLossWeighting(["a", "b"], num_batches=2)
    assert close(step(b, [2.0, 8.0]).weights, [1 / 2, 1 / 8])  # mean so far: the first loss
    assert close(step(b, [4.0, 4.0]).weights, [1 / 3, 1 / 6])  # L(0) = mean(2,4), mean(8,4)
    assert close(step(b, [1.0, 1.0]).weights, [1 / 3, 1 / 6])  # frozen after 2 batches
    given = InitialLossWeighting(["a", "b"], initial={"a": 5.0, "b": 0.1})
    assert close(step(given, [1.0, 1.0]).weights, [0.2, 10.0])


def test_prior_loss_from_labels():
    # classes with frequencies 1/2, 1/4, 1/4: entropy = 0.5 ln2 + 2 * 0.25 ln4 = 1.5 ln 2
    cls = torch.tensor([0, 0, 1, 2])
    assert prior_loss(cls, "classification") == pytest.approx(1.5 * math.log(2))
    reg = torch.tensor([1.0, 2.0, 3.0, 6.0])  # mean 3, population variance (4+1+0+9)/4
    assert prior_loss(reg, "regression") == pytest.approx(3.5)
    ml = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 0]])  # rates 1/2 and 1/4
    h = lambda r: -(r * math.log(r) + (1 - r) * math.log(1 - r))
    assert prior_loss(ml, "multilabel") == pytest.approx((h(0.5) + h(0.25)) / 2)
    b = PriorLossWeighting.from_labels(
        ["x", "y"], {"x": cls, "y": reg}, {"x": "classification", "y": "regression"}
    )
    assert close(step(b, [1.0, 1.0]).weights, [1 / (1.5 * math.log(2)), 1 / 3.5])


def test_geometric_is_reciprocal_loss():
    assert close(step(GeometricWeighting(["a", "b"]), [4.0, 0.25]).weights, [0.25, 4.0])


def test_uncertainty_weighting_gradients_by_hand():
    b = UncertaintyWeighting(["r", "c"], kinds={"r": "regression", "c": "classification"},
                             init_log_var=0.5)
    s = step(b, [3.0, 2.0])
    e = math.exp(-0.5)
    assert close(s.weights, [0.5 * e, e])  # 1/(2 sigma^2) and 1/sigma^2 with s = log sigma^2
    # L = c e^{-s} L_k + s/2  ->  dL/ds = -c e^{-s} L_k + 1/2
    expected = torch.tensor([-0.5 * e * 3.0 + 0.5, -e * 2.0 + 0.5])
    torch.testing.assert_close(b.log_vars.grad, expected)
    assert s.loss.item() == pytest.approx(0.5 * e * 3 + e * 2 + 0.5)
    assert dict(b.named_parameters()).keys() == {"log_vars"}


def test_dwa_uses_epoch_mean_ratios():
    b = DynamicWeightAverage(["a", "b"], temperature=2.0)
    epochs = [[(4.0, 2.0), (2.0, 2.0)], [(2.0, 1.0), (1.0, 1.0)], [(1.0, 1.0)]]
    seen = []
    for losses in epochs:
        for ls in losses:
            seen.append(step(b, ls).weights)
        b.new_epoch()
    assert all(close(w, [1.0, 1.0]) for w in seen[:4])  # first two epochs
    # epoch means: e1 = (3, 2), e2 = (1.5, 1); r = (0.5, 0.5) -> equal weights
    assert close(seen[4], [1.0, 1.0])
    # epoch 3 mean = (1, 1); r = (1/1.5, 1/1) for the 4th epoch
    w = step(b, (1.0, 1.0)).weights
    ea, eb = math.exp((1 / 1.5) / 2), math.exp(1.0 / 2)
    assert close(w, [2 * ea / (ea + eb), 2 * eb / (ea + eb)])
    assert sum(w.values()) == pytest.approx(2.0)


def test_dwa_per_batch_variant():
    b = DynamicWeightAverage(["a", "b"], temperature=1.0, per_batch=True)
    step(b, (2.0, 2.0))
    step(b, (1.0, 2.0))
    w = step(b, (1.0, 1.0)).weights  # r = (1/2, 2/2) from the last two steps
    ea, eb = math.exp(0.5), math.exp(1.0)
    assert close(w, [2 * ea / (ea + eb), 2 * eb / (ea + eb)])


def test_dtp_focal_weights_with_moving_average():
    b = DynamicTaskPrioritization(["a", "b"], gamma={"a": 2.0, "b": 0.0}, alpha=0.25)
    w1 = step(b, [1.0, 1.0], kpi={"a": 0.5, "b": 0.8}).weights
    assert close(w1, [-(0.5**2) * math.log(0.5), -math.log(0.8)])
    w2 = step(b, [1.0, 1.0], kpi={"a": 0.9, "b": 0.4}).weights
    ka, kb = 0.25 * 0.9 + 0.75 * 0.5, 0.25 * 0.4 + 0.75 * 0.8
    assert close(w2, [-((1 - ka) ** 2) * math.log(ka), -math.log(kb)])
    mastered = DynamicTaskPrioritization(["a", "b"])
    assert close(step(mastered, [1.0, 1.0], kpi={"a": 1.0, "b": 0.5}).weights, [0.0, 0.5 * math.log(2)])


def test_lbtw_ratio_to_first_batch_of_epoch():
    b = LossBalancedTaskWeighting(["a", "b"], alpha=0.5)
    assert close(step(b, [4.0, 9.0]).weights, [1.0, 1.0])
    assert close(step(b, [1.0, 4.0]).weights, [math.sqrt(1 / 4), math.sqrt(4 / 9)])
    b.new_epoch()
    assert close(step(b, [2.0, 2.0]).weights, [1.0, 1.0])
    assert close(step(b, [0.5, 8.0]).weights, [0.5, 2.0])


def test_rlw_is_a_reproducible_softmax_of_normals():
    def draws(seed):
        b = RandomLossWeighting(TASKS, seed=seed)
        return [list(step(b, [1.0] * 3).weights.values()) for _ in range(400)]

    w = torch.tensor(draws(7))
    assert torch.equal(w, torch.tensor(draws(7)))
    assert not torch.equal(w, torch.tensor(draws(8)))
    assert torch.allclose(w.sum(1), torch.ones(400), atol=1e-6) and (w > 0).all()
    assert len({tuple(r) for r in w.tolist()}) == 400  # fresh weights every step
    # E[softmax(z)_k] = 1/K by symmetry; 400 draws put the mean within ~0.02 of it
    assert torch.allclose(w.mean(0), torch.full((3,), 1 / 3), atol=0.03)


def test_famo_weights_and_logit_update_by_hand():
    b = FAMO(["a", "b"], lr=0.1, gamma=0.0)
    w = step(b, [1.0, 4.0]).weights  # z = (1/2, 1/2): w_k ∝ 1/L_k
    assert close(w, [0.8, 0.2])
    b.after_step([torch.tensor(0.5), torch.tensor(3.5)])
    # delta = (log 2, log(4/3.5)); grad = z * (delta - z.delta): a positive, b negative.
    # Adam's first step is lr * sign(grad) -> logits (-0.1, +0.1)
    torch.testing.assert_close(b.logits, torch.tensor([-0.1, 0.1], dtype=torch.float64), rtol=0,
                               atol=1e-6)
    za, zb = math.exp(-0.1), math.exp(0.1)
    w2 = step(b, [1.0, 1.0]).weights
    assert close(w2, [za / (za + zb), zb / (za + zb)])
    with pytest.raises(RuntimeError, match="without a backward"):
        b.after_step([torch.tensor(1.0), torch.tensor(1.0)])
        b.after_step([torch.tensor(1.0), torch.tensor(1.0)])


def test_famo_next_batch_uses_the_next_losses_as_the_post_step_losses():
    """With update="next_batch" the logits move at the next backward, from the new batch's
    losses: when those equal the same batch's post-step losses, both modes give the same
    weights at every step, and no after_step (no extra forward) is needed."""
    same, nxt = FAMO(["a", "b"], lr=0.1), FAMO(["a", "b"], lr=0.1, update="next_batch")
    assert same.needs_after_step and not nxt.needs_after_step
    trajectory = [[1.0, 4.0], [0.5, 3.5], [0.45, 2.0], [0.4, 1.9], [0.1, 1.8]]
    for now, after in itertools.pairwise(trajectory):
        assert close(step(nxt, now).weights, list(step(same, now).weights.values()))
        same.after_step([torch.tensor(v) for v in after])
        nxt.after_step([torch.tensor(v) for v in after])  # not needed: a no-op
    step(nxt, trajectory[-1])
    torch.testing.assert_close(nxt.logits, same.logits)
    with pytest.raises(ValueError, match="update must be one of"):
        FAMO(["a", "b"], update="later")


@pytest.mark.parametrize("k", [3, 12])  # losses read one by one / stacked
def test_famo_after_step_rejects_a_non_finite_loss_and_keeps_its_state(k):
    tasks = [f"t{i}" for i in range(k)]
    b = FAMO(tasks, lr=0.1)
    step(b, [1.0 + i for i in range(k)])
    saved = {n: v.clone() for n, v in b.state_dict().items()}
    for bad in (float("nan"), float("inf")):
        losses = [torch.tensor(0.5)] * k
        losses[1] = torch.tensor(bad)
        with pytest.raises(FloatingPointError, match=r"\['t1'\]"):
            b.after_step(losses)
        assert all(torch.equal(v, saved[n]) for n, v in b.state_dict().items())
    b.after_step([torch.tensor(0.5)] * k)  # the step's update is still due, and is made
    assert not b.pending and not torch.equal(b.logits, saved["logits"])


# ------------------------------------------------------------------ contract properties
@pytest.mark.parametrize("name", ["initial_loss", "geometric"])
def test_scale_invariance(name):
    grads = []
    for scale in (1.0, 1000.0):
        torch.manual_seed(1)
        model = TinyMTL(TASKS, scales=[scale, 1.0, 1.0])
        b = balancers.create(name, tasks=TASKS)
        for x, y in make_batches(3, 3):
            model.zero_grad()
            losses, _ = model.losses(x, y)
            b.backward(losses)
        grads.append([p.grad.clone() for p in model.parameters()])
    for g1, g2 in zip(*grads):
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["famo:next_batch", "dwa", "dtp"])
def test_resume_follows_the_same_trajectory(name):
    """40 steps (the contract test resumes every method at defaults after 6): a variant,
    and the methods whose state changes per epoch or per KPI."""
    hparams, ctx = LOSS_BALANCERS_UNDER_TEST[name]
    batches = make_batches(40, 3, seed=1)
    torch.manual_seed(2)
    ref_model = TinyMTL(TASKS, scales=[1.0, 10.0, 0.1])
    model = copy.deepcopy(ref_model)
    ref_weights, _ = train(ref_model, balancers.create(method(name), tasks=TASKS, **hparams), batches,
                           context=ctx)

    b = balancers.create(method(name), tasks=TASKS, **hparams)
    first, opt = train(model, b, batches[:20], context=ctx)
    buf = io.BytesIO()
    torch.save({"b": b.state_dict(), "m": model.state_dict(), "o": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = TinyMTL(TASKS, scales=[1.0, 10.0, 0.1])
    model2.load_state_dict(saved["m"])
    b2 = balancers.create(method(name), tasks=TASKS, **hparams)
    b2.load_state_dict(saved["b"])
    opt2 = torch.optim.SGD([*model2.parameters(), *b2.parameters()], lr=0.01)
    opt2.load_state_dict(saved["o"])
    second, _ = train(model2, b2, batches[20:], context=lambda i: ctx(i + 20) if ctx else {},
                      opt=opt2)
    assert first + second == ref_weights
    for p, q in zip(model2.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ bad input
def test_bad_losses_are_named_and_change_no_state():
    b = balancers.create("dwa", tasks=["seg", "depth"])
    p = torch.nn.Parameter(torch.tensor(1.0))
    step(b, [1.0, 2.0])
    before = {k: v.clone() for k, v in b.state_dict().items()}
    cases = [
        ({"seg": p * float("nan"), "depth": p}, FloatingPointError, r"task\(s\) \['seg'\]"),
        ({"seg": p, "depth": p * float("inf")}, FloatingPointError, "depth"),
        ({"seg": p.expand(3), "depth": p}, ValueError, "task 'seg' must be a scalar"),
        ({"seg": p.detach(), "depth": p}, ValueError, "task 'seg' does not require grad"),
        ({"seg": p, "depth": p, "normals": p}, KeyError, r"unknown task\(s\) \['normals'\]"),
        ({"seg": p}, KeyError, r"missing loss for task\(s\) \['depth'\]"),
        ([p], ValueError, "got 1 losses for 2 tasks"),
        ({"seg": 1.0, "depth": p}, TypeError, "task 'seg' is a float"),
    ]
    for losses, err, msg in cases:
        with pytest.raises(err, match=msg):
            b.backward(losses)
    with pytest.raises(TypeError, match="unexpected context"):
        b.backward({"seg": p, "depth": p}, kpi={})
    after = b.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_kpi_is_rejected_before_any_state_change():
    b = DynamicTaskPrioritization(["a", "b"])
    step(b, [1.0, 1.0], kpi={"a": 0.5, "b": 0.5})
    before = {k: v.clone() for k, v in b.state_dict().items()}
    for kpi, msg in [
        ({"a": 0.0, "b": 0.5}, r"kpi of task 'a' must be in \(0, 1\]"),
        ({"a": 0.5, "b": 1.5}, "kpi of task 'b'"),
        ({"a": 0.5}, "missing"),
    ]:
        with pytest.raises(ValueError, match=msg):
            step(b, [1.0, 1.0], kpi=kpi)
    with pytest.raises(ValueError, match="needs kpi"):
        step(b, [1.0, 1.0])
    assert all(torch.equal(before[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize(
    ("name", "hparams", "msg"),
    [
        ("dwa", {"temperature": 0.0}, "temperature must be finite and > 0"),
        ("dwa", {"temperature": -1.0}, "temperature"),
        ("lbtw", {"alpha": -0.5}, "alpha must be finite and >= 0"),
        ("dtp", {"alpha": 1.5}, r"alpha must be in \(0, 1\]"),
        ("dtp", {"gamma": -1.0}, "gamma"),
        ("fixed", {"weights": {"a": 1.0}}, "missing"),
        ("fixed", {"weights": {"a": 1.0, "b": -2.0}}, r"weights\['b'\] must be finite and >= 0"),
        ("prior_loss", {"priors": {"a": 1.0, "b": 0.0}}, r"priors\['b'\]"),
        ("initial_loss", {"num_batches": 0}, "num_batches must be an integer >= 1"),
        ("uw", {"kinds": "poisson"}, "must be one of"),
        ("famo", {"lr": 0.0}, "lr must be"),
    ],
)
def test_invalid_hyperparameters(name, hparams, msg):
    with pytest.raises(ValueError, match=msg):
        balancers.create(name, tasks=["a", "b"], **hparams)


def test_bad_task_lists():
    with pytest.raises(ValueError, match="unique"):
        balancers.create("ew", tasks=["a", "a"])
    with pytest.raises(ValueError, match="at least one"):
        balancers.create("ew", tasks=[])
    with pytest.raises(TypeError, match="sequence of task names"):
        balancers.create("ew", tasks="ab")


def test_step_counter_stays_on_the_host_when_the_balancer_moves():
    b = balancers.create("rlw", tasks=["a", "b"])
    b.to("meta")  # any device move: the counter stays a CPU tensor, read without a sync
    assert b.step.device.type == "cpu" and b.step.dtype == torch.long
    b.to(torch.float64)
    assert b.step.dtype == torch.long


def test_dtp_derives_a_kpi_from_the_loss_for_tasks_without_one():
    """A task whose KPI is None (Task.kpi of a regression task) uses exp(-L / L_first): 1/e at
    its first step; the trainer names no method, each task supplies its own KPI."""
    b = DynamicTaskPrioritization(["a", "b"], gamma=1.0, alpha=0.5)
    w1 = step(b, [4.0, 1.0], kpi={"a": None, "b": 0.5}).weights
    k1 = math.exp(-1.0)
    assert close(w1, [-(1 - k1) * math.log(k1), -0.5 * math.log(0.5)])
    w2 = step(b, [2.0, 1.0], kpi={"a": None, "b": 0.5}).weights  # L / L_first = 1/2
    ka = 0.5 * math.exp(-0.5) + 0.5 * k1
    assert close(w2, [-(1 - ka) * math.log(ka), -0.5 * math.log(0.5)])
    from mtlkit.tasks import Task

    assert Task.regression("r").kpi(torch.zeros(2, 1), torch.ones(2, 1)) is None
    cls = Task.classification("c", num_classes=2)
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert cls.kpi(pred, torch.tensor([0, 0, 0])) == pytest.approx(2 / 3)
    assert cls.kpi(pred, torch.tensor([1, 0, 1])) == 1e-3  # clamped: DTP takes the log
