"""The dense family's protocol, report and config: end-to-end runs on tiny digits scenes (detection and
segmentation), bad input named and nothing written, equal budgets within a task, tables and claims."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from classlab.config import ConfigError, list_methods, resolve_hparams
from classlab.data.dense_scenes import MaskError
from classlab.data.prepare import prepare
from classlab.data.registry import get_dataset

SMALL = {"colors": ["red", "green"], "n_train": 48, "n_val": 16, "n_test": 16, "imbalance_ratio": 5.0,
         "k_min": 1, "k_max": 3, "rare_max": 3, "common_max": 12}
FAST = {"epochs": 1, "batch_size": 16}
BUDGET_KEYS = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule", "warmup_frac", "grad_clip")
BACKBONE_KWARGS = {"widths": [8, 16], "pool_after": [0]}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    spec = get_dataset("digits_lt_scenes")
    spec.download(root / "raw")
    prepare("digits_lt_scenes", root / "raw", root / "scenes", seed=0, recipe=SMALL)
    spec_flat = get_dataset("digits")
    spec_flat.download(root / "raw_flat")
    prepare("digits", root / "raw_flat", root / "flat", seed=0)
    return root


def _methods_of(task: str) -> list[str]:
    from classlab.methods.registry import get_method

    return [m for m in list_methods("dense") if get_method("dense", m).task == task]


def test_every_method_of_a_task_has_the_same_budget():
    for task in ("detection", "segmentation"):
        methods = _methods_of(task)
        assert len(methods) >= 2, task
        budgets = {m: {k: resolve_hparams("dense", m, None).get(k) for k in BUDGET_KEYS} for m in methods}
        first = budgets[methods[0]]
        for m, b in budgets.items():
            assert b == first, f"{m} trains at {b}, {methods[0]} at {first}"


def _run(scenes, method, out, **kw):
    from classlab.protocols.dense import run_dense

    return run_dense(method, scenes / "scenes", 0, out, backbone_kwargs=BACKBONE_KWARGS,
                     overrides={**FAST, **kw.pop("overrides", {})}, threads=1, progress=False, **kw)


@pytest.mark.parametrize("method", ["pixel_head", "nacl"])
def test_segmentation_run_scores_val_and_test_and_writes_masks(scenes, tmp_path, method):
    m = _run(scenes, method, tmp_path / method)
    assert m["task"] == "segmentation" and m["train_steps"] == 3  # 48 scenes / 16
    for key in ("miou", "f1_rare", "miou_rare", "f1_frequent", "pixel_ece", "val_miou", "val_pixel_ece"):
        assert key in m, key
    assert 0 <= m["pixel_ece"] <= 1 and 0 <= m["miou"] <= 1
    pred = np.load(tmp_path / method / "predictions.npz")
    assert pred["masks"].shape == (16, 24, 24) and pred["masks"].dtype == np.uint8
    assert not (tmp_path / method / "last.pt").exists()


def test_detection_run_scores_coco_ap_by_band(scenes, tmp_path):
    m = _run(scenes, "cq_dino", tmp_path / "cq")
    assert m["task"] == "detection"
    for key in ("ap", "ap50", "ap_rare", "ap_common", "ap_frequent", "val_ap"):
        assert key in m, key
    pred = np.load(tmp_path / "cq" / "predictions.npz")
    assert set(pred["image_id"].tolist()) <= set(range(16))
    assert pred["boxes"].shape[1] == 4 and (pred["boxes"] >= -1e-3).all() and (pred["boxes"] <= 24 + 1e-3).all()


def test_bad_input_names_the_field_and_writes_nothing(scenes, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ConfigError, match="data_dir"):
        from classlab.protocols.dense import run_dense

        run_dense("pixel_head", scenes / "flat", 0, out, threads=1, progress=False)
    with pytest.raises(ConfigError, match="method"):
        _run(scenes, "no_such_method", out)
    with pytest.raises(ConfigError, match="epochs"):
        _run(scenes, "pixel_head", out, overrides={"epochs": -1})
    # masks that do not match their images: a copy of the scenes whose val masks lost a row
    bad = tmp_path / "bad_scenes"
    import shutil

    shutil.copytree(scenes / "scenes", bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    val_file = bad / manifest["splits"]["val"]["file"]
    blob = torch.load(val_file, weights_only=True)
    blob["semantic_masks"] = blob["semantic_masks"][:, :-1]
    torch.save(blob, val_file)
    from classlab.protocols.dense import run_dense

    with pytest.raises(MaskError, match="masks"):
        run_dense("pixel_head", bad, 0, out, threads=1, progress=False)
    assert not out.exists()


def test_cli_run_then_tables_claims_and_figure(scenes, tmp_path):
    from classlab.cli import main

    files = {}
    for method in ("pixel_head", "segface", "class_head"):
        for seed in (0, 1):
            out = tmp_path / "eval" / method / f"seed{seed}"
            rc = main(["dense-run", "--method", method, "--data", str(scenes / "scenes"), "--seed", str(seed),
                       "--backbone-kwargs", json.dumps(BACKBONE_KWARGS), "--overrides", json.dumps(FAST),
                       "--threads", "1", "--out-dir", str(out), "--no-progress"])
            assert rc in (0, None)
            files.setdefault(method, []).append(out)
    metrics = [str(p / "metrics.json") for runs in files.values() for p in runs]
    t = tmp_path / "tables"
    rc = main(["aggregate-dense", "--metrics", *metrics, "--runs-csv", str(t / "runs.csv"), "--summary-csv",
               str(t / "summary.csv"), "--summary-md", str(t / "summary.md"), "--claims-csv", str(t / "claims.csv")])
    assert rc in (0, None)
    import pandas as pd

    runs = pd.read_csv(t / "runs.csv")
    assert set(runs.scenario) == {"detection", "segmentation"} and len(runs) == 6
    claims = pd.read_csv(t / "claims.csv")
    segface = claims[claims.treatment == "segface"]
    assert len(segface) == 1 and segface.n_seeds.iloc[0] == 2  # paired over the two seeds
    assert "F1 rare" in (t / "summary.md").read_text() and "AP rare" in (t / "summary.md").read_text()
    firsts = [files[m][0] for m in files]
    rc = main(["plot-dense-examples", "--metrics", *[str(p / "metrics.json") for p in firsts], "--predictions",
               *[str(p / "predictions.npz") for p in firsts], "--data", str(scenes / "scenes"), "--figure",
               str(tmp_path / "fig.png")])
    assert rc in (0, None) and (tmp_path / "fig.png").stat().st_size > 1000


def test_config_dense_datasets_and_backbone_kwargs_are_checked():
    import yaml

    from classlab.config import validate_config

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "smoke.yaml").read_text())
    cfg = json.loads(json.dumps(base))
    cfg["families"] = {"dense": {"datasets": ["digits"], "methods": ["pixel_head"]}}
    with pytest.raises(ConfigError, match="dense"):
        validate_config(cfg)
    cfg["families"] = {"dense": {"datasets": ["digits_lt_scenes"], "methods": ["pixel_head"],
                                 "backbone_kwargs": {"no_such": 1}}}
    with pytest.raises(ConfigError, match="families.dense.backbone_kwargs"):
        validate_config(cfg)
    cfg["families"] = {"dense": {"datasets": ["digits_lt_scenes"], "methods": ["no_such"]}}
    with pytest.raises(ConfigError, match="families.dense.methods"):
        validate_config(cfg)
