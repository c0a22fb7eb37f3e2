"""Long-tailed, many-class scenes with object masks: the data of the ``dense`` family (detection,
instance and semantic segmentation, dense self-supervised probes).

Classes. A class is an (attribute, object) combination, coloured exactly as the pairs datasets
colour theirs (``classlab.data.pairs``: ``PALETTE``, ``tint``, names "<colour> <object>", label
``a * O + o``, attribute-major): with the default 4 colours and Fashion-MNIST's 10 garments there
are 40 classes, "red t-shirt/top" ... "yellow ankle boot".

Long tail. The classes are ranked by a permutation seeded by ``seed`` (``class_rank``: 0 is the
head, C - 1 the tail), so frequency is not tied to a colour or a garment. A split with T objects
gives the class of rank r the share w_r / sum(w) of them, rounded by largest remainders (the
counts sum to T exactly and never increase with the rank), where

    exp  (Cui et al., CVPR 2019, the CIFAR-LT profile):  w_r = rho ** (-r / (C - 1))
    zipf:                                                 w_r = (r + 1) ** (-s),  s = ln(rho) / ln(C)

and rho = ``imbalance_ratio``, so that w_0 / w_{C-1} = rho in both: the head class has about rho
times the objects of the tail class (up to the rounding of each count to an integer). The train
scenes follow this profile; the val and test scenes are class-balanced (``eval_profile``
"balanced", the ImageNet-LT / CIFAR-LT convention: every class equally often, the first
``T mod C`` classes in rank order one more) or follow the same profile ("long_tail").

Scenes. A scene is a ``grid`` x ``grid`` canvas of cells the size of one source image, black (0)
where no object is. Each scene holds k objects, k uniform in [k_min, k_max], in k distinct
random cells; classes may repeat within a scene (the label sequence of a split is a seeded
permutation of the multiset fixed by the counts above, dealt to the scenes in order). An object
is one base image, chosen among the base images of its object class in the scene's split, tinted
with its attribute's colour (rgb = round(gray * colour / 255)) and pasted into its cell. Sources
are dealt per base class from seeded permutations and an image is reused only when the split
needs more objects of that base class than it holds (``max_source_reuse`` in the manifest).

Splits. Train scenes draw their objects from the base train split minus its validation part,
val scenes from that validation part (the base's raw train images held out per base class by
``classlab.data.prepare.stratified_holdout`` with ``prepare``'s seed and val fraction), test
scenes from the base test split: no source image is shared between the three.

Masks (each the size of its image, checked by ``check_masks``):

- an object's mask is the set of its cell's pixels whose BASE grayscale intensity exceeds
  ``mask_threshold`` (default 10 of 255: Fashion-MNIST's faint speckle stays background). Every
  palette colour has a channel at 255, so this is also "the pasted pixel's brightest channel >
  mask_threshold": the masks cover exactly the object's bright pixels. Base images whose mask
  would be empty are never used.
- ``instance_masks`` uint8 (N, H, W): 0 background, j + 1 on the pixels of the object in slot
  j of ``object_boxes`` / ``object_labels`` (objects never overlap: they sit in distinct cells).
  Per-object binary masks (Mask R-CNN's targets): ``instance_masks[i] == j + 1``, see
  ``detection_targets``.
- ``semantic_masks`` uint8 (N, H, W): 0 background, k + 1 for class k (the PASCAL VOC
  convention: background is class 0 and a segmenter has C + 1 outputs); 255 is reserved as the
  ignore index and never written (every pixel here is labelled).
- ``object_boxes`` int64 (N, k_max, 4): the tight box (x0, y0, x1, y1; x1, y1 exclusive, canvas
  pixels) of each object's mask; ``object_cells`` the cell it was pasted into; rows of -1 pad.

Frequency bands (LVIS, Gupta, Dollar & Girshick, CVPR 2019): from the number of TRAINING scenes
(images) that hold at least one object of the class, as LVIS counts training images:
rare 1..rare_max (10), common rare_max+1..common_max (11..100), frequent > common_max (> 100).
Every class has at least one training object (a recipe that would starve the tail is refused).

Determinism. Everything is a function of (base images, recipe, prepare's seed and val fraction).
Split s (train 0, val 1, test 2) plans its objects with ``np.random.default_rng([seed, s, 0])``
(k per scene, then the label permutation) and builds them with ``default_rng([seed, s, 1])``
(cells, then sources per base class in ascending id); the class ranking uses
``default_rng([seed, 0x7A11])``.

A recipe key with a bad value raises ``SceneError`` naming ``scenes.<key>``; masks whose shape
does not match their images raise ``MaskError`` (a ``SceneError``) naming ``masks``. Both happen
before anything is written.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from classlab.data.pairs import PALETTE, object_name, tint
from classlab.data.scenes import SceneError, _deal_sources

# recipe keys and their defaults (sized for Fashion-MNIST on CPU: ~1,200 train scenes, 40 classes,
# band sizes near LVIS's thirds); a spec's ``dense_defaults`` and then the caller's recipe override them
DENSE_RECIPE = {
    "seed": 0,
    "colors": ["red", "green", "blue", "yellow"],  # the attributes (keys of classlab.data.pairs.PALETTE)
    "objects": None,            # base class ids used as objects (None: every base class)
    "profile": "exp",           # long-tail profile of the train split: "exp" or "zipf"
    "imbalance_ratio": 100.0,   # head / tail object count of the train split (1: balanced)
    "eval_profile": "balanced",  # val and test: "balanced" or "long_tail" (the train profile)
    "grid": 3,                  # canvas of grid x grid cells
    "k_min": 2,                 # objects per scene, uniform in [k_min, k_max]
    "k_max": 5,
    "n_train": 1200,            # scenes per split
    "n_val": 300,
    "n_test": 600,
    "mask_threshold": 10,       # mask = base grayscale intensity > mask_threshold
    "rare_max": 10,             # LVIS bands on training image counts: rare <= rare_max,
    "common_max": 100,          # common <= common_max, frequent above
}
PROFILES = ("exp", "zipf")
EVAL_PROFILES = ("balanced", "long_tail")
SPLITS = ("train", "val", "test")
BACKGROUND = 0      # semantic and instance masks: background value
IGNORE_INDEX = 255  # semantic masks: reserved for "ignore", never written here
MAX_CLASSES = 254   # class k is stored as k + 1 in uint8, below IGNORE_INDEX
MAX_OBJECTS = 254   # instance ids j + 1 in uint8
DENSE_ARRAYS = ("object_boxes", "object_cells", "object_labels", "object_sources", "instance_masks",
                "semantic_masks")


class MaskError(SceneError):
    """Masks that do not fit their images; the message names the field ``masks``."""


def check_masks(images, masks, name: str = "masks", split: str = "") -> None:
    """Refuse masks that are not the size of their images.

    ``images`` (N, C, H, W); ``masks`` (N, H, W) (instance ids or class ids per pixel) or
    (N, K, H, W) (one binary mask per object), of an integer or boolean dtype. Raises
    ``MaskError`` naming ``masks`` (and which array and split) on any mismatch.
    """
    where = f"masks ({name}{', ' + split if split else ''})"
    img_shape = tuple(getattr(images, "shape", ()))
    msk_shape = tuple(getattr(masks, "shape", ()))
    if masks is None or not msk_shape:
        raise MaskError(f"{where}: expected an array of masks, got {type(masks).__name__}")
    if len(img_shape) != 4:
        raise MaskError(f"{where}: images must be (N, C, H, W) to check their masks, got {img_shape}")
    n, _, h, w = img_shape
    if len(msk_shape) not in (3, 4) or msk_shape[0] != n or msk_shape[-2:] != (h, w):
        raise MaskError(f"{where}: shape {msk_shape} does not match images {img_shape}: expected "
                        f"(N, H, W) = {(n, h, w)} or (N, K, H, W) = {(n, 'K', h, w)}")
    dtype = masks.dtype
    is_int = (dtype == torch.bool or (isinstance(dtype, torch.dtype) and not dtype.is_floating_point
                                      and not dtype.is_complex)
              if isinstance(masks, torch.Tensor) else np.issubdtype(dtype, np.integer) or dtype == np.bool_)
    if not is_int:
        raise MaskError(f"{where}: integer or boolean masks expected, got {dtype}")


@dataclass
class DenseScenes:
    x: torch.Tensor               # uint8 (N, 3, grid*H, grid*W)
    y: torch.Tensor               # int64 (N, C): multi-hot, 1 where the scene holds the class
    object_boxes: torch.Tensor    # int64 (N, k_max, 4): tight box of each object's mask; -1 pads
    object_cells: torch.Tensor    # int64 (N, k_max, 4): the cell each object was pasted into; -1 pads
    object_labels: torch.Tensor   # int64 (N, k_max): class of each object; -1 pads
    object_sources: torch.Tensor  # int64 (N, k_max): the object's index in the base's raw split; -1 pads
    instance_masks: torch.Tensor  # uint8 (N, H, W): 0 background, j + 1 = object slot j
    semantic_masks: torch.Tensor  # uint8 (N, H, W): 0 background, k + 1 = class k

    def __len__(self) -> int:
        return len(self.y)

    def arrays(self) -> dict[str, torch.Tensor]:
        """The per-scene arrays besides ``x`` and ``y`` (what ``prepare`` stores with them)."""
        return {k: getattr(self, k) for k in DENSE_ARRAYS}


# --- the recipe -------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def resolve_dense_recipe(recipe: dict | None, base_class_names: list[str], defaults: dict | None = None) -> dict:
    """The recipe with defaults filled in and checked, plus the derived class grid.

    Returns {"recipe": the resolved keys, "attributes", "objects" (names), "object_classes"
    (base ids), "pairs" ([a, o] per label), "class_names", "class_rank" (rank per label, 0 the
    head), "order" (labels head first)}. A bad value raises ``SceneError`` naming ``scenes.<key>``.
    """
    if recipe is not None and not isinstance(recipe, dict):
        raise SceneError(f"scenes: the recipe must be a mapping of keys {sorted(DENSE_RECIPE)}, got {recipe!r}")
    for source in (defaults or {}), (recipe or {}):
        unknown = sorted(set(source) - set(DENSE_RECIPE))
        if unknown:
            raise SceneError(f"scenes.{unknown[0]}: unknown key; allowed: {sorted(DENSE_RECIPE)}")
    r = {**DENSE_RECIPE, **(defaults or {}), **(recipe or {})}
    for key in ("seed", "grid", "k_min", "k_max", "n_train", "n_val", "n_test", "mask_threshold", "rare_max",
                "common_max"):
        if not _is_int(r[key]):
            raise SceneError(f"scenes.{key}: an integer expected, got {r[key]!r}")
        r[key] = int(r[key])
    for key, low in (("seed", 0), ("grid", 1), ("k_min", 1), ("n_train", 1), ("n_val", 0), ("n_test", 1),
                     ("mask_threshold", 0), ("rare_max", 0)):
        if r[key] < low:
            raise SceneError(f"scenes.{key}: must be at least {low}, got {r[key]}")
    if r["k_max"] < r["k_min"]:
        raise SceneError(f"scenes.k_max: need k_min <= k_max, got k_min={r['k_min']}, k_max={r['k_max']}")
    if r["k_max"] > r["grid"] ** 2:
        raise SceneError(f"scenes.k_max: {r['k_max']} objects do not fit a {r['grid']}x{r['grid']} canvas "
                         f"({r['grid'] ** 2} cells)")
    if r["k_max"] > MAX_OBJECTS:
        raise SceneError(f"scenes.k_max: at most {MAX_OBJECTS} objects per scene (uint8 instance ids)")
    if r["mask_threshold"] > 254:
        raise SceneError(f"scenes.mask_threshold: must be below 255 (a uint8 intensity), got {r['mask_threshold']}")
    if r["common_max"] <= r["rare_max"]:
        raise SceneError(f"scenes.common_max: must exceed rare_max={r['rare_max']}, got {r['common_max']}")
    if r["profile"] not in PROFILES:
        raise SceneError(f"scenes.profile: one of {list(PROFILES)} expected, got {r['profile']!r}")
    if r["eval_profile"] not in EVAL_PROFILES:
        raise SceneError(f"scenes.eval_profile: one of {list(EVAL_PROFILES)} expected, got {r['eval_profile']!r}")
    ratio = r["imbalance_ratio"]
    if not _is_number(ratio) or not math.isfinite(float(ratio)) or float(ratio) < 1.0:
        raise SceneError(f"scenes.imbalance_ratio: a finite number >= 1 expected, got {ratio!r}")
    r["imbalance_ratio"] = float(ratio)
    colors = r["colors"]
    if (not isinstance(colors, (list, tuple)) or not colors or not all(isinstance(c, str) for c in colors)
            or len(set(colors)) != len(colors) or any(c not in PALETTE for c in colors)):
        raise SceneError(f"scenes.colors: a list of distinct colours of {sorted(PALETTE)} expected, got {colors!r}")
    n_base = len(base_class_names)
    objects = list(range(n_base)) if r["objects"] is None else r["objects"]
    if (not isinstance(objects, (list, tuple)) or not objects or not all(_is_int(o) for o in objects)
            or len(set(objects)) != len(objects) or any(not 0 <= o < n_base for o in objects)):
        raise SceneError(f"scenes.objects: a list of distinct base class ids in 0..{n_base - 1} expected, "
                         f"got {r['objects']!r}")
    objects = [int(o) for o in objects]
    n_classes = len(colors) * len(objects)
    if not 2 <= n_classes <= MAX_CLASSES:
        raise SceneError(f"scenes.objects: colors x objects gives {n_classes} classes; 2..{MAX_CLASSES} are "
                         f"supported (class k is stored as k + 1 in uint8 semantic masks)")
    object_names = [object_name(base_class_names[o]) for o in objects]
    pairs = [[a, o] for a in range(len(colors)) for o in range(len(objects))]
    names = [f"{colors[a]} {object_names[o]}" for a, o in pairs]
    if len(set(names)) != len(names):
        raise SceneError(f"scenes.objects: {objects} give repeated class names")
    order = np.random.default_rng([r["seed"], 0x7A11]).permutation(n_classes)
    rank = np.empty(n_classes, dtype=np.int64)
    rank[order] = np.arange(n_classes)
    r.update(colors=list(colors), objects=objects)
    return {"recipe": r, "attributes": list(colors), "objects": object_names, "object_classes": objects,
            "pairs": pairs, "class_names": names, "class_rank": rank.tolist(), "order": order.tolist()}


# --- class frequencies --------------------------------------------------------------------------

def profile_weights(n_classes: int, ratio: float, profile: str) -> np.ndarray:
    """Weights by rank (head first) with w[0] / w[-1] == ratio (see the module docstring)."""
    rank = np.arange(n_classes, dtype=np.float64)
    if n_classes == 1 or ratio == 1.0:
        return np.ones(n_classes)
    if profile == "exp":
        return ratio ** (-rank / (n_classes - 1))
    if profile == "zipf":
        return (rank + 1.0) ** (-math.log(ratio) / math.log(n_classes))
    raise SceneError(f"scenes.profile: one of {list(PROFILES)} expected, got {profile!r}")


def apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """``total`` split into integers proportional to ``weights`` by largest remainders (ties to the
    lower index); the parts sum to ``total`` and never increase where the weights do not."""
    weights = np.asarray(weights, dtype=np.float64)
    quota = total * weights / weights.sum()
    counts = np.floor(quota).astype(np.int64)
    left = int(total - counts.sum())
    order = np.lexsort((np.arange(len(weights)), -(quota - counts)))  # largest remainder first
    counts[order[:left]] += 1
    return counts


def long_tail_counts(total: int, n_classes: int, ratio: float, profile: str) -> np.ndarray:
    """Object counts by rank (head first) of a split of ``total`` objects."""
    return apportion(total, profile_weights(n_classes, ratio, profile))


def frequency_bands(image_counts, rare_max: int, common_max: int) -> list[str]:
    """LVIS bands from training image counts: rare <= rare_max < common <= common_max < frequent."""
    return ["rare" if int(c) <= rare_max else "common" if int(c) <= common_max else "frequent"
            for c in image_counts]


def plan_split(resolved: dict, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(objects per scene (N,), the class of each object in scene order (T,), counts per class (C,))
    of one split: a function of the recipe alone, so it is checked before any raw file is read."""
    r = resolved["recipe"]
    n_scenes = r[f"n_{split}"]
    rng = np.random.default_rng([r["seed"], SPLITS.index(split), 0])
    k = rng.integers(r["k_min"], r["k_max"] + 1, size=n_scenes).astype(np.int64)
    n_classes = len(resolved["class_names"])
    balanced = split != "train" and r["eval_profile"] == "balanced"
    by_rank = long_tail_counts(int(k.sum()), n_classes, 1.0 if balanced else r["imbalance_ratio"], r["profile"])
    counts = by_rank[np.asarray(resolved["class_rank"])]  # label -> its rank's count
    labels = rng.permutation(np.repeat(np.arange(n_classes), counts)).astype(np.int64)
    return k, labels, counts


def plan_dense(resolved: dict, with_val: bool = True) -> dict[str, tuple]:
    """Every split's plan; refuses recipes that leave a class without objects, naming the key."""
    r = resolved["recipe"]
    if not with_val and r["n_val"] > 0:
        raise SceneError(f"scenes.n_val: {r['n_val']} val scenes but no base validation images (val fraction 0); "
                         f"set n_val to 0")
    plans = {}
    for split in SPLITS:
        k, labels, counts = plan_split(resolved, split)
        if len(k) and counts.min() < 1:  # an empty val split (n_val 0) has nothing to check
            key = "imbalance_ratio" if split == "train" and r["imbalance_ratio"] > 1 else f"n_{split}"
            raise SceneError(f"scenes.{key}: the {split} split's {int(k.sum())} objects leave "
                             f"{int((counts < 1).sum())} of {len(counts)} classes without an object; "
                             f"raise n_{split} or lower imbalance_ratio")
        plans[split] = (k, labels, counts)
    return plans


# --- building ---------------------------------------------------------------------------------

def build_dense_split(images: np.ndarray, base_labels: np.ndarray, pool: np.ndarray, k: np.ndarray,
                      labels: np.ndarray, resolved: dict, split: str) -> tuple[DenseScenes, int]:
    """The scenes of one split from the base images at positions ``pool``; returns (scenes, the
    largest number of times one base image was used)."""
    r = resolved["recipe"]
    images = np.asarray(images)
    base_labels = np.asarray(base_labels, dtype=np.int64)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] != 1:
        raise SceneError(f"scenes: base images must be grayscale uint8 (N, 1, H, W), got {images.dtype} {images.shape}")
    _, _, h, w = images.shape
    grid, k_max, thr = r["grid"], r["k_max"], r["mask_threshold"]
    n_scenes, n_objects = len(k), int(k.sum())
    n_classes, n_obj = len(resolved["class_names"]), len(resolved["objects"])
    rng = np.random.default_rng([r["seed"], SPLITS.index(split), 1])
    scene = np.repeat(np.arange(n_scenes), k)
    slot = np.arange(n_objects) - np.repeat(np.cumsum(k) - k, k)
    # 1. cells: the first k of a random order of the scene's cells
    cells = np.argsort(rng.random((n_scenes, grid * grid)), axis=1)[:, :k_max]
    cell = cells[scene, slot]
    rows, cols = np.divmod(cell, grid)
    # 2. sources, dealt per base class (ascending id) among its images with a non-empty mask
    attribute, garment = labels // n_obj, np.asarray(resolved["object_classes"], dtype=np.int64)[labels % n_obj]
    pool = np.asarray(pool, dtype=np.int64)
    has_fg = (images[pool, 0] > thr).any(axis=(1, 2))
    sources = np.full(n_objects, -1, dtype=np.int64)
    reuse = 0
    for g in np.unique(garment):
        members = pool[(base_labels[pool] == g) & has_fg]
        if len(members) == 0:
            raise SceneError(f"scenes.objects: base class {int(g)} has no image with a pixel above "
                             f"mask_threshold={thr} in the base {split} images")
        where = np.flatnonzero(garment == g)
        sources[where], reps = _deal_sources(rng, members, len(where))
        reuse = max(reuse, reps)
    # paste: the canvas seen as (N, C, grid, H, grid, W) takes one (C, H, W) object per (scene, cell)
    palette = np.array([PALETTE[c] for c in resolved["attributes"]], dtype=np.int64).reshape(-1, 3)
    gray = images[sources]                                         # (T, 1, h, w)
    fg = gray[:, 0] > thr                                          # (T, h, w): the object's mask
    canvas = np.zeros((n_scenes, 3, grid, h, grid, w), dtype=np.uint8)
    canvas[scene, :, rows, :, cols, :] = tint(gray, palette[attribute])
    inst = np.zeros((n_scenes, grid, h, grid, w), dtype=np.uint8)
    sem = np.zeros_like(inst)
    inst[scene, rows, :, cols, :] = fg * (slot + 1).astype(np.uint8)[:, None, None]
    sem[scene, rows, :, cols, :] = fg * (labels + 1).astype(np.uint8)[:, None, None]
    # tight boxes of the masks (x1, y1 exclusive), in canvas pixels
    any_row, any_col = fg.any(axis=2), fg.any(axis=1)               # (T, h), (T, w)
    y0, y1 = any_row.argmax(axis=1), h - any_row[:, ::-1].argmax(axis=1)
    x0, x1 = any_col.argmax(axis=1), w - any_col[:, ::-1].argmax(axis=1)
    oy, ox = rows * h, cols * w
    obj_boxes = np.full((n_scenes, k_max, 4), -1, dtype=np.int64)
    obj_cells = np.full((n_scenes, k_max, 4), -1, dtype=np.int64)
    obj_labels = np.full((n_scenes, k_max), -1, dtype=np.int64)
    obj_sources = np.full((n_scenes, k_max), -1, dtype=np.int64)
    obj_boxes[scene, slot] = np.stack([ox + x0, oy + y0, ox + x1, oy + y1], axis=-1)
    obj_cells[scene, slot] = np.stack([ox, oy, ox + w, oy + h], axis=-1)
    obj_labels[scene, slot] = labels
    obj_sources[scene, slot] = sources
    y = np.zeros((n_scenes, n_classes), dtype=np.int64)
    y[scene, labels] = 1
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    out = DenseScenes(t(canvas.reshape(n_scenes, 3, grid * h, grid * w)), t(y), t(obj_boxes), t(obj_cells),
                      t(obj_labels), t(obj_sources), t(inst.reshape(n_scenes, grid * h, grid * w)),
                      t(sem.reshape(n_scenes, grid * h, grid * w)))
    check_masks(out.x, out.instance_masks, "instance_masks", split)
    check_masks(out.x, out.semantic_masks, "semantic_masks", split)
    return out, int(reuse)


def build_dense_dataset(train_x, train_y, test_x, test_y, base_class_names: list[str], recipe: dict | None = None,
                        defaults: dict | None = None, base: str = "", train_pool=None, val_pool=None
                        ) -> tuple[dict[str, DenseScenes], dict]:
    """Train scenes from the base train images at ``train_pool``, val scenes from those at
    ``val_pool`` (positions in the base's raw train split; default: all of it for train, none for
    val), test scenes from the base test split. Returns ({split: scenes}, the manifest's ``dense``
    section)."""
    resolved = resolve_dense_recipe(recipe, base_class_names, defaults)
    r = resolved["recipe"]
    train_pool = np.arange(len(train_y)) if train_pool is None else np.asarray(train_pool, dtype=np.int64)
    val_pool = np.zeros(0, dtype=np.int64) if val_pool is None else np.asarray(val_pool, dtype=np.int64)
    plans = plan_dense(resolved, with_val=len(val_pool) > 0)
    sources = {"train": (train_x, train_y, train_pool), "val": (train_x, train_y, val_pool),
               "test": (test_x, test_y, np.arange(len(test_y)))}
    splits, reuse = {}, {}
    for split in SPLITS:
        k, labels, _ = plans[split]
        x, y, pool = sources[split]
        splits[split], reuse[split] = build_dense_split(x, y, pool, k, labels, resolved, split)
    n_classes = len(resolved["class_names"])
    object_counts = {s: np.bincount(splits[s].object_labels[splits[s].object_labels >= 0].numpy(),
                                    minlength=n_classes).tolist() for s in SPLITS}
    image_counts = {s: splits[s].y.sum(0).tolist() for s in SPLITS}
    bands = frequency_bands(image_counts["train"], r["rare_max"], r["common_max"])
    h, w = np.asarray(train_x).shape[2:]
    canvas = list(splits["train"].x.shape[2:])
    train_counts = np.asarray(object_counts["train"])
    info = {
        "kind": "long_tail_dense_scenes",
        "base_dataset": base,
        "recipe": r,
        "canvas": [int(canvas[0]), int(canvas[1])],
        "cell": [int(h), int(w)],
        "attributes": resolved["attributes"],
        "objects": resolved["objects"],
        "object_classes": resolved["object_classes"],
        "class_names": resolved["class_names"],
        "pairs": resolved["pairs"],
        "class_rank": resolved["class_rank"],
        "head_to_tail": resolved["order"],
        "object_counts": object_counts,
        "image_counts": image_counts,
        "imbalance_observed": float(train_counts.max() / max(train_counts.min(), 1)),
        "class_band": bands,
        "bands": {b: [c for c in range(n_classes) if bands[c] == b] for b in ("frequent", "common", "rare")},
        "band_sizes": {b: bands.count(b) for b in ("frequent", "common", "rare")},
        "band_rule": {"basis": "training image count: train scenes holding at least one object of the class "
                               "(LVIS, Gupta et al. CVPR 2019)",
                      "rare": [1, r["rare_max"]], "common": [r["rare_max"] + 1, r["common_max"]],
                      "frequent": [r["common_max"] + 1, None]},
        "masks": {"rule": f"a pasted object's pixels whose base grayscale intensity > {r['mask_threshold']}",
                  "threshold": r["mask_threshold"], "background": BACKGROUND, "ignore_index": IGNORE_INDEX,
                  "instance": "uint8 (N, H, W): 0 background, j + 1 = the object in slot j of object_boxes",
                  "semantic": "uint8 (N, H, W): 0 background, k + 1 = class k; 255 reserved as ignore, unused",
                  "semantic_num_classes": n_classes + 1},
        "boxes": "object_boxes: tight box of the object's mask, object_cells: its cell; x0, y0, x1, y1 with x1, y1 "
                 "exclusive, canvas pixels; rows of -1 pad",
        "objects_per_scene": {s: float(plans[s][0].mean()) if len(plans[s][0]) else 0.0 for s in SPLITS},
        "max_source_reuse": reuse,
    }
    return splits, info


# --- reading ----------------------------------------------------------------------------------

def detection_targets(part, i: int, label_offset: int = 0) -> dict[str, torch.Tensor]:
    """Scene ``i`` of a prepared split (or ``DenseScenes``) as torchvision detection targets:
    ``boxes`` float32 (k, 4) x0, y0, x1, y1, ``labels`` int64 (k,) (+ ``label_offset``: torchvision's
    detectors reserve 0 for background, so pass 1 there), ``masks`` uint8 (k, H, W) binary."""
    labels = part.object_labels[i]
    keep = labels >= 0
    slots = torch.arange(len(labels))[keep]
    masks = (part.instance_masks[i][None] == (slots + 1).to(torch.uint8)[:, None, None]).to(torch.uint8)
    return {"boxes": part.object_boxes[i][keep].float(), "labels": labels[keep] + label_offset, "masks": masks}
