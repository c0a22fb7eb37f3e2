"""The discovery split builder: partitions, seeds, continual stages and named refusals."""
import json

import numpy as np
import pytest

from classlab.data.discovery_split import (SPLIT_KINDS, SplitError, build_discovery_split, load_discovery_split,
                                           write_discovery_split)

TRAIN = np.repeat(np.arange(10), 40)     # 10 classes x 40 samples
TEST = np.repeat(np.arange(10), 12)


def build(kind="gcd", seed=0, **kw):
    return build_discovery_split(kind, "toy", TRAIN, 10, seed, test_labels=TEST, **kw)


def classes_of(indices, labels=TRAIN):
    return set(labels[np.asarray(indices, dtype=int)].tolist())


def test_gcd_partition():
    m = build("gcd", labelled_fraction=0.5)
    known, novel = m["known_classes"], m["novel_classes"]
    assert len(known) == 5 and len(novel) == 5 and sorted(known + novel) == list(range(10))
    assert known == sorted(m["class_order"][:5]) and novel == sorted(m["class_order"][5:])
    lab, unl = set(m["labelled"]), set(m["unlabelled"])
    assert not lab & unl
    assert lab | unl == set(range(len(TRAIN)))        # gcd uses every sample
    # labelled: round(0.5 * 40) = 20 samples of each known class, none of a novel class
    counts = np.bincount(TRAIN[m["labelled"]], minlength=10)
    assert all(counts[c] == 20 for c in known) and all(counts[c] == 0 for c in novel)
    # unlabelled: the other 20 of each known class and all 40 of each novel class
    counts = np.bincount(TRAIN[m["unlabelled"]], minlength=10)
    assert all(counts[c] == 20 for c in known) and all(counts[c] == 40 for c in novel)
    assert m["test"] == list(range(len(TEST)))
    for key in ("labelled", "unlabelled", "test"):
        assert m[key] == sorted(m[key])
    assert m["params"] == {"num_novel": 5, "labelled_fraction": 0.5, "samples_per_class": 0,
                           "test_samples_per_class": 0}
    json.dumps(m)   # plain JSON types only


def test_ncd_unlabelled_is_novel_only_and_shares_the_labelled_set():
    m = build("ncd", labelled_fraction=0.3)
    assert classes_of(m["unlabelled"]) == set(m["novel_classes"])
    assert len(m["unlabelled"]) == 5 * 40
    counts = np.bincount(TRAIN[m["labelled"]], minlength=10)
    assert all(counts[c] == 12 for c in m["known_classes"])        # round(0.3 * 40) = 12
    assert classes_of(m["test"], TEST) == set(m["novel_classes"])
    assert len(m["test"]) == 5 * 12
    # the same seed labels the same samples whatever the kind
    assert m["labelled"] == build("gcd", labelled_fraction=0.3)["labelled"]


def test_num_novel_and_per_class_subsets():
    m = build("gcd", num_novel=3, samples_per_class=10, test_samples_per_class=4, labelled_fraction=0.25)
    assert len(m["novel_classes"]) == 3 and len(m["known_classes"]) == 7
    # 10 per class kept, round(0.25 * 10) = 2 labelled (half to even), the other 8 unlabelled
    assert np.all(np.bincount(TRAIN[m["labelled"]], minlength=10)[m["known_classes"]] == 2)
    unl = np.bincount(TRAIN[m["unlabelled"]], minlength=10)
    assert np.all(unl[m["known_classes"]] == 8) and np.all(unl[m["novel_classes"]] == 10)
    assert np.all(np.bincount(TEST[m["test"]], minlength=10) == 4)


def test_seed_determinism_and_difference():
    for kind in SPLIT_KINDS:
        kw = {"budget": 10, "rounds": 2} if kind == "active" else {}
        assert build(kind, seed=3, **kw) == build(kind, seed=3, **kw)
    a, b = build("gcd", seed=0), build("gcd", seed=1)
    assert a["labelled"] != b["labelled"]
    assert a["class_order"] == np.random.default_rng(0).permutation(10).tolist()


def test_continual_stages_without_recurring_novel_classes():
    # novel_first_fraction 1.0: a novel class puts every sample in the stage that brings it
    m = build("continual", stages=2, old_fraction=0.25, novel_first_fraction=1.0)
    stages = m["stages"]
    assert len(stages) == 2
    order = m["class_order"]
    # novel classes dealt in class order: 5 over 2 stages -> 3 then 2
    assert stages[0]["new_classes"] == sorted(order[5:8]) and stages[1]["new_classes"] == sorted(order[8:])
    assert stages[0]["old_classes"] == m["known_classes"]
    assert stages[1]["old_classes"] == sorted(m["known_classes"] + stages[0]["new_classes"])
    sets = [set(s["unlabelled"]) for s in stages]
    assert not sets[0] & sets[1]                                       # disjoint stages
    assert not (sets[0] | sets[1]) & set(m["labelled"])                 # labelled only in stage 0
    assert m["unlabelled"] == sorted(sets[0] | sets[1])
    # every novel sample is in exactly one stage: the stage that brings its class
    for s, stage in enumerate(stages):
        for c in stage["new_classes"]:
            idx = set(np.flatnonzero(TRAIN == c).tolist())
            assert idx <= sets[s] and not idx & sets[1 - s]
    # known classes recur in both stages, each time with round(0.25 * 20) = 5 of its 20 unlabelled samples
    for s in range(2):
        counts = np.bincount(TRAIN[stages[s]["unlabelled"]], minlength=10)
        assert all(counts[c] == 5 for c in m["known_classes"])
    assert m["params"]["stages"] == 2 and m["params"]["old_fraction"] == 0.25
    assert m["params"]["novel_first_fraction"] == 1.0


def test_continual_novel_classes_recur_with_the_rest_of_their_samples():
    m = build("continual", stages=2, old_fraction=0.25)      # novel_first_fraction: 0.8 by default
    assert m["params"]["novel_first_fraction"] == 0.8
    first, second = m["stages"]
    sets = [set(s["unlabelled"]) for s in m["stages"]]
    assert not sets[0] & sets[1] and m["unlabelled"] == sorted(sets[0] | sets[1])
    counts = [np.bincount(TRAIN[s["unlabelled"]], minlength=10) for s in m["stages"]]
    for c in first["new_classes"]:
        # round(0.8 * 40) = 32 in its own stage; its other 8 recur: round(0.25 * 8) = 2 in stage 2
        assert counts[0][c] == 32 and counts[1][c] == 2
    for c in second["new_classes"]:
        # 32 in the last stage; no later stage draws its other 8
        assert counts[1][c] == 32
    for c in m["known_classes"]:
        assert counts[0][c] == 5 and counts[1][c] == 5              # round(0.25 * 20), as before
    assert classes_of(second["unlabelled"]) == set(range(10))


def test_continual_old_classes_run_out():
    # old_fraction 0.6 of a known class's 20 unlabelled samples = 12 in stage 1, the 8 left in stage 2,
    # none in stage 3 (a class that runs out gives what is left)
    m = build("continual", stages=3, old_fraction=0.6)
    per_stage = [np.bincount(TRAIN[s["unlabelled"]], minlength=10) for s in m["stages"]]
    k = m["known_classes"][0]
    assert [int(c[k]) for c in per_stage] == [12, 8, 0]
    assert len(set().union(*[set(s["unlabelled"]) for s in m["stages"]])) == sum(len(s["unlabelled"]) for s in m["stages"])


def test_active_records_budget_and_rounds():
    m = build("active", budget=50, rounds=5)
    assert m["params"]["budget"] == 50 and m["params"]["rounds"] == 5
    gcd = build("gcd")
    assert m["labelled"] == gcd["labelled"] and m["unlabelled"] == gcd["unlabelled"]


@pytest.mark.parametrize("kind, kw, field", [
    ("clustering", {}, "kind"),
    ("gcd", {"labelled_fraction": 0.0}, "labelled_fraction"),
    ("gcd", {"labelled_fraction": 1.5}, "labelled_fraction"),
    ("gcd", {"num_novel": 0}, "num_novel"),
    ("gcd", {"num_novel": 10}, "num_novel"),
    ("gcd", {"num_novel": 12}, "num_novel"),
    ("gcd", {"labelled_fraction": 0.01}, "labelled_fraction"),             # round(0.01 * 40) = 0
    ("gcd", {"samples_per_class": 2, "labelled_fraction": 0.2}, "labelled_fraction"),  # round(0.4) = 0
    ("gcd", {"samples_per_class": -1}, "samples_per_class"),
    ("gcd", {"test_samples_per_class": -1}, "test_samples_per_class"),
    ("active", {"budget": 0, "rounds": 2}, "budget"),
    ("active", {"budget": 401, "rounds": 2}, "budget"),                   # unlabelled: 5*20 + 5*40 = 300
    ("active", {"budget": 301, "rounds": 2}, "budget"),
    ("active", {"budget": 10, "rounds": 0}, "rounds"),
    ("continual", {"stages": 0}, "stages"),
    ("continual", {"stages": 6}, "stages"),                               # only 5 novel classes
    ("continual", {"old_fraction": -0.1}, "old_fraction"),
    ("continual", {"old_fraction": 1.1}, "old_fraction"),
    ("continual", {"novel_first_fraction": 0.0}, "novel_first_fraction"),
    ("continual", {"novel_first_fraction": 1.5}, "novel_first_fraction"),
    ("continual", {"novel_first_fraction": 0.01}, "novel_first_fraction"),   # round(0.01 * 40) = 0
])
def test_bad_input_names_the_field(kind, kw, field):
    with pytest.raises(SplitError, match=rf"^discovery\.{field}: "):
        build(kind, **kw)


def test_active_budget_of_the_whole_unlabelled_set_is_allowed():
    assert len(build("active", budget=300, rounds=3)["unlabelled"]) == 300


def test_too_many_novel_classes_states_the_number_of_classes():
    with pytest.raises(SplitError, match="has 10 classes"):
        build("gcd", num_novel=11)


def test_a_known_class_without_samples_is_refused():
    labels = TRAIN[TRAIN != 3]                 # class 3 absent from the training labels
    order = np.random.default_rng(0).permutation(10).tolist()
    assert 3 in order[:5]                      # ... and known under seed 0
    with pytest.raises(SplitError, match=r"^discovery\.labelled_fraction: known class 3 has 0"):
        build_discovery_split("gcd", "toy", labels, 10, 0)


def test_a_continual_stage_with_no_samples_is_refused():
    order = np.random.default_rng(0).permutation(10).tolist()
    # stages=5: one novel class per stage; with old_fraction 0 a stage holds only its new class,
    # so removing that class's samples leaves the stage empty
    missing = order[5]
    labels = TRAIN[TRAIN != missing]
    with pytest.raises(SplitError, match=r"^discovery\.stages: stage 1 .* has no samples"):
        build_discovery_split("continual", "toy", labels, 10, 0, stages=5, old_fraction=0.0)


def test_write_and_load_round_trip(tmp_path):
    m = build("continual")
    path = tmp_path / "splits" / "toy.json"
    write_discovery_split(m, path)
    assert load_discovery_split(path) == m
    assert [p.name for p in path.parent.iterdir()] == ["toy.json"]   # no temporary left behind


def test_a_failed_build_leaves_no_file(tmp_path):
    path = tmp_path / "split.json"
    with pytest.raises(SplitError):
        write_discovery_split(build("gcd", labelled_fraction=2.0), path)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_an_invalid_manifest_is_not_written(tmp_path):
    m = build("gcd")
    m["unlabelled"] = sorted(m["unlabelled"] + m["labelled"][:1])     # a labelled sample also unlabelled
    path = tmp_path / "split.json"
    with pytest.raises(SplitError, match=r"^discovery\.unlabelled: "):
        write_discovery_split(m, path)
    assert list(tmp_path.iterdir()) == []
    active = build("active", budget=10, rounds=1)
    active["params"]["budget"] = 10_000
    with pytest.raises(SplitError, match=r"^discovery\.budget: "):
        write_discovery_split(active, path)
    assert list(tmp_path.iterdir()) == []
