"""The discovery protocol: hidden labels, tasks per split kind, resume, outputs; the baselines' core terms."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.discovery_helpers import digits_split, tiny_run


@pytest.fixture(scope="module")
def gcd_split(digits_prepared, tmp_path_factory):
    return digits_split(digits_prepared, tmp_path_factory.mktemp("split") / "gcd.json")


def test_unlabelled_labels_never_reach_the_learner(digits_prepared, gcd_split, tmp_path):
    from classlab.methods.discovery.simgcd import SimGCD

    seen = []
    original = SimGCD.training_step

    def spy(self, batch):
        seen.append((batch["y"].clone(), batch["source"].clone()))
        return original(self, batch)

    SimGCD.training_step = spy
    try:
        tiny_run("simgcd", digits_prepared, gcd_split, tmp_path)
    finally:
        SimGCD.training_step = original
    split = json.loads(gcd_split.read_text())
    assert seen
    for y, source in seen:
        # the unlabelled source (0) carries -1 only; the labelled one label indices of the known classes
        assert bool((y[source == 0] == -1).all())
        assert bool((y[source == 1] >= 0).all()) and int(y[source == 1].max()) < len(split["known_classes"])


def test_gcd_run_writes_assignments_of_the_unlabelled_pool_and_test(digits_prepared, gcd_split, tmp_path):
    out = tiny_run("kmeans", digits_prepared, gcd_split, tmp_path)
    split = json.loads(gcd_split.read_text())
    z = out["predictions"]
    assert len(z["pred_unlabelled_task0"]) == len(split["unlabelled"])
    assert sorted(z["old_classes_task0"].tolist()) == split["known_classes"]
    assert set(np.unique(z["labels_unlabelled_task0"])) == set(range(10))
    assert len(z["pred_test_task0"]) == len(split["test"])
    assert z["projection_features"].shape[0] == len(z["projection_labels"])
    hist = json.loads((tmp_path / "ckpt" / "history.json").read_text())
    assert hist["meta"]["family"] == "discovery" and hist["meta"]["known_classes"] == split["known_classes"]


def test_a_supervised_init_that_saw_novel_labels_is_refused(digits_prepared, gcd_split, tmp_path):
    from classlab.data.discovery_split import SplitError
    from classlab.train import train

    train("pretrain", "supervised", digits_prepared, "convnet", 0, tmp_path / "all",
          overrides={"epochs": 1, "batch_size": 64}, backbone_kwargs={"widths": [8, 16], "pool_after": [0]},
          progress=False)
    with pytest.raises(SplitError, match="novel|known classes"):
        tiny_run("kmeans", digits_prepared, gcd_split, tmp_path / "run", init=tmp_path / "all" / "model.pt")
    assert not (tmp_path / "run" / "eval" / "predictions.npz").exists()


def test_active_rounds_reveal_queries_and_write_them(digits_prepared, tmp_path):
    split = digits_split(digits_prepared, tmp_path / "active.json", kind="active", budget=20, rounds=2)
    out = tiny_run("gcd", digits_prepared, split, tmp_path / "run")
    z = out["predictions"]
    q1, q2 = z["queries_round1"], z["queries_round2"]
    assert len(q1) == 10 and len(q2) == 10 and not set(q1) & set(q2)
    assert (tmp_path / "run" / "eval" / "queries_round2.json").exists()
    # the queried samples leave the pool that is scored
    unl = json.loads(split.read_text())["unlabelled"]
    assert len(z["pred_unlabelled_task2"]) == len(unl) - 20


def test_continual_stages_train_without_labels_after_stage_zero(digits_prepared, tmp_path):
    split = digits_split(digits_prepared, tmp_path / "cont.json", kind="continual", stages=2)
    out = tiny_run("simgcd", digits_prepared, split, tmp_path / "run")
    manifest = json.loads(split.read_text())
    assert len(out["history"]) == 3
    assert [row["labelled"] for row in out["history"]] == [len(manifest["labelled"]), 0, 0]
    z = out["predictions"]
    seen_last = sorted(manifest["known_classes"] + [c for s in manifest["stages"] for c in s["new_classes"]])
    assert set(np.unique(z["labels_test_task2"])) <= set(seen_last)


def test_kill_and_resume_ends_where_an_uninterrupted_run_does(digits_prepared, gcd_split, tmp_path, monkeypatch):
    import classlab.engine.trainer as trainer_module

    ref = tiny_run("simgcd", digits_prepared, gcd_split, tmp_path / "ref", overrides={"epochs": 2})

    class Killed(Exception):
        pass

    def kill_after_second_epoch(event, _count={"epoch": 0}):
        if event == "epoch":
            _count["epoch"] += 1
            if _count["epoch"] == 2:  # epoch 2 done, its checkpoint not written: resume from epoch 1's
                raise Killed

    monkeypatch.setattr(trainer_module, "maybe_kill", kill_after_second_epoch)
    with pytest.raises(Killed):
        tiny_run("simgcd", digits_prepared, gcd_split, tmp_path / "kill", overrides={"epochs": 2})
    assert (tmp_path / "kill" / "ckpt" / "task0_last.pt").exists()
    monkeypatch.undo()
    again = tiny_run("simgcd", digits_prepared, gcd_split, tmp_path / "kill", overrides={"epochs": 2})
    for key in ("pred_unlabelled_task0", "pred_test_task0"):
        np.testing.assert_array_equal(ref["predictions"][key], again["predictions"][key])


def test_semi_supervised_kmeans_keeps_labelled_points_in_their_class():
    from classlab.methods.discovery_learner import semi_supervised_kmeans

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    x = np.concatenate([c + rng.normal(0, 0.3, (30, 2)) for c in centres])
    labels = np.full(90, -1)
    labels[:5], labels[30:35] = 0, 1
    labels[5] = 1  # a labelled point far from its class's centre stays assigned to its class
    assign, found, _ = semi_supervised_kmeans(x, labels, 3, seed=0)
    assert assign[5] == 1 and (assign[:5] == 0).all() and (assign[30:35] == 1).all()
    # the unlabelled third cluster is found and takes index 2
    assert (assign[60:] == 2).mean() > 0.95


def test_gcd_class_number_search_finds_the_number_of_blobs():
    from classlab.methods.discovery.gcd import estimate_num_classes

    rng = np.random.default_rng(1)
    centres = rng.normal(0, 10, (6, 4))
    x = np.concatenate([c + rng.normal(0, 0.5, (40, 4)) for c in centres])
    labels = np.full(len(x), -1)
    for c in range(3):  # three classes partly labelled
        labels[c * 40:c * 40 + 20] = c
    k, scores = estimate_num_classes(x, labels, 3, 10, seed=0)
    assert k == 6 or scores[k] == scores[6]


def test_simgcd_self_distillation_is_cross_view_and_teacher_sharpened():
    from classlab.methods.discovery.simgcd import cross_view_distillation, mean_entropy_penalty, teacher_temperature

    s1, s2 = torch.randn(4, 5), torch.randn(4, 5)
    q2 = torch.softmax(s2 / 0.04, 1)
    q1 = torch.softmax(s1 / 0.04, 1)
    expected = 0.5 * ((-q2 * torch.log_softmax(s1 / 0.1, 1)).sum(1).mean()
                      + (-q1 * torch.log_softmax(s2 / 0.1, 1)).sum(1).mean())
    got = cross_view_distillation([s1, s2], [s1, s2], 0.1, 0.04)
    assert torch.allclose(got, expected, atol=1e-6)
    # the mean-entropy term: 0 for a batch that uses every cluster equally, log K for a collapsed one
    assert abs(float(mean_entropy_penalty(torch.eye(5) * 100, 0.1))) < 1e-5
    assert float(mean_entropy_penalty(torch.tensor([[100.0, 0, 0, 0, 0]] * 4), 0.1)) == pytest.approx(np.log(5), abs=1e-4)
    assert teacher_temperature(0, 0.07, 0.04, 30) == 0.07 and teacher_temperature(30, 0.07, 0.04, 30) == 0.04
    assert teacher_temperature(15, 0.07, 0.04, 30) == pytest.approx(0.055)


def test_gcd_representation_loss_weights_supervised_term():
    from classlab.methods.discovery_learner import GCDRepresentation

    torch.manual_seed(0)
    rep = GCDRepresentation(6, 4, sup_weight=0.35)
    h1, h2 = torch.randn(8, 6), torch.randn(8, 6)
    y = torch.tensor([0, 0, 1, 1, -1, -1, -1, -1])
    loss, logs = rep(h1, h2, y)
    assert torch.allclose(loss, 0.65 * logs["l_unsup"] + 0.35 * logs["l_sup"], atol=1e-6)
    _, unl = rep(h1, h2, torch.full((8,), -1))
    assert float(unl["l_sup"]) == 0.0  # no labelled sample: the supervised term vanishes


def test_smoke_run_discovery_tables_figures_claims_and_inits(smoke_run):
    """The smoke config's discovery slice end to end: a GCD split from the simclr node, an NCD split
    from the supervised model of the labelled known classes (pretrain_known), tables, claims, figures."""
    import pandas as pd

    summary = pd.read_csv(smoke_run / "results/tables/discovery/summary.csv")
    assert set(zip(summary.scenario, summary.method)) == {("gcd", "kmeans"), ("gcd", "simgcd"), ("ncd", "kmeans")}
    assert (summary.seeds == 1).all() and summary.acc_all_mean.between(0.1, 1.0).all()
    # the report says which labels each backbone saw: none (simclr), the known classes only (pretrain_known)
    inits = dict(zip(summary.scenario, summary.backbone_init))
    assert "no labels" in inits["gcd"] and "only" in inits["ncd"] and "ALL" not in inits["ncd"]
    for seed in (0,):
        split = json.loads((smoke_run / f"results/splits/discovery/digits/ncd/seed{seed}.json").read_text())
        hist = json.loads((smoke_run / f"results/checkpoints/pretrain_known/digits/convnet/ncd/seed{seed}/"
                           f"history.json").read_text())
        assert sorted(json.loads(hist["meta"]["hparams"])["classes"]) == split["known_classes"]
        assert split["params"]["init"] == "supervised_known"  # the manifest records the pretraining
    claims = pd.read_csv(smoke_run / "results/tables/discovery/claims.csv")
    assert "SimGCD beats k-means on New accuracy" in set(claims.claim)
    for name in ("discovery_accuracy", "discovery_projection", "discovery_confusion", "discovery_stages",
                 "discovery_queries"):
        assert (smoke_run / f"results/figures/discovery/{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("configfile", ["config/discovery.yaml", "config/discovery_cpu.yaml"])
def test_full_discovery_grids_resolve(configfile):
    """Both discovery grids (paper scale, CPU claims) build their DAG: every split kind, both inits."""
    from tests.conftest import ROOT, snakemake

    proc = snakemake(ROOT, "-n", "--configfile", configfile)
    out = proc.stdout + proc.stderr
    for rule in ("build_discovery_split", "pretrain_known", "train_discovery", "evaluate_discovery",
                 "aggregate_discovery", "plot_discovery"):
        assert f"rule {rule}:" in out or f"localrule {rule}:" in out, rule
