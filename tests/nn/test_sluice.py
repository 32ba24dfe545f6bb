"""Sluice networks: subspace mixing, beta layer combination, orthogonality penalty."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlkit.nn import Sluice


def _layers() -> list:
    return [lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh()), lambda: nn.Linear(4, 4)]


def _heads() -> dict[str, nn.Module]:
    return {"a": nn.Linear(4, 1), "b": nn.Linear(4, 2)}


def test_identity_alphas_give_independent_columns_with_beta_skip_connections() -> None:
    model = Sluice(["a", "b"], _layers(), _heads(), alpha_init=(1.0, 0.0), beta_init="imbalanced")
    torch.testing.assert_close(model.betas["a"].data, torch.tensor([0.1, 0.9]))
    x = torch.randn(5, 3)
    out = model(x)
    for t in model.tasks:
        h1 = model.columns[t][0](x)
        h2 = model.columns[t][1](h1)
        expected = model.heads[t](0.1 * h1 + 0.9 * h2)
        torch.testing.assert_close(out[t], expected)


def test_alpha_mixes_subspaces_across_tasks() -> None:
    model = Sluice(["a", "b"], [lambda: nn.Linear(3, 4)], _heads(), alpha_init=(1.0, 0.0))
    # Rows/columns index (task, subspace): a0, a1, b0, b1. Swap a1 and b0.
    perm = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])
    with torch.no_grad():
        model.alphas[0].copy_(perm)
    x = torch.randn(2, 3)
    model(x)
    ha, hb = model.columns["a"][0](x), model.columns["b"][0](x)
    # features: (tasks, layers, batch, channels), before the beta combination.
    torch.testing.assert_close(model.features[0, 0], torch.cat([ha[:, :2], hb[:, :2]], 1))
    torch.testing.assert_close(model.features[1, 0], torch.cat([ha[:, 2:], hb[:, 2:]], 1))


def test_default_alpha_init_and_its_size() -> None:
    model = Sluice(["a", "b", "c"], _layers(), {t: nn.Linear(4, 1) for t in "abc"})
    alpha = model.alphas[0]
    assert alpha.shape == (6, 6)
    torch.testing.assert_close(alpha.diagonal(), torch.full((6,), 0.9))
    torch.testing.assert_close(alpha.sum(1), torch.ones(6))
    torch.testing.assert_close(model.betas["c"].data, torch.full((2,), 0.5))


def test_orthogonality_penalty_by_hand() -> None:
    model = Sluice(["a", "b"], [lambda: nn.Linear(3, 4)], _heads())
    expected = 0.0
    for t in model.tasks:
        w = model.columns[t][0].weight
        expected = expected + (w[:2] @ w[2:].T).pow(2).sum()
    torch.testing.assert_close(model.regularizer(), expected)
    with torch.no_grad():  # orthogonal subspace blocks: no penalty
        for t in model.tasks:
            model.columns[t][0].weight.copy_(torch.eye(4, 3))
    assert model.regularizer().item() == 0.0


def test_bad_configurations_are_rejected() -> None:
    with pytest.raises(ValueError, match="heads"):
        Sluice(["a", "b"], _layers(), {"a": nn.Linear(4, 1)})
    with pytest.raises(ValueError, match="num_subspaces"):
        Sluice(["a", "b"], _layers(), _heads(), num_subspaces=0)
    with pytest.raises(ValueError, match="beta_init"):
        Sluice(["a", "b"], _layers(), _heads(), beta_init="random")  # type: ignore[arg-type]
    model = Sluice(["a", "b"], _layers(), _heads(), num_subspaces=3)
    with pytest.raises(ValueError, match="not divisible by num_subspaces=3"):
        model(torch.randn(2, 3))
    model = Sluice(["a", "b"], [lambda: nn.Linear(3, 4), lambda: nn.Linear(4, 2)], _heads())
    with pytest.raises(ValueError, match="equal layer output shapes"):
        model(torch.randn(2, 3))


def test_betas_get_their_own_gradient_from_a_gradient_balancer() -> None:
    # Regression: features used to be taken after the beta combination, so a balancer that
    # splits the backward at the features never gave the (task-specific) betas a gradient.
    from mtlkit.balancers import create

    model = Sluice(["a", "b"], _layers(), _heads())
    x = torch.randn(5, 3)
    for grad_on in ("parameters", "features"):
        model.zero_grad()
        out = model(x)
        losses = {t: out[t].pow(2).mean() for t in model.tasks}
        expected = {
            t: torch.autograd.grad(losses[t], model.betas[t], retain_graph=True)[0]
            for t in model.tasks
        }
        balancer = create("mgda", tasks=list(model.tasks), grad_on=grad_on)
        balancer.backward(losses, shared=model.shared_parameters(), features=model.features)
        for t in model.tasks:
            torch.testing.assert_close(model.betas[t].grad, expected[t])
