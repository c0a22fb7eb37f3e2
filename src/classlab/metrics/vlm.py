"""Metrics of the vlm family's protocols, over saved logits (numpy).

Base-to-novel (CoCoOp, Zhou et al. 2022, and every prompt-learning paper since): the classes split
into base (the first half of the sorted labels) and new (the rest); a model is tested on the base
classes' test images with the base classes as the only candidates, and on the new classes' with the
new classes as the only candidates:

    B = acc(argmax over base classes | base images),  N = acc(argmax over new classes | new images),
    H = 2 B N / (B + N).

Compositional zero-shot (CSP, Nayak et al. 2023, after Mancini et al.'s closed world): pairs split
into seen and unseen; S and U are the accuracies on the seen and the unseen pairs' test images with
every pair a candidate, and H their harmonic mean.
"""
from __future__ import annotations

import numpy as np


def base_new_split(num_classes: int) -> tuple[list[int], list[int]]:
    """Base = the first half of the sorted labels (rounded down), new = the rest."""
    if int(num_classes) < 2:  # one class: the new side would be empty (none: both)
        raise ValueError(f"base/new split: {num_classes} class(es) leave the new side empty; base-to-novel needs "
                         "at least 2 classes (base: the first half of the sorted labels, new: the rest)")
    half = int(num_classes) // 2
    return list(range(half)), list(range(half, int(num_classes)))


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b); 0 where both are 0."""
    a, b = float(a), float(b)
    return 0.0 if a + b == 0 else 2.0 * a * b / (a + b)


def subset_accuracy(logits: np.ndarray, labels: np.ndarray, classes) -> float:
    """Accuracy on the samples whose label is in ``classes``, the argmax taken over ``classes`` only
    (the other columns of ``logits`` are never candidates). NaN where no sample is in ``classes``."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    classes = np.asarray(list(classes), dtype=int)
    keep = np.isin(labels, classes)
    if not keep.any():
        return float("nan")
    pred = classes[np.argmax(logits[keep][:, classes], axis=1)]
    return float(np.mean(pred == labels[keep]))


def base_to_novel_accuracy(logits: np.ndarray, labels: np.ndarray, base, new) -> dict:
    """``{"base": B, "new": N, "hm": H}`` of one model's logits over every class (see the module doc)."""
    b = subset_accuracy(logits, labels, base)
    n = subset_accuracy(logits, labels, new)
    return {"base": b, "new": n, "hm": harmonic_mean(b, n)}


def seen_unseen_accuracy(logits: np.ndarray, labels: np.ndarray, seen, unseen) -> dict:
    """Compositional zero-shot: every pair a candidate; accuracy on the seen pairs' samples, on the
    unseen pairs' samples, and their harmonic mean."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    pred = np.argmax(logits, axis=1)
    out = {}
    for name, pairs in (("seen", seen), ("unseen", unseen)):
        keep = np.isin(labels, np.asarray(list(pairs), dtype=int))
        out[name] = float(np.mean(pred[keep] == labels[keep])) if keep.any() else float("nan")
    out["hm"] = harmonic_mean(out["seen"], out["unseen"])
    return out


# --- label metric (Loki) ----------------------------------------------------------------------

def embedding_label_metric(embeddings: np.ndarray) -> np.ndarray:
    """A metric over the labels from one embedding per label (Loki's self-derived metric): the
    Euclidean distance d(i, j) = ||e_i - e_j||_2, a (K, K) symmetric matrix with a zero diagonal."""
    e = np.asarray(embeddings, dtype=np.float64)
    sq = (e * e).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * e @ e.T, 0.0)
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(d2)


def frechet_mean_prediction(probs: np.ndarray, observed, distances: np.ndarray) -> np.ndarray:
    """Loki's prediction rule (Roberts et al., NeurIPS 2023): with P_i(x) the model's probabilities
    over its observed classes lambda_1..lambda_k and d the label metric over every class,

        y^(x) = argmin_{y in Y} sum_i P_i(x) d(y, lambda_i)^2,

    which can be any class, observed or not. ``probs`` (N, k) in the order of ``observed``."""
    d2 = np.asarray(distances, dtype=np.float64)[:, np.asarray(list(observed), dtype=int)] ** 2  # (K, k)
    return np.argmin(np.asarray(probs, dtype=np.float64) @ d2.T, axis=1)  # (N, K) Frechet objective


def expected_squared_distance(pred: np.ndarray, labels: np.ndarray, distances: np.ndarray) -> float:
    """E[d(y^, y)^2] over the samples: Loki's evaluation metric (0 for a perfect classifier)."""
    d = np.asarray(distances, dtype=np.float64)
    return float(np.mean(d[np.asarray(pred, dtype=int), np.asarray(labels, dtype=int)] ** 2))


def label_metric_scores(logits: np.ndarray, labels: np.ndarray, observed, unobserved, distances: np.ndarray) -> dict:
    """A model's predictions over EVERY class (argmax of ``logits``) judged under the label metric:
    accuracy over all classes, accuracy on the unobserved classes' samples (the classes it never
    trained on) and the expected squared distance."""
    pred = np.argmax(np.asarray(logits), axis=1)
    labels = np.asarray(labels)
    unseen = np.isin(labels, np.asarray(list(unobserved), dtype=int))
    return {"all_acc": float(np.mean(pred == labels)),
            "unobserved_acc": float(np.mean(pred[unseen] == labels[unseen])) if unseen.any() else float("nan"),
            "expected_sq_distance": expected_squared_distance(pred, labels, distances)}
