"""Class-incremental metrics: pure functions over per-task predictions.

``steps`` is a list over training steps t = 0..T-1 of (predicted labels, true labels) on the
test samples of the classes seen after step t. ``task_of_class`` maps a class to the task that
introduced it. Accuracies come in two named variants:

- sample-weighted ("sample"): correct / samples;
- class-balanced ("class"): the mean of per-class accuracies (equal weight per class).

The accuracy matrix A[t, j] is the accuracy on task j's classes after training step t
(NaN for j > t).
"""
from __future__ import annotations

import numpy as np


def _acc(pred: np.ndarray, labels: np.ndarray, mask: np.ndarray, weighting: str) -> float:
    if not mask.any():
        return float("nan")
    p, y = pred[mask], labels[mask]
    if weighting == "sample":
        return float((p == y).mean())
    if weighting == "class":
        return float(np.mean([(p[y == c] == c).mean() for c in np.unique(y)]))
    raise ValueError(f"weighting must be 'sample' or 'class', got {weighting!r}")


def accuracy_matrix(steps: list[tuple[np.ndarray, np.ndarray]], task_of_class: dict[int, int],
                    weighting: str = "sample") -> np.ndarray:
    n = len(steps)
    a = np.full((n, n), np.nan)
    for t, (pred, labels) in enumerate(steps):
        tasks = np.array([task_of_class[int(c)] for c in labels])
        for j in range(t + 1):
            a[t, j] = _acc(pred, labels, tasks == j, weighting)
    return a


def seen_accuracy(steps, weighting: str = "sample") -> np.ndarray:
    """Accuracy on all classes seen so far, after each step."""
    return np.array([_acc(p, y, np.ones(len(y), bool), weighting) for p, y in steps])


def last_accuracy(steps, weighting: str = "sample") -> float:
    return float(seen_accuracy(steps, weighting)[-1])


def average_incremental_accuracy(steps, weighting: str = "sample") -> float:
    """(1/T) sum_t A_t, A_t the accuracy on all seen classes after step t (Rebuffi et al. 2017).
    A step with nothing to score (an online stream's empty first task) is left out."""
    acc = seen_accuracy(steps, weighting)
    return float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan")


def _scored_tasks(a: np.ndarray) -> list[int]:
    """Tasks j < T-1 whose column has a score: a task that introduced no class (Si-Blurry's
    stochastic boundaries can give one) has nothing to forget and is left out of the mean."""
    T = a.shape[0]
    return [j for j in range(T - 1) if np.isfinite(a[j:T - 1, j]).any() and np.isfinite(a[T - 1, j])]


def forgetting(a: np.ndarray) -> float:
    """Max-based forgetting (Chaudhry et al. 2018): mean over j < T-1 of
    max_{t in [j, T-2]} A[t, j] - A[T-1, j]."""
    tasks = _scored_tasks(a)
    if not tasks:
        return 0.0
    return float(np.mean([np.nanmax(a[j:a.shape[0] - 1, j]) - a[-1, j] for j in tasks]))


def forgetting_initial(a: np.ndarray) -> float:
    """"Initial" forgetting: mean over j < T-1 of A[j, j] - A[T-1, j] (drop from just-learned)."""
    tasks = [j for j in _scored_tasks(a) if np.isfinite(a[j, j])]
    if not tasks:
        return 0.0
    return float(np.mean([a[j, j] - a[-1, j] for j in tasks]))


def backward_transfer(a: np.ndarray) -> float:
    """BWT (Lopez-Paz & Ranzato 2017): (1/(T-1)) sum_{j<T-1} A[T-1, j] - A[j, j]."""
    return -forgetting_initial(a)


def old_new_accuracy(steps, task_of_class: dict[int, int], weighting: str = "sample") -> list[dict]:
    """After each step t: accuracy on classes of earlier tasks (old) and of task t (new)."""
    out = []
    for t, (pred, labels) in enumerate(steps):
        tasks = np.array([task_of_class[int(c)] for c in labels])
        out.append({"old": _acc(pred, labels, tasks < t, weighting), "new": _acc(pred, labels, tasks == t, weighting)})
    return out


def anytime_auc(curve: np.ndarray) -> float:
    """A_auc (Koh et al. 2022; MVP): the mean of accuracies measured at equal sample intervals
    during the online stream (area under the accuracy-vs-samples curve over its length)."""
    curve = np.asarray(curve, dtype=np.float64)
    return float(curve[:, 1].mean()) if len(curve) else float("nan")


def few_shot_summary(steps, task_of_class: dict[int, int], weighting: str = "sample") -> dict:
    """Few-shot CIL: performance drop PD = A_0 - A_last, and the final harmonic mean of base
    (session 0) and novel (later sessions) accuracy, HM = 2 b n / (b + n)."""
    acc = seen_accuracy(steps, weighting)
    pred, labels = steps[-1]
    tasks = np.array([task_of_class[int(c)] for c in labels])
    base = _acc(pred, labels, tasks == 0, weighting)
    novel = _acc(pred, labels, tasks > 0, weighting)
    hm = 2 * base * novel / (base + novel) if base + novel > 0 else 0.0
    return {"performance_drop": float(acc[0] - acc[-1]), "base_accuracy": base, "novel_accuracy": novel,
            "harmonic_mean": float(hm)}


def summarize_incremental(steps, task_of_class: dict[int, int], kind: str = "class_incremental",
                          anytime: np.ndarray | None = None) -> dict:
    out: dict = {}
    for w in ("sample", "class"):
        a = accuracy_matrix(steps, task_of_class, w)
        suffix = "" if w == "sample" else "_class_balanced"
        out[f"last_accuracy{suffix}"] = last_accuracy(steps, w)
        out[f"average_incremental_accuracy{suffix}"] = average_incremental_accuracy(steps, w)
        out[f"forgetting{suffix}"] = forgetting(a)
        out[f"forgetting_initial{suffix}"] = forgetting_initial(a)
        out[f"backward_transfer{suffix}"] = backward_transfer(a)
        out[f"accuracy_matrix{suffix}"] = [[None if np.isnan(v) else float(v) for v in row] for row in a]
        out[f"seen_accuracy{suffix}"] = seen_accuracy(steps, w).tolist()
        out[f"old_new{suffix}"] = old_new_accuracy(steps, task_of_class, w)
    if kind == "few_shot":
        out.update(few_shot_summary(steps, task_of_class))
    if anytime is not None and len(anytime):
        out["anytime_auc"] = anytime_auc(anytime)
        out["anytime_curve"] = np.asarray(anytime).tolist()
    return out
