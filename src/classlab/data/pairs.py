"""Attribute-object pairs built by code: the compositional zero-shot data of the vlm family.

Compositional zero-shot learning (CZSL; Misra et al. 2017, Mancini et al. 2021, CSP by Nayak et al.
2023) classifies images into attribute-object pairs ("red trouser") from a grid A x O of which only
some pairs (the seen ones) have training images; the test images cover every pair, and each attribute
and each object must occur in at least one seen pair, so that an unseen pair is a new composition of
known primitives.

A pairs dataset (``fashion_mnist_pairs``, ``digits_pairs``: a registry spec with a ``pairs_base``) is
built from its base dataset's raw files: each grayscale image gets one colour drawn from a seeded
generator (``seed`` for the train split, ``seed + 1`` for the test split) and becomes an RGB image,

    rgb[c, h, w] = round(gray[h, w] * colour[c] / 255),

so the dataset keeps its base's size. The label of an image is its pair, ``a * O + o`` (attribute-major),
named "<colour> <object>" with the base class name lower-cased. The unseen pairs are either given by
name (``unseen``) or drawn with the seed (``unseen_fraction`` of the grid, greedily in a seeded order,
never removing an attribute's or an object's last seen pair). The TRAIN split keeps only the seen
pairs' images (the unseen pairs' are dropped, so validation, cut from it, holds seen pairs only); the
TEST split keeps every image. The manifest's ``pairs`` section records the attributes, the objects,
the (attribute, object) of each label, the seen and unseen labels and the resolved recipe.

A recipe that names a pair outside the grid, an unknown colour or key, or leaves an attribute or an
object without a seen pair raises ``PairsError`` naming the field, before anything is written.
"""
from __future__ import annotations

import numpy as np

from classlab.config import ConfigError

# RGB of the colours a recipe may name
PALETTE = {
    "red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "cyan": (0, 255, 255), "magenta": (255, 0, 255), "orange": (255, 128, 0), "white": (255, 255, 255),
}

# recipe keys and their defaults; a spec's ``pairs_defaults`` and then the caller's recipe override them
PAIRS_RECIPE = {
    "colors": ["red", "green", "blue", "yellow"],  # the attributes
    "objects": None,           # base-class indices to use as objects (None: every class)
    "unseen_fraction": 0.25,   # share of the grid held out, rounded (used when `unseen` is None)
    "unseen": None,            # the held-out pairs by name, e.g. ["red trouser"] (overrides the fraction)
    "seed": 0,                 # colours (train: seed, test: seed + 1) and the draw of the unseen pairs
}


class PairsError(ConfigError):
    """A pairs recipe that does not fit the grid; the message names the field."""


def object_name(base_name: str) -> str:
    return str(base_name).strip().lower()


def _check_coverage(n_attr: int, n_obj: int, unseen: set[int], attributes, objects, field: str) -> None:
    seen = [k for k in range(n_attr * n_obj) if k not in unseen]
    for a in range(n_attr):
        if not any(k // n_obj == a for k in seen):
            raise PairsError(f"pairs: {field} leaves attribute {attributes[a]!r} with no seen pair; every attribute "
                             "and every object needs one (CZSL splits)")
    for o in range(n_obj):
        if not any(k % n_obj == o for k in seen):
            raise PairsError(f"pairs: {field} leaves object {objects[o]!r} with no seen pair; every attribute "
                             "and every object needs one (CZSL splits)")


def draw_unseen(n_attr: int, n_obj: int, n_unseen: int, seed: int) -> list[int]:
    """``n_unseen`` pair labels held out, drawn greedily in a seeded order so that every attribute and
    every object keeps a seen pair; a later order is tried where a greedy pass gets stuck."""
    most = n_attr * n_obj - max(n_attr, n_obj)
    if n_unseen > most:
        raise PairsError(f"pairs: unseen_fraction holds out {n_unseen} pairs; a {n_attr} x {n_obj} grid can hold out "
                         f"at most {most} with every attribute and object still in a seen pair")
    for attempt in range(100):
        rng = np.random.default_rng([int(seed), attempt, 0x9A12])
        attr_left, obj_left = np.full(n_attr, n_obj), np.full(n_obj, n_attr)
        out = []
        for k in rng.permutation(n_attr * n_obj):
            if len(out) == n_unseen:
                break
            a, o = divmod(int(k), n_obj)
            if attr_left[a] > 1 and obj_left[o] > 1:
                attr_left[a] -= 1
                obj_left[o] -= 1
                out.append(int(k))
        if len(out) == n_unseen:
            return sorted(out)
    raise PairsError(f"pairs: no draw of {n_unseen} unseen pairs keeps every attribute and object seen")


def resolve_pairs_recipe(recipe: dict | None, base_class_names: list[str], defaults: dict | None = None) -> dict:
    """The recipe with defaults filled in and checked, plus the derived grid: ``attributes``,
    ``objects``, ``object_classes`` (base labels), ``pairs`` ([a, o] per label), ``class_names``,
    ``unseen_labels`` and ``seen_labels``. Raises ``PairsError`` naming the field."""
    r = dict(PAIRS_RECIPE)
    r.update(defaults or {})
    if recipe is not None and not isinstance(recipe, dict):
        raise PairsError(f"pairs: a recipe is a mapping, got {type(recipe).__name__}")
    unknown = sorted(set(recipe or {}) - set(PAIRS_RECIPE))
    if unknown:
        raise PairsError(f"pairs: unknown recipe key(s) {unknown}; known: {sorted(PAIRS_RECIPE)}")
    r.update(recipe or {})
    colors = r["colors"]
    if not isinstance(colors, (list, tuple)) or len(colors) < 2:
        raise PairsError(f"pairs: colors must list at least 2 colours of {sorted(PALETTE)}, got {colors!r}")
    bad = [c for c in colors if c not in PALETTE]
    if bad or len(set(colors)) != len(colors):
        raise PairsError(f"pairs: colors {list(colors)!r}: unknown or repeated {bad or 'colour'}; known: {sorted(PALETTE)}")
    n_base = len(base_class_names)
    objects = r["objects"]
    if objects is None:
        objects = list(range(n_base))
    if (not isinstance(objects, (list, tuple)) or len(objects) < 2 or len(set(objects)) != len(objects)
            or any(isinstance(o, bool) or not isinstance(o, int) or not 0 <= o < n_base for o in objects)):
        raise PairsError(f"pairs: objects must list at least 2 distinct base classes in 0..{n_base - 1}, got {objects!r}")
    seed = r["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PairsError(f"pairs: seed must be a non-negative integer, got {seed!r}")
    attributes = list(colors)
    object_names = [object_name(base_class_names[o]) for o in objects]
    n_attr, n_obj = len(attributes), len(object_names)
    pairs = [[a, o] for a in range(n_attr) for o in range(n_obj)]
    names = [f"{attributes[a]} {object_names[o]}" for a, o in pairs]
    if len(set(names)) != len(names):
        raise PairsError(f"pairs: objects {objects!r} give repeated pair names")
    if r["unseen"] is not None:
        given = r["unseen"]
        if not isinstance(given, (list, tuple)) or not given or not all(isinstance(n, str) for n in given):
            raise PairsError(f"pairs: unseen must list pair names such as {names[0]!r}, got {given!r}")
        missing = [n for n in given if n not in names]
        if missing:
            raise PairsError(f"pairs: unseen names {missing} which never occur: not a pair of the grid "
                             f"(attributes {attributes}, objects {object_names})")
        if len(set(given)) != len(given):
            raise PairsError(f"pairs: unseen repeats a pair: {list(given)}")
        unseen = sorted(names.index(n) for n in given)
        _check_coverage(n_attr, n_obj, set(unseen), attributes, object_names, "unseen")
    else:
        fraction = r["unseen_fraction"]
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise PairsError(f"pairs: unseen_fraction must be in (0, 1), got {fraction!r}")
        n_unseen = max(1, int(round(float(fraction) * len(pairs))))
        unseen = draw_unseen(n_attr, n_obj, n_unseen, seed)
    r.update(colors=attributes, objects=list(objects))
    return {"recipe": r, "attributes": attributes, "objects": object_names, "object_classes": list(objects),
            "pairs": pairs, "class_names": names, "unseen_labels": unseen,
            "seen_labels": [k for k in range(len(pairs)) if k not in set(unseen)]}


def tint(gray: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """(N, 1, H, W) uint8 grayscale and (N, 3) RGB colours -> (N, 3, H, W) uint8 tinted images."""
    g = np.asarray(gray, dtype=np.float64)
    if g.ndim != 4 or g.shape[1] != 1:
        raise ValueError(f"pairs: base images must be grayscale (N, 1, H, W), got {g.shape}")
    rgb = np.asarray(colors, dtype=np.float64)[:, :, None, None] / 255.0  # (N, 3, 1, 1)
    return np.clip(np.rint(g * rgb), 0, 255).astype(np.uint8)


def _colour_split(x: np.ndarray, y: np.ndarray, resolved: dict, seed: int, keep_unseen: bool):
    object_of = {int(c): i for i, c in enumerate(resolved["object_classes"])}
    use = np.flatnonzero(np.isin(y, list(object_of)))
    rng = np.random.default_rng([int(seed), 0xC010])
    attribute = rng.integers(len(resolved["attributes"]), size=len(y))  # one colour per raw image
    obj = np.array([object_of.get(int(c), -1) for c in y], dtype=np.int64)
    label = attribute * len(resolved["objects"]) + obj
    if not keep_unseen:
        use = use[~np.isin(label[use], resolved["unseen_labels"])]
    palette = np.array([PALETTE[c] for c in resolved["attributes"]])
    return tint(x[use], palette[attribute[use]]), label[use].astype(np.int64), use


def build_pairs(train_x, train_y, test_x, test_y, base_class_names, recipe: dict | None,
                defaults: dict | None = None, base: str | None = None):
    """(train_x, train_y, test_x, test_y, class_names, manifest section) of a pairs dataset: the train
    split with the seen pairs' images only, the test split with every image."""
    r = resolve_pairs_recipe(recipe, base_class_names, defaults)
    seed = int(r["recipe"]["seed"])
    tx, ty, tsrc = _colour_split(train_x, train_y, r, seed, keep_unseen=False)
    ex, ey, esrc = _colour_split(test_x, test_y, r, seed + 1, keep_unseen=True)
    info = {"base": base, "attributes": r["attributes"], "objects": r["objects"], "object_classes": r["object_classes"],
            "pairs": r["pairs"], "seen": r["seen_labels"], "unseen": r["unseen_labels"], "recipe": r["recipe"],
            "train_base_indices_count": int(len(tsrc)), "test_base_indices_count": int(len(esrc))}
    return tx, ty, ex, ey, r["class_names"], info
