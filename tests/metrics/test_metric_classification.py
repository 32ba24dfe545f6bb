"""Accuracy, F1 and AUC against values worked out by hand (and scikit-learn on random data)."""

from __future__ import annotations

import math
import os

import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from mtlkit.metrics import AUC, F1, Accuracy

DEVICE = torch.device(os.environ.get("MTLKIT_TEST_DEVICE", "cpu"))


def t(values, dtype=None):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------- accuracy
def test_accuracy_multiclass_uneven_batches_is_pooled_not_mean_of_means():
    logits = t([[3.0, 1, 0], [0, 2, 1], [0, 0, 5], [4, 0, 0], [0, 1, 0]])  # argmax 0 1 2 0 1
    target = t([0, 1, 0, 1, 2])  # right: samples 0 and 1 only
    m = Accuracy()
    m.update(logits[:2], target[:2])  # batch accuracy 2/2
    m.update(logits[2:], target[2:])  # batch accuracy 0/3
    assert m.compute() == pytest.approx(2 / 5)  # the mean of batch means would be 0.5


def test_accuracy_binary_logits_probabilities_and_labels():
    target = t([1, 0, 1, 0])
    logits = t([0.5, -0.2, -1.0, 0.1])  # > 0: 1 0 0 1 -> 2 right
    m = Accuracy()
    m.update(logits, target)
    assert m.compute() == pytest.approx(0.5)
    p = Accuracy(threshold=0.5)
    p.update(t([0.9, 0.4, 0.6, 0.2]), target)  # 1 0 1 0 -> 4 right
    assert p.compute() == 1.0
    single = Accuracy()
    single.update(t([[0.5], [-0.2], [-1.0], [0.1]]), target)  # (N, 1) logit column
    assert single.compute() == pytest.approx(0.5)
    labels = Accuracy()
    labels.update(t([1, 1, 1, 0]), target)
    assert labels.compute() == pytest.approx(0.75)


def test_accuracy_mask_excludes_samples():
    logits = t([[1.0, 0], [1.0, 0], [0, 1.0]])  # predicts 0 0 1
    target = t([0, 1, 1])
    m = Accuracy()
    m.update(logits, target, mask=t([True, False, True]))
    assert m.compute() == 1.0
    # the masked sample may carry an invalid label (e.g. -1 for "missing")
    m2 = Accuracy()
    m2.update(logits, t([0, -1, 1]), mask=t([True, False, True]))
    assert m2.compute() == 1.0


def test_accuracy_multilabel_averages_per_attribute():
    pred = t([[2.0, 1.0], [1.0, -1.0], [-1.0, 1.0]])  # -> [[1,1],[1,0],[0,1]]
    target = t([[1, 0], [1, 1], [0, 0]])
    mask = t([[True, True], [True, False], [True, False]])
    m = Accuracy(num_labels=2)
    m.update(pred, target, mask)
    # attribute 0: 3 labelled, 3 right -> 1.0; attribute 1: 1 labelled, 0 right -> 0.0
    assert m.compute() == pytest.approx(0.5)  # pooled would give 3/4


def test_accuracy_rejects_bad_labels_and_shapes():
    with pytest.raises(ValueError, match="target holds label 3"):
        Accuracy().update(t([[1.0, 0, 0]]), t([3]))
    with pytest.raises(ValueError, match="pred has shape"):
        Accuracy().update(t([[1.0, 0, 0], [0, 1, 0]]), t([[0, 1], [1, 0]]))
    with pytest.raises(ValueError, match="2 samples"):
        Accuracy().update(t([[1.0, 0], [0, 1]]), t([1]))
    with pytest.raises(ValueError, match="num_labels"):
        Accuracy(num_labels=0)
    with pytest.raises(ValueError, match="mask must be a bool"):
        Accuracy().update(t([1.0]), t([1]), mask=t([0.5]))


# ---------------------------------------------------------------- F1
def test_f1_binary_by_hand():
    pred = t([1, 1, 0, 1, 0, 0])
    target = t([1, 0, 1, 1, 0, 1])
    m = F1()
    m.update(pred[:4], target[:4])
    m.update(pred[4:], target[4:])
    # TP = 2 (0, 3), FP = 1 (1), FN = 2 (2, 5): 2*2 / (2*2 + 1 + 2)
    assert m.compute() == pytest.approx(4 / 7)


def test_f1_binary_from_two_logits_and_from_one_logit_agree():
    logits2 = t([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.5]])  # -> 1 0 1 0
    target = t([1, 1, 0, 0])
    a, b = F1(), F1()
    a.update(logits2, target)
    b.update(logits2[:, 1] - logits2[:, 0], target)
    # TP = 1, FP = 1, FN = 1
    assert a.compute() == pytest.approx(0.5) == b.compute()


def test_f1_macro_by_hand_and_absent_class_left_out():
    target = t([0, 0, 1, 1, 2, 2])
    pred = t([0, 1, 1, 1, 2, 0])
    # class 0: TP1 FP1 FN1 -> 0.5; class 1: TP2 FP1 FN0 -> 0.8; class 2: TP1 FP0 FN1 -> 2/3
    expected = (0.5 + 0.8 + 2 / 3) / 3
    m3 = F1(3)
    m3.update(pred, target)
    assert m3.compute() == pytest.approx(expected)
    m4 = F1(4)  # class 3 never appears in targets nor predictions
    m4.update(pred, target)
    assert m4.compute() == pytest.approx(expected)


def test_f1_macro_matches_sklearn_on_uneven_batches():
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 5, (203,), generator=g)
    logits = torch.randn(203, 5, generator=g) + 1.5 * torch.nn.functional.one_hot(target, 5)
    m = F1(5)
    for a, b in ((0, 17), (17, 100), (100, 203)):
        m.update(logits[a:b].to(DEVICE), target[a:b].to(DEVICE))
    ref = f1_score(target.numpy(), logits.argmax(1).numpy(), average="macro")
    assert m.compute() == pytest.approx(ref, abs=1e-12)


def test_f1_multilabel_per_attribute_with_mask():
    pred = t([[1, 1], [1, 0], [0, 1], [0, 0]])
    target = t([[1, 0], [0, 1], [1, 1], [0, 0]])
    mask = t([[True, True], [True, True], [True, False], [True, True]])
    m = F1(num_labels=2)
    m.update(pred, target, mask)
    # attr 0: TP1 (row 0) FP1 (row 1) FN1 (row 2) -> 0.5; attr 1: TP0 FP1 (row 0) FN1 (row 1) -> 0
    assert m.compute() == pytest.approx(0.25)


def test_f1_undefined_is_nan():
    m = F1()
    m.update(t([0, 0]), t([0, 0]))  # no positive target nor prediction
    assert math.isnan(m.compute())


# ---------------------------------------------------------------- AUC
def test_auc_by_hand_with_ties():
    scores = t([0.1, 0.4, 0.4, 0.8])
    target = t([0, 0, 1, 1])
    m = AUC()
    m.update(scores, target)
    # positive 0.4 beats 0.1 (1) and ties 0.4 (1/2); positive 0.8 beats both (2): 3.5 / 4
    assert m.compute() == pytest.approx(0.875)


def test_auc_matches_sklearn_over_uneven_batches_and_mask():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 2, (301,), generator=g)
    scores = (torch.randn(301, generator=g) + target).mul(4).round() / 4  # many ties
    mask = torch.rand(301, generator=g) > 0.2
    m = AUC()
    for a, b in ((0, 1), (1, 120), (120, 301)):
        m.update(scores[a:b].to(DEVICE), target[a:b].to(DEVICE), mask[a:b].to(DEVICE))
    ref = roc_auc_score(target[mask].numpy(), scores[mask].numpy())
    assert m.compute() == pytest.approx(ref, abs=1e-12)


def test_auc_two_column_logits_rank_like_softmax():
    logits = t([[0.0, 1.0], [1.0, 0.0], [0.3, 0.2], [2.0, 2.5]])
    target = t([1, 0, 0, 1])
    a, b = AUC(), AUC()
    a.update(logits, target)
    b.update(torch.softmax(logits, 1)[:, 1], target)
    assert a.compute() == b.compute() == 1.0


def test_auc_multilabel_skips_single_class_attribute():
    pred = t([[0.9, 0.1, 0.3], [0.2, 0.8, 0.6], [0.7, 0.3, 0.1]])
    target = t([[1, 0, 1], [0, 1, 1], [1, 1, 1]])  # attribute 2 has only positives
    m = AUC(num_labels=3)
    m.update(pred, target)
    # attr 0: both positives (0.9, 0.7) beat 0.2 -> 1; attr 1: positives 0.8, 0.3 vs 0.1 -> 1
    assert m.compute() == pytest.approx(1.0)
    m2 = AUC(num_labels=3)
    m2.update(pred, t([[0, 0, 1], [1, 1, 1], [0, 1, 1]]))  # attr 0: 0.2 below both -> 0
    assert m2.compute() == pytest.approx(0.5)  # (0 + 1) / 2


def test_auc_state_keeps_the_scores():
    m = AUC()
    m.update(t([0.1, 0.2]), t([0, 1]))
    m.update(t([0.3]), t([1]))
    assert m.state()["scores"].shape == (3, 1)
