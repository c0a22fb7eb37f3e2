"""The vlm family's base-to-novel protocol (CoCoOp's; Zhou et al., CVPR 2022).

The classes split into base (the first half of the sorted labels) and new (the rest). The pretrain
stage's offline CLIP (``pretrain/image_text``) was trained on the base classes only; a method then
adapts it on ``shots`` training images per base class (16 in the papers), drawn per seed, so each
seed has its own shots. It is tested on the whole test split: base accuracy among the base classes,
new accuracy among the new classes, and H = 2BN / (B + N) (``classlab.metrics.vlm``).

One job is one (method, seed): ``out_dir/predictions.npz`` (test logits over every class, labels) and
``out_dir/metrics.json`` (B, N, H, the shots' indices digest, the classes the image side saw), written
last; the engine's checkpoint (``out_dir/last.pt``) resumes a killed run. Bad input stops the job before
anything is written: shots below 1 or above a base class's training samples, a pretrained model that
is not an image-text model or that saw a new class.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.data.loader import mix_seed
from classlab.engine import Trainer, TrainConfig, predict_logits
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.engine.fingerprint import dataset_digest, file_digest, make_fingerprint
from classlab.io import atomic_path, write_json
from classlab.methods.registry import get_method
from classlab.metrics.vlm import base_new_split, base_to_novel_accuracy, embedding_label_metric, label_metric_scores
from classlab.provenance import run_provenance

FAMILY = "vlm"


def few_shot_indices(labels: torch.Tensor, classes: list[int], shots: int, seed: int) -> torch.Tensor:
    """``shots`` training positions per class of ``classes``, drawn without replacement from a generator
    seeded by (seed, class): each seed its own shots, each class's draw independent of the others."""
    out = []
    for c in classes:
        pool = torch.nonzero(labels == c).flatten()
        if len(pool) < shots:
            raise ConfigError(f"shots: {shots} exceeds the {len(pool)} training samples of class {c}")
        gen = torch.Generator().manual_seed(mix_seed(int(seed), int(c), 0x5407))
        out.append(pool[torch.randperm(len(pool), generator=gen)[:shots]].sort().values)
    return torch.cat(out)


def class_label_metric(class_names: list[str]) -> np.ndarray:
    """The label metric of the protocol (Loki's self-derived one): distances between the MiniLM sentence
    embeddings of the classes' hand-written prompts."""
    from classlab.methods.vlm_learner import HAND_WRITTEN
    from classlab.models.text import encode_texts

    return embedding_label_metric(encode_texts([HAND_WRITTEN.format(n) for n in class_names]).numpy())


def _resolve(method: str, overrides: dict | None) -> dict:
    hp = resolve_checked_hparams(FAMILY, method, overrides)
    return hp


def load_image_text(path: Path):
    """The pretrain stage's image-text model and the classes its image side was trained on."""
    from classlab.train import load_predictor

    model, meta = load_predictor(path)
    if not hasattr(model, "clip"):
        raise ConfigError(f"pretrained: {path} is a {meta.get('family')}/{meta.get('method')} model, not the "
                          "pretrain stage's image_text model")
    seen = json.loads(meta["hparams"]).get("classes") or list(range(int(meta["num_classes"])))
    return model, meta, sorted(int(c) for c in seen)


def load_adaptable(pretrained, data, device: str | None = None):
    """(model, meta, classes its image side saw, digest) of the model a vlm protocol adapts: the
    pretrain stage's checkpoint (a path), or real CLIP named by a spec "open_clip:<model>:<tag>"
    (``classlab.models.clip_weights``; what its image side saw is unknown: None)."""
    from classlab.models.clip_weights import is_clip_spec, load_clip

    k, manifest = data.num_classes, data.manifest
    if is_clip_spec(str(pretrained)):
        model = load_clip(str(pretrained), manifest["channel_mean"], manifest["channel_std"], device=pick_device(device))
        meta = {"num_classes": k, "dataset": manifest.get("dataset"), "backbone": str(pretrained)}
        return model, meta, None, hashlib.sha256(str(pretrained).encode()).hexdigest()
    model, meta, seen = load_image_text(Path(pretrained))
    if int(meta["num_classes"]) != k or meta.get("dataset") != manifest.get("dataset"):
        raise ConfigError(f"pretrained: {pretrained} was trained on {meta.get('dataset')} ({meta['num_classes']} "
                          f"classes), the data is {manifest.get('dataset')} ({k})")
    return model, meta, seen, file_digest(Path(pretrained))


def adapt_on_shots(learner, hp: dict, data, subset: torch.Tensor, seed: int, out_dir: Path, dev, fingerprint: str,
                   progress: bool = False) -> tuple[list, int, float]:
    """Adapt ``learner`` on the training images at ``subset`` (the shots), the same way in every vlm
    protocol: trained by the engine where the method learns (its checkpoint ``out_dir/last.pt``
    resumes a killed run), or given the shots' image features where it is a training-free cache
    (``needs_support``: ``fit_support(features, labels)``). Returns (history, steps, seconds); the
    learner ends on ``dev`` in eval mode."""
    from classlab.engine.predict import predict_outputs

    mean, std = data.manifest["channel_mean"], data.manifest["channel_std"]
    t0 = time.perf_counter()
    history, steps = [], 0
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    if learner.learns and int(hp.get("epochs", 0)) > 0:
        trainer = Trainer(learner, TrainConfig.from_hparams(hp), dev, int(seed), Path(out_dir) / "last.pt", progress,
                          fingerprint=fingerprint)
        history = trainer.fit(trainer.make_loader(data.train.x, data.train.y, mean, std, indices=subset))
        steps = int(trainer.steps_done)
    if getattr(learner, "needs_support", False):  # a training-free cache: the shots' features and labels
        features = predict_outputs(learner.encode_image, data.train.x[subset], mean, std, dev, module=learner)["logits"]
        learner.to(dev).fit_support(features.to(dev), data.train.y[subset].to(dev))
    learner.to(dev).eval()
    return history, steps, time.perf_counter() - t0


def run_base_to_novel(method: str, pretrained: Path, data_dir: Path, seed: int, out_dir: Path, shots: int = 16,
                      overrides: dict | None = None, test_per_class: int = 0, threads: int | None = None,
                      device: str | None = None, progress: bool = False, image_side: str = "base") -> dict:
    """Adapt the pretrained image-text model with ``method`` on ``shots`` images per base class; test it
    on the test split, or on a seeded ``test_per_class`` subset of it (the same for every method and
    seed: image-conditioned prompts run every class's prompt through the text tower for each image).

    ``image_side`` is what the pretrained model's image side may have seen: ``base`` (the default: a
    model that saw a new class is refused) or ``all`` (CLIP's own situation: pretraining saw every
    class, the new classes are new only to the prompt learning)."""
    from classlab.data.prepare import load_prepared
    from classlab.data.scenarios import test_subset

    set_threads(threads)
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 1:
        raise ConfigError(f"shots: {shots!r} must be a positive integer")
    hp = _resolve(method, overrides)
    cls = get_method(FAMILY, method)
    data = load_prepared(Path(data_dir))
    k = data.num_classes
    base, new = base_new_split(k)
    if image_side not in ("base", "all"):
        raise ConfigError(f"image_side: {image_side!r}; one of 'base' (the image side saw the base classes only) "
                          "or 'all' (it saw every class, as CLIP's pretraining did)")
    pretrained_model, meta, seen, pretrained_digest = load_adaptable(pretrained, data, device)
    if seen is None and image_side == "base":
        raise ConfigError(f"image_side: 'base' needs a model whose image side saw the base classes only; {pretrained} "
                          "is real CLIP, pretrained on the web: use image_side 'all'")
    if image_side == "base" and set(seen) & set(new):
        raise ConfigError(f"pretrained: {pretrained}'s image side saw new classes {sorted(set(seen) & set(new))}; "
                          f"base-to-novel needs a model trained on the base classes {base} only")
    subset = few_shot_indices(data.train.y, base, shots, seed)
    names = list(data.manifest.get("class_names") or [str(c) for c in range(k)])
    out_dir = Path(out_dir)
    fingerprint = make_fingerprint(protocol="base_to_novel", method=method, hparams=hp, seed=int(seed), shots=shots,
                                   data=dataset_digest(data.manifest), pretrained=pretrained_digest)
    dev = pick_device(device)
    seed_everything(int(seed))
    learner = cls(pretrained_model, hp, k)
    learner.train_classes = list(base)
    learner.build(names)
    mean, std = data.manifest["channel_mean"], data.manifest["channel_std"]
    history, steps, train_seconds = adapt_on_shots(learner, hp, data, subset, int(seed), out_dir, dev, fingerprint,
                                                   progress)
    label_distances = class_label_metric(names)
    scores = {}
    for split in ("val", "test"):  # val for every choice (learning rates, epochs); test only for reporting
        part = getattr(data, split)
        if part is None or len(part.y) == 0:
            continue
        pick = torch.tensor(test_subset(part.y.numpy(), k, int(test_per_class), 0)) if test_per_class else None
        x, y = (part.x, part.y) if pick is None else (part.x[pick], part.y[pick])
        split_logits = predict_logits(learner, x, mean, std, dev).numpy()
        acc = base_to_novel_accuracy(split_logits, y.numpy(), base, new)
        if not learner.predicts_unobserved:  # it ranks the new classes by nothing: no new accuracy
            acc.update(new=float("nan"), hm=float("nan"))
        # every class a candidate, judged under the label metric (Loki's evaluation)
        acc.update(label_metric_scores(split_logits, y.numpy(), base, new, label_distances))
        scores[split] = (split_logits, y.numpy(), acc)
    logits, labels, acc = scores["test"]
    val = {f"val_{key}": value for key, value in scores["val"][2].items()} if "val" in scores else {}
    with atomic_path(out_dir / "predictions.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, logits=logits.astype(np.float32), labels=labels)
    metrics = {"protocol": "base_to_novel", "method": method, "seed": int(seed), "shots": shots,
               "dataset": data.manifest.get("dataset"),
               "backbone": meta.get("backbone", ""),
               "base_classes": base, "new_classes": new, "image_side": image_side,
               "image_side_saw": seen if seen is not None else "the web (real CLIP)", **acc, **val,
               "shots_digest": hashlib.sha256(subset.numpy().tobytes()).hexdigest(), "train_steps": steps,
               "test_samples": int(len(labels)), "test_per_class": int(test_per_class),
               "train_seconds": train_seconds, "history": history, "hparams": hp, "fingerprint": fingerprint,
               "provenance": run_provenance()}
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / "last.pt").unlink(missing_ok=True)
    return metrics
