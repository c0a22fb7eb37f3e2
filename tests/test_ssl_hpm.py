"""HPM (hard patches mining) and its random-mask baseline ``mim_random``: the mask selection, the
easy-to-hard schedule, the relative loss-predictor objective, the masked-only reconstruction loss,
the MAE-style encoder, and one short pretraining run of each through ``classlab.train.train``."""
import json
import math

import pytest
import torch

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.methods.pretrain.hpm import (easy_to_hard_alpha, encode, num_masked, patch_targets, patchify,
                                           reconstruction_loss, relative_loss, select_mask, visible_indices)
from classlab.methods.pretrain.simclr import view_generator
from classlab.methods.registry import get_method
from classlab.models import build_classifier
from classlab.train import train

TINY_VIT = {"depth": 1, "embed_dim": 16, "num_heads": 2, "patch_size": 2}  # 8x8 digits -> 16 patches
TINY_HEADS = {"decoder_dim": 16, "decoder_depth": 1, "decoder_heads": 2, "predictor_depth": 1}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _method(name: str, overrides: dict | None = None, backbone: str = "vit_tiny", kwargs=None):
    model = build_classifier(backbone, 1, 10, img_size=8, backbone_kwargs=TINY_VIT if kwargs is None else kwargs)
    hp = resolve_checked_hparams("pretrain", name, {**TINY_HEADS, **(overrides or {})})
    return get_method("pretrain", name)(model, hp, 10)


def _batch(n: int = 6, step_seed: int = 0) -> dict:
    x = torch.randn(n, 1, 8, 8, generator=_gen(step_seed))
    return {"x": x, "y": torch.zeros(n, dtype=torch.long), "index": torch.arange(n)}


# --- the mask: count, hard part, random part ---------------------------------------------------
def test_mask_count_is_round_ratio_times_patches():
    assert num_masked(0.75, 49) == 37 and num_masked(0.75, 16) == 12 and num_masked(0.5, 49) == 24  # round(24.5) even
    assert num_masked(0.9, 49) == 44
    method = _method("hpm")
    assert method.num_patches == 16 and method.n_mask == 12


def test_alpha_one_masks_exactly_the_top_predicted_patches():
    scores = torch.stack([torch.randperm(49, generator=_gen(k)).float() for k in range(5)])  # distinct per row
    mask = select_mask(scores, 5, 49, 37, 37, _gen(0))
    expected = torch.zeros(5, 49, dtype=torch.bool).scatter(1, torch.topk(scores, 37, dim=1).indices, True)
    assert torch.equal(mask, expected)
    # the 12 visible patches are the 12 lowest scores
    assert torch.equal(torch.sort(visible_indices(mask), 1).values,
                       torch.sort(torch.topk(-scores, 12, dim=1).indices, 1).values)


def test_partial_alpha_masks_the_hardest_then_random_ones():
    scores = torch.arange(49.0).repeat(8, 1)  # patch 48 hardest
    masks = select_mask(scores, 8, 49, 37, 10, _gen(3))
    assert bool((masks.sum(1) == 37).all())
    assert bool(masks[:, 39:].all())  # the 10 hardest always masked
    # the other 27 are random: rows differ, and not simply the next-hardest patches
    assert len({tuple(r.tolist()) for r in masks}) > 1


def test_alpha_zero_masks_uniformly_at_random_with_the_right_count():
    masks = select_mask(None, 400, 49, 37, 0, _gen(1))
    assert bool((masks.sum(1) == 37).all())
    freq = masks.float().mean(0)  # each patch masked with probability 37/49 = 0.755
    assert float(freq.min()) > 0.62 and float(freq.max()) < 0.88
    assert torch.equal(masks, select_mask(None, 400, 49, 37, 0, _gen(1)))  # the generator fixes it
    assert not torch.equal(masks, select_mask(None, 400, 49, 37, 0, _gen(2)))
    # the method's masks come from view_generator(batch, global_step, salt): same step same mask
    method = _method("mim_random")
    batch = _batch()
    method.global_step = 5
    first, _ = method.make_mask(batch)
    assert torch.equal(first, method.make_mask(batch)[0]) and bool((first.sum(1) == 12).all())
    method.global_step = 6
    assert not torch.equal(first, method.make_mask(batch)[0])


# --- the easy-to-hard schedule ------------------------------------------------------------------
def test_schedule_runs_from_alpha_start_to_alpha_end():
    assert easy_to_hard_alpha(0, 101, 0.0, 0.5) == 0.0
    assert easy_to_hard_alpha(100, 101, 0.0, 0.5) == pytest.approx(0.5)
    assert easy_to_hard_alpha(50, 101, 0.0, 0.5) == pytest.approx(0.25)
    assert easy_to_hard_alpha(500, 101, 0.0, 0.5) == pytest.approx(0.5)  # held past the end
    assert easy_to_hard_alpha(3, 11, 0.2, 0.8) == pytest.approx(0.2 + 0.3 * 0.6)
    # the method reads T = epochs x batches per epoch from the loader the engine hands it
    method = _method("hpm", {"epochs": 4})
    method.on_train_start(range(25))
    assert method.total_steps == 100
    assert method.alpha(0) == 0.0 and method.alpha(99) == pytest.approx(0.5)
    method.global_step = 0
    assert method.make_mask(_batch())[1] == 0.0  # first step: all random
    assert _method("mim_random").alpha(1000) == 0.0


def test_late_hpm_masks_contain_the_teachers_hardest_patches():
    method = _method("hpm", {"alpha_start": 1.0, "alpha_end": 1.0})
    batch = _batch()
    mask, alpha = method.make_mask(batch)
    assert alpha == 1.0
    scores = method.predicted_losses(batch["x"])
    expected = torch.zeros_like(mask).scatter(1, torch.topk(scores, 12, dim=1).indices, True)
    assert torch.equal(mask, expected)


# --- the loss predictor's relative objective ---------------------------------------------------
def test_relative_loss_hand_computed_pair():
    mask = torch.tensor([[True, True, False]])
    losses = torch.tensor([[1.0, 2.0, 9.0]])  # patch 1 harder; patch 2 visible: ignored
    # V = {(1, 0), (0, 1)}; both terms equal -log sigma(s_1 - s_0)
    assert float(relative_loss(torch.tensor([[0.0, 0.0, 5.0]]), losses, mask)) == pytest.approx(math.log(2))
    assert float(relative_loss(torch.tensor([[0.0, 1.0, -7.0]]), losses, mask)) == pytest.approx(math.log(1 + math.e ** -1))
    # ties are not pairs
    assert float(relative_loss(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[2.0, 2.0, 0.0]]), mask)) == 0.0


def test_relative_loss_is_low_for_the_right_order_and_high_for_the_reverse():
    losses = torch.rand(4, 16, generator=_gen(0))
    mask = torch.rand(4, 16, generator=_gen(1)) < 0.75
    right = relative_loss(100 * losses, losses, mask)
    reverse = relative_loss(-100 * losses, losses, mask)
    flat = relative_loss(torch.zeros(4, 16), losses, mask)
    assert float(flat) == pytest.approx(math.log(2))
    assert float(right) < 0.05 and float(reverse) > 10.0
    # only the order matters: a monotone transform of a perfect ranking is as good
    assert float(relative_loss(100 * losses.sqrt(), losses, mask)) < 0.05
    # visible patches do not count, whatever their scores
    scrambled = torch.where(mask, 100 * losses, -100 * losses)
    assert float(relative_loss(scrambled, losses, mask)) == pytest.approx(float(right))


# --- reconstruction: masked patches only, per-patch normalised targets --------------------------
def test_reconstruction_loss_counts_only_masked_patches():
    pred, target = torch.randn(3, 16, 4, generator=_gen(0)), torch.randn(3, 16, 4, generator=_gen(1))
    mask = select_mask(None, 3, 16, 12, 0, _gen(2))
    loss, per_patch = reconstruction_loss(pred, target, mask)
    assert float(loss) == pytest.approx(float(((pred - target) ** 2).mean(-1)[mask].mean()))
    changed = pred.clone()
    changed[~mask] += 5.0  # a visible patch's prediction
    assert float(reconstruction_loss(changed, target, mask)[0]) == pytest.approx(float(loss))
    changed = pred.clone()
    changed[mask] += 0.5
    assert float(reconstruction_loss(changed, target, mask)[0]) != pytest.approx(float(loss))
    assert per_patch.shape == (3, 16)


def test_patch_targets_are_the_vit_patches_normalised_per_patch():
    x = torch.arange(64.0).reshape(1, 1, 8, 8)
    patches = patchify(x, 2)
    assert patches.shape == (1, 16, 4)
    assert patches[0, 0].tolist() == [0.0, 1.0, 8.0, 9.0] and patches[0, 1].tolist() == [2.0, 3.0, 10.0, 11.0]
    assert patches[0, 4].tolist() == [16.0, 17.0, 24.0, 25.0]  # row-major over the 4x4 grid
    t = patch_targets(x, 2, True)
    assert torch.allclose(t.mean(-1), torch.zeros(1, 16), atol=1e-6)
    assert torch.allclose(t.var(-1), torch.ones(1, 16), atol=1e-3)
    assert torch.equal(patch_targets(x, 2, False), patches)


# --- the encoder and the step -------------------------------------------------------------------
def test_mae_encoder_on_all_patches_is_the_backbones_own_forward():
    method = _method("hpm")
    backbone = method.model.backbone.eval()
    x = torch.randn(3, 1, 8, 8, generator=_gen(0))
    every = torch.arange(16).repeat(3, 1)
    assert torch.allclose(encode(backbone, x, every), backbone.forward_features(x), atol=1e-5)
    assert torch.allclose(encode(backbone, x), backbone.forward_features(x), atol=1e-5)
    keep = visible_indices(select_mask(None, 3, 16, 12, 0, _gen(1)))
    assert encode(backbone, x, keep).shape == (3, 1 + 4, 16)  # class token + 4 visible patches


def test_training_step_is_pure_and_the_teacher_follows_the_moving_average():
    method = _method("hpm", {"alpha_start": 0.5, "alpha_end": 0.5, "ema_decay": 0.9, "ema_decay_end": 0.9})
    batch = _batch()
    method.global_step = 3
    loss, logs = method.training_step(batch)
    again, _ = method.training_step(batch)
    assert float(loss.detach()) == float(again.detach()) and set(logs) == {"rec_loss", "pred_loss", "alpha"}
    assert float(loss.detach()) == pytest.approx(float(logs["rec_loss"] + logs["pred_loss"]))
    teacher_before = method.teacher["heads"].embed.weight.clone()
    with torch.no_grad():
        method.heads.embed.weight.add_(1.0)
    method.on_after_step(batch, logs)
    expected = 0.9 * teacher_before + 0.1 * method.heads.embed.weight
    assert torch.allclose(method.teacher["heads"].embed.weight, expected, atol=1e-6)
    # mim_random: no predictor, no teacher, the loss is the reconstruction alone
    base = _method("mim_random")
    assert base.heads.predictor is None and base.teacher is None
    loss, logs = base.training_step(batch)
    assert float(loss.detach()) == float(logs["rec_loss"]) and "pred_loss" not in logs


# --- end to end through the generic stage function --------------------------------------------
@pytest.mark.parametrize("name", ["hpm", "mim_random"])
def test_pretraining_runs_end_to_end(name, digits_prepared, tmp_path, one_thread):
    out = tmp_path / name
    overrides = {**TINY_HEADS, "epochs": 2, "batch_size": 32, "samples_per_class": 8, "augment_pad": 0}
    result = train("pretrain", name, digits_prepared, "vit_tiny", 0, out, overrides=overrides,
                   backbone_kwargs=TINY_VIT, threads=1, progress=False)
    assert (out / "model.pt").exists() and (out / "history.json").exists() and not (out / "last.pt").exists()
    history = json.loads((out / "history.json").read_text())
    losses = [row["loss"] for row in history["epochs"]]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert history["meta"]["head_trained"] is False and result["meta"]["train_steps"] == 4


# --- bad input: named, nothing written ---------------------------------------------------------
@pytest.mark.parametrize("ratio", [0.0, 1.0, 1.5, -0.2])
def test_a_mask_ratio_outside_0_1_is_named(ratio, digits_prepared, tmp_path):
    with pytest.raises(ConfigError, match="mask_ratio"):
        resolve_checked_hparams("pretrain", "hpm", {"mask_ratio": ratio})
    # the method checks its hyperparameters itself (train() resolves them unchecked)
    model = build_classifier("vit_tiny", 1, 10, img_size=8, backbone_kwargs=TINY_VIT)
    with pytest.raises(ConfigError, match="mask_ratio"):
        get_method("pretrain", "hpm")(model, {**resolve_checked_hparams("pretrain", "hpm"), "mask_ratio": ratio}, 10)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="mask_ratio"):
        train("pretrain", "hpm", digits_prepared, "vit_tiny", 0, out, overrides={"mask_ratio": ratio},
              backbone_kwargs=TINY_VIT, threads=1, progress=False)
    assert not out.exists() or not any(out.iterdir())


def test_a_ratio_masking_no_or_every_patch_is_named():
    with pytest.raises(ConfigError, match="mask_ratio"):
        _method("hpm", {"mask_ratio": 0.02})  # round(0.02 x 16) = 0 masked


def test_a_non_vit_backbone_is_named(digits_prepared, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="backbone"):
        train("pretrain", "hpm", digits_prepared, "convnet", 0, out, backbone_kwargs={"widths": [8]}, threads=1,
              progress=False)
    assert not out.exists() or not any(out.iterdir())


def test_mining_without_a_trained_predictor_is_named():
    with pytest.raises(ConfigError, match="alpha_end"):
        _method("mim_random", {"alpha_end": 0.3})
    with pytest.raises(ConfigError, match="alpha_start"):
        _method("hpm", {"learn_loss": False, "alpha_start": 0.2, "alpha_end": 0.0})


def test_decoder_heads_must_divide_the_decoder_width():
    with pytest.raises(ConfigError, match="decoder_heads"):
        _method("hpm", {"decoder_dim": 16, "decoder_heads": 3})
