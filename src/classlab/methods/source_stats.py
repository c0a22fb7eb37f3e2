"""Class-conditional feature statistics of the source model on its training data.

Test-time methods that align test features with the source distribution (CAFA, Jung et al.,
ICCV 2023) need, for every class k, the mean and covariance of the source model's pooled
features over the training images of that class:

    mu_k    = (1 / N_k) sum_{i: y_i = k} f_i
    Sigma_k = (1 / (N_k - ddof)) sum_{i: y_i = k} (f_i - mu_k)(f_i - mu_k)^T + eps I

(``ddof`` 1 by default: numpy's ``np.cov``). ``eps I`` keeps every covariance invertible (a ReLU
network's pooled features often have units that are always zero on some class). The precision
matrices (inverse covariances) are computed once here, in float64, so a method does not invert
at each batch. A class with fewer than ``ddof + 1`` samples gets the global covariance (and, when
empty, the global mean); ``counts`` records how many samples each class had.

This is a helper module of the family package, not a method: it registers nothing.
"""
from __future__ import annotations

from pathlib import Path

import torch

from classlab.io import atomic_path

DEFAULT_EPS = 1.0e-3
FORMAT = "classlab.source_stats/1"
STAT_KEYS = ("mu", "cov", "precision", "counts", "mean", "global_cov")


def _covariance(x: torch.Tensor, mean: torch.Tensor, ddof: int) -> torch.Tensor:
    centred = x - mean
    return centred.T @ centred / max(len(x) - ddof, 1)


def compute_source_statistics(features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                              eps: float = DEFAULT_EPS, ddof: int = 1) -> dict:
    """Per-class and global feature statistics of ``features`` (N, D) with ``labels`` (N,).

    Returns ``mu`` (K, D), ``cov`` (K, D, D) (with ``eps`` I added), ``precision`` (K, D, D)
    (its inverse), ``counts`` (K,), ``mean`` (D,) and ``global_cov`` (D, D) (with ``eps`` I),
    float32 (computed in float64), plus ``eps`` and ``ddof``.
    """
    if features.ndim != 2:
        raise ValueError(f"features: a (N, D) tensor expected, got shape {tuple(features.shape)}")
    if labels.shape != (len(features),):
        raise ValueError(f"labels: ({len(features)},) expected to match the features, got {tuple(labels.shape)}")
    if len(features) < 2:
        raise ValueError(f"features: at least 2 samples are needed for a covariance, got {len(features)}")
    if eps < 0:
        raise ValueError(f"eps: {eps} must be >= 0")
    labels = labels.long().cpu()
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels: values must lie in 0 .. {num_classes - 1}, got {labels.min()} .. {labels.max()}")
    x = features.detach().cpu().double()
    d = x.shape[1]
    eye = torch.eye(d, dtype=torch.float64)
    mean = x.mean(0)
    global_cov = _covariance(x, mean, ddof)
    counts = torch.bincount(labels, minlength=num_classes)
    mu = mean.repeat(num_classes, 1)
    cov = global_cov.repeat(num_classes, 1, 1)
    for k in range(num_classes):  # one matrix product per class (K is small), not per sample
        xk = x[labels == k]
        if len(xk):
            mu[k] = xk.mean(0)
        if len(xk) > ddof:
            cov[k] = _covariance(xk, mu[k], ddof)
    cov = cov + eps * eye
    global_cov = global_cov + eps * eye
    precision = torch.linalg.inv(cov)
    return {"mu": mu.float(), "cov": cov.float(), "precision": precision.float(), "counts": counts,
            "mean": mean.float(), "global_cov": global_cov.float(), "eps": float(eps), "ddof": int(ddof)}


@torch.no_grad()
def extract_features(model: torch.nn.Module, x: torch.Tensor, mean, std, device: torch.device | str = "cpu",
                     batch_size: int = 512) -> torch.Tensor:
    """Pooled features ``model.features`` of every image of ``x`` (uint8 (N, C, H, W), normalised
    with ``mean``/``std`` as the loaders do), in eval mode, batched, float32 on the CPU."""
    from classlab.engine.predict import predict_outputs

    return predict_outputs(lambda xb: {"features": model.features(xb)}, x, mean, std, torch.device(device),
                           outputs=("features",), batch_size=batch_size, module=model)["features"]


def source_statistics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, mean, std,
                      device: torch.device | str = "cpu", eps: float = DEFAULT_EPS, ddof: int = 1,
                      batch_size: int = 512) -> dict:
    """``compute_source_statistics`` of the source model's features on images ``x`` with labels ``y``."""
    return compute_source_statistics(extract_features(model, x, mean, std, device, batch_size), y, num_classes,
                                     eps=eps, ddof=ddof)


def save_source_statistics(path: str | Path, stats: dict, meta: dict | None = None) -> Path:
    """Write ``stats`` (tensors and the scalars eps, ddof) and ``meta`` (plain JSON-like values)
    to ``path`` with ``torch.save``, complete or absent."""
    missing = [k for k in STAT_KEYS if k not in stats]
    if missing:
        raise ValueError(f"source statistics lack {missing}; compute them with compute_source_statistics")
    payload = {"format": FORMAT,
               "stats": {k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in stats.items()},
               "meta": dict(meta or {})}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_source_statistics(path: str | Path) -> tuple[dict, dict]:
    """(stats, meta) as written by ``save_source_statistics``."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a source statistics file ({FORMAT})")
    return payload["stats"], payload["meta"]
