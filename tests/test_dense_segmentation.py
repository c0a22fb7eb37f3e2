"""The dense family's segmentation methods (pixel_head, label_smoothing, margin, nacl, segface) and the
pixel calibration metrics: NACL's neighbourhood target and penalty (value and gradient) on a hand-made
label map, MbLS's hinge by hand, label smoothing through ``extends``, SegFace's token-times-embedding
masks and their equivariance to the order of the class tokens, the shared budget and decoder keys, a
short training of every method on a synthetic batch, and the streaming ECE against the classification
ECE and hand-computed cases."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.engine import Trainer, TrainConfig
from classlab.methods.dense.margin import margin_penalty
from classlab.methods.dense.nacl import nacl_penalty, neighbourhood_proportions
from classlab.methods.dense.pixel_head import PixelHead
from classlab.methods.dense.segface import SegFace, dice_loss
from classlab.methods.dense_learner import DenseTargets
from classlab.methods.dense_segmenter import DECODER_KEYS, PixelSegmenter
from classlab.methods.registry import get_method
from classlab.metrics import classification
from classlab.metrics.segmentation import (calibration_bins, classwise_calibration_bins,
                                           classwise_calibration_error_from_bins,
                                           expected_calibration_error_from_bins)
from classlab.models import build_classifier

METHODS = ("pixel_head", "label_smoothing", "margin", "nacl", "segface")
SHARED_KEYS = ("epochs", "batch_size", "optimizer", "lr", "weight_decay", "schedule", "warmup_frac") + DECODER_KEYS
NUM_CLASSES = 4
TINY_BACKBONE = {"widths": [8, 16], "pool_after": [0]}  # 24x24 images -> a 16-channel 12x12 map


def tiny_learner(method: str, overrides: dict | None = None, size: int = 24):
    hp = resolve_checked_hparams("dense", method, {"decoder_dim": 8, "stem_width": 4, **(overrides or {})})
    torch.manual_seed(0)
    model = build_classifier("convnet", 3, NUM_CLASSES, img_size=size, backbone_kwargs=TINY_BACKBONE)
    return get_method("dense", method)(model, hp, NUM_CLASSES, image_shape=(3, size, size))


def synthetic_scenes(n: int = 8, size: int = 24, seed: int = 0):
    """Images whose coloured squares are the objects: class k paints its square with colour k."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    x = torch.zeros(n, 3, size, size)
    semantic = torch.zeros(n, size, size, dtype=torch.long)
    for i in range(n):
        for _ in range(2):
            k = int(torch.randint(0, NUM_CLASSES, (1,), generator=g))
            r, c = (int(v) for v in torch.randint(0, size - 8, (2,), generator=g))
            x[i, :, r:r + 8, c:c + 8] = colours[k].view(3, 1, 1)
            semantic[i, r:r + 8, c:c + 8] = k + 1
    targets = DenseTargets(torch.zeros(n, 2, 4), torch.zeros(n, 2, dtype=torch.long), semantic)
    return x, targets


# --- NACL -----------------------------------------------------------------------------------------------

LABELS_3X3 = torch.tensor([[[1, 1, 0],
                            [1, 2, 0],
                            [0, 0, 0]]])
# counted by hand over each 3x3 window, the 5 (or 9 - 4) positions beyond the border counted as class 0
TAU1 = np.array([[3, 3, 1], [3, 3, 1], [1, 1, 0]]) / 9
TAU2 = np.full((3, 3), 1 / 9)
TAU0 = 1 - TAU1 - TAU2


def test_nacl_neighbourhood_target_is_the_hand_counted_label_proportions():
    tau = neighbourhood_proportions(LABELS_3X3, 3, 3)[0].numpy()
    np.testing.assert_allclose(tau[0], TAU0, atol=1e-7)
    np.testing.assert_allclose(tau[1], TAU1, atol=1e-7)
    np.testing.assert_allclose(tau[2], TAU2, atol=1e-7)
    # kernel 1: the one-hot labels themselves
    np.testing.assert_allclose(neighbourhood_proportions(LABELS_3X3, 3, 1)[0].numpy(),
                               F.one_hot(LABELS_3X3[0], 3).permute(2, 0, 1).numpy())


def test_nacl_penalty_value_and_gradient_by_hand():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 3, 3, 3, generator=g).requires_grad_(True)
    tau = np.stack([TAU0, TAU1, TAU2])
    l = logits.detach().numpy()[0]
    expected = sum(abs(tau[k, r, c] - l[k, r, c]) for k in range(3) for r in range(3) for c in range(3)) / (9 * 3)
    penalty = nacl_penalty(logits, LABELS_3X3, 3)
    assert float(penalty.detach()) == pytest.approx(expected, rel=1e-6)
    penalty.backward()
    # d/dl_k(i) of (1/(N K)) sum |tau - l| = sign(l_k(i) - tau_k(i)) / (N K)
    np.testing.assert_allclose(logits.grad[0].numpy(), np.sign(l - tau) / 27, rtol=1e-6)

    learner = tiny_learner("nacl")
    loss, logs = learner.pixel_loss(logits.detach(), LABELS_3X3)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits.detach(), LABELS_3X3)) + 0.1 * expected, rel=1e-6)
    assert float(logs["nacl_penalty"]) == pytest.approx(expected, rel=1e-6)


def test_nacl_ignored_pixels_carry_no_penalty_and_count_in_no_proportion():
    labels = LABELS_3X3.clone()
    labels[0, 2, 2] = 255
    tau = neighbourhood_proportions(labels, 3, 3)[0]
    # pixel (1, 1) sees the ignored one: its window's proportions sum to 8/9
    assert float(tau[:, 1, 1].sum()) == pytest.approx(8 / 9)
    logits = torch.zeros(1, 3, 3, 3)
    logits[0, :, 2, 2] = 100.0  # would dominate the mean if the ignored pixel counted
    assert float(nacl_penalty(logits, labels, 3)) == pytest.approx(float(tau.sum() - tau[:, 2, 2].sum()) / (8 * 3))


def test_nacl_refuses_an_even_window():
    with pytest.raises(ConfigError, match="nacl_kernel_size"):
        tiny_learner("nacl", {"nacl_kernel_size": 4})


# --- MbLS (margin) --------------------------------------------------------------------------------------

def test_margin_hinge_by_hand():
    # pixel a: [12, 0, 1] -> d = [0, 12, 11] -> max(0, d - 10) = [0, 2, 1]; pixel b: [0, 0.5, 3] -> all 0
    logits = torch.tensor([[12.0, 0.0], [0.0, 0.5], [1.0, 3.0]]).view(1, 3, 1, 2)
    target = torch.tensor([[[0, 2]]])
    assert float(margin_penalty(logits, target, 10.0)) == pytest.approx(3 / 6)
    assert float(margin_penalty(logits, target, 0.0)) == pytest.approx((12 + 11 + 3 + 2.5) / 6)
    # an ignored pixel leaves the mean
    assert float(margin_penalty(logits, torch.tensor([[[0, 255]]]), 10.0)) == pytest.approx(3 / 3)
    learner = tiny_learner("margin")
    loss, _ = learner.pixel_loss(logits, target)
    assert float(loss) == pytest.approx(float(F.cross_entropy(logits, target)) + 0.1 * 0.5, rel=1e-6)


# --- label smoothing and the shared keys ----------------------------------------------------------------

def test_label_smoothing_resolves_through_extends_and_smooths_the_cross_entropy():
    base = resolve_checked_hparams("dense", "pixel_head")
    smooth = resolve_checked_hparams("dense", "label_smoothing")
    assert base["label_smoothing"] == 0.0 and smooth["label_smoothing"] == 0.1
    assert {k: v for k, v in smooth.items() if k != "label_smoothing"} == \
           {k: v for k, v in base.items() if k != "label_smoothing"}
    cls = get_method("dense", "label_smoothing")
    assert issubclass(cls, PixelHead) and cls.name == "label_smoothing"
    learner = tiny_learner("label_smoothing")
    logits = torch.randn(2, 5, 4, 4)
    target = torch.randint(0, 5, (2, 4, 4))
    # (1 - eps) CE + eps * mean_k(-log p_k), eps = 0.1
    logp = logits.log_softmax(1)
    by_hand = -(0.9 * logp.gather(1, target.unsqueeze(1)).squeeze(1) + 0.1 * logp.mean(1)).mean()
    assert float(learner.pixel_loss(logits, target)[0]) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(tiny_learner("pixel_head").pixel_loss(logits, target)[0]) == \
           pytest.approx(float(F.cross_entropy(logits, target)), rel=1e-6)


def test_every_segmentation_method_shares_the_budget_and_decoder_keys():
    resolved = {m: resolve_checked_hparams("dense", m) for m in METHODS}
    for method, hp in resolved.items():
        missing = [k for k in SHARED_KEYS if k not in hp]
        assert not missing, f"{method} lacks {missing}"
        assert {k: hp[k] for k in SHARED_KEYS} == {k: resolved["pixel_head"][k] for k in SHARED_KEYS}, method
        cls = get_method("dense", method)
        assert issubclass(cls, PixelSegmenter) and cls.task == "segmentation"


def test_a_bad_decoder_key_is_named():
    with pytest.raises(ConfigError, match="decoder_dim"):
        tiny_learner("pixel_head", {"decoder_dim": 0})
    with pytest.raises(ConfigError, match="decoder_dim"):
        tiny_learner("segface", {"decoder_dim": 7})


@pytest.mark.parametrize("stride", [1, 2])
def test_pixel_head_logits_are_at_the_image_resolution(stride):
    learner = tiny_learner("pixel_head", {"embedding_stride": stride}).eval()
    x = torch.randn(2, 3, 24, 24)
    assert learner.segment_logits(x).shape == (2, NUM_CLASSES + 1, 24, 24)
    assert learner.pixel_embeddings(x).shape == (2, 8, 24 // stride, 24 // stride)


# --- SegFace --------------------------------------------------------------------------------------------

def test_segface_masks_are_token_times_embedding():
    learner = tiny_learner("segface", {"embedding_stride": 1}).eval()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        tokens, embeddings = learner.decode(x)
        logits = learner.segment_logits(x)
        assert tokens.shape == (2, NUM_CLASSES + 1, 8) and embeddings.shape == (2, 8, 24, 24)
        assert logits.shape == (2, NUM_CLASSES + 1, 24, 24)
        hyper = learner.token_mlp(tokens)
        # m_c(i) = MLP(T_c) . E(i), one pixel by hand
        assert float(logits[1, 3, 5, 7]) == pytest.approx(float((hyper[1, 3] * embeddings[1, :, 5, 7]).sum()), rel=1e-5)


def test_swapping_two_class_tokens_swaps_their_logit_maps():
    learner = tiny_learner("segface").eval()
    x = torch.randn(2, 3, 24, 24)
    with torch.no_grad():
        before = learner.segment_logits(x)
        learner.class_tokens[[1, 3]] = learner.class_tokens[[3, 1]].clone()
        after = learner.segment_logits(x)
    expected = before.clone()
    expected[:, [1, 3]] = before[:, [3, 1]]
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)


def test_segface_token_decoder_trains_at_its_own_rate():
    learner = tiny_learner("segface", {"lr": 0.01, "segface_lr_scale": 0.2})
    optimizer = learner.configure_optimizer()
    rest, tokens = optimizer.param_groups
    assert rest["lr"] == pytest.approx(0.01) and tokens["lr"] == pytest.approx(0.002)
    assert any(p is learner.class_tokens for p in tokens["params"])
    assert not any(p is learner.class_tokens for p in rest["params"])
    every = {id(p) for p in learner.parameters()}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == every


def test_segface_loss_is_half_ce_half_dice_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]).T.reshape(1, 3, 1, 2)  # pixels labelled 0 and 2
    target = torch.tensor([[[0, 2]]])
    # class 0: 2*0.7 / (0.49 + 0.01 + 1); class 1: 0 / (0.04 + 0.64); class 2: 2*0.1 / (0.01 + 0.01 + 1)
    dice = [(1.4 + 1e-5) / (1.5 + 1e-5), 1e-5 / (0.68 + 1e-5), (0.2 + 1e-5) / (1.02 + 1e-5)]
    assert float(dice_loss(probs, target)) == pytest.approx(sum(1 - d for d in dice) / 3, rel=1e-5)
    logits = torch.randn(2, 3, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4))
    learner = tiny_learner("segface")
    expected = 0.5 * F.cross_entropy(logits, labels) + 0.5 * dice_loss(logits.softmax(1), labels)
    assert float(learner.pixel_loss(logits, labels)[0]) == pytest.approx(float(expected), rel=1e-5)


# --- training -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_a_short_training_lowers_the_loss(method):
    x, targets = synthetic_scenes()
    learner = tiny_learner(method, {"epochs": 6, "batch_size": 8, "lr": 0.01, "warmup_frac": 0.0,
                                    "schedule": "constant"})
    learner.set_targets(targets)
    batch = {"x": (x - 0.2) / 0.4, "index": torch.arange(len(x))}
    with torch.no_grad():
        before = float(learner.training_step(batch)[0])
    trainer = Trainer(learner, TrainConfig.from_hparams(learner.hparams), torch.device("cpu"), 0, progress=False)
    history = trainer.fit(trainer.make_loader(x, torch.zeros(len(x), dtype=torch.long), [0.2] * 3, [0.4] * 3))
    assert trainer.steps_done == 6 and all(math.isfinite(row["loss"]) for row in history)
    with torch.no_grad():
        after = float(learner.training_step(batch)[0])
    assert after < before, f"{method}: loss {before:.4f} -> {after:.4f}"


# --- pixel calibration ----------------------------------------------------------------------------------

def test_calibration_bins_give_the_classification_ece_on_flattened_pixels():
    g = np.random.default_rng(0)
    logits = g.normal(size=(3, 5, 6, 7)) * 3
    target = g.integers(0, 5, size=(3, 6, 7))
    flat_logits = logits.transpose(0, 2, 3, 1).reshape(-1, 5)
    flat_target = target.reshape(-1)
    gold = classification.expected_calibration_error(flat_logits, flat_target, 15)
    probs = classification.softmax(flat_logits).reshape(3, 6, 7, 5).transpose(0, 3, 1, 2)
    whole = calibration_bins(torch.from_numpy(probs.copy()), torch.from_numpy(target))
    assert expected_calibration_error_from_bins(*whole) == pytest.approx(gold, abs=1e-12)
    # streaming: the sums of two halves are the whole's
    first = calibration_bins(torch.from_numpy(probs[:1].copy()), torch.from_numpy(target[:1]))
    rest = calibration_bins(torch.from_numpy(probs[1:].copy()), torch.from_numpy(target[1:]))
    summed = tuple(a + b for a, b in zip(first, rest))
    for a, b in zip(summed, whole):
        np.testing.assert_allclose(a, b, atol=1e-12)
    # the bins are the classification metric's own
    ref = classification.reliability_bins(flat_logits, flat_target, 15)
    np.testing.assert_array_equal(whole[0], ref["count"])
    # (N, K) input works the same
    flat = calibration_bins(torch.from_numpy(classification.softmax(flat_logits)), torch.from_numpy(flat_target))
    assert expected_calibration_error_from_bins(*flat) == pytest.approx(gold, abs=1e-12)


PROBS_4 = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.4, 0.35, 0.25], [0.2, 0.45, 0.35]])
LABELS_4 = torch.tensor([0, 1, 0, 2])


def test_ece_hand_case_with_ignore_and_background_excluded():
    # 2 bins: (0, .5] holds confidences .4 (right) and .45 (wrong); (.5, 1] holds .9 (right) and .8 (wrong)
    bins = calibration_bins(PROBS_4, LABELS_4, n_bins=2)
    np.testing.assert_array_equal(bins[0], [2, 2])
    np.testing.assert_allclose(bins[1], [0.85, 1.7])
    np.testing.assert_allclose(bins[2], [1, 1])
    assert expected_calibration_error_from_bins(*bins) == pytest.approx(0.5 * 0.075 + 0.5 * 0.35)
    # an ignored pixel counts nowhere
    probs = torch.cat([PROBS_4, torch.tensor([[0.99, 0.005, 0.005]])])
    ignored = calibration_bins(probs, torch.cat([LABELS_4, torch.tensor([255])]), n_bins=2)
    assert expected_calibration_error_from_bins(*ignored) == pytest.approx(0.2125)
    # NACL's evaluation: background-labelled pixels dropped, left .8 (wrong) and .45 (wrong)
    fg = calibration_bins(PROBS_4, LABELS_4, n_bins=2, exclude_class=0)
    assert expected_calibration_error_from_bins(*fg) == pytest.approx(0.5 * 0.8 + 0.5 * 0.45)
    # right-closed bins: a confidence of exactly .5 is in the first
    half = calibration_bins(torch.tensor([[0.5, 0.5]], dtype=torch.float64), torch.tensor([0]), n_bins=2)
    np.testing.assert_array_equal(half[0], [1, 0])
    assert math.isnan(expected_calibration_error_from_bins(np.zeros(3), np.zeros(3), np.zeros(3)))


def test_classwise_ece_hand_case():
    counts, conf, hits = classwise_calibration_bins(PROBS_4, LABELS_4, n_bins=2)
    assert counts.shape == (3, 2)
    # class 0: bin 2 {.9 hit, .8} -> |1 - 1.7|, bin 1 {.4 hit, .2} -> |1 - .6|: (.7 + .4) / 4
    # class 1: bin 1 {.05, .1 hit, .35, .45} -> |1 - .95| / 4; class 2: bin 1 -> |1 - .75| / 4
    expected = ((0.7 + 0.4) / 4 + 0.05 / 4 + 0.25 / 4) / 3
    assert classwise_calibration_error_from_bins(counts, conf, hits) == pytest.approx(expected)
