"""The explain protocol end to end on a tiny scene model: maps.npz, metrics from the saved maps, the
randomisation check that can fail, and the bad inputs of the issue (nothing written)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from classlab.cli import main as cli
from classlab.data.prepare import load_prepared, prepare
from classlab.data.registry import get_dataset
from classlab.protocols.explain import ExplainError, explained_classes, run_explain, scene_subset
from classlab.report.explain import explain_metrics, run_rows
from classlab.train import train


class Opaque:
    """An arbitrary pickled object: a checkpoint holding one is not plain tensors."""


@pytest.fixture(scope="module")
def scene_model(tmp_path_factory):
    """digits_scenes (3x3 canvas of 8x8 digits) and a small ConvNet trained on it for a few epochs."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("explain")
    raw, data = root / "raw", root / "prepared"
    get_dataset("digits_scenes").download(raw)
    prepare("digits_scenes", raw, data, recipe={"n_train": 600, "n_test": 80})
    out = root / "model"
    train("supervised", "erm", data, "convnet", 0, out,
          overrides={"init": "scratch", "epochs": 6, "batch_size": 32, "lr": 0.05, "augment_pad": 0,
                     "augment_hflip": False, "schedule": "cosine", "warmup_frac": 0.0},
          backbone_kwargs={"widths": [8, 16, 16], "pool_after": [0]}, threads=1, progress=False)
    return data, out / "model.pt", root


def test_maps_and_metrics_are_saved_and_recomputable(scene_model, tmp_path):
    data, checkpoint, _ = scene_model
    info = run_explain(checkpoint, data, "gradcam", ["block0", "block2"], tmp_path / "gc", n_images=24,
                       randomisation_images=8, perturbation_steps=5, threads=1)
    assert info["layers"] == ["block0", "block2"] and info["n_images"] == 24
    with np.load(tmp_path / "gc" / "maps.npz") as z:
        assert z["block2__target"].shape == (24, 24, 24)  # maps at the input size
        assert z["block2__deletion"].shape == (24, 6)
        cascade = list(z["cascade"])
        assert z["block2__randomised"].shape == (len(cascade), 8, 24, 24)
        assert cascade[0] == "head"
        # the same fixed, seeded scenes as any other job
        assert np.array_equal(z["test_index"], scene_subset(80, 24, 0))
    metrics = explain_metrics(tmp_path / "gc" / "maps.npz", tmp_path / "gc" / "explain.json", tolerance=0)
    rows = {r["layer"]: r for r in metrics["layers"]}
    for row in rows.values():
        assert 0 <= row["pointing"] <= 1 and 0 <= row["energy"] <= 1
        assert abs(row["box_share"] - 1 / 9) < 1e-9  # one cell of a 3x3 canvas
        assert len(row["randomisation_curve"]) == len(cascade)
    # a trained model's Grad-CAM at its last block beats a random point (the scenes are easy)
    assert rows["block2"]["pointing"] > 2 / 9


def test_random_maps_fail_the_randomisation_check(scene_model, tmp_path):
    """The check must be able to fail: a map that ignores the model keeps a correlation of 1."""
    data, checkpoint, _ = scene_model
    run_explain(checkpoint, data, "random", [], tmp_path / "rnd", n_images=10, randomisation_images=10,
                perturbation_steps=3, threads=1)
    run_explain(checkpoint, data, "saliency", [], tmp_path / "sal", n_images=10, randomisation_images=10,
                perturbation_steps=3, threads=1)
    rnd = explain_metrics(tmp_path / "rnd" / "maps.npz", tmp_path / "rnd" / "explain.json")["layers"][0]
    sal = explain_metrics(tmp_path / "sal" / "maps.npz", tmp_path / "sal" / "explain.json")["layers"][0]
    assert rnd["layer"] == "input"
    assert rnd["randomisation"] == pytest.approx(1.0)
    assert sal["randomisation"] < 0.9


def test_rows_name_method_at_layer_and_the_model(scene_model, tmp_path):
    data, checkpoint, _ = scene_model
    job = tmp_path / "results" / "explain" / "digits_scenes" / "small" / "gradcam" / "seed0"
    run_explain(checkpoint, data, "gradcam", ["block1"], job, n_images=6, randomisation_images=2,
                perturbation_steps=2, threads=1)
    (job / "metrics.json").write_text(json.dumps(explain_metrics(job / "maps.npz", job / "explain.json")))
    runs = run_rows([job / "metrics.json"])
    assert list(runs.method) == ["gradcam@block1"] and list(runs.scenario) == ["small"]


def test_unknown_layer_lists_the_valid_names_and_writes_nothing(scene_model, tmp_path, capsys):
    data, checkpoint, _ = scene_model
    out = tmp_path / "bad"
    code = cli(["explain", "--checkpoint", str(checkpoint), "--data", str(data), "--method", "gradcam",
                "--layer", "block9", "--out-dir", str(out), "--images", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "block9" in err and "block0" in err and "logits" in err
    assert not out.exists()


def test_a_checkpoint_that_is_not_plain_tensors_is_refused(scene_model, tmp_path, capsys):
    data, _, _ = scene_model
    bad = tmp_path / "pickled.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "meta": {"note": Opaque()}}, bad)
    code = cli(["explain", "--checkpoint", str(bad), "--data", str(data), "--method", "gradcam",
                "--layer", "block0", "--out-dir", str(tmp_path / "out")])
    assert code == 2 and "pickled.pt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_model_of_another_dataset_is_refused_and_base_models_explain_the_base_class(scene_model):
    data, _, _ = scene_model
    manifest = load_prepared(data).manifest
    labels = torch.tensor([0, 1, 2])
    assert explained_classes({"dataset": "digits_scenes"}, manifest, labels).tolist() == [0, 1, 2]
    targets = manifest["scenes"]["recipe"]["target_classes"]
    assert explained_classes({"dataset": "digits"}, manifest, labels).tolist() == targets[:3]
    with pytest.raises(ExplainError, match="fashion_mnist"):
        explained_classes({"dataset": "fashion_mnist"}, manifest, labels)


def test_a_dataset_without_boxes_is_refused(scene_model, tmp_path):
    _, checkpoint, root = scene_model
    plain = root / "plain"
    if not plain.exists():
        prepare("digits", root / "raw", plain)
    with pytest.raises(ExplainError, match="no boxes"):
        run_explain(checkpoint, plain, "gradcam", ["block0"], tmp_path / "out", n_images=4)
    assert not (tmp_path / "out").exists()


def test_summary_counts_seeds_not_rows(tmp_path):
    """Prompt-CAM contributes a maps row and an accuracy row per seed; the table says 2 seeds, not 4."""
    import pandas as pd

    from classlab.report.explain import write_tables

    rows = []
    for seed in (0, 1):
        base = {"dataset": "d", "backbone": "vit_tiny", "scenario": "vit", "method": "promptcam", "seed": seed,
                "init_kind": "trained"}
        rows += [{**base, "pointing": 0.5 + seed / 10}, {**base, "accuracy": 0.6}]
    out = tmp_path / "t"
    summary = write_tables(pd.DataFrame(rows), out / "runs.csv", out / "s.csv", out / "s.md", out / "c.csv", 0)
    assert summary.seeds.tolist() == [2]
    assert summary.pointing_mean.tolist() == pytest.approx([0.55])
