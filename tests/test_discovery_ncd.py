"""Novel class discovery: UNO (Sinkhorn-Knopp, swapped prediction) and CRKD (class-relation distillation)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.discovery_helpers import TINY_CONVNET, digits_split, tiny_run


@pytest.fixture(scope="module", autouse=True)
def single_threaded():
    """One torch thread: the tensors are tiny, and on a shared machine a spinning thread pool costs far
    more than it gives (module scope: the supervised init is trained once for the module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_classifier(num_classes: int, seed: int = 0):
    from classlab.models import build_classifier

    torch.manual_seed(seed)
    return build_classifier("convnet", 1, num_classes, img_size=8, backbone_kwargs=TINY_CONVNET)


def supervised_meta(classes: list[int]) -> dict:
    """What ``train`` records for a supervised model of ``classes`` (the fields the learners read)."""
    return {"family": "pretrain", "method": "supervised", "head_trained": True,
            "hparams": json.dumps({"classes": classes})}


# --- UNO: the core terms ---------------------------------------------------------------------------

def test_uno_sinkhorn_knopp_rows_are_distributions_and_clusters_share_the_batch():
    from classlab.methods.discovery.uno import sinkhorn_knopp

    eps = 0.05
    # exp(logits / eps) = P = [[4, 1], [4, 1], [1, 1], [1, 1]]: a plain softmax puts 2.6 of the 4 samples in
    # cluster 0 (rows .8/.2, .8/.2, .5/.5, .5/.5). SK's fixed point scales column 1 by c so that, once each
    # row is normalised, both columns hold B/K = 2: 2 c/(4 + c) + 2 c/(1 + c) = 2  =>  c^2 = 4, c = 2, so
    # Q = [[4, 2]/6, [4, 2]/6, [1, 2]/3, [1, 2]/3]: the tied samples go to the starved cluster.
    P = torch.tensor([[4.0, 1.0], [4.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    logits = eps * P.log()
    q = sinkhorn_knopp(logits, eps, iters=200)
    expected = torch.tensor([[2 / 3, 1 / 3], [2 / 3, 1 / 3], [1 / 3, 2 / 3], [1 / 3, 2 / 3]])
    assert torch.allclose(q, expected, atol=1e-5)
    assert torch.allclose(q.sum(1), torch.ones(4), atol=1e-6)
    assert torch.allclose(q.sum(0), torch.full((2,), 2.0), atol=1e-5)
    # the paper's 3 iterations: every row is exactly a distribution, the columns already near 2 / 2
    q3 = sinkhorn_knopp(logits, eps, iters=3)
    assert torch.allclose(q3.sum(1), torch.ones(4), atol=1e-6)
    assert torch.allclose(q3.sum(0), torch.full((2,), 2.0), atol=0.01)
    with pytest.raises(ValueError, match="sk_epsilon"):
        sinkhorn_knopp(logits, 0.0)


def test_uno_swapped_prediction_labels_each_view_with_the_other_views_targets():
    from classlab.methods.discovery.uno import swapped_prediction

    # tau = 1. View 0 predicts softmax([ln 3, 0]) = [3/4, 1/4], view 1 predicts [1/2, 1/2]; view 0's target
    # is class 0, view 1's class 1. Swapped: H(t_0, p_1) = -ln(1/2) = ln 2 and H(t_1, p_0) = -ln(1/4) = 2 ln 2,
    # mean 1.5 ln 2. (Unswapped it would be (ln(4/3) + ln 2) / 2.)
    logits = [torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, 0.0]])]
    targets = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])]
    assert float(swapped_prediction(logits, targets, 1.0)) == pytest.approx(1.5 * math.log(2), abs=1e-6)


def test_uno_targets_put_ground_truth_on_known_columns_and_sinkhorn_on_novel_ones():
    from classlab.methods.discovery.uno import uno_targets

    eps = 0.05
    # 2 known classes, 2 novel clusters. Rows 0 and 2 are labelled (label indices 1 and 0): one-hot on the
    # known columns. Rows 1 and 3 are unlabelled with exp(u / eps) = [[4, 1], [1, 4]], already balanced
    # (column sums 5 and 5), so SK only normalises the rows: [4/5, 1/5] and [1/5, 4/5], on the novel columns.
    novel = eps * torch.tensor([[1.0, 1.0], [4.0, 1.0], [1.0, 1.0], [1.0, 4.0]]).log()
    y = torch.tensor([1, -1, 0, -1])
    t = uno_targets(novel, y, num_known=2, epsilon=eps, iters=50)
    expected = torch.tensor([[0, 1, 0, 0], [0, 0, 0.8, 0.2], [1, 0, 0, 0], [0, 0, 0.2, 0.8]])
    assert torch.allclose(t, expected, atol=1e-5)
    with pytest.raises(ValueError, match="known classes"):
        uno_targets(novel, torch.tensor([2, -1, 0, -1]), num_known=2)


# --- CRKD: the core terms --------------------------------------------------------------------------

def test_crkd_class_relation_reads_the_known_columns_in_label_index_order():
    from classlab.methods.discovery.crkd import class_relation

    T = 4.0
    # the teacher's head has 4 dataset classes; the known ones are classes 2 (label index 0) and 0 (index 1).
    # Logits of classes 2 and 0: T ln 3 and 0, so r = softmax([ln 3, 0]) = [3/4, 1/4]; class 3's large logit
    # (not known) must not enter the relation.
    logits = torch.tensor([[0.0, 7.0, T * math.log(3.0), 9.0]])
    r = class_relation(logits, torch.tensor([2, 0]), T)
    assert torch.allclose(r, torch.tensor([[0.75, 0.25]]), atol=1e-6)


def test_crkd_weighted_kl_on_a_hand_made_pair():
    from classlab.methods.discovery.crkd import relation_distillation

    T = 2.0
    # Two novel samples, 2 known and 2 novel columns, one head; all logits given as T times the value that
    # enters the softmax. Sample A: r = [1/2, 1/2], student known head [0, 0] -> p = [1/2, 1/2], KL = 0.
    # Sample B: r = [3/4, 1/4], p = [1/2, 1/2]: KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 3/4 ln 3 - ln 2.
    # Weights (mass on the known columns): A all four logits 0 -> 1/2; B known [0, 0], novel [ln 1/3, ln 1/3]
    # -> 2 / (2 + 2/3) = 3/4. Mean 5/8, so w = [4/5, 6/5].
    # L = T^2 mean(w KL) = 4 * (4/5 * 0 + 6/5 * (3/4 ln 3 - ln 2)) / 2 = 12/5 (3/4 ln 3 - ln 2).
    known = torch.zeros(2, 2)
    every = T * torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, math.log(1 / 3), math.log(1 / 3)]]])
    relation = torch.tensor([[0.5, 0.5], [0.75, 0.25]])
    loss, w = relation_distillation(known, every, relation, T)
    assert torch.allclose(w, torch.tensor([[0.8, 1.2]]), atol=1e-6)
    assert float(loss) == pytest.approx(12 / 5 * (0.75 * math.log(3) - math.log(2)), abs=1e-6)
    # the weight is learnable: the loss reaches the student's novel logits through w
    every.requires_grad_(True)
    relation_distillation(known, every, relation, T)[0].backward()
    assert float(every.grad[0, 1, 2:].abs().sum()) > 0


def crkd_learner(known_classes: list[int], num_classes: int = 4):
    """A CRKD learner on a tiny ConvNet whose backbone (and teacher) is a 'supervised' Classifier of
    ``known_classes``, at the start of an NCD task with ``num_classes`` clusters."""
    from classlab.methods.discovery.crkd import CRKD
    from classlab.methods.discovery_learner import DiscoveryTask

    source = tiny_classifier(num_classes, seed=1)
    student = tiny_classifier(num_classes, seed=2)
    student.backbone.load_state_dict(source.backbone.state_dict())  # what the protocol's setup does
    hp = {"num_heads": 2, "overcluster_factor": 2, "proj_dim": 8, "proj_hidden": 16, "kd_weight": 1.0,
          "kd_temperature": 4.0, "method_augment": False, "lr": 0.1}
    learner = CRKD(student, hp, num_classes)
    learner.set_init_model(source, supervised_meta(known_classes))
    learner.begin_task(0, DiscoveryTask(0, len(known_classes), num_classes, kind="ncd",
                                        label_classes=list(known_classes)))
    return learner, source


def test_crkd_teacher_stays_frozen_and_outside_the_learner_state():
    torch.manual_seed(0)
    learner, source = crkd_learner([3, 1])
    # UNO's start: known prototype k is the init head's row of the class of label index k
    assert torch.allclose(learner.known_head.weight[:2], source.head.weight[[3, 1]])
    teacher = learner.teacher
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(8, 1, 8, 8)
    batch = {"x": x, "views": [x, x + 0.1 * torch.randn_like(x)], "y": torch.tensor([0, 1, 0, 1, -1, -1, -1, -1]),
             "index": torch.arange(8)}
    learner.train()
    assert not teacher.training
    optimizer = learner.configure_optimizer()
    student_before = {k: v.clone() for k, v in learner.model.backbone.state_dict().items()}
    loss, logs = learner.training_step(batch)
    learner.optimizer_step(loss, optimizer, lambda: learner.training_step(batch)[0])
    learner.on_after_step(batch, logs)
    assert float(logs["l_kd"]) > 0
    for key, value in teacher.state_dict().items():  # weights and BatchNorm statistics alike
        assert torch.equal(value, before[key]), key
    assert all(not p.requires_grad for p in teacher.parameters())
    trained = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in teacher.parameters()}
    assert not any("teacher" in k for k in learner.state_dict())
    # the student, which started from the same backbone, did move
    assert any(not torch.equal(v, student_before[k]) for k, v in learner.model.backbone.state_dict().items())
    # the learner's head tracker counted this step, once per head
    assert int(learner.head_loss_epoch) == 0 and bool((learner.head_loss > 0).all())
    assert learner.predict(x).shape == (8, 2)  # two novel clusters: 4 clusters, 2 known


def test_crkd_refuses_to_run_without_the_supervised_known_teacher():
    from classlab.methods.discovery.crkd import CRKD
    from classlab.methods.discovery_learner import DiscoveryTask

    learner = CRKD(tiny_classifier(4), {"num_heads": 1, "proj_hidden": 8}, 4)
    with pytest.raises(ValueError, match="supervised_known"):
        learner.begin_task(0, DiscoveryTask(0, 2, 4, kind="ncd", label_classes=[3, 1]))
    learner.set_init_model(tiny_classifier(4), supervised_meta([0, 2]))  # a teacher of other classes
    with pytest.raises(ValueError, match="known classes"):
        learner.begin_task(0, DiscoveryTask(0, 2, 4, kind="ncd", label_classes=[3, 1]))


def test_uno_and_crkd_yaml_hyperparameters_have_declared_types():
    from classlab.config import check_hparams, method_defaults

    for method in ("uno", "crkd"):
        assert check_hparams("discovery", method, method_defaults("discovery", method)) == []
    assert method_defaults("discovery", "crkd")["num_heads"] == method_defaults("discovery", "uno")["num_heads"]


# --- end to end on digits ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ncd_setup(digits_prepared, tmp_path_factory):
    """An ncd split of digits and the supervised-known init (1 epoch on the labelled known samples)."""
    from classlab.train import train

    work = tmp_path_factory.mktemp("ncd")
    split = digits_split(digits_prepared, work / "ncd.json", kind="ncd")
    manifest = json.loads(split.read_text())
    train("pretrain", "supervised", digits_prepared, "convnet", 0, work / "init",
          overrides={"epochs": 1, "batch_size": 64, "classes": manifest["known_classes"]},
          indices=manifest["labelled"], backbone_kwargs=TINY_CONVNET, progress=False)
    return split, manifest, work / "init" / "model.pt"


def check_ncd_predictions(out: dict, manifest: dict) -> None:
    z = out["predictions"]
    novel = len(manifest["novel_classes"])
    pred = z["pred_unlabelled_task0"]
    assert len(pred) == len(manifest["unlabelled"])
    assert set(z["labels_unlabelled_task0"].tolist()) == set(manifest["novel_classes"])
    assert pred.min() >= 0 and pred.max() < novel  # novel cluster ids 0..n_novel-1
    assert z["pred_test_task0"].max() < novel


def test_uno_tiny_run_on_an_ncd_split(digits_prepared, ncd_setup, tmp_path):
    split, manifest, init = ncd_setup
    out = tiny_run("uno", digits_prepared, split, tmp_path, init=init, overrides={"num_heads": 2})
    check_ncd_predictions(out, manifest)
    assert out["meta"]["init_kind"].startswith("pretrain/supervised")


def test_crkd_tiny_run_distills_the_teacher_relation(digits_prepared, ncd_setup, tmp_path):
    from classlab.methods.discovery.crkd import CRKD

    split, manifest, init = ncd_setup
    seen = []
    original = CRKD.extra_loss

    def spy(self, out, views, batch):
        loss, logs = original(self, out, views, batch)
        seen.append(float(logs["l_kd"]))
        return loss, logs

    CRKD.extra_loss = spy
    try:
        out = tiny_run("crkd", digits_prepared, split, tmp_path, init=init, overrides={"num_heads": 2})
    finally:
        CRKD.extra_loss = original
    check_ncd_predictions(out, manifest)
    assert seen and all(v > 0 and math.isfinite(v) for v in seen)
