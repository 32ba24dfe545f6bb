"""Multilinear Relationship Networks: the tensor-normal penalty and its flip-flop updates,
checked against explicit Kronecker products on small layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlkit.nn import MRN


def _spd(n: int) -> torch.Tensor:
    a = torch.randn(n, n, dtype=torch.float64)
    return a @ a.T + n * torch.eye(n, dtype=torch.float64)


def _model(eps: float = 1e-5) -> MRN:
    return MRN(nn.Linear(3, 4), 4, {"a": 3, "b": 3, "c": 3}, hidden=(2,), eps=eps).double()


def test_penalty_matches_the_explicit_kronecker_quadratic_form() -> None:
    model = _model()
    with torch.no_grad():
        for i in range(2):
            for n in ("feature", "output", "task"):
                getattr(model, f"inv_{n}_{i}").copy_(_spd(getattr(model, f"inv_{n}_{i}").shape[0]))
    expected = 0.0
    for i in range(2):
        w = model.stacked_weights(i)  # (D1, D2, K); row-major vec: D1 slowest
        inv = [getattr(model, f"inv_{n}_{i}") for n in ("feature", "output", "task")]
        omega = torch.kron(torch.kron(inv[0], inv[1]), inv[2])
        v = w.reshape(-1)
        expected = expected + 0.5 * v @ omega @ v
    torch.testing.assert_close(model.regularizer(), expected)


def test_flip_flop_update_matches_the_paper_formulas() -> None:
    model = _model(eps=1e-3)
    with torch.no_grad():
        for n in ("feature", "output", "task"):
            cov = _spd(getattr(model, f"cov_{n}_1").shape[0])
            getattr(model, f"cov_{n}_1").copy_(cov)
            getattr(model, f"inv_{n}_1").copy_(torch.linalg.inv(cov))
    w = model.stacked_weights(1).detach()
    d1, d2, k = w.shape
    inv_out, inv_task = model.inv_output_1.clone(), model.inv_task_1.clone()
    eye = lambda n: torch.eye(n, dtype=torch.float64)
    inv = lambda m: torch.linalg.inv(m).contiguous()
    # Sigma_1 = W_(1) (Sigma_2 ⊗ Sigma_3)^-1 W_(1)^T / (D2 K) + eps I  (row-major unfoldings)
    w1 = w.reshape(d1, d2 * k)
    s1 = w1 @ torch.kron(inv_out, inv_task) @ w1.T / (d2 * k) + 1e-3 * eye(d1)
    w2 = w.permute(1, 0, 2).reshape(d2, d1 * k)  # uses the new Sigma_1
    s2 = w2 @ torch.kron(inv(s1), inv_task) @ w2.T / (d1 * k) + 1e-3 * eye(d2)
    w3 = w.permute(2, 0, 1).reshape(k, d1 * d2)  # uses the new Sigma_1 and Sigma_2
    s3 = w3 @ torch.kron(inv(s1), inv(s2)) @ w3.T / (d1 * d2)
    s3 = s3 + 1e-3 * eye(k)
    model.update_covariances()
    torch.testing.assert_close(model.cov_feature_1, s1)
    torch.testing.assert_close(model.cov_output_1, s2)
    torch.testing.assert_close(model.cov_task_1, s3)
    torch.testing.assert_close(model.inv_task_1, torch.linalg.inv(s3))


def test_penalty_right_after_an_exact_update_is_half_the_number_of_weights() -> None:
    # With eps = 0 the last factor is the ML estimate given the others, so
    # vec(W)^T Omega vec(W) = D1 D2 tr(Sigma_3^-1 Sigma_3) = D1 D2 K for every layer.
    model = _model(eps=0.0)
    model.update_covariances(iterations=3)
    n = sum(model.stacked_weights(i).numel() for i in range(2))
    torch.testing.assert_close(model.regularizer(), torch.tensor(0.5 * n, dtype=torch.float64))


def test_covariances_are_buffers_that_round_trip() -> None:
    model = _model()
    model.update_covariances()
    state = model.state_dict()
    assert {"cov_task_0", "inv_task_0", "cov_feature_1", "inv_output_1"} <= set(state)
    other = _model()
    other.load_state_dict(state)
    torch.testing.assert_close(other.regularizer(), model.regularizer())
    assert not any(n.startswith(("cov_", "inv_")) for n, _ in model.named_parameters())


def test_training_with_the_penalty_and_periodic_updates_stays_finite() -> None:
    torch.manual_seed(0)
    model = MRN(nn.Sequential(nn.Linear(5, 8), nn.ReLU()), 8, {"a": 2, "b": 2}, hidden=(4,))
    x, y = torch.randn(16, 5), torch.randn(16, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = None
    for step in range(20):
        out = model(x)
        data = sum(nn.functional.mse_loss(out[t], y) for t in model.tasks)
        first = data.item() if first is None else first
        loss = data + 1e-3 * model.regularizer()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 5 == 4:
            model.update_covariances()
    assert torch.isfinite(loss) and data.item() < first


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="same output size"):
        MRN(nn.Identity(), 4, {"a": 2, "b": 3})
    with pytest.raises(ValueError, match="eps"):
        MRN(nn.Identity(), 4, {"a": 2}, eps=-1.0)
    with pytest.raises(ValueError, match="iterations"):
        MRN(nn.Identity(), 4, {"a": 2}).update_covariances(iterations=0)


def test_bfloat16_model_keeps_working() -> None:
    model = MRN(nn.Linear(3, 4), 4, {"a": 2, "b": 2}).to(torch.bfloat16)
    out = model(torch.randn(2, 3, dtype=torch.bfloat16))
    assert out["a"].dtype == torch.bfloat16
    model.update_covariances()
    reg = model.regularizer()
    assert reg.dtype == torch.bfloat16 and torch.isfinite(reg)
