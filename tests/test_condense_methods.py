"""The condense family's core terms: the matching distance, DSA, herding, DCC, NRR-DD, the bi-level helper."""
import pytest
import torch
import torch.nn.functional as F

from classlab.config import check_hparams, list_methods, resolve_hparams
from classlab.methods.condense_augment import FAMILIES, apply_dsa, sample_dsa
from classlab.methods.condense_learner import (RealData, class_activation_map, gradient_matching_distance,
                                               seeded_reset)
from classlab.methods.registry import METHODS, get_method
from classlab.models import build_classifier


def _grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 3, 3, 3, generator=g), torch.randn(6, generator=g),
            torch.randn(4, 10, generator=g), torch.randn(4, generator=g)]


def test_matching_distance_is_zero_for_equal_gradients():
    a = _grads()
    assert gradient_matching_distance(a, [t.clone() for t in a]).item() == pytest.approx(0.0, abs=1e-5)
    assert gradient_matching_distance(a, _grads(1)).item() > 1.0  # unrelated gradients are far apart


def test_matching_distance_is_invariant_to_positive_row_scaling():
    a, b = _grads(0), _grads(1)
    g = torch.Generator().manual_seed(2)
    scaled = [t * (torch.rand(t.shape[0], *([1] * (t.dim() - 1)), generator=g) * 10 + 0.1) for t in b]
    before = gradient_matching_distance(a, b).item()
    assert gradient_matching_distance(a, scaled).item() == pytest.approx(before, rel=1e-5)
    # a negative factor flips that row's cosine: the distance must change
    flipped = [t.clone() for t in b]
    flipped[0][0] *= -1
    assert gradient_matching_distance(a, flipped).item() != pytest.approx(before, rel=1e-3)


def test_matching_distance_ignores_biases_as_dc_does():
    a, b = _grads(0), _grads(1)
    other = [b[0], torch.randn(6) * 100, b[2], torch.randn(4) * 100]  # only the 1-D gradients differ
    assert gradient_matching_distance(a, other).item() == pytest.approx(gradient_matching_distance(a, b).item())
    assert gradient_matching_distance([a[1], a[3]], [b[1], b[3]]).item() == 0.0
    # the per-row form: a conv gradient is (out_channels, in * kh * kw) rows
    rows_a, rows_b = a[0].reshape(6, -1), b[0].reshape(6, -1)
    expected = (1 - F.cosine_similarity(rows_a, rows_b, dim=1, eps=0)).sum()
    assert gradient_matching_distance([a[0]], [b[0]]).item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_dsa_applies_one_draw_to_both_batches_and_is_differentiable(family):
    g = torch.Generator().manual_seed(3)
    real, syn = torch.randn(5, 1, 12, 12), torch.randn(2, 1, 12, 12, requires_grad=True)
    params = sample_dsa(family, 1, g, (12, 12))
    assert params.family == family
    both = apply_dsa(torch.cat([real, syn]), params)
    # siamese: the transformation of a sample does not depend on which batch it is in
    assert torch.allclose(both[:5], apply_dsa(real, params), atol=1e-6)
    out = apply_dsa(syn, params)
    assert torch.allclose(both[5:], out, atol=1e-6)
    # one shared draw transforms equal images equally
    twins = apply_dsa(syn[:1].expand(3, -1, -1, -1), params)
    assert torch.allclose(twins[0], twins[2], atol=1e-6)
    (out * torch.randn_like(out)).sum().backward()
    assert syn.grad is not None and syn.grad.abs().sum() > 0


def test_dsa_per_sample_draws_differ_and_grey_saturation_is_a_no_op():
    g = torch.Generator().manual_seed(4)
    params = sample_dsa("crop", 64, g, (12, 12))
    assert len(set(zip(params.values["dy"].tolist(), params.values["dx"].tolist()))) > 5
    x = torch.randn(4, 1, 8, 8)
    color = sample_dsa("color", 1, torch.Generator().manual_seed(5), (8, 8))
    color.values["brightness"][:] = 0.5  # no shift; contrast 1 leaves the image
    color.values["contrast"][:] = 0.5
    assert torch.allclose(apply_dsa(x, color), x, atol=1e-5)  # saturation of one channel changes nothing


def test_herding_picks_the_sample_closest_to_the_mean_first():
    from classlab.protocols.memory import herding_order

    g = torch.Generator().manual_seed(6)
    feats = torch.randn(30, 5, generator=g)
    order = herding_order(feats, 4, normalize=False)
    mu = feats.mean(0)
    assert int(order[0]) == int((feats - mu).norm(dim=1).argmin())
    second = ((mu - (feats + feats[order[0]]) / 2).norm(dim=1))
    second[order[0]] = float("inf")
    assert int(order[1]) == int(second.argmin())
    assert len(set(order.tolist())) == 4


def _tiny_net(k=3, size=8):
    torch.manual_seed(0)
    return build_classifier("convnet_dc", 1, k, img_size=size, backbone_kwargs={"width": 4, "depth": 2})


def _hp(method, **extra):
    return {**resolve_hparams("condense", method, None), **extra}


def _learner(method, k=3, ipc=2, size=8, **extra):
    learner = get_method("condense", method)(_tiny_net(k, size), _hp(method, **extra), k)
    g = torch.Generator().manual_seed(7)
    learner.set_synthetic(torch.randn(k * ipc, 1, size, size, generator=g), torch.arange(k).repeat_interleave(ipc),
                          torch.arange(k * ipc))
    return learner


def _batch(k=3, n=4, size=8):
    g = torch.Generator().manual_seed(8)
    return {"x": torch.randn(k * n, 1, size, size, generator=g), "y": torch.arange(k).repeat_interleave(n)}


def test_dcc_matches_the_gradient_of_the_loss_summed_over_classes():
    from classlab.methods.condense.dcc import contrastive_gradients

    learner = _learner("dcc", dsa_strategy="none", outer_loop=2, inner_loop=1, outer_warmup=1, inner_warmup=1)
    batch = _batch()
    params = learner.network_params()
    pieces = learner.class_batches(batch)
    g_real, g_syn = contrastive_gradients(learner.model, params, pieces, 3)
    # manual: one autograd call on the class-averaged real loss, one on the CE over the whole synthetic set
    real_loss = sum(F.cross_entropy(learner.model(r), torch.full((len(r),), c)) for c, r, _ in pieces) / 3
    manual_real = torch.autograd.grad(real_loss, params)
    syn_loss = F.cross_entropy(learner.model(learner.images), learner.labels)
    manual_syn = torch.autograd.grad(syn_loss, params)
    for a, b in zip(g_real, manual_real):
        assert torch.allclose(a, b, atol=1e-6)
    for a, b in zip(g_syn, manual_syn):
        assert torch.allclose(a, b, atol=1e-6)
    # warm-up: DC's per-class loss on the first update of the first network, the contrastive loss after
    assert not learner.contrastive(0) and learner.contrastive(1) and learner.contrastive(2)
    learner.global_step = 1
    loss, _ = learner.training_step(batch)
    assert loss.item() == pytest.approx(gradient_matching_distance(manual_syn, manual_real).item(), rel=1e-4)
    learner.global_step = 0
    assert learner.training_step(batch)[0].item() == pytest.approx(learner.per_class_matching(batch).item(), rel=1e-5)
    assert learner.training_step(batch)[0].item() != pytest.approx(loss.item(), rel=1e-3)


def test_dc_step_is_pure_and_the_bilevel_helper_trains_then_redraws_the_network():
    learner = _learner("dc", outer_loop=2, inner_loop=3)
    before = [p.detach().clone() for p in learner.model.parameters()]
    batch = _batch()
    a = learner.training_step(batch)[0]
    b = learner.training_step(batch)[0]
    assert a.item() == b.item()
    assert all(torch.equal(p, q) for p, q in zip(before, learner.model.parameters()))
    opt = learner.configure_optimizer()
    images = learner.images.detach().clone()
    learner.optimizer_step(a, opt, lambda: a)
    assert not torch.equal(images, learner.images)  # the images moved
    assert all(p.grad is None for p in learner.model.parameters())  # the network got no gradient
    learner.bilevel_update(0)  # update 0 of network 0: the inner loop trains the network
    trained = [p.detach().clone() for p in learner.model.parameters()]
    assert not all(torch.equal(p, q) for p, q in zip(before, trained))
    learner.bilevel_update(1)  # last update of network 0: a new network, drawn from (seed, 1)
    again = _learner("dc", outer_loop=2, inner_loop=3)
    again.reset_network(1)
    assert all(torch.equal(p, q) for p, q in zip(learner.model.parameters(), again.model.parameters()))


def test_nrr_dd_refinement_leaves_the_critical_pixels_unchanged():
    from classlab.methods.condense.nrr_dd import refinement_mask

    cam = torch.tensor([[0.9, 0.5], [0.2, 0.0]])
    assert torch.allclose(refinement_mask(cam, 0.5), torch.tensor([[0.0, 0.0], [0.3, 0.5]]))
    learner = _learner("nrr_dd", outer_loop=2, inner_loop=1, ce_weight=1.0)
    maps = class_activation_map(learner.teacher, learner.images.detach(), learner.labels)
    assert maps.shape == (6, 8, 8) and maps.min() >= 0 and maps.max() <= 1 + 1e-6
    g = torch.Generator().manual_seed(9)
    cam = torch.rand(len(learner.labels), 8, 8, generator=g)
    learner.refine_mask = refinement_mask(cam, 0.5).unsqueeze(1)
    critical = (cam >= 0.5).unsqueeze(1)
    before = learner.images.detach().clone()
    opt = learner.configure_optimizer()
    for _ in range(2):  # two steps: momentum must not move them either
        loss, logs = learner.training_step(_batch())
        assert "teacher_ce" in logs
        learner.optimizer_step(loss, opt, lambda: loss)
    after = learner.images.detach()
    assert torch.equal(after[critical], before[critical])
    assert not torch.equal(after[~critical], before[~critical])


def test_random_selects_real_images_balanced_over_classes():
    g = torch.Generator().manual_seed(10)
    x = torch.randint(0, 256, (60, 1, 6, 6), dtype=torch.uint8, generator=g)
    y = torch.arange(3).repeat(20)
    data = RealData(x, y, [0.5], [0.25], 3)
    learner = get_method("condense", "random")(_tiny_net(3, 6), _hp("random"), 3)
    learner.seed = 5
    images, idx = learner.initialise(data, 4, torch.device("cpu"))
    assert torch.equal(y[idx], torch.arange(3).repeat_interleave(4)) and len(set(idx.tolist())) == 12
    assert torch.allclose(images, (x[idx].float() / 255 - 0.5) / 0.25)
    learner.seed = 6
    assert not torch.equal(learner.initialise(data, 4, torch.device("cpu"))[1], idx)  # the seed matters
    with pytest.raises(ValueError, match="images_per_class"):
        learner.initialise(data, 21, torch.device("cpu"))


def test_every_condense_module_registers_its_method_and_every_yaml_is_typed():
    names = list_methods("condense")
    assert set(names) == {"random", "herding", "dc", "dsa", "dcc", "nrr_dd"}
    for name in names:
        get_method("condense", name)
        assert ("condense", name) in METHODS
        assert check_hparams("condense", name, resolve_hparams("condense", name, None)) == []
    problems = check_hparams("condense", "dc", {**resolve_hparams("condense", "dc", None), "lr_img": 0.0})
    assert problems and "lr_img" in problems[0]


def test_seeded_reset_is_reproducible_and_leaves_the_global_rng():
    a, b = _tiny_net(), _tiny_net()
    state = torch.get_rng_state()
    seeded_reset(a, 123)
    seeded_reset(b, 123)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    seeded_reset(b, 124)
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
