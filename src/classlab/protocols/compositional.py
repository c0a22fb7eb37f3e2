"""The vlm family's compositional zero-shot protocol (CZSL, as in CSP; Nayak et al., ICLR 2023).

The data is a pairs dataset (``classlab.data.pairs``: ``fashion_mnist_pairs``, ``digits_pairs``): each
label an (attribute, object) pair of a grid, some pairs held out of training (unseen), the train and
val splits holding the seen pairs only, the test split every pair. The pretrain stage's offline CLIP
(``pretrain/image_text``) was trained on the seen pairs only (its ``classes``); a method adapts it on
``shots`` training images per seen pair, drawn per seed (``few_shot_indices``), by training
(``learns``: CSP, CoOp, ...) or by filling a training-free cache with them (``needs_support``: the
method's ``fit_support(features, labels)`` receives the shots' image features from its own
``encode_image``; Tip-Adapter's ``cache``, ``comca``). Every pair of the grid is a candidate at test.

Reported on the test split (``classlab.metrics.compositional``): closed-world ``seen``, ``unseen``, ``hm``;
the calibration-bias sweep's ``auc``, ``best_hm``, ``best_seen``, ``best_unseen`` (``best_hm_bias``);
``unseen_attr_acc``, ``unseen_obj_acc``. On val (seen pairs only): ``val_seen`` (every pair a
candidate) and ``val_seen_among_seen`` (the seen pairs the only candidates).

One job is one (method, seed): ``out_dir/predictions.npz`` (test logits over every pair, labels) and
``out_dir/metrics.json``, written last. Bad input stops the job before anything is written: shots below
1 or above a seen pair's training images, a dataset without ``pairs`` in its manifest, a pretrained
model that is not an image-text model, was trained on other data, or whose image side saw an unseen pair.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.engine import predict_logits
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.engine.fingerprint import dataset_digest, make_fingerprint
from classlab.io import atomic_path, write_json
from classlab.methods.registry import get_method
from classlab.metrics.compositional import compositional_scores
from classlab.metrics.vlm import subset_accuracy
from classlab.protocols.vlm import adapt_on_shots, few_shot_indices, load_adaptable
from classlab.provenance import run_provenance

FAMILY = "vlm"


def run_compositional(method: str, pretrained: Path, data_dir: Path, seed: int, out_dir: Path, shots: int = 16,
                      overrides: dict | None = None, threads: int | None = None, device: str | None = None,
                      progress: bool = False) -> dict:
    """Adapt the pretrained image-text model with ``method`` on ``shots`` images per seen pair and test
    it with every pair a candidate; returns (and writes) the metrics."""
    from classlab.data.prepare import load_prepared

    set_threads(threads)
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 1:
        raise ConfigError(f"shots: {shots!r} must be a positive integer")
    hp = resolve_checked_hparams(FAMILY, method, overrides)
    cls = get_method(FAMILY, method)
    data = load_prepared(Path(data_dir))
    pairs = data.manifest.get("pairs")
    if not pairs or not pairs.get("seen") or not pairs.get("unseen"):
        raise ConfigError(f"data_dir: {data_dir} ({data.manifest.get('dataset')}) has no `pairs` in its manifest; "
                          "the compositional protocol needs a pairs dataset (fashion_mnist_pairs, digits_pairs)")
    k = data.num_classes
    seen, unseen = sorted(int(c) for c in pairs["seen"]), sorted(int(c) for c in pairs["unseen"])
    pretrained_model, meta, saw, pretrained_digest = load_adaptable(pretrained, data, device)
    names = list(data.manifest.get("class_names") or [str(c) for c in range(k)])
    if saw is not None and set(saw) & set(unseen):  # None: real CLIP, whose web pretraining is unknown
        leaked = sorted(set(saw) & set(unseen))
        raise ConfigError(f"pretrained: {pretrained}'s image side saw unseen pairs {[names[c] for c in leaked]} "
                          f"(labels {leaked}); compositional zero-shot needs a model trained on the seen pairs only")
    subset = few_shot_indices(data.train.y, seen, shots, seed)
    out_dir = Path(out_dir)
    fingerprint = make_fingerprint(protocol="compositional", method=method, hparams=hp, seed=int(seed), shots=shots,
                                   data=dataset_digest(data.manifest), pretrained=pretrained_digest)
    dev = pick_device(device)
    seed_everything(int(seed))
    learner = cls(pretrained_model, hp, k)
    learner.train_classes = list(seen)
    learner.pairs = pairs
    learner.build(names)
    mean, std = data.manifest["channel_mean"], data.manifest["channel_std"]
    history, steps, train_seconds = adapt_on_shots(learner, hp, data, subset, int(seed), out_dir, dev, fingerprint,
                                                   progress)
    scores = {}
    for split in ("val", "test"):  # val (seen pairs only) for every choice; test only for reporting
        part = getattr(data, split)
        if part is None or len(part.y) == 0:
            continue
        split_logits = predict_logits(learner, part.x, mean, std, dev).numpy()
        labels = part.y.numpy()
        if split == "val":
            acc = {"seen": float(np.mean(split_logits.argmax(1) == labels)),
                   "seen_among_seen": subset_accuracy(split_logits, labels, seen)}
        else:
            acc = compositional_scores(split_logits, labels, seen, unseen, pairs["pairs"])
        scores[split] = (split_logits, labels, acc)
    logits, labels, acc = scores["test"]
    val = {f"val_{key}": value for key, value in scores["val"][2].items()} if "val" in scores else {}
    with atomic_path(out_dir / "predictions.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, logits=logits.astype(np.float32), labels=labels)
    metrics = {"protocol": "compositional", "method": method, "seed": int(seed), "shots": shots, "dataset": data.manifest.get("dataset"),
               "backbone": meta.get("backbone", ""), "seen_pairs": seen, "unseen_pairs": unseen,
               "image_side_saw": saw if saw is not None else "the web (real CLIP)", **acc, **val,
               "shots_digest": hashlib.sha256(subset.numpy().tobytes()).hexdigest(), "train_steps": steps,
               "test_samples": int(len(labels)), "train_seconds": train_seconds, "history": history,
               "hparams": hp, "fingerprint": fingerprint, "provenance": run_provenance()}
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / "last.pt").unlink(missing_ok=True)
    return metrics
