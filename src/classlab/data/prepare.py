"""Turn verified raw files into compact uint8 tensors plus a JSON manifest.

The raw train split is cut into a training part (``train.pt``) and a seeded, per-class
stratified validation part (``val.pt``); the raw test split becomes ``test.pt`` untouched.
Every consumer that reads ``load_prepared(...).train`` therefore never sees a validation
sample; choices (epochs, learning rates, options) are made on ``.val`` and ``.test`` is only
reported. The manifest records which raw-train indices went to validation, with the fraction
and the seed, so the cut can be recomputed (``stratified_holdout``) and checked.

Scene datasets (``fashion_mnist_scenes``, ``digits_scenes``, ...: a registry spec with a
``scene_base``) read their base dataset's raw files, build single-target scenes from them with
a recipe (``classlab.data.scenes``; the spec's defaults, overridden by ``recipe``), and then
go through the same path: the train scenes play the raw train split (validation held out by
scene label), the test scenes the raw test split. Each split file also carries the scenes'
``boxes`` (N, 4), ``distractor_boxes`` (N, D, 4), ``distractor_labels`` (N, D) and
``object_sources`` (N, 1 + D), cut with their scenes; the manifest adds the recipe, the base
dataset, the canvas and the box-area share (``scenes``).

Pairs datasets (``fashion_mnist_pairs``, ``digits_pairs``: a spec with a ``pairs_base``) colour
their base dataset's raw images into attribute-object pairs (``classlab.data.pairs``); the raw
train split keeps the seen pairs' images only (so does validation, cut from it), the raw test split
every pair's; the manifest adds ``pairs`` (attributes, objects, the pair of each label, seen and
unseen labels, the recipe). A bad recipe raises ``PairsError`` before anything is written.

Dense scene datasets (``fashion_mnist_lt_scenes``, ``digits_lt_scenes``: a spec with a
``dense_base``) hold out the base's validation images first (``stratified_holdout`` of the base's
raw train split by base class, with ``seed`` and ``val_fraction``) and build long-tailed
multi-object scenes with masks from each part (``classlab.data.dense_scenes``): train scenes from
the kept base train images, val scenes from the held-out ones, test scenes from the base test
split. Each split file holds ``x`` uint8 (N, 3, H, W), ``y`` int64 (N, C) multi-hot,
``source_index`` (the scene's position in its split) and the ``DENSE_ARRAYS``; the manifest's
``splits.<split>.per_class`` counts the scenes holding each class and ``dense`` records the rest
(classes, object and image counts, frequency bands, mask conventions, recipe). Masks are checked
against their images (``check_masks``) before anything is written and again on loading.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from classlab.data.registry import get_dataset
from classlab.engine.checkpoint import save_checkpoint
from classlab.io import read_json, write_json

DEFAULT_VAL_FRACTION = 0.1


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def stratified_holdout(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split positions ``0..len(y)-1`` into (kept, held_out), both ascending.

    Each class ``c`` with ``n_c`` samples gives ``round(fraction * n_c)`` of them to the
    held-out part, at least one and at most ``n_c - 1`` (a class with a single sample stays
    whole in the kept part); ``fraction == 0`` holds nothing out. Within a class the held-out
    samples are the first ones of a permutation drawn from a generator seeded by
    ``(seed, c)``, so a class's cut does not depend on the other classes.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {fraction}")
    y = np.asarray(y)
    held: list[np.ndarray] = []
    if fraction > 0:
        for c in np.unique(y):
            members = np.flatnonzero(y == c)
            n = len(members)
            k = min(max(int(round(fraction * n)), 1), n - 1)
            if k <= 0:
                continue
            rng = np.random.default_rng([int(seed), int(c)])
            held.append(members[rng.permutation(n)[:k]])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    keep = np.ones(len(y), dtype=bool)
    keep[held_out] = False
    return np.flatnonzero(keep).astype(np.int64), held_out.astype(np.int64)


SCENE_ARRAYS = ("boxes", "distractor_boxes", "distractor_labels", "object_sources")
# the dense scene datasets' arrays besides SCENE_ARRAYS' object_sources (classlab.data.dense_scenes.DENSE_ARRAYS)
DENSE_ONLY_ARRAYS = ("object_boxes", "object_cells", "object_labels", "instance_masks", "semantic_masks")


def _scene_raw(spec, raw, recipe: dict | None):
    """(raw splits of the scenes, per-split extra arrays, manifest section) of a scene dataset."""
    from classlab.data.registry import RawSplits, get_dataset
    from classlab.data.scenes import build_single_target_dataset

    base_names = raw.class_names or get_dataset(spec.scene_base).class_names
    train, test, info = build_single_target_dataset(raw.train_x, raw.train_y, raw.test_x, raw.test_y, base_names,
                                                    recipe, spec.scene_defaults, base=spec.scene_base)
    scenes_raw = RawSplits(train.x.numpy(), train.y.numpy(), test.x.numpy(), test.y.numpy(),
                           info["target_class_names"])
    return scenes_raw, {"train": train.extras(), "test": test.extras()}, info


def prepare(dataset: str, raw_dir: Path, out_dir: Path, seed: int = 0,
            val_fraction: float = DEFAULT_VAL_FRACTION, recipe: dict | None = None) -> dict:
    """Write ``train.pt``, ``val.pt``, ``test.pt`` (dicts of tensors) and ``manifest.json``.

    ``val.pt`` holds ``val_fraction`` of each class of the raw train split (seeded by
    ``seed``), ``train.pt`` the rest; both keep the raw order and carry ``source_index``, the
    sample's position in the raw train split. The channel statistics are those of the
    training part. The manifest is written last: its presence means the split files are
    complete.

    ``recipe`` (scene datasets only) overrides the dataset's default scene recipe; a bad one
    raises ``SceneError`` naming the key before anything is written.
    """
    spec = get_dataset(dataset)
    if spec.dense_base is not None:
        return _prepare_dense(spec, Path(raw_dir), Path(out_dir), seed, val_fraction, recipe)
    if spec.pairs_base is not None:
        return _prepare_pairs(spec, raw_dir, out_dir, seed, val_fraction, recipe)
    if spec.scene_base is None and recipe is not None:
        from classlab.data.registry import DATASETS
        from classlab.data.scenes import SceneError

        scene_sets = sorted(n for n in DATASETS if get_dataset(n).scene_base or get_dataset(n).dense_base)
        raise SceneError(f"scenes: dataset {dataset!r} takes no scene recipe; scene datasets: {scene_sets}")
    if spec.scene_base is not None:
        from classlab.data.scenes import resolve_single_target_recipe

        # checked against the spec's class count first: a bad recipe fails before the raw files load
        resolve_single_target_recipe(recipe, get_dataset(spec.scene_base).num_classes, spec.scene_defaults)
    raw = spec.load_raw(Path(raw_dir))
    extras, scene_info = {}, None
    if spec.scene_base is not None:
        raw, extras, scene_info = _scene_raw(spec, raw, recipe)
    return _write_prepared(dataset, raw, spec, Path(out_dir), seed, val_fraction, extras, scene_info)


def _prepare_pairs(spec, raw_dir: Path, out_dir: Path, seed: int, val_fraction: float, recipe: dict | None) -> dict:
    """A pairs dataset (``classlab.data.pairs``): the recipe is checked before the raw files load, the
    train split holds the seen pairs only, the manifest adds ``pairs``."""
    from classlab.data.pairs import build_pairs, resolve_pairs_recipe
    from classlab.data.registry import RawSplits

    base_names = get_dataset(spec.pairs_base).class_names
    resolve_pairs_recipe(recipe, base_names, spec.pairs_defaults)  # a bad recipe fails before anything loads
    raw = spec.load_raw(Path(raw_dir))
    tx, ty, ex, ey, names, info = build_pairs(raw.train_x, raw.train_y, raw.test_x, raw.test_y,
                                              raw.class_names or base_names, recipe, spec.pairs_defaults,
                                              base=spec.pairs_base)
    return _write_prepared(spec.name, RawSplits(tx, ty, ex, ey, names), spec, Path(out_dir), seed, val_fraction,
                           {}, None, pairs_info=info)


def _prepare_dense(spec, raw_dir: Path, out_dir: Path, seed: int, val_fraction: float, recipe: dict | None) -> dict:
    """A dense scene dataset (``classlab.data.dense_scenes``): the recipe and its object plan are
    checked before the raw files load; base validation images are held out before any scene is built."""
    from classlab.data.dense_scenes import build_dense_dataset, plan_dense, resolve_dense_recipe

    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    base_names = get_dataset(spec.dense_base).class_names
    plan_dense(resolve_dense_recipe(recipe, base_names, spec.dense_defaults), with_val=val_fraction > 0)
    raw = spec.load_raw(raw_dir)
    keep, held = stratified_holdout(raw.train_y, val_fraction, seed)
    splits, info = build_dense_dataset(raw.train_x, raw.train_y, raw.test_x, raw.test_y, raw.class_names or base_names,
                                       recipe, spec.dense_defaults, base=spec.dense_base, train_pool=keep, val_pool=held)
    info["base_val_indices"] = held.tolist()
    return write_dense_prepared(spec.name, splits, info, out_dir, seed, val_fraction, raw_train_count=len(raw.train_y))


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of uint8 images in [0, 1] units, one channel at a time."""
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean, std = [], []
    for c in range(x.shape[1]):
        xc = x[:, c]
        s1 = float(xc.sum(dtype=np.uint64))
        s2 = float(np.square(xc, dtype=np.uint32).sum(dtype=np.uint64))
        m = s1 / n
        mean.append(m / 255.0)
        sd = float(np.sqrt(max(s2 / n - m * m, 0.0))) / 255.0
        # a channel constant over the split (the blue of scenes whose palette has no blue) has no
        # spread to divide by: 1 leaves it merely centred instead of turning it into NaN
        std.append(sd if sd > 0 else 1.0)
    return mean, std


def write_dense_prepared(dataset: str, splits: dict, info: dict, out_dir: Path, seed: int = 0, val_fraction: float = DEFAULT_VAL_FRACTION, raw_train_count: int = 0) -> dict:
    """``train.pt``, ``val.pt``, ``test.pt`` and, last, ``manifest.json`` of a dense scene dataset.

    ``splits`` maps each split to a ``classlab.data.dense_scenes.DenseScenes`` and ``info`` is
    ``build_dense_dataset``'s manifest section (its ``class_names`` and ``object_counts`` are read
    here). Every split's masks
    are checked against its images first: a mismatch raises ``MaskError`` (naming ``masks``) before
    the output directory is created.
    """
    from classlab.data.dense_scenes import DENSE_ARRAYS, check_masks

    out_dir = Path(out_dir)
    for split in ("train", "val", "test"):
        part = splits[split]
        for key in ("instance_masks", "semantic_masks"):
            check_masks(part.x, getattr(part, key), key, split)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in ("train", "val", "test"):
        part = splits[split]
        target = out_dir / f"{split}.pt"
        blob = {"x": part.x.contiguous(), "y": part.y.to(torch.int64).contiguous(),
                "source_index": torch.arange(len(part), dtype=torch.int64)}
        blob.update({k: getattr(part, k).contiguous() for k in DENSE_ARRAYS})
        save_checkpoint(blob, target)
        files[split] = {"file": target.name, "sha256": _sha256(target), "count": int(len(part)),
                        "per_class": part.y.sum(0).tolist(),
                        "objects_per_class": info["object_counts"][split]}
    files["train"]["source"] = "scenes of the base's raw train images minus dense.base_val_indices"
    files["val"].update({"source": "scenes of the base's raw train images at dense.base_val_indices",
                         "fraction": float(val_fraction), "seed": int(seed), "stratified": "per base class"})
    files["test"]["source"] = "scenes of the base's raw test images"
    mean, std = _channel_stats(splits["train"].x.numpy())
    manifest = {
        "dataset": dataset,
        "class_names": list(info["class_names"]),
        "num_classes": len(info["class_names"]),
        "shape": list(splits["train"].x.shape[1:]),
        "seed": seed,
        "val_fraction": float(val_fraction),
        "val_seed": int(seed),
        "raw_train_count": int(raw_train_count),
        "splits": files,
        "channel_mean": mean,
        "channel_std": std,
        "dense": info,
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def _write_prepared(dataset: str, raw, spec, out_dir: Path, seed: int, val_fraction: float, extras: dict,
                    scene_info: dict | None, pairs_info: dict | None = None) -> dict:
    out_dir = Path(out_dir)
    class_names = raw.class_names or spec.class_names
    for split, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"{dataset}/{split}: expected uint8 (N, C, H, W), got {x.dtype} {x.shape}")
        if len(x) != len(y):
            raise ValueError(f"{dataset}/{split}: {len(x)} images but {len(y)} labels")
    train_idx, val_idx = stratified_holdout(raw.train_y, val_fraction, seed)
    test_idx = np.arange(len(raw.test_y), dtype=np.int64)
    parts = (("train", raw.train_x[train_idx], raw.train_y[train_idx], train_idx, "train"),
             ("val", raw.train_x[val_idx], raw.train_y[val_idx], val_idx, "train"),
             ("test", raw.test_x, raw.test_y, test_idx, "test"))
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, x, y, source, raw_split in parts:
        target = out_dir / f"{split}.pt"
        blob = {"x": torch.from_numpy(np.ascontiguousarray(x)),
                "y": torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)),
                "source_index": torch.from_numpy(np.ascontiguousarray(source, dtype=np.int64))}
        # a scene's extra arrays follow it into its split
        blob.update({k: torch.from_numpy(np.ascontiguousarray(v[source], dtype=np.int64))
                     for k, v in extras.get(raw_split, {}).items()})
        save_checkpoint(blob, target)
        files[split] = {"file": target.name, "sha256": _sha256(target), "count": int(len(y)),
                        "per_class": np.bincount(y, minlength=len(class_names)).tolist()}
    # train and val are cut from the raw train split: val lists its raw positions, train is
    # the complement (both ascending), so the pair is recomputable and checkable
    files["train"]["source"] = "raw train minus splits.val.source_indices"
    files["val"].update({"source": "raw train", "source_indices": val_idx.tolist(),
                         "fraction": float(val_fraction), "seed": int(seed), "stratified": "per class"})
    files["test"]["source"] = "raw test"
    train_x = raw.train_x[train_idx].astype(np.float64)
    manifest = {
        "dataset": dataset,
        "class_names": class_names,
        "num_classes": len(class_names),
        "shape": list(raw.train_x.shape[1:]),
        "seed": seed,
        "val_fraction": float(val_fraction),
        "val_seed": int(seed),
        "raw_train_count": int(len(raw.train_y)),
        "splits": files,
        "channel_mean": (train_x.mean(axis=(0, 2, 3)) / 255.0).tolist(),
        "channel_std": (train_x.std(axis=(0, 2, 3)) / 255.0).tolist(),
    }
    if scene_info is not None:
        manifest["scenes"] = scene_info
    if pairs_info is not None:
        manifest["pairs"] = pairs_info
    write_json(out_dir / "manifest.json", manifest)
    return manifest


@dataclass
class PreparedSplit:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,); dense scene datasets: int64 (N, C) multi-hot
    source_index: torch.Tensor | None = None  # int64 (N,): position in the raw split it came from
    # scene datasets only (None otherwise): the target's box x0, y0, x1, y1 (x1, y1 exclusive)
    boxes: torch.Tensor | None = None              # int64 (N, 4)
    distractor_boxes: torch.Tensor | None = None   # int64 (N, D, 4)
    distractor_labels: torch.Tensor | None = None  # int64 (N, D): base-dataset class ids
    object_sources: torch.Tensor | None = None     # int64 (N, 1 + D): base-split image index, target first
    # dense scene datasets only (classlab.data.dense_scenes; object_sources is then (N, k_max), -1 pads)
    object_boxes: torch.Tensor | None = None       # int64 (N, k_max, 4): tight box of each object's mask
    object_cells: torch.Tensor | None = None       # int64 (N, k_max, 4): the cell each object sits in
    object_labels: torch.Tensor | None = None      # int64 (N, k_max): class per object, -1 pads
    instance_masks: torch.Tensor | None = None     # uint8 (N, H, W): 0 background, j + 1 = object slot j
    semantic_masks: torch.Tensor | None = None     # uint8 (N, H, W): 0 background, k + 1 = class k

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class PreparedDataset:
    manifest: dict
    train: PreparedSplit  # the raw train split minus validation: the only part to train on
    test: PreparedSplit   # for reported numbers only
    val: PreparedSplit    # held out from the raw train split: every choice is made on it

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])


def load_prepared(prepared_dir: Path) -> PreparedDataset:
    prepared_dir = Path(prepared_dir)
    manifest = read_json(prepared_dir / "manifest.json")
    splits = {}
    for split in ("train", "val", "test"):
        if split not in manifest["splits"]:
            # prepared before validation splits existed: re-run prepare to get one
            warnings.warn(f"{prepared_dir} has no {split!r} split (prepared by an older classlab); it is empty "
                          f"here. Re-run `classlab prepare` to hold out a validation split.", stacklevel=2)
            ref = splits["train"]
            splits[split] = PreparedSplit(ref.x[:0], ref.y[:0], torch.zeros(0, dtype=torch.long))
            continue
        blob = torch.load(prepared_dir / manifest["splits"][split]["file"], weights_only=True)
        dense = {k: blob.get(k) for k in DENSE_ONLY_ARRAYS}
        for key in ("instance_masks", "semantic_masks"):
            if dense[key] is not None:
                from classlab.data.dense_scenes import check_masks

                check_masks(blob["x"], dense[key], key, split)
        splits[split] = PreparedSplit(blob["x"], blob["y"], blob.get("source_index"),
                                      **{k: blob.get(k) for k in SCENE_ARRAYS}, **dense)
    return PreparedDataset(manifest, splits["train"], splits["test"], splits["val"])
