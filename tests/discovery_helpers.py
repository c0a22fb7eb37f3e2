"""Shared by the discovery family's tests: a split of the prepared digits and one tiny protocol run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_CONVNET = {"widths": [8, 16], "pool_after": [0]}


def digits_split(prepared: Path, out: Path, kind: str = "gcd", seed: int = 0, **params) -> Path:
    """A discovery split of the prepared digits (10 classes, 5 known / 5 novel by default), written to ``out``."""
    from classlab.data.discovery_split import build_discovery_split, write_discovery_split
    from classlab.data.prepare import load_prepared

    data = load_prepared(prepared)
    manifest = build_discovery_split(kind, "digits", data.train.y.numpy(), data.num_classes, seed,
                                     test_labels=data.test.y.numpy(), **params)
    write_discovery_split(manifest, out)
    return out


def tiny_run(method: str, prepared: Path, split: Path, work: Path, seed: int = 0, overrides: dict | None = None,
             backbone: str = "convnet", backbone_kwargs: dict | None = None, init: Path | None = None) -> dict:
    """One protocol run of ``method`` on a tiny ConvNet, 1 epoch; returns its history and predictions."""
    from classlab.protocols.discovery import run_discovery

    hp = {"epochs": 1, "batch_size": 64}
    hp.update(overrides or {})
    out = run_discovery(method, prepared, split, backbone, seed, work / "ckpt", work / "eval", overrides=hp,
                        backbone_kwargs=TINY_CONVNET if backbone_kwargs is None and backbone == "convnet"
                        else backbone_kwargs, init=init, progress=False)
    with np.load(work / "eval" / "predictions.npz") as z:
        out["predictions"] = {k: z[k] for k in z.files}
    return out
