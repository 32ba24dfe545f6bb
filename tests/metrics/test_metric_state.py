"""Metric state: exact merge of shards, sync through (fake and real) collectives, reset, load."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mtlkit.metrics import (
    AUC,
    F1,
    MAE,
    RMSE,
    AbsErr,
    Accuracy,
    MeanIoU,
    Metric,
    NormalAngleMean,
    NormalAngleMedian,
    NormalWithin,
    PixelAccuracy,
    RelErr,
)

N = 23


def _data(kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random (pred, target, mask) of N samples for a metric family."""
    mask = torch.rand(N, generator=g) > 0.25
    if kind == "class":
        return torch.randn(N, 4, generator=g), torch.randint(0, 4, (N,), generator=g), mask
    if kind == "binary":
        return torch.randn(N, generator=g), torch.randint(0, 2, (N,), generator=g), mask
    if kind == "multilabel":
        return torch.randn(N, 3, generator=g), torch.randint(0, 2, (N, 3), generator=g), mask
    if kind == "regression":
        return torch.randn(N, 1, generator=g), torch.randn(N, generator=g), mask
    if kind == "seg":
        target = torch.randint(-1, 3, (N, 4, 5), generator=g)
        return torch.randn(N, 3, 4, 5, generator=g), target, mask
    if kind == "depth":
        target = (
            torch.rand(N, 1, 4, 5, generator=g) * 5 * (torch.rand(N, 1, 4, 5, generator=g) > 0.2)
        )
        return torch.rand(N, 1, 4, 5, generator=g) * 5, target, mask
    target = torch.randn(N, 3, 4, 5, generator=g) * (torch.rand(N, 1, 4, 5, generator=g) > 0.2)
    return torch.randn(N, 3, 4, 5, generator=g), target, mask


CASES: list[tuple[str, Callable[[], Metric]]] = [
    ("class", Accuracy),
    ("class", lambda: F1(4)),
    ("binary", F1),
    ("binary", AUC),
    ("multilabel", lambda: Accuracy(num_labels=3)),
    ("multilabel", lambda: F1(num_labels=3)),
    ("multilabel", lambda: AUC(num_labels=3)),
    ("regression", MAE),
    ("regression", RMSE),
    ("seg", lambda: MeanIoU(3)),
    ("seg", lambda: PixelAccuracy(3)),
    ("depth", AbsErr),
    ("depth", RelErr),
    ("normals", NormalAngleMean),
    ("normals", NormalAngleMedian),
    ("normals", lambda: NormalAngleMedian(bins=1000)),
    ("normals", lambda: NormalWithin(22.5)),
]
IDS = [f"{kind}-{make()!r}" for kind, make in CASES]
SHARDS = [(0, 3), (3, 4), (4, 15), (15, N)]  # uneven, one of a single sample


@pytest.mark.parametrize(("kind", "make"), CASES, ids=IDS)
def test_merged_shards_equal_one_pass(kind: str, make: Callable[[], Metric]) -> None:
    pred, target, mask = _data(kind, torch.Generator().manual_seed(7))
    whole = make()
    whole.update(pred, target, mask)
    parts = []
    for a, b in SHARDS:
        m = make()
        m.update(pred[a:b], target[a:b], mask[a:b])
        parts.append(m)
    merged = parts[0].clone()
    for p in parts[1:]:
        merged.merge(p)
    assert merged.compute() == pytest.approx(whole.compute(), rel=1e-6, abs=1e-9)
    # the same through state dicts, as a rank would send them
    again = make()
    for p in parts:
        again.merge(p.state())
    assert again.compute() == pytest.approx(whole.compute(), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize(("kind", "make"), CASES, ids=IDS)
def test_sync_with_fake_collectives(kind: str, make: Callable[[], Metric]) -> None:
    """Rank 0 syncs with a fake group whose other rank holds the rest of the data."""
    pred, target, mask = _data(kind, torch.Generator().manual_seed(11))
    whole = make()
    whole.update(pred, target, mask)
    rank0, rank1 = make(), make()
    rank0.update(pred[:5], target[:5], mask[:5])
    rank1.update(pred[5:], target[5:], mask[5:])
    other = iter(rank1.state().values())  # same registration order as rank 0's collectives
    rank0.sync(lambda x: x + next(other), lambda x: [x, next(other)])
    assert rank0.compute() == pytest.approx(whole.compute(), rel=1e-6, abs=1e-9)


def test_reset_load_state_and_errors() -> None:
    m = MAE()
    m.update(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]))
    saved = m.state()
    assert saved["total"].item() == 4.0 and saved["count"].item() == 2
    m.reset()
    assert math.isnan(m.compute()) and m.num_updates == 0
    m.load_state(saved)
    assert m.compute() == 2.0
    with pytest.raises(ValueError, match="cannot merge a RMSE into a MAE"):
        m.merge(RMSE())
    with pytest.raises(ValueError, match="state keys"):
        m.load_state({"total": torch.zeros(())})
    with pytest.raises(ValueError, match=r"state\['confmat'\] has shape"):
        MeanIoU(3).merge({"confmat": torch.zeros(2, 2, dtype=torch.long)})
    with pytest.raises(ValueError, match="needs gather_fn"):
        AUC().sync(lambda x: x)


def test_update_does_not_track_gradients() -> None:
    pred = torch.tensor([[1.0, 2.0]], requires_grad=True)
    m = Accuracy()
    m.update(pred, torch.tensor([1]))
    assert all(not v.requires_grad for v in m.state().values())


# ---------------------------------------------------------------- real torch.distributed
def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(5)
        pred = torch.randn(11, generator=g)
        target = torch.randint(0, 2, (11,), generator=g)
        bounds = [(0, 3), (3, 11)][rank]  # uneven shards
        results = {}
        for name, metric in (("auc", AUC()), ("mae", MAE()), ("median", NormalAngleMedian())):
            if name == "median":
                p = torch.randn(11, 3, generator=torch.Generator().manual_seed(6))
                tt = torch.randn(11, 3, generator=torch.Generator().manual_seed(8))
                metric.update(p[slice(*bounds)], tt[slice(*bounds)])
            else:
                x = pred if name == "auc" else pred.float()
                y = target if name == "auc" else target.float()
                metric.update(x[slice(*bounds)], y[slice(*bounds)])
            metric.sync_distributed()
            results[name] = metric.compute()
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous")
def test_sync_distributed_two_gloo_ranks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the two child processes only
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(11, generator=g)
    target = torch.randint(0, 2, (11,), generator=g)
    ref_auc, ref_mae = AUC(), MAE()
    ref_auc.update(pred, target)
    ref_mae.update(pred, target.float())
    ref_med = NormalAngleMedian()
    ref_med.update(
        torch.randn(11, 3, generator=torch.Generator().manual_seed(6)),
        torch.randn(11, 3, generator=torch.Generator().manual_seed(8)),
    )
    for r in (r0, r1):
        assert r["auc"] == pytest.approx(ref_auc.compute(), abs=1e-12)
        assert r["mae"] == pytest.approx(ref_mae.compute(), abs=1e-12)
        assert r["median"] == pytest.approx(ref_med.compute(), abs=1e-9)
