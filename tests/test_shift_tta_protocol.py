"""The test-time adaptation protocol: source statistics as a file, corrupted streams identical for
every method, online accuracy, and the checks that name a bad corruption, severity or source."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from classlab.config import ConfigError, validate_config
from classlab.data.prepare import load_prepared
from classlab.data.scenarios import test_subset as balanced_test_subset
from classlab.engine import predict_logits
from classlab.methods.source_stats import load_source_statistics
from classlab.protocols.shift import compute_source_statistics_file, run_test_time

TINY = {"widths": [8, 16], "pool_after": [0]}


@pytest.fixture(scope="module")
def source_model(digits_prepared, tmp_path_factory):
    from classlab.train import train

    out = tmp_path_factory.mktemp("source")
    train("supervised", "erm", digits_prepared, "convnet", 0, out,
          overrides={"init": "scratch", "epochs": 3, "batch_size": 64, "lr": 0.05}, backbone_kwargs=TINY,
          threads=1, progress=False)
    stats = out / "stats.pt"
    compute_source_statistics_file(out / "model.pt", digits_prepared, stats, per_class=40, threads=1)
    return out / "model.pt", stats


STREAMS = [("gaussian_noise", 5), ("contrast", 3)]


def test_source_statistics_file_holds_each_class_of_the_source_features(source_model):
    stats, meta = load_source_statistics(source_model[1])
    assert stats["mu"].shape == (10, 16) and stats["cov"].shape == (10, 16, 16)
    assert stats["counts"].tolist() == [40] * 10
    assert meta["samples"] == 400 and meta["split"] == "train"


def test_every_method_meets_the_same_streams_and_source_matches_plain_evaluation(source_model, digits_prepared,
                                                                                  tmp_path):
    ckpt, stats = source_model
    results = {}
    for method in ("source", "bn_adapt", "tent", "cafa"):
        results[method] = run_test_time(method, ckpt, digits_prepared, 0, STREAMS, tmp_path / f"{method}.json",
                                        test_per_class=10, batch_size=16, source_stats=stats, threads=1)
        saved = json.loads((tmp_path / f"{method}.json").read_text())
        assert [(s["corruption"], s["severity"]) for s in saved["streams"]] == [("clean", 0)] + STREAMS
        assert all(s["images"] == 100 for s in saved["streams"])
    # the source model's clean-stream accuracy is plain evaluation of the same test images
    from classlab.train import load_model

    model, _ = load_model(ckpt)
    data = load_prepared(digits_prepared)
    idx = torch.tensor(balanced_test_subset(data.test.y.numpy(), 10, 10, 0))
    logits = predict_logits(model, data.test.x[idx], data.manifest["channel_mean"], data.manifest["channel_std"],
                            torch.device("cpu"))
    expected = float((logits.argmax(1) == data.test.y[idx]).float().mean())
    assert results["source"]["streams"][0]["accuracy"] == pytest.approx(expected)
    # a rerun of a method meets the same stream and gives the same accuracy
    again = run_test_time("tent", ckpt, digits_prepared, 0, STREAMS, tmp_path / "again.json", test_per_class=10,
                          batch_size=16, source_stats=stats, threads=1)
    assert again["streams"] == results["tent"]["streams"]
    # adaptation changes predictions on a corrupted stream (BN statistics of the test batch)
    assert results["bn_adapt"]["streams"][1]["accuracy"] != results["source"]["streams"][1]["accuracy"]


@pytest.mark.parametrize("streams,needle", [
    ([("foo", 3)], r"corruption 'foo' does not exist; valid: \[.*gaussian_noise"),
    ([("fog", 6)], "severity 6 is outside 1-5"),
])
def test_a_bad_stream_is_refused_before_anything_is_written(source_model, digits_prepared, tmp_path, streams, needle):
    with pytest.raises(ConfigError, match=needle):
        run_test_time("tent", source_model[0], digits_prepared, 0, streams, tmp_path / "m.json", 10, 16)
    assert not (tmp_path / "m.json").exists()


def test_cafa_refuses_to_run_without_source_statistics(source_model, digits_prepared, tmp_path):
    with pytest.raises(ValueError, match="source"):
        run_test_time("cafa", source_model[0], digits_prepared, 0, STREAMS, tmp_path / "m.json", 10, 16)
    assert not (tmp_path / "m.json").exists()


BASE = {"datasets": ["fashion_mnist"], "seeds": [0], "backbones": ["convnet"], "pretrain": {"method": "supervised"},
        "families": {"supervised": {"methods": ["erm"]},
                     "shift": {"tta": {"methods": ["source", "tent", "cafa"], "corruptions": ["fog", "contrast"],
                                       "severities": [1, 5]}}}}


def test_the_config_names_a_bad_corruption_severity_source_or_method():
    validate_config(copy.deepcopy(BASE))
    bad = copy.deepcopy(BASE)
    bad["families"]["shift"]["tta"]["corruptions"] = ["fog", "snowstorm"]
    with pytest.raises(ConfigError, match=r"tta.corruptions\[1\]: corruption 'snowstorm' does not exist; valid: "):
        validate_config(bad)
    bad = copy.deepcopy(BASE)
    bad["families"]["shift"]["tta"]["severities"] = [1, 7]
    with pytest.raises(ConfigError, match="severities"):
        validate_config(bad)
    bad = copy.deepcopy(BASE)
    bad["families"]["shift"]["tta"]["source"] = "sam"
    with pytest.raises(ConfigError, match=r"tta.source: 'sam' is not in families.supervised.methods"):
        validate_config(bad)
    bad = copy.deepcopy(BASE)
    bad["families"]["shift"]["tta"]["methods"] = ["tent", "irm"]
    with pytest.raises(ConfigError, match=r"tta.methods\[1\]: 'irm' runs on \['domain_generalization'\]"):
        validate_config(bad)
