"""Turn verified raw files into compact uint8 tensors plus a JSON manifest."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from classlab.data.registry import get_dataset
from classlab.engine.checkpoint import save_checkpoint
from classlab.io import read_json, write_json


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def prepare(dataset: str, raw_dir: Path, out_dir: Path, seed: int = 0) -> dict:
    """Write ``train.pt``, ``test.pt`` (dicts of tensors) and ``manifest.json`` into ``out_dir``.

    The manifest is written last: its presence means the split files are complete.
    """
    spec = get_dataset(dataset)
    raw = spec.load_raw(Path(raw_dir))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    class_names = raw.class_names or spec.class_names
    files = {}
    for split, x, y in (("train", raw.train_x, raw.train_y), ("test", raw.test_x, raw.test_y)):
        if x.dtype != np.uint8 or x.ndim != 4:
            raise ValueError(f"{dataset}/{split}: expected uint8 (N, C, H, W), got {x.dtype} {x.shape}")
        if len(x) != len(y):
            raise ValueError(f"{dataset}/{split}: {len(x)} images but {len(y)} labels")
        target = out_dir / f"{split}.pt"
        save_checkpoint({"x": torch.from_numpy(np.ascontiguousarray(x)),
                         "y": torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))}, target)
        files[split] = {"file": target.name, "sha256": _sha256(target), "count": int(len(y)),
                        "per_class": np.bincount(y, minlength=len(class_names)).tolist()}
    manifest = {
        "dataset": dataset,
        "class_names": class_names,
        "num_classes": len(class_names),
        "shape": list(raw.train_x.shape[1:]),
        "seed": seed,
        "splits": files,
        "channel_mean": (raw.train_x.astype(np.float64).mean(axis=(0, 2, 3)) / 255.0).tolist(),
        "channel_std": (raw.train_x.astype(np.float64).std(axis=(0, 2, 3)) / 255.0).tolist(),
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


@dataclass
class PreparedSplit:
    x: torch.Tensor  # uint8 (N, C, H, W)
    y: torch.Tensor  # int64 (N,)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class PreparedDataset:
    manifest: dict
    train: PreparedSplit
    test: PreparedSplit

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])


def load_prepared(prepared_dir: Path) -> PreparedDataset:
    prepared_dir = Path(prepared_dir)
    manifest = read_json(prepared_dir / "manifest.json")
    splits = {}
    for split in ("train", "test"):
        blob = torch.load(prepared_dir / f"{split}.pt", weights_only=True)
        splits[split] = PreparedSplit(blob["x"], blob["y"])
    return PreparedDataset(manifest, splits["train"], splits["test"])
