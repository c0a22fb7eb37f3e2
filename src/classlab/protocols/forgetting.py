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

Setup, checkpoints, resume and outputs are the shared runner's (``classlab.protocols.runner``).
A learner that defines ``training_sources(forget, retained, replay)`` (an ordered mapping of
source name -> train indices) trains on mixed batches: each step concatenates one batch from
every source (``batch["source"]`` holds each sample's source id), the first source defining the
epoch; ``<name>_batch_size`` hyperparameters size the sources (default ``batch_size``).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from classlab.data.prepare import load_prepared
from classlab.data.scenarios import ScenarioError, validate_forget_tasks  # noqa: F401  (re-exported)
from classlab.engine import predict_logits
from classlab.methods.learner import TaskContext
from classlab.io import write_json
from classlab.protocols.runner import ProtocolRun, describe_init

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


class ForgettingRun(ProtocolRun):
    kind = KIND

    def __init__(self, method, data_dir, backbone, seed, ckpt_dir, eval_dir, init, forget_tasks, **kwargs):
        if init is None:
            raise ValueError("continual forgetting starts from a model trained on all classes: give init (a model.pt)")
        super().__init__(method, data_dir, backbone, seed, ckpt_dir, eval_dir, init=init, **kwargs)
        self.forget_tasks_arg = forget_tasks

    @property
    def num_tasks(self) -> int:
        return len(self.forget_tasks)

    def fingerprint_parts(self) -> dict:
        return {"forget_tasks": self.forget_tasks}

    def setup(self) -> None:
        from classlab.train import load_model

        self.data = load_prepared(self.data_dir)
        self.manifest = self.data.manifest
        self.num_classes = self.data.num_classes
        self.forget_tasks = validate_forget_tasks(self.forget_tasks_arg, self.num_classes)
        self.mean, self.std = self.manifest["channel_mean"], self.manifest["channel_std"]
        model, self.init_meta = load_model(self.init)
        meta = self.init_meta
        if meta["backbone"] != self.backbone:
            raise ValueError(f"init checkpoint {self.init} holds a {meta['backbone']} backbone, not {self.backbone}")
        if self.backbone_kwargs and self.backbone_kwargs != dict(meta.get("backbone_kwargs") or {}):
            raise ValueError(f"backbone_kwargs {self.backbone_kwargs} differ from the init checkpoint's "
                             f"{meta.get('backbone_kwargs')}")
        if int(meta["num_classes"]) != self.num_classes or meta.get("dataset") != self.manifest["dataset"]:
            raise ValueError(f"init checkpoint {self.init} was trained on {meta.get('dataset')} with "
                             f"{meta['num_classes']} classes, not {self.manifest['dataset']} with {self.num_classes}")
        if not self.outputs:
            original = predict_logits(model, self.data.test.x, self.mean, self.std, self.device)
            self.outputs = {"labels": self.data.test.y.numpy(), "logits_original": original.numpy()}
        self.learner = self.learner_cls(model, self.hparams, self.num_classes).to(self.device)
        self.all_classes = list(range(self.num_classes))

    def begin_task(self, t: int) -> None:
        self.learner.begin_task(t, self.forget_tasks[t], self.all_classes)

    def _task_split(self, t: int):
        hp, y = self.hparams, self.data.train.y
        forgotten = [c for task in self.forget_tasks[:t + 1] for c in task]
        retained = [c for c in self.all_classes if c not in forgotten]
        forget_idx = class_subset(y, self.forget_tasks[t], int(hp.get("forget_per_class", 0)), self.seed)
        retained_idx = class_subset(y, retained, 0, self.seed)
        replay_idx = class_subset(y, retained, int(hp.get("retain_per_class", 0)), self.seed)
        return retained, forget_idx, retained_idx, replay_idx

    def train_loader(self, t: int, trainer):
        retained, forget_idx, retained_idx, replay_idx = self._task_split(t)
        self.task_counts = {"forget_samples": int(len(forget_idx)), "replay_samples": int(len(replay_idx))}
        x, y = self.data.train.x, self.data.train.y
        if hasattr(self.learner, "training_sources"):
            sources = self.learner.training_sources(forget_idx, retained_idx, replay_idx)
            self.task_train_samples = sum(len(v) for v in sources.values())
            if not len(next(iter(sources.values()))):
                return None
            sizes = {name: int(self.hparams.get(f"{name}_batch_size") or self.hparams["batch_size"])
                     for name in sources}
            return trainer.make_mixed_loader(x, y, self.mean, self.std, sources, sizes)
        train_idx = self.learner.training_indices(forget_idx, retained_idx, replay_idx)
        self.task_train_samples = len(train_idx)
        return trainer.make_loader(x, y, self.mean, self.std, train_idx) if len(train_idx) else None

    def context(self, t: int) -> TaskContext:
        retained, forget_idx, retained_idx, replay_idx = self._task_split(t)
        train_idx = self.learner.training_indices(forget_idx, retained_idx, replay_idx)
        x = self.data.train.x
        return TaskContext(t, self.forget_tasks[t], retained, x, self.data.train.y, train_idx, None,
                           self.embed_fn(x, self.mean, self.std, self.learner.features),
                           self.embed_fn(x, self.mean, self.std, self.learner.predict), self.device,
                           self.mean, self.std)

    def evaluate_task(self, t: int) -> dict:
        self.learner.eval()
        from classlab.protocols.runner import FunctionModule

        logits = predict_logits(FunctionModule(self.learner.predict), self.data.test.x, self.mean, self.std,
                                self.device)
        self.outputs[f"logits_task{t}"] = logits.numpy().astype(np.float32)
        self.outputs[f"forget_task{t}"] = np.array(self.forget_tasks[t], dtype=np.int64)
        return {"forget_classes": self.forget_tasks[t], **getattr(self, "task_counts", {})}

    def meta(self) -> dict:
        return {"method": self.method, "family": "incremental", "seed": self.seed, "backbone": self.backbone,
                "dataset": self.manifest["dataset"], "scenario": KIND, "scenario_kind": KIND,
                "hparams": json.dumps(self.hparams, sort_keys=True), "init": str(self.init),
                "init_kind": describe_init(self.init_meta, all_classes_expected=True),
                "forget_tasks": self.forget_tasks}

    def finish(self, meta: dict) -> None:
        o = self.outputs
        metrics = summarize_forgetting(o["logits_original"], [o[f"logits_task{t}"] for t in range(self.num_tasks)],
                                       o["labels"], self.forget_tasks, self.num_classes)
        metrics.update({k: meta[k] for k in ("dataset", "method", "seed", "backbone", "scenario", "scenario_kind",
                                             "init", "init_kind", "forget_tasks", "provenance", "train_steps",
                                             "batch_size")})
        write_json(self.eval_dir / "metrics.json", metrics)
        self.metrics = metrics

    def final_model(self) -> dict:
        """The final model in ``classlab train``'s format, so ``classlab evaluate`` and ``load_model`` read it."""
        learner = self.learner
        weights = learner.merged_state_dict() if hasattr(learner, "merged_state_dict") else learner.model.state_dict()
        meta = {**self.init_meta, "family": "incremental", "method": self.method, "seed": self.seed,
                "init": str(self.init), "hparams": self.meta_cache["hparams"], "forget_tasks": self.forget_tasks}
        return {"model": {k: v.detach().cpu() for k, v in weights.items()}, "meta": meta}


def run_continual_forgetting(method: str, data_dir: Path, backbone: str, seed: int, ckpt_dir: Path, eval_dir: Path,
                             init: Path, overrides: dict | None = None, forget_tasks: list[list[int]] | None = None,
                             backbone_kwargs: dict | None = None, threads: int | None = None,
                             device: str | None = None, progress: bool = True) -> dict:
    """Forget ``forget_tasks`` in turn from the all-class model ``init``.

    Writes ``ckpt_dir/task<t>.pt`` after each task (resume points, removed at the end),
    ``ckpt_dir/model.pt`` (the final model in ``classlab train``'s format),
    ``ckpt_dir/history.json``, ``eval_dir/predictions.npz`` (``labels``, ``logits_original``,
    ``logits_task<t>`` on the whole test set, ``forget_task<t>``) and ``eval_dir/metrics.json``
    (``summarize_forgetting``).
    """
    run = ForgettingRun(method, data_dir, backbone, seed, ckpt_dir, eval_dir, init, forget_tasks, overrides=overrides,
                        backbone_kwargs=backbone_kwargs, threads=threads, device=device, progress=progress)
    out = run.run()
    out["metrics"] = run.metrics
    return out
