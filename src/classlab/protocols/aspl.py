"""The pool-based active-learning protocol of ASPL (single_paper family, scenario kind ``active``).

Lin, Wang, Meng, Zuo and Zhang, "Active Self-Paced Learning for Cost-Effective and Progressive Face
Identification", IEEE TPAMI 2018: the claim is that pseudo-labelling the high-confidence samples
(self-paced learning) on top of querying the low-confidence ones (active learning) reaches the same
accuracy with fewer oracle labels than active learning alone.

The scenario, the same for every method of a seed:

- a seeded initial labelled set of ``initial_per_class`` train-split samples per class; the rest of the
  train split is the unlabelled pool, whose labels stay hidden (read only for the oracle's answers and,
  for the report, the accuracy of the pseudo-labels);
- round 0 trains on the initial set. Round t = 1, 2, ... asks the method, with the model of round t - 1,
  for ``min(queries_per_round, what is left of query_budget)`` pool samples, which the oracle labels
  (they join the labelled set for good), and, where the method pseudo-labels (aspl), for the SPL
  pseudo-labels and weights of the rest of the pool at pace lambda_t (recomputed every round, never
  counted as queries); then retrains (through ``classlab.engine.Trainer``) on the labelled set (v = 1) and
  the pseudo-labelled samples with v > 0, for ``train_steps`` optimizer steps whatever the set's size, from
  the previous round's weights (``warm_start``) or the run's initial ones;
- after every round the model is evaluated on val (every choice is read there) and on test (reported).

Outputs (``out_dir/metrics.json``, written last): the learning curves as lists, one entry per round
(``curve_labels``: labels used = initial set + queries so far; ``curve_queried``; ``curve_val_acc``;
``curve_test_acc``; ``curve_pseudo_count``, ``curve_pseudo_acc``, ``curve_pseudo_weight``; ``curve_lambda``;
``curve_train_size``) and the scalars: ``final_test_acc`` (= ``top1``), ``final_val_acc`` (= ``val_top1``),
``test_auc`` / ``val_auc`` (trapezoidal area under the curve over the label axis divided by its width:
the mean accuracy over the label range), ``labels_to_target`` / ``val_labels_to_target`` (the labels at
which the curve first reaches ``target_accuracy``; None when it never does), the pseudo-label totals and
their accuracy against the hidden labels (report only), the query order (train-split positions), hparams,
fingerprint, train_seconds and provenance.

Bad input stops the job with a ConfigError naming the field before anything is written: a query budget
above the unlabelled pool (``query_budget``), fewer than one query per round (``queries_per_round``), an
initial set larger than the data or than a class (``initial_per_class``), a method that does not run on
the ``active`` scenario kind, an unknown backbone keyword (``backbone_kwargs``), a dataset without a val split.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.data.loader import mix_seed
from classlab.engine import Trainer, TrainConfig, predict_logits
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.engine.fingerprint import dataset_digest, make_fingerprint
from classlab.io import write_json
from classlab.methods.registry import get_method
from classlab.provenance import run_provenance

FAMILY = "single_paper"
KIND = "active"
# streams that keep the protocol's draws apart from each other and from every other use of the seed
INITIAL_STREAM, QUERY_STREAM, LOADER_STREAM = 0xA5F1, 0xA5F2, 0xA5F3


def initial_labelled(labels: torch.Tensor, per_class: int, num_classes: int, seed: int) -> torch.Tensor:
    """``per_class`` train-split positions of every class, drawn per seed (the same for every method)."""
    rng = np.random.default_rng(mix_seed(int(seed), INITIAL_STREAM))
    y = labels.numpy()
    picked = [rng.choice(np.flatnonzero(y == c), size=per_class, replace=False) for c in range(num_classes)]
    return torch.as_tensor(np.sort(np.concatenate(picked)), dtype=torch.long)


def query_schedule(budget: int, per_round: int) -> list[int]:
    """Queries of each round t = 1, 2, ...: ``per_round`` until the budget is spent (the last may be smaller)."""
    out, left = [], int(budget)
    while left > 0:
        out.append(min(int(per_round), left))
        left -= out[-1]
    return out


def normalised_auc(x: list[float], y: list[float]) -> float | None:
    """Area under y(x) by the trapezoid rule divided by the x range (a single point: its y)."""
    if not y:
        return None
    if len(y) == 1 or x[-1] == x[0]:
        return float(y[-1])
    area = sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(y) - 1))
    return float(area / (x[-1] - x[0]))


def labels_to_reach(x: list[int], acc: list[float], target: float) -> int | None:
    """The first x at which acc reaches ``target``; None where it never does."""
    for xi, ai in zip(x, acc):
        if ai >= target:
            return int(xi)
    return None


def _check_inputs(hp: dict, labels: torch.Tensor, num_classes: int) -> tuple[int, int]:
    """(initial set size, pool size) or a ConfigError naming the field."""
    per_class = hp["initial_per_class"]
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise ConfigError(f"initial_per_class: {per_class!r} must be a positive integer")
    counts = torch.bincount(labels, minlength=num_classes)
    n = int(len(labels))
    if per_class * num_classes > n or int(counts.min()) < per_class:
        raise ConfigError(f"initial_per_class: {per_class} per class ({per_class * num_classes} in all) is larger "
                          f"than the data: the train split has {n} samples, the smallest class {int(counts.min())}")
    per_round = hp["queries_per_round"]
    if isinstance(per_round, bool) or not isinstance(per_round, int) or per_round < 1:
        raise ConfigError(f"queries_per_round: {per_round!r} must be an integer >= 1")
    budget = hp["query_budget"]
    pool = n - per_class * num_classes
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ConfigError(f"query_budget: {budget!r} must be a non-negative integer")
    if budget > pool:
        raise ConfigError(f"query_budget: {budget} queries exceed the unlabelled pool of {pool} samples "
                          f"({n} train samples minus the initial {per_class * num_classes})")
    return per_class * num_classes, pool


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else float("nan")


def _round_indices(train_idx: torch.Tensor, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """``steps * batch_size`` positions drawn from ``train_idx`` in whole shuffled passes (each sample
    equally often, give or take one): one engine epoch of exactly ``steps`` batches, whatever the set's size."""
    total = int(steps) * int(batch_size)
    gen = torch.Generator().manual_seed(mix_seed(seed, 1))
    passes = -(-total // len(train_idx))
    return torch.cat([train_idx[torch.randperm(len(train_idx), generator=gen)] for _ in range(passes)])[:total]


def run_aspl(method: str, data_dir: Path, seed: int, out_dir: Path, overrides: dict | None = None,
             backbone: str | None = None, backbone_kwargs: dict | None = None, threads: int | None = None,
             device: str | None = None, progress: bool = False) -> dict:
    """Run ``method`` (aspl, active_only, random_queries) through the pool-based rounds on the prepared
    dataset ``data_dir``; returns (and writes to ``out_dir/metrics.json``) the metrics. ``backbone`` and
    ``backbone_kwargs`` default to the method YAML's ``backbone`` / ``backbone_kwargs`` (another backbone
    without ``backbone_kwargs`` gets its own defaults)."""
    from classlab.data.prepare import load_prepared
    from classlab.models import build_classifier

    # --- everything that can be wrong is checked here, before anything is written ---------------
    hp = resolve_checked_hparams(FAMILY, method, overrides)
    cls = get_method(FAMILY, method)
    if KIND not in tuple(getattr(cls, "scenario_kinds", ())):
        raise ConfigError(f"method: {FAMILY}/{method} runs on {list(getattr(cls, 'scenario_kinds', ()))}, not on "
                          f"the {KIND!r} protocol")
    set_threads(threads)
    data = load_prepared(Path(data_dir))
    manifest = data.manifest
    k = int(data.num_classes)
    train_x, train_y = data.train.x, data.train.y.long()
    initial_size, pool_size = _check_inputs(hp, train_y, k)
    if data.val is None or len(data.val.y) == 0:
        raise ConfigError(f"data_dir: {data_dir} has no val split; the protocol makes its choices on val "
                          "(re-run `classlab prepare`)")
    if backbone_kwargs is None:  # the YAML's keywords belong to the YAML's backbone only
        backbone_kwargs = hp["backbone_kwargs"] if backbone in (None, hp["backbone"]) else {}
    backbone = backbone or str(hp["backbone"])
    backbone_kwargs = dict(backbone_kwargs)
    seed = int(seed)
    seed_everything(seed)
    try:
        model = build_classifier(backbone, int(manifest["shape"][0]), k, img_size=int(manifest["shape"][1]),
                                 backbone_kwargs=backbone_kwargs)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"backbone_kwargs / backbone: {exc}") from exc
    schedule = query_schedule(hp["query_budget"], hp["queries_per_round"])

    dataset = manifest.get("dataset", "")
    initial = initial_labelled(train_y, hp["initial_per_class"], k, seed)
    fingerprint = make_fingerprint(protocol="aspl", method=method, hparams=hp, seed=seed, data=dataset_digest(manifest),
                                   backbone=backbone, backbone_kwargs=backbone_kwargs,
                                   initial=hashlib.sha256(initial.numpy().tobytes()).hexdigest())
    dev = pick_device(device)
    learner = cls(model, hp, k)
    learner.class_names = list(manifest.get("class_names") or [str(c) for c in range(k)])
    init_state = {name: t.detach().clone() for name, t in learner.model.state_dict().items()}
    mean, std = manifest["channel_mean"], manifest["channel_std"]
    config = TrainConfig.from_hparams({**hp, "epochs": 1})
    out_dir = Path(out_dir)

    labelled = initial.clone()
    in_pool = torch.ones(len(train_y), dtype=torch.bool)
    in_pool[initial] = False
    curve = {key: [] for key in ("labels", "queried", "val_acc", "test_acc", "pseudo_count", "pseudo_acc",
                                 "pseudo_weight", "lambda", "train_size", "train_loss")}
    query_order: list[int] = []
    queried = 0
    train_seconds = 0.0
    pseudo_idx = torch.zeros(0, dtype=torch.long)
    pseudo_y = torch.zeros(0, dtype=torch.long)
    pseudo_v = torch.zeros(0)
    lam = None
    for t in range(len(schedule) + 1):
        t0 = time.perf_counter()
        if t > 0:
            # the model of round t - 1 ranks the pool: its least confident go to the oracle (the w-fixed step)
            pool_idx = torch.nonzero(in_pool).flatten()
            logits = predict_logits(learner, train_x[pool_idx], mean, std, dev)
            probs = torch.softmax(logits.float(), dim=1)
            gen = torch.Generator().manual_seed(mix_seed(seed, QUERY_STREAM, t))
            rows = learner.queries(probs, schedule[t - 1], gen)
            asked = pool_idx[rows]
            labelled = torch.cat([labelled, asked])  # the oracle answers with train_y[asked]
            in_pool[asked] = False
            queried += len(asked)
            query_order += asked.tolist()
            exclude = torch.zeros(len(pool_idx), dtype=torch.bool)
            exclude[rows] = True  # Psi_lambda: a queried sample keeps its oracle label, never a pseudo-label
            made = learner.pseudo_labels(probs, t, len(labelled), exclude)
            if made is not None:
                labels_u, weights_u, lam = made
                keep = weights_u > 0
                pseudo_idx, pseudo_y, pseudo_v = pool_idx[keep], labels_u[keep], weights_u[keep]
        # the training set of round t: oracle labels with v = 1, pseudo-labels with their SPL weights
        targets = torch.full((len(train_y),), -1, dtype=torch.long)
        weights = torch.zeros(len(train_y))
        targets[pseudo_idx], weights[pseudo_idx] = pseudo_y, pseudo_v
        targets[labelled], weights[labelled] = train_y[labelled], 1.0
        train_idx = torch.cat([labelled, pseudo_idx])
        if not hp.get("warm_start", True):
            learner.model.load_state_dict(init_state)
        round_seed = mix_seed(seed, LOADER_STREAM, t) % (2 ** 31)  # the engine multiplies it by ~1e6: keep it small
        trainer = Trainer(learner, config, dev, round_seed, None, progress, fingerprint=fingerprint)
        learner.set_sample_weights(weights)
        loader = trainer.make_loader(train_x, targets, mean, std,
                                     indices=_round_indices(train_idx, hp["train_steps"], hp["batch_size"], round_seed))
        history = trainer.fit(loader)
        train_seconds += time.perf_counter() - t0
        learner.eval()
        val_acc = _accuracy(predict_logits(learner, data.val.x, mean, std, dev), data.val.y)
        test_acc = _accuracy(predict_logits(learner, data.test.x, mean, std, dev), data.test.y)
        curve["labels"].append(int(len(labelled)))
        curve["queried"].append(int(queried))
        curve["val_acc"].append(val_acc)
        curve["test_acc"].append(test_acc)
        curve["pseudo_count"].append(int(len(pseudo_idx)))
        # pseudo-label accuracy against the hidden labels: for the report only, never read by the method
        curve["pseudo_acc"].append(float((pseudo_y == train_y[pseudo_idx]).float().mean()) if len(pseudo_idx) else None)
        curve["pseudo_weight"].append(float(pseudo_v.sum()))
        curve["lambda"].append(lam)
        curve["train_size"].append(int(len(train_idx)))
        curve["train_loss"].append(float(history[-1]["loss"]) if history else None)

    target = float(hp["target_accuracy"])
    counts = curve["pseudo_count"]
    right = sum(c * a for c, a in zip(counts, curve["pseudo_acc"]) if a is not None)
    metrics = {
        "protocol": "aspl", "method": method, "family": FAMILY, "scenario_kind": KIND, "seed": seed,
        "dataset": dataset, "backbone": backbone, "backbone_kwargs": backbone_kwargs, "num_classes": k,
        "initial_labels": initial_size, "pool_size": pool_size, "query_budget": int(hp["query_budget"]),
        "queries_per_round": int(hp["queries_per_round"]), "rounds": len(schedule),
        **{f"curve_{key}": value for key, value in curve.items()},
        "final_test_acc": curve["test_acc"][-1], "final_val_acc": curve["val_acc"][-1],
        "top1": curve["test_acc"][-1], "val_top1": curve["val_acc"][-1],
        "test_auc": normalised_auc(curve["labels"], curve["test_acc"]),
        "val_auc": normalised_auc(curve["labels"], curve["val_acc"]),
        "target_accuracy": target,
        "labels_to_target": labels_to_reach(curve["labels"], curve["test_acc"], target),
        "val_labels_to_target": labels_to_reach(curve["labels"], curve["val_acc"], target),
        "queried_total": int(queried), "labels_total": int(len(labelled)),
        "pseudo_count_total": int(sum(counts)), "pseudo_count_final": int(counts[-1]),
        "pseudo_acc_overall": float(right / sum(counts)) if sum(counts) else None,
        "pseudo_acc_final": curve["pseudo_acc"][-1],
        "initial_indices": initial.tolist(), "query_order": query_order,
        "train_steps": int(hp["train_steps"]) * (len(schedule) + 1), "train_seconds": train_seconds,
        "hparams": hp, "fingerprint": fingerprint, "provenance": run_provenance(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    (out_dir / "last.pt").unlink(missing_ok=True)  # no resume checkpoint is kept (a run is about a minute)
    return metrics
