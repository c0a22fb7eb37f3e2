"""CoTAP (pretrain/cotap): the continuous-target AP against hand-computed values, its tolerance to a
wrongly paired patch, the object-aware filter dropping no-object (zero / background) patches, the
loss's invariance to the order of anchors and candidates, a pure and label-free training step whose
teacher moves only after the step, one short end-to-end pretraining on tiny dense scenes, and bad
input (a non-positive temperature, a backbone without a feature map) refused before anything is
written."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from classlab.config import ConfigError, check_hparams, method_defaults
from classlab.methods.registry import get_method
from classlab.models import build_classifier

TINY = {"widths": [8, 8], "pool_after": [0]}
RECIPE = {"colors": ["red", "green", "blue"], "n_train": 48, "n_val": 16, "n_test": 16, "imbalance_ratio": 5.0,
          "k_min": 2, "k_max": 3, "rare_max": 2, "common_max": 5}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """Tiny digits_lt_scenes (24x24 RGB scenes of 2-3 coloured digits, 48 train scenes)."""
    from classlab.data.prepare import prepare
    from classlab.data.registry import get_dataset

    root = tmp_path_factory.mktemp("cotap_scenes")
    get_dataset("digits_lt_scenes").download(root / "raw")
    prepare("digits_lt_scenes", root / "raw", root / "prepared", seed=0, recipe=RECIPE)
    return root / "prepared"


def _hp(**kw):
    return dict(method_defaults("pretrain", "cotap"), **kw)


def _model(k=4, backbone="convnet", kwargs=TINY):
    torch.manual_seed(0)
    return build_classifier(backbone, 3, k, img_size=12, backbone_kwargs=kwargs)


def _batch(n=6, size=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1, x2 = torch.randn(n, 3, size, size, generator=g), torch.randn(n, 3, size, size, generator=g)
    return {"x": x1, "views": [x1, x2], "y": (torch.arange(n * 4).view(n, 4) % 3 == 0).float(),
            "index": torch.arange(n) * 2 + 5}


# --- the continuous-target AP -------------------------------------------------------------------

def test_continuous_ap_equals_the_hand_computed_value_and_prefers_the_teachers_order():
    from classlab.methods.pretrain.cotap import continuous_ap, cotap_loss

    t = torch.tensor([[1.0, 0.5]], dtype=torch.float64)
    tau = 1e-4  # H is a sharp step
    # teacher's order (s = 2 > 1): j=0 has precision 1/1, j=1 (0.5 + 1)/2; AP = (1 + 0.5*0.75)/1.5
    ap, mass = continuous_ap(torch.tensor([[2.0, 1.0]], dtype=torch.float64), t, tau)
    assert ap.item() == pytest.approx((1.0 + 0.5 * 0.75) / 1.5, abs=1e-9) and mass.item() == pytest.approx(1.5)
    # reversed order: j=1 first with precision 0.5/1, j=0 second with (1 + 0.5)/2; AP = (0.25 + 0.75)/1.5
    rev = cotap_loss(torch.tensor([[1.0, 2.0]], dtype=torch.float64), t, tau)
    assert rev.item() == pytest.approx(1.0 - 1.0 / 1.5, abs=1e-9)
    # binary labels ranked first: AP = 1 (Smooth-AP), loss 0; a negative on top costs
    y = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    assert cotap_loss(torch.tensor([[4.0, 3.0, 2.0, 1.0]], dtype=torch.float64), y, tau).item() == pytest.approx(0, abs=1e-9)
    # negative first: precisions 1/2 and 2/3 -> loss 1 - 7/12
    assert cotap_loss(torch.tensor([[3.0, 2.0, 4.0, 1.0]], dtype=torch.float64), y, tau).item() == pytest.approx(5 / 12)
    # the smooth step at a finite temperature: one pair at score gap d gives H = sigmoid(-d / tau)
    d, tau2 = 0.3, 0.2
    h = 1 / (1 + math.exp(d / tau2))  # H(s_1 - s_0) for j = 0
    ap2, _ = continuous_ap(torch.tensor([[d, 0.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0]], dtype=torch.float64), tau2)
    assert ap2.item() == pytest.approx(1.0 / (1.0 + h), rel=1e-12)


def test_a_wrongly_paired_patch_costs_less_than_a_correct_one_and_less_than_under_hard_labels():
    from classlab.methods.pretrain.cotap import cotap_loss

    tau = 1e-4
    soft = torch.tensor([[1.0, 0.3, 0.0, 0.0]], dtype=torch.float64)  # correct, likely-wrong pair, negatives
    hard = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=torch.float64)  # the same pair taken as a full positive

    def loss(order, y):  # order[r] = candidate ranked r-th
        s = torch.zeros(1, 4, dtype=torch.float64)
        s[0, torch.tensor(order)] = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
        return cotap_loss(s, y, tau).item()

    base = loss([0, 1, 2, 3], soft)
    noisy_last, correct_last = loss([0, 2, 3, 1], soft), loss([1, 2, 3, 0], soft)
    # hand values: (1 + 0.3*1.3/2)/1.3 ; (1 + 0.3*1.3/4)/1.3 ; (0.3*0.3 + 1.3/4)/1.3
    assert 1 - base == pytest.approx((1 + 0.3 * 0.65) / 1.3)
    assert 1 - noisy_last == pytest.approx((1 + 0.3 * 0.325) / 1.3)
    assert 1 - correct_last == pytest.approx((0.09 + 0.325) / 1.3)
    # demoting the low-label (likely wrong) pair below the negatives costs 0.075, an eighth of the 0.6 that
    # demoting the correct one costs
    assert noisy_last - base == pytest.approx((correct_last - base) / 8)
    # and less than the same demotion under a hard label (1 - (1 + 2/4)/2 = 0.25)
    assert noisy_last - base < loss([0, 2, 3, 1], hard) - loss([0, 1, 2, 3], hard) == pytest.approx(0.25)


def test_restricting_the_outer_sum_to_the_top_labels_drops_only_zero_label_terms():
    from classlab.methods.pretrain.cotap import continuous_ap

    g = torch.Generator().manual_seed(3)
    s = torch.randn(5, 12, generator=g, dtype=torch.float64)
    y = torch.rand(5, 12, generator=g, dtype=torch.float64)
    y[y < 0.6] = 0.0
    y[:, 0] = 0.9  # every row has a positive
    full, _ = continuous_ap(s, y, 0.1)
    top, _ = continuous_ap(s, y, 0.1, positives=int((y > 0).sum(1).max()))
    assert torch.allclose(full, top, atol=1e-12)
    assert not torch.allclose(full, continuous_ap(s, y, 0.1, positives=1)[0])


def test_cotap_loss_is_invariant_to_the_order_of_anchors_and_candidates():
    from classlab.methods.pretrain.cotap import cotap_loss

    g = torch.Generator().manual_seed(0)
    s = torch.randn(7, 10, generator=g, dtype=torch.float64)
    y = torch.rand(7, 10, generator=g, dtype=torch.float64)
    w = torch.rand(7, generator=g, dtype=torch.float64)
    rows, cols = torch.randperm(7, generator=g), torch.randperm(10, generator=g)
    a = cotap_loss(s, y, 0.05, w, positives=4)
    b = cotap_loss(s[rows][:, cols], y[rows][:, cols], 0.05, w[rows], positives=4)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)
    # but pairing anchors with another anchor's labels changes it
    assert cotap_loss(s, y[torch.roll(torch.arange(7), 1)], 0.05, w, positives=4).item() != pytest.approx(a.item())


# --- the object-aware filter --------------------------------------------------------------------

def test_object_aware_filter_drops_zero_background_patches_and_keeps_prototype_patches():
    from classlab.methods.pretrain.cotap import ObjectAwareFilter, cotap_loss

    filt = ObjectAwareFilter(dim=3, num_prototypes=3, threshold=0.3)
    with torch.no_grad():
        filt.prototypes.copy_(torch.eye(3))
    z = torch.tensor([[5.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # 2 objects, 2 background
    tau = 0.05
    r, o, cos = filt(z, tau)
    # zero features: every cosine 0 < delta, so o = 1 - e^(0.3/tau) / (e^(0.3/tau) + 3)
    expect_bg = 1 - math.exp(0.3 / tau) / (math.exp(0.3 / tau) + 3)
    assert o[2].item() == pytest.approx(expect_bg, rel=1e-4) and o[2].item() < 0.01
    # a patch on a prototype: o = 1 - e^(6) / (e^(6) + e^(20) + 2) ~ 1, and r ~ that prototype
    assert o[0].item() == pytest.approx(1 - math.exp(6) / (math.exp(6) + math.exp(20) + 2), rel=1e-6)
    assert torch.allclose(r[0], torch.tensor([1.0, 0, 0]), atol=1e-6) and torch.allclose(r[1], torch.tensor([0, 1.0, 0]), atol=1e-6)
    assert r[2:].norm(dim=1).max() < 0.01
    # soft labels from the filtered patches: background is nobody's positive ...
    y = (r @ r.T).clamp(0, 1)
    assert y[0, 0] > 0.99 and y[0, 1] < 1e-6 and y[:2, 2:].max() < 0.01
    # ... and background anchors carry no weight: scrambling their scores leaves the loss unchanged
    s = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    base = cotap_loss(s, y, 0.05, o)
    s2 = s.clone()
    s2[2:] = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)) * 10
    assert cotap_loss(s2, y, 0.05, o).item() == pytest.approx(base.item(), abs=1e-4)


def test_filter_with_centring_reassigns_but_keeps_objectness():
    from classlab.methods.pretrain.cotap import ObjectAwareFilter

    filt = ObjectAwareFilter(dim=2, num_prototypes=2, threshold=0.0)
    with torch.no_grad():
        filt.prototypes.copy_(torch.eye(2))
    z = torch.tensor([[1.0, 0.8]])
    r0, o0, _ = filt(z, 0.1)
    r1, o1, _ = filt(z, 0.1, center=torch.tensor([0.5, 0.0]))  # prototype 1 over-used: centred down
    assert torch.equal(o0, o1)
    assert r0[0, 0] > r0[0, 1] and r1[0, 0] < r1[0, 1]


# --- the method ----------------------------------------------------------------------------------

def test_training_step_is_pure_label_free_and_the_teacher_moves_only_after_the_step():
    model = _model()
    method = get_method("pretrain", "cotap")(model, _hp(lr=0.01, anchors_per_image=3, candidates_per_image=5), 4)
    assert method.num_views == 2 and method.head_trained is False
    assert not any(k.startswith(("teacher", "projector", "dense")) for k in model.state_dict())  # saved: model only
    trained = {id(p) for g in method.param_groups() for p in g["params"]}
    assert id(method.dense.filter.prototypes) in trained and id(model.head.weight) not in trained
    assert not any(id(p) in trained for p in method.teacher.parameters())
    method.train()
    batch = _batch()
    loss, logs = method.training_step(batch)
    assert torch.isfinite(loss) and logs["cotap"] >= 0 and 0 <= logs["objectness"] <= 1
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    relabelled = dict(batch, y=torch.zeros_like(batch["y"]))
    assert method.training_step(relabelled)[0].item() == loss.item()  # labels unread, same views and patches
    assert all(torch.equal(v, method.teacher.state_dict()[k]) for k, v in teacher_before.items())  # pure
    head, proto, conv = model.head.weight.clone(), method.dense.filter.prototypes.clone(), model.backbone.features[0].weight.clone()
    opt = method.configure_optimizer()
    method.optimizer_step(loss, opt, lambda: method.training_step(batch)[0])
    method.on_after_step(batch, logs)
    assert torch.equal(model.head.weight, head)
    assert not torch.equal(method.dense.filter.prototypes, proto) and not torch.equal(model.backbone.features[0].weight, conv)
    # teacher = m teacher + (1 - m) student, buffers copied; the centre moved toward the batch mean
    m = method.ema_momentum
    w_t = method.teacher.backbone.features[0].weight
    assert torch.allclose(w_t, m * teacher_before["backbone.features.0.weight"] + (1 - m) * model.backbone.features[0].weight)
    assert torch.equal(method.teacher.backbone.features[1].running_mean, model.backbone.features[1].running_mean)
    assert torch.allclose(method.center, (1 - method.center_momentum) * logs["teacher_cos_mean"])
    method.global_step = 1
    assert method.training_step(batch)[0].item() != loss.item()  # another step draws other views and patches


def test_the_optional_image_level_term_adds_simclrs_nt_xent():
    from classlab.methods.pretrain.simclr import augmented_views, nt_xent
    from classlab.models.backbones import dense_features

    batch = _batch()
    dense_only = get_method("pretrain", "cotap")(_model(), _hp(global_weight=0.0), 4)
    both = get_method("pretrain", "cotap")(_model(), _hp(global_weight=0.5), 4)
    dense_only.train(), both.train()
    both.dense.load_state_dict(dense_only.dense.state_dict())
    both.teacher_dense.load_state_dict(dense_only.teacher_dense.state_dict())
    assert not any(id(p) in {id(q) for g in dense_only.param_groups() for q in g["params"]}
                   for p in dense_only.projector.parameters())
    loss0, logs0 = dense_only.training_step(batch)
    loss1, logs1 = both.training_step(batch)
    assert logs0["nt_xent"] == 0 and torch.allclose(logs0["cotap"], logs1["cotap"])
    v1, v2 = augmented_views(both, batch)[:2]
    z = both.projector(dense_features(both.model, torch.cat([v1, v2])).mean(dim=(2, 3)))
    expect = nt_xent(z[:6], z[6:], both.temperature)
    assert logs1["nt_xent"].item() == pytest.approx(expect.item(), rel=1e-5)
    assert loss1.item() == pytest.approx(loss0.item() + 0.5 * expect.item(), rel=1e-5)


def test_end_to_end_pretraining_on_tiny_scenes(scenes, tmp_path):
    from classlab.train import load_model, train

    out = tmp_path / "cotap"
    result = train(family="pretrain", method="cotap", data_dir=scenes, backbone="convnet", seed=0, out_dir=out,
                   overrides={"epochs": 2, "batch_size": 16}, backbone_kwargs=TINY, threads=1, progress=False)
    assert (out / "model.pt").exists() and (out / "history.json").exists() and not (out / "last.pt").exists()
    history = json.loads((out / "history.json").read_text())
    losses = [row["loss"] for row in history["epochs"]]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses)
    assert history["meta"]["method"] == "cotap" and history["meta"]["head_trained"] is False
    model, meta = load_model(out / "model.pt")
    assert set(model.state_dict()) == set(build_classifier("convnet", 3, meta["num_classes"], img_size=24,
                                                           backbone_kwargs=TINY).state_dict())
    assert result["meta"]["train_steps"] == 2 * math.ceil(48 / 16)


# --- bad input -----------------------------------------------------------------------------------

@pytest.mark.parametrize("key", ["temperature", "ap_temperature", "filter_temperature", "teacher_temperature"])
def test_non_positive_temperatures_are_refused_naming_the_field(key):
    with pytest.raises(ConfigError, match=key):
        get_method("pretrain", "cotap")(_model(), _hp(**{key: 0.0}), 4)
    problems = check_hparams("pretrain", "cotap", _hp(**{key: -1.0}), where={key: f"overrides.{key}"})
    assert len(problems) == 1 and f"overrides.{key}" in problems[0]


@pytest.mark.parametrize("backbone,kwargs", [("deep_mlp", {"depth": 2, "width": 8}), ("convnet_dc", {"depth": 1, "width": 8})])
def test_a_backbone_without_a_feature_map_is_refused_naming_the_backbone(backbone, kwargs):
    with pytest.raises(ConfigError, match="backbone"):
        get_method("pretrain", "cotap")(_model(backbone=backbone, kwargs=kwargs), _hp(), 4)


def test_bad_input_through_train_writes_nothing(scenes, tmp_path):
    from classlab.train import train

    for name, kw in (("temp", dict(backbone="convnet", backbone_kwargs=TINY, overrides={"temperature": 0.0})),
                     ("mlp", dict(backbone="deep_mlp", backbone_kwargs={"depth": 2, "width": 8}, overrides={}))):
        out = tmp_path / name
        with pytest.raises(ConfigError, match="temperature" if name == "temp" else "backbone"):
            train(family="pretrain", method="cotap", data_dir=scenes, seed=0, out_dir=out, threads=1, progress=False,
                  **kw)
        assert not out.exists() or not any(out.iterdir())
