"""Tasks made of several phases (issue 7): every phase runs through the engine and is
checkpointed, so a job killed in a later phase resumes there and ends bit-identical.

A toy learner (train, then a head-only "align" phase on the task's features) is killed in its
align phase and resumed through ``run_incremental``; then the two methods whose end-of-task
loops became phases: SLCA's classifier alignment ("align") and OVOR's virtual outlier
regularization ("vor").
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from classlab.config import resolve_hparams
from classlab.data.loader import MixedLoader, TensorLoader
from classlab.engine import Trainer, TrainConfig, load_checkpoint
from classlab.methods.incremental import ovor as ovor_module
from classlab.methods.incremental.ovor import OVOR
from classlab.methods.incremental.slca import SLCA, gaussian_statistics
from classlab.methods.learner import IncrementalLearner, TaskContext
from classlab.models import build_classifier

from tests.shared_data import SHARED  # noqa: E402  (built by conftest before the tests run)

DIGITS = SHARED / "prepared" / "digits"
B4INC2 = SHARED / "scenarios" / "digits_b4inc2.json"
TINY_CONVNET = {"widths": [8, 16], "pool_after": [0]}
needs_shared = pytest.mark.incremental_e2e  # shared inputs are built by conftest; never skipped


def run_phase(learner, phase: str, context: TaskContext, seed: int = 0) -> Trainer:
    """One phase after "train", as the protocol runs it: the phase's hyperparameters over the
    learner's, a Trainer, the learner's own loader (the protocol leaves the phase's hparams set)."""
    hp = {**learner.hparams, **learner.phase_hparams(phase)}
    learner.phase, learner.hparams = phase, hp
    trainer = Trainer(learner, TrainConfig.from_hparams(hp), torch.device("cpu"), seed, None, progress=False)
    loader = learner.phase_loader(phase, context, trainer)
    if loader is not None and len(loader):
        trainer.fit(loader)
    learner.phase = "train"
    return trainer


def run_task_phases(learner, task_id: int, context: TaskContext, seed: int = 0) -> dict:
    """Every phase of a task after "train" (the protocol's loop), then ``end_task``."""
    trainers = {p: run_phase(learner, p, context, seed) for p in learner.task_phases(task_id) if p != "train"}
    learner.end_task(task_id, context)
    return trainers


def feature_context(learner, task_id, new, seen, x, y) -> TaskContext:
    """A TaskContext whose ``embed`` is the learner's features in eval mode (as the protocol's)."""
    def embed(idx):
        learner.eval()
        with torch.no_grad():
            return learner.features(x[idx]).float()

    return TaskContext(task_id, new, seen, x, y, torch.arange(len(y)), None, embed,
                       lambda idx: learner.predict(x[idx]), torch.device("cpu"))


def _run(method, tmp: Path, overrides, backbone="convnet", backbone_kwargs=None, scenario=B4INC2, init=None):
    from classlab.protocols.incremental import run_incremental

    out = run_incremental(method, DIGITS, scenario, backbone, 0, tmp / "ck", tmp / "ev", overrides=overrides,
                          init=init, backbone_kwargs=backbone_kwargs or TINY_CONVNET, threads=1, progress=False)
    preds = dict(np.load(tmp / "ev" / "predictions.npz"))
    state = load_checkpoint(tmp / "ck" / "model.pt")["learner"]
    return out, preds, state


def _assert_same_run(a, b):
    (out_a, preds_a, state_a), (out_b, preds_b, state_b) = a, b
    assert preds_a.keys() == preds_b.keys() and state_a.keys() == state_b.keys()
    for key in preds_a:
        assert np.array_equal(preds_a[key], preds_b[key]), key
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert out_a["meta"]["train_steps"] == out_b["meta"]["train_steps"]


def _recorder(monkeypatch, cls, log: list) -> None:
    """Record (task, phase, global step) of every optimizer step of ``cls``."""
    original = cls.on_after_step

    def record(self, batch, logs):
        log.append((self.task_id, self.phase, int(self.global_step)))
        return original(self, batch, logs)

    monkeypatch.setattr(cls, "on_after_step", record)


def _kill_at(monkeypatch, cls, task: int, phase: str, step: int) -> list:
    """``training_step`` raises KeyboardInterrupt once, at ``step`` of ``phase`` in ``task``."""
    original, killed = cls.training_step, []

    def training_step(self, batch):
        if self.task_id == task and self.phase == phase and self.global_step == step and not killed:
            killed.append(step)
            raise KeyboardInterrupt("simulated kill")
        return original(self, batch)

    monkeypatch.setattr(cls, "training_step", training_step)
    return killed


# --- the mechanism, on a toy two-phase learner ------------------------------------------------
class TwoPhase(IncrementalLearner):
    """Fine-tuning, then (tasks > 0) two epochs of head-only training on the task's features."""

    scenario_kinds = ("class_incremental",)
    ALIGN = {"epochs": 2, "lr": 0.05, "batch_size": 32, "schedule": "cosine", "warmup_frac": 0.0,
             "optimizer": "momentum", "augment_pad": 0, "augment_hflip": False}

    def task_phases(self, task_id):
        return ["train", "align"] if task_id > 0 else ["train"]

    def phase_hparams(self, phase):
        return dict(self.ALIGN) if phase == "align" else {}

    def phase_loader(self, phase, context, trainer):
        feats = context.embed(context.task_indices)
        return TensorLoader(feats, context.train_y[context.task_indices], trainer.config.batch_size,
                            device=trainer.device, mean=None, std=None, shuffle=True, seed=trainer.seed)

    def param_groups(self):
        if self.phase == "align":
            return [{"params": list(self.model.head.parameters())}]
        return super().param_groups()

    def training_step(self, batch):
        if self.phase == "align":
            logits = self.mask_unseen(self.model.head(batch["x"]))
            return F.cross_entropy(logits, batch["y"]), {"logits": logits.detach()}
        return super().training_step(batch)


def _two_phase(monkeypatch):
    from classlab.protocols import runner

    def resolve(method, kind, backbone, overrides, family="incremental"):
        return resolve_hparams("incremental", "finetune", overrides), TwoPhase

    monkeypatch.setattr(runner, "resolve_learner", resolve)


@needs_shared
@pytest.mark.parametrize("kill_epoch", [0, 1])
def test_a_job_killed_in_the_align_phase_resumes_there_and_ends_bit_identical(tmp_path, monkeypatch, kill_epoch):
    _two_phase(monkeypatch)
    overrides = {"epochs": 1}
    reference = _run("finetune", tmp_path / "full", overrides)
    assert [sorted(h["phases"]) for h in reference[0]["history"]] == [[], ["align"], ["align"], ["align"]]
    assert all(len(h["phases"]["align"]) == 2 for h in reference[0]["history"][1:])  # two align epochs

    steps_per_epoch = math.ceil(len(json.loads(B4INC2.read_text())["tasks"][1]["train_indices"]) / 32)
    kill_step = kill_epoch * steps_per_epoch  # the align phase's first step, or the first of its second epoch
    killed = _kill_at(monkeypatch, TwoPhase, 1, "align", kill_step)
    with pytest.raises(KeyboardInterrupt):
        _run("finetune", tmp_path / "resumed", overrides)
    ck = tmp_path / "resumed" / "ck"
    assert killed == [kill_step]
    assert (ck / "task0.pt").exists() and (ck / "task1.phase.pt").exists() and not (ck / "task1.pt").exists()
    assert (ck / "task1.align_last.pt").exists() is (kill_epoch > 0)  # the align phase's own epoch checkpoint
    assert not (ck / "task1_last.pt").exists()  # the train phase's gave way to the phase checkpoint
    assert load_checkpoint(ck / "task1.phase.pt")["phase"] == 0

    steps: list = []
    _recorder(monkeypatch, TwoPhase, steps)
    resumed = _run("finetune", tmp_path / "resumed", overrides)
    assert not [s for s in steps if s[0] == 0] and not [s for s in steps if s[:2] == (1, "train")]
    # the align phase goes on from its last checkpoint: the start of the phase or of its second epoch
    assert [s[2] for s in steps if s[:2] == (1, "align")] == list(range(kill_step, 2 * steps_per_epoch))
    assert {s[:2] for s in steps} == {(1, "align"), (2, "train"), (2, "align"), (3, "train"), (3, "align")}
    _assert_same_run(reference, resumed)
    assert not list(ck.glob("task*.pt"))  # resume files removed at the end


# --- SLCA: classifier alignment as the "align" phase --------------------------------------------
def _bn_convnet(num_classes=4):
    torch.manual_seed(0)
    return build_classifier("convnet", 1, num_classes, img_size=8, backbone_kwargs={"widths": [4, 8], "pool_after": [0]})


def _images(classes, n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat(n // len(classes))
    x = torch.rand(len(y), 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float()  # classes differ in brightness
    return x, y


def _train(learner, x, y, seed):
    trainer = Trainer(learner, TrainConfig(epochs=2, batch_size=16, schedule="constant", warmup_frac=0.0),
                      torch.device("cpu"), seed, None, progress=False)
    trainer.fit(TensorLoader(x, y, 16, device=torch.device("cpu"), shuffle=True, seed=seed))


def test_slca_align_phase_trains_only_the_head_and_never_runs_the_backbone(monkeypatch):
    hp = {**resolve_hparams("incremental", "slca", {}), "freeze_bn_stats": False,  # BN would move if the backbone ran
          "ca_epochs": 3, "ca_samples_per_class": 20, "ca_batch_size": 16, "ca_lr": 0.05}
    learner = SLCA(_bn_convnet(), hp, 4)
    stored = []
    original = SLCA.store_statistics
    monkeypatch.setattr(SLCA, "store_statistics", lambda self, ctx: (stored.append(ctx.task_id), original(self, ctx)))

    learner.begin_task(0, [0, 1], [0, 1])
    assert learner.task_phases(0) == ["train"]  # nothing to align after the first task
    x0, y0 = _images([0, 1], 32, seed=1)
    _train(learner, x0, y0, seed=1)
    assert run_task_phases(learner, 0, feature_context(learner, 0, [0, 1], [0, 1], x0, y0)) == {}
    assert stored == [0]  # task 0: the statistics come from end_task

    learner.begin_task(1, [2, 3], [0, 1, 2, 3])
    assert learner.task_phases(1) == ["train", "align"]
    x1, y1 = _images([2, 3], 32, seed=2)
    _train(learner, x1, y1, seed=2)
    backbone = copy.deepcopy(learner.model.backbone.state_dict())  # weights and BN running statistics
    head = copy.deepcopy(learner.model.head.state_dict())
    ctx = feature_context(learner, 1, [2, 3], [0, 1, 2, 3], x1, y1)
    calls = []
    hook = learner.model.backbone.register_forward_hook(lambda *args: calls.append(learner.model.backbone.training))
    trainer = run_phase(learner, "align", ctx)
    hook.remove()
    assert calls == [False]  # one forward, in eval mode: the features of the loader's statistics; none in the fit
    for k, v in backbone.items():
        assert torch.equal(v, learner.model.backbone.state_dict()[k]), f"backbone tensor {k} moved in the align phase"
    assert any(not torch.equal(v, learner.model.head.state_dict()[k]) for k, v in head.items())
    # one epoch of ca_epochs x ca_samples_per_class draws per seen class, SGD with momentum on the head only
    assert trainer.steps_done == math.ceil(4 * 3 * 20 / 16) and len(trainer.history) == 1
    (group,) = trainer.optimizer.param_groups
    assert {id(p) for p in group["params"]} == {id(p) for p in learner.model.head.parameters()}
    assert isinstance(trainer.optimizer, torch.optim.SGD) and group["momentum"] == hp["momentum"]
    assert not group["nesterov"] and group["base_lr"] == pytest.approx(0.05)
    feats = ctx.embed(ctx.task_indices)
    for c in (2, 3):
        mu, cov = gaussian_statistics(feats[y1 == c], hp["cov_eps"])
        assert torch.allclose(learner.class_means[c], mu) and torch.allclose(learner.class_covs[c], cov)
    learner.end_task(1, ctx)
    assert stored == [0, 1]  # the align phase's loader stored task 1's statistics; end_task did not again


@needs_shared
def test_slca_killed_inside_its_align_phase_resumes_mid_epoch_and_ends_bit_identical(tmp_path, monkeypatch):
    overrides = {"epochs": 1, "ca_epochs": 2, "ca_samples_per_class": 32, "ca_batch_size": 16}
    reference = _run("slca", tmp_path / "full", overrides)
    assert [sorted(h["phases"]) for h in reference[0]["history"]] == [[], ["align"], ["align"], ["align"]]
    monkeypatch.setenv("CLASSLAB_CHECKPOINT_EVERY_STEPS", "3")  # mid-epoch checkpoints in the one align epoch
    killed = _kill_at(monkeypatch, SLCA, 2, "align", 7)
    with pytest.raises(KeyboardInterrupt):
        _run("slca", tmp_path / "resumed", overrides)
    ck = tmp_path / "resumed" / "ck"
    assert killed == [7] and (ck / "task2.phase.pt").exists() and (ck / "task2.align_last.pt").exists()
    steps: list = []
    _recorder(monkeypatch, SLCA, steps)
    resumed = _run("slca", tmp_path / "resumed", overrides)
    # 8 seen classes x 64 draws / 16 = 32 align steps; resumed after the checkpoint at step 6
    assert [s[2] for s in steps if s[:2] == (2, "align")] == list(range(6, 32))
    assert not [s for s in steps if s[0] < 2 or s[:2] == (2, "train")]
    _assert_same_run(reference, resumed)


# --- OVOR: virtual outlier regularization as the "vor" phase --------------------------------------
def _tiny_vit(depth=1):
    torch.manual_seed(0)
    return build_classifier("vit_tiny", 1, 6, img_size=8,
                            backbone_kwargs={"depth": depth, "embed_dim": 24, "num_heads": 2})


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_ovor_vor_phase_trains_the_head_through_the_engine_with_the_same_steps_for_any_lambda(lam, monkeypatch):
    hp = {**resolve_hparams("incremental", "ovor", {}), "vor_lambda": lam, "vor_epochs": 3, "vor_batch_size": 16,
          "vor_k": 5, "vor_select": 5, "vor_sample_from": 20, "vor_per_class": 10}
    model = _tiny_vit()
    learner = OVOR(model, hp, 6)
    learner.begin_task(0, [0, 1], [0, 1])
    assert learner.task_phases(0) == ["train", "vor"]
    synthesized = []
    original = ovor_module.synthesize_outliers
    monkeypatch.setattr(ovor_module, "synthesize_outliers",
                        lambda *a, **k: synthesized.append(1) or original(*a, **k))
    x, y = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.arange(40) % 2
    ctx = feature_context(learner, 0, [0, 1], [0, 1], x, y)
    frozen = {n: p.detach().clone() for n, p in learner.named_parameters() if not n.startswith("model.head")}
    head = copy.deepcopy(model.head.state_dict())
    batches = []
    original_step = OVOR.vor_step
    monkeypatch.setattr(OVOR, "vor_step", lambda self, b: (batches.append(b.get("source")), original_step(self, b))[1])
    trainer = run_phase(learner, "vor", ctx)
    assert trainer.steps_done == 3 * math.ceil(40 / 16) == len(batches)  # the same for lambda 0 and > 0
    assert synthesized == ([1] if lam > 0 else [])  # lambda 0 synthesises no outliers
    if lam > 0:  # each step: one batch of ID features and len(outliers) // steps-per-epoch outliers
        assert all(int((s == 1).sum()) == 20 // 3 for s in batches)
        assert [int((s == 0).sum()) for s in batches[:3]] == [16, 16, 8]
    else:
        assert all(s is None for s in batches)
    for n, p in learner.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"{n} moved in the vor phase"
    assert any(not torch.equal(v, model.head.state_dict()[k]) for k, v in head.items())
    (group,) = trainer.optimizer.param_groups
    assert isinstance(trainer.optimizer, torch.optim.Adam) and group["betas"] == (hp["momentum"], 0.999)
    assert {id(p) for p in group["params"]} == {id(p) for p in model.head.parameters()}


def _short_scenario(dest: Path, per_task: int) -> Path:
    doc = json.loads(B4INC2.read_text())
    for task in doc["tasks"]:
        task["train_indices"] = task["train_indices"][:per_task]
    dest.write_text(json.dumps(doc))
    return dest


@needs_shared
def test_ovor_vor_phase_runs_through_the_protocol_at_the_same_budget_and_resumes(tmp_path, monkeypatch):
    scenario = _short_scenario(tmp_path / "short.json", 48)
    vit = {"depth": 2, "embed_dim": 24, "num_heads": 2}
    base = {"epochs": 1, "vor_epochs": 2, "vor_batch_size": 16, "vor_k": 5, "vor_select": 5, "vor_sample_from": 20,
            "vor_per_class": 10}
    runs, steps = {}, {}
    for lam in (0.0, 0.1):
        log: list = []
        with monkeypatch.context() as m:
            _recorder(m, OVOR, log)
            runs[lam] = _run("ovor", tmp_path / f"lam{lam}", {**base, "vor_lambda": lam}, "vit_tiny", vit, scenario)
        steps[lam] = [(t, p) for t, p, _ in log]
        assert [sorted(h["phases"]) for h in runs[lam][0]["history"]] == [["vor"]] * 4
    assert steps[0.0] == steps[0.1]  # the same steps, phase by phase
    assert steps[0.1].count((0, "vor")) == 2 * math.ceil(48 / 16)
    assert runs[0.0][0]["meta"]["train_steps"] == runs[0.1][0]["meta"]["train_steps"] == len(steps[0.1])
    assert not np.array_equal(runs[0.0][1]["logits_task3"], runs[0.1][1]["logits_task3"])  # VOR changed the head
    # killed in the vor phase of task 1 (its second epoch), resumed: bit-identical
    killed = _kill_at(monkeypatch, OVOR, 1, "vor", 3)
    with pytest.raises(KeyboardInterrupt):
        _run("ovor", tmp_path / "resumed", {**base, "vor_lambda": 0.1}, "vit_tiny", vit, scenario)
    assert killed == [3] and (tmp_path / "resumed" / "ck" / "task1.vor_last.pt").exists()
    resumed = _run("ovor", tmp_path / "resumed", {**base, "vor_lambda": 0.1}, "vit_tiny", vit, scenario)
    _assert_same_run(runs[0.1], resumed)
