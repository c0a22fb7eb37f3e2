"""The metric family: retrieval metrics on hand cases, each method's core term, the protocol end to end
and its rejections. Methods: contrastive, multi_similarity, proxy_anchor (pml's losses with the papers'
parameters), ecaml (energy confusion) and metrix (mixup with mixed labels)."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from classlab.config import METHOD_CONFIGS, ConfigError, resolve_checked_hparams
from classlab.metrics.retrieval import retrieval_metrics
from classlab.models import build_classifier
from classlab.methods.metric_learner import METHODS, SHARED_KEYS, base_loss_hparams, method_class
from classlab.protocols.metric import run_metric

TINY = {"widths": [8, 16], "pool_after": [0]}
FAST = {"epochs": 1, "samples_per_class": 24, "eval_per_class": 12, "batch_size": 32, "embedding_size": 8}


def make_learner(method, overrides=None, num_classes=3, seed=0):
    torch.manual_seed(seed)
    hp = resolve_checked_hparams("metric", method, {"embedding_size": 4, **(overrides or {})})
    model = build_classifier("convnet", 1, 4, backbone_kwargs=TINY)
    return method_class(method)(model, hp, num_classes)


# --- retrieval metrics ------------------------------------------------------------------------------
def test_recall_and_map_at_r_on_a_hand_case():
    # 1-D embeddings (not normalised: the metrics take the embeddings as given); classes A = 0, B = 1.
    x = np.array([[0.0], [2.0], [10.0], [1.2], [11.0], [12.5]])
    y = np.array([0, 0, 0, 1, 1, 1])
    # neighbours (self excluded), nearest first:
    #   0 (A): 1.2B 2A 10A ...       R@1 no, R@2 yes; R = 2: [B, A] -> AP = (0 + 1/2) / 2 = 0.25
    #   2 (A): 1.2B 0A 10A ...       R@1 no, R@2 yes; AP 0.25
    #   10 (A): 11B 12.5B 2A ...     R@2 no, R@4 yes; AP 0
    #   1.2 (B): 2A 0A 10A 11B       R@2 no, R@4 yes; AP 0
    #   11 (B): 10A 12.5B ...        R@1 no, R@2 yes; AP 0.25
    #   12.5 (B): 11B 10A ...        R@1 yes; AP = (1 + 0) / 2 = 0.5
    out = retrieval_metrics(x, y)
    assert out["recall_at_1"] == pytest.approx(1 / 6)
    assert out["recall_at_2"] == pytest.approx(4 / 6)
    assert out["recall_at_4"] == pytest.approx(1.0) and out["recall_at_8"] == pytest.approx(1.0)
    assert out["map_at_r"] == pytest.approx(1.25 / 6)
    assert out["n_queries"] == 6


def test_the_query_itself_is_never_its_own_neighbour_and_lone_queries_are_left_out():
    # each query's nearest *other* point is of the other class (counting itself, every query would be
    # right at K = 1); the lone class-2 point is not scored
    x = np.array([[0.0], [1.0], [1.6], [2.4], [50.0]])
    y = np.array([0, 1, 0, 1, 2])
    # 0: 1B 1.6A -> R@2 yes;  1: 1.6A 0A -> no;  1.6: 1B 2.4B -> no;  2.4: 1.6A 1B -> R@2 yes
    out = retrieval_metrics(x, y, ks=(1, 2))
    assert out["n_queries"] == 4
    assert out["recall_at_1"] == 0.0 and out["recall_at_2"] == pytest.approx(2 / 4)


def test_nmi_of_kmeans_on_hand_clusters():
    # three tight pairs: k-means (k = 3 classes) finds them; classes (A, B), (A, B), (C, C)
    x = np.array([[0.0], [0.1], [5.0], [5.1], [10.0], [10.1]])
    y = np.array([0, 1, 0, 1, 2, 2])
    mutual = math.log(3) - (2 / 3) * math.log(2)  # I = H(Y) - H(Y|C); H(Y) = H(C) = log 3
    assert retrieval_metrics(x, y)["nmi"] == pytest.approx(mutual / math.log(3))
    assert retrieval_metrics(x, np.array([0, 0, 1, 1, 2, 2]))["nmi"] == pytest.approx(1.0)


# --- the base losses are pml's with the papers' parameters -------------------------------------------
def test_base_losses_are_pml_losses_with_the_papers_parameters():
    from pytorch_metric_learning.losses import ContrastiveLoss, MultiSimilarityLoss, ProxyAnchorLoss
    from pytorch_metric_learning.miners import MultiSimilarityMiner

    c = make_learner("contrastive")
    assert isinstance(c.loss_fn, ContrastiveLoss) and c.miner is None
    assert (c.loss_fn.pos_margin, c.loss_fn.neg_margin) == (0.0, 1.0)
    ms = make_learner("multi_similarity")
    assert isinstance(ms.loss_fn, MultiSimilarityLoss) and isinstance(ms.miner, MultiSimilarityMiner)
    assert (ms.loss_fn.alpha, ms.loss_fn.beta, ms.loss_fn.base, ms.miner.epsilon) == (2.0, 50.0, 0.5, 0.1)
    pa = make_learner("proxy_anchor", num_classes=3)
    assert isinstance(pa.loss_fn, ProxyAnchorLoss) and (pa.loss_fn.alpha, pa.loss_fn.margin) == (32.0, 0.1)
    assert pa.loss_fn.proxies.shape == (3, 4)
    groups = pa.param_groups()
    assert groups[1]["params"][0] is pa.loss_fn.proxies and groups[1]["lr"] == pytest.approx(100 * pa.hparams["lr"])
    # the contrastive value on a hand pair: one positive at distance 0.6, one negative at distance 0.8
    e = torch.tensor([[1.0, 0.0], [0.82, 0.6 * math.sqrt(1 - 0.09)], [0.68, -0.8 * math.sqrt(1 - 0.16)]])
    e = F.normalize(e, dim=1)
    d = torch.cdist(e, e)
    loss = c.loss_fn(e, torch.tensor([0, 0, 1]))
    pos = d[0, 1]                                        # [D - 0]_+ averaged over the (symmetric) pair
    neg = F.relu(1 - torch.stack([d[0, 2], d[1, 2]]))    # [1 - D]_+ over the two negative pairs, non-zero mean
    assert float(loss) == pytest.approx(float(pos + neg[neg > 0].mean()), rel=1e-5)


# --- ECAML --------------------------------------------------------------------------------------------
def test_energy_confusion_on_a_hand_case():
    from classlab.methods.metric.ecaml import energy_confusion

    f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    y = torch.tensor([0, 0, 1])
    # different-class pairs: (0, 2): 1/2 * 2 = 1; (1, 2): 1/2 * (0.36 + 0.04) = 0.2; E = 0.6
    assert float(energy_confusion(f, y)) == pytest.approx(math.log(0.6), abs=1e-6)
    assert float(energy_confusion(f, torch.zeros(3, dtype=torch.long))) == 0.0  # one class: no term


def test_ecaml_confusion_pulls_classes_together_through_the_metric_only(one_thread):
    from classlab.methods.metric.ecaml import energy_confusion

    # the sign: a gradient step on L_EC moves a different-class pair closer (it confuses the metric)
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]], requires_grad=True)
    y = torch.tensor([0, 1, 0])
    energy_confusion(f, y).backward()
    moved = f.detach() - 0.1 * f.grad
    assert torch.dist(moved[0], moved[1]) < torch.dist(f.detach()[0], f.detach()[1])
    # in a step: the backbone gets the base loss's gradient only, the metric (embedding head) both
    batch = {"x": torch.randn(12, 1, 8, 8), "y": torch.tensor([0, 1, 2] * 4), "index": torch.arange(12)}
    grads = {}
    for weight in (0.0, 0.13):
        learner = make_learner("ecaml", {"ec_weight": weight})
        learner.eval()  # fixed BatchNorm statistics: the two runs see the same features
        loss, logs = learner.training_step(batch)
        learner.zero_grad()
        loss.backward()
        grads[weight] = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
    for name in grads[0.0]:
        if name.startswith("backbone."):
            assert torch.allclose(grads[0.0][name], grads[0.13][name], atol=1e-7), name
    assert not torch.allclose(grads[0.0]["head.weight"], grads[0.13]["head.weight"])
    # with lambda = 0 the step is the base loss's, at the base method's loss hyperparameters
    ms = make_learner("multi_similarity")
    ms.eval()
    ec = make_learner("ecaml", {"ec_weight": 0.0})
    ec.eval()
    assert float(ec.training_step(batch)[0].detach()) == pytest.approx(float(ms.training_step(batch)[0].detach()),
                                                                       rel=1e-6)
    assert ec.loss_hparams == ms.loss_hparams


# --- Metrix -------------------------------------------------------------------------------------------
def test_metrix_pairs_and_mixed_labels_on_a_hand_case():
    from classlab.methods.metric.metrix import mixed_labels, mixing_pairs

    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    y = torch.tensor([0, 0, 1, 1, 2])
    gen = torch.Generator().manual_seed(0)
    anchors, first, negatives = mixing_pairs(e, y, "pos_neg", gen)
    assert anchors.tolist() == [0, 1, 2, 3]        # sample 4 has no positive in the batch
    assert first.tolist() == [1, 0, 3, 2]          # the only positive of each anchor
    # hardest negative: the most similar sample of another class
    assert negatives.tolist() == [2, 2, 1, 1]
    anchors, first, _ = mixing_pairs(e, y, "anchor_neg", gen)
    assert first.tolist() == anchors.tolist()       # the anchor itself is mixed with its negative
    soft = mixed_labels(y, torch.tensor([1, 3]), torch.tensor([2, 4]), 0.3, 3)
    assert torch.allclose(soft, torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.3, 0.7]]))


def test_metrix_mixed_losses_on_hand_cases():
    from pytorch_metric_learning.losses import ProxyAnchorLoss

    from classlab.methods.metric.metrix import mixed_contrastive, mixed_multi_similarity, mixed_proxy_anchor

    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    u = torch.tensor([[0.8, 0.6], [0.6, 0.8]])  # cosines 0.8 and 0.8; distances sqrt(0.4)
    y = torch.tensor([0.3, 0.3])
    s = 0.8
    per = (1 / 2) * math.log(1 + 0.3 * math.exp(-2 * (s - 0.5))) + (1 / 50) * math.log(1 + 0.7 * math.exp(50 * (s - 0.5)))
    assert float(mixed_multi_similarity(a, u, y, 2.0, 50.0, 0.5)) == pytest.approx(per, rel=1e-6)
    # y = 1: the positive term alone; y = 0: the negative term alone
    one = (1 / 2) * math.log(1 + math.exp(-2 * (s - 0.5)))
    assert float(mixed_multi_similarity(a, u, torch.ones(2), 2.0, 50.0, 0.5)) == pytest.approx(one, rel=1e-6)
    d = math.sqrt(0.4)
    expected = 0.3 * d + 0.7 * (1.0 - d)   # lam [D - 0]_+ + (1 - lam) [1 - D]_+ (each part's non-zero mean)
    assert float(mixed_contrastive(a, u, y, 0.0, 1.0)) == pytest.approx(expected, rel=1e-6)
    # proxy anchor with one-hot labels is pml's Proxy Anchor loss
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(6, 4), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 0])
    pml = ProxyAnchorLoss(num_classes=4, embedding_size=4, margin=0.1, alpha=32)
    ours = mixed_proxy_anchor(emb, F.one_hot(labels, 4).float(), pml.proxies, 32.0, 0.1)
    assert float(ours.detach()) == pytest.approx(float(pml(emb, labels).detach()), rel=1e-5)


@pytest.mark.parametrize("mix", ["input", "feature", "embedding"])
def test_metrix_adds_the_weighted_mixed_loss_to_the_base_loss(mix, one_thread):
    batch = {"x": torch.randn(12, 1, 8, 8), "y": torch.tensor([0, 1, 2] * 4), "index": torch.arange(12)}
    ms = make_learner("multi_similarity")
    ms.eval()
    base = float(ms.training_step(batch)[0].detach())
    off = make_learner("metrix", {"mix": mix, "mix_weight": 0.0})
    off.eval()
    assert float(off.training_step(batch)[0].detach()) == pytest.approx(base, rel=1e-6)  # w = 0: the base loss exactly
    on = make_learner("metrix", {"mix": mix})
    on.eval()
    loss, logs = on.training_step(batch)
    loss = loss.detach()
    assert float(loss) == pytest.approx(base + 0.4 * float(logs["loss_mixed"]), rel=1e-5)
    assert 0.0 < float(logs["lam"]) < 1.0 and float(logs["loss_mixed"]) > 0
    again = on.training_step(batch)[0].detach()  # pure: the same batch at the same step draws the same mix
    assert float(again) == pytest.approx(float(loss), rel=1e-6)


def test_metrix_feature_split_reproduces_the_backbone():
    from classlab.methods.metric.metrix import split_backbone

    model = build_classifier("convnet", 1, 4, backbone_kwargs=TINY).eval()
    head, tail = split_backbone(model)
    x = torch.randn(3, 1, 8, 8)
    assert torch.allclose(tail(head(x)), model.backbone(x), atol=1e-6)


# --- the family's configuration -----------------------------------------------------------------------
def test_every_method_shares_the_budget_and_regularisers_use_their_base_loss_values():
    docs = {m: yaml.safe_load((METHOD_CONFIGS / "metric" / f"{m}.yaml").read_text())["hparams"] for m in METHODS}
    for key in SHARED_KEYS:
        values = {m: docs[m][key] for m in METHODS}
        assert len({json.dumps(v) for v in values.values()}) == 1, (key, values)
    ms = resolve_checked_hparams("metric", "multi_similarity")
    for method in ("ecaml", "metrix"):
        hp = resolve_checked_hparams("metric", method)
        assert hp["base_loss"] == "multi_similarity" and hp["base_overrides"] == {}
        assert base_loss_hparams(hp["base_loss"]) == {k: ms[k] for k in ("ms_alpha", "ms_beta", "ms_base", "ms_epsilon")}
    assert base_loss_hparams("contrastive", {"neg_margin": 0.5})["neg_margin"] == 0.5
    with pytest.raises(ConfigError, match="base_overrides.ms_beta"):
        base_loss_hparams("contrastive", {"ms_beta": 1.0})


# --- the protocol end to end -----------------------------------------------------------------------------
def _spy_training_labels(monkeypatch):
    from classlab.engine.trainer import Trainer

    seen = []
    original = Trainer.make_loader

    def spy(self, x, y, *args, **kwargs):
        seen.append(y.clone())
        return original(self, x, y, *args, **kwargs)
    monkeypatch.setattr(Trainer, "make_loader", spy)
    return seen


@pytest.mark.parametrize("method", METHODS)
def test_protocol_end_to_end_on_unseen_classes(method, digits_prepared, tmp_path, monkeypatch):
    seen = _spy_training_labels(monkeypatch)
    out = tmp_path / method
    metrics = run_metric(method, digits_prepared, 0, out, overrides=FAST, backbone_kwargs=TINY, threads=1)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    for key in ("recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "nmi", "map_at_r", "train_classes",
                "test_classes", "n_queries", "queries_per_class", "train_steps", "train_seconds", "hparams",
                "fingerprint", "provenance", "protocol", "method", "seed", "dataset", "loss_hparams"):
        assert key in saved, key
    assert saved["protocol"] == "metric" and saved["method"] == method
    assert saved["train_classes"] == [0, 1, 2, 3, 4] and saved["test_classes"] == [5, 6, 7, 8, 9]
    assert saved["eval_classes"] == saved["test_classes"] and saved["eval_split"] == "test"
    trained = set(torch.cat(seen).unique().tolist())
    assert trained == {0, 1, 2, 3, 4} and not trained & set(saved["test_classes"])
    assert 0.0 <= saved["recall_at_1"] <= saved["recall_at_2"] <= saved["recall_at_4"] <= saved["recall_at_8"] <= 1
    assert saved["n_queries"] == 5 * 12 and saved["train_steps"] == (5 * 24) // 32
    emb = np.load(out / "embeddings.npz")
    assert emb["embeddings"].shape == (60, 8) and set(emb["labels"].tolist()) == {5, 6, 7, 8, 9}
    assert np.allclose(np.linalg.norm(emb["embeddings"], axis=1), 1.0, atol=1e-5)
    assert not (out / "last.pt").exists()


def test_selection_trains_without_the_held_out_classes_and_reports_val(digits_prepared, tmp_path, monkeypatch):
    seen = _spy_training_labels(monkeypatch)
    out = tmp_path / "select"
    saved = run_metric("metrix", digits_prepared, 1, out, overrides=FAST, backbone_kwargs=TINY, select=True,
                       threads=1)
    assert saved["train_classes"] == [0, 1, 2] and saved["eval_classes"] == [3, 4]
    assert saved["eval_split"] == "val" and set(torch.cat(seen).unique().tolist()) == {0, 1, 2}
    assert "val_recall_at_1" in saved and "val_map_at_r" in saved and "val_nmi" in saved
    assert "recall_at_1" not in saved  # selection never reports a test number
    assert set(np.load(out / "embeddings.npz")["labels"].tolist()) == {3, 4}


# --- bad input ------------------------------------------------------------------------------------------------
def _without_test_images_of_the_test_classes(src, dest):
    shutil.copytree(src, dest)
    blob = torch.load(dest / "test.pt", weights_only=True)
    keep = blob["y"] < 5
    torch.save({k: (v[keep] if v is not None else None) for k, v in blob.items()}, dest / "test.pt")
    return dest


@pytest.mark.parametrize("overrides, select, field", [
    ({"val_classes": 4}, True, "val_classes"),       # 1 training class left: no negatives
    ({"val_classes": 1}, True, "val_classes"),       # retrieval among one class
    ({"embedding_size": 0}, False, "embedding_size"),
    ({"base_loss": "ecaml"}, False, "base_loss"),
    ({"base_overrides": {"margin": 1}}, False, "base_overrides.margin"),
])
def test_bad_input_is_named_and_nothing_is_written(overrides, select, field, digits_prepared, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        run_metric("ecaml", digits_prepared, 0, out, overrides={**FAST, **overrides}, backbone_kwargs=TINY,
                   select=select, threads=1)
    assert not out.exists()


def test_an_empty_retrieval_split_is_rejected(digits_prepared, tmp_path):
    data = _without_test_images_of_the_test_classes(digits_prepared, tmp_path / "no_test")
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match="data_dir.*empty retrieval"):
        run_metric("multi_similarity", data, 0, out, overrides=FAST, backbone_kwargs=TINY, threads=1)
    assert not out.exists()
