"""Task cascades: dependency order, the stop-gradient, the partition it implies."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlkit.nn import Cascade


def _model(detach: bool) -> Cascade:
    heads = {"b": nn.Linear(4 + 2, 1), "a": nn.Linear(4, 2)}  # b listed first on purpose
    return Cascade(nn.Linear(3, 4), heads, depends_on={"b": ["a"]}, detach=detach)


def _grad_norm(loss: torch.Tensor, module: nn.Module) -> float:
    grads = torch.autograd.grad(
        loss, list(module.parameters()), allow_unused=True, retain_graph=True
    )
    return sum(0.0 if g is None else g.abs().sum().item() for g in grads)


def test_detach_stops_the_downstream_gradient_at_the_upstream_prediction() -> None:
    model = _model(detach=True)
    out = model(torch.randn(5, 3))
    loss_b = out["b"].pow(2).mean()
    assert _grad_norm(loss_b, model.heads["a"]) == 0.0
    assert _grad_norm(loss_b, model.encoder) > 0  # through the features, not through a
    assert _grad_norm(loss_b, model.heads["b"]) > 0


def test_without_detach_the_downstream_loss_trains_the_upstream_head() -> None:
    model = _model(detach=False)
    out = model(torch.randn(5, 3))
    assert _grad_norm(out["b"].pow(2).mean(), model.heads["a"]) > 0
    # a's head now serves a and b: it is shared, and features packs the encoder output (4)
    # with a's prediction (2), which b's head and a's output read.
    assert list(model.task_parameters("a")) == []
    shared = {id(p) for p in model.shared_parameters()}
    assert all(id(p) in shared for p in model.heads["a"].parameters())
    assert model.features.shape == (5, 6)
    torch.testing.assert_close(out["a"], model.features[:, 4:])
    torch.testing.assert_close(out["b"], model.heads["b"](model.features))


def test_downstream_head_reads_features_and_upstream_prediction() -> None:
    seen = {}

    def combine(features: torch.Tensor, preds: list[torch.Tensor]) -> torch.Tensor:
        seen["features"], seen["preds"] = features, preds
        return torch.cat([features, *preds], dim=1)

    heads = {"a": nn.Linear(4, 2), "b": nn.Linear(6, 1)}
    model = Cascade(nn.Linear(3, 4), heads, depends_on={"b": ["a"]}, combine=combine)
    out = model(torch.randn(5, 3))
    assert list(out) == ["a", "b"] and model.order == ("a", "b")
    torch.testing.assert_close(seen["preds"][0], out["a"].detach())
    assert seen["preds"][0].grad_fn is None
    assert seen["features"] is model.features


@pytest.mark.parametrize(
    ("depends_on", "error", "match"),
    [
        ({"a": ["b"], "b": ["a"]}, ValueError, "cycle"),
        ({"a": ["a"]}, ValueError, "itself"),
        ({"a": ["zzz"]}, ValueError, "'zzz'"),
        ({"zzz": ["a"]}, ValueError, "'zzz'"),
        ({"b": "a"}, TypeError, "sequence"),
    ],
)
def test_bad_dependencies_are_rejected(depends_on, error: type[Exception], match: str) -> None:
    heads = {"a": nn.Linear(4, 1), "b": nn.Linear(5, 1)}
    with pytest.raises(error, match=match):
        Cascade(nn.Linear(3, 4), heads, depends_on=depends_on)


def test_a_head_reused_by_two_tasks_is_rejected() -> None:
    head = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="share a parameter"):
        Cascade(nn.Linear(3, 4), {"a": head, "b": head}, depends_on={})
