"""Fidelity fixes of issue 7 (defects 3 and 9): SLCA's BatchNorm statistics and its baselines as
variants, PRD's budget against LwF, OVOR's equal-budget VOR baseline, GS-LoRA's paired batches."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from classlab.config import resolve_hparams
from classlab.engine import Trainer, TrainConfig
from classlab.data.loader import MixedLoader, TensorLoader
from classlab.methods.incremental import ovor as ovor_module
from classlab.methods.incremental.gs_lora import GSLoRA, bounded_forgetting_loss, group_sparse_norm
from classlab.methods.incremental.ovor import OVOR
from classlab.methods.incremental.slca import SLCA
from classlab.methods.learner import TaskContext
from classlab.models import build_classifier
from tests.test_incremental_phases import run_task_phases

ROOT = Path(__file__).resolve().parents[1]


# --- SLCA: BatchNorm statistics -------------------------------------------------------------
def _bn_layers(learner):
    return [m for m in learner.model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _bn_state(learner):
    return [(m.running_mean.clone(), m.running_var.clone()) for m in _bn_layers(learner)]


def _train_task(learner, task_id, classes, seen, seed):
    """A few engine steps on random images of ``classes`` (the protocol's order: begin_task, fit)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(64, 1, 8, 8, generator=g) * 255).to(torch.uint8)
    y = torch.tensor(classes).repeat(32)
    learner.begin_task(task_id, classes, seen)
    config = TrainConfig(epochs=2, batch_size=16, schedule="constant", warmup_frac=0.0)
    trainer = Trainer(learner, config, torch.device("cpu"), seed, None, progress=False)
    trainer.fit(TensorLoader(x, y, 16, device=torch.device("cpu"), shuffle=True, seed=seed))


def _slca(freeze: bool):
    torch.manual_seed(0)
    model = build_classifier("convnet", 1, 4, img_size=8, backbone_kwargs={"widths": [4, 8], "pool_after": [0]})
    hp = {**resolve_hparams("incremental", "slca", {}), "freeze_bn_stats": freeze, "ca_epochs": 0}
    return SLCA(model, hp, 4)


def test_slca_bn_statistics_update_in_task_0_and_freeze_from_task_1_with_a_scratch_backbone():
    learner = _slca(freeze=True)
    initial = _bn_state(learner)
    assert initial and all(torch.equal(m, torch.zeros_like(m)) for m, _ in initial)  # a scratch backbone
    _train_task(learner, 0, [0, 1], [0, 1], seed=1)
    after_task0 = _bn_state(learner)
    for (m0, v0), (m1, v1) in zip(initial, after_task0):
        assert not torch.equal(m0, m1) and not torch.equal(v0, v1)  # task 0 estimates the statistics
    weights_task0 = copy.deepcopy(learner.model.backbone.state_dict())
    _train_task(learner, 1, [2, 3], [0, 1, 2, 3], seed=2)
    for (m0, v0), (m1, v1) in zip(after_task0, _bn_state(learner)):
        assert torch.equal(m0, m1) and torch.equal(v0, v1)  # frozen from task 1 on
    conv = next(k for k in weights_task0 if k.endswith("weight") and weights_task0[k].dim() == 4)
    assert not torch.equal(weights_task0[conv], learner.model.backbone.state_dict()[conv])  # the slow learner still learns


def test_slca_without_freezing_updates_bn_statistics_in_every_task_as_the_official_code():
    learner = _slca(freeze=False)
    _train_task(learner, 0, [0, 1], [0, 1], seed=1)
    after_task0 = _bn_state(learner)
    _train_task(learner, 1, [2, 3], [0, 1, 2, 3], seed=2)
    assert any(not torch.equal(m0, m1) for (m0, _), (m1, _) in zip(after_task0, _bn_state(learner)))


def test_slca_yaml_gives_no_test_accuracy_as_a_reason():
    text = (ROOT / "config" / "methods" / "incremental" / "slca.yaml").read_text()
    assert "accuracy" not in text.lower()


# --- SLCA: its baselines as variants ---------------------------------------------------------
def _lrs(method):
    hp = resolve_hparams("incremental", method, {})
    learner = SLCA(build_classifier("convnet", 1, 4, img_size=8, backbone_kwargs={"widths": [4], "pool_after": []}),
                   hp, 4)
    return hp, {g["name"]: g["lr"] for g in learner.configure_optimizer().param_groups}


def test_slca_variants_switch_only_the_slow_learner_and_the_alignment():
    slca, seqft, no_ca = (resolve_hparams("incremental", m, {}) for m in ("slca", "slca_seqft", "slca_no_ca"))
    assert slca["classifier_alignment"] is True and slca["backbone_lr_scale"] == 0.01
    assert seqft["classifier_alignment"] is False and seqft["backbone_lr_scale"] == 1.0
    assert no_ca["classifier_alignment"] is False and no_ca["backbone_lr_scale"] == slca["backbone_lr_scale"]
    switches = {"classifier_alignment", "backbone_lr_scale"}
    for variant in (seqft, no_ca):  # the same pipeline otherwise: epochs, batch, masking, BN, lr of the head
        assert {k: v for k, v in variant.items() if k not in switches} == \
            {k: v for k, v in slca.items() if k not in switches}
    hp, lrs = _lrs("slca")
    assert lrs["backbone"] == pytest.approx(0.01 * hp["lr"]) and lrs["head"] == pytest.approx(hp["lr"])
    hp, lrs = _lrs("slca_seqft")
    assert lrs["backbone"] == pytest.approx(hp["lr"]) and lrs["head"] == pytest.approx(hp["lr"])  # fast everywhere
    hp, lrs = _lrs("slca_no_ca")
    assert lrs["backbone"] == pytest.approx(0.01 * hp["lr"])


class _Identity2(torch.nn.Module):
    num_features = 2

    def forward(self, x):
        return x


def _ctx(task_id, new, seen, feats, labels):
    idx = torch.arange(len(labels))
    return TaskContext(task_id, new, seen, torch.zeros(len(labels), 1), labels, idx, None,
                       lambda i: feats[i], lambda i: feats[i], torch.device("cpu"))


@pytest.mark.parametrize("align", [True, False])
def test_slca_classifier_alignment_switch(align):
    from classlab.models.backbones import Classifier

    torch.manual_seed(0)
    hp = {**resolve_hparams("incremental", "slca", {}), "classifier_alignment": align, "ca_samples_per_class": 32}
    learner = SLCA(Classifier(_Identity2(), 4), hp, 4)
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0], [0.0, -4.0]])
    feats = torch.cat([c + 0.3 * torch.randn(20, 2) for c in centres])
    labels = torch.arange(4).repeat_interleave(20)
    learner.begin_task(0, [0, 1], [0, 1])
    learner.end_task(0, _ctx(0, [0, 1], [0, 1], feats[labels < 2], labels[labels < 2]))
    head = copy.deepcopy(learner.model.head.state_dict())
    learner.begin_task(1, [2, 3], [0, 1, 2, 3])
    assert learner.task_phases(1) == (["train", "align"] if align else ["train"])
    run_task_phases(learner, 1, _ctx(1, [2, 3], [0, 1, 2, 3], feats[labels >= 2], labels[labels >= 2]))
    unchanged = all(torch.equal(v, learner.model.head.state_dict()[k]) for k, v in head.items())
    assert unchanged is (not align)
    assert learner.class_task.tolist() == [0, 0, 1, 1]  # statistics are stored either way
    assert torch.allclose(learner.class_means[3].float(), feats[labels == 3].mean(0), atol=1e-5)


# --- PRD vs LwF: the same budget ----------------------------------------------------------------
@pytest.mark.parametrize("config", ["config.yaml", "incremental_cpu.yaml", "incremental.yaml"])
def test_prd_and_lwf_train_with_the_same_batch_size_and_epochs_wherever_they_are_compared(config):
    cfg = yaml.safe_load((ROOT / "config" / config).read_text())
    inc = cfg["families"]["incremental"]
    overrides = inc.get("overrides") or {}
    paired = [name for name, methods in inc["runs"].items() if "prd" in methods and "lwf" in methods]
    if config == "config.yaml":
        # the default run has no PRD; adding it next to lwf needs lwf's batch size override too
        assert not paired or overrides.get("prd") == overrides.get("lwf")
        return
    assert paired, f"{config} runs the PRD claim's pair in one scenario"
    prd, lwf = (resolve_hparams("incremental", m, overrides.get(m)) for m in ("prd", "lwf"))
    for key in ("batch_size", "epochs", "first_task_epochs"):
        assert prd[key] == lwf[key], (config, key, prd[key], lwf[key])
    if config == "incremental_cpu.yaml":  # 600 images per task, drop_last: 2 x 18 = 36 SGD steps each
        assert 2 * 300 // prd["batch_size"] * prd["epochs"] == 36


# --- OVOR: vor_lambda 0 is the same end-of-task phase with cross-entropy alone ------------------
def _tiny_vit():
    torch.manual_seed(0)
    return build_classifier("vit_tiny", 1, 6, img_size=8, backbone_kwargs={"depth": 1, "embed_dim": 24, "num_heads": 2})


def _features(n_per_class=30):
    g = torch.Generator().manual_seed(0)
    feats = torch.cat([torch.randn(n_per_class, 24, generator=g) + 2 * torch.eye(24)[0],
                       torch.randn(n_per_class, 24, generator=g) + 2 * torch.eye(24)[1]])
    return feats, torch.arange(2 * n_per_class) // n_per_class


def _plain_ce_head(head, feats, labels, new_mask, hp, seed):
    """Reference: the VOR phase's loader over the ID features, optimizer and schedule with the
    cross-entropy alone, written out step by step."""
    from classlab.engine.schedule import lr_factor

    head = copy.deepcopy(head)
    lr, epochs = hp["vor_lr"], hp["vor_epochs"]
    loader = TensorLoader(feats, labels, hp["vor_batch_size"], device=torch.device("cpu"), shuffle=True, seed=seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr, betas=(hp["momentum"], 0.999))
    total, step = epochs * len(loader), 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(step, total, "cosine", 0.0)
            logits = head(batch["x"]).masked_fill(~new_mask, float("-inf"))
            loss = F.cross_entropy(logits, batch["y"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return head


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_ovor_vor_lambda_zero_is_plain_cross_entropy_in_the_end_of_task_phase(lam):
    hp = {**resolve_hparams("incremental", "ovor", {}), "vor_lambda": lam, "vor_lr": 0.05, "vor_batch_size": 16,
          "vor_epochs": 3}
    model = _tiny_vit()
    learner = OVOR(model, hp, 6)
    learner.begin_task(0, [0, 1], [0, 1])
    feats, labels = _features()
    oods = torch.randn(40, 24, generator=torch.Generator().manual_seed(3)) * 4
    reference = _plain_ce_head(model.head, feats, labels, learner.new_mask, hp, seed=7)
    # the VOR phase through the engine, on these features (and outliers where lambda > 0)
    learner.phase = "vor"
    learner.hparams = {**hp, **learner.phase_hparams("vor")}
    trainer = Trainer(learner, TrainConfig.from_hparams(learner.hparams), torch.device("cpu"), 7, None, progress=False)
    loader = learner.vor_loader(feats, labels, oods if lam > 0 else None, 16, torch.device("cpu"), 7)
    assert isinstance(loader, MixedLoader) is (lam > 0)
    trainer.fit(loader)
    assert trainer.steps_done == 3 * math.ceil(len(feats) / 16)  # the same steps either way
    same = all(torch.allclose(p, q, atol=1e-6) for p, q in zip(model.head.parameters(), reference.parameters()))
    assert same is (lam == 0)


def test_ovor_no_vor_variant_keeps_the_phase_and_synthesises_no_outliers(monkeypatch):
    ovor_hp, base_hp = resolve_hparams("incremental", "ovor", {}), resolve_hparams("incremental", "ovor_no_vor", {})
    assert base_hp["vor_lambda"] == 0 and ovor_hp["vor_lambda"] > 0
    assert {k: v for k, v in base_hp.items() if k != "vor_lambda"} == \
        {k: v for k, v in ovor_hp.items() if k != "vor_lambda"}  # same vor_epochs, lr, batch: the same budget
    assert base_hp["vor_epochs"] > 0

    def no_outliers(*args, **kwargs):
        raise AssertionError("vor_lambda 0 needs no outliers")

    monkeypatch.setattr(ovor_module, "synthesize_outliers", no_outliers)
    model = _tiny_vit()
    learner = OVOR(model, {**base_hp, "vor_epochs": 2}, 6)
    learner.begin_task(0, [0, 1], [0, 1])
    assert learner.task_phases(0) == ["train", "vor"]  # the phase is kept with lambda 0
    x, y = torch.randn(20, 1, 8, 8), torch.arange(20) % 2
    before = copy.deepcopy(model.head.state_dict())
    ctx = TaskContext(0, [0, 1], [0, 1], x, y, torch.arange(20), None, lambda idx: learner.features(x[idx]).detach(),
                      lambda idx: learner.predict(x[idx]), torch.device("cpu"))
    trainers = run_task_phases(learner, 0, ctx)
    assert trainers["vor"].steps_done == 2 * math.ceil(20 / base_hp["vor_batch_size"])
    assert any(not torch.equal(v, model.head.state_dict()[k]) for k, v in before.items())  # the phase ran
    assert all(torch.isfinite(p).all() for p in model.head.parameters())


def test_oneprompt_docstring_no_longer_says_the_pair_measures_vor():
    from classlab.methods.incremental import oneprompt

    doc = " ".join(oneprompt.__doc__.split())
    assert "measures what the outlier regularization adds" not in doc and "ovor_no_vor" in doc


# --- GS-LoRA: one forget batch and one retain batch per step ------------------------------------
GS_HP = {"lora_rank": 2, "lora_alpha": 2, "bound": 3.0, "beta": 0.5, "alpha": 0.1, "optimizer": "adamw",
         "lr": 0.05, "weight_decay": 0.0, "prototype_reg": False}


def _gs_lora(hp=None):
    torch.manual_seed(0)
    model = build_classifier("vit_tiny", 1, 4, img_size=8, backbone_kwargs={"depth": 1})
    return GSLoRA(model, {**GS_HP, **(hp or {})}, 4)


def test_gs_lora_training_sources_are_forget_first_then_the_replay():
    learner = _gs_lora()
    forget, retained, replay = torch.arange(0, 10), torch.arange(10, 40), torch.arange(10, 16)
    sources = learner.training_sources(forget, retained, replay)
    assert list(sources) == ["forget", "retain"]
    assert torch.equal(sources["forget"], forget) and torch.equal(sources["retain"], replay)


def test_gs_lora_splits_a_mixed_batch_by_source_and_weights_each_loss_once():
    learner = _gs_lora({"beta_per_task": [0.2, 0.25]})
    learner.begin_task(0, [1], list(range(4)))
    learner.begin_task(1, [2], list(range(4)))  # class 1 forgotten before, class 2 now
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g)
    # source 0 (forget) then source 1 (retain); a label-based split would call the first retain
    # sample (class 1, already forgotten) neither forget nor retain
    y = torch.tensor([2, 2, 2, 1, 0, 3])
    source = torch.tensor([0, 0, 0, 1, 1, 1])
    loss, logs = learner.training_step({"x": x, "y": y, "source": source})
    with torch.no_grad():
        logits = learner.model(x)
        expected_retain = F.cross_entropy(logits[3:], y[3:])
        expected_forget = bounded_forgetting_loss(logits[:3], y[:3], 3.0)
        expected = expected_retain + 0.25 * expected_forget + 0.1 * group_sparse_norm(learner.lora_groups())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["retain"].item() == pytest.approx(expected_retain.item(), rel=1e-5)
    assert logs["forget"].item() == pytest.approx(expected_forget.item(), rel=1e-5)
    # without sources (one shuffled loader) the split falls back to labels
    forget, retain = learner.split_batch({"x": x, "y": y})
    assert forget.tolist() == [True, True, True, False, False, False]
    assert retain.tolist() == [False, False, False, False, True, True]


def test_gs_lora_beta_per_task_follows_the_list_then_its_last_entry_or_the_constant():
    learner = _gs_lora({"beta_per_task": [0.2, 0.25, 0.3]})
    betas = []
    for t in range(5):
        learner.task_id = t
        betas.append(learner.task_beta())
    assert betas == [0.2, 0.25, 0.3, 0.3, 0.3]
    learner = _gs_lora({"beta_per_task": []})
    learner.task_id = 1
    assert learner.task_beta() == 0.5
    assert resolve_hparams("incremental", "gs_lora", {})["beta_per_task"] == [0.2, 0.25, 0.25, 0.25]


def test_gs_lora_every_step_of_the_mixed_loader_pairs_one_forget_and_one_retain_batch():
    learner = _gs_lora()
    learner.begin_task(0, [1], list(range(4)))
    labels = torch.arange(4).repeat_interleave(30)  # 30 images per class
    x = (torch.rand(len(labels), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    forget = torch.nonzero(labels == 1).flatten()
    retained = torch.nonzero(labels != 1).flatten()
    replay = torch.cat([retained[labels[retained] == c][:4] for c in (0, 2, 3)])  # 12 replay images
    trainer = Trainer(learner, TrainConfig(batch_size=8), torch.device("cpu"), 0, None, progress=False)
    loader = trainer.make_mixed_loader(x, labels, None, None, learner.training_sources(forget, retained, replay))
    loader.set_epoch(0)
    steps = 0
    for batch in loader:
        forget_mask, retain_mask = learner.split_batch(batch)
        assert int(forget_mask.sum()) == 8 and int(retain_mask.sum()) == 8  # half and half, every step
        assert (batch["y"][forget_mask] == 1).all() and (batch["y"][retain_mask] != 1).all()
        steps += 1
    assert steps == 30 // 8  # the forget set defines the epoch; the 12-image replay cycles


# --- SLCA's variants through the protocol, on the shared digits inputs ---------------------------
@pytest.mark.incremental_e2e
def test_slca_variants_run_through_the_protocol_at_the_same_budget(tmp_path):
    import numpy as np

    from classlab.protocols.incremental import run_incremental
    from tests.shared_data import SHARED

    out = {}
    for method in ("slca", "slca_seqft", "slca_no_ca"):
        result = run_incremental(method, SHARED / "prepared" / "digits", SHARED / "scenarios" / "digits_b4inc2.json",
                                 "convnet", 0, tmp_path / method / "ck", tmp_path / method / "ev",
                                 overrides={"epochs": 1, "ca_epochs": 2},
                                 init=SHARED / "pretrain" / "digits_b4inc2_convnet" / "model.pt",
                                 backbone_kwargs={"widths": [16, 32], "pool_after": [0]}, threads=1, progress=False)
        out[method] = (result, dict(np.load(tmp_path / method / "ev" / "predictions.npz")))
    steps = {m: r["meta"]["train_steps"] for m, (r, _) in out.items()}
    # the same training phase (SGD budget) for all three; slca adds its align phase after tasks 1-3:
    # one epoch of ca_epochs x 256 draws per seen class (6, 8, 10) in batches of 256
    assert steps["slca_seqft"] == steps["slca_no_ca"] > 0, steps
    assert steps["slca"] - steps["slca_no_ca"] == 2 * (6 + 8 + 10), steps
    assert [sorted(h["phases"]) for h in out["slca"][0]["history"]] == [[], ["align"], ["align"], ["align"]]
    assert all(not h["phases"] for h in out["slca_no_ca"][0]["history"] + out["slca_seqft"][0]["history"])
    slca, seqft, no_ca = (out[m][1] for m in ("slca", "slca_seqft", "slca_no_ca"))
    # task 0: no alignment yet, so slca and slca_no_ca are the same run; Seq FT's fast backbone differs
    assert np.array_equal(slca["logits_task0"], no_ca["logits_task0"])
    assert not np.array_equal(slca["logits_task0"], seqft["logits_task0"])
    # later tasks: the alignment changes slca's head only
    assert not np.array_equal(slca["logits_task3"], no_ca["logits_task3"])
