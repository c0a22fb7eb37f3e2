"""Stage functions behind the CLI: train a method from a prepared dataset, evaluate it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from classlab.config import resolve_hparams
from classlab.data.prepare import load_prepared
from classlab.engine import Trainer, TrainConfig, load_checkpoint, predict_logits, save_checkpoint
from classlab.engine.checkpoint import CheckpointError
from classlab.engine.fingerprint import dataset_digest, file_digest, make_fingerprint
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.io import atomic_path, write_json
from classlab.methods.registry import get_method
from classlab.metrics import summarize_classification
from classlab.models import build_classifier
from classlab.provenance import run_provenance


def _model_from_meta(meta: dict):
    return build_classifier(meta["backbone"], int(meta["in_chans"]), int(meta["num_classes"]),
                            img_size=int(meta["img_size"]), backbone_kwargs=dict(meta.get("backbone_kwargs") or {}))


def load_model(path: str | Path):
    """Rebuild a Classifier from a ``model.pt`` written by ``train`` (plain tensors + meta)."""
    state = load_checkpoint(path)
    if "meta" not in state or "model" not in state:
        raise CheckpointError(f"{path} is not a classlab model checkpoint (needs 'model' and 'meta')")
    model = _model_from_meta(state["meta"])
    model.load_state_dict(state["model"])
    return model, state["meta"]


def train(family: str, method: str, data_dir: Path, backbone: str, seed: int, out_dir: Path,
          overrides: dict | None = None, indices: list[int] | None = None, init: Path | None = None,
          backbone_kwargs: dict | None = None,
          pretrained_weights: bool = False, threads: int | None = None, device: str | None = None,
          progress: bool = True) -> dict:
    """Train ``family/method`` and write ``model.pt`` and ``history.json`` into ``out_dir``.

    ``last.pt`` in ``out_dir`` is the per-epoch resume checkpoint; a rerun continues from it.
    The training samples are ``indices`` if given (they must lie in ``classes`` where that
    hyperparameter is set), else those of ``classes``, each cut to a seeded ``samples_per_class``
    subset where that is set; else the whole train split.
    """
    set_threads(threads)
    seed_everything(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hparams = resolve_hparams(family, method, overrides)
    data = load_prepared(data_dir)
    manifest = data.manifest
    dev = pick_device(device)
    meta = {"backbone": backbone, "backbone_kwargs": dict(backbone_kwargs or {}),
            "in_chans": int(manifest["shape"][0]), "img_size": int(manifest["shape"][1]),
            "num_classes": data.num_classes, "dataset": manifest["dataset"], "family": family,
            "method": method, "seed": seed, "hparams": json.dumps(hparams, sort_keys=True),
            "channel_mean": manifest["channel_mean"], "channel_std": manifest["channel_std"],
            "init": str(init) if init else ""}
    model = build_classifier(backbone, meta["in_chans"], meta["num_classes"], img_size=meta["img_size"],
                             pretrained=pretrained_weights, backbone_kwargs=meta["backbone_kwargs"])
    if init is not None:
        source, source_meta = load_model(init)
        if source_meta["backbone"] != backbone:
            raise ValueError(f"init checkpoint {init} holds a {source_meta['backbone']} backbone, not {backbone}")
        model.backbone.load_state_dict(source.backbone.state_dict())
        meta["head_init"] = _init_head(model, source, source_meta, meta, hparams.get("head_init", "fresh"))
    method_obj = get_method(family, method)(model, hparams, data.num_classes)
    subset = training_subset(data.train.y, hparams.get("classes") or [], int(hparams.get("samples_per_class") or 0),
                             seed, indices)
    # last.pt belongs to this computation only: a rerun under an edited config starts fresh
    fingerprint = make_fingerprint(family=family, method=method, hparams=hparams, data=dataset_digest(manifest),
                                   backbone=backbone, backbone_kwargs=meta["backbone_kwargs"], seed=seed,
                                   init=file_digest(init), pretrained_weights=bool(pretrained_weights),
                                   subset=_digest_indices(subset))
    trainer = Trainer(method_obj, TrainConfig.from_hparams(hparams), dev, seed, out_dir / "last.pt", progress,
                      fingerprint=fingerprint)
    meta["train_samples"] = int(len(subset)) if subset is not None else int(len(data.train.y))
    loader = trainer.make_loader(data.train.x, data.train.y, manifest["channel_mean"], manifest["channel_std"], subset)
    history = trainer.fit(loader)
    meta["train_steps"], meta["batch_size"] = int(trainer.steps_done), int(trainer.config.batch_size)
    save_checkpoint({"model": {k: v.cpu() for k, v in method_obj.model.state_dict().items()}, "meta": meta},
                    out_dir / "model.pt")
    write_json(out_dir / "history.json", {"meta": meta, "epochs": history})
    (out_dir / "last.pt").unlink(missing_ok=True)  # the final model supersedes the resume point
    return {"history": history, "meta": meta}


def _digest_indices(subset: torch.Tensor | None) -> str:
    if subset is None:
        return "all"
    return hashlib.sha256(subset.to(torch.int64).numpy().tobytes()).hexdigest()


def training_subset(labels: torch.Tensor, classes: list[int], per_class: int, seed: int,
                    indices: list[int] | None = None) -> torch.Tensor | None:
    """Indices of the training samples, or None for all of them (see ``train``)."""
    if indices is not None:
        subset = torch.as_tensor(indices, dtype=torch.long)
        if classes and not bool(torch.isin(labels[subset], torch.tensor(classes)).all()):
            raise ValueError(f"training indices hold labels outside classes {sorted(classes)}")
    elif classes:
        subset = torch.nonzero(torch.isin(labels, torch.tensor(sorted(classes)))).flatten()
    else:
        subset = None
    if per_class > 0:
        pool = subset if subset is not None else torch.arange(len(labels))
        gen = torch.Generator().manual_seed(seed)
        picked = [pool[labels[pool] == c][torch.randperm(int((labels[pool] == c).sum()), generator=gen)[:per_class]]
                  for c in labels[pool].unique().tolist()]
        subset = torch.sort(torch.cat(picked)).values
    return subset


def _init_head(model, source, source_meta: dict, meta: dict, how: str) -> str:
    """Keep the pretrained head (``head_init: auto``) only where its label space is this run's:
    same dataset and pretraining on all of its classes. Otherwise the head is fresh, since the
    pretraining's classes may differ. Returns what was done, for the run's metadata."""
    if how not in ("auto", "fresh"):
        raise ValueError(f"head_init: {how!r} is not allowed; allowed values: ['auto', 'fresh']")
    same_labels = (source_meta.get("dataset") == meta["dataset"]
                   and int(source_meta.get("num_classes", -1)) == int(meta["num_classes"])
                   and not json.loads(source_meta.get("hparams", "{}")).get("classes"))
    if how == "auto" and same_labels:
        model.head.load_state_dict(source.head.state_dict())
        return "pretrained"
    return "fresh"


def evaluate(model_path: Path, data_dir: Path, out_dir: Path, device: str | None = None,
             threads: int | None = None) -> dict:
    """Save test-set ``predictions.npz`` (logits, labels) and ``metrics.json`` (test metrics, plus
    ``val_top1`` / ``val_nll`` on the validation split held out by ``prepare``, for model selection)."""
    set_threads(threads)
    model, meta = load_model(model_path)
    data = load_prepared(data_dir)
    dev = pick_device(device)
    logits = predict_logits(model, data.test.x, meta["channel_mean"], meta["channel_std"], dev).numpy()
    labels = data.test.y.numpy()
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "predictions.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, logits=logits.astype(np.float32), labels=labels)
    metrics = summarize_classification(logits, labels, int(meta["num_classes"]))
    if len(data.val):
        # the held-out validation split: every choice of epochs, rates and options is read here
        val_logits = predict_logits(model, data.val.x, meta["channel_mean"], meta["channel_std"], dev).numpy()
        val = summarize_classification(val_logits, data.val.y.numpy(), int(meta["num_classes"]))
        metrics.update({"val_top1": val["top1"], "val_nll": val["nll"], "val_n": val["n"]})
    metrics.update({k: meta[k] for k in ("dataset", "family", "method", "seed", "backbone")})
    metrics.update({k: meta[k] for k in ("train_steps", "batch_size") if k in meta})
    metrics["provenance"] = run_provenance()
    metrics["class_names"] = data.manifest["class_names"]
    write_json(out_dir / "metrics.json", metrics)
    return metrics
