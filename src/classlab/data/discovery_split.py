"""Category-discovery splits written as JSON manifests of indices with their seed.

Every method in a discovery comparison reads the same manifest, so each sees the same known and
novel classes, the same labelled samples and the same unlabelled set. The setting follows the
GCD line of work (Vaze et al., "Generalized Category Discovery", CVPR 2022): a seeded class
order splits the classes into known and novel ones; a fraction of each known class's training
samples is labelled; everything else is unlabelled.

Kinds (``SPLIT_KINDS``):
- ``gcd``: the unlabelled set holds the known classes' remaining samples and every novel-class
  sample (generalized category discovery).
- ``ncd``: the unlabelled set holds the novel-class samples only (novel class discovery); the
  known classes' leftover samples are not used. The test set is restricted to novel classes.
- ``continual``: the labelled known set is stage 0; the novel classes then arrive over
  ``stages`` unlabelled stages (dealt in class order, as evenly as possible). A novel class puts
  a seeded share ``novel_first_fraction`` of its samples (default 0.8) in the stage that brings
  it; the rest of its samples joins the pool of recurring samples, as the known classes'
  unlabelled samples do from the start. Each stage then also draws, from that pool, a share
  ``old_fraction`` of every class seen before it (continual GCD as in Happy, Ma et al., NeurIPS
  2024, whose data code gives a new class most of its samples in its first stage and small
  shares in later ones). A class's share is ``round(old_fraction * n)`` of its ``n`` recurring
  samples; shares are drawn without replacement across stages, so no sample is in two stages,
  and a class that has run out contributes what is left (possibly nothing). The novel classes
  of the last stage have no later stage, so the rest of their samples is in no stage.
  ``novel_first_fraction`` 1.0 puts every sample of a novel class in its own stage: the
  recurring samples then come from the known classes only.
- ``active``: the ``gcd`` partition plus a label ``budget`` spent in ``rounds``; the queries are
  chosen later by the run and written to its outputs.

Random streams: ``class_order`` is ``np.random.default_rng(seed).permutation(num_classes)``.
Every other draw uses its own generator, seeded by ``(seed, stream, class)``, so the draw for one
class does not depend on which other classes are known or on the kind: a ``gcd`` and an ``ncd``
split with the same seed label the same samples.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import numpy as np

from classlab.io import read_json, write_json


class SplitError(ValueError):
    """A discovery split that does not fit the data; the message starts with the field name."""


SPLIT_KINDS = ("gcd", "ncd", "continual", "active")
# latent_shift (LLS: domains of shifted class priors, no labels) is built and checked by its own module
EXTERNAL_KINDS = {"latent_shift": "classlab.data.latent_shift"}

# one generator per (seed, stream, class): see the module docstring
_TRAIN_SUBSET, _LABELLED, _TEST_SUBSET, _STAGE_SHARE = 1, 2, 3, 4


def fail_field(field_name: str, message: str) -> None:
    raise SplitError(f"discovery.{field_name}: {message}")


def check_field(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        fail_field(field_name, message)


def as_int(value, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        fail_field(field_name, f"must be an integer, got {value!r}")
    return int(value)


def as_float(value, field_name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        fail_field(field_name, f"must be a finite number, got {value!r}")
    return float(value)


def as_labels(labels, field_name: str, num_classes: int) -> np.ndarray:
    arr = np.asarray(labels)
    check_field(arr.ndim == 1, field_name, f"must be a 1-D array of class ids, got shape {arr.shape}")
    if arr.size == 0:
        return arr.astype(np.int64)
    check_field(np.issubdtype(arr.dtype, np.integer), field_name, f"must hold integer class ids, got dtype {arr.dtype}")
    check_field(int(arr.min()) >= 0 and int(arr.max()) < num_classes, field_name,
           f"class ids must lie in [0, {num_classes}), got [{int(arr.min())}, {int(arr.max())}]")
    return arr.astype(np.int64)


def _rng(seed: int, stream: int, cls: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream, cls])


def _per_class(labels: np.ndarray, num_classes: int, per_class: int, seed: int, stream: int) -> dict[int, np.ndarray]:
    """Indices of each class (sorted); with ``per_class`` > 0 a seeded subset of that many."""
    out = {}
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if per_class > 0 and len(idx) > per_class:
            idx = np.sort(_rng(seed, stream, c).permutation(idx)[:per_class])
        out[c] = idx
    return out


def _sorted_list(indices) -> list[int]:
    return sorted(int(i) for i in indices)


def checked_common_fields(dataset, num_classes, seed, train_labels, test_labels):
    """The fields every split kind shares, validated: (num_classes, seed, train, test labels)."""
    check_field(isinstance(dataset, str) and dataset != "", "dataset", f"must be a non-empty name, got {dataset!r}")
    num_classes = as_int(num_classes, "num_classes")
    check_field(num_classes >= 2, "num_classes", f"discovery needs at least 2 classes, got {num_classes}")
    seed = as_int(seed, "seed")
    check_field(seed >= 0, "seed", f"must be >= 0, got {seed}")
    train = as_labels(train_labels, "train_labels", num_classes)
    test = None if test_labels is None else as_labels(test_labels, "test_labels", num_classes)
    return num_classes, seed, train, test


def build_discovery_split(kind: str, dataset: str, train_labels: np.ndarray, num_classes: int, seed: int, *,
                          test_labels: np.ndarray | None = None,
                          num_novel: int | None = None,
                          labelled_fraction: float = 0.5,
                          samples_per_class: int = 0,
                          test_samples_per_class: int = 0,
                          stages: int = 2,
                          old_fraction: float = 0.5,
                          novel_first_fraction: float = 0.8,
                          budget: int = 0, rounds: int = 0, **extra) -> dict:
    """Build and validate a discovery split manifest (plain JSON types; index lists sorted).

    ``labelled`` and ``unlabelled`` are positions in ``train_labels``; ``test`` positions in
    ``test_labels``. A known class ``c`` with ``n_c`` samples (after the ``samples_per_class``
    cut) gets ``round(labelled_fraction * n_c)`` labelled samples (Python's ``round``: halves go
    to the even number). Raises ``SplitError`` naming the field for any input that does not fit.
    """
    check_field(kind in SPLIT_KINDS or kind in EXTERNAL_KINDS, "kind",
           f"{kind!r} is not one of {', '.join(SPLIT_KINDS + tuple(EXTERNAL_KINDS))}")
    if kind in EXTERNAL_KINDS:
        import importlib

        given = {"num_novel": num_novel, "labelled_fraction": labelled_fraction, "samples_per_class": samples_per_class,
                 "test_samples_per_class": test_samples_per_class, "stages": stages, "old_fraction": old_fraction,
                 "budget": budget, "rounds": rounds, "novel_first_fraction": novel_first_fraction}
        defaults = {"novel_first_fraction": 0.8, "num_novel": None, "labelled_fraction": 0.5, "samples_per_class": 0, "test_samples_per_class": 0,
                    "stages": 2, "old_fraction": 0.5, "budget": 0, "rounds": 0}
        for key, value in given.items():
            check_field(value == defaults[key], key, f"does not apply to kind {kind!r}")

        return importlib.import_module(EXTERNAL_KINDS[kind]).build_split(
            dataset, train_labels, num_classes, seed, test_labels=test_labels, **extra)
    check_field(not extra, next(iter(extra), "params"), f"does not apply to kind {kind!r}")
    num_classes, seed, train, test = checked_common_fields(dataset, num_classes, seed, train_labels, test_labels)

    num_novel = num_classes // 2 if num_novel is None else as_int(num_novel, "num_novel")
    check_field(num_novel >= 1, "num_novel", f"needs at least 1 novel class, got {num_novel}")
    check_field(num_novel <= num_classes - 1, "num_novel",
           f"{num_novel} novel classes requested but {dataset} has {num_classes} classes "
           f"(at most {num_classes - 1} can be novel: one class must stay known)")
    labelled_fraction = as_float(labelled_fraction, "labelled_fraction")
    check_field(0.0 < labelled_fraction <= 1.0, "labelled_fraction", f"must lie in (0, 1], got {labelled_fraction}")
    samples_per_class = as_int(samples_per_class, "samples_per_class")
    check_field(samples_per_class >= 0, "samples_per_class", f"must be >= 0 (0: all samples), got {samples_per_class}")
    test_samples_per_class = as_int(test_samples_per_class, "test_samples_per_class")
    check_field(test_samples_per_class >= 0, "test_samples_per_class",
           f"must be >= 0 (0: all samples), got {test_samples_per_class}")

    params = {"num_novel": num_novel, "labelled_fraction": labelled_fraction,
              "samples_per_class": samples_per_class, "test_samples_per_class": test_samples_per_class}
    if kind == "continual":
        stages = as_int(stages, "stages")
        old_fraction = as_float(old_fraction, "old_fraction")
        check_field(stages >= 1, "stages", f"needs at least 1 unlabelled stage, got {stages}")
        check_field(stages <= num_novel, "stages",
               f"{stages} stages but only {num_novel} novel classes: every stage must bring a new class")
        check_field(0.0 <= old_fraction <= 1.0, "old_fraction", f"must lie in [0, 1], got {old_fraction}")
        novel_first_fraction = as_float(novel_first_fraction, "novel_first_fraction")
        check_field(0.0 < novel_first_fraction <= 1.0, "novel_first_fraction",
               f"must lie in (0, 1], got {novel_first_fraction}")
        params.update(stages=stages, old_fraction=old_fraction, novel_first_fraction=novel_first_fraction)
    if kind == "active":
        budget = as_int(budget, "budget")
        rounds = as_int(rounds, "rounds")
        check_field(budget >= 1, "budget", f"must be at least 1 label, got {budget}")
        check_field(rounds >= 1, "rounds", f"must be at least 1 round, got {rounds}")
        check_field(budget >= rounds, "budget", f"{budget} labels cannot fill {rounds} rounds (at least one label per round)")
        params.update(budget=budget, rounds=rounds)

    class_order = np.random.default_rng(seed).permutation(num_classes).tolist()
    num_known = num_classes - num_novel
    known, novel = sorted(class_order[:num_known]), sorted(class_order[num_known:])

    per_class = _per_class(train, num_classes, samples_per_class, seed, _TRAIN_SUBSET)
    labelled_of: dict[int, np.ndarray] = {}
    rest_of: dict[int, np.ndarray] = {}
    for c in known:
        idx = per_class[c]
        n_labelled = round(labelled_fraction * len(idx))
        check_field(n_labelled >= 1, "labelled_fraction",
               f"known class {c} has {len(idx)} training samples, so a fraction of {labelled_fraction} "
               f"labels none of them; raise the fraction (or samples_per_class)")
        drawn = _rng(seed, _LABELLED, c).permutation(idx)
        labelled_of[c], rest_of[c] = np.sort(drawn[:n_labelled]), np.sort(drawn[n_labelled:])
    labelled = _sorted_list(np.concatenate([labelled_of[c] for c in known]))

    manifest = {"kind": kind, "dataset": dataset, "seed": seed, "num_classes": num_classes, "params": params,
                "class_order": [int(c) for c in class_order], "known_classes": [int(c) for c in known],
                "novel_classes": [int(c) for c in novel], "labelled": labelled}

    if kind in ("gcd", "active"):
        unlabelled = [rest_of[c] for c in known] + [per_class[c] for c in novel]
        manifest["unlabelled"] = _sorted_list(np.concatenate(unlabelled))
    elif kind == "ncd":
        manifest["unlabelled"] = _sorted_list(np.concatenate([per_class[c] for c in novel]))
    else:
        manifest["stages"] = _continual_stages(class_order[num_known:], known, per_class, rest_of,
                                               stages, old_fraction, novel_first_fraction, seed)
        manifest["unlabelled"] = sorted(i for stage in manifest["stages"] for i in stage["unlabelled"])

    check_field(len(manifest["unlabelled"]) > 0, "unlabelled",
           f"the split leaves no unlabelled training sample (novel classes {novel} have none in {dataset})")
    if kind == "active":
        n_unlabelled = len(manifest["unlabelled"])
        check_field(budget <= n_unlabelled, "budget",
               f"{budget} labels requested but the unlabelled set holds only {n_unlabelled} samples")

    if test is None:
        manifest["test"] = []
    else:
        test_per_class = _per_class(test, num_classes, test_samples_per_class, seed, _TEST_SUBSET)
        test_classes = novel if kind == "ncd" else range(num_classes)
        manifest["test"] = _sorted_list(np.concatenate([test_per_class[c] for c in test_classes]))
    validate_discovery_split(manifest)
    return manifest


def _continual_stages(novel_in_order: list[int], known: list[int], per_class: dict[int, np.ndarray],
                      rest_of: dict[int, np.ndarray], stages: int, old_fraction: float,
                      novel_first_fraction: float, seed: int) -> list[dict]:
    # the novel classes, in class order, cut into `stages` consecutive groups whose sizes differ
    # by at most one (the first groups take the remainder)
    size, extra = divmod(len(novel_in_order), stages)
    groups, start = [], 0
    for s in range(stages):
        end = start + size + (1 if s < extra else 0)
        groups.append(novel_in_order[start:end])
        start = end
    # recurring samples of each class, in a seeded order that later stages take from the front:
    # a known class's unlabelled samples from the start; a novel class's joins once its stage has
    # taken its first share (both orders come from the class's own _STAGE_SHARE generator)
    pool: dict[int, np.ndarray] = {}
    share: dict[int, int] = {}
    taken: dict[int, int] = {}

    def recur(c: int, samples: np.ndarray) -> None:
        pool[c], share[c], taken[c] = samples, round(old_fraction * len(samples)), 0

    for c in known:
        recur(c, _rng(seed, _STAGE_SHARE, c).permutation(rest_of[c]))
    seen = list(known)
    out = []
    for s, group in enumerate(groups, start=1):
        stage_idx = []
        for c in group:
            drawn = _rng(seed, _STAGE_SHARE, c).permutation(per_class[c])
            n_first = round(novel_first_fraction * len(drawn))
            check_field(n_first >= 1 or len(drawn) == 0, "novel_first_fraction",
                   f"novel class {c} has {len(drawn)} training samples, so a fraction of {novel_first_fraction} "
                   f"puts none of them in its first stage; raise the fraction")
            stage_idx.append(drawn[:n_first])
            recur(c, drawn[n_first:])  # drawn by the later stages only
        for c in seen:
            n = min(share[c], len(pool[c]) - taken[c])   # a class that runs out gives what is left
            stage_idx.append(pool[c][taken[c]:taken[c] + n])
            taken[c] += n
        unlabelled = _sorted_list(np.concatenate(stage_idx)) if stage_idx else []
        check_field(len(unlabelled) > 0, "stages",
               f"stage {s} (new classes {sorted(group)}) has no samples; use fewer stages or more data")
        out.append({"new_classes": sorted(int(c) for c in group), "old_classes": sorted(int(c) for c in seen),
                    "unlabelled": unlabelled})
        seen = seen + group
    return out


def validate_discovery_split(manifest: dict) -> None:
    """Check the invariants every manifest must hold; raise ``SplitError`` naming the field."""
    if not isinstance(manifest, dict):
        raise SplitError(f"discovery: a manifest is a dict, got {type(manifest).__name__}")
    if manifest.get("kind") in EXTERNAL_KINDS:
        import importlib

        importlib.import_module(EXTERNAL_KINDS[manifest["kind"]]).validate_split(manifest)
        return
    for key in ("kind", "dataset", "seed", "num_classes", "params", "class_order", "known_classes",
                "novel_classes", "labelled", "unlabelled", "test"):
        check_field(key in manifest, key, "missing from the manifest")
    check_field(manifest["kind"] in SPLIT_KINDS, "kind", f"{manifest['kind']!r} is not one of {', '.join(SPLIT_KINDS)}")
    num_classes = manifest["num_classes"]
    check_field(sorted(manifest["class_order"]) == list(range(num_classes)), "class_order",
           f"must be a permutation of range({num_classes})")
    known, novel = manifest["known_classes"], manifest["novel_classes"]
    check_field(len(known) >= 1, "known_classes", "needs at least 1 known class")
    check_field(len(novel) >= 1, "num_novel", "needs at least 1 novel class")
    check_field(sorted(known + novel) == list(range(num_classes)), "known_classes",
           "known and novel classes must partition the classes")
    for key in ("labelled", "unlabelled", "test"):
        values = manifest[key]
        check_field(all(isinstance(i, int) and i >= 0 for i in values), key, "must hold non-negative integer indices")
        check_field(all(a < b for a, b in zip(values, values[1:])), key, "must be sorted without repeats")
    check_field(len(manifest["labelled"]) >= 1, "labelled", "no labelled sample")
    overlap = set(manifest["labelled"]) & set(manifest["unlabelled"])
    check_field(not overlap, "unlabelled", f"{len(overlap)} samples are both labelled and unlabelled")
    if manifest["kind"] == "continual":
        stages = manifest.get("stages")
        check_field(isinstance(stages, list) and len(stages) >= 1, "stages", "a continual split needs at least 1 stage")
        used: set[int] = set()
        for s, stage in enumerate(stages, start=1):
            check_field(len(stage.get("unlabelled", [])) > 0, "stages", f"stage {s} has no samples")
            check_field(not used & set(stage["unlabelled"]), "stages", f"stage {s} repeats samples of an earlier stage")
            used |= set(stage["unlabelled"])
        check_field(sorted(used) == manifest["unlabelled"], "unlabelled", "must be the union of the stages' samples")
    if manifest["kind"] == "active":
        budget = manifest["params"].get("budget", 0)
        check_field(1 <= budget <= len(manifest["unlabelled"]), "budget",
               f"{budget} labels requested but the unlabelled set holds {len(manifest['unlabelled'])} samples")
        check_field(manifest["params"].get("rounds", 0) >= 1, "rounds", "must be at least 1 round")


def write_discovery_split(manifest: dict, path: str | os.PathLike) -> None:
    """Validate, then write atomically: an invalid manifest leaves no file at all."""
    validate_discovery_split(manifest)
    write_json(Path(path), manifest)


def load_discovery_split(path: str | os.PathLike) -> dict:
    manifest = read_json(Path(path))
    validate_discovery_split(manifest)
    return manifest
