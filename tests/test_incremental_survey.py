"""Survey baselines of the incremental family: ewc, lwf, icarl, der.

Unit tests of each method's core equation on hand-made tensors, then tiny end-to-end runs of
each through ``run_incremental`` on the shared digits B0Inc2 scenario (threads=1).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.incremental.der import DER, aux_targets
from classlab.methods.incremental.ewc import EWC, empirical_fisher, ewc_penalty, merge_fisher
from classlab.methods.incremental.icarl import ICaRL, icarl_loss, icarl_targets, nme_logits
from classlab.methods.incremental.lwf import LwF, kd_loss
from classlab.metrics.incremental import accuracy_matrix, last_accuracy
from classlab.models import build_classifier
from classlab.models.backbones import Classifier
from classlab.methods.learner import TaskContext
from classlab.protocols.memory import ExemplarMemory

from tests.shared_data import SHARED  # noqa: E402  (built by conftest before the tests run)
DATA = SHARED / "prepared" / "digits"
B0INC2 = SHARED / "scenarios" / "digits_b0inc2.json"
CONVNET = {"widths": [16, 32], "pool_after": [0]}
EPOCHS = {"epochs": 3, "batch_size": 32}


def _model(k=4, widths=(4, 8)):
    torch.manual_seed(0)
    return build_classifier("convnet", 1, k, backbone_kwargs={"widths": list(widths), "pool_after": [0]})


def _batch(n=12, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 1, 8, 8, generator=g), "y": torch.randint(0, k, (n,), generator=g),
            "index": torch.arange(n)}


def _perturb(module: nn.Module, scale=0.1, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


# --- ewc --------------------------------------------------------------------------------------
def test_ewc_penalty_equals_hand_computed_value_and_is_zero_at_theta_star():
    theta = torch.tensor([1.0, 2.0, 3.0])
    star = torch.tensor([0.0, 2.0, 1.0])
    fisher = torch.tensor([0.5, 1.0, 2.0])
    # (1/2) * (0.5 * 1^2 + 1 * 0^2 + 2 * 2^2) = 4.25
    assert ewc_penalty(theta, star, fisher).item() == pytest.approx(4.25)
    assert ewc_penalty(star, star, fisher).item() == 0.0


def test_ewc_training_loss_is_ce_plus_lambda_half_fisher_weighted_distance():
    model = _model()
    ewc = EWC(model, {"lamb": 7.0}, 4)
    ewc.begin_task(0, [0, 1], [0, 1])
    ewc.begin_task(1, [2, 3], [0, 1, 2, 3])
    batch = _batch()
    ewc.eval()  # BatchNorm with running stats: the same forward twice
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    # at theta* the penalty vanishes: the loss is the plain masked cross-entropy
    ewc.theta_star.copy_(theta)
    ewc.fisher.copy_(torch.rand_like(theta))
    ce = F.cross_entropy(model(batch["x"]), batch["y"]).item()
    assert ewc.training_step(batch)[0].item() == pytest.approx(ce, rel=1e-6)
    # away from theta*: + lambda/2 sum F (theta - theta*)^2
    ewc.theta_star.copy_(theta + 0.1)
    expected = ce + 7.0 * 0.5 * (ewc.fisher * 0.01).sum().item()
    assert ewc.training_step(batch)[0].item() == pytest.approx(expected, rel=1e-5)


def test_ewc_fisher_is_the_mean_squared_per_sample_gradient():
    model = _model()
    _perturb(model)
    names = [n for n, _ in model.named_parameters()]
    batch = _batch(n=7)
    mask = torch.tensor([True, True, True, False])
    y = batch["y"].clamp(max=2)
    fisher = empirical_fisher(model, names, batch["x"], y, mask, chunk=3)
    # by hand: one backward per sample (eval mode), squared, averaged
    model.eval()
    total = torch.zeros_like(fisher)
    for i in range(7):
        model.zero_grad()
        logits = model(batch["x"][i:i + 1]).masked_fill(~mask, float("-inf"))
        F.cross_entropy(logits, y[i:i + 1]).backward()
        total += torch.cat([p.grad.reshape(-1) for p in model.parameters()]).pow(2)
    torch.testing.assert_close(fisher, total / 7, rtol=1e-4, atol=1e-8)
    # the head row of the masked class gets no Fisher (the head's weight, 4 x 8, then its bias, 4)
    assert fisher[-4 - 4 * 8:-4].view(4, 8)[3].abs().sum() == 0 and fisher[-4 - 4 * 8:-4].abs().sum() > 0


def test_ewc_fisher_accumulates_as_alpha_old_plus_one_minus_alpha_new():
    old, new = torch.tensor([1.0, 0.0, 4.0]), torch.tensor([3.0, 2.0, 0.0])
    torch.testing.assert_close(merge_fisher(old, new, 0.5), torch.tensor([2.0, 1.0, 2.0]))
    ewc = EWC(_model(), {"fisher_alpha": "auto"}, 4)
    ctx = TaskContext(1, [2, 3], [0, 1, 2, 3], None, None, None, None, None, None, torch.device("cpu"))
    assert ewc._alpha(ctx) == pytest.approx(0.5)  # |old| / |seen| = 2 / 4
    ctx.new_classes, ctx.seen_classes = [3], [0, 1, 2, 3]
    assert ewc._alpha(ctx) == pytest.approx(0.75)


# --- lwf --------------------------------------------------------------------------------------
def test_lwf_kd_is_zero_when_the_model_equals_the_old_model():
    lwf = LwF(_model(), {"lamb": 1.0, "T": 2.0}, 4)
    lwf.begin_task(0, [0, 1], [0, 1])
    lwf.begin_task(1, [2, 3], [0, 1, 2, 3])  # old model: a frozen copy of the model
    assert all(not p.requires_grad for p in lwf.old_model.parameters())
    lwf.train()
    assert not lwf.old_model.training and lwf.model.training
    lwf.eval()
    batch = _batch()
    batch["y"] = batch["y"].clamp(min=2)  # the task's samples are new classes
    logits = lwf.model(batch["x"])
    assert kd_loss(logits[:, :2], lwf.old_model(batch["x"])[:, :2], 2.0).abs().item() < 1e-6
    # the loss is then the CE over the new classes' logits alone
    ce_new = F.cross_entropy(logits[:, 2:], batch["y"] - 2).item()
    assert lwf.training_step(batch)[0].item() == pytest.approx(ce_new, rel=1e-5, abs=1e-6)
    # once the model moves, KD > 0 and the loss is CE + lambda * KD
    _perturb(lwf.model, 0.3)
    logits = lwf.model(batch["x"])
    kd = kd_loss(logits[:, :2], lwf.old_model(batch["x"])[:, :2], 2.0).item()
    assert kd > 1e-4
    ce_new = F.cross_entropy(logits[:, 2:], batch["y"] - 2).item()
    assert lwf.training_step(batch)[0].item() == pytest.approx(ce_new + kd, rel=1e-5)


def test_lwf_kd_equals_hand_computed_kl_at_temperature():
    z = torch.tensor([[1.0, 0.0]])
    zo = torch.tensor([[0.0, 2.0]])
    p = torch.softmax(z / 2, 1)
    po = torch.softmax(zo / 2, 1)
    expected = (po * (po.log() - p.log())).sum()
    assert kd_loss(z, zo, 2.0).item() == pytest.approx(expected.item(), rel=1e-6)


# --- icarl ------------------------------------------------------------------------------------
class _Identity(nn.Module):
    num_features = 2

    def forward(self, x):
        return x


def test_icarl_nme_predicts_the_nearest_class_mean():
    learner = ICaRL(Classifier(_Identity(), 3), {}, 3)
    learner.begin_task(0, [0, 1, 2], [0, 1, 2])
    feats = {0: [[1.0, 0.0], [2.0, 0.2]], 1: [[0.0, 1.0], [0.1, 3.0]], 2: [[-1.0, 0.0], [-1.0, -0.1]]}
    mem = ExemplarMemory(6)
    mem.per_class = {c: torch.tensor([2 * c, 2 * c + 1]) for c in feats}
    table = torch.tensor([f for c in sorted(feats) for f in feats[c]])
    ctx = TaskContext(0, [0, 1, 2], [0, 1, 2], None, None, None, mem, lambda idx: table[idx], None,
                      torch.device("cpu"))
    learner.end_task(0, ctx)
    # mu_y = normalise(mean of normalised exemplar features)
    for c in feats:
        phi = F.normalize(torch.tensor(feats[c]), dim=1)
        torch.testing.assert_close(learner.class_means[c], F.normalize(phi.mean(0), dim=0))
    x = torch.tensor([[3.0, 0.5], [0.2, 5.0], [-2.0, 0.3], [0.7, 0.6]])
    logits = learner.predict(x)
    dist = torch.cdist(F.normalize(x, dim=1), learner.class_means)
    torch.testing.assert_close(logits, -dist)
    assert logits.argmax(1).tolist() == dist.argmin(1).tolist()
    assert logits.argmax(1)[:3].tolist() == [0, 1, 2]
    torch.testing.assert_close(nme_logits(x, learner.class_means), -dist)


def test_icarl_bce_targets_for_old_classes_are_the_old_models_sigmoid_outputs():
    learner = ICaRL(_model(), {}, 4)
    learner.begin_task(0, [0, 1], [0, 1])
    learner.begin_task(1, [2, 3], [0, 1, 2, 3])
    _perturb(learner.model, 0.3)
    learner.eval()
    batch = _batch()
    old_logits = learner.old_model(batch["x"])
    target = icarl_targets(batch["y"], old_logits, torch.tensor([True, True, False, False]))
    torch.testing.assert_close(target[:, :2], torch.sigmoid(old_logits[:, :2]))
    torch.testing.assert_close(target[:, 2:], F.one_hot(batch["y"], 4).float()[:, 2:])
    # the loss: BCE summed over the seen classes, averaged over the batch
    logits = learner.model(batch["x"])
    g = torch.sigmoid(logits)
    expected = -(target * g.log() + (1 - target) * (1 - g).log()).sum(1).mean()
    assert learner.training_step(batch)[0].item() == pytest.approx(expected.item(), rel=1e-5)
    # classes not seen yet do not enter the loss
    seen = torch.tensor([True, True, True, False])
    expected3 = -(target * g.log() + (1 - target) * (1 - g).log())[:, :3].sum(1).mean()
    assert icarl_loss(logits, target, seen).item() == pytest.approx(expected3.item(), rel=1e-5)


# --- der --------------------------------------------------------------------------------------
def test_der_feature_dim_grows_by_one_extractor_per_task_and_old_extractors_are_frozen():
    model = _model(k=6)
    der = DER(model, {}, 6)
    d = model.num_features
    x = _batch()["x"]
    der.begin_task(0, [0, 1], [0, 1])
    assert der.features(x).shape == (12, d) and der.aux_fc is None
    der.eval()
    logits_before = der.predict(x)
    der.begin_task(1, [2, 3], [0, 1, 2, 3])
    der.eval()
    assert der.features(x).shape == (12, 2 * d)
    # H_t starts as H_{t-1} on the old features: the logits do not change at the task boundary
    torch.testing.assert_close(der.predict(x), logits_before)
    der.begin_task(2, [4, 5], list(range(6)))
    assert der.features(x).shape == (12, 3 * d) and der.fc.in_features == 3 * d
    assert der.aux_fc.out_features == 3  # |new classes| + 1
    # old extractors: frozen, not in the optimizer, kept in eval mode
    der.train()
    for ext in der.extractors[:2]:
        assert not ext.training and all(not p.requires_grad for p in ext.parameters())
    assert der.extractors[2].training and all(p.requires_grad for p in der.extractors[2].parameters())
    trained = {id(p) for g in der.param_groups() for p in g["params"]}
    assert not trained & {id(p) for ext in der.extractors[:2] for p in ext.parameters()}
    assert {id(p) for p in der.extractors[2].parameters()} <= trained
    # the new extractor has fresh weights, not a copy of the old one
    assert not torch.equal(der.extractors[2].features[0].weight, der.extractors[1].features[0].weight)
    # a training step leaves the old extractors' weights and BN statistics alone
    before = {k: v.clone() for k, v in der.extractors[0].state_dict().items()}
    opt = torch.optim.SGD(der.param_groups(), lr=0.5)
    batch = _batch(k=6)
    loss, _ = der.training_step(batch)
    der.optimizer_step(loss, opt, lambda: loss)
    for k, v in der.extractors[0].state_dict().items():
        assert torch.equal(v, before[k]), k
    # the structure is replayed by begin_task: a fresh learner loads the state dict
    again = DER(_model(k=6), {}, 6)
    for t, (new, seen) in enumerate([([0, 1], [0, 1]), ([2, 3], [0, 1, 2, 3]), ([4, 5], list(range(6)))]):
        again.begin_task(t, new, seen)
    again.load_state_dict(der.state_dict())
    der.eval(), again.eval()
    torch.testing.assert_close(again.predict(x), der.predict(x))


def test_der_aux_targets_merge_old_classes_into_zero():
    y = torch.tensor([0, 5, 7, 3, 5])
    assert aux_targets(y, torch.tensor([5, 7])).tolist() == [0, 1, 2, 0, 1]


def test_der_loss_is_ce_plus_weighted_aux_ce():
    der = DER(_model(k=4), {"aux_weight": 0.5}, 4)
    der.begin_task(0, [0, 1], [0, 1])
    der.begin_task(1, [2, 3], [0, 1, 2, 3])
    der.eval()
    batch = _batch()
    feats = der.features(batch["x"])
    ce = F.cross_entropy(der.fc(feats), batch["y"])
    aux = F.cross_entropy(der.aux_fc(feats[:, -der.dim:]), aux_targets(batch["y"], torch.tensor([2, 3])))
    assert der.training_step(batch)[0].item() == pytest.approx((ce + 0.5 * aux).item(), rel=1e-5)


# --- end to end on digits B0Inc2 ---------------------------------------------------------------
needs_shared = pytest.mark.incremental_e2e  # shared inputs are built by conftest; never skipped


def _run(method, root: Path, overrides=None):
    from classlab.protocols.incremental import run_incremental

    run_incremental(method, DATA, B0INC2, "convnet", 0, root / "ck", root / "ev", {**EPOCHS, **(overrides or {})},
                    backbone_kwargs=CONVNET, threads=1, progress=False)
    preds = np.load(root / "ev" / "predictions.npz")
    scenario = json.loads(B0INC2.read_text())
    steps = [(preds[f"logits_task{t}"].argmax(1), preds[f"labels_task{t}"]) for t in range(len(scenario["tasks"]))]
    task_of = {c: t for t, task in enumerate(scenario["tasks"]) for c in task["classes"]}
    return {"last": last_accuracy(steps), "A": accuracy_matrix(steps, task_of), "root": root, "preds": preds}


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    return _run("finetune", tmp_path_factory.mktemp("finetune"))


@needs_shared
def test_ewc_end_to_end_keeps_fisher_and_theta_star(tmp_path):
    out = _run("ewc", tmp_path)
    assert (tmp_path / "ck" / "model.pt").exists() and (tmp_path / "ck" / "history.json").exists()
    state = torch.load(tmp_path / "ck" / "model.pt", weights_only=False)["learner"]
    assert state["fisher"].abs().sum() > 0 and torch.isfinite(state["fisher"]).all()
    assert out["A"][-1, -1] > 0.5  # the last task's classes, among 10 seen (chance 0.1)


@needs_shared
def test_lwf_end_to_end_retains_old_classes_that_finetune_forgets(tmp_path, finetune_run):
    out = _run("lwf", tmp_path)
    old_lwf = np.nanmean(out["A"][-1, :-1])
    old_ft = np.nanmean(finetune_run["A"][-1, :-1])
    assert old_lwf > old_ft, (out["A"], finetune_run["A"])


@needs_shared
def test_icarl_with_memory_beats_finetune_last_accuracy(tmp_path, finetune_run):
    out = _run("icarl", tmp_path)
    history = json.loads((tmp_path / "ck" / "history.json").read_text())
    assert history["tasks"][-1]["memory"] == 200
    assert out["last"] > finetune_run["last"] + 0.1, (out["last"], finetune_run["last"])


@needs_shared
def test_der_end_to_end_grows_and_resumes_to_the_same_predictions(tmp_path, monkeypatch):
    out = _run("der", tmp_path / "full")
    state = torch.load(tmp_path / "full" / "ck" / "model.pt", weights_only=False)["learner"]
    assert state["fc.weight"].shape == (10, 5 * 32) and "extractors.4.features.0.weight" in state
    assert out["A"][-1, -1] > 0.5
    # interrupted before task 3, then resumed: the same predictions as the uninterrupted run
    original = DER.begin_task

    def crash(self, task_id, new, seen):
        if task_id == 3:
            raise KeyboardInterrupt("simulated interruption")
        original(self, task_id, new, seen)

    monkeypatch.setattr(DER, "begin_task", crash)
    with pytest.raises(KeyboardInterrupt):
        _run("der", tmp_path / "resumed")
    assert (tmp_path / "resumed" / "ck" / "task2.pt").exists()
    monkeypatch.setattr(DER, "begin_task", original)
    resumed = _run("der", tmp_path / "resumed")
    for key in out["preds"].files:
        np.testing.assert_array_equal(resumed["preds"][key], out["preds"][key], err_msg=key)
