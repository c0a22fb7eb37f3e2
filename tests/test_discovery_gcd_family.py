"""LegoGCD and ProtoGCD, the two SimGCD descendants: their core terms on hand-made cases, one tiny run each."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.discovery_helpers import TINY_CONVNET, digits_split, tiny_run


@pytest.fixture(scope="module")
def gcd_split(digits_prepared, tmp_path_factory):
    return digits_split(digits_prepared, tmp_path_factory.mktemp("split") / "gcd.json")


# --- LegoGCD ---------------------------------------------------------------------------------------

A = 0.05 * math.log(3)  # a cosine gap whose softmax at tau_o = 0.05 is [3/4, 1/4] and at tau_s = 0.1 [0.634, 0.366]


def _ler_case():
    # K = 2 clusters, cluster 0 the only known class (num_known = 1), threshold 0.6 at tau_s = 0.1:
    # row 0 unlabelled, p = softmax([ln3 / 2, 0]) = [0.634, 0.366]: confident (>= 0.6) and known -> selected
    # row 1 unlabelled, argmax = cluster 1, a novel one                                           -> not selected
    # row 2 unlabelled, p_max = sigmoid(0.2) = 0.550 < 0.6: not confident                          -> not selected
    # row 3 labelled (m_i = 1), although confident and known                                       -> not selected
    logits = torch.tensor([[A, 0.0], [0.0, A], [0.02, 0.0], [A, 0.0]])
    labelled = torch.tensor([False, False, False, True])
    return logits, labelled


def test_legogcd_ler_selects_only_unlabelled_confident_known_samples():
    from classlab.methods.discovery.legogcd import potential_known_mask

    logits, labelled = _ler_case()
    mask = potential_known_mask(logits, labelled, num_known=1, threshold=0.6, temperature=0.1)
    assert mask.tolist() == [True, False, False, False]
    # with both clusters known, row 1 qualifies too; with a threshold above 0.634, none does
    assert potential_known_mask(logits, labelled, 2, 0.6, 0.1).tolist() == [True, True, False, False]
    assert not potential_known_mask(logits, labelled, 2, 0.65, 0.1).any()


def test_legogcd_ler_value_on_a_hand_made_case():
    from classlab.methods.discovery.legogcd import local_entropy_regularisation

    logits, labelled = _ler_case()
    # only row 0 counts: target softmax(s / 0.05) = softmax([ln 3, 0]) = [3/4, 1/4].
    # prior p~ = [1/3, 2/3], margin weight 1: shifted logits [ln 3 + ln 1/3, ln 2/3] = [0, ln 2/3]
    # -> softmax [3/5, 2/5]; H = -(3/4 ln 3/5 + 1/4 ln 2/5) = 0.383119 + 0.229073 = 0.612192; mean over B = 4 rows
    prior = torch.tensor([1 / 3, 2 / 3])
    loss, selected = local_entropy_regularisation(logits, labelled, 1, prior, 0.6, 0.1, 0.05, 1.0)
    assert selected.tolist() == [True, False, False, False]
    assert float(loss) == pytest.approx(0.612192 / 4, abs=1e-5)
    # a uniform prior shifts every logit equally, so LER is the entropy of [3/4, 1/4] = 0.562335, over 4 rows
    loss, _ = local_entropy_regularisation(logits, labelled, 1, torch.tensor([0.5, 0.5]), 0.6, 0.1, 0.05, 0.4)
    assert float(loss) == pytest.approx(0.562335 / 4, abs=1e-5)
    # nothing selected: zero
    loss, _ = local_entropy_regularisation(logits, torch.ones(4, dtype=torch.bool), 1, torch.tensor([0.5, 0.5]), 0.6)
    assert float(loss) == 0.0


def test_legogcd_dkl_is_zero_for_identical_views_and_follows_eq11_direction():
    from classlab.methods.discovery.legogcd import dual_view_kl

    s = torch.randn(5, 4)
    assert float(dual_view_kl(s, s.clone(), 0.1)) == pytest.approx(0.0, abs=1e-6)
    # p = softmax([0.1 ln 3, 0] / 0.1) = [3/4, 1/4], p' = [1/2, 1/2]:
    # KL(p || p') = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.304099 - 0.173287 = 0.130812
    # KL(p' || p) = 1/2 ln(2/3) + 1/2 ln 2 = 0.143841 (not symmetric: the paper's direction is the first)
    a = torch.tensor([[0.1 * math.log(3), 0.0]], requires_grad=True)
    b = torch.tensor([[0.0, 0.0]], requires_grad=True)
    kl = dual_view_kl(a, b, 0.1)
    assert float(kl.detach()) == pytest.approx(0.130812, abs=1e-5)
    assert float(dual_view_kl(b, a, 0.1).detach()) == pytest.approx(0.143841, abs=1e-5)
    kl.backward()
    assert a.grad is not None and float(a.grad.abs().sum()) > 0
    assert b.grad is None  # Algorithm 1: the second view is the detached target
    b2 = torch.tensor([[0.0, 0.0]], requires_grad=True)
    dual_view_kl(a, b2, 0.1, detach_b=False).backward()
    assert b2.grad is not None and float(b2.grad.abs().sum()) > 0


def test_legogcd_training_step_is_pure_and_the_prior_moves_after_the_step():
    from classlab.methods.discovery.legogcd import LegoGCD
    from classlab.methods.discovery_learner import DiscoveryTask
    from classlab.models import build_classifier

    torch.manual_seed(0)
    model = build_classifier("convnet", 1, 4, img_size=8, backbone_kwargs=TINY_CONVNET)
    learner = LegoGCD(model, {"method_augment": False, "ler_threshold": 0.3, "ler_prior_momentum": 0.5}, 4)
    learner.begin_task(0, DiscoveryTask(0, 2, 4))
    x = torch.randn(6, 1, 8, 8)
    batch = {"views": [x, x + 0.01 * torch.randn_like(x)], "x": x, "y": torch.tensor([0, 1, -1, -1, -1, -1]),
             "index": torch.arange(6)}
    before = learner.class_prior.clone()
    loss, logs = learner.training_step(batch)
    assert torch.isfinite(loss) and {"dkl", "ler", "ler_selected", "distill", "memax"} <= set(logs)
    assert torch.equal(learner.class_prior, before)  # pure: nothing changes inside training_step
    loss.backward()
    assert learner.prototypes.weight.grad is not None
    learner.on_after_step(batch, logs)
    # p~ <- 0.5 p~ + 0.5 mean_i p_i: still a distribution, moved halfway towards the batch's mean prediction
    expected = 0.5 * before + 0.5 * logs["ler_batch_prior"]
    assert torch.allclose(learner.class_prior, expected) and float(learner.class_prior.sum()) == pytest.approx(1.0)


def test_legogcd_rejects_a_threshold_outside_its_range():
    from classlab.methods.discovery.legogcd import LegoGCD
    from classlab.models import build_classifier

    model = build_classifier("convnet", 1, 4, img_size=8, backbone_kwargs=TINY_CONVNET)
    with pytest.raises(ValueError, match="ler_threshold"):
        LegoGCD(model, {"ler_threshold": 1.5}, 4)


def test_legogcd_tiny_run(digits_prepared, gcd_split, tmp_path):
    out = tiny_run("legogcd", digits_prepared, gcd_split, tmp_path, overrides={"batch_size": 256})
    z = out["predictions"]
    assert len(z["pred_unlabelled_task0"]) == len(z["labels_unlabelled_task0"])
    assert z["pred_unlabelled_task0"].max() < 10 and "estimated_k_task0" not in z


# --- ProtoGCD --------------------------------------------------------------------------------------

def test_protogcd_dapl_hard_and_soft_pseudo_labels_on_a_hand_made_case():
    from classlab.methods.discovery.protogcd import dapl_targets

    q = torch.tensor([[0.7, 0.2, 0.1],    # confidence q1 / q2 = 3.5
                      [0.5, 0.4, 0.1],    # 1.25
                      [0.1, 0.1, 0.8],    # 8
                      [0.3, 0.3, 0.4]])   # 1.33
    logits = torch.log(q)  # at temperature 1 the teacher's softmax gives q back
    # r = 0.5: floor(0.5 * 4) = 2 hard labels, the two most confident rows (2, then 0); rows 1 and 3 stay soft
    targets, hard = dapl_targets(logits, 1.0, 0.5)
    assert hard.tolist() == [True, False, True, False]
    expected = torch.tensor([[1.0, 0, 0], [0.5, 0.4, 0.1], [0, 0, 1.0], [0.3, 0.3, 0.4]])
    assert torch.allclose(targets, expected, atol=1e-6)
    # r = 0.3: floor(1.2) = 1 -> only row 2; r = 0: all soft; r = 1: all one-hot
    assert dapl_targets(logits, 1.0, 0.3)[1].tolist() == [False, False, True, False]
    soft, hard = dapl_targets(logits, 1.0, 0.0)
    assert not hard.any() and torch.allclose(soft, q, atol=1e-6)
    onehot, hard = dapl_targets(logits, 1.0, 1.0)
    assert hard.all() and torch.equal(onehot.argmax(1), torch.tensor([0, 0, 2, 2]))
    # sharpening: at tau_t = 0.5 the soft rows are q^2 renormalised, e.g. row 1 -> [0.25, 0.16, 0.01] / 0.42
    soft, _ = dapl_targets(logits, 0.5, 0.0)
    assert torch.allclose(soft[1], torch.tensor([0.25, 0.16, 0.01]) / 0.42, atol=1e-6)


def test_protogcd_dapl_loss_with_all_hard_labels_is_cross_view_cross_entropy():
    import torch.nn.functional as F

    from classlab.methods.discovery.protogcd import dapl_distillation

    torch.manual_seed(1)
    s1, s2 = torch.randn(6, 5), torch.randn(6, 5)
    loss, n_hard = dapl_distillation([s1, s2], 0.05, 0.1, 1.0)
    # every pseudo-label hard: each view learns the other view's argmax by cross-entropy at tau_s
    expected = 0.5 * (F.cross_entropy(s1 / 0.1, s2.argmax(1)) + F.cross_entropy(s2 / 0.1, s1.argmax(1)))
    assert float(loss) == pytest.approx(float(expected), rel=1e-5) and int(n_hard) == 12


def test_protogcd_hard_label_ratio_ramps_like_the_official_schedule():
    from classlab.methods.discovery.protogcd import hard_label_ratio

    # np.linspace(0, 1, 5) over the first 5 epochs, then 1
    assert [hard_label_ratio(e, 5) for e in range(7)] == pytest.approx([0, 0.25, 0.5, 0.75, 1, 1, 1])
    # 2 waiting epochs at 0, then a 3-epoch ramp 0.2 -> 1
    assert [hard_label_ratio(e, 3, 0.2, 1.0, wait_epochs=2) for e in range(6)] == pytest.approx([0, 0, 0.2, 0.6, 1, 1])
    assert hard_label_ratio(0, 0) == 1.0


def test_protogcd_separation_regulariser_on_hand_made_prototypes():
    from classlab.methods.discovery.protogcd import prototype_separation

    # two orthogonal prototypes: log(mean exp(0 / tau)) = 0
    assert float(prototype_separation(torch.eye(2), 0.1)) == pytest.approx(0.0, abs=1e-6)
    # three at 120 degrees in the plane: cos = -1/2, each log(mean(exp(-5), exp(-5))) = -5
    angles = torch.tensor([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
    triangle = torch.stack([angles.cos(), angles.sin()], 1) * 3.0  # the norm does not matter
    assert float(prototype_separation(triangle, 0.1)) == pytest.approx(-5.0, abs=1e-5)
    # a gradient step on it spreads two prototypes 60 degrees apart
    w = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]], requires_grad=True)
    prototype_separation(w, 0.1).backward()
    with torch.no_grad():
        w2 = torch.nn.functional.normalize(w - 0.05 * w.grad, dim=1)
    assert float(w2[0] @ w2[1]) < 0.5


def test_protogcd_entropy_regulariser_is_zero_for_even_use_and_log_k_for_one_cluster():
    from classlab.methods.discovery.simgcd import mean_entropy_penalty

    # log K - H(mean p): four samples, one per cluster, sharply -> mean p uniform -> 0
    assert float(mean_entropy_penalty(torch.eye(4) * 10.0, 0.1)) == pytest.approx(0.0, abs=1e-6)
    # every sample sharply in cluster 0 -> mean p one-hot -> H = 0 -> log 4
    assert float(mean_entropy_penalty(torch.eye(4)[[0, 0, 0, 0]] * 10.0, 0.1)) == pytest.approx(math.log(4), abs=1e-4)


def _blobs(seed: int = 0):
    """Five tight blobs on orthogonal directions of R^8, 40 points each; classes 0-2 known with half of
    their points labelled (label index = class), classes 3-4 novel and unlabelled."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.eye(8)[c] + 0.05 * rng.standard_normal((40, 8)) for c in range(5)])
    y = np.repeat(np.arange(5), 40)
    labels = np.full(len(y), -1)
    for c in range(3):
        labels[np.flatnonzero(y == c)[:20]] = c
    return x, labels


def test_protogcd_prototype_score_estimates_k_on_well_separated_blobs():
    from classlab.methods.discovery.protogcd import estimate_num_classes_by_prototype_score, prototype_score

    x, labels = _blobs()
    k, scores = estimate_num_classes_by_prototype_score(x, labels, 3, 8, seed=0, iters=50, restarts=2)
    assert k == 5, scores
    # at the true k both parts are perfect; with too few prototypes the novel blobs fall into known classes'
    # prototypes, whose unlabelled centroids leave the labelled ones (the centroid score drops)
    right, short = prototype_score(x, labels, 5, 0), prototype_score(x, labels, 3, 0)
    assert right["accuracy"] == 1.0 and right["centroid"] > 0.99
    assert short["centroid"] < 0.95 and short["score"] < right["score"]
    with pytest.raises(ValueError, match="k_min"):
        estimate_num_classes_by_prototype_score(x, labels, 2, 8, seed=0)


def test_protogcd_tiny_run_estimates_k(digits_prepared, gcd_split, tmp_path):
    out = tiny_run("protogcd", digits_prepared, gcd_split, tmp_path, overrides={"k_max": 12, "batch_size": 256})
    z = out["predictions"]
    assert len(z["pred_unlabelled_task0"]) == len(z["labels_unlabelled_task0"])
    k = int(z["estimated_k_task0"][0])
    assert 5 <= k <= 12  # between the known classes' count and the search's upper end
