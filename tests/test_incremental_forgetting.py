"""Continual forgetting: gs_lora (GS-LoRA / GS-LoRA++) and its protocol (classlab.protocols.forgetting)."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from classlab.data.scenarios import ScenarioError
from classlab.methods.incremental.gs_lora import (GSLoRA, bounded_forgetting_loss, group_sparse_norm,
                                                 prototype_distance)
from classlab.methods.registry import get_method
from classlab.models import build_classifier
from classlab.protocols.forgetting import summarize_forgetting, validate_forget_tasks

HP = {"lora_rank": 2, "lora_alpha": 2, "bound": 3.0, "beta": 0.5, "alpha": 0.1, "optimizer": "adamw", "lr": 0.05,
      "weight_decay": 0.0, "prototype_reg": False}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from classlab.data.prepare import prepare
    from classlab.data.registry import get_dataset

    root = tmp_path_factory.mktemp("digits")
    get_dataset("digits").download(root / "raw")  # scikit-learn's bundled digits, no network
    prepare("digits", root / "raw", root / "prepared")
    return root / "prepared"


def _learner(hp=None, depth=2):
    torch.manual_seed(0)
    model = build_classifier("vit_tiny", 1, 4, img_size=8, backbone_kwargs={"depth": depth})
    return GSLoRA(model, {**HP, **(hp or {})}, 4)


def test_gs_lora_is_registered_for_continual_forgetting_only():
    assert get_method("incremental", "gs_lora") is GSLoRA
    assert GSLoRA.scenario_kinds == ("continual_forgetting",)


def test_gs_lora_group_sparse_norm_is_the_sum_of_group_l2_norms():
    groups = [[torch.tensor([3.0, 4.0])], [torch.tensor([[1.0, 2.0], [2.0, 0.0]]), torch.tensor([4.0])]]
    # ||(3,4)|| + ||(1,2,2,0,4)|| = 5 + 5
    assert group_sparse_norm(groups).item() == pytest.approx(10.0)
    learner = _learner()
    with torch.no_grad():
        for p in learner.parameters():
            if p.requires_grad:
                p.normal_()
    expected = 0.0
    for block in learner.model.backbone.blocks:  # one group per block: A, B of fc1 and fc2
        layers = (block.mlp.fc1, block.mlp.fc2)
        sq = sum(float((m.lora_A["default"].weight.detach() ** 2).sum())
                 + float((m.lora_B["default"].weight.detach() ** 2).sum()) for m in layers)
        expected += math.sqrt(sq)
    assert len(learner.lora_groups()) == 2
    assert group_sparse_norm(learner.lora_groups()).item() == pytest.approx(expected, rel=1e-5)
    # an all-zero group has a zero (not NaN) gradient
    z = torch.zeros(3, requires_grad=True)
    group_sparse_norm([[z]]).backward()
    assert torch.equal(z.grad, torch.zeros(3))


def test_gs_lora_bounded_forgetting_loss_stops_at_the_bound():
    labels = torch.tensor([0, 1])
    logits = torch.zeros(2, 4, requires_grad=True)  # CE = log 4 = 1.386
    assert bounded_forgetting_loss(logits, labels, 2.0).item() == pytest.approx(2.0 - math.log(4))
    loss = bounded_forgetting_loss(logits, labels, 1.0)  # CE already above the bound
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(2, 4))
    confident = torch.tensor([[10.0, 0, 0, 0], [0, 10.0, 0, 0]])
    assert bounded_forgetting_loss(confident, labels, 1.0).item() == pytest.approx(
        1.0 - F.cross_entropy(confident, labels).item())


def test_gs_lora_prototype_distance_hand_computed():
    f = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
    p = torch.tensor([[0.0, 0.0]])            # softmax (1/2, 1/2)
    # KL(P || h) = 1/2 log(2) + 1/2 log(2/3)
    assert prototype_distance(f, p, "kl").item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert prototype_distance(p, p, "kl").item() == pytest.approx(0.0, abs=1e-7)
    assert prototype_distance(f, p, "l2").item() == pytest.approx(math.log(3.0) ** 2)


def test_gs_lora_adapters_only_on_ffn_and_base_frozen():
    learner = _learner()
    lora_modules = {n.rsplit(".lora_", 1)[0] for n, _ in learner.model.named_parameters() if ".lora_" in n}
    assert lora_modules == {f"backbone.blocks.{i}.mlp.{fc}" for i in range(2) for fc in ("fc1", "fc2")}
    trainable = [n for n, p in learner.model.named_parameters() if p.requires_grad]
    assert trainable and all(re.fullmatch(r"backbone\.blocks\.\d\.mlp\.fc[12]\.lora_[AB]\.default\.weight", n)
                             for n in trainable)
    frozen = {n: p.detach().clone() for n, p in learner.model.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad}
    learner.begin_task(0, [1], [0, 1, 2, 3])
    opt = learner.configure_optimizer()
    torch.manual_seed(1)
    batch = {"x": torch.randn(8, 1, 8, 8), "y": torch.tensor([0, 1, 2, 3, 1, 0, 2, 3])}
    learner.train()
    for _ in range(3):
        loss, _ = learner.training_step(batch)
        learner.optimizer_step(loss, opt, lambda: loss)
    for n, p in learner.model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen tensor {n} changed"
    assert any(not torch.equal(p, lora_before[n]) for n, p in learner.model.named_parameters() if n in lora_before)


def test_gs_lora_merge_keeps_the_function_and_gives_a_plain_classifier():
    learner = _learner()
    with torch.no_grad():
        for n, p in learner.model.named_parameters():
            if ".lora_B" in n:
                p.normal_(std=0.1)
    x = torch.randn(5, 1, 8, 8)
    learner.eval()
    before = learner.predict(x)
    plain = build_classifier("vit_tiny", 1, 4, img_size=8, backbone_kwargs={"depth": 2}).eval()
    plain.load_state_dict(learner.merged_state_dict())  # strict: exactly the plain keys
    assert torch.allclose(plain(x), before, atol=1e-5)
    learner.begin_task(1, [2], [0, 1, 2, 3])  # W <- W + s B A, fresh adapter (B = 0)
    assert torch.allclose(learner.predict(x), before, atol=1e-5)
    assert all(not p.detach().any() for n, p in learner.model.named_parameters() if ".lora_B" in n)
    assert learner.forgotten_mask.tolist() == [False, False, True, False]


def test_forgetting_metrics_and_task_validation_hand_computed():
    labels = np.array([0, 0, 1, 1, 2, 2])
    original = np.eye(3)[[0, 0, 1, 1, 2, 1]]          # 5/6 right
    after = np.eye(3)[[2, 2, 1, 1, 2, 2]]             # class 0 forgotten, retained all right
    m = summarize_forgetting(original, [after], labels, [[0]], 3)
    assert m["forgotten_accuracy"] == 0.0 and m["original_forgotten_accuracy"] == 1.0
    assert m["retained_accuracy"] == 1.0 and m["original_retained_accuracy"] == 0.75
    assert m["h_mean"] == pytest.approx(1.0)  # 2 * 1 * 1 / (1 + 1)
    with pytest.raises(ScenarioError, match="twice"):
        validate_forget_tasks([[0], [0]], 3)
    with pytest.raises(ScenarioError, match="keep at least one"):
        validate_forget_tasks([[0, 1], [2]], 3)
    with pytest.raises(ScenarioError, match="class id"):
        validate_forget_tasks([[5]], 3)


def test_gs_lora_end_to_end_forgets_two_digits_and_keeps_the_rest(tmp_path, digits):
    """A depth-2 ViT trained on all digits, then one forgetting task of classes 3 and 7."""
    from classlab.protocols.forgetting import run_continual_forgetting
    from classlab.train import load_model, train

    train("pretrain", "supervised", digits, "vit_tiny", 0, tmp_path / "pre",
          overrides={"epochs": 8, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05, "batch_size": 64,
                     "augment_pad": 1, "augment_hflip": False}, backbone_kwargs={"depth": 2}, threads=1,
          progress=False)
    out = run_continual_forgetting("gs_lora", digits, "vit_tiny", 0, tmp_path / "ck", tmp_path / "ev",
                                   tmp_path / "pre" / "model.pt", {"epochs": 5}, [[3, 7]], threads=1, progress=False)
    m = out["metrics"]
    assert m["original_forgotten_accuracy"] > 0.6  # the all-class model knew the classes ...
    assert m["forgotten_accuracy"] < 0.5 * m["original_forgotten_accuracy"]  # ... and forgot them
    assert m["forgotten_accuracy"] <= 0.2  # chance is 0.1
    assert m["retained_accuracy"] >= m["original_retained_accuracy"] - 0.05
    assert m["init_kind"].endswith("pretraining on all classes")  # reported in the table's init column
    for path in ("ck/model.pt", "ck/history.json", "ev/metrics.json", "ev/predictions.npz"):
        assert (tmp_path / path).exists(), path
    assert not (tmp_path / "ck" / "task0.pt").exists()
    model, meta = load_model(tmp_path / "ck" / "model.pt")  # a plain classifier with the LoRA merged
    assert meta["method"] == "gs_lora" and meta["forget_tasks"] == [[3, 7]]
    with np.load(tmp_path / "ev" / "predictions.npz") as z:
        assert z["logits_task0"].shape == (len(z["labels"]), 10)
