"""Engine hooks the recipe and distillation families rely on: multi-stage runs (USEFUL), a teacher
checked against the student's classes, methods that predict through themselves (NoProp, kernel
classifiers), untrained pretraining heads (SimCLR), long-tailed subsets, and the metrics they add."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import classlab.train as train_mod
from classlab.data.prepare import load_prepared
from classlab.engine import load_checkpoint
from classlab.engine.device import seed_everything
from classlab.methods.base import Method
from classlab.metrics import shot_group_accuracy, top_k_accuracy

TINY = {"widths": [8, 16], "pool_after": [0]}
BASE_HP = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0, "epochs": 2, "batch_size": 64,
           "schedule": "constant", "warmup_frac": 0.0, "augment_pad": 0, "augment_hflip": False}


class CE(Method):
    def training_step(self, batch):
        logits = self.model(batch["x"])
        return F.cross_entropy(logits, batch["y"]), {"logits": logits.detach()}


class TwoStage(CE):
    """Probe, then retrain from scratch on the probe's misclassified samples upsampled 3x."""

    seen_at_reinit: list = []

    def training_stages(self):
        return [{"name": "probe", "epochs": 1}, {"name": "retrain", "reinit": True}]

    def on_train_start(self, loader):
        if self.stage == "retrain":
            TwoStage.seen_at_reinit.append({k: v.clone() for k, v in self.model.state_dict().items()})

    def end_stage(self, name, loader):
        keep = []
        for batch in loader:
            wrong = self.model(batch["x"]).argmax(1) != batch["y"]
            keep.append(torch.cat([batch["index"], batch["index"][wrong].repeat(3)]))
        return torch.cat(keep)


class DiesInRetrain(TwoStage):
    def on_epoch_start(self, epoch):
        if self.stage == "retrain" and epoch == 1:
            raise RuntimeError("killed")


class KernelVote(CE):
    """Predicts through itself: the label of the nearest stored training image (a run-time-sized buffer)."""

    evaluate_with_method = True

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.register_buffer("bank", torch.zeros(0))
        self.register_buffer("bank_y", torch.zeros(0, dtype=torch.long))

    def _load_from_state_dict(self, state, prefix, *args, **kwargs):
        self.bank = torch.zeros_like(state[prefix + "bank"])
        self.bank_y = torch.zeros_like(state[prefix + "bank_y"])
        super()._load_from_state_dict(state, prefix, *args, **kwargs)

    def on_train_start(self, loader):
        normalised = (loader.x.float() - loader.mean) / loader.std  # what forward() receives
        self.bank, self.bank_y = normalised.flatten(1)[:200].clone(), loader.y[:200].clone()

    def forward(self, x):
        nearest = torch.cdist(x.flatten(1), self.bank).argmin(1)
        return F.one_hot(self.bank_y[nearest], self.num_classes).float()


class NoHead(CE):
    head_trained = False


def _use(monkeypatch, cls, hparams=None):
    monkeypatch.setattr(train_mod, "get_method", lambda family, name: cls)
    monkeypatch.setattr(train_mod, "resolve_hparams", lambda family, name, overrides=None: dict(hparams or BASE_HP))


def _train(digits_prepared, out, **kw):
    return train_mod.train("supervised", "toy", digits_prepared, "convnet", 3, out, backbone_kwargs=TINY, progress=False,
                           threads=1, **kw)


def test_stages_resample_reinit_and_write_the_indices(digits_prepared, tmp_path, monkeypatch, one_thread):
    _use(monkeypatch, TwoStage)
    TwoStage.seen_at_reinit = []
    torch.manual_seed(0)
    out = tmp_path / "run"
    result = _train(digits_prepared, out)
    written = json.loads((out / "stage_probe_indices.json").read_text())
    n_train = len(load_prepared(digits_prepared).train.y)
    assert written["stage"] == "probe" and written["next_stage"] == "retrain"
    # every training sample once, the probe's mistakes three more times each
    assert len(written["indices"]) >= n_train and (len(written["indices"]) - n_train) % 3 == 0
    assert sorted(set(written["indices"])) == list(range(n_train))
    assert [row["stage"] for row in result["history"]] == ["probe", "retrain", "retrain"]
    # the retrain stage starts from the run's initial weights (the seeded fresh model), not the probe's
    assert len(TwoStage.seen_at_reinit) == 1
    seed_everything(3)
    initial = train_mod.build_classifier("convnet", 1, 10, img_size=8, backbone_kwargs=TINY).state_dict()
    for key, value in TwoStage.seen_at_reinit[0].items():
        assert torch.equal(value, initial[key]), key
    assert not list(out.glob("stage_*.pt")) and not list(out.glob("last*.pt"))


def test_a_killed_second_stage_resumes_without_redoing_the_first(digits_prepared, tmp_path, monkeypatch, one_thread, capsys):
    _use(monkeypatch, TwoStage)
    reference = tmp_path / "reference"
    _train(digits_prepared, reference)
    killed = tmp_path / "killed"
    _use(monkeypatch, DiesInRetrain)  # the same computation, interrupted in the retrain's second epoch
    with pytest.raises(RuntimeError, match="killed"):
        _train(digits_prepared, killed)
    assert (killed / "stage_probe.pt").exists() and (killed / "last_retrain.pt").exists()
    _use(monkeypatch, TwoStage)
    TwoStage.seen_at_reinit = []
    capsys.readouterr()
    _train(digits_prepared, killed)
    assert "stage probe: done in an earlier run" in capsys.readouterr().out
    a = load_checkpoint(reference / "model.pt")["model"]
    b = load_checkpoint(killed / "model.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_teacher_of_other_classes_is_refused(digits_prepared, tmp_path, monkeypatch, one_thread):
    _use(monkeypatch, CE, dict(BASE_HP, epochs=1))
    teacher = tmp_path / "teacher"
    _train(digits_prepared, teacher)
    with pytest.raises(ValueError, match="takes no teacher"):
        _train(digits_prepared, tmp_path / "student", teacher=teacher / "model.pt")
    # a teacher that saw only some classes
    _use(monkeypatch, CE, dict(BASE_HP, epochs=1, classes=[0, 1, 2]))
    partial = tmp_path / "partial"
    _train(digits_prepared, partial)
    _use(monkeypatch, CE, dict(BASE_HP, epochs=1))
    with pytest.raises(ValueError, match="classes differ from the student's"):
        _train(digits_prepared, tmp_path / "student2", teacher=partial / "model.pt")
    state = load_checkpoint(partial / "model.pt")
    state["meta"]["class_names"] = list(reversed(state["meta"]["class_names"]))
    state["meta"]["hparams"] = json.dumps(dict(BASE_HP))
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(ValueError, match="classes differ from the student's"):
        _train(digits_prepared, tmp_path / "student3", teacher=tmp_path / "renamed.pt")


def test_method_that_predicts_through_itself_is_rebuilt_for_evaluation(digits_prepared, tmp_path, monkeypatch, one_thread):
    _use(monkeypatch, KernelVote, dict(BASE_HP, epochs=1))
    out = tmp_path / "run"
    _train(digits_prepared, out)
    state = load_checkpoint(out / "model.pt")
    assert state["method"]["bank"].shape[0] == 200
    metrics = train_mod.evaluate(out / "model.pt", digits_prepared, tmp_path / "eval")
    saved = np.load(tmp_path / "eval" / "predictions.npz")["logits"]
    # one-hot votes, not a network's logits
    assert set(np.unique(saved)) <= {0.0, 1.0} and (saved.sum(1) == 1).all()
    assert metrics["top1"] > 0.5  # nearest neighbour in raw pixels on digits


def test_untrained_pretraining_head_is_not_reused(digits_prepared, tmp_path, monkeypatch, one_thread):
    _use(monkeypatch, NoHead, dict(BASE_HP, epochs=1))
    pre = tmp_path / "pre"
    _train(digits_prepared, pre)
    assert load_checkpoint(pre / "model.pt")["meta"]["head_trained"] is False
    _use(monkeypatch, CE, dict(BASE_HP, epochs=1, head_init="auto"))
    result = _train(digits_prepared, tmp_path / "ft", init=pre / "model.pt")
    assert result["meta"]["head_init"] == "fresh"
    _use(monkeypatch, CE, dict(BASE_HP, epochs=1))
    _train(digits_prepared, tmp_path / "pre2")
    _use(monkeypatch, CE, dict(BASE_HP, epochs=1, head_init="auto"))
    assert _train(digits_prepared, tmp_path / "ft2", init=tmp_path / "pre2" / "model.pt")["meta"]["head_init"] == "pretrained"


def test_long_tailed_subset_follows_the_exponential_profile():
    labels = torch.arange(10).repeat_interleave(500)
    subset = train_mod.long_tailed_subset(labels, None, 100.0, seed=0)
    counts = sorted(torch.bincount(labels[subset], minlength=10).tolist(), reverse=True)
    assert counts[0] == 500 and counts[-1] == 5
    expected = [int(500 * 100 ** (-r / 9)) for r in range(10)]
    assert counts == expected
    # the class order is seeded: the same seed gives the same subset, some other seed another order
    assert torch.equal(subset, train_mod.long_tailed_subset(labels, None, 100.0, seed=0))
    heads = {int(torch.bincount(labels[train_mod.long_tailed_subset(labels, None, 100.0, seed=s)]).argmax())
             for s in range(6)}
    assert len(heads) > 1
    with pytest.raises(ValueError, match="imbalance_ratio must be >= 1"):
        train_mod.training_subset(labels, [], 0, 0, None, 0.5)


def test_long_tailed_run_reports_shot_groups(digits_prepared, tmp_path, monkeypatch, one_thread):
    _use(monkeypatch, CE, dict(BASE_HP, epochs=1, imbalance_ratio=10))
    out = tmp_path / "lt"
    result = _train(digits_prepared, out)
    counts = result["meta"]["class_counts"]
    assert max(counts) / min(counts) == pytest.approx(10, rel=0.1)
    assert json.loads((out / "subset.json").read_text())["class_counts"] == counts
    metrics = train_mod.evaluate(out / "model.pt", digits_prepared, tmp_path / "eval")
    assert {"many_shot_top1", "medium_shot_top1", "few_shot_top1"} <= set(metrics)
    assert set(metrics["few_shot_classes"]) == set(sorted(range(10), key=lambda c: counts[c])[:3])


def test_top_k_accuracy_gold():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.04, 0.06], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    labels = np.array([2, 1, 0, 0])
    assert top_k_accuracy(logits, labels, 1) == 0.25       # only the last row
    assert top_k_accuracy(logits, labels, 2) == 0.5        # rows 0 and 3
    assert top_k_accuracy(logits, labels, 3) == 1.0
    assert top_k_accuracy(logits, labels, 10) == 1.0       # k beyond the classes: all


def test_shot_group_accuracy_gold():
    per_class = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    counts = [10, 900, 50, 300, 5, 100, 20, 1000, 2]
    out = shot_group_accuracy(per_class, counts)
    assert out["many_shot_classes"] == [7, 1, 3]
    assert out["medium_shot_classes"] == [5, 2, 6]
    assert out["few_shot_classes"] == [0, 4, 8]
    assert out["many_shot_top1"] == pytest.approx((0.3 + 0.9 + 0.7) / 3)
    assert out["medium_shot_top1"] == pytest.approx((0.5 + 0.8 + 0.4) / 3)
    assert out["few_shot_top1"] == pytest.approx((1.0 + 0.6 + 0.2) / 3)
