"""ESMM, AITM, the tabular embedding wrapper and the QM9 message-passing network."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mtlkit.nn import AITM, ESMM, MPNN, Embedded, MMoE, TabularEmbedding, binary_log_probs
from mtlkit.tasks import Task


def test_binary_log_probs_make_cross_entropy_the_binary_log_loss() -> None:
    p = torch.tensor([1e-9, 0.3, 0.5, 0.999999])
    logp = binary_log_probs(log_p=p.log())
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(4))
    y = torch.tensor([0, 1, 0, 1])
    ce = F.cross_entropy(logp, y)
    bce = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    torch.testing.assert_close(ce, bce)
    z = torch.tensor([-30.0, 0.0, 30.0])
    assert torch.isfinite(binary_log_probs(z)).all()


def test_esmm_ctcvr_is_ctr_times_cvr_and_its_loss_is_on_the_entire_space() -> None:
    torch.manual_seed(0)
    model = ESMM(5, ("ctr", "ctcvr"), hidden=(6,))
    x = torch.randn(7, 5)
    out = model(x)
    p_ctr = torch.sigmoid(model.ctr_tower(x)).flatten()
    p_cvr = torch.sigmoid(model.cvr_tower(x)).flatten()
    torch.testing.assert_close(out["ctcvr"][:, 1].exp(), p_ctr * p_cvr)
    torch.testing.assert_close(out["ctr"][:, 1].exp(), p_ctr)
    torch.testing.assert_close(model.cvr[:, 1].exp(), p_cvr)
    # the ctcvr loss is the log loss of pCTR * pCVR: hand formula
    y = torch.tensor([0, 1, 0, 0, 1, 0, 0])
    task = Task.classification("ctcvr", 2)
    q = p_ctr * p_cvr
    expected = -(y * q.log() + (1 - y) * (1 - q).log()).mean()
    torch.testing.assert_close(task.loss(out["ctcvr"], y), expected)
    # ownership: the CTR tower feeds both outputs (shared), the CVR tower only ctcvr
    shared = {id(p) for p in model.shared_parameters()}
    assert shared == {id(p) for p in model.ctr_tower.parameters()}
    assert {id(p) for p in model.task_parameters("ctcvr")} == {
        id(p) for p in model.cvr_tower.parameters()}
    assert not list(model.task_parameters("ctr"))
    g = torch.autograd.grad(out["ctr"].sum(), list(model.cvr_tower.parameters()),
                            allow_unused=True)
    assert all(v is None for v in g)  # pCTR does not depend on the CVR tower


def test_aitm_attention_and_calibrator_by_hand() -> None:
    torch.manual_seed(1)
    model = AITM(4, ["click", "buy"], hidden=(3,), dropout=0.0).eval()
    x = torch.randn(5, 4)
    out = model(x)
    q1 = model.towers["click"](x)
    q2 = model.towers["buy"](x)
    p1 = model.transfer["click"](q1)
    ait = model.ait["buy"]
    scores = torch.stack([(ait.h1(u) * ait.h2(u)).sum(1) for u in (q2, p1)], 1) / math.sqrt(3)
    w = scores.softmax(1)
    z2 = w[:, :1] * ait.h3(q2) + w[:, 1:] * ait.h3(p1)
    torch.testing.assert_close(out["buy"][:, 1].exp(), torch.sigmoid(model.out["buy"](z2)).flatten())
    y1, y2 = out["click"][:, 1].exp(), out["buy"][:, 1].exp()
    torch.testing.assert_close(model.calibration_loss(), 0.6 * (y2 - y1).clamp_min(0).mean())
    # click's tower feeds buy through the transfer: shared; buy's tower is buy's own
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in model.towers["click"].parameters()} <= shared
    assert {id(p) for p in model.transfer["click"].parameters()} <= shared
    assert {id(p) for p in model.towers["buy"].parameters()} <= {
        id(p) for p in model.task_parameters("buy")}


def test_embedded_model_shares_the_embedding_and_reads_codes() -> None:
    torch.manual_seed(2)
    emb = TabularEmbedding([3, 4], num_numeric=1, dim=2)
    model = Embedded(emb, MMoE(emb.out_features, {"a": 2, "b": 1}, num_experts=2,
                               expert_hidden=(4,)))
    x = torch.tensor([[0.0, 3.0, 0.7], [2.0, 1.0, -1.0]])
    e = emb(x)
    torch.testing.assert_close(e[0, :2], emb.tables[0].weight[0])  # OOV code 0
    torch.testing.assert_close(e[1, 2:4], emb.tables[1].weight[1])
    assert e[1, 4].item() == -1.0
    out = model(x)
    assert set(out) == {"a", "b"} and model.features is not None
    shared = {id(p) for p in model.shared_parameters()}
    assert {id(p) for p in emb.parameters()} <= shared
    with pytest.raises(ValueError, match=r"expects \(N, 3\) inputs"):
        emb(torch.zeros(2, 4))


def _molecule(n_slots: int, order: list[int]) -> torch.Tensor:
    """One 3-atom molecule in ``n_slots`` padded slots, atoms placed at ``order``."""
    g = torch.Generator().manual_seed(3)
    feats, pos = torch.rand(3, 11, generator=g), torch.randn(3, 3, generator=g)
    bonds = {(0, 1): 1, (1, 2): 2}
    x = torch.zeros(1, n_slots, 15 + n_slots)
    for atom, slot in enumerate(order):
        x[0, slot, :11], x[0, slot, 11:14], x[0, slot, 14] = feats[atom], pos[atom], 1.0
    for (a, b), t in bonds.items():
        x[0, order[a], 15 + order[b]] = x[0, order[b], 15 + order[a]] = t
    return x


def test_mpnn_ignores_atom_order_and_padding() -> None:
    torch.manual_seed(4)
    model = MPNN(["mu", "alpha"], dim=8)
    ref = model(_molecule(3, [0, 1, 2]))
    for n_slots, order in ((3, [2, 0, 1]), (6, [4, 1, 3])):
        out = model(_molecule(n_slots, order))
        for t in ("mu", "alpha"):
            torch.testing.assert_close(out[t], ref[t], atol=1e-5, rtol=1e-5)
    two = model(torch.cat([_molecule(5, [0, 1, 2]), _molecule(5, [3, 4, 0])]))
    torch.testing.assert_close(two["mu"], ref["mu"].expand(2, 1), atol=1e-5, rtol=1e-5)
