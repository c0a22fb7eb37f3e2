"""Stage functions behind the CLI: train a method from a prepared dataset, evaluate it."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from classlab.config import resolve_hparams
from classlab.data.loader import TensorLoader
from classlab.data.prepare import load_prepared
from classlab.engine import Trainer, TrainConfig, load_checkpoint, predict_logits, save_checkpoint
from classlab.engine.checkpoint import CheckpointError
from classlab.engine.fingerprint import dataset_digest, file_digest, make_fingerprint
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.io import atomic_path, write_json
from classlab.methods.registry import get_method
from classlab.metrics import shot_group_accuracy, summarize_classification
from classlab.engine.predict import predict_outputs
from classlab.models import build_classifier
from classlab.models.backbones import Classifier
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


def load_predictor(path: str | Path):
    """What evaluation calls on images: the Classifier of a ``model.pt``, or, for a method that
    predicts through itself (``evaluate_with_method``: NoProp's chain, kernel classifiers), the
    method rebuilt around it with its saved state."""
    model, meta = load_model(path)
    state = load_checkpoint(path)
    if "method" not in state:
        return model, meta
    method = get_method(meta["family"], meta["method"])(model, json.loads(meta["hparams"]), int(meta["num_classes"]))
    method.load_state_dict(state["method"])
    return method, meta


def train(family: str, method: str, data_dir: Path, backbone: str, seed: int, out_dir: Path,
          overrides: dict | None = None, indices: list[int] | None = None, init: Path | None = None,
          backbone_kwargs: dict | None = None,
          pretrained_weights: bool = False, threads: int | None = None, device: str | None = None,
          progress: bool = True, teacher: Path | None = None) -> dict:
    """Train ``family/method`` and write ``model.pt`` and ``history.json`` into ``out_dir``.

    ``last.pt`` in ``out_dir`` is the resume checkpoint; a rerun continues from it. A method of
    several stages (``Method.training_stages``) checkpoints each: ``last_<stage>.pt`` while it runs,
    ``stage_<stage>.pt`` once done, and ``stage_<stage>_indices.json`` where it resampled the next
    stage's training set. The training samples are ``indices`` if given (they must lie in
    ``classes`` where that hyperparameter is set), else those of ``classes``, each cut to a seeded
    ``samples_per_class`` subset where that is set, or to a long-tailed subset where
    ``imbalance_ratio`` is set; else the whole train split. ``teacher`` is a ``model.pt`` of the same
    dataset and classes, handed to the method (distillation).
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
            "class_names": list(manifest["class_names"]), "init": str(init) if init else ""}
    model = build_classifier(backbone, meta["in_chans"], meta["num_classes"], img_size=meta["img_size"],
                             pretrained=pretrained_weights, backbone_kwargs=meta["backbone_kwargs"])
    if init is not None:
        source, source_meta = load_model(init)
        if source_meta["backbone"] != backbone:
            raise ValueError(f"init checkpoint {init} holds a {source_meta['backbone']} backbone, not {backbone}")
        model.backbone.load_state_dict(source.backbone.state_dict())
        meta["head_init"] = _init_head(model, source, source_meta, meta, hparams.get("head_init", "fresh"))
    method_cls = get_method(family, method)
    method_obj = method_cls(model, hparams, data.num_classes)
    method_obj.class_names = list(manifest["class_names"])
    meta["head_trained"] = bool(method_cls.head_trained)
    if teacher is not None:
        teacher_model, teacher_meta = load_model(teacher)
        _check_teacher(teacher, teacher_meta, meta)
        method_obj.set_teacher(teacher_model, teacher_meta)
        meta["teacher"] = str(teacher)
        meta["teacher_backbone"] = teacher_meta["backbone"]
    subset = training_subset(data.train.y, hparams.get("classes") or [], int(hparams.get("samples_per_class") or 0),
                             seed, indices, float(hparams.get("imbalance_ratio") or 1.0))
    if hparams.get("imbalance_ratio"):
        counts = torch.bincount(data.train.y[subset], minlength=data.num_classes)
        meta["class_counts"] = [int(c) for c in counts]
        write_json(out_dir / "subset.json", {"imbalance_ratio": float(hparams["imbalance_ratio"]), "seed": seed,
                                             "class_counts": meta["class_counts"],
                                             "indices": [int(i) for i in subset]})
    # each checkpoint belongs to this computation only: a rerun under an edited config starts fresh
    base_fingerprint = dict(family=family, method=method, hparams=hparams, data=dataset_digest(manifest),
                            backbone=backbone, backbone_kwargs=meta["backbone_kwargs"], seed=seed,
                            init=file_digest(init), pretrained_weights=bool(pretrained_weights),
                            teacher=file_digest(teacher))
    stages = method_obj.training_stages()
    single = len(stages) == 1
    initial_model = {k: v.detach().clone() for k, v in method_obj.model.state_dict().items()}
    mean, std = manifest["channel_mean"], manifest["channel_std"]
    history, steps, batch_size, train_samples = [], 0, 0, 0
    for k, stage in enumerate(stages):
        name = stage["name"]
        method_obj.stage = name
        if stage.get("reinit"):
            method_obj.model.load_state_dict(initial_model)  # retrain from the run's starting point
        stage_hparams = dict(hparams, **({"epochs": int(stage["epochs"])} if "epochs" in stage else {}))
        fingerprint = make_fingerprint(**base_fingerprint, subset=_digest_indices(subset),
                                       **({} if single else {"stage": name}))
        done_path = out_dir / f"stage_{name}.pt"
        if not single and done_path.exists():
            done = load_checkpoint(done_path)
            if done.get("fingerprint") == fingerprint:
                method_obj.load_state_dict(done["method"])
                history += done["history"]
                steps += int(done["steps"])
                subset = done["next_subset"]
                print(f"stage {name}: done in an earlier run ({done_path})", flush=True)
                continue
            done_path.unlink()
        checkpoint = out_dir / ("last.pt" if single else f"last_{name}.pt")
        trainer = Trainer(method_obj, TrainConfig.from_hparams(stage_hparams), dev, seed, checkpoint, progress,
                          fingerprint=fingerprint)
        loader = trainer.make_loader(data.train.x, data.train.y, mean, std, subset)
        train_samples = int(len(subset)) if subset is not None else int(len(data.train.y))
        stage_history = [dict(row, stage=name) for row in trainer.fit(loader)]
        history += stage_history
        steps += int(trainer.steps_done)
        batch_size = int(trainer.config.batch_size)
        if k + 1 < len(stages):
            ordered = TensorLoader(data.train.x, data.train.y, 512, device=dev, mean=mean, std=std, indices=subset)
            method_obj.eval()
            resampled = method_obj.end_stage(name, ordered)
            if resampled is not None:
                subset = _check_positions(resampled, len(data.train.y), f"{family}/{method}.end_stage({name!r})")
                write_json(out_dir / f"stage_{name}_indices.json",
                           {"stage": name, "next_stage": stages[k + 1]["name"], "seed": seed,
                            "indices": [int(i) for i in subset]})
            save_checkpoint({"method": method_obj.state_dict(), "history": stage_history, "steps": trainer.steps_done,
                             "next_subset": subset, "fingerprint": fingerprint}, done_path)
            checkpoint.unlink(missing_ok=True)
    meta["train_samples"] = train_samples
    meta["train_steps"], meta["batch_size"] = steps, batch_size
    state = {"model": {k: v.cpu() for k, v in method_obj.model.state_dict().items()}, "meta": meta}
    if method_cls.evaluate_with_method:
        state["method"] = {k: v.cpu() for k, v in method_obj.state_dict().items()}
    save_checkpoint(state, out_dir / "model.pt")
    write_json(out_dir / "history.json", {"meta": meta, "epochs": history})
    # the final model supersedes the resume points
    (out_dir / ("last.pt" if single else f"last_{stages[-1]['name']}.pt")).unlink(missing_ok=True)
    for stage in stages[:-1]:
        (out_dir / f"stage_{stage['name']}.pt").unlink(missing_ok=True)
    return {"history": history, "meta": meta}


def _check_teacher(path: Path, teacher_meta: dict, meta: dict) -> None:
    """A teacher must predict the student's classes: same dataset, same class list."""
    if teacher_meta.get("dataset") != meta["dataset"] or int(teacher_meta["num_classes"]) != meta["num_classes"]:
        raise ValueError(f"teacher {path} was trained on {teacher_meta.get('dataset')} with "
                         f"{teacher_meta['num_classes']} classes; the student trains on {meta['dataset']} with "
                         f"{meta['num_classes']}: the teacher's classes differ from the student's")
    names = teacher_meta.get("class_names")
    if names is not None and list(names) != meta["class_names"]:
        raise ValueError(f"teacher {path} has classes {list(names)}, the student {meta['class_names']}: "
                         f"the teacher's classes differ from the student's")
    hp = json.loads(teacher_meta.get("hparams", "{}"))
    if hp.get("classes"):
        raise ValueError(f"teacher {path} was trained on classes {hp['classes']} only; the student trains on all "
                         f"{meta['num_classes']}: the teacher's classes differ from the student's")


def _check_positions(indices, n: int, where: str) -> torch.Tensor:
    subset = torch.as_tensor(indices, dtype=torch.long).flatten()
    if len(subset) == 0 or int(subset.min()) < 0 or int(subset.max()) >= n:
        raise ValueError(f"{where} returned {len(subset)} positions, not all in [0, {n}) (or none)")
    return subset


def _digest_indices(subset: torch.Tensor | None) -> str:
    if subset is None:
        return "all"
    return hashlib.sha256(subset.to(torch.int64).numpy().tobytes()).hexdigest()


def training_subset(labels: torch.Tensor, classes: list[int], per_class: int, seed: int,
                    indices: list[int] | None = None, imbalance_ratio: float = 1.0) -> torch.Tensor | None:
    """Indices of the training samples, or None for all of them (see ``train``)."""
    if imbalance_ratio < 1:
        raise ValueError(f"imbalance_ratio must be >= 1 (head size / tail size), got {imbalance_ratio}")
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
    if imbalance_ratio > 1:
        subset = long_tailed_subset(labels, subset, imbalance_ratio, seed)
    return subset


def long_tailed_subset(labels: torch.Tensor, pool: torch.Tensor | None, ratio: float, seed: int) -> torch.Tensor:
    """A long-tailed cut of ``pool`` (all samples if None), as CIFAR-LT is built (Cao et al., LDAM,
    NeurIPS 2019): the class at rank r of a seeded class order keeps n_max * ratio^(-r / (K - 1))
    samples, n_max the smallest class's size in the pool, so the head/tail ratio is ``ratio``."""
    pool = pool if pool is not None else torch.arange(len(labels))
    gen = torch.Generator().manual_seed(seed * 7 + 1)
    present = labels[pool].unique()
    order = present[torch.randperm(len(present), generator=gen)]
    n_max = min(int((labels[pool] == c).sum()) for c in present.tolist())
    k = max(len(order) - 1, 1)
    picked = []
    for rank, c in enumerate(order.tolist()):
        n_c = max(int(n_max * ratio ** (-rank / k)), 1)
        members = pool[labels[pool] == c]
        picked.append(members[torch.randperm(len(members), generator=gen)[:n_c]])
    return torch.sort(torch.cat(picked)).values


def _init_head(model, source, source_meta: dict, meta: dict, how: str) -> str:
    """Keep the pretrained head (``head_init: auto``) only where its label space is this run's and
    it was trained: same dataset, pretraining on all of its classes, with labels. Otherwise the
    head is fresh, since the
    pretraining's classes may differ. Returns what was done, for the run's metadata."""
    if how not in ("auto", "fresh"):
        raise ValueError(f"head_init: {how!r} is not allowed; allowed values: ['auto', 'fresh']")
    same_labels = (source_meta.get("dataset") == meta["dataset"]
                   and int(source_meta.get("num_classes", -1)) == int(meta["num_classes"])
                   and not json.loads(source_meta.get("hparams", "{}")).get("classes"))
    if how == "auto" and same_labels and source_meta.get("head_trained", True):
        model.head.load_state_dict(source.head.state_dict())
        return "pretrained"
    return "fresh"


def evaluate(model_path: Path, data_dir: Path, out_dir: Path, device: str | None = None,
             threads: int | None = None) -> dict:
    """Save test-set ``predictions.npz`` (logits, labels) and ``metrics.json`` (test metrics, plus
    ``val_top1`` / ``val_nll`` on the validation split held out by ``prepare``, for model selection)."""
    set_threads(threads)
    model, meta = load_predictor(model_path)
    data = load_prepared(data_dir)
    dev = pick_device(device)
    extra = {}
    if isinstance(model, Classifier):
        # logits and the penultimate features' L2 norm in one pass (distillation reports the norms)
        def logits_and_norms(x):
            features = model.features(x)
            return {"logits": model.head(features), "feature_norm": features.float().norm(dim=1)}

        outputs = predict_outputs(logits_and_norms, data.test.x, meta["channel_mean"], meta["channel_std"], dev,
                                  outputs=None, module=model)
        logits, extra = outputs["logits"].numpy(), {"feature_norm": outputs["feature_norm"].numpy()}
    else:
        logits = predict_logits(model, data.test.x, meta["channel_mean"], meta["channel_std"], dev).numpy()
    labels = data.test.y.numpy()
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "predictions.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, logits=logits.astype(np.float32), labels=labels, **extra)
    metrics = summarize_classification(logits, labels, int(meta["num_classes"]))
    if "feature_norm" in extra:
        metrics["feature_norm_mean"] = float(extra["feature_norm"].mean())
    if len(data.val):
        # the held-out validation split: every choice of epochs, rates and options is read here
        val_logits = predict_logits(model, data.val.x, meta["channel_mean"], meta["channel_std"], dev).numpy()
        val = summarize_classification(val_logits, data.val.y.numpy(), int(meta["num_classes"]))
        metrics.update({"val_top1": val["top1"], "val_nll": val["nll"], "val_n": val["n"]})
    if meta.get("class_counts"):
        metrics.update(shot_group_accuracy(metrics["per_class_accuracy"], meta["class_counts"]))
    metrics.update({k: meta[k] for k in ("dataset", "family", "method", "seed", "backbone")})
    metrics.update({k: meta[k] for k in ("train_steps", "batch_size") if k in meta})
    metrics["provenance"] = run_provenance()
    metrics["class_names"] = data.manifest["class_names"]
    write_json(out_dir / "metrics.json", metrics)
    return metrics
