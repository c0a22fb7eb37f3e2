"""Semantic segmentation metrics, computed the way PASCAL VOC and Cityscapes compute them: one
confusion matrix accumulated over every labelled pixel of the evaluated split (not a mean of
per-image scores), then per-class IoU and F1 from it.

For class c with TP_c true positive pixels, FP_c false positives and FN_c false negatives:

    IoU_c = TP_c / (TP_c + FP_c + FN_c)          F1_c = 2 TP_c / (2 TP_c + FP_c + FN_c)

mIoU averages IoU_c over the classes that occur in the ground truth of the split (a class that is
neither labelled nor predicted has no IoU; one that is predicted but never labelled is left out
too, as the VOC devkit's "present classes" convention; its false positives still lower the IoU of
the classes whose pixels it took). Pixels whose label is ``ignore_index`` count nowhere.
"""
from __future__ import annotations

import numpy as np
import torch


def pixel_confusion(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, num_classes: int,
                    ignore_index: int | None = 255) -> np.ndarray:
    """counts[i, j] = number of pixels of true class i predicted as j (int64, num_classes^2)."""
    pred = torch.as_tensor(pred).reshape(-1).long()
    target = torch.as_tensor(target).reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"pixel_confusion: {pred.numel()} predicted pixels for {target.numel()} labelled ones")
    keep = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    pred, target = pred[keep], target[keep]
    if len(target) and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(f"pixel_confusion: a label outside [0, {num_classes}) (max {int(target.max())})")
    if len(pred) and (int(pred.min()) < 0 or int(pred.max()) >= num_classes):
        raise ValueError(f"pixel_confusion: a prediction outside [0, {num_classes}) (max {int(pred.max())})")
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy().astype(np.int64)


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
    """IoU_c = TP / (TP + FP + FN) per class; NaN where the class is never labelled (no ground truth)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    labelled = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    union = labelled + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / union
    iou[labelled == 0] = np.nan
    return iou


def per_class_f1(confusion: np.ndarray) -> np.ndarray:
    """F1_c = 2 TP / (2 TP + FP + FN) per class (the Dice score); NaN where the class is never labelled."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    labelled = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * tp / (labelled + predicted)
    f1[labelled == 0] = np.nan
    return f1


def mean_over(values: np.ndarray, classes=None) -> float:
    """The mean of ``values`` over ``classes`` (all by default), skipping NaN (classes not labelled);
    NaN when none is left."""
    values = np.asarray(values, dtype=np.float64)
    if classes is not None:
        values = values[np.asarray(list(classes), dtype=np.int64)] if len(list(classes)) else values[:0]
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def segmentation_summary(confusion: np.ndarray, background: int | None = 0) -> dict:
    """mIoU (classes labelled in the split, background included as VOC does), mIoU of the object
    classes only, mean F1, and pixel accuracy, from an accumulated confusion matrix."""
    confusion = np.asarray(confusion)
    iou, f1 = per_class_iou(confusion), per_class_f1(confusion)
    objects = [c for c in range(len(confusion)) if c != background]
    total = confusion.sum()
    return {"miou": mean_over(iou), "miou_objects": mean_over(iou, objects), "mean_f1": mean_over(f1),
            "mean_f1_objects": mean_over(f1, objects),
            "pixel_accuracy": float(np.trace(confusion) / total) if total else float("nan")}


# --- pixel calibration ---------------------------------------------------------------------------
#
# Expected calibration error over pixels (Guo, Pleiss, Sun and Weinberger, "On Calibration of Modern
# Neural Networks", ICML 2017), with 15 equal-width bins of the top-1 confidence c, the bin of c being
# b with b/n < c <= (b+1)/n (right-closed, as ``classlab.metrics.classification.reliability_bins``):
#
#     ECE = sum_b (n_b / N) |acc_b - conf_b| = sum_b |correct_b - confidence_sum_b| / N
#
# A split has too many pixels to hold every pixel's probabilities at once, so the bins' sums are
# accumulated batch by batch (``calibration_bins`` returns sums that add over batches) and the ECE is
# taken from the totals: the ECE of all the split's pixels pooled, not a mean of per-batch ECEs.
#
# NACL (Murugesan et al., MedIA 2024) reports ECE and the class-wise ECE (CECE, Kull et al., NeurIPS
# 2019): for each class k its own probability p_k is binned over the pixels, the "accuracy" of a bin is
# the share of its pixels labelled k, and CECE is the mean over the classes of those per-class ECEs.
# Their evaluation code drops the pixels labelled background before both (``exclude_class=0`` here).


def _flat_probs_and_target(probs, target, ignore_index, exclude_class, name: str):
    probs = torch.as_tensor(probs)
    target = torch.as_tensor(target)
    if probs.dim() == 4:  # (B, K, H, W) -> (B*H*W, K)
        probs = probs.permute(0, 2, 3, 1).reshape(-1, probs.shape[1])
    elif probs.dim() != 2:
        raise ValueError(f"{name}: probs of shape (B, K, H, W) or (N, K) expected, got {tuple(probs.shape)}")
    target = target.reshape(-1).long()
    if target.numel() != probs.shape[0]:
        raise ValueError(f"{name}: {probs.shape[0]} pixels of probabilities for {target.numel()} labels")
    keep = torch.ones_like(target, dtype=torch.bool)
    if ignore_index is not None:
        keep &= target != ignore_index
    if exclude_class is not None:
        keep &= target != exclude_class
    return probs[keep], target[keep]


def _bin_index(confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
    edges = torch.from_numpy(np.linspace(0.0, 1.0, n_bins + 1))
    # bucketize(right=False) gives i with edges[i-1] < c <= edges[i]: right-closed bins; the clamp puts
    # c == 0 (an underflowed probability) into the first bin
    return (torch.bucketize(confidence.contiguous(), edges, right=False) - 1).clamp_(0, n_bins - 1)


def calibration_bins(probs, target, n_bins: int = 15, ignore_index: int | None = 255,
                     exclude_class: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts, confidence_sums, correct_sums) per equal-width bin of the top-1 confidence.

    ``probs`` (B, K, H, W) or (N, K) class probabilities (softmax), ``target`` (B, H, W) or (N,) labels.
    Pixels labelled ``ignore_index``, and those labelled ``exclude_class`` (NACL's evaluation drops the
    background: ``exclude_class=0``), count nowhere. The three arrays (int64, float64, float64; length
    ``n_bins``) add over batches; ``expected_calibration_error_from_bins`` turns the totals into the ECE.
    """
    if int(n_bins) < 1:
        raise ValueError(f"calibration_bins: n_bins must be >= 1, got {n_bins}")
    probs, target = _flat_probs_and_target(probs, target, ignore_index, exclude_class, "calibration_bins")
    confidence, pred = probs.max(dim=1)
    # float64 (an exact upcast, after the max): bin edges compared as numpy compares them, and sums that do
    # not drift over a split
    confidence = confidence.to(torch.float64)
    idx = _bin_index(confidence, int(n_bins))
    counts = torch.bincount(idx, minlength=n_bins)
    confidence_sums = torch.bincount(idx, weights=confidence, minlength=n_bins)
    correct_sums = torch.bincount(idx, weights=(pred == target).to(torch.float64), minlength=n_bins)
    return counts.numpy().astype(np.int64), confidence_sums.numpy(), correct_sums.numpy()


def expected_calibration_error_from_bins(counts, confidence_sums, correct_sums) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| from accumulated bins (Guo et al. 2017); NaN without pixels."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total == 0:
        return float("nan")
    # (n_b / N) |correct_b / n_b - conf_sum_b / n_b| = |correct_b - conf_sum_b| / N; an empty bin adds 0
    return float(np.abs(np.asarray(correct_sums, dtype=np.float64)
                        - np.asarray(confidence_sums, dtype=np.float64)).sum() / total)


def classwise_calibration_bins(probs, target, n_bins: int = 15, ignore_index: int | None = 255,
                               exclude_class: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(counts, confidence_sums, hit_sums), each (K, n_bins): for class k, pixel i falls in the bin of
    p_k(i); hit_sums counts the bin's pixels labelled k. Add over batches like ``calibration_bins``."""
    if int(n_bins) < 1:
        raise ValueError(f"classwise_calibration_bins: n_bins must be >= 1, got {n_bins}")
    probs, target = _flat_probs_and_target(probs, target, ignore_index, exclude_class, "classwise_calibration_bins")
    num_classes = probs.shape[1]
    counts = np.zeros((num_classes, n_bins), dtype=np.int64)
    confidence_sums = np.zeros((num_classes, n_bins), dtype=np.float64)
    hit_sums = np.zeros((num_classes, n_bins), dtype=np.float64)
    for k in range(num_classes):  # one class at a time: never a (pixels x classes) index array
        p_k = probs[:, k].to(torch.float64)
        idx = _bin_index(p_k, int(n_bins))
        counts[k] = torch.bincount(idx, minlength=n_bins).numpy()
        confidence_sums[k] = torch.bincount(idx, weights=p_k, minlength=n_bins).numpy()
        hit_sums[k] = torch.bincount(idx, weights=(target == k).to(torch.float64), minlength=n_bins).numpy()
    return counts, confidence_sums, hit_sums


def classwise_calibration_error_from_bins(counts, confidence_sums, hit_sums) -> float:
    """CECE = (1/K) sum_k sum_b (n_kb / N) |hits_kb / n_kb - conf_kb / n_kb| (Kull et al. 2019), the mean
    over every class of the (K, n_bins) arrays; NaN without pixels."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts[0].sum() if len(counts) else 0.0  # every class bins the same N pixels
    if total == 0:
        return float("nan")
    gaps = np.abs(np.asarray(hit_sums, dtype=np.float64) - np.asarray(confidence_sums, dtype=np.float64))
    return float((gaps.sum(axis=1) / total).mean())
