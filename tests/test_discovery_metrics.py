"""Gold tests for the category-discovery metrics: hand-made cases with answers derived by hand,
a brute-force reference for the matching, and scikit-learn for NMI / ARI."""
import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from classlab.metrics.discovery import (class_number_error, cluster_accuracy, cluster_mapping, clustering_scores,
                                        matched_confusion, split_cluster_accuracy, split_cluster_accuracy_balanced,
                                        split_cluster_accuracy_v1)


def test_a_permutation_of_the_labels_scores_one():
    # clusters 2, 0, 1 hold exactly classes 0, 1, 2: the matching undoes the permutation
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([2, 2, 0, 0, 1, 1])
    assert cluster_accuracy(y_true, y_pred) == 1.0
    assert cluster_mapping(y_true, y_pred) == {2: 0, 0: 1, 1: 2}
    scores = clustering_scores(y_true, y_pred, old_classes=[0])
    for key in ("acc_all", "acc_old", "acc_new", "v1_all", "v1_old", "v1_new",
                "balanced_all", "balanced_old", "balanced_new", "nmi", "ari"):
        assert scores[key] == pytest.approx(1.0), key
    assert scores["num_clusters"] == 3 and scores["num_classes"] == 3


def test_v1_and_v2_differ_when_old_and_new_share_a_cluster():
    # old class 0 (4 samples) and new class 1 (2 samples) all fall into cluster 7.
    # v2, one matching over all: cluster 7 holds 4 of class 0 and 2 of class 1, so it goes to
    #   class 0; all = 4/6, old = 4/4 = 1, new = 0/2 = 0.
    # v1, one matching per subset: within the old samples cluster 7 -> class 0 (4/4 = 1); within
    #   the new samples the same cluster 7 -> class 1 (2/2 = 1); all = 4/6 * 1 + 2/6 * 1 = 1.
    y_true = np.array([0, 0, 0, 0, 1, 1])
    y_pred = np.full(6, 7)
    v2 = split_cluster_accuracy(y_true, y_pred, old_classes=[0])
    assert v2["all"] == pytest.approx(4 / 6) and v2["old"] == 1.0 and v2["new"] == 0.0
    v1 = split_cluster_accuracy_v1(y_true, y_pred, old_classes=[0])
    assert v1 == {"all": 1.0, "old": 1.0, "new": 1.0}
    scores = clustering_scores(y_true, y_pred, [0])
    assert scores["acc_new"] == 0.0 and scores["v1_new"] == 1.0


def test_v1_weights_the_subsets_by_their_sample_share():
    # old classes {0, 1}: 4 samples, new class 2: 2 samples.
    # y_pred: class 0 -> clusters [0, 0], class 1 -> [0, 1], class 2 -> [1, 1].
    # v1 old subset: counts cl0: c0 2, c1 1; cl1: c1 1 -> 0->0, 1->1: 3/4 right.
    # v1 new subset: cluster 1 holds both class-2 samples: 2/2.  all = 4/6 * 3/4 + 2/6 * 1 = 5/6.
    # v2: cl0: c0 2, c1 1; cl1: c1 1, c2 2. Best: 0->0 (2) + 1->2 (2) = 4 (0->1, 1->2 gives 3);
    #   all = 4/6, old = 2/4 (class 1 gets no cluster), new = 2/2.
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 1])
    v1 = split_cluster_accuracy_v1(y_true, y_pred, [0, 1])
    assert v1["old"] == pytest.approx(0.75) and v1["new"] == 1.0 and v1["all"] == pytest.approx(5 / 6)
    v2 = split_cluster_accuracy(y_true, y_pred, [0, 1])
    assert v2 == pytest.approx({"all": 4 / 6, "old": 0.5, "new": 1.0})


def test_more_clusters_than_classes_leave_clusters_unmatched():
    # y_true 0 0 0 1 1 1, y_pred 0 0 1 2 2 3. Counts: cl0: c0 2; cl1: c0 1; cl2: c1 2; cl3: c1 1.
    # Best one-to-one: 0->0 and 2->1, 4 of 6 right; clusters 1 and 3 have no class, so their
    # samples (one of each class) are wrong.
    y_true = np.array([0, 0, 0, 1, 1, 1])
    y_pred = np.array([0, 0, 1, 2, 2, 3])
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    assert cluster_mapping(y_true, y_pred) == {0: 0, 2: 1}
    # rows: true classes; columns: matched class 0, 1, then "unmatched cluster"
    conf = matched_confusion(y_true, y_pred, num_classes=2)
    np.testing.assert_array_equal(conf, [[2, 0, 1], [0, 2, 1]])
    scores = clustering_scores(y_true, y_pred, [0])
    assert scores["num_clusters"] == 4 and scores["num_classes"] == 2
    assert scores["acc_old"] == pytest.approx(2 / 3) and scores["acc_new"] == pytest.approx(2 / 3)


def test_fewer_clusters_than_classes():
    # everything in one cluster: it is matched to the largest class (3 of 5 samples)
    y_true = np.array([2, 2, 2, 5, 9])
    assert cluster_accuracy(y_true, np.zeros(5, int)) == pytest.approx(3 / 5)
    assert cluster_mapping(y_true, np.zeros(5, int)) == {0: 2}


def test_balanced_differs_from_v2_on_an_imbalanced_case():
    # old classes {0, 1}: class 0 has 6 samples (all in cluster 0), class 1 has 2 (one in cluster
    # 0, one in cluster 1); new class 2 has 2 (both in cluster 2).
    # Matching 0->0, 1->1, 2->2 gets 6 + 1 + 2 = 9 of 10 (any other map loses class 0's six).
    # v2:       all 9/10, old (6 + 1)/8 = 0.875, new 2/2 = 1.
    # balanced: per class 6/6, 1/2, 2/2 -> all (1 + .5 + 1)/3 = 5/6, old (1 + .5)/2 = .75, new 1.
    y_true = np.array([0] * 6 + [1, 1] + [2, 2])
    y_pred = np.array([0] * 6 + [1, 0] + [2, 2])
    v2 = split_cluster_accuracy(y_true, y_pred, [0, 1])
    assert v2 == pytest.approx({"all": 0.9, "old": 0.875, "new": 1.0})
    balanced = split_cluster_accuracy_balanced(y_true, y_pred, [0, 1])
    assert balanced == pytest.approx({"all": 5 / 6, "old": 0.75, "new": 1.0})


def test_empty_subsets_give_nan_not_an_error():
    y_true = np.array([0, 0, 1])
    y_pred = np.array([1, 1, 0])
    no_old = clustering_scores(y_true, y_pred, old_classes=[])
    assert math.isnan(no_old["acc_old"]) and math.isnan(no_old["v1_old"]) and math.isnan(no_old["balanced_old"])
    assert no_old["acc_new"] == 1.0 and no_old["v1_all"] == 1.0 and no_old["balanced_new"] == 1.0
    no_new = clustering_scores(y_true, y_pred, old_classes=[0, 1])
    assert math.isnan(no_new["acc_new"]) and math.isnan(no_new["v1_new"]) and math.isnan(no_new["balanced_new"])
    assert no_new["v1_all"] == 1.0


def _brute_force_accuracy(y_true, y_pred):
    # every one-to-one map from clusters to classes, padded with "no class" (None)
    clusters, classes = sorted(set(y_pred)), sorted(set(y_true))
    targets = classes + [None] * len(clusters)
    best = 0
    for perm in itertools.permutations(targets, len(clusters)):
        m = dict(zip(clusters, perm))
        best = max(best, sum(m[p] == t for t, p in zip(y_true, y_pred)))
    return best / len(y_true)


@pytest.mark.parametrize("seed", range(6))
def test_matching_is_the_best_one_to_one_map(seed):
    rng = np.random.default_rng(seed)
    n_classes, n_clusters = rng.integers(2, 5), rng.integers(2, 6)
    y_true = rng.integers(0, n_classes, 30)
    y_pred = rng.integers(0, n_clusters, 30) * 3 + 1   # arbitrary cluster ids
    assert cluster_accuracy(y_true, y_pred) == pytest.approx(_brute_force_accuracy(y_true.tolist(), y_pred.tolist()))
    # the mapping is one-to-one and reproduces the accuracy
    mapping = cluster_mapping(y_true, y_pred)
    assert len(set(mapping.values())) == len(mapping)
    hits = np.array([mapping.get(int(p)) == t for t, p in zip(y_true, y_pred)])
    assert hits.mean() == pytest.approx(cluster_accuracy(y_true, y_pred))
    # v1 never falls below v2: each subset's own optimum is at least the shared matching
    assert split_cluster_accuracy_v1(y_true, y_pred, [0])["all"] >= split_cluster_accuracy(y_true, y_pred, [0])["all"] - 1e-12


def test_nmi_and_ari_are_sklearns():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 5, 200)
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 7, 200))
    scores = clustering_scores(y_true, y_pred, [0, 1])
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred))
    assert scores["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred))
    assert 0 < scores["ari"] < scores["acc_all"] <= 1


def test_matched_confusion_rows_sum_to_class_counts():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 100)
    y_pred = rng.integers(0, 6, 100)
    conf = matched_confusion(y_true, y_pred, num_classes=5)   # class 4 has no sample
    assert conf.shape == (5, 6)
    np.testing.assert_array_equal(conf.sum(axis=1), np.bincount(y_true, minlength=5))
    # the diagonal counts exactly the samples the matching gets right
    assert np.trace(conf[:, :5]) == round(cluster_accuracy(y_true, y_pred) * 100)


def test_class_number_error_and_bad_input():
    assert class_number_error(7, 10) == 3 and class_number_error(12, 10) == 2 and class_number_error(10, 10) == 0
    with pytest.raises(ValueError, match="k_estimated"):
        class_number_error(-1, 10)
    with pytest.raises(ValueError, match="y_pred"):
        cluster_accuracy([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="y_true"):
        matched_confusion([0, 3], [0, 1], num_classes=3)
