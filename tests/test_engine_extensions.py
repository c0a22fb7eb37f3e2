"""Engine extension points: the step-decay schedule, evaluation outputs other than logits and
intermediate layers by name."""
import numpy as np
import pytest
import torch
from torch import nn

from classlab.engine.predict import predict_outputs, save_predictions
from classlab.engine.schedule import lr_factor
from classlab.models.backbones import build_classifier, intermediates, layer_names

CPU = torch.device("cpu")


# --- step decay ----------------------------------------------------------------------------

def test_step_decay_multiplies_by_gamma_at_each_milestone():
    f = [lr_factor(s, 100, "step", milestones=(0.5, 0.75), gamma=0.1) for s in range(100)]
    assert f[:50] == [1.0] * 50
    assert f[50:75] == pytest.approx([0.1] * 25)
    assert f[75:] == pytest.approx([0.01] * 25)


@pytest.mark.parametrize("epochs,steps,milestone_epochs", [(90, 7, (30, 60)), (10, 3, (3, 7, 9)), (12, 5, (1,))])
def test_epoch_milestones_as_fractions_match_torch_multisteplr(epochs, steps, milestone_epochs):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestone_epochs), gamma=0.5)
    fractions = [e / epochs for e in milestone_epochs]
    for epoch in range(epochs):
        expected = opt.param_groups[0]["lr"]
        for i in range(steps):
            step = epoch * steps + i
            got = lr_factor(step, epochs * steps, "step", milestones=fractions, gamma=0.5)
            assert got == pytest.approx(expected), (epoch, i)
        opt.step()
        ref.step()


def test_step_schedule_refuses_bad_settings():
    with pytest.raises(ValueError, match="milestones"):
        lr_factor(0, 10, "step")
    with pytest.raises(ValueError, match="fractions"):
        lr_factor(0, 10, "step", milestones=(0.5, 3))
    with pytest.raises(ValueError, match="gamma"):
        lr_factor(0, 10, "step", milestones=(0.5,), gamma=0.0)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_factor(0, 1, "steps")  # a typo is an error even on a one-step run


# --- evaluation outputs --------------------------------------------------------------------

class _TwoHeads(nn.Module):
    """A small model with dropout (eval mode must switch it off) that returns named outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        feats = self.body(x)
        return {"logits": self.head(feats), "features": feats, "maps": x.mean(1, keepdim=True)}

    def logits_only(self, x):
        return self.forward(x)["logits"]


def _images(n=10):
    return torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


def test_predict_outputs_gathers_named_outputs_in_eval_mode_and_restores_the_mode():
    model, x = _TwoHeads(), _images()
    model.train()
    out = predict_outputs(model, x, [0.5], [0.25], CPU, outputs=("logits", "features"), batch_size=3)
    assert set(out) == {"logits", "features"} and model.training
    with torch.no_grad():
        expected = model.eval()(((x.float() / 255) - 0.5) / 0.25)
    assert torch.allclose(out["logits"], expected["logits"], atol=1e-6)
    assert torch.allclose(out["features"], expected["features"], atol=1e-6)
    everything = predict_outputs(model, x, [0.5], [0.25], CPU, outputs=None, batch_size=4)
    assert set(everything) == {"logits", "features", "maps"} and everything["maps"].shape == (10, 1, 4, 4)
    with pytest.raises(KeyError, match="embeddings"):
        predict_outputs(model, x, [0.5], [0.25], CPU, outputs=("embeddings",))


def test_predict_outputs_takes_a_tensor_as_logits_and_a_bound_method_sets_its_module_to_eval():
    model, x = _TwoHeads().train(), _images()
    a = predict_outputs(model.logits_only, x, [0.5], [0.25], CPU, batch_size=4)
    b = predict_outputs(model.logits_only, x, [0.5], [0.25], CPU, batch_size=7)
    assert set(a) == {"logits"} and torch.equal(a["logits"], b["logits"])  # dropout off: deterministic
    assert model.training


def test_predict_outputs_on_float_features_and_low_precision_outputs():
    feats = torch.randn(9, 5)
    out = predict_outputs(lambda z: {"logits": (2 * z).bfloat16(), "argmax": z.argmax(1)}, feats, None, None, CPU,
                          outputs=("logits", "argmax"), batch_size=4)
    assert out["logits"].dtype == torch.float32 and out["argmax"].dtype == torch.int64
    assert torch.allclose(out["logits"], 2 * feats, rtol=1e-2)
    assert torch.equal(out["argmax"], feats.argmax(1))


def test_save_predictions_keeps_the_contract_and_writes_atomically(tmp_path):
    logits = torch.randn(6, 3, dtype=torch.float64)
    path = save_predictions(tmp_path / "predictions.npz", {"logits": logits, "features": torch.randn(6, 4)},
                            labels=torch.arange(6) % 3)
    with np.load(path) as z:
        assert set(z.files) == {"logits", "labels", "features"}
        assert z["logits"].dtype == np.float32 and np.allclose(z["logits"], logits.numpy())
        assert z["labels"].tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="labels"):
        save_predictions(tmp_path / "bad.npz", {"logits": logits}, labels=np.zeros(5))
    with pytest.raises(ValueError, match="logits"):
        save_predictions(tmp_path / "bad.npz", {"features": logits}, labels=np.zeros(6))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.npz"]  # nothing half-written


# --- intermediate layers -------------------------------------------------------------------

BACKBONES = {"convnet": {"widths": [8, 16], "pool_after": [0]}, "resnet18": {}, "vit_tiny": {}}


def _model(name):
    torch.manual_seed(0)
    return build_classifier(name, 1, 5, img_size=28, backbone_kwargs=BACKBONES[name]).eval()


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_backbone_names_its_layers_and_one_pass_gives_them_all(name):
    model, x = _model(name), torch.randn(2, 1, 28, 28)
    names = layer_names(model)
    assert names[-2:] == ["pooled", "logits"] and len(names) > 3
    out = intermediates(model, x, names)
    assert list(out) == names
    with torch.no_grad():
        assert torch.allclose(out["logits"], model(x), atol=1e-5)
        assert torch.allclose(out["pooled"], model.features(x), atol=1e-5)
    for stage in names[:-2]:
        assert out[stage].ndim == 4 and out[stage].shape[0] == 2
    last = out[names[-3]]
    if name != "vit_tiny":  # a CNN's feature vector is the global average of its last map
        assert torch.allclose(last.mean(dim=(2, 3)), out["pooled"], atol=1e-5)


def test_convnet_blocks_are_the_activations_before_pooling():
    model, x = _model("convnet"), torch.randn(2, 1, 28, 28)
    out = intermediates(model, x, ["block0", "block1"])
    with torch.no_grad():
        f = model.backbone.features  # conv, BN, ReLU, pool (after block 0), conv, BN, ReLU
        assert isinstance(f[3], nn.MaxPool2d)
        assert torch.allclose(out["block0"], f[:3](x), atol=1e-6)  # before the pool
        assert torch.allclose(out["block1"], f[:7](x), atol=1e-6)


def test_vit_block_maps_are_the_patch_tokens_of_that_block():
    model, x = _model("vit_tiny"), torch.randn(2, 1, 28, 28)
    out = intermediates(model, x, ["block3", "backbone.blocks.3", "block0"])  # a stage and a module hook
    tokens = out["backbone.blocks.3"]  # (B, 1 + 49, D): the class token first
    assert tokens.shape == (2, 50, 192)
    assert torch.allclose(out["block3"], tokens[:, 1:].reshape(2, 7, 7, 192).permute(0, 3, 1, 2), atol=1e-6)
    # asking for stages only stops early and gives the same maps
    early = intermediates(model, x, ["block0"])
    assert torch.allclose(early["block0"], out["block0"], atol=1e-6)


def test_intermediates_stay_in_the_graph_for_gradient_saliency():
    model, x = _model("resnet18"), torch.randn(2, 1, 28, 28)
    out = intermediates(model, x, ["layer4", "logits"])
    (grad,) = torch.autograd.grad(out["logits"][:, 1].sum(), out["layer4"])
    assert grad.shape == out["layer4"].shape and grad.abs().sum() > 0
    # the hooks are gone afterwards
    assert not any(m._forward_hooks for m in model.modules())


def test_unknown_layer_names_are_refused_with_the_known_ones():
    with pytest.raises(KeyError, match="block0"):
        intermediates(_model("convnet"), torch.randn(1, 1, 28, 28), ["layer9"])


def test_train_accuracy_counts_only_labelled_rows():
    """A method whose logits predict every labelled row right: train_acc must be 1 however many rows
    carry no label (y = -1, as discovery's unlabelled pool)."""
    from classlab.engine.trainer import TrainConfig, Trainer
    from classlab.methods.base import Method

    class Oracle(Method):
        def training_step(self, batch):
            logits = torch.nn.functional.one_hot(batch["y"].clamp(min=0), 3).float()
            return (self.model(batch["x"]) ** 2).mean(), {"logits": logits}

    method = Oracle(nn.Linear(2, 1), {"lr": 0.1, "optimizer": "sgd"}, 3)
    x = torch.randn(12, 2)
    y = torch.tensor([0, 1, 2, -1, -1, -1, 0, 1, 2, -1, -1, -1])
    trainer = Trainer(method, TrainConfig(batch_size=6, schedule="constant", warmup_frac=0.0), torch.device("cpu"),
                      0, None, progress=False)
    history = trainer.fit(trainer.make_loader(x, y, None, None))
    assert history[-1]["train_acc"] == 1.0  # 6 labelled rows, all right; the 6 unlabelled ones ignored
