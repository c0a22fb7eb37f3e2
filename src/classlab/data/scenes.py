"""Multi-label scenes built from a single-label prepared dataset (digits 8x8, Fashion-MNIST 28x28).

A scene is a canvas of ``grid`` x ``grid`` cells, each the size of one source image; ``k``
objects (single-label images of ``k`` distinct classes) are pasted into ``k`` distinct random
cells and the other cells stay black. A scene's label is the multi-hot vector of the classes
placed in it, and each object keeps its box (x0, y0, x1, y1; x1, y1 exclusive, in canvas
pixels), its class and the index of its source image.

The builder is a pure function of (source images, recipe): the same recipe gives the same
scenes. The train scenes draw objects from the prepared train split only and the test scenes
from the test split only, so no source image is shared between them. The recipe (seed, k,
canvas, counts) is returned in the manifest so that a run can record how its data was made.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from classlab.data.scenarios import ScenarioError
from classlab.io import atomic_path, read_json, write_json

# recipe keys and their defaults; `seed` seeds the train scenes, `seed + 1` the test scenes
DEFAULT_RECIPE = {"seed": 0, "k_min": 2, "k_max": 3, "grid": 2, "n_train": 2000, "n_test": 500}


class SceneError(ScenarioError):
    """A scene recipe that does not fit the source data; the message names the key."""


@dataclass
class SceneSet:
    x: torch.Tensor           # uint8 (N, C, grid*H, grid*W)
    y: torch.Tensor           # uint8 multi-hot (N, num_classes)
    boxes: torch.Tensor       # int64 (N, k_max, 4): x0, y0, x1, y1 per object; rows of -1 pad
    box_labels: torch.Tensor  # int64 (N, k_max): class of each object; -1 pads
    sources: torch.Tensor     # int64 (N, k_max): index of the source image in its split; -1 pads

    def __len__(self) -> int:
        return len(self.y)

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"x": self.x, "y": self.y, "boxes": self.boxes, "box_labels": self.box_labels,
                "sources": self.sources}


def resolve_recipe(recipe: dict | None) -> dict:
    """The recipe with defaults filled in; unknown keys and impossible values are refused."""
    out = dict(DEFAULT_RECIPE)
    unknown = set(recipe or {}) - set(DEFAULT_RECIPE)
    if unknown:
        raise SceneError(f"scenes: unknown keys {sorted(unknown)}; allowed: {sorted(DEFAULT_RECIPE)}")
    out.update(recipe or {})
    for key in DEFAULT_RECIPE:
        out[key] = int(out[key])
    if out["grid"] < 1:
        raise SceneError(f"scenes.grid: must be at least 1, got {out['grid']}")
    if not 1 <= out["k_min"] <= out["k_max"]:
        raise SceneError(f"scenes.k_min/k_max: need 1 <= k_min <= k_max, got {out['k_min']}, {out['k_max']}")
    if out["k_max"] > out["grid"] ** 2:
        raise SceneError(f"scenes.k_max: {out['k_max']} objects do not fit {out['grid'] ** 2} cells")
    for key in ("n_train", "n_test"):
        if out[key] < 1:
            raise SceneError(f"scenes.{key}: must be at least 1, got {out[key]}")
    return out


def build_scenes(images: torch.Tensor | np.ndarray, labels: torch.Tensor | np.ndarray, num_classes: int, *,
                 n_scenes: int, k_min: int = 2, k_max: int = 3, grid: int = 2, seed: int = 0) -> SceneSet:
    """``n_scenes`` scenes of ``k`` in [k_min, k_max] objects of distinct classes on a grid canvas."""
    images = torch.as_tensor(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise SceneError(f"scenes: source images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    present = np.unique(labels)
    if k_max > len(present):
        raise SceneError(f"scenes.k_max: {k_max} distinct classes per scene but the source has {len(present)}")
    if k_max > grid * grid:
        raise SceneError(f"scenes.k_max: {k_max} objects do not fit {grid * grid} cells")
    n, c, h, w = images.shape
    by_class = {int(k): np.flatnonzero(labels == k) for k in present}
    rng = np.random.default_rng(seed)
    x = torch.zeros(n_scenes, c, grid * h, grid * w, dtype=torch.uint8)
    y = torch.zeros(n_scenes, num_classes, dtype=torch.uint8)
    boxes = torch.full((n_scenes, k_max, 4), -1, dtype=torch.int64)
    box_labels = torch.full((n_scenes, k_max), -1, dtype=torch.int64)
    sources = torch.full((n_scenes, k_max), -1, dtype=torch.int64)
    for i in range(n_scenes):
        k = int(rng.integers(k_min, k_max + 1))
        classes = rng.choice(present, size=k, replace=False)
        cells = rng.choice(grid * grid, size=k, replace=False)
        for j, (cls, cell) in enumerate(zip(classes.tolist(), cells.tolist())):
            src = int(rng.choice(by_class[cls]))
            row, col = divmod(cell, grid)
            y0, x0 = row * h, col * w
            x[i, :, y0:y0 + h, x0:x0 + w] = images[src]
            y[i, cls] = 1
            boxes[i, j] = torch.tensor([x0, y0, x0 + w, y0 + h])
            box_labels[i, j] = cls
            sources[i, j] = src
    return SceneSet(x, y, boxes, box_labels, sources)


def build_scene_dataset(train_x, train_y, test_x, test_y, num_classes: int, recipe: dict | None = None,
                        dataset: str = "", class_names: list[str] | None = None
                        ) -> tuple[SceneSet, SceneSet, dict]:
    """Train scenes from the train split (seed), test scenes from the test split (seed + 1).

    Returns (train, test, manifest); the manifest records the recipe, the canvas and the
    normalisation statistics of the train scenes (black cells included).
    """
    r = resolve_recipe(recipe)
    kw = {"k_min": r["k_min"], "k_max": r["k_max"], "grid": r["grid"]}
    train = build_scenes(train_x, train_y, num_classes, n_scenes=r["n_train"], seed=r["seed"], **kw)
    test = build_scenes(test_x, test_y, num_classes, n_scenes=r["n_test"], seed=r["seed"] + 1, **kw)
    xf = train.x.double() / 255.0
    manifest = {
        "kind": "multilabel_scenes",
        "dataset": dataset,
        "source_shape": list(torch.as_tensor(train_x).shape[1:]),
        "shape": list(train.x.shape[1:]),
        "canvas": [int(train.x.shape[2]), int(train.x.shape[3])],
        "num_classes": int(num_classes),
        "class_names": list(class_names) if class_names else [str(k) for k in range(num_classes)],
        "recipe": r,
        "channel_mean": xf.mean(dim=(0, 2, 3)).tolist(),
        "channel_std": xf.std(dim=(0, 2, 3)).tolist(),
        "label_counts": {"train": train.y.sum(0).tolist(), "test": test.y.sum(0).tolist()},
        "objects_per_scene": {"train": float(train.y.sum(1).float().mean()), "test": float(test.y.sum(1).float().mean())},
    }
    return train, test, manifest


def scenes_from_prepared(prepared, recipe: dict | None = None) -> tuple[SceneSet, SceneSet, dict]:
    """Scenes from a ``classlab.data.prepare.PreparedDataset``."""
    m = prepared.manifest
    return build_scene_dataset(prepared.train.x, prepared.train.y.numpy(), prepared.test.x,
                               prepared.test.y.numpy(), prepared.num_classes, recipe,
                               dataset=m.get("dataset", ""), class_names=m.get("class_names"))


def save_scenes(out_dir: Path, train: SceneSet, test: SceneSet, manifest: dict) -> None:
    """``train.pt``, ``test.pt`` and, last, ``manifest.json`` (its presence means complete)."""
    out_dir = Path(out_dir)
    for split, scenes in (("train", train), ("test", test)):
        with atomic_path(out_dir / f"{split}.pt") as tmp:
            torch.save(scenes.to_dict(), tmp)
    write_json(out_dir / "manifest.json", manifest)


def load_scenes(out_dir: Path) -> tuple[SceneSet, SceneSet, dict]:
    out_dir = Path(out_dir)
    manifest = read_json(out_dir / "manifest.json")
    splits = [SceneSet(**torch.load(out_dir / f"{s}.pt", weights_only=True)) for s in ("train", "test")]
    return splits[0], splits[1], manifest


# --- single-target scenes (the explain family's localisation data) --------------------------
#
# A scene is a ``grid`` x ``grid`` canvas of cells the size of one source image. ONE target
# object, of a class in ``target_classes``, sits in a seeded random cell; ``n_distractors``
# objects of classes in ``distractor_classes`` (disjoint from the targets, so the label is well
# posed) sit in other random cells; the remaining cells stay black (0), the canvas background.
# The label is the target's index within ``target_classes`` (0..T-1) and the ground truth for
# localisation is the target's box (x0, y0, x1, y1; x1, y1 exclusive, canvas pixels).
#
# Draws (one generator seeded by ``seed`` for the train scenes and ``seed + 1`` for the test
# scenes, in this order): the target classes (balanced: each class T-th of the scenes, shuffled),
# the cells (the first is the target's), the distractor classes (distinct within a scene when
# there are at least ``n_distractors`` of them, else with replacement), and the source images.
# Sources are dealt per class from seeded permutations of that class's images and reshuffled
# only when a class runs out, so an image is reused only when the scenes need more objects of
# its class than the split holds (the manifest records the largest reuse). Train scenes take
# their objects from the base train split only, test scenes from the base test split only.

SINGLE_TARGET_RECIPE = {"seed": 0, "grid": 3, "n_distractors": 2, "target_classes": None,
                        "distractor_classes": None, "n_train": 6000, "n_test": 1000}
_INT_KEYS = ("seed", "grid", "n_distractors", "n_train", "n_test")


@dataclass
class SingleTargetScenes:
    x: torch.Tensor                  # uint8 (N, C, grid*H, grid*W)
    y: torch.Tensor                  # int64 (N,): index of the target's class within target_classes
    boxes: torch.Tensor              # int64 (N, 4): the target's x0, y0, x1, y1 (x1, y1 exclusive)
    distractor_boxes: torch.Tensor   # int64 (N, n_distractors, 4)
    distractor_labels: torch.Tensor  # int64 (N, n_distractors): original (base) class ids
    sources: torch.Tensor            # int64 (N, 1 + n_distractors): base-split index, target first

    def __len__(self) -> int:
        return len(self.y)

    def extras(self) -> dict[str, np.ndarray]:
        """The per-scene arrays besides image and label, as numpy (what ``prepare`` stores)."""
        return {"boxes": self.boxes.numpy(), "distractor_boxes": self.distractor_boxes.numpy(),
                "distractor_labels": self.distractor_labels.numpy(), "object_sources": self.sources.numpy()}


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _class_list(key: str, value, num_classes: int) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
        raise SceneError(f"scenes.{key}: a list of class ids expected, got {value!r}")
    ids = [int(v) for v in value]
    bad = [v for v in ids if not 0 <= v < num_classes]
    if bad:
        raise SceneError(f"scenes.{key}: class ids {bad} out of range 0..{num_classes - 1}")
    if len(set(ids)) != len(ids):
        raise SceneError(f"scenes.{key}: repeated class ids in {ids}")
    return ids


def resolve_single_target_recipe(recipe: dict | None, num_classes: int, defaults: dict | None = None) -> dict:
    """The recipe with defaults filled in and checked; a bad value raises ``SceneError`` naming its key.

    ``defaults`` (a dataset's own sizes, e.g. fewer scenes for digits) override
    ``SINGLE_TARGET_RECIPE``; ``recipe`` overrides both. Unset class lists default to the first
    half of the base classes (targets) and the rest (distractors).
    """
    if recipe is not None and not isinstance(recipe, dict):
        raise SceneError(f"scenes: the recipe must be a mapping of keys {sorted(SINGLE_TARGET_RECIPE)}, got {recipe!r}")
    for source in (defaults or {}), (recipe or {}):
        unknown = sorted(set(source) - set(SINGLE_TARGET_RECIPE))
        if unknown:
            raise SceneError(f"scenes.{unknown[0]}: unknown key; allowed: {sorted(SINGLE_TARGET_RECIPE)}")
    r = {**SINGLE_TARGET_RECIPE, **(defaults or {}), **(recipe or {})}
    for key in _INT_KEYS:
        if not _is_int(r[key]):
            raise SceneError(f"scenes.{key}: an integer expected, got {r[key]!r}")
        r[key] = int(r[key])
    for key, low in (("grid", 1), ("n_distractors", 0), ("n_train", 1), ("n_test", 1)):
        if r[key] < low:
            raise SceneError(f"scenes.{key}: must be at least {low}, got {r[key]}")
    cells = r["grid"] ** 2
    if r["n_distractors"] + 1 > cells:
        raise SceneError(f"scenes.n_distractors: {r['n_distractors']} distractors and the target "
                         f"({r['n_distractors'] + 1} objects) do not fit a {r['grid']}x{r['grid']} canvas "
                         f"({cells} cells)")
    half = num_classes // 2
    targets = (_class_list("target_classes", r["target_classes"], num_classes)
               if r["target_classes"] is not None else list(range(half)))
    if len(targets) < 2:
        raise SceneError(f"scenes.target_classes: a classifier needs at least 2 target classes, got {targets}")
    if r["distractor_classes"] is None:
        distractors = [c for c in range(num_classes) if c not in targets]
    else:
        distractors = _class_list("distractor_classes", r["distractor_classes"], num_classes)
    overlap = sorted(set(targets) & set(distractors))
    if overlap:
        raise SceneError(f"scenes.distractor_classes: classes {overlap} are also target_classes; "
                         f"the two must be disjoint for the label to be well posed")
    if r["n_distractors"] > 0 and not distractors:
        raise SceneError(f"scenes.distractor_classes: {r['n_distractors']} distractors per scene but no "
                         f"distractor class (every class is a target)")
    r["target_classes"], r["distractor_classes"] = targets, distractors
    return r


def _deal_sources(rng: np.random.Generator, members: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    """``k`` source indices from ``members``: seeded permutations, concatenated as needed."""
    reps = -(-k // len(members))
    dealt = np.concatenate([members[rng.permutation(len(members))] for _ in range(reps)])[:k]
    return dealt, reps


def build_single_target_scenes(images, labels, *, n_scenes: int, grid: int, n_distractors: int,
                               target_classes: list[int], distractor_classes: list[int], seed: int,
                               split: str = "source") -> tuple[SingleTargetScenes, int]:
    """``n_scenes`` single-target scenes from one split of single-label images.

    Returns (scenes, the largest number of times one source image was used).
    """
    images = np.asarray(images)
    labels = np.asarray(labels, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise SceneError(f"scenes: source images must be uint8 (N, C, H, W), got {images.dtype} {images.shape}")
    for key, classes in (("target_classes", target_classes), ("distractor_classes", distractor_classes)):
        if key == "distractor_classes" and n_distractors == 0:
            continue
        missing = [c for c in classes if not np.any(labels == c)]
        if missing:
            raise SceneError(f"scenes.{key}: classes {missing} have no images in the base {split} split")
    n, c, h, w = images.shape
    rng = np.random.default_rng(seed)
    t_count, d_count = len(target_classes), len(distractor_classes)
    # 1. target classes, balanced then shuffled; 2. cells, the first the target's
    y = rng.permutation(np.resize(np.arange(t_count), n_scenes)).astype(np.int64)
    cells = np.argsort(rng.random((n_scenes, grid * grid)), axis=1)[:, :1 + n_distractors]
    # 3. distractor classes, distinct within a scene where there are enough of them
    if n_distractors == 0:
        d_pos = np.zeros((n_scenes, 0), dtype=np.int64)
    elif n_distractors <= d_count:
        d_pos = np.argsort(rng.random((n_scenes, d_count)), axis=1)[:, :n_distractors]
    else:
        d_pos = rng.integers(0, d_count, size=(n_scenes, n_distractors))
    object_classes = np.concatenate([np.asarray(target_classes, dtype=np.int64)[y][:, None],
                                     np.asarray(distractor_classes, dtype=np.int64).reshape(-1)[d_pos]
                                     if n_distractors else d_pos], axis=1)
    # 4. sources, dealt per class in scene order (class order: ascending ids, for reproducibility)
    sources = np.empty_like(object_classes)
    flat_cls, flat_src = object_classes.reshape(-1), sources.reshape(-1)
    reuse = 0
    for cls in np.unique(flat_cls):
        where = np.flatnonzero(flat_cls == cls)
        flat_src[where], reps = _deal_sources(rng, np.flatnonzero(labels == cls), len(where))
        reuse = max(reuse, reps)
    # paste: the canvas seen as (N, C, grid, H, grid, W) takes one (C, H, W) image per (scene, cell)
    canvas = np.zeros((n_scenes, c, grid, h, grid, w), dtype=np.uint8)
    rows, cols = np.divmod(cells, grid)
    scene_idx = np.repeat(np.arange(n_scenes), 1 + n_distractors)
    canvas[scene_idx, :, rows.reshape(-1), :, cols.reshape(-1), :] = images[sources.reshape(-1)]
    x = canvas.reshape(n_scenes, c, grid * h, grid * w)
    boxes = np.stack([cols * w, rows * h, cols * w + w, rows * h + h], axis=-1).astype(np.int64)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    scenes = SingleTargetScenes(t(x), t(y), t(boxes[:, 0]), t(boxes[:, 1:]), t(object_classes[:, 1:]), t(sources))
    return scenes, int(reuse)


def build_single_target_dataset(train_x, train_y, test_x, test_y, base_class_names: list[str],
                                recipe: dict | None = None, defaults: dict | None = None, base: str = ""
                                ) -> tuple[SingleTargetScenes, SingleTargetScenes, dict]:
    """Train scenes from the base train split (seed), test scenes from the base test split (seed + 1).

    Returns (train, test, info); ``info`` is what a manifest records about the scenes: the
    resolved recipe, the base dataset, the canvas and cell sizes, the class names of both
    roles, the box-area share (the target box's share of the canvas: the pointing rate of a
    uniformly random point) and the largest source reuse per split.
    """
    r = resolve_single_target_recipe(recipe, len(base_class_names), defaults)
    kw = {k: r[k] for k in ("grid", "n_distractors", "target_classes", "distractor_classes")}
    train, reuse_train = build_single_target_scenes(train_x, train_y, n_scenes=r["n_train"], seed=r["seed"],
                                                    split="train", **kw)
    test, reuse_test = build_single_target_scenes(test_x, test_y, n_scenes=r["n_test"], seed=r["seed"] + 1,
                                                  split="test", **kw)
    h, w = np.asarray(train_x).shape[2:]
    canvas = [int(train.x.shape[2]), int(train.x.shape[3])]
    info = {
        "kind": "single_target_scenes",
        "base_dataset": base,
        "recipe": r,
        "canvas": canvas,
        "cell": [int(h), int(w)],
        "box_area_share": float(h * w) / float(canvas[0] * canvas[1]),
        "target_class_names": [base_class_names[k] for k in r["target_classes"]],
        "distractor_class_names": [base_class_names[k] for k in r["distractor_classes"]],
        "max_source_reuse": {"train": reuse_train, "test": reuse_test},
    }
    return train, test, info


def load_scene_boxes(prepared_dir: Path, split: str = "test") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(boxes (N, 4), distractor_boxes (N, D, 4), distractor_labels (N, D)) of a prepared scene dataset."""
    from classlab.data.prepare import load_prepared

    part = getattr(load_prepared(prepared_dir), split)
    if part.boxes is None:
        raise SceneError(f"scenes: {prepared_dir} is not a scene dataset (its {split} split has no boxes)")
    return part.boxes, part.distractor_boxes, part.distractor_labels
