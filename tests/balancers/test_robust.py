"""Krum and the coordinate-wise trimmed mean: the selection and the trimming checked against a
brute-force computation on the Jacobian, robustness to an arbitrary row, hard inputs, and
agreement with TorchJD (skipped without torchjd)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _hard import F32, hard_jacobians
from _inputs import degenerate_jacobians, random_jacobian, run

from mtlkit.balancers._robust import Krum, TrimmedMean, krum_scores

F64 = torch.float64


def names(k: int) -> list[str]:
    return [f"t{i}" for i in range(k)]


def brute_krum_scores(jac: torch.Tensor, f: int) -> np.ndarray:
    """The paper's score from the rows themselves: squared distances to the K - f - 2 nearest."""
    x = jac.double().numpy()
    k = x.shape[0]
    out = []
    for i in range(k):
        d = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(k) if j != i)
        out.append(sum(d[: k - f - 2]))
    return np.array(out)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("k", "f", "m"), [(3, 0, 1), (5, 1, 1), (6, 1, 3), (7, 2, 2)])
def test_krum_selects_the_lowest_scores(k, f, m, seed):
    jac = random_jacobian(k, 4, seed=seed) * torch.logspace(-1, 1, k, dtype=F64)[:, None]
    d, step = run(Krum(names(k), n_byzantine=f, n_selected=m), jac, dtype=F64)
    scores = brute_krum_scores(jac, f)
    np.testing.assert_allclose(krum_scores(jac @ jac.T, f).numpy(), scores, rtol=1e-10)
    chosen = np.argsort(scores, kind="stable")[:m]
    expected = torch.zeros(k, dtype=F64)
    expected[chosen] = 1.0 / m
    torch.testing.assert_close(step.weight_tensor, expected)
    torch.testing.assert_close(d, expected @ jac)


def test_krum_ignores_arbitrary_gradients():
    """f arbitrary rows (huge, or aligned with each other far away) are never selected when
    K > 2f + 2 honest-majority rows cluster."""
    for seed in range(5):
        honest = 1.0 + 0.1 * random_jacobian(5, 6, seed=seed)
        for bad in (1e6 * torch.ones(2, 6, dtype=F64), -3.0 * honest[:2]):
            jac = torch.cat([honest, bad])
            _, step = run(Krum(names(7), n_byzantine=2), jac, dtype=F64)
            assert float(step.weight_tensor[5:].sum()) == 0.0


def test_krum_hard_inputs():
    for case, jac in hard_jacobians(3, 6, 2).items():
        k = jac.shape[0]
        d, step = run(Krum(names(k)), jac, dtype=F32)
        assert torch.isfinite(d).all() and float(step.weight_tensor.sum()) == 1.0, case
        if case == "identical":  # ties: the first task
            assert step.weights["t0"] == 1.0


def test_krum_agrees_with_torchjd_where_its_distance_choice_does_too():
    """TorchJD scores by distances, the paper (and mtlkit) by squared distances: on every
    Jacobian where both scores pick the same row, TorchJD's weights are ours."""
    agg = pytest.importorskip("torchjd.aggregation")
    agreed = 0
    for seed in range(12):
        k, f = 5 + seed % 3, 1
        jac = random_jacobian(k, 4, seed=seed)
        x = jac.numpy()
        dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        plain = [np.sort(np.delete(dist[i], i))[: k - f - 2].sum() for i in range(k)]
        _, step = run(Krum(names(k), n_byzantine=f), jac, dtype=F64)
        if int(np.argmin(plain)) == int(step.weight_tensor.argmax()):
            agreed += 1
            ref = agg.KrumWeighting(n_byzantine=f)(jac @ jac.T)
            torch.testing.assert_close(step.weight_tensor, ref)
    assert agreed >= 8


def brute_trimmed_mean(jac: torch.Tensor, b: int) -> torch.Tensor:
    x = np.sort(jac.double().numpy(), axis=0)
    return torch.from_numpy(x[b: x.shape[0] - b].mean(0))


@pytest.mark.parametrize(("k", "b"), [(3, 1), (5, 1), (5, 2), (4, 0)])
def test_trimmed_mean_is_the_coordinatewise_trimmed_mean(k, b):
    for case, jac in hard_jacobians(k, 8, k).items():
        if case == "k_gt_dim":
            k2 = jac.shape[0]
            d, step = run(TrimmedMean(names(k2), trim_number=b), jac, dtype=F64)
        else:
            d, step = run(TrimmedMean(names(k), trim_number=b), jac, dtype=F64)
        torch.testing.assert_close(d, brute_trimmed_mean(jac, b), rtol=1e-12, atol=1e-12)
        assert float(step.weight_tensor.sum()) == pytest.approx(1.0)
        assert bool((step.weight_tensor >= 0).all())


def test_trimmed_mean_stays_in_the_range_of_the_honest_rows():
    """With trim_number = b, b arbitrary rows cannot push a coordinate outside the range of the
    honest rows (float32 model, rows of scales 1e-4..1e4 and two rows at +-1e12)."""
    honest = hard_jacobians(4, 6, 5)["scales_1e-4_1e4"]
    for bad in (torch.full((2, 6), 1e12, dtype=F64), torch.tensor([[1e12] * 6, [-1e12] * 6])):
        jac = torch.cat([honest, bad.to(F64)])
        d, _ = run(TrimmedMean(names(6), trim_number=2), jac, dtype=F32)
        lo, hi = honest.min(0).values, honest.max(0).values
        assert bool(((d.double() >= lo * (1 + 1e-6) - 1e-6) & (d.double() <= hi * (1 + 1e-6) + 1e-6)).all())


def test_trimmed_mean_agrees_with_torchjd():
    agg = pytest.importorskip("torchjd.aggregation")
    for seed in range(5):
        k = 3 + seed
        jac = random_jacobian(k, 9, seed=seed)
        b = (k - 1) // 2
        d, _ = run(TrimmedMean(names(k), trim_number=b), jac, dtype=F64)
        torch.testing.assert_close(d, agg.TrimmedMean(trim_number=b)(jac))


@pytest.mark.parametrize("name", ["krum", "trimmed_mean"])
def test_degenerate_inputs_with_three_tasks(name):
    """The contract's degenerate cases at K = 3 (the contract test skips these rules, which
    are not defined for K = 1, 2): finite; zero -> 0; identical rows g -> g."""
    cls = {"krum": Krum, "trimmed_mean": TrimmedMean}[name]
    for case, jac in degenerate_jacobians(3).items():
        if case == "single_task":
            continue
        b = cls(names(3))
        for _ in range(2):
            d, step = run(b, jac, dtype=F32)
            assert torch.isfinite(d).all() and torch.isfinite(step.weight_tensor).all(), case
        if case == "zero":
            assert bool((d == 0).all())
        if case == "identical":
            torch.testing.assert_close(d.double(), jac[0], rtol=1e-6, atol=0)


def test_validation():
    with pytest.raises(ValueError, match="needs at least 4 tasks"):
        Krum(["a", "b", "c"], n_byzantine=1)
    with pytest.raises(ValueError, match="n_selected"):
        Krum(["a", "b", "c"], n_selected=4)
    with pytest.raises(ValueError, match="more than 2 tasks"):
        TrimmedMean(["a", "b"])
    with pytest.raises(ValueError, match="trim_number"):
        TrimmedMean(["a", "b", "c"], trim_number=-1)
