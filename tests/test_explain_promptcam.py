"""Prompt-CAM (classlab.methods.explain.promptcam) and the ViT's configurable patch size.

Tiny ViTs (2 blocks, 24 dims, 2 heads, 4x4 patches) on 16x16 inputs; the training test builds its
own 3-class texture dataset (one patch-aligned 4x4 object per image), pretrains the ViT on it, and
trains Prompt-CAM on the frozen copy through ``classlab.train.train``.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention

from classlab.methods.explain.promptcam import PromptCAM, attention_output, attention_weights
from classlab.models import build_classifier
from classlab.models.backbones import build_backbone, intermediates

TINY = {"depth": 2, "embed_dim": 24, "num_heads": 2, "patch_size": 4}
HP = {"prompt_mode": "deep", "prompt_dropout": 0.1, "optimizer": "adamw", "lr": 0.01, "weight_decay": 0.0}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    torch.manual_seed(0)


def _promptcam(num_classes=3, **hp) -> PromptCAM:
    model = build_classifier("vit_tiny", 1, num_classes, img_size=16, backbone_kwargs=TINY)
    return PromptCAM(model, {**HP, **hp}, num_classes)


# --- the backbone ---------------------------------------------------------------------------

def test_vit_patch_size_is_a_backbone_keyword_and_sets_the_layer_grid():
    default = build_classifier("vit_tiny", 1, 3, img_size=16, backbone_kwargs={"depth": 1}).eval()
    fine = build_classifier("vit_tiny", 1, 3, img_size=16, backbone_kwargs={"depth": 1, "patch_size": 2}).eval()
    x = torch.randn(2, 1, 16, 16)
    assert intermediates(default, x, ["block0"])["block0"].shape[-2:] == (4, 4)  # 4x4 patches by default
    assert intermediates(fine, x, ["block0"])["block0"].shape[-2:] == (8, 8)
    with pytest.raises(ValueError, match="backbone_kwargs.vit_tiny.patch_size: 5 .*image size 16"):
        build_backbone("vit_tiny", 1, img_size=16, patch_size=5)


# --- the model: prompts, scores, what trains ---------------------------------------------

def test_logits_and_only_the_prompts_and_the_scoring_head_train():
    method = _promptcam(num_classes=3)
    assert method.prompts.embeddings.shape == (2, 3, 24)  # deep: C prompts for each of the 2 blocks
    assert _promptcam(prompt_mode="shallow").prompts.embeddings.shape == (1, 3, 24)
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {"prompts.embeddings", "score.weight", "score.bias"}
    frozen = copy.deepcopy(method.model.state_dict())
    prompts0 = method.prompts.embeddings.detach().clone()
    optimizer = method.configure_optimizer()
    method.train()
    assert not method.model.training and not method.model.backbone.training  # the ViT stays in eval mode
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 3, (8,))
    for _ in range(3):
        loss, logs = method.training_step({"x": x, "y": y})
        assert logs["logits"].shape == (8, 3)
        method.optimizer_step(loss, optimizer, lambda: method.training_step({"x": x, "y": y})[0])
        assert all(p.grad is None for p in method.model.parameters())  # no gradient reaches the backbone
        assert method.prompts.embeddings.grad is not None and method.score.weight.grad is not None
    after = method.model.state_dict()
    assert all(torch.equal(frozen[k], after[k]) for k in frozen)  # backbone and unused head unchanged
    assert not torch.equal(prompts0, method.prompts.embeddings.detach())
    method.eval()
    assert method(x).shape == (8, 3)
    assert torch.equal(method(x), method(x))  # no prompt dropout at evaluation


def test_forward_matches_a_reference_with_the_prompts_after_the_class_token():
    """logits[c] = w^T LN(z_c^L) + b, with block l's prompts inserted before it and dropped after it.
    The reference puts them after the class token ([cls, P, patches]); without an attention mask
    the order only permutes tokens, so the logits agree with the released code's [P, cls, patches]."""
    method = _promptcam(num_classes=3).eval()
    vit = method.model.backbone
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        for l, block in enumerate(vit.blocks):
            seq = torch.cat([t[:, :1], method.prompts.embeddings[l].expand(4, -1, -1), t[:, 1:]], dim=1)
            out = block(seq)
            t = torch.cat([out[:, :1], out[:, 4:]], dim=1)
        z = vit.norm(out)[:, 1:4]
        reference = (z @ method.score.weight.T).squeeze(-1) + method.score.bias
        assert torch.allclose(method(x), reference, atol=1e-5)
        # deep prompts: the first block's prompts matter too (weakly: timm's init scales the random
        # ViT's weights by 0.02; a constant shift of a prompt would vanish in LayerNorm)
        method.prompts.embeddings[0].add_(torch.randn_like(method.prompts.embeddings[0]))
        assert (method(x) - reference).abs().max() > 1e-5


def test_shallow_prompts_enter_once_and_stay_to_the_end():
    method = _promptcam(num_classes=3, prompt_mode="shallow").eval()
    vit = method.model.backbone
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        t = vit.norm_pre(vit._pos_embed(vit.patch_embed(x)))
        t = vit.blocks(torch.cat([method.prompts.embeddings[0].expand(2, -1, -1), t], dim=1))
        reference = method.score(vit.norm(t)[:, :3]).squeeze(-1)
        assert torch.allclose(method(x), reference, atol=1e-5)
    with pytest.raises(ValueError, match="prompt_mode: 'deepest'.*'deep', 'shallow'"):
        _promptcam(prompt_mode="deepest")
    with pytest.raises(ValueError, match="needs a ViT"):
        PromptCAM(build_classifier("convnet", 1, 3, img_size=16), HP, 3)


# --- attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("fused", [True, False])
def test_recomputed_attention_is_the_blocks_own(fused):
    """softmax(q k^T / sqrt(d_h)) from the fused qkv, through the values and proj, gives back the
    module's output: on the ViT's last block, and on a timm Attention with q/k norms."""
    block = _promptcam().model.backbone.blocks[-1].eval()
    qk_normed = Attention(24, num_heads=2, qkv_bias=True, qk_norm=True, norm_layer=torch.nn.LayerNorm).eval()
    for attn in (block.attn, qk_normed):
        attn.fused_attn = fused
        u = torch.randn(3, 7, 24)
        with torch.no_grad():
            weights = attention_weights(attn, u)
            assert weights.shape == (3, 2, 7, 7)
            assert torch.allclose(weights.sum(-1), torch.ones(3, 2, 7), atol=1e-6)
            assert torch.allclose(attention_output(attn, u, weights), attn(u), atol=1e-5)
            # a different attention pattern would not reproduce it
            assert not torch.allclose(attention_output(attn, u, weights.flip(-1)), attn(u), atol=1e-4)


def test_maps_are_per_head_non_negative_class_specific_and_upsampled():
    method = _promptcam(num_classes=3)
    method.train()  # the maps must not depend on, nor change, the mode
    x = torch.randn(5, 1, 16, 16)
    classes = torch.tensor([0, 1, 2, 0, 1])
    flags = {n: p.requires_grad for n, p in method.named_parameters()}
    maps = method.attention_maps(x, classes)
    assert maps.shape == (5, 2, 4, 4)  # (B, heads, 16/4, 16/4)
    assert (maps >= 0).all()
    per_head = maps.flatten(2).sum(-1)
    assert (per_head <= 1 + 1e-6).all() and (per_head > 0).all()  # prompts and the class token take the rest
    assert not torch.allclose(maps[0], method.attention_maps(x[:1], torch.tensor([1]))[0])  # class-specific
    raw = method.attribute(method, x, classes, "input")
    assert torch.allclose(raw, maps.mean(1))
    full = method.explain(method, x, classes, "input")
    assert full.shape == (5, 16, 16) and full.dtype == torch.float32
    assert torch.allclose(full, F.interpolate(raw[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0])
    assert method.training and method.prompt_dropout.training and not method.model.training
    assert {n: p.requires_grad for n, p in method.named_parameters()} == flags
    assert all(p.grad is None for p in method.parameters())


def test_bad_class_index_layer_or_model_is_refused():
    method = _promptcam(num_classes=3)
    x = torch.randn(2, 1, 16, 16)
    with pytest.raises(ValueError, match="class index 3 is outside the model's head: it has 3 classes"):
        method.explain(method, x, torch.tensor([0, 3]), "input")
    with pytest.raises(ValueError, match="class index -1 is outside the model's head: it has 3 classes"):
        method.attention_maps(x, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        method.attention_maps(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="promptcam is not layered.*'input', not 'block1'"):
        method.attribute(method, x, torch.tensor([0, 1]), "block1")
    with pytest.raises(TypeError, match="trained Prompt-CAM model"):
        method.attribute(method.model, x, torch.tensor([0, 1]), "input")


def test_randomisation_cascade_starts_with_the_prompts_and_the_scoring_head():
    """The trained readout (scoring head and prompts) is the cascade's top step; the Classifier's
    unused head is in no step; re-initialising the prompts redraws VPT's uniform init."""
    from classlab.methods.saliency_method import randomisation_cascade, randomise_

    method = _promptcam(num_classes=3)
    steps = randomisation_cascade(method)
    name, modules = steps[0]
    assert name == "head" and set(map(id, modules)) == {id(method.score), id(method.prompts)}
    assert all(m is not method.model.head for _, ms in steps for m in ms)
    assert [n for n, _ in steps[1:4]] == ["backbone.norm", "block1", "block0"]
    before = method.prompts.embeddings.detach().clone()
    randomise_(modules, seed=1)
    after = method.prompts.embeddings.detach()
    assert not torch.equal(before, after) and after.abs().max() <= method.prompts.bound


# --- config ---------------------------------------------------------------------------------

def test_yaml_defaults_validate_and_bad_values_are_named():
    from classlab.config import check_hparams, resolve_hparams

    hp = resolve_hparams("explain", "promptcam", None)
    assert check_hparams("explain", "promptcam", hp) == []
    assert (hp["optimizer"], hp["lr"], hp["momentum"], hp["weight_decay"], hp["batch_size"]) == ("sgd", 0.005, 0.9,
                                                                                                   0.001, 16)
    assert hp["prompt_mode"] == "deep" and hp["prompt_dropout"] == 0.1 and hp["head_init"] == "fresh"
    problems = check_hparams("explain", "promptcam", {**hp, "prompt_mode": "wide", "prompt_dropout": 1.0})
    assert any("hparams.prompt_mode" in p and "'wide' is not one of" in p for p in problems)
    assert any("hparams.prompt_dropout" in p for p in problems)


# --- a tiny run through the engine ----------------------------------------------------------

TEXTURES = np.stack([np.ones((4, 4)), np.indices((4, 4)).sum(0) % 2, np.repeat([[1], [0], [1], [0]], 4, 1)])


def _texture_dataset(root, counts=(300, 60, 60), seed=0):
    """Class = the texture (solid, checker, stripes) of one 4x4 object at a random patch-aligned cell
    of a noisy 16x16 canvas. Returns the prepared directory and the test objects' cells."""
    from classlab.engine.checkpoint import save_checkpoint
    from classlab.io import write_json

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    splits, cells_of = {}, {}
    for split, n in zip(("train", "val", "test"), counts):
        y = rng.integers(0, 3, n)
        x = rng.integers(0, 40, (n, 1, 16, 16)).astype(np.float64)
        cells = rng.integers(0, 4, (n, 2))
        for i, (r, c) in enumerate(cells):
            x[i, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 60 + 190 * TEXTURES[y[i]]
        x = x.astype(np.uint8)
        if split == "train":
            mean, std = [float(x.mean() / 255)], [float(x.std() / 255)]
        save_checkpoint({"x": torch.from_numpy(x), "y": torch.from_numpy(y.astype(np.int64)),
                         "source_index": torch.arange(n)}, root / f"{split}.pt")
        splits[split] = {"file": f"{split}.pt", "count": int(n)}
        cells_of[split] = torch.from_numpy(cells[:, 0] * 4 + cells[:, 1])
    write_json(root / "manifest.json", {"dataset": "textures", "class_names": ["solid", "checker", "stripes"],
                                        "num_classes": 3, "shape": [1, 16, 16], "splits": splits,
                                        "channel_mean": mean, "channel_std": std})
    return root, cells_of["test"]


def test_tiny_run_learns_round_trips_and_its_maps_point_at_the_object(tmp_path):
    from classlab.data.prepare import load_prepared
    from classlab.engine.checkpoint import load_checkpoint
    from classlab.train import evaluate, load_model, load_predictor, train

    data, cells = _texture_dataset(tmp_path / "data")
    pre = {"epochs": 10, "lr": 0.003, "optimizer": "adamw", "weight_decay": 0.0, "batch_size": 32,
           "augment_pad": 0, "augment_hflip": False}
    train("supervised", "erm", data, "vit_tiny", 0, tmp_path / "pre", overrides=pre, backbone_kwargs=TINY,
          threads=1, progress=False)
    ours = {"epochs": 10, "augment_pad": 0}  # the YAML's SGD recipe; no translation: the objects sit on patches
    train("explain", "promptcam", data, "vit_tiny", 0, tmp_path / "pc", overrides=ours, backbone_kwargs=TINY,
          init=tmp_path / "pre" / "model.pt", threads=1, progress=False)
    metrics = evaluate(tmp_path / "pc" / "model.pt", data, tmp_path / "pc", threads=1)
    assert metrics["top1"] >= 0.8  # chance is 1/3

    method, meta = load_predictor(tmp_path / "pc" / "model.pt")
    assert isinstance(method, PromptCAM) and meta["head_trained"] is False
    state = load_checkpoint(tmp_path / "pc" / "model.pt")
    assert torch.equal(method.prompts.embeddings, state["method"]["prompts.embeddings"])
    # the frozen backbone is the init's, unchanged by training
    source, _ = load_model(tmp_path / "pre" / "model.pt")
    assert all(torch.equal(v, method.model.backbone.state_dict()[k]) for k, v in source.backbone.state_dict().items())
    test = load_prepared(data).test
    x = (test.x.float() / 255 - meta["channel_mean"][0]) / meta["channel_std"][0]
    method.eval()
    with torch.no_grad():
        logits = method(x)
    saved = np.load(tmp_path / "pc" / "predictions.npz")["logits"]
    assert np.allclose(logits.numpy(), saved, atol=1e-5)
    again, _ = load_predictor(tmp_path / "pc" / "model.pt")
    assert torch.equal(again.eval()(x), logits)
    # the true class's prompt attends to the object: its map's maximum is the object's cell far
    # more often than the 1/16 of a random cell
    maps = method.attribute(method, x, test.y, "input")
    hits = (maps.flatten(1).argmax(1) == cells).float().mean()
    assert hits >= 0.3
    assert json.loads(meta["hparams"])["prompt_mode"] == "deep"
