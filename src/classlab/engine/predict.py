"""Evaluation outputs: logits and any other named per-sample outputs (features, maps, embeddings).

``predict_outputs`` runs a model function over a whole tensor (uint8 images or float tensors)
in evaluation mode, without augmentation, and gathers the named outputs on the CPU.
``save_predictions`` writes them to ``predictions.npz`` under the existing contract: ``logits``
and ``labels``, plus any extra named arrays, written atomically.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from classlab.data.loader import TensorLoader
from classlab.engine.device import autocast, place
from classlab.io import atomic_path

# names np.savez_compressed takes as its own arguments, so they cannot name an array
_RESERVED = {"file", "args", "allow_pickle"}


def _owner(fn: Callable) -> torch.nn.Module | None:
    """The module whose mode and device ``fn`` depends on: ``fn`` itself or the module a bound
    method belongs to; None for a plain function (its caller sets mode and device)."""
    if isinstance(fn, torch.nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def _gather(value, name: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"output {name!r} is a {type(value).__name__}, not a tensor")
    value = value.detach()
    return (value.float() if value.is_floating_point() else value).cpu()


@torch.no_grad()
def predict_outputs(fn: Callable[[torch.Tensor], torch.Tensor | Mapping[str, torch.Tensor]], x: torch.Tensor,
                    mean, std, device: torch.device, outputs: Sequence[str] | None = ("logits",),
                    batch_size: int = 512, module: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Named outputs of ``fn`` on every sample of ``x``, gathered on the CPU.

    ``fn(batch)`` returns a tensor (taken as ``logits``) or a dict of named tensors. ``x`` is
    uint8 images or a float tensor, normalised with ``mean``/``std`` as ``TensorLoader`` does
    (``None`` for float inputs that are already normalised); no augmentation. ``outputs``
    names the outputs to keep (``None``: every output ``fn`` returns). Floating outputs come
    back as float32, others keep their dtype; each is concatenated along the sample dim.

    The module ``fn`` is (or is a bound method of), or ``module`` where given, runs in eval
    mode on ``device`` and gets its previous mode back afterwards.
    """
    device = torch.device(device)
    owner = module if module is not None else _owner(fn)
    was_training = owner.training if owner is not None else False
    if owner is not None:
        place(owner.eval(), device)
    loader = TensorLoader(x, torch.zeros(len(x), dtype=torch.long), batch_size, device=device, mean=mean, std=std)
    gathered: dict[str, list[torch.Tensor]] = {name: [] for name in outputs} if outputs is not None else {}
    try:
        for batch in loader:
            with autocast(device):
                result = fn(batch["x"])
            named = dict(result) if isinstance(result, Mapping) else {"logits": result}
            wanted = list(named) if outputs is None else list(outputs)
            missing = [name for name in wanted if name not in named]
            if missing:
                raise KeyError(f"outputs {missing} not produced; the model function returns {sorted(named)}")
            for name in wanted:
                gathered.setdefault(name, []).append(_gather(named[name], name))
    finally:
        if owner is not None:
            owner.train(was_training)
    return {name: torch.cat(parts) if parts else torch.zeros(0) for name, parts in gathered.items()}


def save_predictions(path: str | Path, outputs: Mapping[str, torch.Tensor | np.ndarray],
                     labels: torch.Tensor | np.ndarray | None = None,
                     required: Sequence[str] = ("logits", "labels")) -> Path:
    """Write ``outputs`` (and ``labels``) to ``path`` (``predictions.npz``), complete or absent.

    The contract: ``logits`` (float32, (N, classes)) and ``labels`` (N,) are present (the
    names in ``required``), and every other key is an extra named array (features, maps,
    embeddings). Floating arrays are stored as float32, others as they are.
    """
    arrays: dict[str, np.ndarray] = {}
    items = dict(outputs)
    if labels is not None:
        if "labels" in items:
            raise ValueError("labels given twice: as an argument and in outputs")
        items["labels"] = labels
    for name, value in items.items():
        if not name.isidentifier() or name in _RESERVED:
            raise ValueError(f"{name!r} cannot name an array in predictions.npz")
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        arrays[name] = array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array
    missing = [name for name in required if name not in arrays]
    if missing:
        raise ValueError(f"predictions need {missing}; got {sorted(arrays)}")
    if "logits" in arrays and "labels" in arrays and len(arrays["logits"]) != len(arrays["labels"]):
        raise ValueError(f"{len(arrays['logits'])} logits but {len(arrays['labels'])} labels")
    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    return path
