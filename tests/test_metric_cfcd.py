"""CFCD (metric family, methods `cfcd` and `cfcd_global`) and its scene-retrieval protocol: MadaCos's scale
and margin on hand cases, the fixed-margin cosine softmax it reduces to, attentive top-K selection and
mutual matching, average precision on gold cases, cfcd_global's independence from the local descriptors,
an end-to-end tiny run of both methods, and the bad inputs (nothing written)."""
import json
import math

import numpy as np
import pytest
import torch

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.data.prepare import prepare
from classlab.data.registry import get_dataset
from classlab.methods.metric.cfcd import (CFCDNet, attentive_topk, cfcd_objective, cosine_margin_softmax,
                                          local_triplet_loss, madacos_loss, madacos_scale_margin, mutual_matches)
from classlab.methods.registry import get_method
from classlab.protocols.metric_scenes import average_precision, retrieval_scores, run_metric_scenes

K_CONST, RHO = 9999999.0, 0.02
TINY_BACKBONE = {"widths": [8, 16], "pool_after": [0]}  # 24x24 digit scenes -> a 16-channel 12x12 map
TINY = {"epochs": 1, "fine_epochs": 1, "batch_size": 32, "queries": 10, "local_top_k": 8, "tuples_per_batch": 4}


# --- MadaCos ----------------------------------------------------------------------------------------

def _cosface_by_hand(cos, labels, s, m):
    total = 0.0
    for row, y in zip(cos, labels):
        target = math.exp(s * (row[y] - m))
        others = sum(math.exp(s * c) for j, c in enumerate(row) if j != y)
        total += -math.log(target / (target + others))
    return total / len(cos)


def test_madacos_scale_and_margin_follow_the_median_rule_on_a_hand_case():
    cos = [[0.8, 0.1, 0.0], [0.5, 0.2, 0.3], [0.3, 0.6, 0.1]]
    labels = [0, 0, 1]
    stats = madacos_scale_margin(torch.tensor(cos), torch.tensor(labels), RHO, 32.0, K_CONST)
    # target cosines 0.8, 0.5, 0.6: the median 0.6 is held by sample 2
    assert float(stats["median"]) == pytest.approx(0.6) and int(stats["index"]) == 2
    s = math.log(K_CONST * (1 - RHO) / RHO) / (1 - 0.6)  # = 50.02 > the floor 32
    b = math.exp(s * 0.3) + math.exp(s * 0.1)  # sample 2's non-target classes 0 and 2
    m = 0.6 - math.log(b * RHO / (1 - RHO)) / s
    assert float(stats["scale"]) == pytest.approx(s, rel=1e-5) and s > 32
    assert float(stats["margin"]) == pytest.approx(m, rel=1e-4) and m > 0
    # the rule's purpose: the median sample's target probability is rho
    p = math.exp(s * (0.6 - m)) / (math.exp(s * (0.6 - m)) + b)
    assert p == pytest.approx(RHO, rel=1e-4)
    loss, out = madacos_loss(torch.tensor(cos), torch.tensor(labels), RHO, 32.0, K_CONST)
    assert float(loss) == pytest.approx(_cosface_by_hand(cos, labels, s, m), rel=1e-4)


def test_madacos_floors_the_scale_and_clamps_a_negative_margin_to_zero():
    # median 0.1: log(K (1 - rho) / rho) / 0.9 = 22.2 < 32, so s = 32; the non-targets at 0.9 make
    # 0.1 - log(B rho / (1 - rho)) / 32 negative, so m = 0
    stats = madacos_scale_margin(torch.tensor([[0.1, 0.9, 0.9]]), torch.tensor([0]), RHO, 32.0, K_CONST)
    assert float(stats["scale"]) == pytest.approx(32.0)
    raw = 0.1 - (math.log(2) + 32 * 0.9 + math.log(RHO / (1 - RHO))) / 32
    assert raw < 0 and float(stats["margin"]) == 0.0


def test_madacos_with_the_adaptation_frozen_is_the_fixed_margin_cosine_softmax():
    torch.manual_seed(0)
    cos = torch.rand(6, 4) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    frozen, stats = madacos_loss(cos, labels, RHO, 32.0, K_CONST, adaptive=False, fixed_scale=30.0, fixed_margin=0.35)
    assert float(stats["scale"]) == 30.0 and float(stats["margin"]) == pytest.approx(0.35)
    assert float(frozen) == pytest.approx(_cosface_by_hand(cos.tolist(), labels.tolist(), 30.0, 0.35), rel=1e-5)
    # the adaptive loss is that same softmax at the batch's (s, m), which the gradient treats as constants
    cos.requires_grad_(True)
    adaptive, st = madacos_loss(cos, labels, RHO, 32.0, K_CONST)
    fixed = cosine_margin_softmax(cos, labels, float(st["scale"]), float(st["margin"]))
    assert float(adaptive.detach()) == pytest.approx(float(fixed.detach()), rel=1e-6)
    g1, = torch.autograd.grad(adaptive, cos)
    g2, = torch.autograd.grad(fixed, cos)
    assert torch.allclose(g1, g2, atol=1e-6)


# --- attentive local descriptors --------------------------------------------------------------------

def test_attentive_topk_picks_the_highest_attention_locations():
    fmap = torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3, 3)
    attention = torch.tensor([[[0.1, 5.0, 0.2], [0.3, 0.0, 9.0], [4.0, 0.4, 0.5]],
                              [[7.0, 0.0, 0.0], [0.0, 8.0, 0.0], [0.0, 0.0, 6.0]]])
    desc, loc = attentive_topk(fmap, attention, 3)
    assert loc.tolist() == [[5, 1, 6], [4, 0, 8]]  # flat positions, highest attention first
    for b in range(2):
        for j, u in enumerate(loc[b].tolist()):
            assert torch.equal(desc[b, j], fmap[b, :, u // 3, u % 3])
    with pytest.raises(ValueError, match="local_top_k"):
        attentive_topk(fmap, attention, 10)


def test_the_attention_map_is_the_l1_norm_of_each_local_descriptor():
    from classlab.models.backbones import build_backbone

    torch.manual_seed(0)
    net = CFCDNet(build_backbone("convnet", 1, False, 24, **TINY_BACKBONE), 8, 3.0).eval()
    x = torch.randn(2, 1, 24, 24)
    g, fmap, attention = net(x)
    assert g.shape == (2, 8) and fmap.shape == (2, 16, 12, 12)
    assert torch.allclose(attention, fmap.abs().sum(1))


def test_mutual_matches_keep_reciprocal_pairs_that_pass_the_ratio_test():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    p = torch.tensor([[0.0, 1.0], [1.0, 0.05]])
    qi, pi = mutual_matches(q, p, 0.9)
    assert sorted(zip(qi.tolist(), pi.tolist())) == [(0, 1), (1, 0)]
    # a positive descriptor halfway between two query descriptors fails Lowe's test
    qi, pi = mutual_matches(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.5, 0.5]]), 0.9)
    assert len(qi) == 0


def test_the_local_triplet_loss_is_the_hinge_over_matches_and_nearest_negatives():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    n = torch.tensor([[0.8, 0.6], [-1.0, 0.0]])  # the nearest to both anchors is (0.8, 0.6)
    loss, matches = local_triplet_loss(a, p, [n], margin=0.5, ratio=0.9)
    assert matches == 2
    # |a - p|^2 = 0; |(1,0) - (0.8,0.6)|^2 = 0.4; |(0,1) - (0.8,0.6)|^2 = 0.8 -> [0.1]_+ + [-0.3]_+
    assert float(loss) == pytest.approx(0.1, abs=1e-6)


# --- cfcd_global ignores the local descriptors -------------------------------------------------------

def test_cfcd_global_does_not_depend_on_the_local_descriptors_and_cfcd_does():
    torch.manual_seed(0)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])
    g = torch.randn(8, 6)
    cos = torch.nn.functional.normalize(g, dim=1) @ torch.nn.functional.normalize(torch.randn(3, 6), dim=1).t()
    maps = [torch.rand(8, 5, 4, 4) for _ in range(2)]
    losses = {}
    for method in ("cfcd", "cfcd_global"):
        hp = resolve_checked_hparams("metric", method, {"local_top_k": 6})
        losses[method] = [float(cfcd_objective(cos, labels, g, fmap, fmap.abs().sum(1), hp, fine=True)[0])
                          for fmap in maps]
    assert losses["cfcd_global"][0] == losses["cfcd_global"][1]
    assert losses["cfcd"][0] != losses["cfcd"][1]
    # and the global-only loss is MadaCos itself
    hp = resolve_checked_hparams("metric", "cfcd_global", {})
    assert hp["local_weight"] == 0 and losses["cfcd_global"][0] == pytest.approx(
        float(madacos_loss(cos, labels, hp["madacos_rho"], hp["madacos_scale_floor"], hp["madacos_k"])[0]))
    assert get_method("metric", "cfcd_global").__mro__[1] is get_method("metric", "cfcd")


# --- average precision --------------------------------------------------------------------------------

def test_average_precision_gold_cases():
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 1, 0, 0]) == 1.0
    assert average_precision([0.9, 0.8, 0.7, 0.6], [0, 0, 0, 1]) == pytest.approx(0.25)
    assert average_precision([0.1, 0.4, 0.3, 0.2], [1, 0, 0, 1]) == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert math.isnan(average_precision([0.5, 0.4], [0, 0]))
    from sklearn.metrics import average_precision_score

    rng = np.random.default_rng(0)
    scores, rel = rng.random(50), rng.random(50) < 0.3  # no ties: sklearn's AP is the same sum
    assert average_precision(scores, rel) == pytest.approx(average_precision_score(rel, scores))


def test_retrieval_scores_on_a_hand_made_database():
    q = np.array([[1.0, 0.0], [0.0, 1.0]])
    db = np.array([[0.9, 0.1], [0.1, 0.9], [0.8, 0.2]])
    out, _ = retrieval_scores(q, np.array([0, 1]), db / np.linalg.norm(db, axis=1, keepdims=True), np.array([0, 1, 1]))
    # query 0 ranks db 0 (rel), 2, 1: AP 1; query 1 ranks db 1 (rel), 2 (rel), 0: AP 1
    assert out["map"] == 1.0 and out["recall_at_1"] == 1.0 and out["precision_at_1"] == 1.0
    assert out["n_queries"] == 2 and out["n_database"] == 3


# --- the protocol: a tiny run and the bad inputs ------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("cfcd_data")
    get_dataset("digits_scenes").download(root / "raw")
    prepare("digits_scenes", root / "raw", root / "scenes", seed=0, recipe={"n_train": 150, "n_test": 40})
    prepare("digits", root / "raw", root / "plain", seed=0)
    return root


@pytest.mark.parametrize("method", ["cfcd", "cfcd_global"])
def test_end_to_end_tiny_run_writes_metrics_and_retrieval_examples(digits, tmp_path, method):
    out = tmp_path / method
    metrics = run_metric_scenes(method, digits / "scenes", 0, out, overrides=TINY, backbone_kwargs=TINY_BACKBONE,
                                threads=1)
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("protocol", "method", "seed", "dataset", "map", "val_map", "precision_at_1", "precision_at_5",
                "precision_at_10", "recall_at_1", "recall_at_5", "n_queries", "n_database", "val_recall_at_1",
                "train_steps", "train_seconds", "history", "madacos_trace", "hparams", "fingerprint", "provenance"):
        assert key in saved, key
    assert saved["protocol"] == "metric_scenes" and saved["method"] == method and saved["dataset"] == "digits_scenes"
    assert saved["n_queries"] == 10 and saved["n_database"] == 30 and 0 < saved["map"] <= 1
    assert saved["train_steps"] == 8  # (150 - 15 val) scenes, batches of 32 (last dropped): 4 per stage, 2 stages
    assert [row["stage"] for row in saved["history"]] == ["coarse", "fine"]
    assert ("local_loss" in saved["madacos_trace"][-1]) == (method == "cfcd")
    examples = json.loads((out / "retrieval_examples.json").read_text())["examples"]
    assert len(examples) == 8 and all(len(e["top"]) == 5 for e in examples)
    assert all(e["query"] not in e["top"] for e in examples)
    assert not list(out.glob("last_*.pt")) and metrics["map"] == saved["map"]


@pytest.mark.parametrize("overrides, data, field", [
    ({"queries": 0}, "scenes", "queries"),                # no queries
    ({"queries": 40}, "scenes", "queries"),               # the whole test split: an empty database
    ({"local_top_k": 0}, "scenes", "local_top_k"),
    ({"local_top_k": 145}, "scenes", "local_top_k"),      # more than the 12x12 map's locations
    ({}, "plain", "data_dir"),                            # not a scenes dataset
])
def test_bad_input_is_refused_before_anything_is_written(digits, tmp_path, overrides, data, field):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=field):
        run_metric_scenes("cfcd", digits / data, 0, out, overrides={**TINY, **overrides}, backbone_kwargs=TINY_BACKBONE)
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("backbone, kwargs", [("deep_mlp", {"depth": 2, "width": 8}), ("no_such_net", {})])
def test_a_backbone_without_a_spatial_map_is_refused(digits, tmp_path, backbone, kwargs):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="backbone"):
        run_metric_scenes("cfcd", digits / "scenes", 0, out, overrides=TINY, backbone=backbone, backbone_kwargs=kwargs)
    assert not out.exists()
