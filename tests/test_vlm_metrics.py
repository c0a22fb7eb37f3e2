"""Gold tests of the vlm metrics: base / new / H and the compositional seen / unseen / H."""
import numpy as np
import pytest

from classlab.metrics.vlm import (base_new_split, base_to_novel_accuracy, harmonic_mean, seen_unseen_accuracy,
                                  subset_accuracy)


def test_base_is_the_first_half_of_the_sorted_labels():
    assert base_new_split(10) == ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9])
    assert base_new_split(5) == ([0, 1], [2, 3, 4])
    with pytest.raises(ValueError, match="at least 2 classes"):
        base_new_split(1)


def test_each_half_is_scored_among_its_own_classes_only():
    # 4 classes, base {0, 1}, new {2, 3}; the largest logit of every row is a class of the other half,
    # which must never be predicted
    logits = np.array([[1.0, 0.0, 9.0, 0.0],   # label 0: among {0, 1} -> 0, right
                       [2.0, 1.0, 0.0, 9.0],   # label 1: -> 0, wrong
                       [9.0, 0.0, 0.5, 0.0],   # label 2: among {2, 3} -> 2, right
                       [0.0, 9.0, 0.2, 0.1]])  # label 3: -> 2, wrong
    labels = np.array([0, 1, 2, 3])
    out = base_to_novel_accuracy(logits, labels, [0, 1], [2, 3])
    assert out == {"base": 0.5, "new": 0.5, "hm": 0.5}
    assert subset_accuracy(logits, labels, [0, 1, 2, 3]) == 0.0  # over every class all four are wrong
    assert np.isnan(subset_accuracy(logits, np.array([0, 0, 1, 1]), [2, 3]))


def test_harmonic_mean_gold_values():
    assert harmonic_mean(0.8, 0.6) == pytest.approx(2 * 0.48 / 1.4)
    assert harmonic_mean(0.0, 0.9) == 0.0
    assert harmonic_mean(0.0, 0.0) == 0.0


def test_seen_unseen_takes_the_argmax_over_every_pair():
    logits = np.array([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0], [0.0, 2.0, 1.0]])
    labels = np.array([0, 1, 2])
    out = seen_unseen_accuracy(logits, labels, seen=[0, 1], unseen=[2])
    assert out["seen"] == 0.5 and out["unseen"] == 0.0 and out["hm"] == 0.0


def test_the_vlm_table_and_claims_from_run_metrics(tmp_path):
    import json

    from classlab.report.vlm import vlm_claims, write_vlm_tables

    files = []
    for method, base, new in (("zeroshot", [0.80, 0.82, 0.81], [0.30, 0.32, 0.31]),
                              ("coop", [0.90, 0.91, 0.89], [0.20, 0.22, 0.21])):
        for seed in range(3):
            path = tmp_path / method / f"seed{seed}" / "metrics.json"
            path.parent.mkdir(parents=True)
            b, n = base[seed], new[seed]
            path.write_text(json.dumps({"method": method, "seed": seed, "shots": 16, "dataset": "fashion_mnist",
                                        "backbone": "convnet", "base": b, "new": n, "hm": harmonic_mean(b, n),
                                        "all_acc": 0.4, "unobserved_acc": 0.0 if method == "coop" else 0.1,
                                        "expected_sq_distance": 0.5,
                                        "image_side_saw": [0, 1, 2, 3, 4], "hparams": {"batch_size": 32}}))
            files.append(path)
    runs = write_vlm_tables(files, tmp_path / "runs.csv", tmp_path / "summary.csv", tmp_path / "summary.md")
    md = (tmp_path / "summary.md").read_text()
    assert "classes 0 1 2 3 4: the base classes only" in md and "base_to_novel/16shot/saw_base" in md and "| coop | 90.0 ± 1.0 | 21.0 ± 1.0 |" in md
    assert "| coop | 40.0 ± 0.0 | 0.0 ± 0.0 | 0.500 ± 0.000 |" in md
    claims = vlm_claims(runs).set_index("claim")
    assert claims.loc["CoOp raises base accuracy above zero-shot CLIP", "verdict"] == "holds"
    assert claims.loc["CoOp loses new-class accuracy against zero-shot CLIP", "verdict"] == "holds"


def test_the_shipped_descriptions_cover_every_class_and_a_missing_one_is_named(tmp_path):
    from classlab.config import ConfigError
    from classlab.data.descriptions import load_descriptions
    from classlab.data.registry import get_dataset

    for dataset in ("fashion_mnist", "digits"):
        names = get_dataset(dataset).class_names
        loaded = load_descriptions(dataset, names)
        assert set(loaded["generic"]) == set(names) and all(loaded["generic"].values())
        assert all(a != b for a, b in loaded["differential"])
    broken = tmp_path / "digits.yaml"
    broken.write_text("generic:\n  '0': [a zero]\n")
    with pytest.raises(ConfigError, match="no generic description of class '1'"):
        load_descriptions("digits", get_dataset("digits").class_names, broken)


def test_loki_frechet_mean_can_predict_an_unobserved_class_between_two_observed_ones():
    from classlab.metrics.vlm import (embedding_label_metric, expected_squared_distance, frechet_mean_prediction,
                                      label_metric_scores)

    # three labels on a line: 0 at 0, 1 at 1, 2 at 2; observed 0 and 2, label 1 never observed
    d = embedding_label_metric(np.array([[0.0], [1.0], [2.0]]))
    assert np.allclose(d, [[0, 1, 2], [1, 0, 1], [2, 1, 0]])
    probs = np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    # objective of y: 0.5 * d(y,0)^2 + 0.5 * d(y,2)^2 -> y=1 gives 1, y=0 or 2 give 2: the unobserved middle
    assert frechet_mean_prediction(probs, [0, 2], d).tolist() == [1, 0, 2]
    assert expected_squared_distance(np.array([1, 0, 2]), np.array([1, 1, 2]), d) == pytest.approx(1 / 3)
    logits = np.array([[0.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    out = label_metric_scores(logits, np.array([1, 1]), [0, 2], [1], d)
    assert out == {"all_acc": 0.5, "unobserved_acc": 0.5, "expected_sq_distance": 0.5}
