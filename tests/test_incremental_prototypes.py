"""Prototype and pre-trained-model methods of family ``incremental``: simplecil, slca, teen.

Unit tests of each core equation on hand-computed tensors, then one tiny end-to-end run of each
through ``run_incremental`` on the shared digits data (skipped where that data is absent).
"""
from __future__ import annotations

import json

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from classlab.engine import load_checkpoint
from classlab.methods.incremental.simplecil import SimpleCIL
from classlab.methods.learner import class_means
from classlab.methods.incremental.slca import SLCA, gaussian_statistics, logit_norm_loss, sample_gaussian
from classlab.methods.incremental.teen import TEEN, teen_calibrate
from classlab.models.backbones import Classifier
from classlab.methods.learner import TaskContext

from tests.shared_data import SHARED  # noqa: E402  (built by conftest before the tests run)
from tests.test_incremental_phases import run_task_phases
DIGITS = SHARED / "prepared" / "digits"
INIT = SHARED / "pretrain" / "digits_b4inc2_convnet" / "model.pt"
CONVNET = {"widths": [16, 32], "pool_after": [0]}


class Identity2(nn.Module):
    """A 'backbone' whose features are its 2-d input, so prototypes can be computed by hand."""

    num_features = 2

    def forward(self, x):
        return x


def context(task_id, new, seen, feats, labels, device="cpu"):
    idx = torch.arange(len(labels))
    return TaskContext(task_id, new, seen, torch.zeros(len(labels), 1), labels, idx, None,
                       lambda i: feats[i], lambda i: feats[i], torch.device(device))


# --- simplecil ----------------------------------------------------------------------------
def test_simplecil_prototypes_are_class_means_and_prediction_is_nearest_cosine():
    learner = SimpleCIL(Classifier(Identity2(), 3), {"train_base_session": "auto"}, 3)
    learner.scenario_kind = "class_incremental"
    learner.begin_task(0, [0, 1], [0, 1])
    assert len(learner.training_indices(torch.arange(4), torch.arange(4), torch.zeros(0, dtype=torch.long))) == 0
    feats = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 0.5], [0.0, 1.5]])
    labels = torch.tensor([0, 0, 1, 1])
    learner.end_task(0, context(0, [0, 1], [0, 1], feats, labels))
    # p_0 = mean([1,0],[3,0]) = [2,0]; p_1 = mean([0,.5],[0,1.5]) = [0,1]; class 2 unseen stays zero
    assert torch.allclose(learner.prototypes, torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[1.9, 2.0]])
    logits = learner.predict(x)
    norm = math.sqrt(1.9 ** 2 + 2.0 ** 2)
    assert torch.allclose(logits[0, :2], torch.tensor([1.9 / norm, 2.0 / norm]), atol=1e-6)
    # nearest by cosine is class 1, although class 0 is nearer in Euclidean distance
    assert int(logits[0, :2].argmax()) == 1
    assert float((x - learner.prototypes[0]).norm()) < float((x - learner.prototypes[1]).norm())
    assert torch.allclose(class_means(feats, labels, [1, 0]), torch.tensor([[0.0, 1.0], [2.0, 0.0]]))


def test_simplecil_trains_only_the_base_session_of_few_shot_scenarios():
    task = torch.arange(10)
    empty = torch.zeros(0, dtype=torch.long)
    for kind, setting, expected in [("few_shot", "auto", 10), ("class_incremental", "auto", 0),
                                    ("class_incremental", True, 10), ("few_shot", False, 0)]:
        learner = SimpleCIL(Classifier(Identity2(), 4), {"train_base_session": setting}, 4)
        learner.scenario_kind = kind
        learner.begin_task(0, [0, 1], [0, 1])
        assert len(learner.training_indices(task, task, empty)) == expected, (kind, setting)
        learner.begin_task(1, [2, 3], [0, 1, 2, 3])
        assert len(learner.training_indices(task, task, empty)) == 0  # later sessions never train
    # the base-session step is TEEN's cosine classifier: CE(s cos(f, W), y)
    learner = SimpleCIL(Classifier(Identity2(), 2), {"temperature": 16.0}, 2)
    learner.begin_task(0, [0, 1], [0, 1])
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([1])
    loss, _ = learner.training_step({"x": x, "y": y})
    expected = F.cross_entropy(16.0 * F.normalize(x) @ F.normalize(learner.model.head.weight).T, y)
    assert torch.allclose(loss, expected)


# --- slca ---------------------------------------------------------------------------------
def small_convnet_classifier(num_classes=4):
    from classlab.models import build_classifier

    return build_classifier("convnet", 1, num_classes, img_size=8, backbone_kwargs={"widths": [4], "pool_after": []})


def test_slca_slow_learner_backbone_group_has_lr_times_0_01():
    hp = {"optimizer": "sgd", "lr": 0.05, "backbone_lr_scale": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
    learner = SLCA(small_convnet_classifier(), hp, 4)
    groups = {g["name"]: g for g in learner.configure_optimizer().param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(0.05 * 0.01)
    assert groups["head"]["lr"] == pytest.approx(0.05)
    assert {id(p) for p in groups["backbone"]["params"]} == {id(p) for p in learner.model.backbone.parameters()}
    assert {id(p) for p in groups["head"]["params"]} == {id(p) for p in learner.model.head.parameters()}
    # each task's CE is over its own classes only
    learner.begin_task(0, [0, 1], [0, 1])
    learner.begin_task(1, [2, 3], [0, 1, 2, 3])
    loss, logs = learner.training_step({"x": torch.randn(3, 1, 8, 8), "y": torch.tensor([2, 3, 2])})
    assert torch.isinf(logs["logits"][:, :2]).all() and torch.isfinite(loss)


def test_slca_gaussian_statistics_are_sample_mean_and_covariance():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 4.0]])
    mu, cov = gaussian_statistics(x)
    assert torch.allclose(mu, torch.tensor([3.0, 4.0], dtype=torch.float64))
    assert torch.allclose(cov, torch.tensor([[4.0, 2.0], [2.0, 4.0]], dtype=torch.float64))  # (1/(n-1)) sum dd^T
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 3))
    mu, cov = gaussian_statistics(torch.from_numpy(y), eps=1e-4)
    assert np.allclose(mu.numpy(), y.mean(0)) and np.allclose(cov.numpy(), np.cov(y, rowvar=False) + 1e-4 * np.eye(3))
    g = torch.Generator().manual_seed(0)
    s = sample_gaussian(torch.tensor([1.0, -2.0], dtype=torch.float64),
                        torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64), 20000, g)
    assert torch.allclose(s.mean(0), torch.tensor([1.0, -2.0], dtype=torch.float64), atol=0.05)
    assert torch.allclose(torch.cov(s.T), torch.tensor([[2.0, 0.6], [0.6, 1.0]], dtype=torch.float64), atol=0.08)


def test_slca_logit_norm_divides_by_mean_per_task_norm_and_tau():
    logits = torch.tensor([[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, 6.0, 8.0]])
    y = torch.tensor([1, 2])
    groups = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    # row norms per task: (5, 0) and (0, 10); means 2.5 and 5
    expected = F.cross_entropy(logits / torch.tensor([[2.5], [5.0]]) / 0.1, y)
    assert torch.allclose(logit_norm_loss(logits, y, groups, 0.1), expected, atol=1e-5)


def test_slca_stores_statistics_and_its_align_phase_aligns_the_head_of_all_seen_classes():
    torch.manual_seed(0)
    hp = {"lr": 0.05, "backbone_lr_scale": 0.01, "momentum": 0.9, "weight_decay": 0.0, "cov_eps": 1e-4,
          "ca_epochs": 5, "ca_lr": 0.05, "ca_samples_per_class": 128, "ca_batch_size": 128, "ca_logit_norm": 0.1}
    learner = SLCA(Classifier(Identity2(), 4), hp, 4)
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0], [0.0, -4.0]])
    feats = torch.cat([c + 0.3 * torch.randn(40, 2) for c in centres])
    labels = torch.arange(4).repeat_interleave(40)
    first = labels < 2
    learner.begin_task(0, [0, 1], [0, 1])
    learner.end_task(0, context(0, [0, 1], [0, 1], feats[first], labels[first]))
    head_after_task0 = learner.model.head.weight.detach().clone()
    learner.begin_task(1, [2, 3], [0, 1, 2, 3])
    assert learner.task_phases(1) == ["train", "align"]
    # the align phase through the engine (statistics of the new classes, then the head), then end_task
    run_task_phases(learner, 1, context(1, [2, 3], [0, 1, 2, 3], feats[~first], labels[~first]))
    for c in range(4):
        mu, cov = gaussian_statistics(feats[labels == c], 1e-4)
        assert torch.allclose(learner.class_means[c], mu) and torch.allclose(learner.class_covs[c], cov)
    assert learner.class_task.tolist() == [0, 0, 1, 1]
    assert not torch.equal(head_after_task0, learner.model.head.weight)  # alignment changed the head
    pred = learner.predict(centres).argmax(1)
    assert pred.tolist() == [0, 1, 2, 3]  # every seen class, old and new, is recovered at its mean


# --- teen ---------------------------------------------------------------------------------
def test_teen_calibration_matches_hand_computation():
    base = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    new = torch.tensor([[2.0, 0.0]])
    # cos(new, base) = (1, 0); w = softmax(tau * (1, 0)) with tau = 1
    w0, w1 = math.e / (math.e + 1), 1 / (math.e + 1)
    dnorm = math.hypot(w0, w1)
    delta = torch.tensor([[w0 / dnorm, w1 / dnorm]])
    expected = 0.5 * torch.tensor([[1.0, 0.0]]) + 0.5 * delta
    assert torch.allclose(teen_calibrate(new, base, alpha=0.5, tau=1.0), expected, atol=1e-6)
    # alpha = 0: the prototype becomes the (normalised) similarity-weighted base prototype
    assert torch.allclose(teen_calibrate(new, base, alpha=0.0, tau=1.0), delta, atol=1e-6)


def test_teen_alpha_one_leaves_prototypes_and_predictions_unchanged():
    feats = torch.tensor([[1.0, 0.1], [2.0, -0.1], [0.1, 1.0], [-0.1, 2.0], [1.0, 0.9], [1.2, 0.8]])
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    base, novel = labels < 2, labels == 2
    learners = {}
    for name, cls, alpha in [("simplecil", SimpleCIL, 1.0), ("teen1", TEEN, 1.0), ("teen", TEEN, 0.5)]:
        learner = cls(Classifier(Identity2(), 3), {"alpha": alpha, "tau": 16.0, "train_base_session": True}, 3)
        learner.begin_task(0, [0, 1], [0, 1])
        learner.end_task(0, context(0, [0, 1], [0, 1], feats[base], labels[base]))
        learner.begin_task(1, [2], [0, 1, 2])
        learner.end_task(1, context(1, [2], [0, 1, 2], feats[novel], labels[novel]))
        learners[name] = learner
    raw = learners["simplecil"].prototypes
    assert torch.allclose(learners["teen1"].prototypes[2], F.normalize(raw[2], dim=0))  # same direction
    assert torch.equal(learners["teen1"].prototypes[:2], raw[:2])  # base prototypes never change
    x = torch.randn(64, 2)
    assert torch.allclose(learners["teen1"].predict(x), learners["simplecil"].predict(x), atol=1e-6)
    assert not torch.allclose(learners["teen"].prototypes[2], F.normalize(raw[2], dim=0))
    assert learners["teen"].base_mask.tolist() == [True, True, False]


# --- end to end on the shared digits data -------------------------------------------------
needs_shared = pytest.mark.incremental_e2e  # shared inputs are built by conftest; never skipped


def run(method, scenario, tmp, overrides):
    from classlab.protocols.incremental import run_incremental

    out = run_incremental(method, DIGITS, SHARED / "scenarios" / f"{scenario}.json", "convnet", 0, tmp / "ck",
                          tmp / "ev", overrides=overrides, init=INIT, backbone_kwargs=CONVNET, threads=1,
                          progress=False)
    preds = dict(np.load(tmp / "ev" / "predictions.npz"))
    state = load_checkpoint(tmp / "ck" / "model.pt")["learner"]
    return out["history"], preds, state


def last_task_accuracy(preds, classes):
    key = max(int(k[len("logits_task"):]) for k in preds if k.startswith("logits_task"))
    logits, labels = preds[f"logits_task{key}"], preds[f"labels_task{key}"]
    mask = np.isin(labels, classes)
    return float((logits[mask].argmax(1) == labels[mask]).mean())


@needs_shared
def test_simplecil_end_to_end_frozen_on_class_incremental(tmp_path):
    history, preds, state = run("simplecil", "digits_b4inc2", tmp_path, {})
    assert [h["train_samples"] for h in history] == [0, 0, 0, 0]  # nothing trained: backbone frozen
    assert all(h["epochs"] == [] for h in history)
    assert (state["prototypes"].norm(dim=1) > 0).all()  # every class has its prototype
    # chance among the 10 seen classes is 0.1
    assert last_task_accuracy(preds, [8, 1]) > 0.3 and last_task_accuracy(preds, list(range(10))) > 0.5


@needs_shared
def test_slca_end_to_end_aligns_classifier_and_resumes(tmp_path, monkeypatch):
    history, preds, state = run("slca", "digits_b4inc2", tmp_path / "full", {"epochs": 2})
    assert len(history) == 4 and all(h["train_samples"] > 0 for h in history)
    assert [sorted(h["phases"]) for h in history] == [[], ["align"], ["align"], ["align"]]  # CA after tasks 1-3
    covs = state["class_covs"]
    assert torch.allclose(covs, covs.transpose(1, 2)) and (torch.linalg.eigvalsh(covs) > 0).all()
    # after the last task the first task's classes (trained only in task 0, realigned by CA)
    # are still recognised well above chance
    assert last_task_accuracy(preds, [4, 6, 2, 7]) > 0.3
    assert last_task_accuracy(preds, [8, 1]) > 0.3
    # a run that dies in task 2's classifier alignment (an engine phase after training), then
    # resumes, ends where the uninterrupted one does
    original, crashed = SLCA.training_step, []

    def training_step_crashing_once(self, batch):
        if self.task_id == 2 and self.phase == "align" and self.global_step == 5 and not crashed:
            crashed.append(self.global_step)
            raise RuntimeError("simulated crash")
        return original(self, batch)

    monkeypatch.setattr(SLCA, "training_step", training_step_crashing_once)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("slca", "digits_b4inc2", tmp_path / "resumed", {"epochs": 2})
    assert crashed == [5] and (tmp_path / "resumed" / "ck" / "task2.phase.pt").exists()  # task 2 trained, not aligned
    assert (tmp_path / "resumed" / "ck" / "task1.pt").exists()
    _, resumed, resumed_state = run("slca", "digits_b4inc2", tmp_path / "resumed", {"epochs": 2})
    for key in preds:
        assert np.array_equal(preds[key], resumed[key]), key
    assert torch.equal(state["model.head.weight"], resumed_state["model.head.weight"])


@needs_shared
def test_teen_and_simplecil_share_the_base_backbone_on_few_shot(tmp_path):
    overrides = {"first_task_epochs": 2}
    h_s, p_s, s_s = run("simplecil", "digits_fscil", tmp_path / "simplecil", overrides)
    h_t, p_t, s_t = run("teen", "digits_fscil", tmp_path / "teen", overrides)
    base_samples = len(json.loads((SHARED / "scenarios" / "digits_fscil.json").read_text())["tasks"][0]["train_indices"])
    # the base session trains on all its samples; the training-free sessions on none
    assert [h["train_samples"] for h in h_s] == [h["train_samples"] for h in h_t] == [base_samples, 0, 0]
    # identical base session: same backbone, same base prototypes, same predictions after it
    for key in s_s:
        if key.startswith("model.backbone"):
            assert torch.equal(s_s[key], s_t[key]), key
    base = s_t["base_mask"]
    assert base.sum() == 6 and torch.equal(s_s["prototypes"][base], s_t["prototypes"][base])
    assert np.array_equal(p_s["logits_task0"], p_t["logits_task0"])
    # teen's novel prototypes are simplecil's (uncalibrated class means) calibrated with the base ones
    novel = ~base
    calibrated = teen_calibrate(s_s["prototypes"][novel], s_s["prototypes"][base], alpha=0.5, tau=16.0)
    assert torch.allclose(s_t["prototypes"][novel], calibrated, atol=1e-6)
    assert not torch.allclose(F.normalize(s_s["prototypes"][novel], dim=1), s_t["prototypes"][novel], atol=1e-3)
    assert last_task_accuracy(p_t, [4, 6, 2, 7, 3, 5]) > 0.5
