"""Category-discovery metrics: pure functions over true labels and predicted cluster ids.

Clustering accuracy as used by the GCD line of work (Vaze, Han, Vedaldi and Zisserman,
"Generalized Category Discovery", CVPR 2022; and its successors such as SimGCD, Wen et al.,
ICCV 2023). Cluster ids are arbitrary, so a cluster is first matched to a class by the
Hungarian algorithm on the cluster-by-class count matrix, each cluster to at most one class and
each class to at most one cluster, maximising the number of samples whose cluster matches their
class:

    ACC = max over one-to-one maps m of (1/N) sum_i [m(cluster_i) == y_i]

A cluster left without a class (more clusters than classes) counts every one of its samples
as wrong; a class left without a cluster (fewer clusters) is never predicted.

The split into samples of old (known) and new (novel) classes comes in three variants, named so
that nobody confuses them (keys of ``clustering_scores``):
- ``acc_*`` (the papers' "v2", the reported protocol since GCD): ONE matching over all samples,
  then the share of correct samples among all / old-class / new-class samples;
- ``v1_*`` (GCD's "v1"): a separate matching within the old-class samples and within the
  new-class samples, so a cluster may serve an old class in one and a new class in the other;
  All is their sample-weighted mean. It is never lower than v2, since each subset gets its own
  optimum;
- ``balanced_*`` (SimGCD's "v2b"): the v2 matching, then the accuracy of each class averaged
  over classes, so a large class weighs as much as a small one.

An empty old or new subset gives NaN for that key rather than an error.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def _labels(y, name: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name}: must be a 1-D array of ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.issubdtype(arr.dtype, np.floating) or not np.all(np.mod(arr, 1) == 0):
            raise ValueError(f"{name}: must hold integer ids, got dtype {arr.dtype}")
    return arr.astype(np.int64)


def _pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_pred: {p.size} predictions for {t.size} labels")
    return t, p


def _match(y_true: np.ndarray, y_pred: np.ndarray):
    """The Hungarian matching. Returns (hits, mapping): ``hits`` says, per sample, whether its
    cluster is matched to its class; ``mapping`` is cluster id -> class for the matched clusters."""
    classes, class_idx = np.unique(y_true, return_inverse=True)
    clusters, cluster_idx = np.unique(y_pred, return_inverse=True)
    counts = np.zeros((len(clusters), len(classes)), dtype=np.int64)
    np.add.at(counts, (cluster_idx, class_idx), 1)
    # maximise sum_k counts[k, m(k)] over one-to-one maps; on a rectangular matrix scipy matches
    # min(#clusters, #classes) pairs, the same optimum as padding it square with zeros
    rows, cols = linear_sum_assignment(counts, maximize=True)
    matched_class_idx = np.full(len(clusters), -1, dtype=np.int64)
    matched_class_idx[rows] = cols
    hits = matched_class_idx[cluster_idx] == class_idx
    mapping = {int(clusters[r]): int(classes[c]) for r, c in zip(rows, cols)}
    return hits, mapping


def _mean_or_nan(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else float("nan")


def _old_mask(y_true: np.ndarray, old_classes) -> np.ndarray:
    old = np.asarray(list(old_classes), dtype=np.int64)
    return np.isin(y_true, old)


def cluster_accuracy(y_true, y_pred) -> float:
    """Share of samples whose cluster is matched to their class by one Hungarian matching."""
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return float("nan")
    hits, _ = _match(t, p)
    return float(hits.mean())


def cluster_mapping(y_true, y_pred) -> dict[int, int]:
    """The matching behind ``cluster_accuracy``: cluster id -> class; unmatched clusters are absent."""
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return {}
    return _match(t, p)[1]


def split_cluster_accuracy(y_true, y_pred, old_classes) -> dict:
    """"v2": one matching over all samples, then accuracy over all / old-class / new-class samples."""
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return {"all": float("nan"), "old": float("nan"), "new": float("nan")}
    hits, _ = _match(t, p)
    old = _old_mask(t, old_classes)
    return {"all": float(hits.mean()), "old": _mean_or_nan(hits[old]), "new": _mean_or_nan(hits[~old])}


def split_cluster_accuracy_v1(y_true, y_pred, old_classes) -> dict:
    """"v1": a separate matching within the old-class and within the new-class samples.

    all = w * old + (1 - w) * new with w the share of old-class samples (the mean of the per-sample
    hits of both matchings); with one subset empty, all is the other subset's accuracy."""
    t, p = _pair(y_true, y_pred)
    old = _old_mask(t, old_classes)
    acc_old = cluster_accuracy(t[old], p[old])
    acc_new = cluster_accuracy(t[~old], p[~old])
    if t.size == 0:
        acc_all = float("nan")
    else:
        w = float(old.mean())
        acc_all = (w * acc_old if w > 0 else 0.0) + ((1 - w) * acc_new if w < 1 else 0.0)
    return {"all": acc_all, "old": acc_old, "new": acc_new}


def split_cluster_accuracy_balanced(y_true, y_pred, old_classes) -> dict:
    """The v2 matching, then each class's accuracy averaged over the classes present
    (all / old / new): mean_c (1/N_c) sum_{i: y_i = c} [m(cluster_i) == c]."""
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        return {"all": float("nan"), "old": float("nan"), "new": float("nan")}
    hits, _ = _match(t, p)
    classes = np.unique(t)
    per_class = np.array([hits[t == c].mean() for c in classes])
    is_old = np.isin(classes, np.asarray(list(old_classes), dtype=np.int64))
    return {"all": float(per_class.mean()), "old": _mean_or_nan(per_class[is_old]),
            "new": _mean_or_nan(per_class[~is_old])}


def clustering_scores(y_true, y_pred, old_classes) -> dict:
    """Everything a discovery ``metrics.json`` holds for one evaluated set (NaN where a subset is empty)."""
    t, p = _pair(y_true, y_pred)
    old_classes = [int(c) for c in old_classes]
    out = {}
    for prefix, fn in (("acc", split_cluster_accuracy), ("v1", split_cluster_accuracy_v1),
                       ("balanced", split_cluster_accuracy_balanced)):
        for key, value in fn(t, p, old_classes).items():
            out[f"{prefix}_{key}"] = value
    nonempty = t.size > 0
    out["nmi"] = float(normalized_mutual_info_score(t, p)) if nonempty else float("nan")
    out["ari"] = float(adjusted_rand_score(t, p)) if nonempty else float("nan")
    out["num_clusters"] = int(np.unique(p).size)
    out["num_classes"] = int(np.unique(t).size)
    out["num_samples"] = int(t.size)
    return out


def matched_confusion(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts [num_classes, num_classes + 1]: row = true class, column = the class its cluster is
    matched to by ``cluster_mapping``; the last column counts samples in unmatched clusters (more
    clusters than classes). Each row sums to that class's number of samples."""
    t, p = _pair(y_true, y_pred)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes: must be a positive integer, got {num_classes!r}")
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"y_true: class ids must lie in [0, {num_classes}), got [{t.min()}, {t.max()}]")
    out = np.zeros((num_classes, num_classes + 1), dtype=np.int64)
    if t.size == 0:
        return out
    mapping = cluster_mapping(t, p)
    column = np.array([mapping.get(int(k), num_classes) for k in p], dtype=np.int64)
    np.add.at(out, (t, column), 1)
    return out


def class_number_error(k_estimated: int, k_true: int) -> int:
    """|k_hat - k|: how far an estimated number of classes is from the truth."""
    for name, k in (("k_estimated", k_estimated), ("k_true", k_true)):
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
            raise ValueError(f"{name}: must be a non-negative integer, got {k!r}")
    return abs(int(k_estimated) - int(k_true))
