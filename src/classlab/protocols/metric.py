"""The metric family's protocol: zero-shot retrieval on classes never seen in training.

The CUB/Cars protocol of deep metric learning (Oh Song et al., CVPR 2016), run as "A Metric Learning
Reality Check" (Musgrave, Belongie and Lim, ECCV 2020) asks: every method gets the same backbone,
embedding size, optimizer and budget, and hyperparameters are chosen on held-out *training* classes,
never on the test classes.

Classes. On a prepared single-label dataset with K classes (labels 0..K-1), the first K // 2 in label
order are the training classes and the rest the test classes; no image of a test class is ever trained
on. Two modes:

- ``select=True`` (choosing hyperparameters): train on the training classes minus the last
  ``val_classes`` of them, and retrieve among the held-out training classes' *val*-split images. Its
  metrics are written with a ``val_`` prefix (``val_recall_at_1``, ...).
- ``select=False`` (reporting): train on all training classes and retrieve among the test classes'
  *test*-split images (``recall_at_1``, ...).

Training uses the train split's images of the training classes, at most ``samples_per_class`` per class
(0: all; a subset seeded by the run's seed, the same for every method of a seed). The retrieval set is
at most ``eval_per_class`` images per class (0: all), drawn by a fixed generator: every method and seed
retrieves among the same images.

Model. The repo's backbone (``convnet`` by default, trained from scratch) with a linear embedding head to
``embedding_size`` dimensions; the embedding is L2-normalised. ``MetricLearner`` (``classlab.methods.metric_learner``) is the family's
learner: a method subclasses it and builds its loss (``make_loss``: a pytorch-metric-learning loss and
miner, or its own); a regulariser (ECAML, Metrix) builds the loss of the base method named by its
``base_loss`` hyperparameter, with that method's own loss hyperparameters (``loss_hparams``: read from
the base method's YAML, changed only through ``base_overrides``), so that a method and its base are
paired exactly. The family's shared keys (``SHARED_KEYS``: embedding size, budget, optimizer, data caps)
take the same values in every method's YAML (a test checks).

Metrics (``classlab.metrics.retrieval``): Recall@1/2/4/8, NMI of k-means with k = the number of
retrieved classes, and MAP@R, every retrieval image a query against all the others.

Outputs, in ``out_dir``: ``embeddings.npz`` (the retrieval set's embeddings, labels, positions in their
split) and ``metrics.json`` (written last). Bad input (an empty retrieval or training set, a
``val_classes`` leaving fewer than two training classes, an embedding size below 1, an unknown base
loss) raises ``ConfigError`` naming the field before anything is written.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.methods.metric_learner import FAMILY, METHODS, MetricLearner, base_loss_hparams, method_class

PROTOCOL = "metric"
EVAL_STREAM = 0x3E7_41C  # the fixed generator of the retrieval subset (independent of seed and method)


# --- the split -----------------------------------------------------------------------------------

def metric_classes(num_classes: int, select: bool, val_classes: int) -> tuple[list[int], list[int], list[int]]:
    """(trained classes, retrieved classes, test classes) of the protocol (see the module docstring)."""
    half = num_classes // 2
    first, test = list(range(half)), list(range(half, num_classes))
    if half < 2 or not test:
        raise ConfigError(f"data_dir: a dataset of {num_classes} classes has fewer than 2 training classes (the "
                          f"first half) or no test class; the retrieval protocol needs at least 4 classes")
    if not select:
        return first, test, test
    if isinstance(val_classes, bool) or not isinstance(val_classes, int) or val_classes < 2:
        raise ConfigError(f"val_classes: {val_classes!r}; give an integer >= 2 (a retrieval among one class is "
                          f"trivially right)")
    if half - val_classes < 2:
        raise ConfigError(f"val_classes: {val_classes} held-out classes leave {half - val_classes} of the {half} "
                          f"training classes to train on; a metric loss needs at least 2 (its negatives)")
    return first[:half - val_classes], first[half - val_classes:], test


def _per_class_subset(labels: torch.Tensor, classes: list[int], per_class: int, generator: torch.Generator):
    """Sorted positions of the samples of ``classes``, at most ``per_class`` of each (0: all), drawn by
    ``generator``."""
    picked = []
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        if per_class > 0 and len(idx) > per_class:
            idx = idx[torch.randperm(len(idx), generator=generator)[:per_class]]
        picked.append(idx)
    return torch.sort(torch.cat(picked)).values if picked else torch.zeros(0, dtype=torch.long)


# --- the run ---------------------------------------------------------------------------------------

def run_metric(method: str, data_dir: Path, seed: int, out_dir: Path, overrides: dict | None = None,
               backbone: str = "convnet", backbone_kwargs: dict | None = None, select: bool = False,
               threads: int | None = None, device: str | None = None, progress: bool = False) -> dict:
    """Train ``method`` on the training classes and retrieve among unseen classes (see the module
    docstring); write ``out_dir/embeddings.npz`` and ``out_dir/metrics.json`` and return the metrics."""
    from classlab.data.loader import mix_seed
    from classlab.data.prepare import load_prepared
    from classlab.engine import Trainer, TrainConfig
    from classlab.engine.device import pick_device, seed_everything, set_threads
    from classlab.engine.fingerprint import dataset_digest, make_fingerprint
    from classlab.engine.predict import predict_outputs
    from classlab.io import atomic_path, write_json
    from classlab.metrics.retrieval import retrieval_metrics
    from classlab.models import build_classifier
    from classlab.provenance import run_provenance

    # --- every check before anything is read, trained or written --------------------------------
    hp = resolve_checked_hparams(FAMILY, method, overrides)  # names the key: embedding_size < 1, ...
    cls = method_class(method)
    if not issubclass(cls, MetricLearner):
        raise ConfigError(f"method: metric/{method} does not run on the retrieval protocol (it is not a "
                          f"MetricLearner); allowed values: {list(METHODS)}")
    if not cls.is_base_loss:
        base_loss_hparams(hp["base_loss"], hp.get("base_overrides"))
    select = bool(select)
    data = load_prepared(Path(data_dir))
    manifest = data.manifest
    k = int(manifest["num_classes"])
    trained, retrieved, test_classes = metric_classes(k, select, hp["val_classes"])
    eval_split = "val" if select else "test"
    part = getattr(data, eval_split)
    eval_idx = _per_class_subset(part.y, retrieved, int(hp["eval_per_class"]),
                                 torch.Generator().manual_seed(mix_seed(EVAL_STREAM)))
    if len(eval_idx) < 2:
        raise ConfigError(f"data_dir: the {eval_split} split of {data_dir} holds {len(eval_idx)} image(s) of the "
                          f"{'held-out validation' if select else 'test'} classes {retrieved}: an empty retrieval "
                          f"set (it needs at least 2 images)")
    from classlab.train import training_subset

    train_idx = training_subset(data.train.y, trained, int(hp["samples_per_class"]), int(seed))
    if train_idx is None or len(train_idx) == 0:
        raise ConfigError(f"data_dir: the train split of {data_dir} holds no image of the training classes {trained}")
    train_y = data.train.y[train_idx]
    assert set(train_y.unique().tolist()) <= set(trained), "a test class leaked into training"

    # --- training ---------------------------------------------------------------------------------
    set_threads(threads)
    backbone_kwargs = dict(backbone_kwargs or {})
    dev = pick_device(device)
    seed_everything(int(seed))
    model = build_classifier(backbone, int(manifest["shape"][0]), int(hp["embedding_size"]),
                             img_size=int(manifest["shape"][1]), backbone_kwargs=backbone_kwargs)
    learner = cls(model, hp, len(trained))  # labels 0..len(trained)-1 are the trained classes themselves
    names = list(manifest.get("class_names") or [str(c) for c in range(k)])
    learner.class_names = [names[c] for c in trained]
    fingerprint = make_fingerprint(protocol=PROTOCOL, method=method, hparams=hp, loss_hparams=learner.loss_hparams,
                                   seed=int(seed), select=select, data=dataset_digest(manifest), backbone=backbone,
                                   backbone_kwargs=backbone_kwargs, trained=trained)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mean, std = manifest["channel_mean"], manifest["channel_std"]
    t0 = time.perf_counter()
    trainer = Trainer(learner, TrainConfig.from_hparams(hp), dev, int(seed), out_dir / "last.pt", progress,
                      fingerprint=fingerprint)
    history = []
    if int(hp["epochs"]) > 0:
        history = trainer.fit(trainer.make_loader(data.train.x[train_idx], train_y, mean, std))
    train_seconds = time.perf_counter() - t0

    # --- retrieval --------------------------------------------------------------------------------
    t1 = time.perf_counter()
    emb = predict_outputs(learner, part.x[eval_idx], mean, std, dev)["logits"].numpy().astype(np.float32)
    labels = part.y[eval_idx].numpy()
    scores = retrieval_metrics(emb, labels, seed=int(seed))
    eval_seconds = time.perf_counter() - t1
    prefix = "val_" if select else ""
    metrics_part = {f"{prefix}{key}": value for key, value in scores.items() if key != "n_queries"}
    with atomic_path(out_dir / "embeddings.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, embeddings=emb, labels=labels, index=eval_idx.numpy(),
                                split=np.array(eval_split), classes=np.array(retrieved))
    metrics = {
        "protocol": PROTOCOL, "family": FAMILY, "method": method, "seed": int(seed),
        "dataset": manifest.get("dataset", ""), "backbone": backbone, "backbone_kwargs": backbone_kwargs,
        "select": select, "eval_split": eval_split,
        "train_classes": trained, "test_classes": test_classes, "eval_classes": retrieved,
        "class_names": names, **metrics_part,
        "n_queries": int(scores["n_queries"]), "n_eval_images": int(len(labels)),
        "queries_per_class": {str(c): int((labels == c).sum()) for c in retrieved},
        "n_train_images": int(len(train_y)),
        "train_images_per_class": {str(c): int((train_y == c).sum()) for c in trained},
        "train_steps": int(trainer.steps_done), "train_seconds": train_seconds, "eval_seconds": eval_seconds,
        "history": history, "hparams": hp, "loss_hparams": learner.loss_hparams,
        "fingerprint": fingerprint, "provenance": run_provenance(),
    }
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / "last.pt").unlink(missing_ok=True)
    return metrics
