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
