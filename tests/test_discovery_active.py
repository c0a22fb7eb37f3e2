"""Active discovery: AGCD's query scores (novelty, informativeness, diversity), its stable label mapping,
and one tiny run each of agcd and its random-query baseline."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from tests.discovery_helpers import TINY_CONVNET, digits_split, tiny_run


def _learner(num_clusters: int = 4, num_known: int = 2, **hparams):
    """An AGCD learner on a tiny ConvNet, past begin_task(0) with ``num_known`` known classes."""
    from classlab.config import method_defaults
    from classlab.methods.discovery.agcd import AGCD
    from classlab.methods.discovery_learner import DiscoveryTask
    from classlab.models import build_classifier

    hp = method_defaults("discovery", "agcd")
    hp.update(hparams)
    model = build_classifier("convnet", 1, num_clusters, img_size=8, backbone_kwargs=TINY_CONVNET)
    learner = AGCD(model, hp, num_clusters)
    learner.begin_task(0, DiscoveryTask(0, num_known, num_clusters, kind="active"))
    return learner


def _context(scores: torch.Tensor, unlabelled: list[int], visible: list[int], task_id: int):
    from classlab.methods.discovery_learner import DiscoveryContext

    vis = torch.tensor(visible, dtype=torch.long)
    return DiscoveryContext(task_id, torch.nonzero(vis >= 0).flatten(), torch.tensor(unlabelled), vis,
                            embed=lambda pos: torch.zeros(len(pos), 2), scores=lambda pos: scores[pos],
                            device=torch.device("cpu"))


def test_agcd_informativeness_is_the_top2_margin_and_novelty_the_predicted_cluster():
    from classlab.methods.discovery.agcd import adaptive_order, novelty_mask, top2_margin

    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.25, 0.35, 0.4]])
    # by hand: 0.5 - 0.3 = 0.2; 0.8 - 0.1 = 0.7; 0.4 - 0.35 = 0.05
    assert torch.allclose(top2_margin(probs), torch.tensor([0.2, 0.7, 0.05]))
    # one known class (index 0): rows predicted into 0 are not novel, into 2 are
    assert novelty_mask(probs, 1).tolist() == [False, True, True]
    # adaptive: round 1 < adaptive_round 2 takes the confident first (largest margin: rows 1, 0, 2),
    # round 2 onward the uncertain first (smallest margin: rows 2, 0, 1)
    m = top2_margin(probs)
    assert adaptive_order(m, 1, 2).tolist() == [1, 0, 2]
    assert adaptive_order(m, 2, 2).tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="probs"):
        top2_margin(torch.ones(3, 1))


def test_agcd_adaptive_novel_selection_combines_novelty_margin_and_clusters():
    from classlab.methods.discovery.agcd import adaptive_novel_selection

    # K = 4 clusters, k = 2 known (0, 1); novel clusters 2 and 3
    probs = torch.tensor([[0.40, 0.35, 0.15, 0.10],   # row 0: known cluster 0, margin 0.05 (the most uncertain)
                          [0.05, 0.05, 0.50, 0.40],   # row 1: cluster 2, margin 0.10
                          [0.05, 0.05, 0.80, 0.10],   # row 2: cluster 2, margin 0.70
                          [0.10, 0.10, 0.20, 0.60],   # row 3: cluster 3, margin 0.40
                          [0.05, 0.05, 0.20, 0.70]])  # row 4: cluster 3, margin 0.50
    # round 2 (uncertain first): row 0 is the most uncertain but predicted known, so it is no candidate;
    # one per novel cluster: cluster 2's most uncertain is row 1, cluster 3's row 3; row 1 ranks first
    assert adaptive_novel_selection(probs, 2, 2, round_index=2, adaptive_round=2).tolist() == [1, 3]
    # round 1 (confident first): cluster 2 gives row 2 (0.70), cluster 3 row 4 (0.50)
    assert adaptive_novel_selection(probs, 2, 2, round_index=1, adaptive_round=2).tolist() == [2, 4]
    # a budget past the 4 novel candidates takes the known-predicted row last
    assert adaptive_novel_selection(probs, 2, 5, round_index=2, adaptive_round=2).tolist() == [1, 3, 4, 2, 0]


def test_agcd_diversity_skips_a_near_duplicate_for_another_cluster():
    learner = _learner(num_clusters=4, num_known=2)
    tau = learner.tau_s
    # cosine scores of 6 train positions; position 0 is labelled, position 5 was revealed in round 1
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.0],
                           [0.0, 0.0, 0.90, 0.50],     # 1 and 2: near-duplicates in novel cluster 2, the
                           [0.0, 0.0, 0.90, 0.5001],   #   most confident novel samples
                           [0.0, 0.0, 0.30, 0.40],     # 3: novel cluster 3, much less confident
                           [0.5, 0.0, 0.0, 0.0],       # 4: predicted known cluster 0
                           [0.0, 0.0, 0.0, 0.95]])     # 5: already labelled (visible label 3): never again
    ctx = _context(scores, [1, 2, 3, 4, 5], [0, -1, -1, -1, -1, 3], task_id=0)  # round 1: confident first
    probs = torch.softmax(scores / tau, 1)
    margins = probs.topk(2, 1).values[:, 0] - probs.topk(2, 1).values[:, 1]
    assert margins[1] > margins[3] and margins[2] > margins[3]  # by margin alone, 1 and 2 would be the pair
    picked = learner.select_queries(ctx, 2)
    # one per novel cluster: row 1 (its margin a hair above its duplicate's) and row 3
    assert sorted(picked.tolist()) == [1, 3]
    random_learner = _learner(num_clusters=4, num_known=2, query_strategy="random")
    drawn = random_learner.select_queries(ctx, 4)
    assert sorted(drawn.tolist()) == [1, 2, 3, 4]  # the random baseline draws from the same hidden pool


def test_agcd_stable_mapping_gives_a_revealed_class_the_cluster_its_queries_fall_in():
    learner = _learner(num_clusters=5, num_known=2)
    eye = torch.eye(5) * 0.9  # cosine scores peaked at one cluster each
    # queried positions 1..5: class 7 predicted into clusters 4, 4, 3; class 9 into 3, 3
    scores = torch.zeros(7, 5)
    for pos, cluster in zip([1, 2, 3, 4, 5], [4, 4, 3, 3, 3]):
        scores[pos] = eye[cluster]
    queried, classes = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([7, 7, 7, 9, 9])
    ctx = _context(scores, [1, 2, 3, 4, 5, 6], [0, -1, -1, -1, -1, -1, -1], task_id=0)
    # by hand, over free indices {2, 3, 4}: 7->4, 9->3 agrees on 2 + 2 = 4 queries; any other map on fewer.
    # The default (next free indices in class order) would give 7->2, 9->3 and pull class 7 out of cluster 4.
    assert learner.map_revealed([7, 9], 2, ctx, queried, classes) == {7: 4, 9: 3}
    # index 4 already held by a class revealed earlier (position 6 carries its label): the matching is
    # global, not greedy: 7->3, 9->2 agrees on 1; 7->2, 9->3 on 0 + 2 = 2, so class 9 keeps cluster 3
    ctx = _context(scores, [1, 2, 3, 4, 5, 6], [0, -1, -1, -1, -1, -1, 4], task_id=1)
    assert learner.map_revealed([7, 9], 3, ctx, queried, classes) == {7: 2, 9: 3}


def test_agcd_stable_mapping_breaks_ties_by_probability_and_names_a_short_head():
    from classlab.methods.discovery.agcd import stable_label_mapping

    # class 8's three queries all fall into known cluster 0; of the free clusters 2 and 3, cluster 3 has
    # the larger probability for each of them, so 8 -> 3
    probs = torch.tensor([[0.6, 0.1, 0.1, 0.2]] * 3)
    assert stable_label_mapping(probs, torch.tensor([8, 8, 8]), [8], taken={0, 1}) == {8: 3}
    with pytest.raises(ValueError, match="num_clusters"):
        stable_label_mapping(probs[:2], torch.tensor([8, 9]), [8, 9], taken={0, 1, 2})


@pytest.fixture(scope="module")
def active_split(digits_prepared, tmp_path_factory):
    return digits_split(digits_prepared, tmp_path_factory.mktemp("active") / "active.json", kind="active",
                        budget=20, rounds=2)


def test_agcd_tiny_run_queries_novel_clusters_and_maps_classes_stably(digits_prepared, active_split, tmp_path):
    out = tiny_run("agcd", digits_prepared, active_split, tmp_path, overrides={"batch_size": 256})  # few steps
    split = json.loads(active_split.read_text())
    z = out["predictions"]
    known, num_clusters = len(split["known_classes"]), out["meta"]["num_clusters"]
    pool = np.array(split["unlabelled"])
    q1, q2 = z["queries_round1"], z["queries_round2"]
    assert len(q1) == len(q2) == 10 and len(set(q1) | set(q2)) == 20 and set(q1) <= set(pool)
    # round 1 queried from the model after task 0, whose assignments of the pool were saved
    pred0 = dict(zip(pool.tolist(), z["pred_unlabelled_task0"].tolist()))
    novel_candidates = {c: sum(1 for p in pred0.values() if p == c) for c in range(known, num_clusters)}
    picked = [pred0[int(i)] for i in q1]
    if sum(novel_candidates.values()) >= 10:
        assert all(c >= known for c in picked)  # novelty
        # diversity: every novel cluster with a candidate is queried, none more than its share once all have it
        assert set(picked) == {c for c, n in novel_candidates.items() if n}
    # stable mapping: revealed classes take distinct free head indices, the known ones are never reused
    maps = [{int(a): int(b) for a, b in z[f"label_map_round{r}"]} for r in (1, 2)]
    indices = list(maps[0].values()) + list(maps[1].values())
    assert len(set(indices)) == len(indices) and all(known <= j < num_clusters for j in indices)
    # and the round-1 map agrees with the queries' clusters as well as any one-to-one map can
    labels = dict(zip(pool.tolist(), z["labels_unlabelled_task0"].tolist()))
    revealed = sorted(maps[0])
    counts = np.zeros((len(revealed), num_clusters - known))
    for i in q1:
        if labels[int(i)] in maps[0] and pred0[int(i)] >= known:
            counts[revealed.index(labels[int(i)]), pred0[int(i)] - known] += 1
    rows, cols = linear_sum_assignment(counts, maximize=True)
    best = counts[rows, cols].sum()
    assert sum(counts[revealed.index(c), j - known] for c, j in maps[0].items()) == best


def test_agcd_random_tiny_run_draws_uniformly_at_the_same_budget(digits_prepared, active_split, tmp_path):
    # no training step (epochs 0): the class and its training are agcd's, run above; this run checks the
    # queries and the mapping of the baseline through the protocol
    out = tiny_run("agcd_random", digits_prepared, active_split, tmp_path, overrides={"epochs": 0})
    split = json.loads(active_split.read_text())
    z = out["predictions"]
    # round 1: the base learner's seeded uniform draw from the whole pool (seed 0, task 0)
    pool = torch.tensor(split["unlabelled"])
    gen = torch.Generator().manual_seed(0 * 7919 + 0)
    expected = pool[torch.randperm(len(pool), generator=gen)[:10]]
    assert z["queries_round1"].tolist() == expected.tolist()
    assert len(z["queries_round2"]) == 10 and not set(z["queries_round1"]) & set(z["queries_round2"])
    indices = [int(b) for r in (1, 2) for _, b in z[f"label_map_round{r}"]]
    assert len(set(indices)) == len(indices) and all(j >= len(split["known_classes"]) for j in indices)
