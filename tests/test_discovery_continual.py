"""Continual discovery: novel classes recurring across stages, Happy's terms and its SimGCD baseline."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tests.discovery_helpers import TINY_CONVNET, digits_split, tiny_run

TRAIN = np.repeat(np.arange(10), 40)     # 10 classes x 40 samples


def test_continual_split_a_novel_class_recurs_with_the_rest_of_its_samples():
    from classlab.data.discovery_split import build_discovery_split

    m = build_discovery_split("continual", "toy", TRAIN, 10, 0, stages=3, old_fraction=0.5)
    stages = m["stages"]
    # 5 novel classes over 3 stages: 2, 2, 1
    assert [len(s["new_classes"]) for s in stages] == [2, 2, 1]
    counts = [np.bincount(TRAIN[s["unlabelled"]], minlength=10) for s in stages]
    for c in stages[0]["new_classes"]:
        # round(0.8 * 40) = 32 in its own stage; its 8 others recur, round(0.5 * 8) = 4 per later stage
        assert [int(n[c]) for n in counts] == [32, 4, 4]
        # ... and together the three stages hold every sample of the class, each once
        held = [set(s["unlabelled"]) & set(np.flatnonzero(TRAIN == c).tolist()) for s in stages]
        assert set().union(*held) == set(np.flatnonzero(TRAIN == c).tolist()) and sum(map(len, held)) == 40
    for c in stages[1]["new_classes"]:
        assert [int(n[c]) for n in counts] == [0, 32, 4]       # the last 4 of its 8 never come
    for c in stages[2]["new_classes"]:
        assert [int(n[c]) for n in counts] == [0, 0, 32]
    # a stage lists the earlier stages' novel classes among its old classes, and now they are in it
    assert set(stages[0]["new_classes"]) <= set(stages[1]["old_classes"])
    assert all(counts[1][c] > 0 for c in stages[1]["old_classes"])


def _probability_logits(rows, temperature):
    """Logits whose softmax at ``temperature`` is each row of ``rows``."""
    return temperature * torch.log(torch.tensor(rows, dtype=torch.float64))


def test_happy_soft_entropy_regulariser_hand_case():
    from classlab.methods.discovery.happy import soft_entropy_regulariser

    # two rows whose mean prediction is p = [0.45, 0.15 | 0.2, 0.2] (2 old, 2 new clusters):
    # P_old = 0.6, P_new = 0.4: log 2 - H(0.6, 0.4) = 0.693147 - 0.673012 = 0.020136
    # within old [0.75, 0.25]: log 2 - H = 0.693147 - 0.562335 = 0.130812; within new [0.5, 0.5]: 0
    logits = _probability_logits([[0.6, 0.2, 0.1, 0.1], [0.3, 0.1, 0.3, 0.3]], 0.1)
    loss, parts = soft_entropy_regulariser(logits, 2, 0.1, old_new_weight=2.0, old_weight=1.0, new_weight=1.0)
    assert float(parts["soft_old_new"]) == pytest.approx(0.020136, abs=1e-5)
    assert float(parts["soft_old"]) == pytest.approx(0.130812, abs=1e-5)
    assert float(parts["soft_new"]) == pytest.approx(0.0, abs=1e-6)
    assert float(loss) == pytest.approx(2 * 0.020136 + 0.130812, abs=1e-5)
    # "soft": old 0.7 / new 0.3 with each group uniform inside costs only the group balance,
    # log 2 - H(0.7, 0.3) = 0.693147 - 0.610864 = 0.082283, where SimGCD's mean entropy asks for 1/4 each
    loss, parts = soft_entropy_regulariser(_probability_logits([[0.35, 0.35, 0.15, 0.15]], 0.1), 2, 0.1)
    assert float(parts["soft_old"]) == pytest.approx(0.0, abs=1e-6)
    assert float(parts["soft_new"]) == pytest.approx(0.0, abs=1e-6)
    assert float(loss) == pytest.approx(0.082283, abs=1e-5)


def test_happy_prototypes_radius_and_hardness_hand_case():
    from classlab.methods.discovery.happy import (class_prototypes_and_radius, hardness_sampling_probabilities,
                                                  prototype_hardness)

    # class 0: (2, 0) and (0, 3) normalise to (1, 0), (0, 1): mean (0.5, 0.5), each deviation has
    # squared norm 0.5, so tr(Sigma_0) / d = 0.5 / 2 = 0.25; class 1: (-5, 0), (-1, 0) both (-1, 0),
    # spread 0. r = sqrt((0.25 + 0) / 2) = 0.353553; prototypes (1, 1)/sqrt(2) and (-1, 0)
    feats = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-5.0, 0.0], [-1.0, 0.0]])
    protos, radius = class_prototypes_and_radius(feats, torch.tensor([0, 0, 1, 1]), 2)
    assert radius == pytest.approx(0.353553, abs=1e-6)
    assert torch.allclose(protos, torch.tensor([[0.707107, 0.707107], [-1.0, 0.0]]), atol=1e-6)
    # a = (1, 0), b = (0, 1), c = (1, 1)/sqrt(2): cos(a, b) = 0, cos(a, c) = cos(b, c) = 0.707107, so
    # h = [0.353553, 0.353553, 0.707107]; softmax(h / 0.1) ~ exp([3.5355, 3.5355, 7.0711]) / 1245.83
    # = [0.02754, 0.02754, 0.94492]: c, the class closest to the others, is replayed most
    abc = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.707107, 0.707107]])
    h = prototype_hardness(abc)
    assert torch.allclose(h, torch.tensor([0.353553, 0.353553, 0.707107]), atol=1e-5)
    probs = hardness_sampling_probabilities(h, 0.1)
    assert torch.allclose(probs, torch.tensor([0.02754, 0.02754, 0.94492]), atol=1e-4)
    assert float(prototype_hardness(abc[:1])[0]) == 0.0   # a lone class has no neighbour


def test_happy_hardness_aware_prototype_loss_hand_case():
    from classlab.methods.discovery.happy import hardness_aware_prototype_loss
    from classlab.methods.discovery_learner import CosinePrototypes

    abc = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.707107, 0.707107]])
    head = CosinePrototypes(2, 3)
    with torch.no_grad():
        head.weight.copy_(abc)
    # radius 0: the samples are the prototypes; logits / 0.1 are 10 x cosines:
    # a -> [10, 0, 7.0711]: CE = log(1 + e^-10 + e^-2.9289) = 0.052100 (b the same)
    # c -> [7.0711, 7.0711, 10]: CE = log(1 + 2 e^-2.9289) = 0.101537
    hardness = torch.tensor([0.353553, 0.353553, 0.707107])
    gen = torch.Generator().manual_seed(0)
    loss, classes = hardness_aware_prototype_loss(head, abc, hardness, 0.0, 4000, 0.1, 0.1, 3, gen)
    ce = torch.tensor([0.052100, 0.052100, 0.101537])
    assert loss.item() == pytest.approx(float(ce[classes].mean()), abs=1e-4)
    assert float((classes == 2).float().mean()) == pytest.approx(0.94492, abs=0.02)   # 0.0036 = 1 s.d.
    # a radius spreads the samples around the prototypes: the loss changes, the classes drawn do not
    noisy, same = hardness_aware_prototype_loss(head, abc, hardness, 0.5, 4000, 0.1, 0.1, 3,
                                                torch.Generator().manual_seed(0))
    assert torch.equal(same, classes) and noisy.item() > loss.item()


def test_happy_clustering_guided_init_takes_the_centroids_far_from_old_prototypes():
    from classlab.methods.discovery.happy import clustering_guided_prototypes

    # the stage's features: four tight blobs around e1..e4; the head already has e1 and e2, so of the
    # four centroids those near e3 and e4 (max cosine to an old prototype ~0, not ~1) are the new ones
    gen = torch.Generator().manual_seed(0)
    eye = torch.eye(4)
    feats = torch.cat([eye[k] + 0.05 * torch.randn(20, 4, generator=gen) for k in range(4)])
    chosen = clustering_guided_prototypes(feats, eye[:2] * 3.0, num_clusters=4, num_new=2, seed=0, n_init=1)
    assert chosen.shape == (2, 4)
    cos = chosen @ eye[2:].T                                  # each row is e3 or e4, one of each
    assert sorted(cos.argmax(1).tolist()) == [0, 1] and bool((cos.max(1).values > 0.99).all())


def test_happy_feature_distillation_hand_case():
    from classlab.methods.discovery.happy import feature_distillation

    # row 1: (1, 0) vs (2, 0) normalise alike: 0; row 2: (0, 1) - (0, -1) = (0, 2): 4. Mean: 2
    h = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    loss = feature_distillation(h, torch.tensor([[2.0, 0.0], [0.0, -1.0]]))
    assert loss.item() == pytest.approx(2.0)
    loss.backward()
    assert h.grad is not None


def test_simgcd_continual_stage_teacher_temperature_and_shared_settings():
    from classlab.config import resolve_hparams
    from classlab.methods.discovery.simgcd_continual import SimGCDContinual
    from classlab.methods.discovery_learner import DiscoveryTask
    from classlab.models import build_classifier

    hp = resolve_hparams("discovery", "simgcd_continual", None)
    learner = SimGCDContinual(build_classifier("convnet", 1, 10, img_size=8, backbone_kwargs=TINY_CONVNET), hp, 10)
    learner.begin_task(0, DiscoveryTask(0, 5, 5, 0, "continual"))
    assert learner.tau_t() == pytest.approx(hp["teacher_temperature_start"])   # stage 0: SimGCD's warm-up
    learner.begin_task(1, DiscoveryTask(1, 0, 8, 3, "continual"))
    assert learner.tau_t() == pytest.approx(hp["stage_teacher_temperature"])
    # Happy extends its baseline's settings: every setting they share has the same value
    happy = resolve_hparams("discovery", "happy", None)
    assert {k: happy[k] for k in hp} == hp


def test_happy_and_simgcd_continual_tiny_runs(digits_prepared, tmp_path):
    from classlab.engine import load_checkpoint

    # 60 samples a class keep the two runs to a few seconds
    split = digits_split(digits_prepared, tmp_path / "cont.json", kind="continual", stages=2, samples_per_class=60)
    manifest = json.loads(split.read_text())
    base = tiny_run("simgcd_continual", digits_prepared, split, tmp_path / "base", overrides={"first_task_epochs": 0})
    happy = tiny_run("happy", digits_prepared, split, tmp_path / "happy",
                     overrides={"first_task_epochs": 0, "n_init": 1})
    seen = [len(manifest["known_classes"])]
    for stage in manifest["stages"]:
        seen.append(seen[-1] + len(stage["new_classes"]))
    for out in (base, happy):
        assert [row["labelled"] for row in out["history"]] == [len(manifest["labelled"]), 0, 0]
        for t, k in enumerate(seen):   # clusters of the classes seen through each stage, no more
            assert int(out["predictions"][f"pred_test_task{t}"].max()) < k
    # the validation split's samples of every class seen by the end are scored for `make choices`
    from classlab.data.prepare import load_prepared
    from classlab.report.discovery import discovery_metrics

    val_y = load_prepared(digits_prepared).val.y.numpy()
    on_seen = np.isin(val_y, manifest["known_classes"] + [c for st in manifest["stages"] for c in st["new_classes"]])
    for out, work in ((base, "base"), (happy, "happy")):
        np.testing.assert_array_equal(out["predictions"]["labels_val_last"], val_y[on_seen])
        assert out["predictions"]["pred_val_last"].shape == (int(on_seen.sum()),)
        metrics = discovery_metrics(tmp_path / work / "eval" / "predictions.npz", split,
                                    tmp_path / work / "ckpt" / "history.json")
        assert 0 <= metrics["val_acc_all"] <= 1 and metrics["val_acc_all"] >= 1 / on_seen.sum()
    # the two share stage 0, so forgetting is measured from the same model
    for key in ("pred_unlabelled_task0", "pred_test_task0"):
        np.testing.assert_array_equal(base["predictions"][key], happy["predictions"][key])
    assert [sorted(row["phases"]) for row in happy["history"]] == [[], ["cluster_init"], ["cluster_init"]]
    state = load_checkpoint(tmp_path / "happy" / "ckpt" / "model.pt")["learner"]
    assert int(state["num_prototypes"]) == 10 and float(state["feature_radius"]) > 0
    assert torch.allclose(state["class_prototypes"][:10].norm(dim=1), torch.ones(10), atol=1e-5)
    assert float(state["class_hardness"][:10].abs().sum()) > 0
    # the snapshot for the next stage's feature distillation is the backbone as the last stage left it
    for name, value in state.items():
        if name.startswith("model.backbone."):
            assert torch.equal(value, state["previous_backbone." + name[len("model.backbone."):]])
    assert not math.isnan(happy["history"][-1]["epochs"][-1]["loss"])
