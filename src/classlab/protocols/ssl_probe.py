"""The ssl family's evaluation: probes on a FROZEN pretrained backbone.

Every ssl method is a pretrain node (``classlab train --family pretrain``) trained at the same budget;
this module reads its ``model.pt`` and never updates the backbone (eval mode, no gradient to it).

Image-level probes (``run_probe``), on a single-label dataset, on the pooled feature f(x):

- **Linear probe.** Multinomial logistic regression (scikit-learn, L-BFGS) on standardised features of
  the train split; its inverse regularisation C is chosen from ``linear_c`` by accuracy on the val split
  (held out from train), and the test accuracy of that C is reported.
- **k-NN.** The weighted k-NN of Wu et al. ("Unsupervised Feature Learning via Non-Parametric Instance
  Discrimination", CVPR 2018; DINO's evaluation): cosine similarities s_i between the L2-normalised
  query and train features, the k most similar vote for their class with weight exp(s_i / T):

      score(c) = sum_{i in top-k} exp(s_i / T) [y_i = c],     prediction = argmax_c score(c)

  with the paper's k = 20 and T = 0.07 (``knn_k``, ``knn_temperature``), fixed, not tuned.

Dense probe (``run_segmentation_probe``), on a dense scenes dataset (``fashion_mnist_lt_scenes``):

- **Segmentation probe.** The linear per-pixel head of dense SSL evaluation (a 1x1 convolution on the
  frozen last feature map, ``classlab.models.backbones.dense_features``, standardised per channel),
  trained with Adam on the semantic masks (C + 1 classes, 0 background) at the feature grid's
  resolution: the target of a feature cell is the class distribution of the pixels it covers, the loss
  the soft-target cross-entropy (training at pixel resolution costs (image / grid)^2 times more, 16x
  on the 84x84 scenes, for a head that is linear per cell anyway). For scoring, its logits are
  upsampled bilinearly to every pixel. The epoch is chosen by val mIoU (evaluated after each
  epoch) and the test metrics of that epoch's head are reported: mIoU (``classlab.metrics.segmentation``,
  one confusion over all test pixels), mIoU of the object classes, mean F1, pixel accuracy, and the mIoU
  of each LVIS frequency band (rare / common / frequent classes of the manifest).

Outputs in ``out_dir``: ``metrics.json`` (written last, atomically). Bad input (an empty split, a
multi-label dataset for the image probes, a dataset without semantic masks for the dense probe, a
probe setting out of range) raises ``ConfigError`` naming the field before anything is written.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from classlab.config import ConfigError, PROBE_DEFAULTS, probe_settings  # noqa: F401 (re-exported)

PROTOCOL = "ssl_probe"
# --- features of a frozen backbone ------------------------------------------------------------------

def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    view = (1, -1, 1, 1)
    return (x.float() / 255.0 - torch.tensor(mean).view(view)) / torch.tensor(std).view(view)


@torch.no_grad()
def frozen_features(model, x: torch.Tensor, mean, std, dense: bool = False, batch_size: int = 256) -> torch.Tensor:
    """The pooled features (N, D) of uint8 images, or with ``dense`` the last feature maps (N, D, h, w),
    of ``model`` in eval mode, normalised with the statistics the backbone was trained with."""
    from classlab.models.backbones import dense_features

    model.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = _normalise(x[start:start + batch_size], mean, std)
        out.append(dense_features(model, xb) if dense else model.features(xb))
    return torch.cat(out).float()


def weighted_knn_predict(train_f: torch.Tensor, train_y: torch.Tensor, query_f: torch.Tensor, num_classes: int,
                         k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Wu et al.'s weighted k-NN: score(c) = sum over the k nearest (cosine) of exp(s_i / T) [y_i = c]."""
    train_f = F.normalize(train_f, dim=1)
    query_f = F.normalize(query_f, dim=1)
    k = min(k, len(train_f))
    preds = []
    for start in range(0, len(query_f), chunk):
        sims = query_f[start:start + chunk] @ train_f.T
        top, idx = sims.topk(k, dim=1)
        weights = (top / temperature).exp()  # exp(s_i / T)
        scores = torch.zeros(len(top), num_classes, dtype=weights.dtype)
        scores.scatter_add_(1, train_y[idx], weights)  # sum_i exp(s_i / T) [y_i = c]
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds)


def linear_probe(train_f, train_y, val_f, val_y, test_f, test_y, cs, max_iter: int, seed: int) -> dict:
    """Logistic regression on standardised features; C chosen by val accuracy, test accuracy of that C."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_f.numpy())
    xtr, xva, xte = (scaler.transform(f.numpy()) for f in (train_f, val_f, test_f))
    ytr, yva, yte = (y.numpy() for y in (train_y, val_y, test_y))
    val_acc, fitted = {}, {}
    for c in cs:
        clf = LogisticRegression(C=float(c), max_iter=max_iter, random_state=seed).fit(xtr, ytr)
        val_acc[float(c)] = float((clf.predict(xva) == yva).mean())
        fitted[float(c)] = clf
    best = max(val_acc, key=lambda c: (val_acc[c], -c))  # ties: the stronger regularisation
    return {"linear_probe_acc": float((fitted[best].predict(xte) == yte).mean()),
            "linear_probe_val_acc": val_acc[best], "linear_c": best,
            "linear_val_curve": {str(c): a for c, a in val_acc.items()}}


def _per_class_subset(y: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    if per_class <= 0:
        return torch.arange(len(y))
    gen = torch.Generator().manual_seed(int(seed))
    keep = []
    for c in y.unique().tolist():
        idx = torch.nonzero(y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.sort(torch.cat(keep)).values


def _provenance_fields(model_path: Path, meta: dict, data_dir: Path, manifest: dict) -> dict:
    from classlab.engine.fingerprint import dataset_digest, file_digest

    return {"pretrain_method": meta.get("method"), "pretrain_dataset": meta.get("dataset"),
            "backbone": meta.get("backbone"), "pretrain_steps": int(meta.get("train_steps", 0)),
            "pretrain_batch_size": int(meta.get("batch_size", 0)), "model": str(model_path),
            "model_digest": file_digest(model_path), "data_digest": dataset_digest(manifest),
            "dataset": manifest["dataset"]}


# --- image-level probes -----------------------------------------------------------------------------

def run_probe(model_path: Path, data_dir: Path, seed: int, out_dir: Path, probe: dict | None = None,
              threads: int | None = None) -> dict:
    """Linear probe and weighted k-NN on the frozen pooled features (see the module docstring)."""
    from classlab.data.prepare import load_prepared
    from classlab.engine.device import seed_everything, set_threads
    from classlab.io import write_json
    from classlab.provenance import run_provenance

    s = probe_settings(probe)
    model_path, data_dir, out_dir = Path(model_path), Path(data_dir), Path(out_dir)
    data = load_prepared(data_dir)
    for split in ("train", "val", "test"):
        part = getattr(data, split)
        if len(part) == 0:
            raise ConfigError(f"data_dir: the {split} split of {data_dir} is empty; the probes need train, val and test")
        if part.y.dim() != 1:
            raise ConfigError(f"data_dir: {data_dir} is a multi-label dataset ({data.manifest['dataset']}); the linear "
                              f"and k-NN probes need one class per image (the dense probe reads scenes)")
    from classlab.train import load_model

    model, meta = load_model(model_path)
    set_threads(threads)
    seed_everything(int(seed))
    t0 = time.time()
    mean, std = meta["channel_mean"], meta["channel_std"]
    keep = _per_class_subset(data.train.y, int(s["train_per_class"]), seed)
    train_y = data.train.y[keep]
    train_f = frozen_features(model, data.train.x[keep], mean, std)
    val_f = frozen_features(model, data.val.x, mean, std)
    test_f = frozen_features(model, data.test.x, mean, std)
    k = data.num_classes
    knn_val = weighted_knn_predict(train_f, train_y, val_f, k, s["knn_k"], s["knn_temperature"])
    knn_test = weighted_knn_predict(train_f, train_y, test_f, k, s["knn_k"], s["knn_temperature"])
    metrics = {"protocol": PROTOCOL, "probe": "image", "method": meta.get("method"), "seed": int(seed),
               **_provenance_fields(model_path, meta, data_dir, data.manifest),
               "knn_acc": float((knn_test == data.test.y).float().mean()),
               "knn_val_acc": float((knn_val == data.val.y).float().mean()),
               **linear_probe(train_f, train_y, val_f, data.val.y, test_f, data.test.y, s["linear_c"],
                              s["linear_max_iter"], int(seed)),
               "train_samples": int(len(keep)), "feature_dim": int(train_f.shape[1]), "settings": s,
               "probe_seconds": time.time() - t0, "provenance": run_provenance()}
    write_json(out_dir / "metrics.json", metrics)
    return metrics


# --- the dense probe --------------------------------------------------------------------------------

def _confusion_of(head, feats: torch.Tensor, masks: torch.Tensor, num_classes: int, batch_size: int) -> np.ndarray:
    from classlab.metrics.segmentation import pixel_confusion

    total = np.zeros((num_classes, num_classes), dtype=np.int64)
    with torch.no_grad():
        for start in range(0, len(feats), batch_size):
            logits = head(feats[start:start + batch_size])
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            total += pixel_confusion(logits.argmax(1), masks[start:start + batch_size], num_classes)
    return total


def run_segmentation_probe(model_path: Path, data_dir: Path, seed: int, out_dir: Path, probe: dict | None = None,
                           threads: int | None = None) -> dict:
    """A linear per-pixel head on the frozen last feature map, trained on the semantic masks (see the
    module docstring)."""
    from classlab.data.prepare import load_prepared
    from classlab.engine.device import seed_everything, set_threads
    from classlab.io import write_json
    from classlab.metrics.segmentation import mean_over, per_class_iou, segmentation_summary
    from classlab.provenance import run_provenance

    s = probe_settings(probe)
    model_path, data_dir, out_dir = Path(model_path), Path(data_dir), Path(out_dir)
    data = load_prepared(data_dir)
    for split in ("train", "val", "test"):
        part = getattr(data, split)
        if part.semantic_masks is None:
            raise ConfigError(f"data_dir: {data_dir} ({data.manifest['dataset']}) has no semantic masks; the "
                              f"segmentation probe needs a dense scenes dataset (fashion_mnist_lt_scenes)")
        if len(part) == 0:
            raise ConfigError(f"data_dir: the {split} split of {data_dir} is empty; the probe needs train, val and test")
    from classlab.train import load_model

    model, meta = load_model(model_path)
    set_threads(threads)
    seed_everything(int(seed))
    t0 = time.time()
    mean, std = meta["channel_mean"], meta["channel_std"]
    feats = {split: frozen_features(model, getattr(data, split).x, mean, std, dense=True)
             for split in ("train", "val", "test")}
    masks = {split: getattr(data, split).semantic_masks.long() for split in ("train", "val", "test")}
    # standardise each channel with the train statistics (the head then starts on a common scale)
    mu = feats["train"].mean(dim=(0, 2, 3), keepdim=True)
    sd = feats["train"].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    feats = {k: (v - mu) / sd for k, v in feats.items()}
    n_out = data.num_classes + 1  # VOC convention: 0 background, k + 1 class k
    gen = torch.Generator().manual_seed(int(seed))
    head = torch.nn.Conv2d(feats["train"].shape[1], n_out, kernel_size=1)
    with torch.no_grad():  # a seeded initialisation, independent of the global RNG's history
        bound = 1.0 / feats["train"].shape[1] ** 0.5
        head.weight.uniform_(-bound, bound, generator=gen)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=float(s["seg_lr"]))
    bs, n_train = int(s["seg_batch_size"]), len(feats["train"])
    # training targets: each feature cell's class distribution (the one-hot masks averaged over the
    # pixels the cell covers), so the head trains at the feature grid's resolution; evaluation
    # upsamples its logits to every pixel
    grid = feats["train"].shape[-2:]
    soft = torch.cat([F.adaptive_avg_pool2d(F.one_hot(masks["train"][i:i + 64], n_out).permute(0, 3, 1, 2).float(), grid)
                      for i in range(0, n_train, 64)])
    best = (-1.0, 0, None)
    val_curve = []
    for epoch in range(1, int(s["seg_epochs"]) + 1):
        order = torch.randperm(n_train, generator=gen)
        for start in range(0, n_train, bs):
            idx = order[start:start + bs]
            # soft-target cross-entropy: - sum_c q_c log softmax(z)_c per cell, mean over cells
            loss = -(soft[idx] * F.log_softmax(head(feats["train"][idx]), dim=1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        val_miou = segmentation_summary(_confusion_of(head, feats["val"], masks["val"], n_out, 64))["miou"]
        val_curve.append(val_miou)
        if val_miou > best[0]:
            best = (val_miou, epoch, {k: v.detach().clone() for k, v in head.state_dict().items()})
    head.load_state_dict(best[2])
    confusion = _confusion_of(head, feats["test"], masks["test"], n_out, 64)
    summary = segmentation_summary(confusion)
    iou = per_class_iou(confusion)
    bands = (data.manifest.get("dense") or {}).get("bands") or {}
    band_miou = {f"miou_{band}": mean_over(iou, [c + 1 for c in classes]) for band, classes in bands.items()}
    metrics = {"protocol": PROTOCOL, "probe": "segmentation", "method": meta.get("method"), "seed": int(seed),
               **_provenance_fields(model_path, meta, data_dir, data.manifest), **summary, **band_miou,
               "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
               "val_miou": best[0], "chosen_epoch": best[1], "val_miou_curve": val_curve,
               "feature_map": list(feats["train"].shape[1:]), "settings": s,
               "probe_seconds": time.time() - t0, "provenance": run_provenance()}
    write_json(out_dir / "metrics.json", metrics)
    return metrics
