"""ASPL (Lin et al., TPAMI 2018) and its baselines: the closed-form self-paced weights, the pace, the
pseudo-labels and the queries on hand-built probabilities, the budget accounting, and the pool-based
protocol end to end for ``aspl``, ``active_only`` and ``random_queries`` on tiny digits runs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.methods.registry import get_method
from classlab.methods.single_paper.aspl import pace, pseudo_labels, select_queries, spl_weights, uncertainty
from classlab.models import build_classifier
from classlab.protocols.aspl import labels_to_reach, normalised_auc, query_schedule, run_aspl

METHODS = ("aspl", "active_only", "random_queries")
# a tiny, fast run: 2 labels per class, two rounds of 10 queries, 5 steps a round
TINY = {"initial_per_class": 2, "queries_per_round": 10, "query_budget": 20, "train_steps": 5, "batch_size": 32,
        "backbone_kwargs": {"depth": 1, "width": 32, "init": "he"}}


# --- the self-paced weights and the pace ------------------------------------------------------------
def test_hard_spl_weights_are_one_iff_the_loss_is_below_lambda():
    losses = torch.tensor([0.1, 0.5, 0.9, 0.3, 0.4])
    # v_i* = argmin_{v in [0,1]} v l_i - lambda v = 1[l_i < lambda]; l_i = lambda is not admitted
    assert spl_weights(losses, 0.4, "hard").tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]
    # linear regulariser lambda (v^2/2 - v): v_i* = max(0, 1 - l_i / lambda)
    assert spl_weights(losses, 0.4, "linear").tolist() == pytest.approx([0.75, 0.0, 0.0, 0.25, 0.0])
    # each is the minimiser of its objective over a fine grid of v
    grid = torch.linspace(0, 1, 10001)
    for l in (0.1, 0.3, 0.5):
        lin = grid * l + 0.4 * (grid ** 2 / 2 - grid)
        assert float(grid[lin.argmin()]) == pytest.approx(float(spl_weights(torch.tensor([l]), 0.4, "linear")), abs=1e-3)
        hard = grid * l - 0.4 * grid
        assert float(grid[hard.argmin()]) == float(spl_weights(torch.tensor([l]), 0.4, "hard"))
    with pytest.raises(ValueError, match="spl_regularizer"):
        spl_weights(losses, 0.4, "typo")


def test_the_pace_grows_each_round():
    assert [pace(t, 0.05, 0.02) for t in (1, 2, 3, 6)] == pytest.approx([0.05, 0.07, 0.09, 0.15])
    assert pace(4, 0.1, 0.0) == pytest.approx(0.1)


# --- pseudo-labels ----------------------------------------------------------------------------------
def test_pseudo_labels_only_above_the_confidence_threshold_and_never_for_queried_samples():
    probs = torch.tensor([[0.99, 0.005, 0.005],   # confident, class 0
                          [0.05, 0.90, 0.05],     # below the threshold
                          [0.20, 0.20, 0.60],     # uncertain
                          [0.01, 0.01, 0.98],     # confident but queried this round
                          [0.002, 0.996, 0.002]])  # confident, class 1
    lam = -math.log(0.95)  # v_i = 1 iff -log max_k p_ik < lambda iff max_k p_ik > 0.95
    exclude = torch.tensor([False, False, False, True, False])
    labels, weights = pseudo_labels(probs, lam, "hard", exclude)
    assert labels.tolist() == [0, 1, 2, 2, 1]
    assert weights.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
    _, unexcluded = pseudo_labels(probs, lam, "hard")
    assert unexcluded.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]
    # a larger pace admits less confident samples
    _, later = pseudo_labels(probs, -math.log(0.85), "hard", exclude)
    assert later.tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    # linear weights fall with the loss and vanish at lambda
    _, soft = pseudo_labels(probs, lam, "linear", exclude)
    assert float(soft[0]) == pytest.approx(1 - (-math.log(0.99)) / lam) and float(soft[1]) == 0.0


def test_the_per_class_cap_keeps_the_most_confident_of_each_pseudo_class():
    probs = torch.tensor([[0.97, 0.03], [0.995, 0.005], [0.99, 0.01], [0.02, 0.98], [0.4, 0.6]])
    labels, weights = pseudo_labels(probs, 1.0, "hard", cap_per_class=2)
    # class 0 has three admissible rows (0, 1, 2): the two lowest losses (rows 1 and 2) stay
    assert weights.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]
    exclude = torch.tensor([False, True, False, False, False])
    _, weights = pseudo_labels(probs, 1.0, "hard", exclude, cap_per_class=2)
    assert weights.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0]  # a queried row takes no slot


# --- queries ----------------------------------------------------------------------------------------
def test_uncertainty_queries_pick_the_least_confident_samples():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25], [0.6, 0.3, 0.1], [0.34, 0.33, 0.33],
                          [0.5, 0.49, 0.01]])
    gen = torch.Generator().manual_seed(0)
    # max probabilities 0.9, 0.4, 0.6, 0.34, 0.5: the two least confident are rows 3 and 1
    assert select_queries(probs, 2, "least_confidence", gen).tolist() == [1, 3]
    # margins 0.85, 0.05, 0.3, 0.01, 0.01: rows 3 and 4 (ties broken by row order)
    assert select_queries(probs, 2, "margin", gen).tolist() == [3, 4]
    entropy = uncertainty(probs, "entropy")
    assert int(entropy.argmax()) == 3 and int(entropy.argmin()) == 0
    assert select_queries(probs, 0, "least_confidence", gen).tolist() == []


def test_random_queries_are_a_seeded_random_subset():
    probs = torch.softmax(torch.randn(200, 5, generator=torch.Generator().manual_seed(1)), dim=1)
    pick = lambda s: select_queries(probs, 20, "random", torch.Generator().manual_seed(s)).tolist()  # noqa: E731
    first = pick(3)
    assert first == pick(3) and first != pick(4)
    assert len(set(first)) == 20 and all(0 <= i < 200 for i in first)
    # not the uncertainty choice
    assert first != select_queries(probs, 20, "least_confidence", torch.Generator()).tolist()


def test_the_variants_differ_from_aspl_only_in_their_options():
    aspl, active, rand = (resolve_checked_hparams("single_paper", m) for m in METHODS)
    assert aspl["pseudo_label"] and aspl["query_strategy"] == "least_confidence"
    assert not active["pseudo_label"] and active["query_strategy"] == "least_confidence"
    assert not rand["pseudo_label"] and rand["query_strategy"] == "random"
    strip = lambda hp: {k: v for k, v in hp.items() if k not in ("pseudo_label", "query_strategy")}  # noqa: E731
    assert strip(aspl) == strip(active) == strip(rand)
    probs = torch.tensor([[0.999, 0.001], [0.6, 0.4]])
    for name, hp in zip(METHODS, (aspl, active, rand)):
        cls = get_method("single_paper", name)
        assert "active" in cls.scenario_kinds
        learner = cls(build_classifier("deep_mlp", 1, 2, img_size=2, backbone_kwargs={"depth": 1, "width": 4}), hp, 2)
        made = learner.pseudo_labels(probs, 1, num_labelled=10)
        if name == "aspl":
            assert made[1].tolist() == [1.0, 0.0] and made[2] == pytest.approx(hp["spl_lambda"])
        else:
            assert made is None


def test_training_step_is_the_v_weighted_cross_entropy():
    hp = resolve_checked_hparams("single_paper", "aspl")
    torch.manual_seed(0)
    learner = get_method("single_paper", "aspl")(
        build_classifier("deep_mlp", 1, 3, img_size=2, backbone_kwargs={"depth": 1, "width": 4}), hp, 3)
    learner.set_sample_weights(torch.tensor([1.0, 0.0, 0.5, 1.0, 0.25]))
    batch = {"x": torch.randn(3, 1, 2, 2), "y": torch.tensor([0, 2, 1]), "index": torch.tensor([4, 1, 2])}
    loss, _ = learner.training_step(batch)
    ce = F.cross_entropy(learner.model(batch["x"]), batch["y"], reduction="none")
    assert float(loss.detach()) == pytest.approx(float((torch.tensor([0.25, 0.0, 0.5]) * ce.detach()).mean()), rel=1e-5)


# --- budget accounting and the curve's summaries -------------------------------------------------------
def test_query_schedule_spends_exactly_the_budget():
    assert query_schedule(250, 100) == [100, 100, 50]
    assert query_schedule(200, 100) == [100, 100]
    assert query_schedule(0, 100) == []
    assert sum(query_schedule(7, 3)) == 7


def test_labels_to_target_and_the_normalised_area():
    x, acc = [100, 200, 300, 400], [0.5, 0.7, 0.69, 0.8]
    assert labels_to_reach(x, acc, 0.7) == 200 and labels_to_reach(x, acc, 0.8) == 400
    assert labels_to_reach(x, acc, 0.81) is None
    # trapezoid: (0.6 + 0.695 + 0.745) * 100 / 300
    assert normalised_auc(x, acc) == pytest.approx((0.6 + 0.695 + 0.745) / 3)
    assert normalised_auc([100], [0.4]) == pytest.approx(0.4)


# --- the protocol end to end -----------------------------------------------------------------------------
KEYS = {"protocol", "method", "seed", "dataset", "curve_labels", "curve_queried", "curve_val_acc", "curve_test_acc",
        "curve_pseudo_count", "curve_pseudo_acc", "curve_lambda", "final_test_acc", "final_val_acc", "test_auc",
        "val_auc", "labels_to_target", "val_labels_to_target", "target_accuracy", "pseudo_count_total",
        "pseudo_acc_overall", "queried_total", "query_order", "initial_indices", "hparams", "fingerprint",
        "train_seconds", "provenance"}


@pytest.mark.parametrize("method", ["aspl", "active_only"])
def test_protocol_end_to_end(digits_prepared, tmp_path, method):
    overrides = dict(TINY)
    if method == "aspl":
        overrides.update({"spl_lambda": 5.0, "pseudo_per_labelled": 2.0})  # admit pseudo-labels on a tiny model
    out = tmp_path / method
    metrics = run_aspl(method, digits_prepared, 0, out, overrides=overrides, threads=1)
    saved = json.loads((out / "metrics.json").read_text())
    assert KEYS <= set(saved) and saved["protocol"] == "aspl" and saved["method"] == method
    assert not (out / "last.pt").exists()
    # budget accounting: 20 initial labels, then +10 per round; never more queries than the budget
    assert saved["curve_labels"] == [20, 30, 40] and saved["curve_queried"] == [0, 10, 20]
    assert saved["queried_total"] == 20 <= TINY["query_budget"]
    order, initial = saved["query_order"], saved["initial_indices"]
    assert len(order) == len(set(order)) == 20 and not set(order) & set(initial) and len(initial) == 20
    assert len(saved["curve_val_acc"]) == len(saved["curve_test_acc"]) == 3
    assert all(0.0 <= a <= 1.0 for a in saved["curve_test_acc"] + saved["curve_val_acc"])
    assert saved["final_test_acc"] == saved["curve_test_acc"][-1]
    if method == "active_only":
        assert saved["curve_pseudo_count"] == [0, 0, 0] and saved["pseudo_acc_overall"] is None
    else:
        # pseudo-labels start at round 1, at most 2 per oracle label per class (cap = ceil(2 * |L| / 10))
        counts = saved["curve_pseudo_count"]
        assert counts[0] == 0 and 0 < counts[1] <= 10 * math.ceil(2 * 30 / 10) and counts[2] <= 10 * 8
        assert saved["curve_lambda"][1:] == pytest.approx([5.0, 5.0 + saved["hparams"]["spl_lambda_step"]])
    assert metrics["labels_to_target"] == saved["labels_to_target"]


def test_the_same_seed_gives_every_method_the_same_initial_set(digits_prepared, tmp_path):
    runs = [run_aspl(m, digits_prepared, 1, tmp_path / m, overrides={**TINY, "query_budget": 10}, threads=1)
            for m in ("active_only", "random_queries")]
    assert runs[0]["initial_indices"] == runs[1]["initial_indices"]
    assert runs[0]["curve_test_acc"][0] == runs[1]["curve_test_acc"][0]  # round 0 is the same training
    assert runs[0]["query_order"] != runs[1]["query_order"]


@pytest.mark.parametrize("field,overrides", [
    ("query_budget", {"query_budget": 100000}),
    ("queries_per_round", {"queries_per_round": 0}),
    ("initial_per_class", {"initial_per_class": 1000}),
    ("spl_regularizer", {"spl_regularizer": "soft"}),
])
def test_bad_input_is_named_and_nothing_is_written(digits_prepared, tmp_path, field, overrides):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=field):
        run_aspl("aspl", digits_prepared, 0, out, overrides={**TINY, **overrides}, threads=1)
    assert not out.exists()
