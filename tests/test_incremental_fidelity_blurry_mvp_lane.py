"""Incremental fidelity to the official code (issue 7, defects 5 and 9): a pure ``training_step``
for MVP and NAPA-VQ, Si-Blurry task boundaries drawn with replacement, MVP's focal reductions
and defaults, and MULTI-LANE's ablation switches and official-code details."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from classlab.config import resolve_hparams
from classlab.data.scenarios import ClassIncrementalScenario, build_scenario
from classlab.methods.incremental.multi_lane import MultiLane
from classlab.methods.incremental.mvp import MVP, gsf_loss, gsf_weights
from classlab.methods.incremental.napa_vq import NapaVQ, sq_dists, update_edges
from classlab.models import build_classifier


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: 1 torch thread


def _buffers(module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in module.named_buffers()}


def _same(a: dict, b: dict, skip=()) -> list[str]:
    """Names whose tensors differ (``skip``: substrings of names left out)."""
    return [n for n in a if not any(s in n for s in skip) and not torch.equal(a[n], b[n])]


# --- MVP: pure training_step ------------------------------------------------------------------

def _vit(num_classes=6, seed=0):
    torch.manual_seed(seed)
    return build_classifier("vit_tiny", 1, num_classes, img_size=8,
                            backbone_kwargs={"depth": 3, "embed_dim": 24, "num_heads": 2})


def _mvp(**hp):
    return MVP(_vit(), {"lr": 0.01, "optimizer": "adam", "pool_size": 3, **hp}, 6)


def _image_batch(n=8, k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 1, 8, 8, generator=g), "y": torch.arange(n) % k, "index": torch.arange(n)}


def test_mvp_training_step_twice_changes_no_buffer_and_one_engine_step_updates_them_once():
    mvp = _mvp()
    with torch.no_grad():
        mvp.exposed[4] = True                     # a class exposed by an earlier batch
        mvp.count.copy_(torch.tensor([2.0, 0.0, 5.0]))
    mvp.train()
    batch = _image_batch()
    before = _buffers(mvp)
    loss1, logs1 = mvp.training_step(batch)       # what a two-step optimizer's closure does
    loss2, _ = mvp.training_step(batch)
    assert _same(before, _buffers(mvp)) == []
    assert loss1.item() == loss2.item()
    # one engine step: on_before_step, training_step, optimizer_step (closure run twice, as SAM
    # would), on_after_step
    with torch.no_grad():
        picked = mvp.select(mvp.query(batch["x"]))   # the keys this step picks, before it changes them
    opt = mvp.configure_optimizer()
    mvp.on_before_step(batch)
    loss, logs = mvp.training_step(batch)

    def sam_like(loss, optimizer, closure):
        closure()
        closure()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    sam_like(loss, opt, lambda: mvp.training_step(batch)[0])
    mvp.on_after_step(batch, logs)
    assert torch.equal(logs["picked"], picked)
    # n_i grows by the step's picks, once; the batch's classes join the exposed ones
    assert torch.equal(mvp.count, before["count"] + torch.bincount(picked, minlength=3).float())
    assert mvp.exposed.tolist() == [True, True, True, False, True, False]


def test_mvp_masks_with_the_batch_classes_without_the_hook_and_the_hook_exposes_them_first():
    mvp = _mvp(use_afs=False, prompt_loss_weight=0.0, gamma=0.0)
    mvp.train()
    batch = _image_batch(k=2)
    loss, logs = mvp.training_step(batch)        # no hook ran: the batch's own classes are unmasked
    assert torch.isfinite(loss) and torch.isfinite(logs["logits"][:, :2]).all()
    assert torch.isinf(logs["logits"][:, 2:]).all() and not mvp.exposed.any()
    mvp.on_before_step(batch)
    assert mvp.exposed.tolist() == [True, True, False, False, False, False]


# --- MVP: the focal reductions and the defaults -----------------------------------------------

def test_gsf_reductions_by_hand():
    # alpha 0.5, gamma 2, ignorance scores s = (0, 0.5, 1): w = 0.5 + 0.5 s^2 = (0.5, 0.625, 1.0)
    ce = torch.tensor([1.0, 2.0, 0.5])
    w = torch.tensor([0.5, 0.625, 1.0])
    # the paper: 1/B sum_b w_b l_b = (0.5 + 1.25 + 0.5) / 3 = 0.75
    assert gsf_loss(ce, w, "sample").item() == pytest.approx(0.75)
    # the official code: mean over b of (1 - a) l_bar + a s_b^g l_bar, l_bar = mean CE = 3.5 / 3:
    # (0.5 + 0.5 * mean(0, 0.25, 1)) * 3.5 / 3 = (0.5 + 0.5 * 1.25 / 3) * 3.5 / 3 = 0.8263888...
    assert gsf_loss(ce, w, "batch").item() == pytest.approx((0.5 + 0.5 * 1.25 / 3) * 3.5 / 3)
    assert gsf_loss(ce, w, "batch").item() == pytest.approx(0.826388888)
    # equal weights: both reduce to w * mean CE
    assert gsf_loss(ce, torch.full((3,), 0.7), "batch").item() == pytest.approx(0.7 * 3.5 / 3)
    assert gsf_loss(ce, torch.full((3,), 0.7), "sample").item() == pytest.approx(0.7 * 3.5 / 3)
    with pytest.raises(ValueError, match="focal_reduction"):
        gsf_loss(ce, w, "mean")


@pytest.mark.parametrize("reduction", ["sample", "batch"])
def test_mvp_loss_uses_the_named_focal_reduction(reduction):
    mvp = _mvp(use_afs=False, use_mask=False, prompt_loss_weight=0.0, alpha=0.5, gamma=2.0,
               focal_reduction=reduction)
    mvp.train()
    batch = _image_batch(k=3)
    loss, logs = mvp.training_step(batch)
    with torch.no_grad():                        # the same forward, by hand
        f = mvp.prompted_features(batch["x"], logs["picked"])
        ce = F.cross_entropy(logs["logits"], batch["y"], reduction="none")
        w = gsf_weights(f, logs["logits"], batch["y"], None, 0.5, 2.0)
    assert not torch.allclose(w, w.mean().expand_as(w))     # the two reductions differ on this batch
    expected = (w * ce).mean() if reduction == "sample" else w.mean() * ce.mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_mvp_defaults_follow_the_official_code():
    hp = resolve_hparams("incremental", "mvp", {})
    assert hp["gamma"] == 2.0 and hp["batch_size"] == 64
    assert hp["epochs"] == 1 and hp["online_iter"] == 3   # one pass, 3 steps on each incoming batch
    assert hp["focal_reduction"] == "sample"      # the claims use the paper's per-sample form
    base = resolve_hparams("incremental", "mvp_base", {})
    assert base["batch_size"] == 64


# --- NAPA-VQ: pure training_step ---------------------------------------------------------------

NAPA_HP = {"lr": 0.01, "temperature": 0.1, "code_lr": 0.1, "code_lr_incremental": 0.1, "na_k": 2,
           "edge_decay": 0.9, "edge_min": 0.9 ** 10, "na_softmin": 1e-3, "gamma_min": 0.5, "proto_aug_batch": 6}
# BatchNorm running statistics of a network in training mode move with every forward pass; that
# is the engine's concern for a two-step optimizer (a SAM second pass runs with them frozen), not
# state of the method
BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _napa(task):
    torch.manual_seed(0)
    model = build_classifier("convnet", 1, 4, backbone_kwargs={"widths": [8, 8], "pool_after": [0]})
    learner = NapaVQ(model, NAPA_HP, 4)
    dim = model.num_features
    learner.begin_task(0, [0, 1], [0, 1])
    with torch.no_grad():
        learner.codes.copy_(torch.randn(4, dim))
        learner.prototypes[:2] = torch.randn(2, dim)
    if task == 1:
        learner.begin_task(1, [2, 3], [0, 1, 2, 3])
        with torch.no_grad():
            learner.prototypes[2:] = torch.randn(2, dim)
    return learner


def _napa_batch(task, seed=2):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]) + 2 * task
    return {"x": torch.randn(8, 1, 8, 8, generator=g), "y": y, "index": torch.arange(8)}


@pytest.mark.parametrize("task", [0, 1])
def test_napa_vq_training_step_twice_changes_no_buffer_and_one_engine_step_updates_the_graph(task):
    learner = _napa(task)
    learner.train()
    batch = _napa_batch(task)
    before, codes = _buffers(learner), learner.codes.detach().clone()
    torch.manual_seed(7)
    _, logs = learner.training_step(batch)
    learner.training_step(batch)
    assert _same(before, _buffers(learner), skip=BN_STATS) == []
    assert torch.equal(learner.codes, codes)
    # the step's graph, by hand: the batch's Hebbian update, then (task > 0) the augmented
    # prototypes' update on top of it, as before the fix
    hp = NAPA_HP
    torch.manual_seed(7)
    with torch.no_grad():
        feats = learner.model.features(batch["x"])
        expected = update_edges(before["edges"], sq_dists(feats, learner.codes), learner.seen_mask, hp["na_k"],
                                hp["edge_decay"], hp["edge_min"])
        if task == 1:
            p_aug, _ = learner.augmented_prototypes(hp["proto_aug_batch"], expected)
            expected = update_edges(expected, sq_dists(p_aug, learner.codes), learner.seen_mask, hp["na_k"],
                                    hp["edge_decay"], hp["edge_min"])
    assert not torch.equal(expected, before["edges"])
    assert torch.allclose(logs["edges"], expected)
    learner.on_after_step(batch, logs)
    assert torch.equal(learner.edges, logs["edges"])


# --- Si-Blurry boundaries ------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 300)
SIBLURRY = {"num_tasks": 5, "disjoint_class_ratio": 0.5, "blurry_sample_ratio": 0.1}


def _siblurry(seed, labels=LABELS, **kw):
    return build_scenario("si_blurry", "toy", labels, 10, seed=seed, **{**SIBLURRY, **kw})


def test_si_blurry_cut_points_are_drawn_with_replacement_so_tasks_vary_and_can_be_empty():
    sizes, class_counts, disjoint_counts = set(), set(), []
    for seed in range(20):
        s = _siblurry(seed)
        assert sorted(i for t in s.tasks for i in t.train_indices) == list(range(len(LABELS)))  # each sample once
        disjoint = set(s.class_order[:5])
        homes = {c: [t for t, task in enumerate(s.tasks) if c in set(LABELS[task.train_indices].tolist())]
                 for c in disjoint}
        assert all(len(h) == 1 for h in homes.values())          # a disjoint class lives in one task
        sizes.add(tuple(len(t.train_indices) for t in s.tasks))
        class_counts.add(tuple(len(t.classes) for t in s.tasks))
        disjoint_counts += [len(disjoint & set(LABELS[t.train_indices].tolist())) for t in s.tasks]
    # without replacement every task had exactly one disjoint class (and one blurry class,
    # about 600 samples); with replacement the counts vary, and a task may get none
    assert len(sizes) == 20 and len(class_counts) > 5
    assert 0 in disjoint_counts and max(disjoint_counts) > 1
    assert any(0 in c for c in class_counts)                    # a task with no new class
    assert any(0 in s for s in sizes)                           # ... and even one with no sample


def test_si_blurry_manifest_is_deterministic_per_seed_and_keeps_empty_tasks(tmp_path):
    seeds = [seed for seed in range(20) if any(not t.train_indices for t in _siblurry(seed).tasks)]
    assert seeds, "some seed gives an empty task"
    s = _siblurry(seeds[0])
    assert s.to_json() == _siblurry(seeds[0]).to_json()
    assert s.to_json() != _siblurry(seeds[0] + 1).to_json()
    empty = [t for t in s.tasks if not t.train_indices][0]
    assert empty.classes == [] and empty.test_classes        # nothing new; evaluated on the seen classes
    s.save(tmp_path / "s.json")
    assert ClassIncrementalScenario.load(tmp_path / "s.json").to_json() == s.to_json()
    # the per-class subset keeps the same structure of draws
    sub = _siblurry(seeds[0], samples_per_class=30)
    assert sum(len(t.train_indices) for t in sub.tasks) == 300
    assert sub.to_json() == _siblurry(seeds[0], samples_per_class=30).to_json()


def test_si_blurry_moves_about_m_percent_of_the_blurry_samples():
    s = _siblurry(3, blurry_sample_ratio=0.2)
    blurry = s.class_order[5:]
    # a blurry class's home holds most of its samples; the rest are blurred into other tasks
    moved = 0
    for c in blurry:
        per_task = [int((LABELS[t.train_indices] == c).sum()) for t in s.tasks]
        moved += sum(per_task) - max(per_task)
    assert 0 < moved <= int(0.2 * 5 * 300)
    assert _siblurry(3, blurry_sample_ratio=0.0).to_json() != s.to_json()


# --- MULTI-LANE: ablation switches and official-code details ----------------------------------

SMALL_VIT = {"depth": 2, "embed_dim": 32, "num_heads": 2}
LANE_HP = {"num_selectors": 3, "num_prompts": 2, "num_prompt_layers": 2, "normalize_features": True,
           "temperature": 0.1, "lr": 0.05, "optimizer": "adam", "weight_decay": 0.0}


def _lane(seed=0, **hp):
    torch.manual_seed(seed)
    model = build_classifier("vit_tiny", 1, 4, img_size=8, backbone_kwargs=SMALL_VIT)
    return MultiLane(model, {**LANE_HP, **hp}, 4)


def _capture(module, store: list, keep):
    return module.register_forward_hook(lambda m, args, out: store.append(args[0].detach().clone())
                                        if keep(args[0]) else None)


@pytest.mark.parametrize("variant,switch", [("multi_lane_no_norm", {"normalize_features": False}),
                                            ("multi_lane_no_dandr", {"drop_and_replace": False}),
                                            ("multi_lane_key_query", {"task_selection": "key_query"})])
def test_each_ablation_variant_changes_one_switch_of_multi_lane(variant, switch):
    base, hp = resolve_hparams("incremental", "multi_lane", {}), resolve_hparams("incremental", variant, {})
    assert {k: v for k, v in hp.items() if base[k] != v} == switch


def test_no_norm_switch_drops_only_the_pre_head_normalisation():
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        f = _lane().lane_features(x, [0])
        raw = _lane(normalize_features=False).lane_features(x, [0])
    assert torch.allclose(f.norm(dim=-1), torch.ones(1, 5), atol=1e-5)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(1, 5), atol=1e-2)
    assert torch.allclose(F.normalize(raw, dim=-1), f, atol=1e-5)


def test_drop_and_replace_resummarises_every_block_and_without_it_the_first_summary_travels():
    x = torch.randn(5, 1, 8, 8)
    for dandr in (True, False):
        lane = _lane(drop_and_replace=dandr)
        with torch.no_grad():
            tokens = lane._frozen_tokens(x)
            f = lane.lane_features(x, [0], tokens)
            moved = [tokens[0], tokens[1] + torch.randn_like(tokens[1]), tokens[2]]  # block 1's input changes
            g = lane.lane_features(x, [0], moved)
            h = lane.lane_features(x, [0], [tokens[0] + torch.randn_like(tokens[0])] + tokens[1:])
        assert not torch.allclose(f, h, atol=1e-4)              # block 0 is summarised either way
        if dandr:
            assert not torch.allclose(f, g, atol=1e-4)          # re-summarised in block 1
        else:
            assert torch.allclose(f, g, atol=1e-6)              # summarised once, in block 0


def test_lane_details_follow_the_official_code():
    lane = _lane()
    vit = lane.model.backbone
    x = torch.randn(5, 1, 8, 8)
    blk = vit.blocks[0]
    norm1_in, norm2_in, summarised = [], [], []
    hooks = [_capture(blk.norm1, norm1_in, lambda t: t.dim() == 4 and t.shape[2] == 1),
             _capture(blk.norm2, norm2_in, lambda t: t.dim() == 4)]
    real = lane.summarize
    lane.summarize = lambda s, tokens: summarised.append(tokens.detach().clone()) or real(s, tokens)
    with torch.no_grad():
        tokens = lane._frozen_tokens(x)
        lane.lane_features(x, [0], tokens)
    for h in hooks:
        h.remove()
    # the lane's class token starts as the class-token parameter, without its position embedding
    assert torch.equal(norm1_in[0], vit.cls_token.reshape(1, 1, 1, -1).expand(1, 5, 1, -1))
    assert not torch.allclose(norm1_in[0][0, :, 0], tokens[0][:, 0])
    # the selectors summarise every token of the block's input, the class token included
    assert summarised[0].shape[1] == tokens[0].shape[1] == vit.patch_embed.num_patches + 1
    assert torch.allclose(summarised[0], blk.norm1(tokens[0]))
    # drop and replace: after the attention the selectors are S + LN(S)
    s0 = lane.selectors[0].detach()[None, None].expand(1, 5, -1, -1)
    assert torch.allclose(norm2_in[0][:, :, 1:], s0 + blk.norm1(s0), atol=1e-6)


def test_key_query_selection_trains_the_task_key_and_predicts_through_the_chosen_lane():
    lane = _lane(task_selection="key_query")
    assert _lane().keys is None
    lane.begin_task(0, [0, 1], [0, 1])
    assert any(p is lane.keys[0] for p in lane.param_groups()[0]["params"])
    torch.manual_seed(1)
    x = torch.randn(8, 1, 8, 8)
    y = torch.zeros(8, 4)
    y[:, :2] = (torch.rand(8, 2) < 0.5).float()
    lane.train()
    loss, logs = lane.training_step({"x": x, "y": y})
    with torch.no_grad():
        tokens = lane._frozen_tokens(x)
        q = lane.model.backbone.norm(tokens[-1])[:, 0]                 # the frozen ViT's final class token
        bce = F.binary_cross_entropy_with_logits(lane.lane_logits(x, [0], tokens)[0][:, :2], y[:, :2])
        sim = F.cosine_similarity(q, lane.keys[0][None], dim=1).mean()
    assert loss.item() == pytest.approx((bce - sim).item(), rel=1e-5)  # L = BCE - mean cos(q, k_t)
    opt = lane.configure_optimizer()
    for _ in range(5):
        loss, _ = lane.training_step({"x": x, "y": y})
        lane.optimizer_step(loss, opt, lambda: loss)
    with torch.no_grad():
        assert F.cosine_similarity(q, lane.keys[0][None], dim=1).mean() > sim   # the key moved to the queries
    lane.begin_task(1, [2, 3], [0, 1, 2, 3])
    lane.eval()
    with torch.no_grad():
        lane.selectors[1].add_(torch.randn_like(lane.selectors[1]))   # as if task 1 had trained its lane
        lane.keys[1].copy_(q[0])             # image 0's query is task 1's key, opposite task 0's
        lane.keys[0].copy_(-q[0])
        out = lane.predict(x[:1])
        f1 = lane.lane_features(x[:1], [1])[0]
        # every seen class is scored from lane 1's feature, through that class's head row
        expected = torch.cat([lane.heads[0](f1)[:, :2], lane.heads[1](f1)[:, 2:]], dim=1) / lane.temperature
        assert torch.allclose(out, expected, atol=1e-5)
        concat = _lane()
        concat.load_state_dict({k: v for k, v in lane.state_dict().items() if not k.startswith("keys.")})
        assert not torch.allclose(concat.predict(x[:1])[:, :2], out[:, :2], atol=1e-4)
