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
