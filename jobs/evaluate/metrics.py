"""Metrics as DataComp computes them (eval_utils/ of mlfoundations/datacomp,
clip_benchmark 1.6.2, WILDS), on numpy arrays. No model code here.

Names of the returned keys follow DataComp's results files, so that
tasklist.yml's `main_metric` picks the right one.
"""

from __future__ import annotations

import numpy as np

# The metric names each evaluation path returns, so that an extra task's
# `main_metric` can be checked before anything is queued (tests/test_eval_metrics.py
# holds these equal to what the functions below return). WILDS and the fairness
# tasks name their group metrics per task; they are checked when evaluated.
CLASSIFICATION_METRICS = ("acc1", "acc5", "mean_per_class_recall")
RETRIEVAL_METRICS = tuple(f"{side}_retrieval_recall@{k}" for k in (1, 5, 10) for side in ("image", "text")) + (
    "mean_recall@1",)
WINOGAVIL_METRICS = ("avg_jaccard_score", "jaccard_score_5", "jaccard_score_6", "jaccard_score_10",
                     "jaccard_score_12", "jaccard_score_5-6", "jaccard_score_10-12")
METRICS_BY_KIND = {"classification": CLASSIFICATION_METRICS, "retrieval": RETRIEVAL_METRICS,
                   "winogavil": WINOGAVIL_METRICS}


def topk_accuracy(logits: np.ndarray, target: np.ndarray, k: int) -> float:
    """Fraction of samples whose label is among the k highest logits."""
    k = min(k, logits.shape[1])
    topk = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float((topk == target[:, None]).any(axis=1).mean())


def mean_per_class_recall(target: np.ndarray, pred: np.ndarray) -> float:
    """Balanced accuracy: the mean over classes present in `target` of their recall
    (sklearn's balanced_accuracy_score, which DataComp and clip_benchmark use)."""
    from sklearn.metrics import balanced_accuracy_score

    return float(balanced_accuracy_score(target, pred))


def classification_metrics(logits: np.ndarray, target: np.ndarray, n_classes: int) -> dict:
    """acc1, acc5 (None below 5 classes, as DataComp), mean_per_class_recall."""
    pred = logits.argmax(axis=1)
    return {
        "acc1": topk_accuracy(logits, target, 1),
        "acc5": topk_accuracy(logits, target, 5) if n_classes >= 5 else None,
        "mean_per_class_recall": mean_per_class_recall(target, pred),
    }


def group_metrics(correct: np.ndarray, groups: np.ndarray, prefix: str,
                  exclude: tuple[int, ...] = ()) -> dict:
    """WILDS' standard group evaluation of a 0/1 per-sample score: `{prefix}_avg`
    over all samples, `{prefix}_{field}:{g}` and `count_{field}:{g}` per group
    (field folded into prefix by the caller), and `{prefix}_wg`, the worst group
    among groups with samples, minus `exclude`."""
    correct = correct.astype(np.float64)
    out: dict = {f"{prefix}_avg": float(correct.mean())}
    worst = None
    for g in np.unique(groups):
        mask = groups == g
        value = float(correct[mask].mean())
        out[f"{prefix}_group:{int(g)}"] = value
        out[f"count_group:{int(g)}"] = int(mask.sum())
        if int(g) not in exclude:
            worst = value if worst is None else min(worst, value)
    out[f"{prefix}_wg"] = worst
    return out


def worst_group_accuracy(pred: np.ndarray, target: np.ndarray, groups: np.ndarray,
                         exclude: tuple[int, ...] = ()) -> float:
    """Lowest per-group top-1 accuracy over the groups present (FMoW regions, GeoDE regions)."""
    return group_metrics(pred == target, groups, "acc", exclude)["acc_wg"]


def worst_group_topk_accuracy(topk_pred: np.ndarray, target: np.ndarray, groups: np.ndarray) -> float:
    """Lowest per-group top-k accuracy (Dollar Street: top-5 by income group)."""
    return group_metrics((topk_pred == target[:, None]).any(axis=1), groups, "acc_topk")["acc_topk_wg"]


def macro_f1(target: np.ndarray, pred: np.ndarray) -> float:
    """Macro F1 over the classes present in `target` (WILDS' F1(average="macro"), iWildCam)."""
    from sklearn.metrics import f1_score

    return float(f1_score(target, pred, average="macro", labels=np.unique(target)))


def macro_recall(target: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import recall_score

    return float(recall_score(target, pred, average="macro", labels=np.unique(target)))


def jaccard(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """|true ∩ pred| / |true ∪ pred| of two boolean vectors (sklearn's binary jaccard_score)."""
    y_true, y_pred = y_true.astype(bool), y_pred.astype(bool)
    union = (y_true | y_pred).sum()
    return float((y_true & y_pred).sum() / union) if union else 0.0


def winogavil_prediction(similarities: np.ndarray, n_associations: int) -> np.ndarray:
    """The n candidates most similar to the cue, as a boolean vector (DataComp's rule)."""
    chosen = np.argsort(similarities)[len(similarities) - n_associations:]
    return np.isin(np.arange(len(similarities)), chosen)


def winogavil_metrics(scores: list[float], n_candidates: list[int]) -> dict:
    """DataComp's WinoGAViL summary: mean Jaccard overall and by candidate count;
    the main metric is `jaccard_score_10-12`."""
    s, n = np.asarray(scores, dtype=np.float64), np.asarray(n_candidates)

    def mean(mask):
        return float(s[mask].mean()) if mask.any() else None

    return {
        "avg_jaccard_score": mean(np.ones_like(n, dtype=bool)),
        "jaccard_score_5": mean(n == 5), "jaccard_score_6": mean(n == 6),
        "jaccard_score_10": mean(n == 10), "jaccard_score_12": mean(n == 12),
        "jaccard_score_5-6": mean(n <= 6), "jaccard_score_10-12": mean(n >= 10),
    }


def retrieval_recall(scores: np.ndarray, text_to_image: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Image-text retrieval recall@k as clip_benchmark computes it.

    scores: (n_texts, n_images) similarities; text_to_image: the image index of
    each text. image_retrieval_recall@k: fraction of texts whose image is among
    the k images most similar to it; text_retrieval_recall@k: fraction of images
    with at least one of their texts among the k texts most similar to them.
    `mean_recall@1` is DataComp's main metric for Flickr and MSCOCO.
    """
    n_texts, n_images = scores.shape
    positive = np.zeros((n_texts, n_images), dtype=bool)
    positive[np.arange(n_texts), text_to_image] = True
    out = {}
    for k in ks:
        k_img, k_txt = min(k, n_images), min(k, n_texts)
        top_images = np.argpartition(-scores, k_img - 1, axis=1)[:, :k_img] if k_img < n_images else \
            np.tile(np.arange(n_images), (n_texts, 1))
        out[f"image_retrieval_recall@{k}"] = float(
            np.take_along_axis(positive, top_images, axis=1).any(axis=1).mean())
        st, pt = scores.T, positive.T
        top_texts = np.argpartition(-st, k_txt - 1, axis=1)[:, :k_txt] if k_txt < n_texts else \
            np.tile(np.arange(n_texts), (n_images, 1))
        out[f"text_retrieval_recall@{k}"] = float(np.take_along_axis(pt, top_texts, axis=1).any(axis=1).mean())
    if 1 in ks:
        out["mean_recall@1"] = 0.5 * (out["text_retrieval_recall@1"] + out["image_retrieval_recall@1"])
    return out
