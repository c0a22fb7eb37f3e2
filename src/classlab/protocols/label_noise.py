"""The label-noise protocol: train on training labels of which a recorded fraction was flipped.

Web-like noise (``classlab.data.label_noise``) is injected into the TRAIN split's labels only: exactly
round(noise_rate * N) of them, chosen per seed (the same flips for every method of a seed, so CAPro and
cross-entropy see the same noisy set), each moved to a semantically near class (``web``: drawn with
probability proportional to the MiniLM similarity of the classes' texts) or to a uniform other class
(``symmetric``). The val and test splits keep their clean labels: val is read for every choice, test is
only reported. A fresh backbone is trained from scratch with the method (family ``vlm``: ``capro``,
``noisy_ce``) on all classes by the engine.

The method receives the classes' text embeddings before training through
``method.build(class_names, text_features)``: (K, 384) unit-norm MiniLM embeddings, each the normalised
mean of the class's hand-written prompt ("a photo of a {name}.") and its shipped generic descriptions
(``config/descriptions/<dataset>.yaml``, where the dataset has one). The same embeddings give the web
noise's class similarities.

One job is one (method, seed, noise_rate, noise_kind): ``out_dir/predictions.npz`` (test logits and
labels; the training split's noisy labels and flipped mask) and ``out_dir/metrics.json`` (written last):
test ``top1`` and val ``val_top1``, the realised noise rate and confusion counts, and, for a method
that exposes its cleaned labels (``cleaned_labels(loader)``), the fraction of the flipped labels it
corrected. A noise rate outside [0, 1) stops the job before anything is written.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.data.label_noise import (check_noise_kind, check_noise_rate, class_text_similarity, inject_label_noise,
                                       noise_summary)
from classlab.data.loader import TensorLoader, mix_seed
from classlab.engine import Trainer, TrainConfig, predict_logits
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.engine.fingerprint import dataset_digest, make_fingerprint
from classlab.io import atomic_path, write_json
from classlab.methods.registry import get_method
from classlab.metrics import summarize_classification
from classlab.provenance import run_provenance

FAMILY = "vlm"
NOISE_STREAM = 0x401CE  # keeps the noise draw apart from every other use of the seed


def class_texts(dataset: str, class_names: list[str]) -> list[list[str]]:
    """Each class's texts: its hand-written prompt, then its shipped generic descriptions if any."""
    from classlab.data.descriptions import descriptions_path, load_descriptions
    from classlab.methods.vlm_learner import HAND_WRITTEN

    generic = {}
    if descriptions_path(dataset).exists():
        generic = load_descriptions(dataset, class_names)["generic"]
    return [[HAND_WRITTEN.format(name)] + list(generic.get(name, [])) for name in class_names]


def class_text_features(dataset: str, class_names: list[str]) -> torch.Tensor:
    """(K, 384): per class, the normalised mean of its texts' MiniLM embeddings."""
    from classlab.models.text import encode_texts

    rows = [encode_texts(texts).mean(0) for texts in class_texts(dataset, class_names)]
    return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def noise_seed(seed: int) -> int:
    return mix_seed(int(seed), NOISE_STREAM)


def _digest(array) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def run_label_noise(method: str, data_dir: Path, seed: int, out_dir: Path, noise_rate: float,
                    noise_kind: str = "web", backbone: str = "convnet", backbone_kwargs: dict | None = None,
                    overrides: dict | None = None, threads: int | None = None, device: str | None = None,
                    progress: bool = False, samples_per_class: int = 0) -> dict:
    """Train ``method`` from scratch on the train split with ``noise_rate`` of its labels flipped
    (``noise_kind``); report test and val accuracy on clean labels (see the module docstring).
    ``samples_per_class`` > 0 trains on a seeded subset of that many images per class (the same for
    every method and rate of a seed), the noise injected into it."""
    from classlab.data.prepare import load_prepared
    from classlab.models import build_classifier

    # bad input stops the job here, before anything is read, trained or written
    noise_rate = check_noise_rate(noise_rate)
    noise_kind = check_noise_kind(noise_kind)
    if isinstance(samples_per_class, bool) or not isinstance(samples_per_class, int) or samples_per_class < 0:
        raise ConfigError(f"samples_per_class: {samples_per_class!r} must be a non-negative integer (0: all)")
    hp = resolve_checked_hparams(FAMILY, method, overrides)
    cls = get_method(FAMILY, method)
    if not getattr(cls, "trains_on_noisy_labels", False):
        raise ConfigError(f"method: vlm/{method} is a prompt method; the label-noise protocol runs the methods that "
                          "train a classifier on noisy labels (capro, noisy_ce)")
    set_threads(threads)
    data = load_prepared(Path(data_dir))
    k = data.num_classes
    manifest = data.manifest
    dataset = manifest.get("dataset", "")
    names = list(manifest.get("class_names") or [str(c) for c in range(k)])
    text = class_text_features(dataset, names)
    train_x, clean = data.train.x, data.train.y.clone()
    if samples_per_class:
        from classlab.train import training_subset

        subset = training_subset(clean, [], int(samples_per_class), int(seed))
        train_x, clean = train_x[subset], clean[subset]
    noisy, flipped = inject_label_noise(clean, noise_rate, noise_kind, noise_seed(seed),
                                        class_similarity=class_text_similarity(text), num_classes=k)
    summary = noise_summary(clean, noisy, k)
    backbone_kwargs = dict(backbone_kwargs or {})
    fingerprint = make_fingerprint(protocol="label_noise", method=method, hparams=hp, seed=int(seed),
                                   noise_rate=noise_rate, noise_kind=noise_kind, data=dataset_digest(manifest),
                                   samples_per_class=int(samples_per_class),
                                   backbone=backbone, backbone_kwargs=backbone_kwargs,
                                   noisy_labels=_digest(noisy.numpy()))
    dev = pick_device(device)
    seed_everything(int(seed))
    model = build_classifier(backbone, int(manifest["shape"][0]), k, img_size=int(manifest["shape"][1]),
                             backbone_kwargs=backbone_kwargs)
    learner = cls(model, hp, k)
    learner.class_names = names
    learner.build(names, text)
    mean, std = manifest["channel_mean"], manifest["channel_std"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer = Trainer(learner, TrainConfig.from_hparams(hp), dev, int(seed), out_dir / "last.pt", progress,
                      fingerprint=fingerprint)
    history = trainer.fit(trainer.make_loader(train_x, noisy, mean, std)) if int(hp.get("epochs", 0)) > 0 else []
    train_seconds = time.perf_counter() - t0
    learner.to(dev).eval()

    # what the method made of the noisy labels, where it exposes its cleaned labels
    cleaning = {"corrected_fraction": None, "flipped_dropped_fraction": None, "clean_kept_fraction": None,
                "relabelled_fraction": None, "dropped_fraction": None, "cleaned_label_accuracy": None}
    if hasattr(learner, "cleaned_labels"):
        ordered = TensorLoader(train_x, noisy, 512, device=dev, mean=mean, std=std)
        cleaned = learner.cleaned_labels(ordered)
        if cleaned is not None:
            cleaned = cleaned.cpu()
            kept = cleaned >= 0
            flips, stays = flipped.bool(), ~flipped.bool()
            cleaning = {
                "corrected_fraction": float((cleaned[flips] == clean[flips]).float().mean()) if flips.any() else None,
                "flipped_dropped_fraction": float((~kept[flips]).float().mean()) if flips.any() else None,
                "clean_kept_fraction": float((cleaned[stays] == clean[stays]).float().mean()) if stays.any() else None,
                "relabelled_fraction": float((kept & (cleaned != noisy)).float().mean()),
                "dropped_fraction": float((~kept).float().mean()),
                "cleaned_label_accuracy": float((cleaned[kept] == clean[kept]).float().mean()) if kept.any() else None,
            }

    scores = {}
    for split in ("val", "test"):  # val for every choice; test only for reporting
        part = getattr(data, split)
        if part is None or len(part.y) == 0:
            continue
        logits = predict_logits(learner, part.x, mean, std, dev).numpy()
        scores[split] = (logits, part.y.numpy(), summarize_classification(logits, part.y.numpy(), k))
    logits, labels, test = scores["test"]
    val = {}
    if "val" in scores:
        val = {f"val_{key}": scores["val"][2][key] for key in ("top1", "nll", "balanced_top1", "n")}
    with atomic_path(out_dir / "predictions.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, logits=logits.astype(np.float32), labels=labels,
                                train_noisy_labels=noisy.numpy(), train_flipped=flipped.numpy())
    metrics = {"protocol": "label_noise", "method": method, "family": FAMILY, "seed": int(seed), "dataset": dataset,
               "backbone": backbone, "samples_per_class": int(samples_per_class),
               "backbone_kwargs": backbone_kwargs, "noise_rate": noise_rate, "noise_kind": noise_kind, **summary,
               "noise_digest": _digest(noisy.numpy()), **test, **val, **cleaning,
               "train_steps": int(trainer.steps_done), "train_seconds": train_seconds, "history": history,
               "hparams": hp, "fingerprint": fingerprint, "provenance": run_provenance(), "class_names": names}
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / "last.pt").unlink(missing_ok=True)
    return metrics
