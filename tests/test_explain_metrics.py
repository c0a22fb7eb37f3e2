"""Saliency metrics (classlab.metrics.saliency): hand-computed gold values for every metric, the
batching of the perturbation curves against a naive loop, and agreement with quantus 0.6.0 where it
implements the same metric (pointing game, relevance mass / attribution localisation, pixel flipping)."""
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from classlab.metrics.saliency import (box_area_share, box_masks, class_sensitivity, curve_auc, energy_pointing,
                                       perturbation_curve, pointing_game, randomisation_similarity,
                                       saliency_order, spearman_rows)

BOX = [2, 3, 5, 7]  # x0, y0, x1, y1 on a 10 x 10 canvas: columns 2..4, rows 3..6 (12 pixels)


def _peak(r, c, size=10):
    m = np.zeros((size, size))
    m[r, c] = 1.0
    return m


# --- box regions and the random-point baseline -----------------------------------------------

def test_box_area_share_by_hand():
    # tolerance 1 (Euclidean): one ring without the diagonal corners: 5 x 4 + 2 x 3 = 26 pixels
    # tolerance 1.5 takes the corners (sqrt 2): 5 x 6 = 30; a corner box is clipped to the canvas
    got = box_area_share([BOX, BOX, BOX, [0, 0, 2, 2]], 10, 10, tolerance=0)
    assert got.tolist() == pytest.approx([0.12, 0.12, 0.12, 0.04])
    assert box_area_share([BOX], 10, 10, tolerance=1).tolist() == pytest.approx([0.26])
    assert box_area_share([BOX], 10, 10, tolerance=1.5).tolist() == pytest.approx([0.30])
    assert box_area_share([[0, 0, 2, 2]], 10, 10, tolerance=1).tolist() == pytest.approx([0.08])
    m = box_masks([BOX], 10, 10)[0]
    assert m[3:7, 2:5].all() and m.sum() == 12


def test_bad_boxes_and_tolerances_are_refused():
    with pytest.raises(ValueError, match="empty box"):
        box_area_share([[3, 3, 3, 5]], 10, 10)
    with pytest.raises(ValueError, match="outside"):
        box_area_share([[0, 0, 11, 5]], 10, 10)
    with pytest.raises(ValueError, match="tolerance"):
        box_area_share([BOX], 10, 10, tolerance=-1)
    with pytest.raises(ValueError, match="2 boxes for 1 maps"):
        pointing_game(np.zeros((1, 10, 10)), [BOX, BOX])
    with pytest.raises(ValueError, match="ties"):
        pointing_game(np.zeros((1, 10, 10)), [BOX], ties="mean")
    with pytest.raises(ValueError, match="nan"):
        energy_pointing(np.full((1, 10, 10), np.nan), [BOX])


# --- pointing game ---------------------------------------------------------------------------

def test_a_map_peaked_inside_the_box_hits_and_outside_misses():
    maps = np.stack([_peak(4, 3), _peak(0, 9), _peak(3, 1), _peak(2, 1)])
    boxes = [BOX] * 4
    # (3, 1) is one column left of the box (distance 1); (2, 1) is its diagonal neighbour (sqrt 2)
    assert pointing_game(maps, boxes).tolist() == [1.0, 0.0, 0.0, 0.0]
    assert pointing_game(maps, boxes, tolerance=1).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert pointing_game(maps, boxes, tolerance=1.5).tolist() == [1.0, 0.0, 1.0, 1.0]
    # torch in, numpy out
    assert isinstance(pointing_game(torch.from_numpy(maps), torch.tensor(boxes)), np.ndarray)


def test_tied_maxima_by_rule():
    m = np.zeros((10, 10))
    m[0, 0] = m[0, 9] = m[9, 9] = m[4, 3] = 2.0  # four tied maxima, one (row 4, col 3) in the box
    maps, boxes = np.stack([m, np.zeros((10, 10))]), [BOX, BOX]
    assert pointing_game(maps, boxes, ties="share").tolist() == pytest.approx([0.25, 0.12])  # constant map: box share
    assert pointing_game(maps, boxes, ties="any").tolist() == [1.0, 1.0]
    assert pointing_game(maps, boxes, ties="first").tolist() == [0.0, 0.0]  # (0, 0) comes first in raster order


# --- energy-based pointing --------------------------------------------------------------------

def test_energy_pointing_by_hand():
    m = np.full((10, 10), -5.0)
    m[4, 3] = 2.0   # inside
    m[0, 0] = 3.0   # outside
    m[5, 4] = -7.0  # inside, negative: ignored
    assert energy_pointing(m[None], [BOX]).tolist() == pytest.approx([0.4])
    assert energy_pointing(np.ones((1, 10, 10)), [BOX]).tolist() == pytest.approx([0.12])
    # no positive energy: the box-area share (the uniform map's value), never nan
    assert energy_pointing(-np.ones((2, 10, 10)), [BOX, [0, 0, 2, 2]]).tolist() == pytest.approx([0.12, 0.04])


# --- agreement with quantus -------------------------------------------------------------------

def _random_case(seed, n=16, h=12, w=14):
    rng = np.random.default_rng(seed)
    x0, y0 = rng.integers(0, w - 1, n), rng.integers(0, h - 1, n)
    x1, y1 = x0 + 1 + rng.integers(0, w - x0), y0 + 1 + rng.integers(0, h - y0)
    boxes = np.stack([x0, y0, np.minimum(x1, w), np.minimum(y1, h)], axis=1)
    masks = box_masks(boxes, h, w)[:, None].astype(np.float32)
    return rng, boxes, masks


def _quantus(metric, a, s):
    x = np.zeros_like(a, dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(metric(model=None, x_batch=x, y_batch=np.zeros(len(a), dtype=int), a_batch=a,
                                 s_batch=s), dtype=np.float64)


def test_pointing_game_agrees_with_quantus():
    import quantus

    rng, boxes, masks = _random_case(0)
    a = rng.normal(size=masks.shape).astype(np.float32)
    ours = pointing_game(a[:, 0], boxes)
    assert np.array_equal(ours, _quantus(quantus.PointingGame(disable_warnings=True), a, masks))
    # maps peaked in the box half the time, so both outcomes occur
    for i in range(0, len(a), 2):
        x0, y0, x1, y1 = boxes[i]
        a[i, 0, y0, x0] = 10.0
    ours = pointing_game(a[:, 0], boxes)
    assert 0 < ours.sum() < len(ours)
    assert np.array_equal(ours, _quantus(quantus.PointingGame(disable_warnings=True), a, masks))
    # ties: quantus counts any tied maximum in the mask, our "any" rule
    q = np.round(rng.random(masks.shape) * 2).astype(np.float32)  # values 0, 1, 2: many ties
    assert np.array_equal(pointing_game(q[:, 0], boxes, ties="any"),
                          _quantus(quantus.PointingGame(disable_warnings=True), q, masks))


def test_energy_pointing_agrees_with_quantus():
    import quantus

    rng, boxes, masks = _random_case(1)
    pos = rng.random(masks.shape).astype(np.float32)  # non-negative: relevance mass accuracy is the same sum
    assert energy_pointing(pos[:, 0], boxes) == pytest.approx(
        _quantus(quantus.RelevanceMassAccuracy(disable_warnings=True), pos, masks), rel=1e-5)
    signed = rng.normal(size=masks.shape).astype(np.float32)  # positive part only, as attribution localisation
    ref = _quantus(quantus.AttributionLocalisation(positive_attributions=True, abs=False, disable_warnings=True),
                   signed, masks)
    assert energy_pointing(signed[:, 0], boxes) == pytest.approx(ref, rel=1e-5)


def test_deletion_curve_agrees_with_quantus_pixel_flipping():
    import quantus

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(3 * 8 * 8, 4)).eval()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 1, 8, 8)).astype(np.float32)
    maps = rng.random((5, 8, 8)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 0])
    ours = perturbation_curve(lambda b: torch.softmax(model(b), dim=1), torch.from_numpy(x), maps, y,
                              steps=8, baseline=-0.5)
    metric = quantus.PixelFlipping(features_in_step=8, perturb_baseline=-0.5, normalise=False, disable_warnings=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = np.asarray(metric(model=model, x_batch=x, y_batch=y, a_batch=maps[:, None], device="cpu",
                                softmax=True), dtype=np.float64)
    assert ref.shape == (5, 8)
    assert ours[:, 1:] == pytest.approx(ref, abs=1e-5)  # quantus has no step 0 (the untouched image)


# --- deletion and insertion --------------------------------------------------------------------

def _sum_score(b):
    """A stand-in for probabilities: column 0 is the image's sum / 10, column 1 its negation."""
    s = b.flatten(1).sum(1) / 10.0
    return torch.stack([s, -s], dim=1)


def test_deletion_and_insertion_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])           # pixels 0..3 in raster order
    m = np.array([[[0.1, 0.4], [0.3, 0.2]]])                 # saliency order: 1, 2, 3, 0
    assert saliency_order(m).tolist() == [[1, 2, 3, 0]]
    dele = perturbation_curve(_sum_score, x, m, [0], mode="deletion", steps=4)
    ins = perturbation_curve(_sum_score, x, m, [0], mode="insertion", steps=4)
    assert dele[0].tolist() == pytest.approx([1.0, 0.8, 0.5, 0.1, 0.0])
    assert ins[0].tolist() == pytest.approx([0.0, 0.2, 0.5, 0.9, 1.0])
    assert curve_auc(dele).tolist() == pytest.approx([0.475])
    assert curve_auc(ins).tolist() == pytest.approx([0.525])
    # K = 3 chunks of 4 pixels: floor(k * 4 / 3) = 0, 1, 2, 4 removed
    assert perturbation_curve(_sum_score, x, m, [0], steps=3)[0].tolist() == pytest.approx([1.0, 0.8, 0.5, 0.0])
    # a baseline of -1 (the black value in normalised units, say): removed pixels count -1 each
    assert perturbation_curve(_sum_score, x, m, [0], steps=2, baseline=-1.0)[0].tolist() == pytest.approx(
        [1.0, (4 + 1 - 2) / 10, -0.4])
    # the class column is honoured
    assert perturbation_curve(_sum_score, x, m, [1], steps=4)[0, 0] == pytest.approx(-1.0)


def test_ties_keep_raster_order_unless_a_tie_seed_is_given():
    m = np.zeros((1, 2, 2))
    assert saliency_order(m).tolist() == [[0, 1, 2, 3]]
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert perturbation_curve(_sum_score, x, m, [0], steps=4)[0].tolist() == pytest.approx([1.0, 0.9, 0.7, 0.4, 0.0])
    seeded = saliency_order(np.zeros((3, 4, 4)), tie_seed=3)
    assert sorted(seeded[0].tolist()) == list(range(16)) and seeded[0].tolist() != list(range(16))
    assert np.array_equal(seeded, saliency_order(np.zeros((3, 4, 4)), tie_seed=3))


def test_batched_curves_equal_a_naive_loop_and_batch_the_forward_passes():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
                                torch.nn.Flatten(), torch.nn.Linear(16, 5)).eval()
    x = torch.randn(6, 3, 9, 7)
    maps = torch.rand(6, 9, 7)
    classes = torch.tensor([0, 4, 2, 1, 3, 0])
    baseline = torch.tensor([-1.0, 0.5, 2.0])  # per channel
    calls = []

    def score(b):
        calls.append(len(b))
        return torch.softmax(model(b), dim=1)

    K = 5
    for mode in ("deletion", "insertion"):
        calls.clear()
        got = perturbation_curve(score, x, maps, classes, mode=mode, steps=K, baseline=baseline, batch_size=16)
        assert calls == [16, 16, 4] and got.shape == (6, K + 1)  # 6 x 6 pairs in ceil(36 / 16) calls
        one_by_one = perturbation_curve(score, x, maps, classes, mode=mode, steps=K, baseline=baseline, batch_size=1)
        assert got == pytest.approx(one_by_one, abs=1e-6)  # equal up to the kernels' float rounding
        ref = np.zeros((6, K + 1))
        for i in range(6):
            order = torch.argsort(-maps[i].flatten(), stable=True)
            for k in range(K + 1):
                hit = torch.zeros(63, dtype=torch.bool)
                hit[order[: (k * 63) // K]] = True
                hit = hit.reshape(1, 9, 7)
                b = baseline.reshape(3, 1, 1).expand(3, 9, 7)
                xi = torch.where(hit, b, x[i]) if mode == "deletion" else torch.where(hit, x[i], b)
                with torch.no_grad():
                    ref[i, k] = torch.softmax(model(xi[None]), 1)[0, classes[i]]
        assert got == pytest.approx(ref, abs=1e-6)


def test_perturbation_curve_refuses_bad_input():
    x, m = torch.zeros(2, 1, 4, 4), np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match="mode"):
        perturbation_curve(_sum_score, x, m, [0, 0], mode="blur")
    with pytest.raises(ValueError, match="maps"):
        perturbation_curve(_sum_score, x, np.zeros((2, 2, 2)), [0, 0])
    with pytest.raises(ValueError, match="class 2 outside the 2 classes"):
        perturbation_curve(_sum_score, x, m, [0, 2])
    with pytest.raises(ValueError, match="baseline"):
        perturbation_curve(_sum_score, x, m, [0, 0], baseline=torch.zeros(3))
    with pytest.raises(ValueError, match="steps"):
        perturbation_curve(_sum_score, x, m, [0, 0], steps=0)


def test_curve_auc_is_the_trapezoid_on_the_unit_interval():
    assert curve_auc([[1.0, 1.0, 1.0]]).tolist() == [1.0]
    assert curve_auc(np.array([[0.0, 1.0], [1.0, 0.0]])).tolist() == [0.5, 0.5]
    assert curve_auc(np.array([[0.0, 0.5, 1.0, 0.5, 0.0]])).tolist() == pytest.approx([0.5])


# --- rank correlations -------------------------------------------------------------------------

def test_class_sensitivity_by_hand():
    top = np.array([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    bottom = np.array([[[4.0, 3.0], [2.0, 1.0]], [[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0], [3.0, 4.0]]])
    got = class_sensitivity(top, bottom)
    # reversed order: -1; ties get average ranks (1.5, 1.5, 3, 4) vs (1, 2, 3, 4): 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    assert got[:2].tolist() == pytest.approx([-1.0, 3 / math.sqrt(10)])
    assert math.isnan(got[2])  # a constant map has no ranking
    assert got[1] == pytest.approx(spearmanr(top[1].ravel(), bottom[1].ravel())[0])


def test_spearman_matches_scipy_on_random_rows():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 30)), rng.normal(size=(5, 30))
    a[:, :10] = 0.0  # some ties
    ref = [spearmanr(a[i], b[i])[0] for i in range(5)]
    assert spearman_rows(a, b) == pytest.approx(ref)


def test_randomisation_similarity_is_one_for_identical_maps_and_near_zero_for_independent_noise():
    rng = np.random.default_rng(0)
    trained = rng.random((40, 16, 16))
    rand = np.stack([trained, 3.0 * trained + 1.0, rng.random((40, 16, 16)), -trained])
    sim = randomisation_similarity(trained, rand)
    assert sim.shape == (4, 40)
    assert sim[0] == pytest.approx(1.0) and sim[1] == pytest.approx(1.0)  # ranks ignore scale and shift
    assert abs(sim[2].mean()) < 0.05 and np.abs(sim[2]).max() < 0.3    # independent noise
    assert sim[3] == pytest.approx(-1.0)
    assert randomisation_similarity(trained - 0.5, -(trained - 0.5)[None], absolute=True)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="maps_randomised"):
        randomisation_similarity(trained, rand[:, :3])
