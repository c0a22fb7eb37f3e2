"""Non-exemplar class-incremental methods: napa_vq (NAPA-VQ) and prd (PRD).

Unit tests of each core equation on hand-computed small tensors, then one tiny end-to-end run
of each method through ``run_incremental`` on the shared digits B0Inc2 scenario (threads=1).
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from classlab.methods.incremental.napa_vq import NapaVQ, na_loss, sq_dists, update_edges
from classlab.methods.incremental.prd import (PRD, prototype_loss, relation_distillation, relation_scores,
                                              supcon_loss)
from classlab.methods.registry import get_method
from classlab.models import build_classifier

from tests.shared_data import SHARED  # noqa: E402  (built by conftest before the tests run)


def _model(k=4, widths=(8, 8)):
    torch.manual_seed(0)
    return build_classifier("convnet", 1, k, backbone_kwargs={"widths": list(widths), "pool_after": [0]})


def test_both_methods_are_registered_and_replay_free():
    assert get_method("incremental", "napa_vq") is NapaVQ
    assert get_method("incremental", "prd") is PRD
    assert not NapaVQ.uses_memory and not PRD.uses_memory
    assert PRD.num_views == 2


# --- NAPA-VQ ------------------------------------------------------------------------------

NAPA_HP = {"lr": 0.01, "temperature": 0.1, "code_lr": 0.1, "code_lr_incremental": 0.1, "na_k": 2,
           "edge_decay": 0.9, "edge_min": 0.9 ** 10, "na_softmin": 1e-3, "gamma_min": 0.5}


def _napa(k=4):
    model = _model(k)
    learner = NapaVQ(model, NAPA_HP, k)
    dim = model.num_features
    with torch.no_grad():
        learner.codes.copy_(torch.eye(k, dim) * 2.0)
    return learner, dim


def _code_step(learner, feats, y):
    """One NAPA-VQ update of the codes for fixed features (the network is not involved)."""
    l_dce, l_na, _ = learner._losses(feats, y)
    dummy = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([dummy], lr=0.0)
    opt.param_groups[0]["base_lr"] = 0.0
    learner.optimizer_step(l_dce + l_na + 0.0 * dummy.sum(), opt, None)


def test_napa_vq_codebook_update_moves_the_winning_code_towards_the_sample():
    learner, dim = _napa()
    learner.begin_task(0, [0, 1], [0, 1])
    x = torch.zeros(1, dim)
    x[0, 0], x[0, 2] = 1.0, 0.5      # nearest code is w_0 = 2 e_0 (its own class)
    before = learner.codes.detach().clone()
    _code_step(learner, x, torch.tensor([0]))
    after = learner.codes.detach()
    assert (after[0] - x[0]).norm() < (before[0] - x[0]).norm()          # w_0 moved towards x
    assert torch.dot(after[0] - before[0], x[0] - before[0]) > 0
    assert (after[1] - x[0]).norm() > (before[1] - x[0]).norm()          # the other class's code moved away
    assert torch.equal(after[2:], before[2:])                           # unseen codes untouched


def test_napa_vq_old_codes_are_frozen_in_later_tasks():
    learner, dim = _napa()
    learner.begin_task(0, [0, 1], [0, 1])
    learner.begin_task(1, [2, 3], [0, 1, 2, 3])
    before = learner.codes.detach().clone()
    x = torch.randn(6, dim)
    _code_step(learner, x, torch.tensor([0, 1, 2, 3, 2, 3]))
    assert torch.equal(learner.codes.detach()[:2], before[:2])
    assert not torch.equal(learner.codes.detach()[2:], before[2:])


def test_napa_vq_neighbour_graph_links_the_two_nearest_codes_and_ages_edges():
    codes = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.5]])
    valid = torch.ones(3, dtype=torch.bool)
    edges = torch.eye(3)
    x = torch.tensor([[0.2, 0.0]])                      # winner 0, second nearest 1
    edges = update_edges(edges, sq_dists(x, codes), valid, k=2, decay=0.9, e_min=0.9 ** 10)
    # E_01 <- 1, then E <- (E + E^T) / 2
    assert edges[0, 1] == pytest.approx(0.5) and edges[1, 0] == pytest.approx(0.5)
    assert edges[0, 2] == 0 and edges[1, 2] == 0
    assert torch.equal(edges.diag(), torch.ones(3))
    x = torch.tensor([[0.0, 0.6]])                      # winner 0 again, second nearest now 2
    edges = update_edges(edges, sq_dists(x, codes), valid, k=2, decay=0.9, e_min=0.9 ** 10)
    # E_01 aged once: (0.5 * 0.9 + 0.5) / 2;  E_02 <- (1 + 0) / 2
    assert edges[0, 1] == pytest.approx((0.45 + 0.5) / 2)
    assert edges[0, 2] == pytest.approx(0.5)
    for _ in range(12):                                 # edge 0-1 never refreshed: aged out below e_min
        edges = update_edges(edges, sq_dists(x, codes), valid, k=2, decay=0.9, e_min=0.9 ** 10)
    assert edges[0, 1] == 0 and edges[0, 2] > 0
    # codes of unseen classes take no part
    edges = update_edges(torch.eye(3), sq_dists(torch.tensor([[0.2, 0.0]]), codes),
                         torch.tensor([True, False, True]), k=2, decay=0.9, e_min=0.9 ** 10)
    assert edges[0, 1] == 0 and edges[0, 2] == pytest.approx(0.5)


def test_napa_vq_na_loss_hand_computed():
    # own code at squared distance 1, neighbours at 4 and 9, a non-neighbour at 0.25
    d2 = torch.tensor([[1.0, 4.0, 9.0, 0.25]])
    edges = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]])
    valid = torch.ones(4, dtype=torch.bool)
    lam = math.log(2.0) / 5.0            # softmin weights exp(-4 lam) : exp(-9 lam) = 2 : 1
    d_neg = 2 / 3 * 4.0 + 1 / 3 * 9.0    # 17/3
    assert na_loss(d2, torch.tensor([0]), edges, valid, lam).item() == pytest.approx(0.0)   # ReLU(1 - 17/3)
    d2_far = torch.tensor([[10.0, 4.0, 9.0, 0.25]])
    assert na_loss(d2_far, torch.tensor([0]), edges, valid, lam).item() == pytest.approx(10.0 - d_neg, rel=1e-5)
    # no neighbours: only the pull term remains
    assert na_loss(d2_far, torch.tensor([3]), edges, valid, lam).item() == pytest.approx(0.25)


def test_napa_vq_augmented_prototypes_lie_between_an_old_class_and_its_neighbours():
    learner, dim = _napa()
    learner.begin_task(0, [0, 1], [0, 1])
    learner.begin_task(1, [2, 3], [0, 1, 2, 3])
    with torch.no_grad():
        learner.prototypes[:4] = torch.eye(4, dim) * 4.0
        learner.edges.copy_(torch.eye(4))
        learner.edges[0, 2] = learner.edges[2, 0] = 0.5   # class 0 neighbours class 2 (a new class)
    torch.manual_seed(1)
    p_aug, labels = learner.augmented_prototypes(400)
    assert set(labels.tolist()) == {0, 1}                 # old classes only
    p = learner.prototypes
    for v, c in zip(p_aug, labels):
        coeff = v[:4] / 4.0                                # p_aug = gamma p_c + (1 - gamma) p_n
        assert coeff[c] >= 0.5 - 1e-6 and coeff.sum() == pytest.approx(1.0)
        assert torch.count_nonzero(v[4:]) == 0
        if c == 1:
            assert torch.allclose(v, p[1])                # class 1 has no neighbour but itself
    mixed = p_aug[labels == 0][:, 2]
    assert (mixed > 0).any() and (mixed <= 2.0 + 1e-6).all()  # some drawn towards class 2, gamma >= 0.5


def test_napa_vq_predicts_the_nearest_normalised_code():
    learner, dim = _napa()
    learner.eval()
    x = torch.randn(5, 1, 8, 8)
    f = F.normalize(learner.model.features(x), dim=1)
    w = F.normalize(learner.codes, dim=1)
    assert torch.equal(learner.predict(x).argmax(1), torch.cdist(f, w).argmin(1))


# --- PRD ----------------------------------------------------------------------------------

def test_prd_supcon_hand_computed_on_four_samples():
    # two classes, two unit vectors each: z1 = z2 = e1, z3 = z4 = -e1; tau = tau_b = 1
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # each anchor: one positive (dot 1) over {1, -1, -1}: -log(e / (e + 2/e))
    expected = math.log(math.e + 2 / math.e) - 1.0
    assert supcon_loss(z, labels, 1.0, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # a non-symmetric case against the definition written out with loops; tau / tau_b scaling
    torch.manual_seed(0)
    z = F.normalize(torch.randn(4, 3), dim=1)
    labels = torch.tensor([0, 1, 0, 0])
    tau, tau_b = 0.5, 0.25
    total = 0.0
    for i in range(4):
        pos = [p for p in range(4) if p != i and labels[p] == labels[i]]
        denom = sum(math.exp(float(z[i] @ z[a]) / tau) for a in range(4) if a != i)
        terms = [float(z[i] @ z[p]) / tau - math.log(denom) for p in pos]
        total += sum(terms) / len(pos) if pos else 0.0
    assert supcon_loss(z, labels, tau, tau_b).item() == pytest.approx(-(tau / tau_b) * total / 4, rel=1e-5)


def test_prd_relation_distillation_is_zero_when_relations_match_and_positive_otherwise():
    torch.manual_seed(0)
    feats, protos = torch.randn(6, 5), torch.randn(3, 5)
    s = relation_scores(feats, protos)
    assert relation_distillation(s, s).item() == pytest.approx(0.0, abs=1e-7)
    # softmax over prototypes: a per-sample shift of all scores leaves the relation unchanged
    assert relation_distillation(s + torch.randn(6, 1), s).item() == pytest.approx(0.0, abs=1e-6)
    # rescaled prototypes: s_c = <F(x), p_c> / ||p_c|| does not change
    assert torch.allclose(relation_scores(feats, protos * 3.0), s, atol=1e-6)
    assert relation_distillation(relation_scores(feats, protos.flip(0)), s).item() > 0.01
    # hand-computed KL(q || r) for one sample, two old prototypes, T = 1
    old, new = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])
    q = torch.tensor([0.25, 0.75])
    kl = float((q * (q / 0.5).log()).sum())
    assert relation_distillation(new, old).item() == pytest.approx(kl, rel=1e-6)
    # the temperature sharpens both distributions
    assert relation_distillation(new, old, 0.5).item() > kl


def test_prd_prototype_loss_is_one_minus_cosine_and_leaves_the_representation_alone():
    feats = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    protos = torch.tensor([[1.0, 1.0], [0.0, 1.0]], requires_grad=True)
    loss = prototype_loss(feats, protos, torch.tensor([0, 1]))
    assert loss.item() == pytest.approx(((1 - 1 / math.sqrt(2)) + 0.0) / 2)
    loss.backward()
    assert feats.grad is None and protos.grad is not None


def test_prd_step_distills_only_in_later_tasks_and_predicts_the_nearest_prototype():
    learner = PRD(_model(), {"lr": 0.01, "projection_hidden": 16, "projection_dim": 8}, 4)
    x = torch.randn(6, 1, 8, 8)
    batch = {"x": x, "views": [x, x.flip(-1)], "y": torch.tensor([0, 1, 0, 1, 0, 1])}
    learner.begin_task(0, [0, 1], [0, 1])
    learner.train()
    _, logs = learner.training_step(batch)
    assert "distill" not in logs
    learner.end_task(0, None)
    assert torch.equal(learner.old_prototypes, learner.prototypes.detach())
    learner.begin_task(1, [2, 3], [0, 1, 2, 3])
    batch["y"] = torch.tensor([2, 3, 2, 3, 2, 3])
    loss, logs = learner.training_step(batch)
    assert logs["distill"].item() == pytest.approx(0.0, abs=1e-6)   # student == teacher at the task start
    loss.backward()
    assert learner.prototypes.grad[2:].abs().sum() > 0           # L_p trains the new prototypes
    learner.eval()
    f = F.normalize(learner.model.features(x), dim=1)
    assert torch.equal(learner.predict(x).argmax(1), (f @ F.normalize(learner.prototypes, dim=1).T).argmax(1))


# --- end to end on the shared digits B0Inc2 scenario --------------------------------------

@pytest.fixture(scope="module")
def b0inc2(tmp_path_factory):
    """The shared digits data and B0Inc2 scenario (class-order seed 0); built here if absent."""
    if (SHARED / "prepared" / "digits").is_dir() and (SHARED / "scenarios" / "digits_b0inc2.json").exists():
        return SHARED / "prepared" / "digits", SHARED / "scenarios" / "digits_b0inc2.json"
    from classlab.data.prepare import load_prepared, prepare
    from classlab.data.registry import get_dataset
    from classlab.data.scenarios import build_scenario

    root = tmp_path_factory.mktemp("digits")
    get_dataset("digits").download(root / "raw")  # scikit-learn's bundled digits, no network
    prepare("digits", root / "raw", root / "prepared")
    labels = load_prepared(root / "prepared").train.y.numpy()
    build_scenario("class_incremental", "digits", labels, 10, seed=0, initial=0, increment=2).save(root / "b0inc2.json")
    return root / "prepared", root / "b0inc2.json"


def _run(method, data, scenario, tmp_path, overrides):
    from classlab.protocols.incremental import run_incremental

    out = run_incremental(method, data, scenario, "convnet", 0, tmp_path / "ck", tmp_path / "ev", overrides=overrides,
                          backbone_kwargs={"widths": [16, 32], "pool_after": [0]}, threads=1, progress=False)
    preds = np.load(tmp_path / "ev" / "predictions.npz")
    acc = [float((preds[f"logits_task{t}"].argmax(1) == preds[f"labels_task{t}"]).mean()) for t in range(5)]
    return out, acc, torch.load(tmp_path / "ck" / "model.pt", weights_only=False)["learner"]


def test_napa_vq_end_to_end_b0inc2_keeps_old_codes_and_learns_each_task(b0inc2, tmp_path, monkeypatch):
    codes_after = []
    end_task = NapaVQ.end_task

    def spy(self, task_id, context):
        end_task(self, task_id, context)
        codes_after.append(self.codes.detach().clone())

    monkeypatch.setattr(NapaVQ, "end_task", spy)
    out, acc, state = _run("napa_vq", *b0inc2, tmp_path, {"epochs": 3, "batch_size": 32})
    order = out["meta"]["class_order"]
    assert len(out["history"]) == 5 and all(h["memory"] == 0 for h in out["history"])
    # old classes' codes are frozen after their task: the first task's codes never move again
    first = torch.tensor(order[:2])
    assert all(torch.equal(c[first], codes_after[0][first]) for c in codes_after)
    assert torch.equal(state["codes"][first], codes_after[0][first])
    assert acc[0] > 0.6          # 2 classes: chance 0.5
    assert acc[-1] > 0.15        # 10 classes: chance 0.1


def test_prd_end_to_end_b0inc2_distils_and_beats_chance(b0inc2, tmp_path):
    out, acc, state = _run("prd", *b0inc2, tmp_path, {"epochs": 3, "batch_size": 32, "lr": 0.05})
    assert len(out["history"]) == 5 and all(h["memory"] == 0 for h in out["history"])
    assert torch.equal(state["old_prototypes"], state["prototypes"])   # recorded at the end of the last task
    assert acc[0] > 0.7          # 2 classes: chance 0.5
    # above chance after every task (2, 4, ..., 10 classes); one seed's accuracy after task 1 spreads
    # widely (0.28-0.58 over seeds 0-2 on digits), so a margin over chance would test the seed
    assert all(a > 1 / (2 * (t + 1)) for t, a in enumerate(acc)), acc


# --- PASS prototype augmentation (NAPA-VQ's baseline) ---------------------------------------

def test_pass_radius_is_root_mean_trace_over_dimension_hand_computed():
    from classlab.methods.incremental.pass_protoaug import class_radius

    feats = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 10.0], [10.0, 14.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # class 0: variances (2, 0), tr/D = 1; class 1: variances (0, 8), tr/D = 4; r = sqrt(2.5)
    assert class_radius(feats, labels) == pytest.approx(math.sqrt(2.5))


def test_pass_augmented_prototypes_are_old_classes_with_gaussian_spread():
    from classlab.methods.incremental.pass_protoaug import PASSProtoAug

    learner = PASSProtoAug(_model(4), {"temperature": 0.1}, 4)
    dim = learner.prototypes.shape[1]
    learner.begin_task(0, [0, 1], [0, 1])
    learner.prototypes[:2] = torch.stack([torch.full((dim,), 5.0), torch.full((dim,), -5.0)])
    learner.radius.fill_(0.5)
    learner.begin_task(1, [2, 3], [0, 1, 2, 3])
    torch.manual_seed(0)
    p_aug, c = learner.augmented_prototypes(4000)
    assert set(c.tolist()) == {0, 1}                           # old classes only
    noise = p_aug - learner.prototypes[c]
    assert noise.mean().abs() < 0.02 and noise.std() == pytest.approx(0.5, rel=0.03)


def test_pass_step_adds_distillation_and_proto_aug_only_after_the_first_task():
    from classlab.methods.incremental.pass_protoaug import PASSProtoAug

    torch.manual_seed(0)
    learner = PASSProtoAug(_model(4), {"temperature": 0.1, "kd_weight": 10.0, "proto_aug_weight": 10.0}, 4)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 0, 1, 0, 1])
    learner.begin_task(0, [0, 1], [0, 1])
    loss0, logs0 = learner.training_step({"x": x, "y": y})
    assert "kd" not in logs0
    logits = learner.model(x).masked_fill(~learner.seen_mask, float("-inf"))
    assert float(loss0.detach()) == pytest.approx(float(F.cross_entropy(logits / 0.1, y).detach()), rel=1e-5)
    learner.prototypes[:2] = torch.randn(2, learner.prototypes.shape[1])
    learner.begin_task(1, [2, 3], [0, 1, 2, 3])
    learner.eval()  # student and teacher both on running BatchNorm statistics
    _, logs1 = learner.training_step({"x": x, "y": torch.tensor([2, 3, 2, 3, 2, 3])})
    assert float(logs1["kd"]) == pytest.approx(0.0, abs=1e-6)  # the teacher is the model as it is now
    assert float(logs1["proto_aug"]) > 0


def test_pass_end_to_end_b0inc2_sets_a_radius_and_beats_chance(b0inc2, tmp_path):
    out, acc, state = _run("pass_protoaug", *b0inc2, tmp_path, {"epochs": 3, "batch_size": 32, "lr": 0.01})
    assert len(out["history"]) == 5 and all(h["memory"] == 0 for h in out["history"])
    assert float(state["radius"]) > 0
    assert acc[0] > 0.6          # 2 classes: chance 0.5
    assert acc[-1] > 0.15        # 10 classes: chance 0.1
