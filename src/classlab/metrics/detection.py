"""Object detection metrics: COCO average precision computed by pycocotools, per class and by
class-frequency band (LVIS's APr / APc / APf).

The protocol saves, per evaluated image, the ground truth (boxes x0, y0, x1, y1 with x1, y1
EXCLUSIVE, canvas pixels; labels 0..C-1, -1 pads a slot) and the detector's kept detections
(``DenseLearner.detect``: boxes x0, y0, x1, y1 in pixels, scores, labels). ``coco_ap`` turns
both into pycocotools' structures and runs ``COCOeval(iouType="bbox")`` with its default
parameters: IoU thresholds .50:.05:.95, 101 recall thresholds, at most 100 detections per image
(and per class: pycocotools keeps the 100 highest-scoring detections of each image and class),
area range "all".

Conventions:

- a box x0, y0, x1, y1 (exclusive ends) is COCO's [x, y, w, h] with w = x1 - x0, h = y1 - y0, and
  its area is w * h (the ground truth is never crowd);
- AP = the mean of COCOeval's interpolated precision ``eval["precision"][t, r, k, area=all,
  maxDets=100]`` over every entry > -1, i.e. over the IoU thresholds t, the recall thresholds r and
  the classes k that have ground truth (what ``COCOeval.summarize`` prints first); AP50 and AP75
  fix t at .50 and .75;
- per-class AP_k = the mean of ``precision[:, :, k, 0, -1]`` over its entries > -1, NaN where class
  k has no ground truth in the evaluated images;
- band AP (LVIS, Gupta, Dollar & Girshick, CVPR 2019) = the mean of the per-class APs of the band's
  classes that have ground truth (NaN where none has).

No detections at all is a valid output (AP 0 for every class with ground truth), not an error.
"""
from __future__ import annotations

import contextlib
import io
from typing import Mapping, Sequence

import numpy as np
import torch

BAND_NAMES = ("rare", "common", "frequent")


def _array(value, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=dtype)


def _check_ground_truth(gt_boxes, gt_labels) -> tuple[np.ndarray, np.ndarray]:
    boxes = _array(gt_boxes, np.float64)
    labels = _array(gt_labels, np.int64)
    if boxes.ndim != 3 or boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes: expected (N, k_max, 4) boxes, got shape {tuple(boxes.shape)}")
    if labels.shape != boxes.shape[:2]:
        raise ValueError(f"gt_labels: shape {tuple(labels.shape)} does not match gt_boxes {tuple(boxes.shape)}")
    return boxes, labels


def coco_ground_truth(gt_boxes, gt_labels, num_classes: int):
    """A pycocotools ``COCO`` holding the ground truth of N images: image i has id i + 1, class k
    has category id k + 1 (pycocotools treats id 0 as falsy in places), every class is declared
    (so that ``precision[..., k, ...]`` is class k even when it has no ground truth)."""
    from pycocotools.coco import COCO

    boxes, labels = _check_ground_truth(gt_boxes, gt_labels)
    if labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"gt_labels: class {int(labels.max())} outside [0, {num_classes})")
    annotations = []
    for i in range(len(boxes)):
        for box, label in zip(boxes[i], labels[i]):
            if label < 0:
                continue
            x0, y0, x1, y1 = (float(v) for v in box)
            w, h = x1 - x0, y1 - y0
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(label) + 1,
                                "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0})
    gt = COCO()
    gt.dataset = {"images": [{"id": i + 1} for i in range(len(boxes))],
                  "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)],
                  "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def coco_detections(detections, num_images: int, num_classes: int) -> list[dict]:
    """pycocotools result rows ({image_id, category_id, bbox xywh, score}) from the detections, in
    either form: a list of one ``{"boxes": (n, 4) x0 y0 x1 y1, "scores": (n,), "labels": (n,)}`` per
    image (``DenseLearner.detect``'s output), or flat arrays ``{"image_id": (n,) image positions
    0..N-1, "boxes": (n, 4), "scores": (n,), "labels": (n,)}`` (what the protocol saves)."""
    if isinstance(detections, Mapping):
        return _flat_rows(detections, num_images, num_classes)
    if len(detections) != num_images:
        raise ValueError(f"detections: {len(detections)} images of detections for {num_images} images of ground truth")
    rows = []
    for i, det in enumerate(detections):
        rows += _flat_rows({**det, "image_id": np.full(len(_array(det["scores"], np.float64).reshape(-1)), i)},
                           num_images, num_classes, where=f"detections[{i}]")
    return rows


def _flat_rows(det: Mapping, num_images: int, num_classes: int, where: str = "detections") -> list[dict]:
    for key in ("image_id", "boxes", "scores", "labels"):
        if key not in det:
            raise ValueError(f"{where}.{key}: missing")
    image_ids = _array(det["image_id"], np.int64).reshape(-1)
    boxes = _array(det["boxes"], np.float64).reshape(-1, 4)
    scores = _array(det["scores"], np.float64).reshape(-1)
    labels = _array(det["labels"], np.int64).reshape(-1)
    if not (len(image_ids) == len(boxes) == len(scores) == len(labels)):
        raise ValueError(f"{where}: {len(image_ids)} image ids, {len(boxes)} boxes, {len(scores)} scores and "
                         f"{len(labels)} labels (one of each per detection)")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"{where}.labels: a class outside [0, {num_classes})")
    if len(image_ids) and (int(image_ids.min()) < 0 or int(image_ids.max()) >= num_images):
        raise ValueError(f"{where}.image_id: an image outside [0, {num_images})")
    if not np.isfinite(boxes).all() or not np.isfinite(scores).all():
        raise ValueError(f"{where}: non-finite boxes or scores")
    return [{"image_id": int(i) + 1, "category_id": int(label) + 1,
             "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], "score": float(score)}
            for i, (x0, y0, x1, y1), score, label in zip(image_ids, boxes, scores, labels)]


def _empty_results(gt):
    from pycocotools.coco import COCO

    dt = COCO()
    dt.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                  "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        dt.createIndex()
    return dt


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else float("nan")


def band_means(per_class: np.ndarray, bands: Mapping[str, Sequence[int]] | None) -> dict[str, float]:
    """``{"ap_<band>": nanmean of per_class over the band's classes}`` (NaN where no class of the band
    has a value)."""
    out = {}
    for name, members in (bands or {}).items():
        idx = [int(k) for k in members]
        if any(k < 0 or k >= len(per_class) for k in idx):
            raise ValueError(f"bands.{name}: a class outside [0, {len(per_class)})")
        values = per_class[idx] if idx else np.array([])
        values = values[~np.isnan(values)]
        out[f"ap_{name}"] = float(values.mean()) if values.size else float("nan")
    return out


def coco_ap(gt_boxes, gt_labels, detections, num_classes: int,
            bands: Mapping[str, Sequence[int]] | None = None) -> dict:
    """COCO box AP of ``detections`` (one dict per image, ``DenseLearner.detect``'s format, or flat
    arrays with ``image_id``: see ``coco_detections``) against
    the ground truth ``gt_boxes`` (N, k_max, 4) / ``gt_labels`` (N, k_max) (-1 pads).

    Returns ``{"ap", "ap50", "ap75", "per_class_ap" (list of C floats, NaN where a class has no
    ground truth), "ap_rare", "ap_common", "ap_frequent"}`` (one ``ap_<band>`` per key of ``bands``,
    the mean of its classes' per-class AP)."""
    from pycocotools.cocoeval import COCOeval

    if num_classes < 1:
        raise ValueError(f"num_classes: {num_classes} (at least 1)")
    gt = coco_ground_truth(gt_boxes, gt_labels, num_classes)
    rows = coco_detections(detections, len(gt.dataset["images"]), num_classes)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(rows) if rows else _empty_results(gt)
        evaluator = COCOeval(gt, dt, iouType="bbox")
        evaluator.evaluate()
        evaluator.accumulate()
    params = evaluator.params
    area_all = params.areaRngLbl.index("all")
    max_dets = len(params.maxDets) - 1  # the largest (100)
    # precision[t, r, k, a, m]: interpolated precision at IoU threshold t, recall threshold r, class k
    precision = evaluator.eval["precision"][:, :, :, area_all, max_dets]
    t50 = int(np.argmin(np.abs(params.iouThrs - 0.5)))
    t75 = int(np.argmin(np.abs(params.iouThrs - 0.75)))
    per_class = np.array([_mean_valid(precision[:, :, k]) for k in range(num_classes)])
    out = {"ap": _mean_valid(precision), "ap50": _mean_valid(precision[t50]), "ap75": _mean_valid(precision[t75]),
           "per_class_ap": [float(v) for v in per_class]}
    out.update({f"ap_{name}": float("nan") for name in BAND_NAMES})  # a band not given has no value
    out.update(band_means(per_class, bands))
    return out


coco_detection_metrics = coco_ap  # the name the dense protocol imports
