"""GroCo (pretrain/sorting): the relaxed sorting network and soft ranks, the group ordering loss on
hand-built similarities, its invariances and gradient, one short pretraining run, and bad input."""
import json
import math

import pytest
import torch

from classlab.config import ConfigError, resolve_checked_hparams
from classlab.methods.pretrain.sorting import (groco_loss, group_ordering_loss, preordered_scores,
                                               soft_ranks, sorting_network_permutation)
from classlab.methods.registry import get_method
from classlab.models import build_classifier

TINY = {"widths": [8, 16], "pool_after": [0]}


def _relaxations():
    try:
        import torchsort  # noqa: F401
        return ["sorting_network", "soft_rank"]
    except ImportError:
        return ["sorting_network", pytest.param("soft_rank", marks=pytest.mark.skip(reason="torchsort not installed"))]


def _row(negatives, positives):
    """A pre-ordered row: the negatives ascending, then the positives ascending."""
    return torch.tensor([sorted(negatives) + sorted(positives)], dtype=torch.float64)


# --- the relaxations -----------------------------------------------------------------------------
@pytest.mark.parametrize("relaxation", _relaxations())
def test_soft_ranks_become_the_hard_ranks_as_the_relaxation_vanishes(relaxation):
    torch.manual_seed(0)
    x = torch.randn(5, 12, dtype=torch.float64)
    hard = (x.argsort(1).argsort(1) + 1).to(x.dtype)  # 1 = lowest
    sharp = soft_ranks(x, relaxation, steepness=1e7, regularization_strength=1e-5)
    assert torch.allclose(sharp, hard, atol=1e-3)
    soft = soft_ranks(x, relaxation, steepness=0.5, regularization_strength=5.0)
    assert (soft - hard).abs().max() > 0.5  # a real relaxation away from the limit
    # ranks stay a point of the permutahedron: they sum to 1 + ... + n
    assert torch.allclose(soft.sum(1), torch.full((5,), 12 * 13 / 2, dtype=x.dtype))


def test_sorting_network_gives_a_doubly_stochastic_permutation_that_sorts():
    torch.manual_seed(1)
    x = torch.randn(4, 9, dtype=torch.float64)
    soft_sorted, perm = sorting_network_permutation(x, steepness=2.0)
    ones = torch.ones(4, 9, dtype=x.dtype)
    assert torch.allclose(perm.sum(1), ones) and torch.allclose(perm.sum(2), ones) and bool((perm >= 0).all())
    # the softly sorted values are x carried by P: sorted_j = sum_i x_i P_ij
    assert torch.allclose(soft_sorted, torch.einsum("bi,bij->bj", x, perm))
    hard_sorted, hard_perm = sorting_network_permutation(x, steepness=1e8)
    assert torch.allclose(hard_sorted, x.sort(1).values, atol=1e-6)
    assert torch.allclose(hard_perm, torch.nn.functional.one_hot(x.argsort(1), 9).transpose(1, 2).to(x.dtype),
                          atol=1e-6)


# --- the group ordering loss on hand-built similarities ---------------------------------------------
def test_two_entry_loss_is_minus_log_of_the_cauchy_swap_probability():
    # n = 2: one comparator, P = [[a, 1 - a], [1 - a, a]], q = (1 - a, a), y = (0, 1): L = -log a
    for s_neg, s_pos, beta in [(-0.2, 0.6, 1.0), (0.3, 0.1, 1.0), (0.0, 0.5, 4.0)]:
        alpha = math.atan(beta * (s_pos - s_neg)) / math.pi + 0.5
        loss = group_ordering_loss(_row([s_neg], [s_pos]), 1, steepness=beta)
        assert loss.item() == pytest.approx(-math.log(alpha), rel=1e-9)


@pytest.mark.parametrize("num_pos", [1, 2])
def test_loss_is_lowest_with_positives_first_and_grows_as_they_fall(num_pos):
    negatives = [-0.9 + 0.05 * j for j in range(10)]  # -0.9 .. -0.45
    top = [0.9, 0.8][:num_pos]
    middle = [-0.68, -0.66][:num_pos]
    bottom = [-0.99, -0.97][:num_pos]
    values = {name: group_ordering_loss(_row(negatives, pos), num_pos).item()
              for name, pos in [("top", top), ("middle", middle), ("bottom", bottom)]}
    assert values["top"] < values["middle"] < values["bottom"]
    # a sharper network: near 0 when ordered with a margin, large when the positives rank last
    assert group_ordering_loss(_row(negatives, top), num_pos, steepness=1000.0).item() < 1e-3
    assert group_ordering_loss(_row(negatives, bottom), num_pos, steepness=1000.0).item() > 0.5


def test_soft_rank_loss_counts_the_misordered_pairs():
    pytest.importorskip("torchsort")
    negatives = [-0.9 + 0.1 * j for j in range(10)]  # -0.9 .. 0.0, spaced 0.1
    eps = 1e-3  # far below the spacing: hard ranks
    assert group_ordering_loss(_row(negatives, [0.9]), 1, "soft_rank", regularization_strength=eps).item() == 0.0
    assert group_ordering_loss(_row(negatives, [-1.0]), 1, "soft_rank",
                               regularization_strength=eps).item() == pytest.approx(1.0)
    # above 4 of the 10 negatives: 6 of 10 pairs wrong; two positives above 4 and 10 of them: (6 + 0) / 20
    assert group_ordering_loss(_row(negatives, [-0.55]), 1, "soft_rank",
                               regularization_strength=eps).item() == pytest.approx(0.6)
    assert group_ordering_loss(_row(negatives, [-0.55, 0.5]), 2, "soft_rank",
                               regularization_strength=eps).item() == pytest.approx(0.3)


@pytest.mark.parametrize("relaxation", _relaxations())
def test_gradient_raises_positive_and_lowers_negative_similarities(relaxation):
    negatives = [-0.3 + 0.05 * j for j in range(10)]
    row = _row(negatives, [-0.02]).requires_grad_()  # the positive sits among the hardest negatives
    group_ordering_loss(row, 1, relaxation, regularization_strength=0.1).backward()
    assert row.grad[0, -1] < 0  # descent raises the positive similarity
    assert bool((row.grad[0, :-1] >= 0).all()) and row.grad[0, :-1].sum() > 0  # and lowers the negatives


def test_a_descent_step_on_the_embeddings_pulls_the_views_together():
    torch.manual_seed(2)
    z1 = torch.randn(16, 8, requires_grad=True)
    z2 = torch.randn(16, 8, requires_grad=True)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b).mean()  # noqa: E731
    loss, logs = groco_loss([z1, z2], topk_neg=5)
    loss.backward()
    with torch.no_grad():
        z1n, z2n = z1 - 100.0 * z1.grad, z2 - 100.0 * z2.grad  # steepness 1: small gradients
    assert cos(z1n, z2n) > cos(z1, z2) + 0.05
    assert groco_loss([z1n, z2n], topk_neg=5)[0] < loss
    assert set(logs) == {"groco", "pos_neg_gap", "ordered_frac"} and not logs["groco"].requires_grad


# --- invariances ------------------------------------------------------------------------------------
@pytest.mark.parametrize("relaxation", _relaxations())
def test_loss_ignores_the_order_of_the_negatives(relaxation):
    torch.manual_seed(3)
    views = [torch.randn(12, 6, dtype=torch.float64) for _ in range(3)]
    loss = groco_loss(views, topk_neg=4, relaxation=relaxation)[0]
    perm = torch.randperm(12)  # the same images in another order: every anchor's negatives reorder
    assert groco_loss([v[perm] for v in views], topk_neg=4, relaxation=relaxation)[0].item() == \
        pytest.approx(loss.item(), abs=1e-9)
    rows, k = preordered_scores(views[0], views[1:], topk_neg=4)
    shuffled, _ = preordered_scores(views[0][perm], [v[perm] for v in views[1:]], topk_neg=4)
    assert k == 4 and rows.shape == (12, 6) and torch.allclose(shuffled, rows[perm])


def test_rows_hold_the_hardest_negatives_then_the_positives_each_ascending():
    # anchor view: unit vectors at angles 0, 10, 30, 60, 100 degrees; the other view of image i is
    # the anchor turned by (i + 1) * 5 degrees, so its positive similarity is cos((i + 1) * 5 deg)
    deg = torch.tensor([0.0, 10.0, 30.0, 60.0, 100.0], dtype=torch.float64)
    unit = lambda d: torch.stack([torch.cos(torch.deg2rad(d)), torch.sin(torch.deg2rad(d))], 1)  # noqa: E731
    anchor, other = unit(deg), unit(deg + 5.0 * torch.arange(1, 6))
    rows, k = preordered_scores(3.0 * anchor, [other], topk_neg=2)  # the scale of z does not matter
    cos = lambda d: math.cos(math.radians(d))  # noqa: E731
    assert k == 2
    # image 0 (0 deg): negatives at 10, 30 (hardest two of 10, 30, 60, 100) ascending, then cos 5
    assert rows[0].tolist() == pytest.approx([cos(30), cos(10), cos(5)])
    # image 3 (60 deg): nearest others at 30 and 100 degrees, i.e. 30 and 40 degrees away; positive cos 20
    assert rows[3].tolist() == pytest.approx([cos(40), cos(30), cos(20)])
    assert preordered_scores(anchor, [other], topk_neg=10)[1] == 4  # k is cut to the N - 1 other images


def test_training_step_is_pure_and_the_head_is_the_methods():
    torch.manual_seed(0)
    model = build_classifier("convnet", 1, 4, backbone_kwargs=TINY)
    hp = resolve_checked_hparams("pretrain", "sorting", {"views": 3, "topk_neg": 5})
    method = get_method("pretrain", "sorting")(model, hp, 4)
    assert method.num_views == 3 and method.head_trained is False
    batch = {"x": torch.randn(8, 1, 8, 8), "y": torch.zeros(8, dtype=torch.long), "index": torch.arange(8),
             "views": [torch.randn(8, 1, 8, 8) for _ in range(3)]}
    method.global_step = 4
    first, logs = method.training_step(batch)
    again, _ = method.training_step(batch)
    assert first.item() == again.item() and math.isfinite(first.item())
    first.backward()
    assert method.projector[0].weight.grad is not None and model.backbone.parameters().__next__().grad is not None
    assert not any(k.startswith("projector") for k in model.state_dict())
    # output_bn standardises each view's z over the batch: a shift of every z (the head's last bias)
    # changes nothing with it and changes the loss without it
    for output_bn in (True, False):
        method.output_bn = output_bn
        before = method.training_step(batch)[0].item()
        with torch.no_grad():
            method.projector[-1].bias.add_(3.0)
        after = method.training_step(batch)[0].item()
        with torch.no_grad():
            method.projector[-1].bias.sub_(3.0)
        assert (after == pytest.approx(before, abs=1e-6)) is output_bn


# --- end to end and bad input --------------------------------------------------------------------------
def test_short_pretraining_writes_the_model_and_a_finite_loss(digits_prepared, tmp_path, one_thread):
    from classlab.train import train

    out = tmp_path / "sorting"
    train(family="pretrain", method="sorting", data_dir=digits_prepared, backbone="convnet", seed=0, out_dir=out,
          overrides={"epochs": 2, "batch_size": 32, "samples_per_class": 5, "lr": 0.05, "augment_pad": 1,
                     "augment_hflip": False},
          backbone_kwargs=TINY, threads=1, progress=False)
    assert (out / "model.pt").exists() and not (out / "last.pt").exists()
    history = json.loads((out / "history.json").read_text())
    assert len(history["epochs"]) == 2 and all(math.isfinite(row["loss"]) for row in history["epochs"])
    assert history["meta"]["method"] == "sorting" and history["meta"]["head_trained"] is False


@pytest.mark.parametrize("key,value", [("steepness", 0.0), ("steepness", -1.0), ("regularization_strength", 0.0),
                                       ("topk_neg", 0), ("views", 1), ("relaxation", "sinkhorn")])
def test_bad_hyperparameters_are_named(key, value):
    with pytest.raises(ConfigError, match=key):
        resolve_checked_hparams("pretrain", "sorting", {key: value})
    model = build_classifier("convnet", 1, 4, backbone_kwargs=TINY)
    with pytest.raises(ValueError, match=key):
        get_method("pretrain", "sorting")(model, {key: value}, 4)


def test_bad_steepness_stops_training_before_anything_is_written(digits_prepared, tmp_path):
    from classlab.train import train

    out = tmp_path / "bad"
    with pytest.raises(ValueError, match="steepness"):
        train(family="pretrain", method="sorting", data_dir=digits_prepared, backbone="convnet", seed=0, out_dir=out,
              overrides={"steepness": 0.0, "epochs": 1}, backbone_kwargs=TINY, threads=1, progress=False)
    assert not out.exists() or not any(out.iterdir())
