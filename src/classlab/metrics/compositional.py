"""Metrics of compositional zero-shot learning (CZSL), over saved pair logits (numpy).

Closed world (every pair of the grid a candidate): S and U are the accuracies on the seen and on the
unseen pairs' test images, H = 2SU / (S + U) (``classlab.metrics.vlm.seen_unseen_accuracy``).

A model trained on the seen pairs favours them. Following Chao et al. (2016) and the CZSL benchmark of
Purushwalkam et al. / Mancini et al. (2021), used by CSP (Nayak et al. 2023), a scalar bias b is added
to every unseen pair's logit and swept over all values: b -> -inf predicts seen pairs only (the best
seen accuracy), b -> +inf unseen pairs only (the best unseen accuracy), and the values between trace a
seen/unseen accuracy curve. Reported: ``auc``, the area under that curve (seen accuracy over unseen
accuracy, trapezoidal), ``best_hm`` the best harmonic mean over b, ``best_seen`` and ``best_unseen``.

For one test image with d = max_seen logit - max_unseen logit, the prediction is the seen argmax when
d >= b (ties go to the seen pair) and the unseen argmax otherwise; so a seen-pair image is right iff its
seen argmax is its pair and b <= d, an unseen-pair image iff its unseen argmax is its pair and b > d.
The curve only changes at the images' d values: we evaluate it at every one of them (and at +inf),
where the benchmark's code evaluates every 20th of the unseen images' values; ours is its exact limit.
"""
from __future__ import annotations

import numpy as np

from classlab.metrics.vlm import harmonic_mean, seen_unseen_accuracy


def _columns(seen, unseen) -> tuple[np.ndarray, np.ndarray]:
    seen, unseen = np.asarray(list(seen), dtype=int), np.asarray(list(unseen), dtype=int)
    if len(seen) == 0 or len(unseen) == 0:
        raise ValueError("the bias sweep needs seen and unseen pairs")
    if np.intersect1d(seen, unseen).size:
        raise ValueError(f"pairs {np.intersect1d(seen, unseen).tolist()} are both seen and unseen")
    return seen, unseen


def bias_curve(logits: np.ndarray, labels: np.ndarray, seen, unseen) -> dict:
    """The seen/unseen accuracy curve over the bias b added to the unseen pairs' logits: arrays
    ``bias``, ``seen``, ``unseen`` in increasing b (unseen accuracy rising, seen accuracy falling),
    from b = -inf to b = +inf (see the module doc)."""
    logits, labels = np.asarray(logits, dtype=np.float64), np.asarray(labels)
    seen, unseen = _columns(seen, unseen)
    best_seen = seen[np.argmax(logits[:, seen], axis=1)]
    best_unseen = unseen[np.argmax(logits[:, unseen], axis=1)]
    d = logits[:, seen].max(1) - logits[:, unseen].max(1)
    is_seen, is_unseen = np.isin(labels, seen), np.isin(labels, unseen)
    n_seen, n_unseen = int(is_seen.sum()), int(is_unseen.sum())
    d_seen = np.sort(d[is_seen & (best_seen == labels)])        # right for b <= d
    d_unseen = np.sort(d[is_unseen & (best_unseen == labels)])  # right for b > d
    bias = np.concatenate([[-np.inf], np.unique(np.concatenate([d_seen, d_unseen])), [np.inf]])
    right_seen = len(d_seen) - np.searchsorted(d_seen, bias, side="left")    # #{d >= b}
    right_unseen = np.searchsorted(d_unseen, bias, side="left")              # #{d < b}
    right_unseen[-1] = len(d_unseen)  # b = +inf: every unseen argmax
    right_seen[-1] = 0
    seen_acc = right_seen / n_seen if n_seen else np.full(len(bias), np.nan)
    unseen_acc = right_unseen / n_unseen if n_unseen else np.full(len(bias), np.nan)
    return {"bias": bias, "seen": seen_acc.astype(np.float64), "unseen": unseen_acc.astype(np.float64)}


def calibrated_accuracy(logits: np.ndarray, labels: np.ndarray, seen, unseen) -> dict:
    """``auc``, ``best_hm``, ``best_seen``, ``best_unseen`` and ``best_hm_bias`` (a bias reaching
    ``best_hm``) of the bias sweep; NaN where the test split lacks seen or unseen images."""
    curve = bias_curve(logits, labels, seen, unseen)
    s, u = curve["seen"], curve["unseen"]
    if np.isnan(s).any() or np.isnan(u).any():
        nan = float("nan")
        return {"auc": nan, "best_hm": nan, "best_seen": nan, "best_unseen": nan, "best_hm_bias": nan}
    auc = float(np.sum((u[1:] - u[:-1]) * (s[1:] + s[:-1]) / 2.0))  # trapezoid of seen over unseen
    hm = np.array([harmonic_mean(a, b) for a, b in zip(s, u)])
    best = int(np.argmax(hm))
    return {"auc": auc, "best_hm": float(hm[best]), "best_seen": float(s.max()), "best_unseen": float(u.max()),
            "best_hm_bias": float(curve["bias"][best])}


def primitive_accuracy(logits: np.ndarray, labels: np.ndarray, pairs, subset) -> dict:
    """Closed-world attribute and object accuracy on the images whose pair is in ``subset``: the
    argmax pair over every candidate is right on its attribute (object) when it shares the true one.
    ``pairs``: [attribute, object] of each label."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    pairs = np.asarray(pairs, dtype=int)
    keep = np.isin(labels, np.asarray(list(subset), dtype=int))
    if not keep.any():
        return {"attr": float("nan"), "obj": float("nan")}
    pred = np.argmax(logits[keep], axis=1)
    truth = labels[keep]
    return {"attr": float(np.mean(pairs[pred, 0] == pairs[truth, 0])),
            "obj": float(np.mean(pairs[pred, 1] == pairs[truth, 1]))}


def compositional_scores(logits: np.ndarray, labels: np.ndarray, seen, unseen, pairs) -> dict:
    """Every number the compositional protocol reports on one split: closed-world ``seen``,
    ``unseen``, ``hm``; the bias sweep's ``auc``, ``best_hm``, ``best_seen``, ``best_unseen``,
    ``best_hm_bias``; ``unseen_attr_acc`` and ``unseen_obj_acc`` (closed world, unseen images)."""
    out = seen_unseen_accuracy(logits, labels, seen, unseen)
    out.update(calibrated_accuracy(logits, labels, seen, unseen))
    prim = primitive_accuracy(logits, labels, pairs, unseen)
    out.update(unseen_attr_acc=prim["attr"], unseen_obj_acc=prim["obj"])
    return out
