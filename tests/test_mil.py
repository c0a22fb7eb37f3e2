"""The mil protocol: bags of images, INS's instance classifier (``mil``) against attention pooling
(``mil_attention``): the pooling's equations, the pseudo-label rule on a hand case, the bag invariants,
both methods end to end on digits, and bad input refused before anything is written."""
import json
import math

import numpy as np
import pytest
import torch
import yaml

from classlab.config import METHOD_CONFIGS, ConfigError, resolve_checked_hparams
from classlab.engine import Trainer, TrainConfig
from classlab.methods.registry import get_method
from classlab.methods.single_paper.mil import momentum_prototypes, pseudo_label_update
from classlab.methods.single_paper.mil_attention import gather_bag_instances, segment_softmax
from classlab.models import build_classifier
from classlab.protocols.mil import PROTOCOL_KEYS, bags_from_lists, build_bags, run_mil

METHODS = ("mil", "mil_attention")
TINY = {"widths": [8, 16], "pool_after": [0]}
SMALL_BAGS = {"train_bags": 12, "val_bags": 8, "test_bags": 8, "bag_size_min": 3, "bag_size_max": 5,
              "witness_rate": 0.25, "epochs": 1}
FAST = {"mil": {**SMALL_BAGS, "batch_size": 16, "moco_queue": 32, "prot_start": 0},
        "mil_attention": {**SMALL_BAGS, "batch_size": 4, "embed_dim": 16, "attention_dim": 8}}


# --- attention pooling (Ilse et al., Eq. 6 and 9) -----------------------------------------------------
def test_segment_softmax_and_gather_on_a_hand_case():
    scores = torch.tensor([0.0, math.log(3.0), 5.0, 1.0, 1.0])
    owner = torch.tensor([0, 0, 1, 2, 2])
    a = segment_softmax(scores, owner, 3)
    assert torch.allclose(a, torch.tensor([0.25, 0.75, 1.0, 0.5, 0.5]), atol=1e-6)
    offsets = torch.tensor([0, 2, 5, 6])  # bags {0, 1}, {2, 3, 4}, {5}
    positions, local = gather_bag_instances(offsets, torch.tensor([2, 0, 1]))
    assert positions.tolist() == [5, 0, 1, 2, 3, 4] and local.tolist() == [0, 1, 1, 2, 2, 2]


def test_attention_weights_sum_to_one_and_follow_a_permutation_of_the_instances():
    torch.manual_seed(0)
    hp = resolve_checked_hparams("single_paper", "mil_attention", {"embed_dim": 16, "attention_dim": 8})
    model = build_classifier("convnet", 1, 2, img_size=8, backbone_kwargs=TINY)
    learner = get_method("single_paper", "mil_attention")(model, hp, 2).eval()
    x = torch.randn(9, 1, 8, 8)
    owner = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2])
    with torch.no_grad():
        h = learner.embed(x)
        logits, a = learner.bag_logits(h, owner, 3)
        by_bag = torch.zeros(3).index_add(0, owner, a)
        assert torch.allclose(by_bag, torch.ones(3), atol=1e-6)
        assert bool((a > 0).all())
        # z is the a-weighted sum of the bag's embeddings (Eq. 6)
        z, _ = learner.pool(h, owner, 3)
        assert torch.allclose(z[1], (a[3:7, None] * h[3:7]).sum(0), atol=1e-5)
        # permuting the instances (within and across bags) permutes the weights; the bags' logits stay
        perm = torch.tensor([8, 4, 1, 6, 0, 3, 7, 2, 5])
        logits_p, a_p = learner.bag_logits(learner.embed(x[perm]), owner[perm], 3)
        assert torch.allclose(a_p, a[perm], atol=1e-5)
        assert torch.allclose(logits_p, logits, atol=1e-5)
        # the protocol's scoring path agrees with the training path
        bag, inst = learner.bag_scores(learner.instance_outputs(x), owner, 3)
        assert torch.allclose(bag, torch.sigmoid(logits), atol=1e-5) and torch.allclose(inst["instance"], a, atol=1e-6)


# --- INS's pseudo-label rule (Qu et al.) -----------------------------------------------------------------
def test_pseudo_label_rule_on_a_hand_case():
    candidates = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]])  # two negative-bag, two positive-bag
    confidence = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5], [0.5, 0.5]])
    prototype_scores = torch.tensor([[0.2, 0.8], [0.9, 0.1], [0.3, 0.7], [0.6, 0.4]])
    new = pseudo_label_update(confidence, candidates, prototype_scores, phi=0.9)
    # negative bags: [1, 0] whatever the prototypes say (row 0 is nearer the positive prototype)
    assert new[:2].tolist() == [[1.0, 0.0], [1.0, 0.0]]
    # positive bags: s <- phi s + (1 - phi) onehot(argmax_{j in Y} softmax(q . mu)_j)
    assert torch.allclose(new[2], torch.tensor([0.45, 0.55])) and torch.allclose(new[3], torch.tensor([0.55, 0.45]))
    again = pseudo_label_update(new, candidates, prototype_scores, phi=0.9)
    assert torch.allclose(again[2], torch.tensor([0.405, 0.595]))  # progressively towards the prototype's label


def test_momentum_prototypes_equal_the_sequential_updates():
    torch.manual_seed(1)
    start = torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    q = torch.nn.functional.normalize(torch.randn(7, 4), dim=1)
    labels = torch.tensor([1, 0, 1, 1, 0, 1, 1])
    expected = start.clone()
    for row, c in zip(q, labels):  # mu_c <- gamma mu_c + (1 - gamma) q_i, one instance after the other
        expected[c] = 0.9 * expected[c] + 0.1 * row
    expected = torch.nn.functional.normalize(expected, dim=1)
    assert torch.allclose(momentum_prototypes(start, q, labels, 0.9), expected, atol=1e-6)


def test_ins_training_keeps_negative_instances_negative_and_moves_the_positive_ones():
    torch.manual_seed(0)
    hp = resolve_checked_hparams("single_paper", "mil", {"epochs": 2, "batch_size": 8, "moco_queue": 16,
                                                         "prot_start": 0, "augment_pad": 1})
    learner = get_method("single_paper", "mil")(build_classifier("convnet", 1, 2, img_size=8, backbone_kwargs=TINY), hp, 2)
    x = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    bag_labels = torch.tensor([0] * 8 + [1] * 8)
    trainer = Trainer(learner, TrainConfig.from_hparams(hp), torch.device("cpu"), 0, None, False)
    trainer.fit(trainer.make_loader(x, bag_labels, [0.5], [0.25]))
    conf = learner.confidence
    assert conf.shape == (16, 2) and torch.allclose(conf.sum(1), torch.ones(16))
    assert torch.equal(conf[:8], torch.tensor([[1.0, 0.0]] * 8))          # negative bags: always [1, 0]
    assert bool((conf[8:] != 0.5).any(1).all())                           # positive bags: moved off [1/2, 1/2]
    assert int(learner.queue_count) == 16
    # every instance of a negative bag is pseudo-labelled 0, so the negative prototype is a unit vector
    assert float(learner.prototypes[0].norm()) == pytest.approx(1.0, abs=1e-5)


# --- bags ----------------------------------------------------------------------------------------------
def test_bags_hold_their_witnesses_and_no_instance_twice():
    labels = np.repeat(np.arange(5), 60)  # 60 instances of each of 5 classes
    bags = build_bags(labels, 2, 20, 4, 9, 0.2, 0.5, seed=3, split="train")
    assert bags.n_bags == 20 and bags.labels.sum() == 10
    assert len(np.unique(bags.instances)) == bags.n_instances  # no instance in two bags
    for b in range(bags.n_bags):
        members = labels[bags.instances[bags.offsets[b]:bags.offsets[b + 1]]]
        assert 4 <= len(members) <= 9
        witnesses = int((members == 2).sum())
        if bags.labels[b]:
            assert witnesses == max(1, round(0.2 * len(members)))
        else:
            assert witnesses == 0
    assert np.array_equal(bags.instance_labels, (labels[bags.instances] == 2).astype(int))
    again = build_bags(labels, 2, 20, 4, 9, 0.2, 0.5, seed=3, split="train")
    other = build_bags(labels, 2, 20, 4, 9, 0.2, 0.5, seed=4, split="train")
    assert np.array_equal(again.instances, bags.instances) and not np.array_equal(other.instances, bags.instances)


def test_the_splits_bags_share_no_image(digits_prepared):
    from classlab.data.prepare import load_prepared

    data = load_prepared(digits_prepared)
    used = {}
    for split in ("train", "val", "test"):
        part = getattr(data, split)
        bags = build_bags(part.y.numpy(), 0, 8, 3, 5, 0.25, 0.5, seed=0, split=split)
        assert bags.labels.any() and not bags.labels.all()
        used[split] = set(part.source_index[torch.as_tensor(bags.instances)].tolist())
    # train and val are carved from the raw training images, test from the raw test images
    assert not used["train"] & used["val"]
    assert len(data.test.y) and data.manifest["splits"]["test"]["source"] == "raw test"


def test_an_explicit_bag_list_is_validated():
    labels = np.array([0, 1, 2, 0, 1, 2])
    ok = bags_from_lists([[0, 1], [2, 4]], labels, target_class=0, split="val")
    assert ok.labels.tolist() == [1, 0] and ok.offsets.tolist() == [0, 2, 4]
    with pytest.raises(ConfigError, match=r"bags\.val\[1\]: the bag has no instances"):
        bags_from_lists([[0, 1], [], [2]], labels, 0, "val")
    with pytest.raises(ConfigError, match=r"bags\.val\[1\]: an instance appears twice"):
        bags_from_lists([[0, 1], [1, 2]], labels, 0, "val")
    with pytest.raises(ConfigError, match=r"bags\.val\[0\]: instance positions"):
        bags_from_lists([[0, 9]], labels, 0, "val")
    with pytest.raises(ConfigError, match=r"bags\.val\[1\]: bag label 1"):
        bags_from_lists([[0], [1, 2]], labels, 0, "val", bag_labels=[1, 1])
    with pytest.raises(ConfigError, match="bag_size_min"):
        build_bags(labels, 0, 2, 0, 2, 0.5, 0.5, seed=0, split="train")


def test_both_yamls_declare_the_same_protocol_defaults():
    docs = {m: yaml.safe_load((METHOD_CONFIGS / "single_paper" / f"{m}.yaml").read_text()) for m in METHODS}
    for key in PROTOCOL_KEYS:
        assert docs["mil"]["hparams"][key] == docs["mil_attention"]["hparams"][key], key
        assert docs["mil"]["schema"][key] == docs["mil_attention"]["schema"][key], key
    assert all(docs[m]["scenario_kinds"] == ["mil_bags"] for m in METHODS)


# --- the protocol ----------------------------------------------------------------------------------------
def test_both_methods_run_end_to_end_on_digits(digits_prepared, tmp_path):
    runs = {}
    for method in METHODS:
        out = tmp_path / method
        runs[method] = run_mil(method, digits_prepared, 0, out, overrides=FAST[method], backbone_kwargs=TINY, threads=1)
        saved = json.loads((out / "metrics.json").read_text())
        for key in ("protocol", "method", "seed", "dataset", "bag_auc", "instance_auc", "instance_auc_single",
                    "val_bag_auc", "val_instance_auc", "train_bags", "train_instances", "test_bags",
                    "test_instances", "val_bags", "positive_fraction", "train_witness_fraction", "instance_score",
                    "train_steps", "train_seconds", "val_curve", "history", "hparams", "fingerprint", "provenance"):
            assert key in saved, key
        assert saved["protocol"] == "mil" and saved["method"] == method and saved["dataset"] == "digits"
        assert 0.0 <= saved["bag_auc"] <= 1.0 and 0.0 <= saved["instance_auc"] <= 1.0
        assert saved["train_bags"] == 12 and saved["test_bags"] == 8 and saved["positive_fraction"] == 0.5
        assert [row["epoch"] for row in saved["val_curve"]] == [1] and saved["train_steps"] > 0
        assert not (out / "last.pt").exists()
        with np.load(out / "predictions.npz") as z:
            assert len(z["bag_scores"]) == 8 and len(z["instance_scores"]) == saved["test_instances"]
    assert runs["mil"]["instance_score"] == "classifier_probability" and runs["mil"]["instance_auc_single"] is None
    assert runs["mil_attention"]["instance_score"] == "attention_weight"
    assert runs["mil_attention"]["instance_auc_single"] is not None
    # the same seed draws the same bags for both methods
    assert runs["mil"]["bags_digest"] == runs["mil_attention"]["bags_digest"]


@pytest.mark.parametrize("overrides, field", [
    ({"bag_size_min": 0}, "bag_size_min"),
    ({"bag_size_min": 6, "bag_size_max": 4}, "bag_size_max"),
    ({"witness_rate": 0.0}, "witness_rate"),
    ({"witness_rate": 1.5}, "witness_rate"),
    ({"target_class": 10}, "target_class"),
    ({"train_bags": 5000}, "train_bags"),
])
def test_bad_input_is_refused_before_anything_is_written(digits_prepared, tmp_path, overrides, field):
    out = tmp_path / "run"
    for method in METHODS:
        with pytest.raises(ConfigError, match=field):
            run_mil(method, digits_prepared, 0, out, overrides={**FAST[method], **overrides}, backbone_kwargs=TINY,
                    threads=1)
        assert not out.exists()
