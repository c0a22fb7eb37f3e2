"""The continual-forgetting protocol (Zhao et al., "Continual Forgetting for Pre-trained Vision
Models", CVPR 2024).

A model trained on all classes (``init``: a ``model.pt`` written by ``classlab train``)
receives a sequence of forgetting tasks; task t names the classes C_t to forget. In task t the
learner trains on every training sample of C_t (or ``forget_per_class`` of each) plus a fixed
replay of ``retain_per_class`` samples of each class not forgotten so far; its
``training_step`` tells the two apart by label. After each task the whole test set is
predicted and scored:

- ``forgotten_accuracy``: accuracy on the test samples of C_1 u ... u C_t (goal: near 0 / chance);
- ``retained_accuracy``: accuracy on the other classes (goal: the original model's);
- ``original_*``: the same accuracies of the model before any forgetting;
- ``h_mean``: the paper's harmonic mean of the forgotten-accuracy drop and the retained accuracy,
  H = 2 (A_f^o - A_f) A_r / ((A_f^o - A_f) + A_r).

The learner is an ``IncrementalLearner`` whose ``scenario_kinds`` holds ``continual_forgetting``.
Hooks: ``begin_task(t, forget_classes, all_classes)``, ``training_indices(forget, retained, replay)``,
optional ``prepare_task(t, context)`` (before training, e.g. prototypes), ``training_step``,
``end_task(t, context)``, ``predict``; optional ``merged_state_dict()`` gives the plain
``Classifier`` weights written to ``model.pt`` (else ``model.state_dict()``).

Resume: ``ckpt_dir/task<t>.pt`` after each task, the engine's epoch checkpoint within one;
a rerun replays ``begin_task`` for completed tasks, loads the last task checkpoint and goes on.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from classlab.data.prepare import load_prepared
from classlab.data.scenarios import ScenarioError, validate_forget_tasks  # noqa: F401  (re-exported)
from classlab.engine import Trainer, TrainConfig, load_checkpoint, predict_logits, save_checkpoint
from classlab.engine.device import pick_device, seed_everything, set_threads
from classlab.io import atomic_path, write_json
from classlab.protocols.incremental import TaskContext, _describe_init, _Fn, resolve_learner

KIND = "continual_forgetting"


def class_subset(labels: torch.Tensor, classes, per_class: int, seed: int) -> torch.Tensor:
    """Train indices of ``classes``: a fixed random ``per_class`` of each (0: all), by class."""
    out = []
    for c in sorted(int(c) for c in classes):
        idx = torch.nonzero(labels == c).flatten()
        if per_class > 0:
            gen = torch.Generator().manual_seed(seed * 7919 + c)  # the same subset in every task
            idx = idx[torch.randperm(len(idx), generator=gen)[:per_class]].sort().values
        out.append(idx)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def _acc(pred: np.ndarray, labels: np.ndarray, mask: np.ndarray) -> float:
    return float((pred[mask] == labels[mask]).mean()) if mask.any() else float("nan")


def summarize_forgetting(original_logits: np.ndarray, task_logits: list[np.ndarray], labels: np.ndarray,
                         forget_tasks: list[list[int]], num_classes: int) -> dict:
    """Per task and final: forgotten / retained accuracy (sample-weighted) after the task, the
    original model's on the same split, the current task's classes alone, and the H-mean."""
    pred0 = original_logits.argmax(1)
    tasks, forgotten = [], []
    for t, logits in enumerate(task_logits):
        pred = logits.argmax(1)
        forgotten += forget_tasks[t]
        fmask = np.isin(labels, forgotten)
        cmask = np.isin(labels, forget_tasks[t])
        row = {"task": t, "forget_classes": forget_tasks[t], "forgotten_classes": sorted(forgotten),
               "forgotten_accuracy": _acc(pred, labels, fmask), "retained_accuracy": _acc(pred, labels, ~fmask),
               "current_forgotten_accuracy": _acc(pred, labels, cmask),
               "original_forgotten_accuracy": _acc(pred0, labels, fmask),
               "original_retained_accuracy": _acc(pred0, labels, ~fmask)}
        drop = row["original_forgotten_accuracy"] - row["forgotten_accuracy"]
        # H = 2 * drop * A_r / (drop + A_r)
        row["h_mean"] = float(2 * drop * row["retained_accuracy"] / (drop + row["retained_accuracy"])) \
            if drop + row["retained_accuracy"] > 0 else 0.0
        tasks.append(row)
    last = tasks[-1]
    out = {k: last[k] for k in ("forgotten_accuracy", "retained_accuracy", "original_forgotten_accuracy",
                                "original_retained_accuracy", "h_mean")}
    out["retained_drop"] = last["original_retained_accuracy"] - last["retained_accuracy"]
    out.update({"tasks": tasks, "num_tasks": len(tasks), "chance": 1.0 / num_classes,
                "original_accuracy": _acc(pred0, labels, np.ones(len(labels), bool))})
    return out


def run_continual_forgetting(method: str, data_dir: Path, backbone: str, seed: int, ckpt_dir: Path, eval_dir: Path,
                             init: Path, overrides: dict | None = None, forget_tasks: list[list[int]] | None = None,
                             backbone_kwargs: dict | None = None, threads: int | None = None,
                             device: str | None = None, progress: bool = True) -> dict:
    """Forget ``forget_tasks`` in turn from the all-class model ``init``.

    Writes ``ckpt_dir/task<t>.pt`` after each task (resume points, removed at the end),
    ``ckpt_dir/model.pt`` (the final model in ``classlab train``'s format, so ``classlab
    evaluate`` and ``load_model`` read it), ``ckpt_dir/history.json``,
    ``eval_dir/predictions.npz`` (``labels``, ``logits_original``, ``logits_task<t>`` on the
    whole test set, ``forget_task<t>``) and ``eval_dir/metrics.json`` (``summarize_forgetting``).
    """
    from classlab.train import load_model

    set_threads(threads)
    seed_everything(seed)
    hparams, learner_cls = resolve_learner(method, KIND, backbone, overrides)
    if init is None:
        raise ValueError("continual forgetting starts from a model trained on all classes: give init (a model.pt)")
    data = load_prepared(data_dir)
    manifest = data.manifest
    num_classes = data.num_classes
    forget_tasks = validate_forget_tasks(forget_tasks, num_classes)
    mean, std = manifest["channel_mean"], manifest["channel_std"]
    dev = pick_device(device)
    ckpt_dir, eval_dir = Path(ckpt_dir), Path(eval_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    model, init_meta = load_model(init)
    if init_meta["backbone"] != backbone:
        raise ValueError(f"init checkpoint {init} holds a {init_meta['backbone']} backbone, not {backbone}")
    if backbone_kwargs and dict(backbone_kwargs) != dict(init_meta.get("backbone_kwargs") or {}):
        raise ValueError(f"backbone_kwargs {backbone_kwargs} differ from the init checkpoint's "
                         f"{init_meta.get('backbone_kwargs')}")
    if int(init_meta["num_classes"]) != num_classes or init_meta.get("dataset") != manifest["dataset"]:
        raise ValueError(f"init checkpoint {init} was trained on {init_meta.get('dataset')} with "
                         f"{init_meta['num_classes']} classes, not {manifest['dataset']} with {num_classes}")
    test_y = data.test.y
    original_logits = predict_logits(model, data.test.x, mean, std, dev)
    learner = learner_cls(model, hparams, num_classes).to(dev)
    per_retain, per_forget = int(hparams.get("retain_per_class", 0)), int(hparams.get("forget_per_class", 0))

    def features_of(indices: torch.Tensor, fn) -> torch.Tensor:
        learner.eval()
        return predict_logits(_Fn(fn), data.train.x[indices], mean, std, dev).float()

    all_classes = list(range(num_classes))
    outputs: dict[str, np.ndarray] = {"labels": test_y.numpy(), "logits_original": original_logits.numpy()}
    history: list[dict] = []
    start = sum(1 for t in range(len(forget_tasks)) if (ckpt_dir / f"task{t}.pt").exists())
    for t in range(start):  # resume: replay the structure, then load the last task checkpoint
        torch.manual_seed(seed * 7919 + t)  # begin_task may draw fresh adapters: same draws on resume
        learner.begin_task(t, forget_tasks[t], all_classes)
    if start:
        state = load_checkpoint(ckpt_dir / f"task{start - 1}.pt", map_location=dev)
        learner.load_state_dict(state["learner"])
        history = list(state["history"])
        outputs = {k: v.numpy() for k, v in state["outputs"].items()}

    for t in range(start, len(forget_tasks)):
        t0 = time.perf_counter()
        forgotten = [c for task in forget_tasks[:t + 1] for c in task]
        retained = [c for c in all_classes if c not in forgotten]
        forget_idx = class_subset(data.train.y, forget_tasks[t], per_forget, seed)
        retained_idx = class_subset(data.train.y, retained, 0, seed)
        replay_idx = class_subset(data.train.y, retained, per_retain, seed)
        torch.manual_seed(seed * 7919 + t)
        learner.begin_task(t, forget_tasks[t], all_classes)
        train_idx = learner.training_indices(forget_idx, retained_idx, replay_idx)
        context = TaskContext(t, forget_tasks[t], retained, data.train.x, data.train.y, train_idx, None,
                              lambda idx: features_of(idx, learner.features),
                              lambda idx: features_of(idx, learner.predict), dev)
        if hasattr(learner, "prepare_task"):
            learner.prepare_task(t, context)
        learner.hparams = dict(hparams)
        trainer = Trainer(learner, TrainConfig.from_hparams(hparams), dev, seed * 1000 + t,
                          ckpt_dir / f"task{t}_last.pt", progress)
        if len(train_idx):
            trainer.fit(trainer.make_loader(data.train.x, data.train.y, mean, std, train_idx))
        learner.end_task(t, context)

        learner.eval()
        logits = predict_logits(_Fn(learner.predict), data.test.x, mean, std, dev)
        outputs[f"logits_task{t}"] = logits.numpy().astype(np.float32)
        outputs[f"forget_task{t}"] = np.array(forget_tasks[t], dtype=np.int64)
        seconds = time.perf_counter() - t0
        history.append({"task": t, "forget_classes": forget_tasks[t], "train_samples": int(len(train_idx)),
                        "forget_samples": int(len(forget_idx)), "replay_samples": int(len(replay_idx)),
                        "seconds": seconds,
                        "images_per_s": float(len(train_idx) * trainer.config.epochs / max(seconds, 1e-9)),
                        "epochs": trainer.history})
        save_checkpoint({"learner": learner.state_dict(), "history": history,
                         "outputs": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in outputs.items()}},
                        ckpt_dir / f"task{t}.pt")
        (ckpt_dir / f"task{t}_last.pt").unlink(missing_ok=True)

    metrics = summarize_forgetting(outputs["logits_original"], [outputs[f"logits_task{t}"]
                                   for t in range(len(forget_tasks))], outputs["labels"], forget_tasks, num_classes)
    meta = {"method": method, "family": "incremental", "seed": seed, "backbone": backbone,
            "dataset": manifest["dataset"], "scenario": KIND, "scenario_kind": KIND,
            "hparams": json.dumps(hparams, sort_keys=True), "init": str(init), "init_kind": _describe_init(init_meta, all_classes_expected=True),
            "forget_tasks": forget_tasks}
    metrics.update({k: meta[k] for k in ("dataset", "method", "seed", "backbone", "scenario", "scenario_kind",
                                         "init", "init_kind", "forget_tasks")})
    eval_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(eval_dir / "predictions.npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **outputs)
    write_json(eval_dir / "metrics.json", metrics)
    write_json(ckpt_dir / "history.json", {"meta": meta, "tasks": history})
    weights = learner.merged_state_dict() if hasattr(learner, "merged_state_dict") else learner.model.state_dict()
    model_meta = {**init_meta, "family": "incremental", "method": method, "seed": seed, "init": str(init),
                  "hparams": meta["hparams"], "forget_tasks": forget_tasks}
    save_checkpoint({"model": {k: v.detach().cpu() for k, v in weights.items()}, "meta": model_meta},
                    ckpt_dir / "model.pt")
    for t in range(len(forget_tasks)):
        (ckpt_dir / f"task{t}.pt").unlink(missing_ok=True)
    return {"history": history, "meta": meta, "metrics": metrics}
