"""Label noise for CAPro: the injected noise, CAPro's terms on hand-built tensors, and the protocol end
to end for both methods of the comparison, ``noisy_ce`` and ``capro``."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.data.label_noise import flip_distribution, inject_label_noise, noise_summary
from classlab.methods.registry import get_method
from classlab.methods.vlm.capro import (bootstrapped_target, clean_labels, collective_bootstrap_target,
                                        enhance_text_embeddings, momentum_update_prototypes, prototypes_from_anchors,
                                        select_text_anchors, soft_cross_entropy)
from classlab.models import build_classifier
from classlab.protocols.label_noise import run_label_noise

METHODS = ("noisy_ce", "capro")
TINY = {"widths": [16, 32], "pool_after": [0]}


# --- the injected noise -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["symmetric", "web"])
def test_noise_flips_exactly_the_rate_and_is_fixed_by_the_seed(kind):
    labels = torch.arange(10).repeat(53)  # N = 530
    sim = np.eye(10) + 0.3
    noisy, flipped = inject_label_noise(labels, 0.3, kind, seed=7, class_similarity=sim)
    assert int(flipped.sum()) == round(0.3 * 530)
    assert bool((noisy[flipped] != labels[flipped]).all()) and bool((noisy[~flipped] == labels[~flipped]).all())
    again, again_mask = inject_label_noise(labels, 0.3, kind, seed=7, class_similarity=sim)
    assert torch.equal(noisy, again) and torch.equal(flipped, again_mask)
    other, other_mask = inject_label_noise(labels, 0.3, kind, seed=8, class_similarity=sim)
    assert not torch.equal(flipped, other_mask)
    summary = noise_summary(labels, noisy, 10)
    assert summary["realised_noise_rate"] == pytest.approx(159 / 530) and summary["flipped"] == 159
    confusion = np.array(summary["noise_confusion"])
    assert confusion.sum() == 530 and np.trace(confusion) == 530 - 159
    none, none_mask = inject_label_noise(labels, 0.0, kind, seed=7, class_similarity=sim)
    assert torch.equal(none, labels) and not bool(none_mask.any())


def test_web_noise_moves_labels_to_textually_similar_classes():
    sim = np.array([[1.0, 0.9, 0.05, 0.05],
                    [0.9, 1.0, 0.05, 0.05],
                    [0.05, 0.05, 1.0, 0.3],
                    [0.05, 0.05, 0.3, 1.0]])
    dist = flip_distribution(4, "web", sim)
    assert dist[0] == pytest.approx([0.0, 0.9, 0.05, 0.05])  # p(j | c) proportional to s(c, j), j != c
    assert flip_distribution(4, "symmetric")[0] == pytest.approx([0, 1 / 3, 1 / 3, 1 / 3])
    labels = np.zeros(2000, dtype=np.int64)
    noisy, flipped = inject_label_noise(labels, 0.5, "web", seed=0, class_similarity=sim)
    assert flipped.sum() == 1000
    assert (noisy[flipped] == 1).mean() > 0.85  # mostly the near class
    sym, sym_flipped = inject_label_noise(labels, 0.5, "symmetric", seed=0, num_classes=4)
    assert 0.25 < (sym[sym_flipped] == 1).mean() < 0.42


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5, float("nan"), "0.2", True])
def test_a_noise_rate_outside_0_1_is_named(rate):
    with pytest.raises(ConfigError, match="noise_rate"):
        inject_label_noise(np.arange(10), rate, "symmetric", 0)


def test_protocol_rejects_a_bad_rate_or_a_prompt_method_before_writing(digits_prepared, tmp_path):
    out = tmp_path / "run"
    for rate in (1.0, -0.2):
        with pytest.raises(ConfigError, match="noise_rate"):
            run_label_noise("capro", digits_prepared, 0, out, rate, backbone_kwargs=TINY, threads=1)
        assert not out.exists()
    with pytest.raises(ConfigError, match="noise_kind"):
        run_label_noise("noisy_ce", digits_prepared, 0, out, 0.2, noise_kind="typo", threads=1)
    with pytest.raises(ConfigError, match="prompt method"):
        run_label_noise("coop", digits_prepared, 0, out, 0.2, threads=1)
    assert not out.exists()


# --- CAPro's terms on hand-built tensors ----------------------------------------------------------
def test_text_anchors_are_the_samples_of_a_class_nearest_its_text():
    text = torch.eye(3)                                    # class c's text embedding: e_c
    u = F.normalize(torch.tensor([[0.9, 0.1, 0.0],         # labelled 0, near e0
                                  [0.1, 0.9, 0.0],         # labelled 0, near e1 (a noisy label)
                                  [0.7, 0.0, 0.7],         # labelled 0, halfway
                                  [0.99, 0.0, 0.1],        # labelled 0, nearest e0
                                  [1.0, 0.0, 0.0],         # labelled 1 but at e0: not an anchor of 1 ...
                                  [0.0, 0.8, 0.2]]), dim=1)
    labels = torch.tensor([0, 0, 0, 0, 1, 1])
    anchors = select_text_anchors(u, labels, text, k=2)
    assert anchors.tolist() == [True, False, False, True, True, True]  # ... but 1 has only two samples
    anchors_one = select_text_anchors(u, labels, text, k=1)
    assert anchors_one.tolist() == [False, False, False, True, False, True]
    visual = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6], [1.0, 0.0], [0.0, 1.0]])
    protos = prototypes_from_anchors(visual, labels, anchors, 3)
    assert protos[0] == pytest.approx(F.normalize(visual[0] + visual[3], dim=0))
    assert protos[2].abs().sum() == 0  # a class without anchors has no prototype
    # text enhancement: each text-side row becomes the mean of its k visual neighbours' rows
    enhanced = enhance_text_embeddings(u, visual, k=2)
    # sample 0's two nearest visual neighbours are itself and sample 4 (identical embeddings)
    assert enhanced[0] == pytest.approx(F.normalize(u[0] + u[4], dim=0), abs=1e-6)
    assert torch.allclose(enhance_text_embeddings(u, visual, k=1), u, atol=1e-6)


def test_momentum_prototypes_follow_the_sequential_update():
    protos = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    z = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 1.0], [1.0, 0.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    m = 0.9
    p0 = m * protos[0] + (1 - m) * z[0]
    p0 = m * p0 + (1 - m) * z[1]
    p1 = m * protos[1] + (1 - m) * z[2]
    out = momentum_update_prototypes(protos, z, labels, m)
    assert out[0] == pytest.approx(F.normalize(p0, dim=0), abs=1e-6)
    assert out[1] == pytest.approx(F.normalize(p1, dim=0), abs=1e-6)


def test_collective_bootstrapping_target_mixes_label_and_neighbours_predictions():
    z = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8]]), dim=1)
    queue = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=1)
    soft = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    t = collective_bootstrap_target(z, queue, soft)
    w0 = torch.tensor([1.0, 0.0, 0.0]) + 1e-7                      # clamp(z . q, 0, 1) + 1e-7
    w1 = torch.tensor([0.6, 0.8, 0.0]) + 1e-7
    expected = torch.stack([(w0 / w0.sum()) @ soft, (w1 / w1.sum()) @ soft])
    assert t == pytest.approx(expected / expected.sum(1, keepdim=True), abs=1e-6)
    mixed = bootstrapped_target(torch.tensor([2, 0]), t, beta=0.1)
    assert mixed[0] == pytest.approx(0.9 * torch.tensor([0.0, 0.0, 1.0]) + 0.1 * t[0])
    assert mixed[1] == pytest.approx(0.9 * torch.tensor([1.0, 0.0, 0.0]) + 0.1 * t[1])
    assert mixed.sum(1) == pytest.approx(torch.ones(2))


def test_capro_step_trains_the_classifier_on_the_bootstrapped_target(one_thread):
    torch.manual_seed(0)
    hp = resolve_checked_hparams("vlm", "capro", {"low_dim": 8, "proj_hidden": 16, "queue_size": 16})
    model = build_classifier("convnet", 1, 4, backbone_kwargs={"widths": [8], "pool_after": []})
    method = get_method("vlm", "capro")(model, hp, 4)
    method.build(["a", "b", "c", "d"], F.normalize(torch.randn(4, 384), dim=1))
    method.eval()  # fixed BatchNorm statistics so the two forward passes agree
    batch = {"x": torch.randn(6, 1, 8, 8), "y": torch.tensor([0, 1, 2, 3, 0, 1]), "index": torch.arange(6)}
    method.queue[:5] = F.normalize(torch.randn(5, 8), dim=1)
    method.queue_count.fill_(5)
    method.queue_ptr.fill_(5)
    loss, logs = method.training_step(batch)
    with torch.no_grad():
        logits, z, _ = method.embed(batch["x"])
        q = method.queue[:5]
        # before the prototypes exist, the queue's soft labels are the low-dim classifier's
        t = collective_bootstrap_target(z, q, method.lowdim_head(q).softmax(1))
        expected = soft_cross_entropy(logits, bootstrapped_target(batch["y"], t, hp["beta"]))
    assert logs["loss_cls"] == pytest.approx(float(expected), rel=1e-5)
    assert torch.isfinite(loss) and "loss_proto" not in logs
    method.on_after_step(batch, logs)  # no second view: the batch's embeddings enter the queue
    assert int(method.queue_count) == 11 and torch.allclose(method.queue[5:11], logs["z"])
    # with a second view: the momentum key encoder's keys enter the queue, and it moves toward the online one
    with torch.no_grad():
        method.key_projection[0].weight.add_(1.0)
    before = method.key_projection[0].weight.clone()
    views = [batch["x"], batch["x"].flip(-1)]
    loss, logs = method.training_step(dict(batch, views=views))
    assert "loss_inst" in logs and torch.allclose(logs["keys"], method.keys(views[1]))
    method.on_after_step(batch, logs)
    m = hp["key_momentum"]
    assert torch.allclose(method.key_projection[0].weight, m * before + (1 - m) * method.projection[0].weight)
    assert int(method.queue_count) == 16 and torch.allclose(method.queue[11:16], logs["keys"][:5])
    assert torch.allclose(method.queue[0], logs["keys"][5])  # the queue wrapped around


def test_label_cleaning_keeps_relabels_drops_and_spares_anchors():
    p = torch.tensor([[0.70, 0.20, 0.10],    # label 0 likely: kept as 0
                      [0.15, 0.05, 0.80],    # label 0, confident 2: relabelled 2
                      [0.20, 0.45, 0.35],    # label 0 below 1/K, nothing >= 0.6: dropped
                      [0.15, 0.05, 0.80],    # as the second, but a text anchor: kept as 0
                      [0.40, 0.35, 0.25]])   # label 1 above 1/K: kept as 1
    logits = p.log()
    labels = torch.tensor([0, 0, 0, 0, 1])
    protected = torch.tensor([False, False, False, True, False])
    # equal classifier and prototype logits: s = alpha p + (1 - alpha) p = p
    targets, kept, relabelled = clean_labels(logits, logits, labels, alpha=0.5, threshold=0.6, protected=protected)
    assert targets.tolist() == [0, 2, -1, 0, 1]
    assert kept.tolist() == [True, True, False, True, True]
    assert relabelled.tolist() == [False, True, False, False, False]
    # the mix: the classifier says 2 (0.9), the prototypes say 1: s = 0.5 * 0.9 + 0.5 * 0.1 = 0.5 < 0.6
    cls = torch.tensor([[0.05, 0.05, 0.9]]).log()
    proto = torch.tensor([[0.1, 0.8, 0.1]]).log()
    targets, kept, _ = clean_labels(cls, proto, torch.tensor([0]), alpha=0.5, threshold=0.6)
    assert targets.tolist() == [-1] and not bool(kept[0])   # s[0] = 0.075 < 1/3 and max s = 0.5 < 0.6


# --- end to end -----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_label_noise_protocol_end_to_end(method, digits_prepared, tmp_path, one_thread):
    overrides = {"epochs": 3, "batch_size": 64, "lr": 0.05}
    if method == "capro":
        overrides.update(init_proto_epoch=1, start_clean_epoch=2, low_dim=16, proj_hidden=32, anchors_per_class=10,
                         queue_size=128)
    out = tmp_path / method
    metrics = run_label_noise(method, digits_prepared, 0, out, 0.4, backbone_kwargs=TINY, overrides=overrides,
                              threads=1)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["method"] == method and saved["noise_rate"] == 0.4 and saved["noise_kind"] == "web"
    n = saved["train_samples"]
    assert saved["flipped"] == round(0.4 * n) and saved["realised_noise_rate"] == pytest.approx(round(0.4 * n) / n)
    assert np.array(saved["noise_confusion"]).sum() == n
    for key in ("top1", "val_top1", "nll", "val_nll"):
        assert key in saved and math.isfinite(saved[key])
    assert 0.0 <= saved["top1"] <= 1.0 and 0.0 <= saved["val_top1"] <= 1.0
    assert saved["train_steps"] > 0 and len(saved["history"]) == 3
    cleaning = ("corrected_fraction", "flipped_dropped_fraction", "clean_kept_fraction", "dropped_fraction",
                "cleaned_label_accuracy")
    if method == "capro":
        assert all(0.0 <= saved[key] <= 1.0 for key in cleaning)
    else:
        assert all(saved[key] is None for key in cleaning)
    preds = np.load(out / "predictions.npz")
    assert preds["logits"].shape == (saved["n"], 10) and len(preds["labels"]) == saved["n"]
    assert int(preds["train_flipped"].sum()) == saved["flipped"]
    assert not (out / "last.pt").exists()
    assert metrics["top1"] == saved["top1"]
