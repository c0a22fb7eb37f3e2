"""The dense family's protocol: detection and semantic segmentation on long-tailed scenes.

Data. A dense scenes dataset (``classlab.data.dense_scenes``: ``fashion_mnist_lt_scenes``,
``digits_lt_scenes``): RGB canvases holding several objects, each of one of C classes (colour x
garment), with their boxes, instance and semantic masks. The train split is long-tailed; val and test
are class-balanced. Classes fall in LVIS's frequency bands (rare / common / frequent, by the number
of training images that hold the class), recorded in the manifest's ``dense.bands``.

Run. Every method is a ``DenseLearner`` (``classlab.methods.dense_learner``) of one task, trained
from scratch on the whole train split by the engine for the budget its YAML names (every method of a
task has the same budget keys; a test checks). Nothing is chosen on test: the budgets were chosen on
val with the baseline of each task, and val metrics are reported next to test ones (``val_`` prefix).

Scores (both on val and on test):

- detection: COCO AP by pycocotools (``classlab.metrics.detection``): AP@[.50:.95], AP50, AP75, the
  per-class AP and its mean over each frequency band (LVIS's APr / APc / APf, here ``ap_rare``,
  ``ap_common``, ``ap_frequent``);
- segmentation: one pixel confusion matrix over the split (``classlab.metrics.segmentation``): mIoU
  (background included, the VOC convention), per-class IoU and F1 and their means over each band of
  object classes (``f1_rare``, ``miou_rare``, ...), and the pixel calibration of the softmax: ECE over
  every pixel with 15 equal-width confidence bins (Guo et al. 2017), accumulated batch by batch.

Outputs, in ``out_dir``: ``predictions.npz`` (test: detections as flat arrays with their image ids, or
the predicted masks, uint8) and ``metrics.json`` (written last). Bad input raises ``ConfigError``
naming the field before anything is written: a dataset without dense targets (``data_dir``), an empty
split, masks whose shape does not match their images (``masks``, raised by ``load_prepared``), an
unknown method or one that is not a ``DenseLearner`` (``method``).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from classlab.config import ConfigError

PROTOCOL = "dense"
FAMILY = "dense"
SPLITS = ("train", "val", "test")
EVAL_BATCH = 64
ECE_BINS = 15


def dense_method_class(method: str) -> type:
    """The registered class of ``dense/<method>``; refuses a method that is not a ``DenseLearner``."""
    from classlab.methods.dense_learner import DenseLearner
    from classlab.methods.registry import get_method

    try:
        cls = get_method(FAMILY, method)
    except (KeyError, ConfigError) as err:
        raise ConfigError(f"method: dense/{method} is not a method of the dense family ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, DenseLearner)):
        raise ConfigError(f"method: dense/{method} is not a DenseLearner; it does not run on the dense protocol")
    return cls


def load_dense_data(data_dir: Path):
    """The prepared scenes with their dense targets, every split present and non-empty."""
    from classlab.data.prepare import load_prepared

    data = load_prepared(Path(data_dir))  # masks not the size of their images: MaskError naming `masks`
    for split in SPLITS:
        part = getattr(data, split)
        if part.semantic_masks is None or part.object_labels is None or part.object_boxes is None:
            raise ConfigError(f"data_dir: {data_dir} ({data.manifest.get('dataset')}) has no dense targets (boxes, "
                              f"labels, semantic masks) in its {split} split; the dense protocol needs a dense "
                              f"scenes dataset such as fashion_mnist_lt_scenes")
        if len(part) == 0:
            raise ConfigError(f"data_dir: the {split} split of {data_dir} is empty; the dense protocol trains on "
                              f"train and scores val and test")
    if not (data.manifest.get("dense") or {}).get("bands"):
        raise ConfigError(f"data_dir: {data_dir}'s manifest has no dense.bands (the classes' frequency bands)")
    return data


def split_targets(part):
    from classlab.methods.dense_learner import DenseTargets

    return DenseTargets(part.object_boxes.float(), part.object_labels.long(), part.semantic_masks.long())


def _eval_batches(x: torch.Tensor, mean, std, device: torch.device):
    from classlab.data.loader import TensorLoader

    loader = TensorLoader(x, torch.zeros(len(x), dtype=torch.long), EVAL_BATCH, device=device, mean=mean, std=std)
    for batch in loader:
        yield batch["x"], batch["index"].cpu()


@torch.no_grad()
def evaluate_detection(learner, part, mean, std, device, bands: dict, num_classes: int) -> tuple[dict, dict]:
    """(COCO AP metrics, the detections as flat arrays) of ``learner`` on a split."""
    from classlab.metrics.detection import coco_detection_metrics

    learner.eval()
    image_ids, boxes, scores, labels = [], [], [], []
    for x, index in _eval_batches(part.x, mean, std, device):
        for i, det in zip(index.tolist(), learner.detect(x)):
            n = len(det["scores"])
            image_ids.append(np.full(n, i, dtype=np.int64))
            boxes.append(det["boxes"].detach().float().cpu().numpy().reshape(n, 4))
            scores.append(det["scores"].detach().float().cpu().numpy())
            labels.append(det["labels"].detach().cpu().numpy().astype(np.int64))
    detections = {"image_id": np.concatenate(image_ids), "boxes": np.concatenate(boxes).astype(np.float32),
                  "scores": np.concatenate(scores).astype(np.float32), "labels": np.concatenate(labels)}
    metrics = coco_detection_metrics(part.object_boxes.numpy(), part.object_labels.numpy(), detections,
                                     num_classes=num_classes, bands=bands)
    return metrics, detections


@torch.no_grad()
def evaluate_segmentation(learner, part, mean, std, device, bands: dict, num_classes: int) -> tuple[dict, dict]:
    """(mIoU, band F1/IoU and pixel ECE, the predicted masks) of ``learner`` on a split."""
    from classlab.metrics.segmentation import (calibration_bins, expected_calibration_error_from_bins, mean_over,
                                               per_class_f1, per_class_iou, pixel_confusion, segmentation_summary)

    learner.eval()
    n_out = num_classes + 1  # 0 background, k + 1 class k
    confusion = np.zeros((n_out, n_out), dtype=np.int64)
    bins = None
    masks = torch.zeros(part.semantic_masks.shape, dtype=torch.uint8)
    target_all = part.semantic_masks.long()
    for x, index in _eval_batches(part.x, mean, std, device):
        logits = learner.segment_logits(x).float()
        if logits.shape[1] != n_out or tuple(logits.shape[-2:]) != tuple(target_all.shape[-2:]):
            raise RuntimeError(f"dense/{learner.name}: segment_logits gave {tuple(logits.shape)}; expected "
                               f"(B, {n_out}, {tuple(target_all.shape[-2:])})")
        probs = logits.softmax(dim=1).cpu()
        pred = probs.argmax(dim=1)
        target = target_all[index]
        masks[index] = pred.to(torch.uint8)
        confusion += pixel_confusion(pred, target, n_out)
        counts = calibration_bins(probs, target, n_bins=ECE_BINS)
        bins = counts if bins is None else tuple(a + b for a, b in zip(bins, counts))
    iou, f1 = per_class_iou(confusion), per_class_f1(confusion)
    metrics = dict(segmentation_summary(confusion))
    for band, classes in bands.items():
        ids = [c + 1 for c in classes]
        metrics[f"miou_{band}"] = mean_over(iou, ids)
        metrics[f"f1_{band}"] = mean_over(f1, ids)
    metrics["pixel_ece"] = float(expected_calibration_error_from_bins(*bins))
    metrics["per_class_iou"] = [None if np.isnan(v) else float(v) for v in iou]
    metrics["per_class_f1"] = [None if np.isnan(v) else float(v) for v in f1]
    return metrics, {"masks": masks.numpy()}


def _json_list(values: list) -> list:
    """A per-class list for metrics.json: NaN (a class without ground truth) written as null."""
    return [None if v is None or (isinstance(v, float) and v != v) else v for v in values]


def run_dense(method: str, data_dir: Path, seed: int, out_dir: Path, backbone: str = "convnet",
              backbone_kwargs: dict | None = None, overrides: dict | None = None, threads: int | None = None,
              device: str | None = None, progress: bool = True) -> dict:
    """Train ``dense/<method>`` on the train split and score it on val and test (module docstring)."""
    from classlab.config import resolve_checked_hparams
    from classlab.engine import Trainer, TrainConfig
    from classlab.engine.device import pick_device, seed_everything, set_threads
    from classlab.engine.fingerprint import dataset_digest, make_fingerprint
    from classlab.io import atomic_path, write_json
    from classlab.models import build_classifier
    from classlab.provenance import run_provenance

    # --- every check before anything is trained or written ---------------------------------------
    cls = dense_method_class(method)
    hp = resolve_checked_hparams(FAMILY, method, overrides)
    data = load_dense_data(Path(data_dir))
    manifest = data.manifest
    num_classes = int(manifest["num_classes"])
    bands = {band: [int(c) for c in classes] for band, classes in manifest["dense"]["bands"].items()}
    image_shape = tuple(int(v) for v in manifest["shape"])

    set_threads(threads)
    backbone_kwargs = dict(backbone_kwargs or {})
    dev = pick_device(device)
    seed_everything(int(seed))
    model = build_classifier(backbone, image_shape[0], num_classes, img_size=image_shape[1],
                             backbone_kwargs=backbone_kwargs)
    learner = cls(model, hp, num_classes, image_shape=image_shape)
    learner.class_names = list(manifest.get("class_names") or [str(c) for c in range(num_classes)])
    learner.set_targets(split_targets(data.train).to(dev))
    fingerprint = make_fingerprint(protocol=PROTOCOL, method=method, hparams=hp, seed=int(seed),
                                   data=dataset_digest(manifest), backbone=backbone, backbone_kwargs=backbone_kwargs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mean, std = manifest["channel_mean"], manifest["channel_std"]

    # --- training ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    trainer = Trainer(learner, TrainConfig.from_hparams(hp), dev, int(seed), out_dir / "last.pt", progress,
                      fingerprint=fingerprint)
    history = []
    if int(hp["epochs"]) > 0:
        history = trainer.fit(trainer.make_loader(data.train.x, torch.zeros(len(data.train), dtype=torch.long),
                                                  mean, std))
    train_seconds = time.perf_counter() - t0

    # --- scores on val (reported next to test; nothing is chosen on test) -------------------------
    t1 = time.perf_counter()
    evaluate = evaluate_detection if cls.task == "detection" else evaluate_segmentation
    val_metrics, _ = evaluate(learner, data.val, mean, std, dev, bands, num_classes)
    test_metrics, predictions = evaluate(learner, data.test, mean, std, dev, bands, num_classes)
    eval_seconds = time.perf_counter() - t1

    with atomic_path(out_dir / "predictions.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, task=np.array(cls.task), **predictions)
    scalars = {k: v for k, v in test_metrics.items() if not isinstance(v, list)}
    metrics = {
        "protocol": PROTOCOL, "family": FAMILY, "task": cls.task, "method": method, "seed": int(seed),
        "dataset": manifest.get("dataset", ""), "backbone": backbone, "backbone_kwargs": backbone_kwargs,
        **scalars, **{f"val_{k}": v for k, v in val_metrics.items() if not isinstance(v, list)},
        **{k: _json_list(v) for k, v in test_metrics.items() if isinstance(v, list)},
        "bands": bands, "class_names": learner.class_names, "n_train_images": len(data.train),
        "n_val_images": len(data.val), "n_test_images": len(data.test),
        "train_steps": int(trainer.steps_done), "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "history": history, "hparams": hp, "fingerprint": fingerprint, "provenance": run_provenance(),
    }
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / "last.pt").unlink(missing_ok=True)
    return metrics
