"""Checkpoints are tensors, not code: saved atomically, loaded with ``weights_only=True``."""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch

from classlab.engine.faults import maybe_kill
from classlab.io import atomic_path


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, or holds more than plain tensors and containers."""


def save_checkpoint(obj: dict[str, Any], path: str | Path) -> None:
    """Atomic and byte-reproducible: torch.save names the zip records after the target file,
    so serialising straight to the temporary name would make equal tensors hash differently
    (DVC would see changed data). A buffer gets the fixed record name "archive"."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a job killed mid-write
        stale.unlink(missing_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
        maybe_kill("checkpoint_write")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any pickled object that is not a tensor or a plain container
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint (it pickles code or "
            f"arbitrary objects, which could run on load). Re-save it as a state_dict. Detail: {exc}"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
