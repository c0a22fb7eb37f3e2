"""Saliency-map metrics: pure functions over saved arrays (numpy or torch in, numpy float64 out).

Conventions. ``maps`` are (N, H, W) saliency maps at the input resolution (what
``SaliencyMethod.explain`` returns and ``classlab explain`` saves); a larger value means more
salient, and no metric here depends on a map's scale. ``boxes`` are (N, 4) integer
``(x0, y0, x1, y1)`` in canvas pixels with ``x1``/``y1`` exclusive: the box holds the pixels
(row r, column c) with ``y0 <= r < y1`` and ``x0 <= c < x1``. A box's *tolerance-t region*
``B_t`` is the set of pixels whose Euclidean distance, in pixel indices, to the nearest box
pixel is at most ``t``:

    d(r, c) = sqrt(dx^2 + dy^2),  dx = max(x0 - c, 0, c - (x1 - 1)),  dy = max(y0 - r, 0, r - (y1 - 1))
    B_t = {(r, c) : d(r, c) <= t}          (B_0 is the box itself; clipped to the canvas)

Metrics and their papers:

- ``pointing_game``: Zhang et al., "Top-down neural attention by excitation backprop", IJCV
  2018 (a hit when the map's maximum falls on the object, with a 15-pixel tolerance there).
- ``box_area_share``: the pointing rate of a uniformly random point, |B_t| / (H W).
- ``energy_pointing``: Wang et al., "Score-CAM", CVPR-W 2020 (the share of the map's positive
  energy inside the box).
- ``perturbation_curve`` / ``curve_auc``: Petsiuk et al., "RISE", BMVC 2018 (deletion and
  insertion curves and their areas). Baseline: the raw black value 0, i.e. the scenes' canvas
  background, for both curves (RISE inserts onto a blurred copy instead); the caller passes it
  in the model's normalised units, ``(0 - mean) / std`` per channel.
- ``class_sensitivity``: Rebuffi et al., "There and back again: revisiting backpropagation
  saliency methods" (NormGrad), CVPR 2020: the Spearman correlation between the maps of the top
  and the bottom predicted class (lower: more class-sensitive).
- ``randomisation_similarity``: Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018:
  the Spearman correlation between the trained model's map and the map after cascading
  randomisation of the layers from the top.

Spearman correlation (``spearman_rows``): the Pearson correlation of the two maps' pixel ranks,
ties given their average rank (``scipy.stats.rankdata(method="average")``, as
``scipy.stats.spearmanr``). It is undefined (``nan``) when either map is constant (all pixels
tied); aggregate with ``nanmean`` and report how many were undefined.

Differences from quantus (0.6.0; tested in tests/test_explain_metrics.py):

- Pointing game (``quantus.PointingGame``): quantus counts a hit when ANY of the tied maxima lies
  in the mask and has no tolerance. Ours with ``ties="any", tolerance=0`` equals it. Our default
  ``ties="share"`` scores the share of the tied maxima inside ``B_t``: 1 or 0 for a unique
  maximum (the usual case), and for a constant map (e.g. an all-zero Grad-CAM) the box-area share,
  the expected hit of random tie-breaking, where quantus's rule would count every constant map
  as a hit.
- Energy-based pointing: ``quantus.RelevanceMassAccuracy`` is sum_in(a) / sum(a) on the raw map
  (negative values included); it equals ours on non-negative maps. ``quantus.AttributionLocalisation``
  with ``positive_attributions=True, abs=False`` clips at 0 as we do, but adds 1e-9 to the
  denominator and returns nan when the ratio exceeds 1; for an all-non-positive map it returns
  0 and ours the box-area share (see ``energy_pointing``).
- Deletion (``quantus.PixelFlipping`` with ``perturb_baseline=<value>``, ``features_in_step=P/K``):
  the same probabilities as ours at steps 1..K when P is a multiple of K and the map has no ties;
  quantus omits the unperturbed step 0, its ``"black"`` baseline is the image minimum rather than a
  fixed value, it orders ties by ``np.argsort`` (not stable), and its AUC is ``np.trapz`` over
  step indices instead of our [0, 1] axis.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy.stats import rankdata

TIE_RULES = ("share", "any", "first")
MODES = ("deletion", "insertion")


def _numpy(a, name: str, ndim: int | None = None) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    return a


def _maps(maps, name: str = "maps", ndim: int = 3) -> np.ndarray:
    m = _numpy(maps, name, ndim).astype(np.float64)
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name}: contains nan or inf values")
    return m


def _boxes(boxes, n: int | None = None, height: int | None = None, width: int | None = None) -> np.ndarray:
    b = _numpy(boxes, "boxes", 2)
    if b.shape[1] != 4:
        raise ValueError(f"boxes: expected (N, 4) rows of x0, y0, x1, y1, got shape {b.shape}")
    if n is not None and len(b) != n:
        raise ValueError(f"boxes: {len(b)} boxes for {n} maps")
    if not np.issubdtype(b.dtype, np.integer):
        if not np.all(b == np.round(b)):
            raise ValueError("boxes: pixel coordinates must be integers")
    b = b.astype(np.int64)
    if np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]):
        raise ValueError("boxes: empty box (x1 <= x0 or y1 <= y0); x1 and y1 are exclusive")
    if height is not None and (np.any(b[:, :2] < 0) or np.any(b[:, 2] > width) or np.any(b[:, 3] > height)):
        raise ValueError(f"boxes: a box reaches outside the {height}x{width} canvas")
    return b


def box_masks(boxes, height: int, width: int, tolerance: float = 0) -> np.ndarray:
    """bool (N, H, W): the tolerance-t region ``B_t`` of each box (module docstring)."""
    if tolerance < 0:
        raise ValueError(f"tolerance: must be >= 0 pixels, got {tolerance}")
    b = _boxes(boxes, height=height, width=width)
    rows = np.arange(height)[None, :, None]
    cols = np.arange(width)[None, None, :]
    x0, y0, x1, y1 = (b[:, i, None, None] for i in range(4))
    dx = np.maximum(np.maximum(x0 - cols, 0), cols - (x1 - 1))
    dy = np.maximum(np.maximum(y0 - rows, 0), rows - (y1 - 1))
    return dx ** 2 + dy ** 2 <= float(tolerance) ** 2


def pointing_game(maps, boxes, tolerance: float = 0, ties: str = "share") -> np.ndarray:
    """Per image, whether the map's maximum falls in the box (within ``tolerance`` pixels).

    With ``M = max_p s_p`` and the tied maxima ``T = {p : s_p = M}`` (exact equality):

        ties="share" (default):  hit = |T ∩ B_t| / |T|           (1 or 0 for a unique maximum)
        ties="any" (quantus):    hit = 1 if T ∩ B_t is non-empty else 0
        ties="first":            hit = 1 if the first maximum in raster order (np.argmax) is in B_t

    Returns float64 (N,) in [0, 1]; its mean is the pointing accuracy.
    """
    if ties not in TIE_RULES:
        raise ValueError(f"ties: unknown rule {ties!r}; valid: {list(TIE_RULES)}")
    m = _maps(maps)
    n, h, w = m.shape
    inside = box_masks(_boxes(boxes, n, h, w), h, w, tolerance).reshape(n, -1)
    flat = m.reshape(n, -1)
    if ties == "first":
        return inside[np.arange(n), flat.argmax(axis=1)].astype(np.float64)
    tied = flat == flat.max(axis=1, keepdims=True)
    hits_in = (tied & inside).sum(axis=1)
    if ties == "any":
        return (hits_in > 0).astype(np.float64)
    return hits_in / tied.sum(axis=1)


def box_area_share(boxes, height: int, width: int, tolerance: float = 0) -> np.ndarray:
    """The pointing rate of a uniformly random point: ``|B_t| / (H W)`` per box, float64 (N,)."""
    return box_masks(boxes, height, width, tolerance).reshape(len(_numpy(boxes, "boxes")), -1).mean(axis=1)


def energy_pointing(maps, boxes) -> np.ndarray:
    """Share of the map's positive energy inside the box, float64 (N,):

        E = sum_{p in B} max(s_p, 0) / sum_p max(s_p, 0)

    A map with no positive value (all zero, say) has no energy to share: it scores the
    box-area share ``|B| / (H W)``, the value of a uniform map, which is also the limit of a
    constant positive map (never nan, so means over images need no special case).
    """
    m = _maps(maps)
    n, h, w = m.shape
    inside = box_masks(_boxes(boxes, n, h, w), h, w).reshape(n, -1)
    pos = np.clip(m.reshape(n, -1), 0.0, None)
    total = pos.sum(axis=1)
    within = (pos * inside).sum(axis=1)
    share = inside.mean(axis=1)
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, within / safe, share)


def _baseline(baseline, x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the baseline broadcastable to (B, C, H, W), whether it is per image (N, C, H, W))."""
    n, c, h, w = x.shape
    b = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    if b.ndim == 0:
        return b.reshape(1, 1, 1, 1), False
    if b.ndim == 1 and b.shape[0] == c:
        return b.reshape(1, c, 1, 1), False
    if tuple(b.shape) == (c, h, w):
        return b.unsqueeze(0), False
    if tuple(b.shape) == (n, c, h, w):
        return b, True
    raise ValueError(f"baseline: expected a scalar, ({c},) per channel, ({c}, {h}, {w}) or ({n}, {c}, {h}, {w}); "
                     f"got shape {tuple(b.shape)}")


def saliency_order(maps, tie_seed: int | None = None) -> np.ndarray:
    """int64 (N, H*W): pixel indices (raster) by decreasing saliency.

    Ties keep raster order (a stable sort) or, with ``tie_seed``, the order of a permutation
    drawn from ``np.random.default_rng(tie_seed)`` (one per call, shared by the images).
    """
    m = _maps(maps)
    n = len(m)
    flat = m.reshape(n, -1)
    if tie_seed is None:
        return np.argsort(-flat, axis=1, kind="stable")
    perm = np.random.default_rng(tie_seed).permutation(flat.shape[1])
    return perm[np.argsort(-flat[:, perm], axis=1, kind="stable")]


@torch.no_grad()
def perturbation_curve(score_fn: Callable[[torch.Tensor], torch.Tensor], x, maps, classes,
                       mode: str = "deletion", steps: int = 20, baseline=0.0, batch_size: int = 256,
                       tie_seed: int | None = None) -> np.ndarray:
    """Deletion or insertion curve (RISE): float64 (N, steps + 1), the probability of ``classes``.

    Pixels (all channels of a location) are ranked by decreasing saliency (``saliency_order``)
    and taken in ``K = steps`` chunks: after step k the first ``n_k = floor(k P / K)`` of the
    ``P = H W`` pixels are perturbed (chunk sizes differ by at most one), so with ``R_k`` the
    mask of those pixels and ``b`` the baseline:

        deletion:   x_k = (1 - R_k) * x + R_k * b       curve[:, k] = score_fn(x_k)[:, class]
        insertion:  x_k = R_k * x + (1 - R_k) * b

    ``k = 0`` is the untouched image (deletion) or the pure baseline (insertion); ``k = K`` the
    reverse. ``score_fn(x) -> (B, num_classes)`` probabilities (e.g. softmax of a model's
    logits), called on batches of ``batch_size`` perturbed images drawn from all N x (K + 1)
    (image, step) pairs. ``baseline``: the raw black value 0 (the scenes' canvas background) in
    the caller's normalised units, as a scalar, (C,), (C, H, W) or (N, C, H, W).
    """
    if mode not in MODES:
        raise ValueError(f"mode: unknown {mode!r}; valid: {list(MODES)}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps: a positive integer expected, got {steps!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
    x = torch.as_tensor(x)
    if x.ndim != 4:
        raise ValueError(f"x: expected (N, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x: expected normalised float images, got {x.dtype}")
    n, c, h, w = x.shape
    m = _maps(maps)
    if m.shape != (n, h, w):
        raise ValueError(f"maps: expected ({n}, {h}, {w}) (one map per image at the input size), got {m.shape}")
    cls = _numpy(classes, "classes", 1).astype(np.int64)
    if len(cls) != n:
        raise ValueError(f"classes: {len(cls)} classes for {n} images")
    if n and int(cls.min()) < 0:
        raise ValueError(f"classes: negative class index {int(cls.min())}")
    base, per_image = _baseline(baseline, x)
    pixels = h * w
    order = saliency_order(m, tie_seed)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(pixels)[None, :].repeat(n, 0), axis=1)
    rank_t = torch.from_numpy(rank).to(x.device).reshape(n, 1, h, w)
    counts = torch.tensor([(k * pixels) // steps for k in range(steps + 1)], device=x.device)
    cls_t = torch.from_numpy(cls).to(x.device)
    curves = torch.empty(n * (steps + 1), dtype=torch.float64)
    pairs = torch.arange(n * (steps + 1), device=x.device)
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        img, step = chunk // (steps + 1), chunk % (steps + 1)
        perturbed = rank_t[img] < counts[step].reshape(-1, 1, 1, 1)  # (B, 1, H, W): R_k
        b = base[img] if per_image else base
        xi = x[img]
        batch = torch.where(perturbed, b, xi) if mode == "deletion" else torch.where(perturbed, xi, b)
        probs = score_fn(batch)
        if probs.ndim != 2 or probs.shape[0] != len(chunk):
            raise ValueError(f"score_fn: expected (B, num_classes) probabilities for {len(chunk)} images, "
                             f"got shape {tuple(probs.shape)}")
        if start == 0 and int(cls.max()) >= probs.shape[1]:
            raise ValueError(f"classes: class {int(cls.max())} outside the {probs.shape[1]} classes of score_fn")
        curves[start:start + len(chunk)] = probs[torch.arange(len(chunk), device=probs.device),
                                                 cls_t[img].to(probs.device)].double().cpu()
    return curves.reshape(n, steps + 1).numpy()


def curve_auc(curves) -> np.ndarray:
    """Area under each curve on [0, 1] (trapezoid rule, K + 1 equally spaced points):

        AUC = (1 / K) * sum_{k=0}^{K-1} (c_k + c_{k+1}) / 2

    Deletion: lower is better (the class vanishes fast); insertion: higher is better.
    """
    c = _numpy(curves, "curves", 2).astype(np.float64)
    if c.shape[1] < 2:
        raise ValueError(f"curves: need at least 2 points per curve, got {c.shape[1]}")
    return (c[:, :-1] + c[:, 1:]).sum(axis=1) / (2.0 * (c.shape[1] - 1))


def spearman_rows(a, b) -> np.ndarray:
    """Spearman correlation of each row pair of ``a`` and ``b`` (M, P): Pearson of average ranks.

        rho = sum_p (ra_p - mean ra)(rb_p - mean rb) / sqrt(sum_p (ra_p - mean ra)^2 sum_p (rb_p - mean rb)^2)

    ``nan`` where a row is constant (its ranks all tie).
    """
    ra = rankdata(a, axis=1, method="average")
    rb = rankdata(b, axis=1, method="average")
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra ** 2).sum(axis=1) * (rb ** 2).sum(axis=1))
    num = (ra * rb).sum(axis=1)
    out = np.full(len(ra), np.nan)
    ok = denom > 0
    out[ok] = np.clip(num[ok] / denom[ok], -1.0, 1.0)
    return out


def class_sensitivity(maps_top, maps_bottom) -> np.ndarray:
    """Spearman correlation per image between the map of the top and of the bottom predicted class,
    float64 (N,) (``spearman_rows``; nan where a map is constant). Lower is more class-sensitive."""
    top = _maps(maps_top, "maps_top")
    bottom = _maps(maps_bottom, "maps_bottom")
    if top.shape != bottom.shape:
        raise ValueError(f"maps_bottom: shape {bottom.shape} differs from maps_top {top.shape}")
    return spearman_rows(top.reshape(len(top), -1), bottom.reshape(len(bottom), -1))


def randomisation_similarity(maps_trained, maps_randomised, absolute: bool = False) -> np.ndarray:
    """Spearman correlation between each image's trained-model map and its map after each stage of
    the cascading randomisation, float64 (L, N): row l compares ``maps_randomised[l]`` (layers from
    the top down to stage l re-initialised) with ``maps_trained``. ``absolute``: rank ``|s|``
    (Adebayo et al. report both). 1 means the map ignored the randomised weights: the check fails;
    a map that depends on the weights falls towards 0."""
    trained = _maps(maps_trained, "maps_trained")
    rand = _maps(maps_randomised, "maps_randomised", ndim=4)
    if rand.shape[1:] != trained.shape:
        raise ValueError(f"maps_randomised: expected (L, {', '.join(map(str, trained.shape))}), got {rand.shape}")
    if absolute:
        trained, rand = np.abs(trained), np.abs(rand)
    n_layers, n = rand.shape[:2]
    ref = np.broadcast_to(trained.reshape(1, n, -1), (n_layers, n, trained[0].size)).reshape(n_layers * n, -1)
    return spearman_rows(ref, rand.reshape(n_layers * n, -1)).reshape(n_layers, n)
