"""Method registry and the supervised family's core equations."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from classlab.methods.registry import METHODS, get_method, list_methods
from classlab.models import build_classifier


@pytest.mark.parametrize("family", ["pretrain", "supervised", "incremental", "distill"])
def test_each_module_registers_the_method_it_is_named_after(family):
    for name in list_methods(family):
        importlib.import_module(f"classlab.methods.{family}.{name}")
        assert (family, name) in METHODS, f"{family}/{name}.py registers no method named {name!r}"


def test_unknown_method_names_the_family_and_the_choices():
    with pytest.raises(KeyError, match="erm"):
        get_method("supervised", "nope")


def _batch(n=16, k=4):
    torch.manual_seed(0)
    return {"x": torch.randn(n, 1, 8, 8), "y": torch.randint(0, k, (n,)), "index": torch.arange(n)}


def _model(k=4):
    torch.manual_seed(0)
    return build_classifier("convnet", 1, k, backbone_kwargs={"widths": [8, 8], "pool_after": [0]})


def test_erm_loss_is_cross_entropy_with_label_smoothing():
    batch = _batch()
    method = get_method("supervised", "erm")(_model(), {"lr": 0.1, "label_smoothing": 0.1}, 4)
    loss, logs = method.training_step(batch)
    logits = logs["logits"]
    # label smoothing eps: target (1 - eps) onehot + eps / K
    target = 0.9 * F.one_hot(batch["y"], 4).float() + 0.1 / 4
    expected = -(target * F.log_softmax(logits, 1)).sum(1).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_linear_probe_trains_only_the_head_and_keeps_bn_statistics():
    model = _model()
    method = get_method("supervised", "linear_probe")(model, {"lr": 0.5, "optimizer": "sgd"}, 4)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.weight.clone()
    opt = method.configure_optimizer()
    method.train()
    for _ in range(3):
        loss, _ = method.training_step(_batch())
        method.optimizer_step(loss, opt, lambda: loss)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), f"backbone tensor {k} changed"
    assert not torch.equal(model.head.weight, head_before)


@pytest.mark.parametrize("backbone,size", [("convnet", 28), ("resnet18", 28), ("vit_tiny", 28)])
def test_backbones_give_features_on_small_images(backbone, size):
    model = build_classifier(backbone, 1, 10, img_size=size)
    out = model(torch.randn(2, 1, size, size))
    assert out.shape == (2, 10)
    assert model.features(torch.randn(2, 1, size, size)).shape == (2, model.num_features)


def test_head_init_keeps_the_pretraining_head_only_for_the_same_label_space():
    from classlab.train import _init_head

    def model(seed):
        torch.manual_seed(seed)
        return build_classifier("convnet", 1, 10, img_size=8, backbone_kwargs={"widths": [4], "pool_after": [0]})

    source, meta = model(0), {"dataset": "digits", "num_classes": 10}
    same = {"dataset": "digits", "num_classes": 10, "hparams": "{}"}
    target = model(1)
    assert _init_head(target, source, same, meta, "auto") == "pretrained"
    assert torch.equal(target.head.weight, source.head.weight)
    for source_meta, how in ((same, "fresh"),
                             ({**same, "hparams": '{"classes": [0, 1, 2]}'}, "auto"),  # first-task pretraining
                             ({**same, "dataset": "mnist"}, "auto")):
        target = model(1)
        fresh = target.head.weight.clone()
        assert _init_head(target, source, source_meta, meta, how) == "fresh"
        assert torch.equal(target.head.weight, fresh)
    with pytest.raises(ValueError, match="head_init"):
        _init_head(model(1), source, same, meta, "keep")


def test_a_method_yaml_can_extend_another_and_change_only_what_differs(tmp_path, monkeypatch):
    import classlab.config as config

    (tmp_path / "fam").mkdir()
    (tmp_path / "fam" / "base.yaml").write_text("hparams: {lr: 0.1, epochs: 3}\n")
    (tmp_path / "fam" / "variant.yaml").write_text("extends: base\nhparams: {epochs: 5, extra: 1}\n")
    (tmp_path / "fam" / "loop.yaml").write_text("extends: loop\nhparams: {}\n")
    monkeypatch.setattr(config, "method_config_path", lambda family, method: tmp_path / family / f"{method}.yaml")
    assert config.method_defaults("fam", "variant") == {"lr": 0.1, "epochs": 5, "extra": 1}
    with pytest.raises(config.ConfigError, match="extends names the method itself"):
        config.method_defaults("fam", "loop")


def test_training_subset_by_indices_classes_and_per_class_count():
    from classlab.train import training_subset

    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    assert training_subset(labels, [], 0, seed=0) is None                       # the whole split
    assert training_subset(labels, [0, 2], 0, seed=0).tolist() == [0, 2, 3, 5, 6, 8, 9]
    assert training_subset(labels, [0], 0, seed=0, indices=[9, 3]).tolist() == [9, 3]
    with pytest.raises(ValueError, match="outside classes"):
        training_subset(labels, [0], 0, seed=0, indices=[1])
    two = training_subset(labels, [0, 1], 2, seed=5)
    assert torch.bincount(labels[two], minlength=3).tolist() == [2, 2, 0]
    assert torch.equal(two, training_subset(labels, [0, 1], 2, seed=5))         # seeded
