"""The ssl family's evaluation (classlab.protocols.ssl_probe) and the segmentation metrics
(classlab.metrics.segmentation): gold values by hand, the probes end to end on tiny data (the backbone
stays frozen), the config's ssl groups, and bad input rejected with the field named and nothing written."""
import copy

import numpy as np
import pytest
import torch

from pathlib import Path

import yaml

from classlab.config import ConfigError, validate_config
from classlab.data.prepare import prepare
from classlab.data.registry import get_dataset
from classlab.metrics.segmentation import (mean_over, per_class_f1, per_class_iou, pixel_confusion,
                                           segmentation_summary)
from classlab.protocols.ssl_probe import (frozen_features, linear_probe, probe_settings, run_probe,
                                          run_segmentation_probe, weighted_knn_predict)
from classlab.train import load_model, train

SMALL_SCENES = {"colors": ["red", "green"], "n_train": 60, "n_val": 20, "n_test": 30, "imbalance_ratio": 5.0,
                "k_min": 2, "k_max": 3, "rare_max": 5, "common_max": 20}
TINY_CONVNET = {"widths": [8, 8], "pool_after": [0]}


# --- segmentation metrics: gold values --------------------------------------------------------------

def test_confusion_iou_f1_by_hand():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])
    conf = pixel_confusion(pred, target, 4)
    # the ignored pixel (255) counts nowhere; class 3 is neither labelled nor predicted
    assert conf.sum() == 7
    assert conf.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    iou = per_class_iou(conf)
    # class 0: TP 1, FP 1 (a 2 predicted 0), FN 1 -> 1/3; class 1: TP 3, FP 1 -> 3/4; class 2: TP 1, FN 1 -> 1/2
    assert iou[:3] == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert np.isnan(iou[3])
    f1 = per_class_f1(conf)
    assert f1[:3] == pytest.approx([2 / 4, 6 / 7, 2 / 3])
    summary = segmentation_summary(conf)
    assert summary["miou"] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert summary["miou_objects"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert summary["pixel_accuracy"] == pytest.approx(5 / 7)
    assert mean_over(iou, [3]) != mean_over(iou, [3])  # NaN: no labelled class left


def test_confusion_rejects_out_of_range_labels_and_shape_mismatch():
    with pytest.raises(ValueError, match="label outside"):
        pixel_confusion(torch.zeros(4), torch.tensor([0, 1, 5, 0]), 3)
    with pytest.raises(ValueError, match="predicted pixels"):
        pixel_confusion(torch.zeros(3), torch.zeros(4), 3)


def test_a_perfect_prediction_scores_one():
    target = torch.randint(0, 5, (3, 7, 7), generator=torch.Generator().manual_seed(0))
    s = segmentation_summary(pixel_confusion(target, target, 5))
    assert s["miou"] == pytest.approx(1.0) and s["pixel_accuracy"] == 1.0 and s["mean_f1"] == pytest.approx(1.0)


# --- the image probes by hand -----------------------------------------------------------------------

def test_weighted_knn_votes_by_exp_similarity_over_temperature():
    train_f = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.2, 0.8]])
    train_y = torch.tensor([0, 0, 1, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    # k = 5: three class-1 votes of low similarity against two close class-0 votes
    assert weighted_knn_predict(train_f, train_y, query, 2, k=5, temperature=0.07).item() == 0
    # a huge temperature makes every vote weigh 1: the majority (class 1) wins
    assert weighted_knn_predict(train_f, train_y, query, 2, k=5, temperature=1e6).item() == 1
    # k = 1 is the nearest neighbour
    assert weighted_knn_predict(train_f, train_y, torch.tensor([[0.05, 1.0]]), 2, k=1).item() == 1


def test_linear_probe_chooses_c_on_val_and_separates_separable_features():
    gen = torch.Generator().manual_seed(0)
    def draw(n):
        y = torch.arange(n) % 3
        return torch.randn(n, 4, generator=gen) * 0.3 + torch.nn.functional.one_hot(y, 4).float() * 3, y
    (xtr, ytr), (xva, yva), (xte, yte) = draw(60), draw(30), draw(30)
    out = linear_probe(xtr, ytr, xva, yva, xte, yte, [0.001, 1.0], 200, 0)
    assert out["linear_probe_acc"] == 1.0 and out["linear_c"] in (0.001, 1.0)
    assert set(out["linear_val_curve"]) == {"0.001", "1.0"}


def test_probe_settings_name_the_bad_key():
    assert probe_settings(None)["knn_k"] == 20
    for bad, key in (({"knn_k": 0}, "probe.knn_k"), ({"knn_temperature": -1}, "probe.knn_temperature"),
                     ({"linear_c": []}, "probe.linear_c"), ({"bogus": 1}, "bogus")):
        with pytest.raises(ConfigError, match=key):
            probe_settings(bad)


# --- end to end on tiny data ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("ssl_probe")
    spec = get_dataset("digits")
    spec.download(root / "raw")
    prepare("digits", root / "raw", root / "digits", seed=0)
    spec = get_dataset("digits_lt_scenes")
    spec.download(root / "raw_scenes")
    prepare("digits_lt_scenes", root / "raw_scenes", root / "scenes", seed=0, recipe=SMALL_SCENES)
    return root


def _pretrained(root, data, name):
    out = root / f"model_{name}"
    if not (out / "model.pt").exists():
        train("pretrain", "simclr", root / data, "convnet", 0, out, overrides={"epochs": 1, "batch_size": 64},
              backbone_kwargs=TINY_CONVNET, threads=1, progress=False)
    return out / "model.pt"


def test_run_probe_end_to_end_keeps_the_backbone_frozen(digits, tmp_path):
    model_path = _pretrained(digits, "digits", "digits")
    before = load_model(model_path)[0].state_dict()
    m = run_probe(model_path, digits / "digits", 0, tmp_path / "out", probe={"linear_c": [0.1, 1.0]}, threads=1)
    assert {"knn_acc", "knn_val_acc", "linear_probe_acc", "linear_probe_val_acc", "linear_c", "method",
            "pretrain_steps", "model_digest", "provenance"} <= set(m)
    assert m["method"] == "simclr" and m["probe"] == "image"
    assert 0.2 < m["linear_probe_acc"] <= 1.0 and 0.1 < m["knn_acc"] <= 1.0  # chance is 0.1
    assert (tmp_path / "out" / "metrics.json").exists()
    after = load_model(model_path)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_run_segmentation_probe_end_to_end(digits, tmp_path):
    model_path = _pretrained(digits, "scenes", "scenes")
    m = run_segmentation_probe(model_path, digits / "scenes", 0, tmp_path / "seg", probe={"seg_epochs": 3}, threads=1)
    assert {"miou", "miou_objects", "mean_f1", "pixel_accuracy", "miou_rare", "miou_common", "val_miou",
            "chosen_epoch", "val_miou_curve", "per_class_iou"} <= set(m)
    assert len(m["val_miou_curve"]) == 3 and 1 <= m["chosen_epoch"] <= 3
    assert m["val_miou"] == max(m["val_miou_curve"])
    assert 0.0 <= m["miou"] <= 1.0 and m["pixel_accuracy"] > 0.5  # background alone is most pixels
    assert len(m["per_class_iou"]) == 2 * 10 + 1


def test_dense_features_of_the_frozen_model_match_the_probe_input(digits):
    model, meta = load_model(_pretrained(digits, "scenes", "scenes"))
    from classlab.data.prepare import load_prepared

    x = load_prepared(digits / "scenes").test.x[:4]
    maps = frozen_features(model, x, meta["channel_mean"], meta["channel_std"], dense=True)
    assert maps.shape == (4, 8, 12, 12)  # 24x24 scenes, one 2x2 pool


def test_bad_input_names_the_field_and_writes_nothing(digits, tmp_path):
    image_model = _pretrained(digits, "digits", "digits")
    with pytest.raises(ConfigError, match="data_dir.*semantic masks"):
        run_segmentation_probe(image_model, digits / "digits", 0, tmp_path / "a")
    with pytest.raises(ConfigError, match="data_dir.*multi-label"):
        run_probe(image_model, digits / "scenes", 0, tmp_path / "b")
    with pytest.raises(ConfigError, match="probe.seg_epochs"):
        run_segmentation_probe(image_model, digits / "scenes", 0, tmp_path / "c", probe={"seg_epochs": 0})
    assert not any((tmp_path / d).exists() for d in "abc")


# --- the config's ssl groups ------------------------------------------------------------------------

def _with_ssl(ssl):
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "smoke.yaml").read_text())
    config["families"]["ssl"] = ssl
    return config


def test_config_ssl_groups_are_checked():
    good = {"seeds": [0], "groups": {"g": {"datasets": ["digits"], "backbone": "convnet", "methods": ["simclr"],
                                           "budget": {"epochs": 1}}}}
    validate_config(_with_ssl(copy.deepcopy(good)))
    bad = copy.deepcopy(good)
    bad["groups"]["g"]["methods"] = ["nope"]
    with pytest.raises(ConfigError, match=r"families.ssl.groups.g.methods\[0\]"):
        validate_config(_with_ssl(bad))
    bad = copy.deepcopy(good)
    bad["overrides"] = {"simclr": {"epochs": 3}}  # the budget is the group's
    with pytest.raises(ConfigError, match="families.ssl.overrides.simclr.*budget"):
        validate_config(_with_ssl(bad))
    bad = copy.deepcopy(good)
    bad["groups"]["g"]["probe"] = "segmentation"  # digits has no masks
    with pytest.raises(ConfigError, match="families.ssl.groups.g.datasets"):
        validate_config(_with_ssl(bad))
    bad = copy.deepcopy(good)
    bad["groups"]["g"]["budget"] = {"lr": 0.1}
    with pytest.raises(ConfigError, match="families.ssl.groups.g.budget"):
        validate_config(_with_ssl(bad))


def test_random_init_reference_takes_no_step_and_keeps_the_seeded_initialisation(digits, tmp_path):
    from classlab.engine.device import seed_everything
    from classlab.models import build_classifier

    train("pretrain", "random_init", digits / "digits", "convnet", 5, tmp_path / "ri",
          overrides={"epochs": 3, "batch_size": 64}, backbone_kwargs=TINY_CONVNET, threads=1, progress=False)
    model, meta = load_model(tmp_path / "ri" / "model.pt")
    assert meta["train_steps"] == 0
    seed_everything(5)
    fresh = build_classifier("convnet", 1, 10, img_size=8, backbone_kwargs=TINY_CONVNET)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_ssl_tables_group_by_the_path_and_claims_pair_seeds(tmp_path):
    import json

    import pandas as pd

    from classlab.report.claims import load_claims
    from classlab.report.ssl import write_ssl_tables, ssl_claims

    files = []
    for method, accs in (("simclr", [0.80, 0.81, 0.82]), ("sorting", [0.82, 0.83, 0.84])):
        for seed, acc in enumerate(accs):
            path = tmp_path / "results/eval/ssl/grp/fashion_mnist" / method / f"seed{seed}" / "metrics.json"
            path.parent.mkdir(parents=True)
            path.write_text(json.dumps({"protocol": "ssl_probe", "probe": "image", "method": method, "seed": seed,
                                        "dataset": "fashion_mnist", "backbone": "convnet", "linear_probe_acc": acc,
                                        "knn_acc": acc - 0.05, "pretrain_steps": 230, "pretrain_batch_size": 256}))
            files.append(path)
    (tmp_path / "claims").mkdir()
    (tmp_path / "claims" / "ssl.yaml").write_text(
        "- paper: p\n  statement: s\n  metric: linear_probe_acc\n  treatment: sorting\n  baseline: simclr\n"
        "  direction: higher\n  scenario: grp\n")
    runs = write_ssl_tables(files, tmp_path / "runs.csv", tmp_path / "summary.csv", tmp_path / "summary.md")
    assert set(runs.scenario) == {"grp"} and (runs.train_steps == 230).all()
    assert "### grp: fashion_mnist (convnet)" in (tmp_path / "summary.md").read_text()
    assert "| sorting | 83.0 ± 1.0 |" in (tmp_path / "summary.md").read_text()  # mean ± std in %
    claims = ssl_claims(runs, load_claims(tmp_path / "claims"))
    assert len(claims) == 1 and claims.effect.iloc[0] == pytest.approx(0.02) and claims.n_seeds.iloc[0] == 3
    assert pd.read_csv(tmp_path / "summary.csv").method.tolist() == ["simclr", "sorting"]
