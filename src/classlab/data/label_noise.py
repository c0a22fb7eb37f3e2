"""Injected label noise: a recorded fraction of the training labels flipped to another class.

``inject_label_noise(labels, rate, kind, seed, class_similarity)`` flips exactly ``round(rate * N)``
labels, the positions drawn by ``seed``; every flipped label moves to a different class:

- ``symmetric``: the new class is uniform over the K - 1 other classes;
- ``web``: web-like noise. An image retrieved by a text query for class c that is not of class c is
  mostly of a class whose name or description is close to c's ("tiger cat" returns tigers), so the
  new class j != c is drawn with probability proportional to the classes' text similarity,
  p(j | c) = s(c, j)^+ / sum_{j' != c} s(c, j')^+, with s the cosine similarity of the classes' MiniLM
  text embeddings (``class_text_similarity``); a class whose similarities to every other class are
  <= 0 falls back to uniform.

``noise_summary`` records what was injected: the realised rate (flipped / N) and the per-class
confusion counts (row: the clean class, column: the noisy label). A rate outside [0, 1) is a
``ConfigError`` naming ``noise_rate``, raised before anything is drawn.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from classlab.config import ConfigError

NOISE_KINDS = ("symmetric", "web")


def check_noise_rate(rate) -> float:
    """``rate`` as a float in [0, 1), else ConfigError naming ``noise_rate``."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not np.isfinite(float(rate)):
        raise ConfigError(f"noise_rate: {rate!r} must be a number in [0, 1)")
    if not 0.0 <= float(rate) < 1.0:
        raise ConfigError(f"noise_rate: {rate!r} is outside [0, 1) (the fraction of training labels flipped)")
    return float(rate)


def check_noise_kind(kind) -> str:
    if kind not in NOISE_KINDS:
        raise ConfigError(f"noise_kind: {kind!r} is not one of {list(NOISE_KINDS)}")
    return str(kind)


def class_text_similarity(text_features) -> np.ndarray:
    """(K, K) cosine similarities of the classes' text embeddings (rows L2-normalised here)."""
    t = torch.as_tensor(text_features, dtype=torch.float32)
    t = torch.nn.functional.normalize(t, dim=1)
    return (t @ t.T).numpy().astype(np.float64)


def flip_distribution(num_classes: int, kind: str, class_similarity=None) -> np.ndarray:
    """(K, K) row-stochastic matrix: row c is the distribution of the new label of a flipped class-c
    label, zero on the diagonal (a flip always changes the class)."""
    k = int(num_classes)
    uniform = (np.ones((k, k)) - np.eye(k)) / max(k - 1, 1)
    if kind == "symmetric":
        return uniform
    if class_similarity is None:
        raise ConfigError("class_similarity: web noise needs the (K, K) class text similarities")
    sim = np.asarray(class_similarity, dtype=np.float64)
    if sim.shape != (k, k) or not np.isfinite(sim).all():
        raise ConfigError(f"class_similarity: shape {sim.shape} with finite values expected, not ({k}, {k})")
    weights = np.clip(sim, 0.0, None) * (1.0 - np.eye(k))  # p(j | c) proportional to s(c, j)^+, j != c
    totals = weights.sum(1, keepdims=True)
    return np.where(totals > 0, weights / np.where(totals > 0, totals, 1.0), uniform)


def inject_label_noise(labels, rate, kind: str, seed: int, class_similarity=None, num_classes: int | None = None):
    """``(noisy_labels, flipped_mask)``: a copy of ``labels`` (N,) with exactly round(rate * N) entries,
    chosen by ``seed``, moved to another class drawn from ``flip_distribution``. Returns the type of
    ``labels`` (torch tensor or numpy array) for the labels and a bool mask of the same kind. The
    classes are ``num_classes`` if given, else those of ``class_similarity``, else max(labels) + 1."""
    rate = check_noise_rate(rate)
    kind = check_noise_kind(kind)
    is_torch = isinstance(labels, torch.Tensor)
    y = labels.detach().cpu().numpy() if is_torch else np.asarray(labels)
    y = y.astype(np.int64).reshape(-1)
    n = len(y)
    if num_classes is not None:
        k = int(num_classes)
    elif class_similarity is not None:
        k = int(np.asarray(class_similarity).shape[0])
    else:
        k = int(y.max(initial=-1) + 1)
    if n and (y.min() < 0 or y.max() >= k):
        raise ConfigError(f"labels: values outside 0..{k - 1}")
    m = int(round(rate * n))
    if m > 0 and k < 2:
        raise ConfigError(f"noise_rate: {rate} needs at least two classes to flip between, the labels have {k}")
    dist = flip_distribution(k, kind, class_similarity)
    rng = np.random.default_rng(int(seed))
    chosen = np.sort(rng.permutation(n)[:m])
    noisy = y.copy()
    draws = rng.random(m)
    cumulative = np.cumsum(dist[y[chosen]], axis=1)
    cumulative[:, -1] = 1.0  # guard the last bin against rounding
    noisy[chosen] = (draws[:, None] >= cumulative).sum(1)
    flipped = np.zeros(n, dtype=bool)
    flipped[chosen] = True
    assert (noisy[chosen] != y[chosen]).all()
    if is_torch:
        return torch.from_numpy(noisy).to(labels.dtype), torch.from_numpy(flipped)
    return noisy, flipped


def noise_summary(clean, noisy, num_classes: int) -> dict:
    """The realised noise: ``realised_noise_rate`` (flipped / N), ``flipped`` (count), ``noise_confusion``
    ([K][K] counts, row the clean class, column the noisy label) and ``flipped_per_class``."""
    c = np.asarray(clean.cpu() if isinstance(clean, torch.Tensor) else clean, dtype=np.int64).reshape(-1)
    z = np.asarray(noisy.cpu() if isinstance(noisy, torch.Tensor) else noisy, dtype=np.int64).reshape(-1)
    k = int(num_classes)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (c, z), 1)
    flips = c != z
    return {"realised_noise_rate": float(flips.mean()) if len(c) else 0.0, "flipped": int(flips.sum()),
            "train_samples": int(len(c)), "noise_confusion": confusion.tolist(),
            "flipped_per_class": np.bincount(c[flips], minlength=k).tolist()}
