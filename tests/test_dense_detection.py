"""The dense family's detection half: COCO AP by pycocotools (gold values computed by hand), the
shared query-based detector (Hungarian matching, losses, detect) and its two classifications,
``class_head`` (linear head over all classes) and ``cq_dino`` (category queries, top-K selection)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml

from classlab.config import METHOD_CONFIGS, ConfigError
from classlab.methods.dense_detector import DETECTOR_KEYS, focal_class_cost, hungarian_match, spatial_prior
from classlab.methods.dense_learner import DenseTargets
from classlab.methods.registry import get_method
from classlab.metrics.detection import coco_ap
from classlab.models import build_classifier

torch.set_num_threads(1)

BUDGET_KEYS = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule", "warmup_frac", "grad_clip")
SHAPE = (3, 24, 24)
NUM_CLASSES = 6
TINY = {"d_model": 16, "heads": 2, "ffn_dim": 32, "num_queries": 6, "encoder_layers": 1, "decoder_layers": 2,
        "category_dim": 16, "selection_heads": 2, "selection_ffn_dim": 32, "top_k": 3,
        "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.0, "grad_clip": 0.0}


# --- COCO AP (classlab.metrics.detection) ---------------------------------------------------------
def _gt(boxes_per_image, labels_per_image):
    k = max(len(b) for b in boxes_per_image)
    boxes = np.full((len(boxes_per_image), k, 4), -1.0)
    labels = np.full((len(boxes_per_image), k), -1, dtype=np.int64)
    for i, (b, lab) in enumerate(zip(boxes_per_image, labels_per_image)):
        boxes[i, :len(b)] = b
        labels[i, :len(lab)] = lab
    return boxes, labels


def _det(boxes, scores, labels):
    return {"boxes": np.asarray(boxes, dtype=np.float64).reshape(-1, 4), "scores": np.asarray(scores, dtype=np.float64),
            "labels": np.asarray(labels, dtype=np.int64)}


def test_perfect_detections_score_one_for_every_class_and_band():
    boxes, labels = _gt([[[0, 0, 10, 12], [20, 20, 30, 28]], [[5, 5, 15, 25]], [[1, 2, 9, 9], [40, 0, 50, 8]]],
                        [[0, 1], [2], [0, 1]])
    dets = [_det(b[lab >= 0], np.ones(int((lab >= 0).sum())), lab[lab >= 0]) for b, lab in zip(boxes, labels)]
    bands = {"rare": [2], "common": [1, 3], "frequent": [0]}
    out = coco_ap(boxes, labels, dets, num_classes=4, bands=bands)
    assert out["ap"] == pytest.approx(1.0) and out["ap50"] == pytest.approx(1.0) and out["ap75"] == pytest.approx(1.0)
    assert out["per_class_ap"][:3] == pytest.approx([1.0, 1.0, 1.0])
    assert math.isnan(out["per_class_ap"][3])  # class 3 has no ground truth
    for band in ("rare", "common", "frequent"):
        assert out[f"ap_{band}"] == pytest.approx(1.0), band  # class 3's NaN is left out of "common"


def test_a_box_of_iou_058_counts_at_the_two_lowest_thresholds_only():
    boxes, labels = _gt([[[0, 0, 10, 10]]], [[0]])
    # IoU = (10 x 5.8) / (10 x 10) = 0.58: a match at IoU .50 and .55, a miss at .60 ... .95
    out = coco_ap(boxes, labels, [_det([[0, 0, 10, 5.8]], [0.9], [0])], num_classes=1)
    assert out["ap"] == pytest.approx(2 / 10)
    assert out["ap50"] == pytest.approx(1.0) and out["ap75"] == pytest.approx(0.0)


def test_a_false_positive_ranked_first_halves_precision():
    boxes, labels = _gt([[[0, 0, 10, 10]]], [[0]])
    # ranked: FP (0.9), TP (0.8): precision 1/2 at recall 1; COCO's envelope gives 1/2 at every recall
    dets = [_det([[50, 50, 60, 60], [0, 0, 10, 10]], [0.9, 0.8], [0, 0])]
    assert coco_ap(boxes, labels, dets, num_classes=1)["ap"] == pytest.approx(0.5)
    # two objects; ranked TP, FP, TP: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; envelope 1, 2/3, 2/3;
    # of the 101 recall thresholds, 0 .. 0.50 (51) read 1 and 0.51 .. 1 (50) read 2/3
    boxes, labels = _gt([[[0, 0, 10, 10], [20, 20, 30, 30]]], [[0, 0]])
    dets = [_det([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])]
    assert coco_ap(boxes, labels, dets, num_classes=1)["ap"] == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_no_detections_score_zero_not_a_crash():
    boxes, labels = _gt([[[0, 0, 10, 10]], [[5, 5, 9, 9]]], [[0], [1]])
    empty = [_det(np.zeros((0, 4)), [], []) for _ in range(2)]
    out = coco_ap(boxes, labels, empty, num_classes=3, bands={"rare": [0], "common": [1], "frequent": [2]})
    assert out["ap"] == 0.0 and out["per_class_ap"][:2] == [0.0, 0.0] and math.isnan(out["per_class_ap"][2])
    assert out["ap_rare"] == 0.0 and math.isnan(out["ap_frequent"])
    flat = {"image_id": np.zeros(0), "boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}
    assert coco_ap(boxes, labels, flat, num_classes=3)["ap"] == 0.0


def test_flat_detections_agree_with_per_image_ones():
    boxes, labels = _gt([[[0, 0, 10, 10], [20, 0, 30, 10]], [[5, 5, 15, 15]]], [[0, 1], [1]])
    per_image = [_det([[0, 0, 10, 9], [21, 0, 30, 10]], [0.8, 0.6], [0, 1]), _det([[5, 6, 15, 15]], [0.7], [0])]
    flat = {"image_id": np.array([0, 0, 1]), "boxes": np.concatenate([d["boxes"] for d in per_image]),
            "scores": np.array([0.8, 0.6, 0.7]), "labels": np.array([0, 1, 0])}
    a, b = coco_ap(boxes, labels, per_image, 2), coco_ap(boxes, labels, flat, 2)
    assert a["ap"] == pytest.approx(b["ap"]) and 0 < a["ap"] < 1


def test_mismatched_inputs_are_refused_naming_the_argument():
    boxes, labels = _gt([[[0, 0, 10, 10]]], [[0]])
    with pytest.raises(ValueError, match="detections"):
        coco_ap(boxes, labels, [], num_classes=1)  # no entry for the one image
    with pytest.raises(ValueError, match="detections"):
        coco_ap(boxes, labels, [_det([[0, 0, 1, 1]], [0.5, 0.4], [0])], num_classes=1)
    with pytest.raises(ValueError, match="gt_labels"):
        coco_ap(boxes, labels[:, :0], [_det(np.zeros((0, 4)), [], [])], num_classes=1)


# --- the shared detector ---------------------------------------------------------------------------
def test_hungarian_matching_finds_the_least_cost_assignment():
    cost = torch.tensor([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
    rows, cols = hungarian_match(cost)
    assert dict(zip(rows.tolist(), cols.tolist())) == {0: 1, 1: 0, 2: 2}  # 1 + 2 + 2 = 5, the minimum
    # more predictions than objects: each object gets the prediction that costs least overall
    rows, cols = hungarian_match(torch.tensor([[5.0, 9.0], [1.0, 8.0], [7.0, 2.0], [6.0, 6.0]]))
    assert sorted(zip(cols.tolist(), rows.tolist())) == [(0, 1), (1, 2)]
    assert len(hungarian_match(torch.zeros(4, 0))[0]) == 0


def test_focal_matching_cost_at_probability_one_half():
    # p = 0.5: alpha (1-p)^2 log 2 - (1-alpha) p^2 log 2 = (0.25 - 0.75) * 0.25 * log 2
    cost = focal_class_cost(torch.zeros(2, 3), torch.tensor([1]), alpha=0.25, gamma=2.0)
    assert cost.shape == (2, 1)
    assert cost[0, 0].item() == pytest.approx(-0.5 * 0.25 * math.log(2), rel=1e-5)


def test_spatial_prior_is_a_gaussian_around_the_reference_box():
    ref = torch.tensor([[[0.5, 0.5, 0.2, 0.4]]])  # (B=1, Q=1, cx cy w h)
    centres = torch.tensor([[0.5, 0.5], [0.6, 0.5], [0.5, 0.7]])
    bias = spatial_prior(ref, centres, heads=2, min_size=0.01)
    assert bias.shape == (2, 1, 3)  # (B * heads, Q, tokens)
    # head 0: sigma = 0.5 * (w/2, h/2) = (0.05, 0.1); one step of 2 sigma in x or in y costs 0.5 * 2^2 = 2
    assert bias[0, 0].tolist() == pytest.approx([0.0, -2.0, -2.0])
    # head 1: sigma = (0.1, 0.2): the same steps are one sigma, 0.5
    assert bias[1, 0].tolist() == pytest.approx([0.0, -0.5, -0.5])


def _learner(name, seed=0, **overrides):
    torch.manual_seed(seed)
    model = build_classifier("convnet", 3, NUM_CLASSES, img_size=SHAPE[1],
                             backbone_kwargs={"widths": [8, 16], "pool_after": [0]})
    hp = {**TINY, **overrides}
    if name == "class_head":
        hp = {k: v for k, v in hp.items() if k not in ("category_dim", "selection_heads", "selection_ffn_dim", "top_k")}
    learner = get_method("dense", name)(model, hp, NUM_CLASSES, image_shape=SHAPE)
    boxes = torch.tensor([[[0, 0, 8, 8], [8, 8, 16, 15], [-1, -1, -1, -1]],
                          [[16, 0, 24, 7], [-1, -1, -1, -1], [-1, -1, -1, -1]],
                          [[0, 16, 7, 24], [16, 16, 24, 24], [8, 0, 15, 8]],
                          [[8, 8, 16, 16], [-1, -1, -1, -1], [-1, -1, -1, -1]]], dtype=torch.float32)
    labels = torch.tensor([[0, 3, -1], [5, -1, -1], [1, 2, 4], [3, -1, -1]])
    learner.set_targets(DenseTargets(boxes, labels, torch.zeros(4, SHAPE[1], SHAPE[2], dtype=torch.long)))
    return learner


def _batch():
    g = torch.Generator().manual_seed(1)
    return {"x": torch.randn(4, *SHAPE, generator=g), "index": torch.arange(4), "y": torch.zeros(4, dtype=torch.long)}


def test_class_head_and_cq_dino_share_the_detector():
    head, cq = _learner("class_head"), _learner("cq_dino")
    assert head.task == cq.task == "detection"
    own_head = {k for k in head.state_dict() if k.startswith("class_head.")}
    assert own_head == {"class_head.weight", "class_head.bias"}
    assert set(head.state_dict()) - own_head <= set(cq.state_dict())  # the whole detector, same names
    for key in set(head.state_dict()) - own_head:
        assert head.state_dict()[key].shape == cq.state_dict()[key].shape
    # the YAMLs: identical budget and detector keys (a fair comparison)
    specs = [yaml.safe_load((METHOD_CONFIGS / "dense" / f"{m}.yaml").read_text())["hparams"]
             for m in ("class_head", "cq_dino")]
    for key in (*BUDGET_KEYS, *DETECTOR_KEYS):
        assert key in specs[0] and specs[0][key] == specs[1][key], key


def test_loss_is_invariant_to_the_order_of_the_objects():
    learner = _learner("class_head")
    out = learner.forward_detector(_batch()["x"])
    targets = learner.targets
    perm = torch.tensor([2, 0, 1])
    shuffled = DenseTargets(targets.boxes[:, perm], targets.labels[:, perm], targets.semantic)
    a, _ = learner.detection_loss(out, targets)
    b, _ = learner.detection_loss(out, shuffled)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["class_head", "cq_dino"])
def test_training_on_a_tiny_batch_lowers_the_loss(name):
    # DETR-style losses are not monotone over the first steps (the matching and the encoder's selected
    # proposals change as the scores move), so compare the start with the mean of the last 5 of 30 steps
    learner = _learner(name)
    learner.train()
    batch = _batch()
    optimizer = learner.configure_optimizer()
    losses = []
    for _ in range(30):
        loss, logs = learner.training_step(batch)
        assert torch.isfinite(loss)
        losses.append(loss.item())
        learner.optimizer_step(loss, optimizer, None)
    assert sum(losses[-5:]) / 5 < 0.95 * losses[0]
    assert {"loss_class", "loss_l1", "loss_giou"} <= set(logs)


@pytest.mark.parametrize("name", ["class_head", "cq_dino"])
def test_detect_returns_pixel_boxes_inside_the_image(name):
    learner = _learner(name, detections_per_image=10).eval()
    dets = learner.detect(_batch()["x"])
    assert len(dets) == 4
    for det in dets:
        boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
        assert 0 < len(scores) <= 10 and boxes.shape == (len(scores), 4) and labels.dtype == torch.int64
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= SHAPE[2]).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 3] <= SHAPE[1]).all() and (boxes[:, 2] >= boxes[:, 0]).all()
        assert (boxes[:, 3] >= boxes[:, 1]).all() and boxes.max() > 1.5  # pixels, not fractions
        assert ((scores > 0) & (scores <= 1)).all() and (scores[:-1] >= scores[1:]).all()
        assert ((labels >= 0) & (labels < NUM_CLASSES)).all()


# --- cq_dino ---------------------------------------------------------------------------------------
def test_cq_dino_keeps_exactly_k_categories_and_scores_the_others_zero():
    learner = _learner("cq_dino").eval()
    x = _batch()["x"]
    with torch.no_grad():
        context = learner.image_context(learner.features(x))
        mask = context["class_mask"]
        assert mask.shape == (4, NUM_CLASSES) and (mask.sum(dim=1) == 3).all()
        # the kept ones are the K highest presence scores
        top = context["presence_logits"].topk(3, dim=1).indices
        assert torch.equal(mask, torch.zeros_like(mask).scatter_(1, top, True))
        dets = learner.detect(x)
    for det, keep in zip(dets, mask):
        assert keep[det["labels"]].all()  # an unselected category is never detected (score 0)
    with torch.no_grad():
        out = learner.forward_detector(x)
    scores = out["layers"][-1]["logits"].sigmoid() * out["context"]["class_mask"][:, None, :]
    assert (scores[~mask[:, None, :].expand_as(scores)] == 0).all()


def test_cq_dino_gradients_reach_the_category_queries_through_both_losses():
    learner = _learner("cq_dino").train()
    batch = _batch()
    targets = learner.batch_targets(batch)
    out = learner.forward_detector(batch["x"])
    det_loss, _ = learner.detection_loss(out, targets)
    det_loss.backward(retain_graph=True)
    assert learner.category_queries.grad.abs().sum() > 0  # through the contrastive classification (Eq. 5)
    assert learner.presence_head.weight.grad is None  # the selection itself is not differentiable
    learner.zero_grad()
    sel_loss, logs = learner.extra_loss(out["context"], targets)
    sel_loss.backward()
    assert learner.category_queries.grad.abs().sum() > 0 and learner.presence_head.weight.grad.abs().sum() > 0
    assert 0.0 <= logs["selection_recall"] <= 1.0


def test_cq_dino_selection_loss_is_the_weighted_per_image_bce_sum():
    learner = _learner("cq_dino", selection_loss_weight=0.2)
    presence = torch.zeros(4, NUM_CLASSES)  # p = 1/2 everywhere: BCE = log 2 per class
    context = {"presence_logits": presence, "class_mask": torch.ones(4, NUM_CLASSES, dtype=torch.bool)}
    loss, logs = learner.extra_loss(context, learner.targets)
    assert loss.item() == pytest.approx(0.2 * NUM_CLASSES * math.log(2), rel=1e-5)
    assert logs["selection_recall"] == pytest.approx(1.0)


def test_asymmetric_selection_loss_against_hand_values():
    from classlab.methods.dense.cq_dino import asymmetric_loss

    logits = torch.tensor([[0.0, math.log(1 / 3), 2.0]], requires_grad=True)  # p = 1/2, 1/4, 0.881
    labels = torch.tensor([[1.0, 0.0, 0.0]])
    # no focusing, no clip: binary cross-entropy
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    assert torch.allclose(asymmetric_loss(logits, labels, 0.0, 0.0, 0.0), bce)
    # clip 0.3: the negative at p = 1/4 <= 0.3 costs nothing (and gets no gradient);
    # the one at p = 0.881 costs -log(1 - (0.881 - 0.3)) weighted by (0.881 - 0.3)^2 (gamma- = 2)
    loss = asymmetric_loss(logits, labels, 0.0, 2.0, 0.3)
    p = torch.sigmoid(torch.tensor(2.0)).item()
    assert loss[0, 1].item() == pytest.approx(0.0, abs=1e-7)
    assert loss[0, 2].item() == pytest.approx(-(p - 0.3) ** 2 * math.log(1 - (p - 0.3)), rel=1e-5)
    assert loss[0, 0].item() == pytest.approx(math.log(2), rel=1e-5)  # gamma+ = 0: the positive's BCE
    loss.sum().backward()
    assert logits.grad[0, 1].item() == 0.0 and logits.grad[0, 2].item() > 0


def test_cq_dino_does_not_force_ground_truth_categories_into_the_selection():
    # official code: an object whose class is not among the top K has no positive anywhere
    learner = _learner("cq_dino")
    out = learner.forward_detector(_batch()["x"])
    mask = out["context"]["class_mask"]
    targets = learner.targets
    missed = [(i, int(c)) for i in range(4) for c in targets.labels[i] if c >= 0 and not mask[i, c]]
    assert missed, "the random start should miss some ground-truth category"
    objects = learner.normalised_targets(targets)
    num = float(sum(len(lab) for _, lab in objects))
    terms = learner.set_loss(out["layers"][-1], objects, mask, num)
    # what the class term would be with every missed object's positive dropped (the mask is all it needs)
    from torchvision.ops import sigmoid_focal_loss
    logits = out["layers"][-1]["logits"].float()
    indices = learner.match(logits, out["layers"][-1]["boxes"].float(), objects, mask)
    onehot = torch.zeros_like(logits)
    for i, ((rows, cols), (_, labels)) in enumerate(zip(indices, objects)):
        keep = mask[i, labels[cols]]
        onehot[i, rows[keep], labels[cols][keep]] = 1.0
    expected = (sigmoid_focal_loss(torch.where(mask[:, None], logits, 0.0), onehot, 0.25, 2.0, "none")
                * mask[:, None].float()).sum() / num
    assert terms["class"].item() == pytest.approx(expected.item(), rel=1e-5)
    # and the selection never looks at the targets: the same mask whatever the labels
    with torch.no_grad():
        again = learner.image_context(learner.features(_batch()["x"]))["class_mask"]
    assert torch.equal(again, mask)


def test_bad_hyperparameters_are_refused_naming_the_field():
    with pytest.raises(ConfigError, match="top_k"):
        _learner("cq_dino", top_k=0)
    with pytest.raises(ConfigError, match="d_model"):
        _learner("class_head", d_model=18, heads=4)
