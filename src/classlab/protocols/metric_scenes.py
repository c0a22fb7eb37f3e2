"""Scene retrieval (CFCD's protocol, the metric family): find the scenes that hold an object of the query's
class, each object placed among distractors.

Data: a single-target scenes dataset (``fashion_mnist_scenes``, ``digits_scenes``, ``mnist_scenes``; see
``classlab.data.scenes``): one target object of a target class and ``n_distractors`` objects of other
classes on a grid canvas; a scene's label is its target's class. A method of the ``metric`` family
(``cfcd``, ``cfcd_global``) trains on the train split's scenes with their target labels through the shared
engine, on the backbone's spatial feature map (``convnet`` by default; its map keeps the local
descriptors). ``max_train_scenes`` > 0 trains on a seeded subset of that many scenes (the same for every
method of a seed).

Retrieval on the test split: ``queries`` test scenes, drawn per seed, are the queries and the other test
scenes the database; a database scene is relevant to a query when their targets share a class (the query's
object appears among distractors in every scene, so the descriptor must attend to the target). Descriptors
are the methods' L2-normalised global descriptors, ranked by cosine similarity. Reported:

- ``map``: mean over queries of the average precision over the full ranking of the database (the
  landmark-retrieval convention; ``average_precision`` below); queries without a relevant database scene
  are left out (``n_queries_scored``);
- ``precision_at_1/5/10``: the share of relevant scenes among the top k; ``recall_at_1/5``: the share of
  queries with a relevant scene in the top k (Recall@K of deep metric learning).

The same on the val split (``val_`` prefix; ``min(queries, len(val) // 2)`` val queries), where every choice
is made (epochs, top-K, thresholds); test is only reported.

One job is one (method, seed): ``out_dir/retrieval_examples.json`` (the first queries with their top-5
database scenes, for the report's figure: split positions, labels, relevance, scores) and
``out_dir/metrics.json``, written last. Besides the scalars it holds two curves: ``history`` (per stage and
epoch: loss, train accuracy of the cosine logits, throughput) and ``madacos_trace`` (per epoch: the mean
MadaCos scale, margin and median target cosine, and in cfcd's fine stage the local loss and the matches per
tuple; after a resume, the epochs this process ran). Training runs as two engine fits, ``coarse``
(``epochs``) then ``fine`` (``fine_epochs``), each with its own resume checkpoint (``last_<stage>.pt``,
removed at the end). Bad input stops the job before anything is written
(``ConfigError`` naming the field): an empty retrieval split (``queries`` 0, or at least the test split's
size, which leaves no database), a dataset without scene boxes (not a scenes dataset), ``local_top_k`` < 1
or above the feature map's locations, a backbone without a spatial feature map.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.data.loader import mix_seed
from classlab.engine import Trainer, TrainConfig
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.engine.fingerprint import dataset_digest, make_fingerprint
from classlab.engine.predict import predict_outputs
from classlab.io import write_json
from classlab.methods.registry import get_method
from classlab.provenance import run_provenance

FAMILY = "metric"
PROTOCOL = "metric_scenes"
QUERY_STREAM = 0x5CE9E  # keeps the query draw apart from every other use of the seed
TRAIN_STREAM = 0x5CE7A
PRECISION_KS = (1, 5, 10)
RECALL_KS = (1, 5)
EXAMPLES = 8  # queries written to retrieval_examples.json
TOP = 5


# --- ranking metrics --------------------------------------------------------------------------------

def average_precision(scores, relevant) -> float:
    """Average precision of one query over the full ranking of a database.

    ``scores`` (N,): the query's similarity to each database item (higher ranks first; ties keep database
    order); ``relevant`` (N,): booleans. AP = (1 / R) sum over the relevant items of the precision at their
    rank, R the number of relevant items: the non-interpolated AP of landmark retrieval (Revisited
    Oxford/Paris without junk images). NaN where no item is relevant (the caller leaves such queries out).
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    relevant = np.asarray(relevant, dtype=bool).reshape(-1)
    if scores.shape != relevant.shape:
        raise ValueError(f"average_precision: {scores.shape[0]} scores but {relevant.shape[0]} relevance flags")
    total = int(relevant.sum())
    if total == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    hits = relevant[order]
    ranks = np.flatnonzero(hits) + 1  # 1-based ranks of the relevant items
    # AP = 1/R sum_r (number of relevant items in the top r) / r, over the ranks r of the relevant items
    return float(np.mean(np.arange(1, total + 1) / ranks))


def retrieval_scores(query_emb: np.ndarray, query_labels: np.ndarray, db_emb: np.ndarray,
                     db_labels: np.ndarray) -> tuple[dict, np.ndarray]:
    """mAP, precision@k and recall@k of the queries against the database (cosine of unit vectors).
    Returns (metrics, the (Q, N) similarity matrix)."""
    sim = np.asarray(query_emb, dtype=np.float64) @ np.asarray(db_emb, dtype=np.float64).T
    rel = np.asarray(query_labels)[:, None] == np.asarray(db_labels)[None, :]
    aps = np.array([average_precision(sim[q], rel[q]) for q in range(len(sim))])
    order = np.argsort(-sim, axis=1, kind="stable")
    ranked = np.take_along_axis(rel, order, axis=1)
    scored = ~np.isnan(aps)
    out = {"map": float(np.mean(aps[scored])) if scored.any() else None,
           "n_queries": int(len(sim)), "n_queries_scored": int(scored.sum()), "n_database": int(sim.shape[1])}
    for k in PRECISION_KS:
        kk = min(k, ranked.shape[1])
        out[f"precision_at_{k}"] = float(ranked[:, :kk].mean())
    for k in RECALL_KS:
        kk = min(k, ranked.shape[1])
        out[f"recall_at_{k}"] = float(ranked[:, :kk].any(axis=1).mean())
    return out, sim


def split_queries(n: int, queries: int, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray]:
    """(query positions, database positions) of a split of ``n`` scenes, both ascending; seeded."""
    rng = np.random.default_rng(mix_seed(int(seed), stream))
    chosen = np.zeros(n, dtype=bool)
    chosen[rng.choice(n, size=queries, replace=False)] = True
    return np.flatnonzero(chosen), np.flatnonzero(~chosen)


# --- the protocol -------------------------------------------------------------------------------------

def _check_queries(queries: int, n_test: int) -> None:
    if queries < 1:
        raise ConfigError(f"queries: {queries} gives an empty retrieval split (no queries); give 1 <= queries < "
                          f"{n_test} (the test split's scenes)")
    if queries >= n_test:
        raise ConfigError(f"queries: {queries} of the test split's {n_test} scenes leaves an empty database; give "
                          f"queries < {n_test}")


def _stage_config(hp: dict, stage: str) -> TrainConfig:
    if stage == "coarse":
        return TrainConfig.from_hparams(hp)
    return TrainConfig.from_hparams({**hp, "epochs": int(hp["fine_epochs"]), "warmup_frac": float(hp["fine_warmup_frac"])})


def run_metric_scenes(method: str, data_dir: Path, seed: int, out_dir: Path, overrides: dict | None = None,
                      backbone: str = "convnet", backbone_kwargs: dict | None = None, threads: int | None = None,
                      device: str | None = None, progress: bool = False) -> dict:
    """Train ``method`` (family metric) on the train scenes' target labels, then retrieve test scenes by
    their target's class (see the module docstring); returns (and writes) the metrics."""
    from classlab.data.prepare import load_prepared
    from classlab.models.backbones import build_backbone

    # bad input stops the job here, before anything is trained or written
    hp = resolve_checked_hparams(FAMILY, method, overrides)
    if int(hp["local_top_k"]) < 1:
        raise ConfigError(f"local_top_k: {hp['local_top_k']} must be at least 1")
    cls = get_method(FAMILY, method)
    set_threads(threads)
    data = load_prepared(Path(data_dir))
    manifest = data.manifest
    dataset = manifest.get("dataset", "")
    if data.test.boxes is None or data.train.boxes is None or "scenes" not in manifest:
        raise ConfigError(f"data_dir: {data_dir} ({dataset}) has no scene boxes: scene retrieval needs a scenes "
                          f"dataset (fashion_mnist_scenes, digits_scenes, mnist_scenes)")
    queries = int(hp["queries"])
    _check_queries(queries, len(data.test.y))
    k = data.num_classes
    backbone_kwargs = dict(backbone_kwargs or {})
    in_chans, size = int(manifest["shape"][0]), int(manifest["shape"][1])
    try:
        net = build_backbone(backbone, in_chans, False, size, **backbone_kwargs)
    except ConfigError:
        raise
    except (KeyError, ValueError, TypeError) as exc:
        raise ConfigError(f"backbone: {backbone!r} with backbone_kwargs {backbone_kwargs}: {exc}") from exc
    if not hasattr(net, "forward_features"):
        raise ConfigError(f"backbone: {backbone!r} has no spatial feature map (forward_features); CFCD's local "
                          f"descriptors need a convolutional backbone (convnet, resnet18)")
    with torch.no_grad():
        fmap = net.eval().forward_features(torch.zeros(1, in_chans, *manifest["shape"][1:]))
    net.train()
    if fmap.ndim != 4:
        raise ConfigError(f"backbone: {backbone!r} gives features of shape {tuple(fmap.shape)}, not a spatial map "
                          f"(B, C, H, W); use a convolutional backbone (convnet, resnet18)")
    locations = int(fmap.shape[2] * fmap.shape[3])
    if float(hp["local_weight"]) > 0 and int(hp["local_top_k"]) > locations:
        raise ConfigError(f"local_top_k: {hp['local_top_k']} exceeds the {fmap.shape[2]}x{fmap.shape[3]} = "
                          f"{locations} locations of the {backbone} feature map on {dataset}")

    # the training scenes: all, or a seeded subset (the same for every method of a seed)
    n_train = len(data.train.y)
    cap = int(hp["max_train_scenes"])
    train_idx = None
    if 0 < cap < n_train:
        gen = torch.Generator().manual_seed(mix_seed(int(seed), TRAIN_STREAM))
        train_idx = torch.sort(torch.randperm(n_train, generator=gen)[:cap]).values
    test_q, test_db = split_queries(len(data.test.y), queries, int(seed), QUERY_STREAM)
    n_val = len(data.val.y)
    val_queries = min(queries, n_val // 2)
    fingerprint = make_fingerprint(protocol=PROTOCOL, method=method, hparams=hp, seed=int(seed),
                                   data=dataset_digest(manifest), backbone=backbone, backbone_kwargs=backbone_kwargs,
                                   train_scenes="all" if train_idx is None else
                                   hashlib.sha256(train_idx.numpy().tobytes()).hexdigest())
    dev = pick_device(device)
    seed_everything(int(seed))
    net = build_backbone(backbone, in_chans, False, size, **backbone_kwargs)  # fresh, from the seed
    learner = cls(net, hp, k)
    learner.class_names = list(manifest.get("class_names") or [str(c) for c in range(k)])
    mean, std = manifest["channel_mean"], manifest["channel_std"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # coarse stage (MadaCos), then fine stage (MadaCos + local triplet; off where local_weight is 0): two fits,
    # each with its own optimizer, schedule and resume checkpoint, as the release's stage 1 and stage 2
    t0 = time.perf_counter()
    history, steps = [], 0
    for stage in ("coarse", "fine"):
        config = _stage_config(hp, stage)
        if config.epochs <= 0:
            continue
        learner.stage = stage
        trainer = Trainer(learner, config, dev, int(seed), out_dir / f"last_{stage}.pt", progress,
                          fingerprint={**fingerprint, "stage": stage})
        rows = trainer.fit(trainer.make_loader(data.train.x, data.train.y, mean, std, indices=train_idx))
        history += [{"stage": stage, **row} for row in rows]
        steps += int(trainer.steps_done)
    train_seconds = time.perf_counter() - t0
    learner.to(dev).eval()

    def embed(x):
        return predict_outputs(learner.embed, x, mean, std, dev, outputs=("embedding",))["embedding"].numpy()

    test_emb, test_labels = embed(data.test.x), data.test.y.numpy()
    test, sim = retrieval_scores(test_emb[test_q], test_labels[test_q], test_emb[test_db], test_labels[test_db])
    val = {}
    if val_queries >= 1 and n_val - val_queries >= 1:
        val_q, val_db = split_queries(n_val, val_queries, int(seed), QUERY_STREAM + 1)
        val_emb, val_labels = embed(data.val.x), data.val.y.numpy()
        scores, _ = retrieval_scores(val_emb[val_q], val_labels[val_q], val_emb[val_db], val_labels[val_db])
        val = {f"val_{key}": value for key, value in scores.items()}

    examples = []
    for q in range(min(EXAMPLES, len(test_q))):
        top = np.argsort(-sim[q], kind="stable")[:TOP]
        examples.append({"query": int(test_q[q]), "query_label": int(test_labels[test_q[q]]),
                         "top": [int(test_db[j]) for j in top], "top_labels": [int(test_labels[test_db[j]]) for j in top],
                         "top_relevant": [bool(test_labels[test_db[j]] == test_labels[test_q[q]]) for j in top],
                         "top_scores": [float(sim[q, j]) for j in top]})
    write_json(out_dir / "retrieval_examples.json",
               {"protocol": PROTOCOL, "method": method, "seed": int(seed), "dataset": dataset, "split": "test",
                "note": "indices are positions in the prepared test split; top: the query's 5 nearest database scenes",
                "class_names": learner.class_names, "examples": examples})
    metrics = {"protocol": PROTOCOL, "method": method, "family": FAMILY, "seed": int(seed), "dataset": dataset,
               "backbone": backbone, "backbone_kwargs": backbone_kwargs, **test, **val,
               "train_scenes": int(n_train if train_idx is None else len(train_idx)),
               "feature_map": [int(fmap.shape[1]), int(fmap.shape[2]), int(fmap.shape[3])],
               "train_steps": steps, "train_seconds": train_seconds, "history": history,
               "madacos_trace": learner.trace, "hparams": hp, "fingerprint": fingerprint,
               "provenance": run_provenance(), "class_names": learner.class_names}
    write_json(out_dir / "metrics.json", metrics)
    for stage in ("coarse", "fine"):
        (out_dir / f"last_{stage}.pt").unlink(missing_ok=True)
    return metrics
