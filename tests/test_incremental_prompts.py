"""Prompt-based incremental methods on a frozen ViT: OVOR (OnePrompt + virtual outlier
regularization, ICLR 2024) and MVP (mask and visual prompt tuning, Si-Blurry, ICCV 2023).

Unit tests of each core equation on small tensors and a tiny ViT, then one short run of each
method through ``run_incremental`` on the shared digits data from the ViT-Tiny pre-trained on
the first task of B4Inc2 (on a shortened copy of the scenario to stay fast on a CPU).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from classlab.methods.incremental.mvp import MVP, cvpt_loss, gsf_weights, masked_logits
from classlab.methods.incremental.ovor import (OVOR, energy, knn_distance, prefix_attention, synthesize_outliers,
                                               vit_forward, vor_loss)
from classlab.engine import Trainer, TrainConfig
from classlab.models import build_classifier

from tests.shared_data import SHARED  # noqa: E402  (built by conftest before the tests run)
DATA = SHARED / "prepared" / "digits"
VIT_INIT = SHARED / "pretrain" / "digits_b4inc2_vit_tiny" / "model.pt"


def tiny_vit(depth=3, num_classes=6, seed=0):
    torch.manual_seed(seed)
    return build_classifier("vit_tiny", 1, num_classes, img_size=8,
                            backbone_kwargs={"depth": depth, "embed_dim": 24, "num_heads": 2})


def _batch(n=8, k=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(n, 1, 8, 8, generator=g), "y": torch.arange(n) % k, "index": torch.arange(n)}


def _step(learner, batch):
    """One engine step: the hooks around training_step run as the engine runs them."""
    opt = learner.configure_optimizer()
    learner.train()
    learner.on_before_step(batch)
    loss, logs = learner.training_step(batch)
    learner.optimizer_step(loss, opt, lambda: loss)
    learner.on_after_step(batch, logs)
    return loss, logs


# --- the prompted ViT (shared by both methods) ----------------------------------------------
def test_vit_forward_without_prompts_is_timm_forward_and_ovor_without_prompt_is_the_frozen_backbone():
    model = tiny_vit().eval()
    x = _batch()["x"]
    with torch.no_grad():
        assert torch.allclose(vit_forward(model.backbone, x), model.backbone(x), atol=1e-6)
        assert torch.allclose(vit_forward(model.backbone, x, pooled=False), model.backbone.forward_features(x),
                              atol=1e-6)
        ovor = OVOR(model, {"g_length": 0, "e_length": 0}, 6).eval()      # OnePrompt removed
        assert ovor.prefixes(len(x)) == {}
        assert torch.allclose(ovor.features(x), model.backbone(x), atol=1e-6)
        ovor = OVOR(model, {}, 6).eval()                                    # with the prompt: a different feature
        assert not torch.allclose(ovor.features(x), model.backbone(x), atol=1e-3)


def test_prefix_attention_is_softmax_over_prefix_and_token_keys():
    from timm.layers import Attention

    torch.manual_seed(0)
    attn = Attention(8, num_heads=2, qkv_bias=True).eval()
    x, pk, pv = torch.randn(1, 3, 8), torch.randn(1, 2, 8), torch.randn(1, 2, 8)
    out = prefix_attention(attn, x, pk, pv)
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = (x @ w[:8].t() + b[:8]), (x @ w[8:16].t() + b[8:16]), (x @ w[16:].t() + b[16:])
    heads = []
    for h in range(2):                      # by hand, per head: softmax(q [pk; k]^T / sqrt(4)) [pv; v]
        sl = slice(4 * h, 4 * h + 4)
        keys = torch.cat([pk[0, :, sl], k[0, :, sl]])
        vals = torch.cat([pv[0, :, sl], v[0, :, sl]])
        heads.append(torch.softmax(q[0, :, sl] @ keys.t() / 2.0, dim=1) @ vals)
    expected = attn.proj(torch.cat(heads, 1))
    assert torch.allclose(out[0], expected, atol=1e-5)
    # no prefix: timm's own attention
    assert torch.allclose(prefix_attention(attn, x), attn(x), atol=1e-6)


# --- OVOR -------------------------------------------------------------------------------------
def test_ovor_step_trains_prompt_and_head_not_the_backbone_and_masks_other_tasks():
    model = tiny_vit()
    ovor = OVOR(model, {"lr": 0.01, "optimizer": "adam", "weight_decay": 0.0}, 6)
    ovor.begin_task(1, [2, 3], [0, 1, 2, 3])
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    g, e, w = ovor.g_prompt.detach().clone(), ovor.e_prompt.detach().clone(), model.head.weight.detach().clone()
    batch = _batch(k=2)
    batch["y"] = batch["y"] + 2
    _, logs = _step(ovor, batch)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), f"frozen backbone tensor {k} changed"
    assert ovor.g_prompt.shape == (2, 10, 24) and ovor.e_prompt.shape == (1, 40, 24)   # depth 3: e-prompt in block 2
    assert not torch.equal(ovor.g_prompt, g) and not torch.equal(ovor.e_prompt, e)
    assert not torch.equal(model.head.weight, w)
    # CE over the current task's classes only: every other logit is -inf in training
    assert torch.isinf(logs["logits"][:, [0, 1, 4, 5]]).all() and torch.isfinite(logs["logits"][:, [2, 3]]).all()


def test_ovor_vor_loss_hand_computed_and_higher_for_in_distribution_like_outliers():
    id_high = torch.tensor([[20.0, 0.0]])             # E = -20: below tau_id = -15, no penalty
    ood_high = torch.tensor([[10.0, 10.0]])           # E = -(10 + ln 2): far below tau_ood = -3
    ood_low = torch.tensor([[-5.0, -5.0]])            # E = 5 - ln 2 >= -3: no penalty
    assert energy(ood_high).item() == pytest.approx(-(10 + math.log(2)))
    gap = -3.0 + 10 + math.log(2)                     # ReLU(tau_ood - E(v)); Huber(delta 1) = gap - 1/2
    assert vor_loss(id_high, ood_high).item() == pytest.approx(0.1 * (gap - 0.5), rel=1e-5)
    assert vor_loss(id_high, ood_low).item() == pytest.approx(0.0, abs=1e-6)
    assert vor_loss(id_high, ood_high) > vor_loss(id_high, ood_low)
    # the ID side: low ID logits are penalised, E(x) = -ln 2, gap 15 - ln 2
    id_low = torch.tensor([[0.0, 0.0]])
    assert vor_loss(id_low, ood_low).item() == pytest.approx(0.1 * (15 - math.log(2) - 0.5), rel=1e-5)
    # a small gap is in Huber's quadratic part: 0.5 gap^2
    near = torch.tensor([[3.4 - math.log(2)] * 2])                 # E(v) = -3.4: gap 0.4
    assert vor_loss(id_high, near).item() == pytest.approx(0.1 * 0.5 * 0.4 ** 2, rel=1e-4)


def test_ovor_outliers_are_low_density_samples_around_the_boundary():
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(60, 16, generator=g) * 0.3 + 3 * torch.eye(16)[0],
                       torch.randn(60, 16, generator=g) * 0.3 + 3 * torch.eye(16)[1]])
    oods = synthesize_outliers(feats, 2, k=10, select=10, sample_from=50, sigma=0.3, per_class=15,
                               generator=torch.Generator().manual_seed(1))
    assert oods.shape == (30, 16)
    normed = F.normalize(feats, dim=1)
    id_kth = knn_distance(normed, normed, 10)
    ood_kth = knn_distance(F.normalize(oods, dim=1), normed, 10)
    assert ood_kth.min() > id_kth.median()          # kept candidates are in the low-density region
    again = synthesize_outliers(feats, 2, k=10, select=10, sample_from=50, sigma=0.3, per_class=15,
                                generator=torch.Generator().manual_seed(1))
    assert torch.equal(oods, again)


def test_ovor_vor_phase_raises_id_logits_and_lowers_outlier_logits():
    model = tiny_vit(depth=1)
    ovor = OVOR(model, {"vor_lr": 0.05, "vor_batch_size": 32}, 6)
    ovor.begin_task(0, [0, 1], [0, 1])
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(40, 24, generator=g) + 2 * torch.eye(24)[0],
                       torch.randn(40, 24, generator=g) + 2 * torch.eye(24)[1]])
    labels = torch.arange(80) // 40
    oods = synthesize_outliers(feats, 2, k=10, select=10, sample_from=40, sigma=0.5, per_class=20, generator=g)
    head = model.head
    with torch.no_grad():
        e_id0, e_ood0 = energy(head(feats)[:, :2]).mean(), energy(head(oods)[:, :2]).mean()
    # the VOR phase through the engine: 15 epochs on these features and outliers
    ovor.phase = "vor"
    ovor.hparams = {**ovor.hparams, "vor_epochs": 15}
    ovor.hparams.update(ovor.phase_hparams("vor"))
    trainer = Trainer(ovor, TrainConfig.from_hparams(ovor.hparams), torch.device("cpu"), 0, None, progress=False)
    losses = [row["loss"] for row in trainer.fit(ovor.vor_loader(feats, labels, oods, 32, torch.device("cpu"), 0))]
    with torch.no_grad():
        e_id1, e_ood1 = energy(head(feats)[:, :2]).mean(), energy(head(oods)[:, :2]).mean()
    assert losses[-1] < losses[0]
    assert e_id1 < e_id0                                       # ID logits up (energy down)
    assert (e_ood1 - e_id1) > (e_ood0 - e_id0) + 1.0           # outliers separated from ID by energy


def test_oneprompt_is_ovor_without_the_outlier_step_and_shares_its_defaults():
    from classlab.config import resolve_hparams
    from classlab.methods.incremental.oneprompt import OnePrompt
    from classlab.methods.learner import TaskContext

    ovor_hp, one_hp = resolve_hparams("incremental", "ovor", {}), resolve_hparams("incremental", "oneprompt", {})
    assert one_hp["vor_epochs"] == 0 and ovor_hp["vor_epochs"] > 0
    assert {k: v for k, v in one_hp.items() if k != "vor_epochs"} == \
        {k: v for k, v in ovor_hp.items() if k != "vor_epochs"}
    model = tiny_vit(depth=1)
    learner = OnePrompt(model, {**ovor_hp, "vor_epochs": 5}, 6)  # skips VOR even if epochs are asked for
    learner.begin_task(0, [0, 1], [0, 1])
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    x, y = torch.randn(20, 1, 8, 8), torch.arange(20) % 2
    context = TaskContext(0, [0, 1], [0, 1], x, y, torch.arange(20), None, lambda idx: learner.features(x[idx]),
                          lambda idx: learner.predict(x[idx]), torch.device("cpu"))
    learner.end_task(0, context)
    assert all(torch.equal(before[k], v) for k, v in model.head.state_dict().items())
    assert learner.task_phases(0) == ["train"]   # no end-of-task head phase, even with vor_epochs asked for
    assert OVOR(tiny_vit(depth=1), ovor_hp, 6).task_phases(0) == ["train", "vor"]


# --- MVP --------------------------------------------------------------------------------------
def test_mvp_instance_wise_mask_gives_absent_classes_minus_inf():
    raw = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 1.0, 2.0, 3.0]])
    mask = torch.tensor([[0.0, 0.0, 2.0, -1.0], [-1.0, 0.0, 0.0, 0.0]])
    exposed = torch.tensor([True, True, False, True])
    z = masked_logits(raw, mask, exposed)
    assert torch.isinf(z[:, 2]).all() and (z[:, 2] < 0).all()
    keep = exposed.nonzero().flatten()
    assert torch.allclose(z[:, keep], (raw * 2 * torch.sigmoid(mask))[:, keep])
    assert z[0, 0].item() == pytest.approx(1.0)                    # 2 sigmoid(0) = 1
    assert z[0, 3].item() == pytest.approx(0.5 * 2 / (1 + math.e))  # 2 sigmoid(-1) = 2 / (1 + e)


def test_mvp_gsf_closed_form_matches_autograd_and_gamma_zero_is_plain_ce():
    torch.manual_seed(0)
    head = torch.nn.Linear(5, 4)
    f, y = torch.randn(6, 5), torch.tensor([0, 1, 1, 3, 0, 1])
    cmask = torch.randn(6, 4)
    exposed = torch.tensor([True, True, False, True])
    logits = masked_logits(head(f), cmask, exposed)
    per = []
    for b in range(6):                       # g_b = dl_b / dW_{y_b} by autograd
        head.zero_grad()
        F.cross_entropy(masked_logits(head(f[b:b + 1]), cmask[b:b + 1], exposed), y[b:b + 1]).backward()
        per.append(head.weight.grad[y[b]].clone())
    head.zero_grad()
    F.cross_entropy(masked_logits(head(f), cmask, exposed), y).backward()
    big = head.weight.grad[y]
    s = 1 - F.cosine_similarity(torch.stack(per), big, dim=1)
    w = gsf_weights(f, logits.detach(), y, cmask, alpha=0.5, gamma=2.0)
    assert torch.allclose(w, 0.5 + 0.5 * s.clamp_min(0) ** 2, atol=1e-5)
    assert torch.equal(gsf_weights(f, logits.detach(), y, cmask, alpha=0.7, gamma=0.0), torch.ones(6))
    # the whole MVP loss with gamma 0, no AFS and no prompt loss is the masked cross-entropy
    model = tiny_vit()
    mvp = MVP(model, {"gamma": 0.0, "alpha": 0.5, "use_afs": False, "prompt_loss_weight": 0.0, "pool_size": 3}, 6)
    batch = _batch(k=3)
    mvp.train()
    loss, logs = mvp.training_step(batch)
    assert loss.item() == pytest.approx(F.cross_entropy(logs["logits"], batch["y"]).item(), rel=1e-5)
    # training_step is pure: it masks with the batch's classes but leaves the exposure buffer to the hooks
    assert not mvp.exposed.any() and torch.isfinite(logs["logits"][:, :3]).all()
    assert torch.isinf(logs["logits"][:, 3:]).all()


def test_mvp_base_is_mvp_with_every_component_off_whatever_the_overrides():
    from classlab.config import resolve_hparams
    from classlab.methods.incremental.mvp_base import MVPBase

    hp = resolve_hparams("incremental", "mvp_base", {"use_mask": True})
    mvp_hp = resolve_hparams("incremental", "mvp", {})
    assert {k: v for k, v in hp.items() if not k.startswith("use_")} == \
        {k: v for k, v in mvp_hp.items() if not k.startswith("use_")}
    base = MVPBase(tiny_vit(), {**hp, "pool_size": 3}, 6)
    base.hparams = {**hp, "use_gsf": True}                 # as the protocol re-assigns it per task
    assert not any(base.hparams[k] for k in ("use_mask", "use_contrastive", "use_afs", "use_gsf"))
    batch = _batch(k=3)
    base.train()
    q = base.query(batch["x"])
    pull = (1.0 - F.cosine_similarity(q, base.key[base.select(q)], dim=1)).mean()
    loss, logs = base.training_step(batch)
    # the base loss: cross-entropy over the classes exposed so far + L2P's key pull, nothing else
    ce = F.cross_entropy(logs["logits"], batch["y"])
    assert loss.item() == pytest.approx((ce + hp["prompt_loss_weight"] * pull).item(), rel=1e-5)
    assert torch.isinf(logs["logits"][:, 3:]).all()


def test_mvp_cvpt_loss_hand_computed():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    q = torch.tensor([[2.0, 0.0]])
    # d(q, k0) = 0; N = mean(exp(0), exp(1)); L = -log(N / (1 + N))
    n = (1 + math.e) / 2
    assert cvpt_loss(q, keys, torch.tensor([0]), torch.ones(2)).item() == pytest.approx(-math.log(n / (1 + n) + 1e-6))
    # usage mass mu = 2 halves every distance
    n2 = (1 + math.exp(0.5)) / 2
    assert cvpt_loss(q, keys, torch.tensor([0]), torch.tensor([2.0, 1.0])).item() == \
        pytest.approx(-math.log(n2 / (1 + n2) + 1e-6))
    # a query far from its key costs more
    assert cvpt_loss(q, keys, torch.tensor([1]), torch.ones(2)) > cvpt_loss(q, keys, torch.tensor([0]), torch.ones(2))


def test_mvp_step_trains_prompts_keys_masks_head_not_backbone_and_counts_key_use():
    model = tiny_vit()
    mvp = MVP(model, {"lr": 0.01, "optimizer": "adam", "pool_size": 3}, 6)
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    before = {n: p.detach().clone() for n, p in mvp.named_parameters() if p.requires_grad}
    batch = _batch(k=2)
    _step(mvp, batch)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), f"frozen backbone tensor {k} changed"
    for name in ("g_prompt", "e_prompt", "key", "class_mask", "model.head.weight"):
        assert not torch.equal(dict(mvp.named_parameters())[name], before[name]), f"{name} did not change"
    assert mvp.count.sum().item() == len(batch["y"])
    # usage mass: a key used much more often is not picked for the same query
    with torch.no_grad():
        q = mvp.query(batch["x"])
        picked = mvp.select(q)
        mvp.count[picked[0]] += 1e6
        assert mvp.select(q)[0] != picked[0]


# --- end to end through run_incremental ------------------------------------------------------
needs_shared = pytest.mark.incremental_e2e  # shared inputs are built by conftest before any test runs; never skipped


def _short_scenario(src: Path, dest: Path, per_task: int) -> Path:
    doc = json.loads(src.read_text())
    for task in doc["tasks"]:
        task["train_indices"] = task["train_indices"][:per_task]   # keeps the stream order
    dest.write_text(json.dumps(doc))
    return dest


def _accuracies(ev: Path, scenario: Path, t: int, classes) -> tuple[float, float]:
    """After task t, on the test samples of ``classes``: accuracy over all seen classes (CIL) and
    accuracy among ``classes`` only (task-aware, TIL)."""
    z = np.load(ev / "predictions.npz")
    logits, labels = z[f"logits_task{t}"], z[f"labels_task{t}"]
    sel = np.isin(labels, classes)
    cil = float((logits[sel].argmax(1) == labels[sel]).mean())
    til = float((np.asarray(classes)[logits[sel][:, classes].argmax(1)] == labels[sel]).mean())
    return cil, til


def _backbone_unchanged(ck: Path):
    from classlab.engine import load_checkpoint
    from classlab.train import load_model

    init, _ = load_model(VIT_INIT)
    state = load_checkpoint(ck / "model.pt", map_location="cpu")["learner"]
    for k, v in init.backbone.state_dict().items():
        assert torch.equal(state[f"model.backbone.{k}"], v), f"backbone tensor {k} moved"
    return state


@needs_shared
def test_ovor_end_to_end_b4inc2_from_the_pretrained_vit(tmp_path):
    from classlab.protocols.incremental import run_incremental

    scen = _short_scenario(SHARED / "scenarios" / "digits_b4inc2.json", tmp_path / "b4inc2.json", 96)
    ck, ev = tmp_path / "ck", tmp_path / "ev"
    run_incremental("ovor", DATA, scen, "vit_tiny", 0, ck, ev, threads=1, progress=False, init=VIT_INIT,
                    overrides={"epochs": 2, "vor_epochs": 3, "vor_sample_from": 100})
    assert (ck / "model.pt").exists() and (ck / "history.json").exists()
    tasks = json.loads(scen.read_text())["tasks"]
    last = len(tasks) - 1
    # the last task's head separates its own classes (chance 0.5) ...
    _, til = _accuracies(ev, scen, last, tasks[last]["classes"])
    assert til > 0.6, f"ovor: task-aware accuracy of the last task {til:.2f}"
    # ... and, rehearsal-free, the first task's classes are not forgotten: frozen backbone, their
    # head rows untouched by later tasks (CE and VOR see only the current task's logits)
    first_then, _ = _accuracies(ev, scen, 0, tasks[0]["classes"])
    first_now, _ = _accuracies(ev, scen, last, tasks[0]["classes"])
    assert first_then > 0.8 and first_now >= first_then - 0.05, (first_then, first_now)
    state = _backbone_unchanged(ck)             # OnePrompt: only the prompt and head are learned
    assert state["g_prompt"].shape == (2, 10, 192) and state["e_prompt"].shape == (3, 40, 192)


@needs_shared
def test_mvp_end_to_end_siblurry_online_from_the_pretrained_vit(tmp_path):
    from classlab.protocols.incremental import run_incremental

    scen = _short_scenario(SHARED / "scenarios" / "digits_siblurry.json", tmp_path / "siblurry.json", 64)
    doc = json.loads(scen.read_text())
    doc["params"]["eval_period"] = 64           # the evaluation grid is the scenario's, shared by every method
    scen.write_text(json.dumps(doc))
    ck, ev = tmp_path / "ck", tmp_path / "ev"
    run_incremental("mvp", DATA, scen, "vit_tiny", 0, ck, ev, threads=1, progress=False, init=VIT_INIT,
                    overrides={"pool_size": 5})
    tasks = json.loads(scen.read_text())["tasks"]
    t = len(tasks) - 1
    acc, _ = _accuracies(ev, scen, t, tasks[t]["test_classes"])
    assert acc > 0.1 + 0.1, f"mvp: {acc:.2f} on all 10 classes after the stream, chance 0.1"
    z = np.load(ev / "predictions.npz")
    # online: an anytime accuracy at every multiple of eval_period along the whole stream, in order
    curve = np.concatenate([z[f"anytime_task{task}"] for task in range(t + 1)])
    total = sum(len(task["train_indices"]) for task in tasks)
    assert curve[:, 0].tolist() == list(range(64, total + 1, 64))
    assert ((0 <= curve[:, 1]) & (curve[:, 1] <= 1)).all()
    state = _backbone_unchanged(ck)
    from classlab.data.prepare import load_prepared

    stream = [i for task in json.loads(scen.read_text())["tasks"] for i in task["train_indices"]]
    seen = set(load_prepared(DATA).train.y[torch.tensor(stream)].tolist())
    assert set(state["exposed"].nonzero().flatten().tolist()) == seen   # classes exposed by the stream
    # one key pick per sample and optimizer step: online_iter 3 steps on each incoming batch
    assert state["count"].sum().item() == 3 * len(stream)
