"""The mil protocol: multiple-instance learning on bags of images drawn from a labelled dataset.

A bag is a set of images of a prepared single-label dataset; it is positive when it holds at least
one image of the ``target_class`` and negative when it holds none, the whole-slide-image setting of
Qu et al. (INS, TCSVT 2024) and Ilse et al. (ABMIL, ICML 2018) on MNIST/CIFAR bags. Per split, the
bags are drawn from the seed (``build_bags``): ``{split}_bags`` bags, a ``positive_fraction`` of them
positive, each of a size drawn uniformly from [``bag_size_min``, ``bag_size_max``]; a positive bag of
size n holds max(1, round(``witness_rate`` n)) target instances (the witnesses, a small fraction as in
a slide), the rest drawn from the other classes; no instance is used twice. Training bags come from
the train split, validation bags from the val split (every choice of options or epochs is made on
them), test bags from the test split (reported numbers only). The bag lists are validated whatever
made them (``bags_from_lists``): an empty bag, an index outside the split, an instance shared between
bags or a bag label that contradicts the instances stops the job.

Training sees bag labels only: the instance labels (is the image of the target class) are kept for the
instance AUC. Both methods share the backbone (a ConvNet from scratch through the backbone factory) and
train through the shared engine:

- ``mil`` (INS, ``trains_on = "instances"``): the loader runs over the training bags' instances, each
  labelled with its bag's label (the candidate set of its pseudo-label);
- ``mil_attention`` (ABMIL, ``trains_on = "bags"``): the loader runs over bag ids (a float column of
  ids; ``batch["index"]`` the bags, ``batch["y"]`` their labels) and the method gathers the bags'
  instances from the tensor handed to it by ``set_bags``.

Reported (``sklearn.metrics.roc_auc_score``), on the test bags and on the validation bags (``val_``):
``bag_auc`` (bag scores against bag labels) and ``instance_auc`` (instance scores against instance
labels over every instance of every bag). The instance score is the method's ``instance_score_name``:
the instance classifier's target-class probability (``mil``) or the attention weight (``mil_attention``,
the WSI literature's read-out of ABMIL); ABMIL also reports ``instance_auc_single``, its bag classifier on
each instance as a bag of one (None for ``mil``). ``val_curve`` (a curve: one row per epoch) holds the
validation AUCs after every epoch, for the choice of the number of epochs.

One job is one (method, seed): ``out_dir/predictions.npz`` (the test bags: bag scores and labels,
instance scores, labels and owners; the same of the val bags under ``val_``) and
``out_dir/metrics.json``, written last. Bad input stops the job before anything is written, with a
ConfigError naming the field: a hyperparameter outside its declared
range (bag sizes below 1, a witness rate outside (0, 1], ...), ``bag_size_max`` below ``bag_size_min``,
a ``target_class`` the dataset does not have, more bags than a split can fill, a method that is not a
mil method.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.data.loader import mix_seed
from classlab.engine import Trainer, TrainConfig
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.engine.fingerprint import dataset_digest, make_fingerprint
from classlab.engine.predict import predict_outputs
from classlab.io import atomic_path, write_json
from classlab.methods.registry import get_method
from classlab.provenance import run_provenance

FAMILY = "single_paper"
KIND = "mil_bags"
SPLITS = ("train", "val", "test")
BAG_STREAM = 0xB465  # keeps the bag draw apart from every other use of the seed
# the protocol's hyperparameters: declared (with the same defaults) in mil.yaml and mil_attention.yaml
PROTOCOL_KEYS = ("target_class", "bag_size_min", "bag_size_max", "witness_rate", "positive_fraction",
                 "train_bags", "val_bags", "test_bags")


@dataclass(frozen=True)
class Bags:
    """The bags of one split: bag b holds ``instances[offsets[b]:offsets[b + 1]]`` (positions in the
    split), its label ``labels[b]``; ``instance_labels`` (1: the target class) is for evaluation only."""

    split: str
    instances: np.ndarray
    offsets: np.ndarray
    labels: np.ndarray
    instance_labels: np.ndarray

    @property
    def n_bags(self) -> int:
        return len(self.labels)

    @property
    def n_instances(self) -> int:
        return len(self.instances)

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def owner(self) -> np.ndarray:
        """The bag of each instance."""
        return np.repeat(np.arange(self.n_bags), self.sizes)

    def digest(self) -> str:
        h = hashlib.sha256()
        for array in (self.instances, self.offsets, self.labels):
            h.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        return h.hexdigest()


def bags_from_lists(bag_lists, split_labels, target_class: int, split: str, bag_labels=None) -> Bags:
    """Bags from explicit lists of split positions, validated: every bag holds at least one instance,
    positions lie in the split, no instance is in two bags (or twice in one), and a given bag label
    says exactly whether the bag holds a ``target_class`` instance. Raises ConfigError naming
    ``bags.<split>[<b>]``."""
    split_labels = np.asarray(split_labels)
    n = len(split_labels)
    lists = [np.asarray(bag, dtype=np.int64).reshape(-1) for bag in bag_lists]
    if not lists:
        raise ConfigError(f"bags.{split}: no bags")
    if bag_labels is not None and len(bag_labels) != len(lists):
        raise ConfigError(f"bags.{split}: {len(bag_labels)} bag labels for {len(lists)} bags")
    seen = np.zeros(n, dtype=bool)
    labels = np.zeros(len(lists), dtype=np.int64)
    for b, bag in enumerate(lists):
        if bag.size == 0:
            raise ConfigError(f"bags.{split}[{b}]: the bag has no instances; every bag needs at least one")
        if bag.min() < 0 or bag.max() >= n:
            raise ConfigError(f"bags.{split}[{b}]: instance positions must lie in 0..{n - 1} (the {split} split)")
        if len(np.unique(bag)) != bag.size or seen[bag].any():
            raise ConfigError(f"bags.{split}[{b}]: an instance appears twice (in this bag or in an earlier one)")
        seen[bag] = True
        labels[b] = int((split_labels[bag] == target_class).any())
        if bag_labels is not None and int(bag_labels[b]) != labels[b]:
            raise ConfigError(f"bags.{split}[{b}]: bag label {int(bag_labels[b])} but the bag "
                              f"{'holds' if labels[b] else 'holds no'} instance of target_class {target_class}")
    instances = np.concatenate(lists)
    offsets = np.concatenate([[0], np.cumsum([bag.size for bag in lists])]).astype(np.int64)
    return Bags(split, instances, offsets, labels, (split_labels[instances] == target_class).astype(np.int64))


def build_bags(split_labels, target_class: int, n_bags: int, bag_size_min: int, bag_size_max: int,
               witness_rate: float, positive_fraction: float, seed: int, split: str) -> Bags:
    """Draw the bags of one split from ``seed`` (see the module docstring); validated on the way out."""
    split_labels = np.asarray(split_labels)
    if isinstance(bag_size_min, bool) or int(bag_size_min) < 1:
        raise ConfigError(f"bag_size_min: {bag_size_min!r}; a bag needs at least one instance")
    if int(bag_size_max) < int(bag_size_min):
        raise ConfigError(f"bag_size_max: {bag_size_max} is below bag_size_min {bag_size_min}")
    if not 0.0 < float(witness_rate) <= 1.0:
        raise ConfigError(f"witness_rate: {witness_rate!r} must lie in (0, 1]")
    n_pos = int(round(float(positive_fraction) * int(n_bags)))
    if n_pos < 1 or n_pos >= int(n_bags):
        raise ConfigError(f"{split}_bags: {n_bags} bags with positive_fraction {positive_fraction} give {n_pos} "
                          f"positive bags; the AUCs need at least one positive and one negative bag")
    rng = np.random.default_rng(mix_seed(int(seed), BAG_STREAM, SPLITS.index(split) if split in SPLITS else 99))
    sizes = rng.integers(int(bag_size_min), int(bag_size_max) + 1, size=int(n_bags))
    positive = np.zeros(int(n_bags), dtype=bool)
    positive[rng.permutation(int(n_bags))[:n_pos]] = True
    witnesses = np.where(positive, np.clip(np.rint(float(witness_rate) * sizes), 1, sizes), 0).astype(np.int64)
    targets = np.flatnonzero(split_labels == target_class)
    others = np.flatnonzero(split_labels != target_class)
    need_t, need_o = int(witnesses.sum()), int((sizes - witnesses).sum())
    if need_t > len(targets) or need_o > len(others):
        raise ConfigError(f"{split}_bags: {n_bags} bags need {need_t} target-class and {need_o} other instances; "
                          f"the {split} split has {len(targets)} and {len(others)} (draw fewer or smaller bags)")
    targets, others = rng.permutation(targets)[:need_t], rng.permutation(others)[:need_o]
    lists, t, o = [], 0, 0
    for size, w in zip(sizes, witnesses):
        bag = np.concatenate([targets[t:t + w], others[o:o + size - w]])
        t, o = t + w, o + size - w
        lists.append(rng.permutation(bag))  # the witnesses anywhere in the bag
    return bags_from_lists(lists, split_labels, target_class, split, bag_labels=positive.astype(np.int64))


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return None
    return float(roc_auc_score(labels, scores))


def score_bags(learner, bags: Bags, x: torch.Tensor, mean, std, device) -> dict[str, np.ndarray]:
    """The learner's bag and instance scores on ``bags`` (instances drawn from ``x``, one split's images)."""
    images = x[torch.as_tensor(bags.instances)]
    outputs = predict_outputs(learner.instance_outputs, images, mean, std, device, outputs=None, module=learner)
    bag, instance = learner.bag_scores(outputs, torch.as_tensor(bags.owner), bags.n_bags)
    return {"bag": bag.numpy(), **{key: value.numpy() for key, value in instance.items()}}


def _summary(scores: dict[str, np.ndarray], bags: Bags) -> dict:
    out = {"bag_auc": _auc(bags.labels, scores["bag"]), "instance_auc": _auc(bags.instance_labels, scores["instance"]),
           "instance_auc_single": None}
    if "instance_single" in scores:
        out["instance_auc_single"] = _auc(bags.instance_labels, scores["instance_single"])
    return out


def _counts(bags: Bags, prefix: str) -> dict:
    positive = bags.labels.astype(bool)
    in_positive = np.repeat(positive, bags.sizes)
    return {f"{prefix}bags": bags.n_bags, f"{prefix}instances": bags.n_instances,
            f"{prefix}positive_fraction": float(positive.mean()),
            f"{prefix}witness_fraction": float(bags.instance_labels[in_positive].mean()),
            f"{prefix}mean_bag_size": float(bags.sizes.mean())}


def run_mil(method: str, data_dir: Path, seed: int, out_dir: Path, overrides: dict | None = None,
            backbone: str | None = None, backbone_kwargs: dict | None = None, threads: int | None = None,
            device: str | None = None, progress: bool = False) -> dict:
    """Draw the bags of every split from ``seed``, train ``method`` on the training bags' labels and
    report bag and instance AUCs on the validation and test bags (see the module docstring).
    ``backbone`` and ``backbone_kwargs`` default to the method YAML's (another backbone without
    ``backbone_kwargs`` gets its own defaults)."""
    from classlab.data.prepare import load_prepared
    from classlab.models import build_classifier

    # bad input stops the job here, before anything is trained or written
    hp = resolve_checked_hparams(FAMILY, method, overrides)
    cls = get_method(FAMILY, method)
    if KIND not in getattr(cls, "scenario_kinds", ()) or getattr(cls, "trains_on", None) not in ("instances", "bags"):
        raise ConfigError(f"method: {FAMILY}/{method} runs on {list(getattr(cls, 'scenario_kinds', ()))}, not on "
                          f"{KIND} (the mil protocol runs mil and mil_attention)")
    if int(hp["bag_size_max"]) < int(hp["bag_size_min"]):
        raise ConfigError(f"bag_size_max: {hp['bag_size_max']} is below bag_size_min {hp['bag_size_min']}")
    set_threads(threads)
    data = load_prepared(Path(data_dir))
    manifest = data.manifest
    k, target = data.num_classes, int(hp["target_class"])
    names = list(manifest.get("class_names") or [str(c) for c in range(k)])
    if not 0 <= target < k:
        raise ConfigError(f"target_class: {target} is not a class of {manifest.get('dataset')} (labels 0..{k - 1})")
    parts = {split: getattr(data, split) for split in SPLITS}
    for split, part in parts.items():
        if part is None or not bool((part.y == target).any()):
            raise ConfigError(f"target_class: the {split} split of {manifest.get('dataset')} holds no image of "
                              f"class {target} ({names[target]})")
    bags = {split: build_bags(parts[split].y.numpy(), target, int(hp[f"{split}_bags"]), int(hp["bag_size_min"]),
                              int(hp["bag_size_max"]), float(hp["witness_rate"]), float(hp["positive_fraction"]),
                              int(seed), split) for split in SPLITS}
    if backbone_kwargs is None:  # the YAML's keywords belong to the YAML's backbone only
        backbone_kwargs = hp["backbone_kwargs"] if backbone in (None, hp["backbone"]) else {}
    backbone = backbone or hp["backbone"]
    backbone_kwargs = dict(backbone_kwargs)
    fingerprint = make_fingerprint(protocol="mil", method=method, hparams=hp, seed=int(seed),
                                   data=dataset_digest(manifest), backbone=backbone, backbone_kwargs=backbone_kwargs,
                                   bags={split: b.digest() for split, b in bags.items()})
    dev = pick_device(device)
    seed_everything(int(seed))
    model = build_classifier(backbone, int(manifest["shape"][0]), 2, img_size=int(manifest["shape"][1]),
                             backbone_kwargs=backbone_kwargs)
    learner = cls(model, hp, 2)
    learner.class_names = [f"not {names[target]}", names[target]]
    mean, std = manifest["channel_mean"], manifest["channel_std"]

    train = bags["train"]
    train_x = parts["train"].x[torch.as_tensor(train.instances)]  # the training bags' instances, bag after bag
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    trainer = Trainer(learner, TrainConfig.from_hparams(hp), dev, int(seed), out_dir / "last.pt", progress,
                      fingerprint=fingerprint)
    if cls.trains_on == "instances":
        # each instance carries its bag's label: the weak label, never its own
        loader = trainer.make_loader(train_x, torch.as_tensor(np.repeat(train.labels, train.sizes)), mean, std)
    else:
        learner.set_bags(train_x, torch.as_tensor(train.offsets), mean, std, seed=int(seed))
        ids = torch.arange(train.n_bags, dtype=torch.float32)[:, None]
        loader = trainer.make_loader(ids, torch.as_tensor(train.labels), None, None)
    steps_per_epoch = len(loader) * max(int(hp.get("online_iter", 1)), 1)
    curve_seconds = [0.0]

    def val_after_epoch(steps: int, _samples: int) -> None:
        # the validation curve (epoch choices are made on it): checkpointed with the run by the engine
        if steps % steps_per_epoch == 0:
            t_eval = time.perf_counter()
            summary = _summary(score_bags(learner, bags["val"], parts["val"].x, mean, std, dev), bags["val"])
            trainer.step_log.append({"epoch": steps // steps_per_epoch,
                                     **{f"val_{key}": value for key, value in summary.items()}})
            curve_seconds[0] += time.perf_counter() - t_eval

    history = trainer.fit(loader, on_step=val_after_epoch) if int(hp.get("epochs", 0)) > 0 else []
    train_seconds = time.perf_counter() - t0 - curve_seconds[0]  # the validation curve's time left out
    learner.to(dev).eval()

    scores = {split: score_bags(learner, bags[split], parts[split].x, mean, std, dev) for split in ("val", "test")}
    test, val = _summary(scores["test"], bags["test"]), _summary(scores["val"], bags["val"])
    test_bags = bags["test"]
    arrays = {}
    for split, prefix in (("test", ""), ("val", "val_")):  # the test bags, and the val bags for choices
        b, s = bags[split], scores[split]
        arrays.update({f"{prefix}bag_scores": s["bag"].astype(np.float32), f"{prefix}bag_labels": b.labels,
                       f"{prefix}instance_scores": s["instance"].astype(np.float32),
                       f"{prefix}instance_labels": b.instance_labels, f"{prefix}instance_owner": b.owner,
                       f"{prefix}instance_positions": b.instances})
        if "instance_single" in s:
            arrays[f"{prefix}instance_scores_single"] = s["instance_single"].astype(np.float32)
    with atomic_path(out_dir / "predictions.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    metrics = {"protocol": "mil", "method": method, "family": FAMILY, "seed": int(seed),
               "dataset": manifest.get("dataset"), "backbone": backbone, "backbone_kwargs": backbone_kwargs,
               "target_class": target, "target_class_name": names[target],
               "instance_score": cls.instance_score_name, **test, **{f"val_{key}": v for key, v in val.items()},
               **_counts(train, "train_"), **_counts(bags["val"], "val_"), **_counts(test_bags, "test_"),
               "positive_fraction": float(train.labels.mean()),
               "bags_digest": {split: b.digest() for split, b in bags.items()},
               "train_steps": int(trainer.steps_done), "train_seconds": train_seconds, "history": history,
               "val_curve": list(trainer.step_log),
               "hparams": hp, "fingerprint": fingerprint, "provenance": run_provenance()}
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / "last.pt").unlink(missing_ok=True)
    return metrics
