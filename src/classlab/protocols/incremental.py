"""The class-incremental protocol (FACIL-style template method).

The protocol owns the scenario, the loop over tasks, the exemplar memory and evaluation; a
method (an ``IncrementalLearner``) says only what differs:

- ``begin_task(t, new_classes, seen_classes)``: grow heads or branches, freeze an old model;
- ``training_indices(task, seen, memory)``: which train samples this task trains on
  (default: the task's samples, plus the memory if ``uses_memory``);
- ``training_step(batch)``: the loss of one batch (the engine's loop runs it);
- ``end_task(t, context)``: prototypes, statistics, classifier alignment (the protocol has
  already updated the exemplar memory with this task's classes);
- ``predict(x)``: logits over all classes (the protocol masks classes not yet seen).

Everything a learner keeps across tasks is a submodule or buffer allocated for all
``num_classes`` up front, so that one ``state_dict`` per task checkpoints it and a resumed run
(task checkpoints, then the engine's epoch checkpoint) ends where an uninterrupted one does.
"""
from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from classlab.config import resolve_hparams
from classlab.data.prepare import load_prepared
from classlab.data.scenarios import ClassIncrementalScenario, ScenarioError
from classlab.engine import Trainer, TrainConfig, load_checkpoint, predict_logits, save_checkpoint
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.io import atomic_path, write_json
from classlab.methods.learner import IncrementalLearner, TaskContext, class_means  # noqa: F401
from classlab.methods.registry import get_method
from classlab.models import build_classifier
from classlab.protocols.memory import ExemplarMemory


def _first_task_epochs(hparams: dict, task_id: int) -> dict:
    hp = dict(hparams)
    if task_id == 0 and hp.get("first_task_epochs"):
        hp["epochs"] = hp["first_task_epochs"]
    if task_id > 0 and hp.get("lr_incremental"):
        hp["lr"] = hp["lr_incremental"]
    return hp


def resolve_learner(method: str, kind: str, backbone: str, overrides: dict | None):
    """Hyperparameters and class of ``method`` for a protocol of ``kind`` on ``backbone``; refuses a
    method that does not run on that protocol or that pins another backbone."""
    hparams = resolve_hparams("incremental", method, overrides)
    learner_cls = get_method("incremental", method)
    if kind not in learner_cls.scenario_kinds:
        raise ScenarioError(f"scenario.kind: {method} runs on {list(learner_cls.scenario_kinds)}, not {kind!r}")
    if hparams.get("backbone") and hparams["backbone"] != backbone:
        raise ScenarioError(f"backbone: {method} pins backbone {hparams['backbone']!r}, got {backbone!r}")
    return hparams, learner_cls


def validate_run(scenario: ClassIncrementalScenario, learner_cls, hparams: dict) -> None:
    """Reject what does not fit before anything is written."""
    if scenario.kind not in learner_cls.scenario_kinds:
        raise ScenarioError(f"scenario.kind: {learner_cls.name} runs on {list(learner_cls.scenario_kinds)}, "
                            f"not {scenario.kind!r}")
    budget = int(hparams.get("memory_size", 0))
    if learner_cls.uses_memory and budget < scenario.num_classes:
        raise ScenarioError(f"memory_size: {budget} exemplars is below one per class for {scenario.num_classes} "
                            f"classes; use at least {scenario.num_classes}")


def run_incremental(method: str, data_dir: Path, scenario_path: Path, backbone: str, seed: int, ckpt_dir: Path,
                    eval_dir: Path, overrides: dict | None = None, init: Path | None = None,
                    backbone_kwargs: dict | None = None, threads: int | None = None, device: str | None = None,
                    progress: bool = True) -> dict:
    """Train ``method`` through the scenario; after each task save test predictions on the seen classes.

    Writes ``ckpt_dir/task<t>.pt`` after each task (resume points), ``ckpt_dir/model.pt`` at the
    end, and ``eval_dir/predictions.npz`` (per task: logits and labels of the seen classes' test
    samples; for online scenarios also the anytime accuracy curve).
    """
    set_threads(threads)
    seed_everything(seed)
    scenario = ClassIncrementalScenario.load(scenario_path)
    hparams = resolve_hparams("incremental", method, overrides)
    learner_cls = get_method("incremental", method)
    validate_run(scenario, learner_cls, hparams)
    data = load_prepared(data_dir)
    manifest = data.manifest
    mean, std = manifest["channel_mean"], manifest["channel_std"]
    dev = pick_device(device)
    ckpt_dir, eval_dir = Path(ckpt_dir), Path(eval_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    model = build_classifier(backbone, int(manifest["shape"][0]), scenario.num_classes,
                             img_size=int(manifest["shape"][1]), backbone_kwargs=backbone_kwargs or {})
    init_meta = {}
    if init is not None:
        from classlab.train import load_model

        source, init_meta = load_model(init)
        model.backbone.load_state_dict(source.backbone.state_dict())
    learner = learner_cls(model, hparams, scenario.num_classes).to(dev)
    learner.scenario_kind = scenario.kind  # some methods behave differently per protocol (base sessions)
    memory = ExemplarMemory(int(hparams.get("memory_size", 0)), hparams.get("memory_strategy", "herding"), seed) \
        if learner_cls.uses_memory else None

    def features_of(indices: torch.Tensor, fn) -> torch.Tensor:
        learner.eval()
        loader_x = data.train.x[indices]
        return predict_logits(_Fn(fn), loader_x, mean, std, dev).float()

    test_y = data.test.y
    outputs: dict[str, np.ndarray] = {}
    history, seen_indices = [], torch.zeros(0, dtype=torch.long)
    start = 0
    for t, task in enumerate(scenario.tasks):  # resume: replay structure, then load the last task checkpoint
        if (ckpt_dir / f"task{t}.pt").exists():
            start = t + 1
    for t in range(start):
        task = scenario.tasks[t]
        learner.begin_task(t, task.classes, task.test_classes)
    if start:
        state = load_checkpoint(ckpt_dir / f"task{start - 1}.pt", map_location=dev)
        learner.load_state_dict(state["learner"])
        if memory is not None:
            memory.load_state_dict(state["memory"])
        history = list(state["history"])
        outputs = {k: v.numpy() for k, v in state["outputs"].items()}
        for t in range(start):
            seen_indices = torch.cat([seen_indices, torch.tensor(scenario.tasks[t].train_indices, dtype=torch.long)])

    for t in range(start, scenario.num_tasks):
        task = scenario.tasks[t]
        t0 = time.perf_counter()
        task_idx = torch.tensor(task.train_indices, dtype=torch.long)
        seen_indices = torch.cat([seen_indices, task_idx])
        learner.begin_task(t, task.classes, task.test_classes)
        mem_idx = memory.indices if memory is not None else torch.zeros(0, dtype=torch.long)
        train_idx = learner.training_indices(task_idx, seen_indices, mem_idx)
        hp_t = _first_task_epochs(hparams, t)
        learner.hparams = hp_t
        trainer = Trainer(learner, TrainConfig.from_hparams(hp_t), dev, seed * 1000 + t, ckpt_dir / f"task{t}_last.pt",
                          progress)
        anytime = []
        if scenario.kind == "si_blurry":
            # online: one pass over the stream in its order; evaluate every `eval_period` samples
            period = int(hparams.get("eval_period", 1000))
            optimizer = learner.configure_optimizer()
            for lo in range(0, len(train_idx), period):
                chunk = train_idx[lo:lo + period]
                trainer.checkpoint = None
                loader = trainer.make_loader(data.train.x, data.train.y, mean, std, chunk, shuffle=False, drop_last=False)
                trainer.fit(loader, optimizer)
                acc = _seen_accuracy(learner, data, scenario.test_mask(test_y, task.test_classes), mean, std, dev)
                anytime.append([int(lo + len(chunk)), acc])
        elif len(train_idx):
            loader = trainer.make_loader(data.train.x, data.train.y, mean, std, train_idx)
            trainer.fit(loader)
        context = TaskContext(t, task.classes, task.test_classes, data.train.x, data.train.y, task_idx, memory,
                              lambda idx: features_of(idx, learner.features),
                              lambda idx: features_of(idx, learner.predict), dev, mean, std)
        if memory is not None:  # before end_task, so that it sees this task's exemplars
            new = {c: task_idx[data.train.y[task_idx] == c] for c in task.classes}
            memory.update(new, context.embed)
        learner.end_task(t, context)

        # evaluate on the test samples of every class seen so far
        test_mask = scenario.test_mask(test_y, task.test_classes)
        learner.eval()
        logits = predict_logits(_Fn(learner.predict), data.test.x[test_mask], mean, std, dev)
        logits = logits.masked_fill(~learner.seen_mask.cpu(), float("-inf"))
        outputs[f"logits_task{t}"] = logits.numpy().astype(np.float32)
        outputs[f"labels_task{t}"] = test_y[test_mask].numpy()
        if anytime:
            outputs[f"anytime_task{t}"] = np.array(anytime, dtype=np.float64)
        history.append({"task": t, "classes": task.classes, "train_samples": int(len(train_idx)),
                        "memory": int(len(memory)) if memory is not None else 0,
                        "seconds": time.perf_counter() - t0,
                        "images_per_s": float(len(train_idx) * trainer.config.epochs / max(time.perf_counter() - t0, 1e-9)),
                        "epochs": trainer.history})
        save_checkpoint({"learner": learner.state_dict(), "memory": memory.state_dict() if memory else {},
                         "history": history, "outputs": {k: torch.from_numpy(np.ascontiguousarray(v))
                                                         for k, v in outputs.items()}}, ckpt_dir / f"task{t}.pt")
        (ckpt_dir / f"task{t}_last.pt").unlink(missing_ok=True)

    meta = {"method": method, "family": "incremental", "seed": seed, "backbone": backbone,
            "dataset": scenario.dataset, "scenario": scenario.params.get("name", scenario.kind),
            "scenario_kind": scenario.kind, "hparams": json.dumps(hparams, sort_keys=True),
            "init": str(init) if init else "", "init_kind": _describe_init(init_meta),
            "class_order": scenario.class_order, "class_order_seed": scenario.class_order_seed}
    eval_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(eval_dir / "predictions.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **outputs)
    write_json(ckpt_dir / "history.json", {"meta": meta, "tasks": history})
    save_checkpoint({"learner": learner.state_dict(), "meta": {k: v for k, v in meta.items()}}, ckpt_dir / "model.pt")
    for t in range(scenario.num_tasks):
        (ckpt_dir / f"task{t}.pt").unlink(missing_ok=True)
    return {"history": history, "meta": meta}


def _describe_init(init_meta: dict, all_classes_expected: bool = False) -> str:
    """How the backbone was initialised, for the report: which labels it may have seen. The
    forgetting protocol starts from a model of all classes by design (``all_classes_expected``);
    elsewhere that means later tasks' labels were seen, and the report says so."""
    if not init_meta:
        return "scratch"
    classes = json.loads(init_meta.get("hparams", "{}")).get("classes") or []
    seen = f"classes {sorted(classes)} only" if classes else \
        "all classes" if all_classes_expected else "ALL classes (later tasks' labels seen)"
    return f"{init_meta.get('family', '')}/{init_meta.get('method', '')} pretraining on {seen}"


class _Fn(torch.nn.Module):
    """Wrap a bound method as a module for ``predict_logits`` (which calls ``.eval().to()``)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _seen_accuracy(learner, data, mask: torch.Tensor, mean, std, device) -> float:
    learner.eval()
    logits = predict_logits(_Fn(learner.predict), data.test.x[mask], mean, std, device)
    logits = logits.masked_fill(~learner.seen_mask.cpu(), float("-inf"))
    learner.train()
    return float((logits.argmax(1) == data.test.y[mask]).float().mean())
