"""Eval metrics against hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest

from jobs.evaluate import metrics as M


def test_topk_and_mean_per_class_recall_by_hand():
    logits = np.array([[3, 2, 1, 0, -1, -2],   # label 0: top-1 right
                       [0, 3, 2, 1, -1, -2],   # label 2: second -> top-5 only
                       [5, 4, 3, 2, 1, 0],     # label 5: sixth -> wrong even at top-5
                       [0, 0.5, 1, 2, 3, 4]],  # label 5: top-1 right
                      dtype=np.float64)
    target = np.array([0, 2, 5, 5])
    m = M.classification_metrics(logits, target, n_classes=6)
    assert m["acc1"] == 0.5 and m["acc5"] == 0.75
    # recall: class 0 -> 1/1, class 2 -> 0/1, class 5 -> 1/2; mean over classes present = 0.5
    assert m["mean_per_class_recall"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert M.classification_metrics(logits[:, :4], np.array([0, 2, 1, 3]), n_classes=4)["acc5"] is None


def test_worst_group_accuracy_fmow_geode_by_hand():
    pred = np.array([1, 1, 2, 0, 0, 3, 3, 3])
    target = np.array([1, 0, 2, 0, 1, 3, 3, 0])
    region = np.array([0, 0, 1, 1, 1, 4, 4, 4])
    # region 0: 1/2, region 1: 2/3, region 4: 2/3 -> worst 0.5 (regions 2, 3 have no samples)
    assert M.worst_group_accuracy(pred, target, region) == 0.5
    out = M.group_metrics(pred == target, region, "acc")
    assert out["acc_avg"] == 5 / 8 and out["count_group:1"] == 3 and out["acc_group:4"] == pytest.approx(2 / 3)
    assert M.worst_group_accuracy(pred, target, region, exclude=(0,)) == pytest.approx(2 / 3)


def test_dollar_street_worst_income_group_top5_by_hand():
    top5 = np.array([[1, 2, 3, 4, 5], [0, 2, 3, 4, 5], [9, 8, 7, 6, 5], [1, 0, 0, 0, 0]])
    target = np.array([5, 1, 5, 1])
    income = np.array([0, 0, 1, 1])
    # income 0: hit, miss -> 0.5; income 1: hit, hit -> 1.0
    assert M.worst_group_topk_accuracy(top5, target, income) == 0.5


def test_iwildcam_macro_f1_by_hand():
    target = np.array([0, 0, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 3])  # class 3 is predicted but absent from the labels
    # class 0: P=1, R=1/2 -> F1 2/3; class 1: P=2/3, R=1 -> F1 4/5; class 2: 0. Mean over labels present.
    assert M.macro_f1(target, pred) == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)


def test_winogavil_jaccard_by_hand():
    y_true = np.array([True, True, False, False, True])
    sims = np.array([0.9, 0.1, 0.8, 0.2, 0.7])
    y_pred = M.winogavil_prediction(sims, n_associations=3)  # picks 0, 2, 4
    assert y_pred.tolist() == [True, False, True, False, True]
    assert M.jaccard(y_true, y_pred) == 2 / 4  # {0, 4} over {0, 1, 2, 4}
    m = M.winogavil_metrics([0.5, 1.0, 0.25, 0.75], [5, 6, 10, 12])
    assert m["jaccard_score_10-12"] == 0.5 and m["jaccard_score_5-6"] == 0.75 and m["avg_jaccard_score"] == 0.625


def test_retrieval_recall_by_hand():
    # 3 images, 4 texts (image 0 has two captions)
    scores = np.array([[0.9, 0.1, 0.0],   # text 0 -> image 0: right
                       [0.2, 0.8, 0.1],   # text 1 -> image 0: wrong at 1, right at 2
                       [0.1, 0.7, 0.3],   # text 2 -> image 1: right
                       [0.5, 0.6, 0.4]])  # text 3 -> image 2: wrong at 1 and 2
    m = M.retrieval_recall(scores, np.array([0, 0, 1, 2]), ks=(1, 2))
    assert m["image_retrieval_recall@1"] == 0.5 and m["image_retrieval_recall@2"] == 0.75
    # images: 0's best text is 0 (yes); 1's best is 1 (no: text 1 is image 0's); 2's best is 3 (yes)
    assert m["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert m["mean_recall@1"] == pytest.approx(0.5 * (0.5 + 2 / 3))


def test_declared_metric_names_are_what_each_path_returns():
    """The names an extra task's main_metric is checked against (before anything is
    queued) must be exactly the keys the evaluation code returns."""
    rng = np.random.default_rng(0)
    logits, target = rng.normal(size=(20, 6)), rng.integers(0, 6, 20)
    assert tuple(M.classification_metrics(logits, target, 6)) == M.CLASSIFICATION_METRICS
    scores = rng.normal(size=(12, 12))
    assert set(M.retrieval_recall(scores, np.arange(12))) == set(M.RETRIEVAL_METRICS)
    assert tuple(M.winogavil_metrics([0.5, 0.2], [5, 10])) == M.WINOGAVIL_METRICS
