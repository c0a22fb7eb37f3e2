"""Hyperspherical embedding (normalised softmax, nearest prototype) and its pairwise contrastive baseline."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.discovery_helpers import digits_split, tiny_run


def test_hyperspherical_logits_ignore_the_feature_scale_and_are_bounded_by_s():
    from classlab.methods.discovery.hyperspherical import normalized_softmax_logits

    # by hand: e = (3, 0) is along w_0 = (2, 0) (cos 1), orthogonal to w_1 = (0, 5) (cos 0) and opposite
    # w_2 = (-1, 0) (cos -1); with s = 10 the logits are (10, 0, -10) whatever the norms of e and w
    e = torch.tensor([[3.0, 0.0]])
    w = torch.tensor([[2.0, 0.0], [0.0, 5.0], [-1.0, 0.0]])
    assert torch.allclose(normalized_softmax_logits(e, w, 10.0), torch.tensor([[10.0, 0.0, -10.0]]), atol=1e-6)
    # (1, 1) is at 45 degrees from w_0 and w_1: s cos 45 = 10 / sqrt 2 for both, -10 / sqrt 2 for w_2
    got = normalized_softmax_logits(torch.tensor([[1.0, 1.0]]), w, 10.0)
    assert torch.allclose(got, torch.tensor([[1.0, 1.0, -1.0]]) * 10.0 / math.sqrt(2), atol=1e-6)

    torch.manual_seed(0)
    feats, weights = torch.randn(16, 8), torch.randn(5, 8)
    base = normalized_softmax_logits(feats, weights, 4.0)
    scaled = normalized_softmax_logits(feats * (torch.rand(16, 1) * 100 + 1e-3), weights * 7.0, 4.0)
    assert torch.allclose(base, scaled, atol=1e-5)           # only directions count
    assert float(base.abs().max()) <= 4.0 + 1e-6             # |s cos| <= s
    assert float(base.abs().max()) > 1.0                     # not trivially zero


def test_pairwise_contrastive_loss_pulls_positives_and_ignores_negatives_beyond_the_margin():
    from classlab.methods.discovery.pairwise import contrastive_pair_loss

    # a = (0, 0) and b = (0, 1) share class 0; c = (3, 0) is class 1; margin m = 2.
    # (a, b): D = 1, positive: 1/2 D^2 = 0.5.  (a, c): D = 3 > m, (b, c): D = sqrt 10 > m: negatives cost 0.
    # loss = mean over positives 0.5 + mean over negatives 0 = 0.5
    e = torch.tensor([[0.0, 0.0], [0.0, 1.0], [3.0, 0.0]], requires_grad=True)
    loss, logs = contrastive_pair_loss(e, torch.tensor([0, 0, 1]), margin=2.0)
    assert float(loss.detach()) == pytest.approx(0.5) and float(logs["negative"]) == 0.0
    loss.backward()
    # d/da 1/2 |a - b|^2 = a - b = (0, -1): a gradient step moves a towards b (and b towards a); c gets none
    assert torch.allclose(e.grad, torch.tensor([[0.0, -1.0], [0.0, 1.0], [0.0, 0.0]]))

    # a negative inside the margin: a = (0, 0) class 0, d = (1, 0) class 1, m = 2: D = 1, 1/2 (m - D)^2 = 0.5,
    # and d/dd = -(m - D) (d - a) / D = (-1, 0): a gradient step pushes d away from a
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0]], requires_grad=True)
    loss, logs = contrastive_pair_loss(e, torch.tensor([0, 1]), margin=2.0)
    assert float(loss.detach()) == pytest.approx(0.5) and float(logs["positive"]) == 0.0
    loss.backward()
    assert torch.allclose(e.grad, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))


def test_hyperspherical_nearest_prototype_and_spherical_kmeans_on_hand_made_points():
    from classlab.methods.discovery.hyperspherical import nearest_prototype_scores, spherical_kmeans

    # prototypes (1, 0) and (0, 1): (5, 1) has cos 0.98 / 0.20 -> 0; (0.1, 2) has 0.05 / 1.00 -> 1;
    # (-1, 0.2) has -0.98 / 0.20 -> 1 (nearest on the circle, though its x is larger in magnitude)
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    points = torch.tensor([[5.0, 1.0], [0.1, 2.0], [-1.0, 0.2]])
    assert nearest_prototype_scores(points, protos).argmax(1).tolist() == [0, 1, 1]

    # three directions 0, 120 and 240 degrees, each point with a random norm (0.1 to 10: only the direction
    # may decide) and +-10 degrees of angular noise: spherical k-means recovers the three groups, and each
    # prototype is the unit mean direction of its group
    rng = np.random.default_rng(0)
    angles = np.concatenate([np.deg2rad(a + rng.uniform(-10, 10, 20)) for a in (0, 120, 240)])
    norms = rng.uniform(0.1, 10.0, len(angles))
    x = np.stack([np.cos(angles), np.sin(angles)], 1) * norms[:, None]
    truth = np.repeat([0, 1, 2], 20)
    assign, found, _ = spherical_kmeans(x, 3, seed=0, n_init=3)
    # a one-to-one cluster <-> group correspondence: each group lands in one cluster, all distinct
    assert len({tuple(np.unique(assign[truth == g])) for g in range(3)}) == 3
    assert all(len(np.unique(assign[truth == g])) == 1 for g in range(3))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    for c in range(3):
        mean = unit[assign == c].mean(0)
        assert np.allclose(found[c], mean / np.linalg.norm(mean), atol=1e-9)
    with pytest.raises(ValueError, match="k = 4 clusters for 3 points"):
        spherical_kmeans(x[:3], 4, seed=0)


@pytest.fixture(scope="module")
def ncd_split(digits_prepared, tmp_path_factory):
    return digits_split(digits_prepared, tmp_path_factory.mktemp("split") / "ncd.json", kind="ncd")


def _check_novel_assignments(out: dict, split_path) -> None:
    split = json.loads(split_path.read_text())
    z = out["predictions"]
    novel = len(split["novel_classes"])
    assert len(z["pred_unlabelled_task0"]) == len(split["unlabelled"])
    assert set(np.unique(z["labels_unlabelled_task0"])) == set(split["novel_classes"])
    # scores over the novel prototypes only: cluster ids 0..novel-1, and more than one of them used
    for key in ("pred_unlabelled_task0", "pred_test_task0"):
        assert z[key].min() >= 0 and z[key].max() < novel
    assert len(np.unique(z["pred_unlabelled_task0"])) > 1


def test_hyperspherical_tiny_ncd_run(digits_prepared, ncd_split, tmp_path):
    out = tiny_run("hyperspherical", digits_prepared, ncd_split, tmp_path, overrides={"n_init": 2, "embed_dim": 16})
    _check_novel_assignments(out, ncd_split)


def test_pairwise_tiny_ncd_run(digits_prepared, ncd_split, tmp_path):
    out = tiny_run("pairwise", digits_prepared, ncd_split, tmp_path, overrides={"n_init": 2, "embed_dim": 16})
    _check_novel_assignments(out, ncd_split)
