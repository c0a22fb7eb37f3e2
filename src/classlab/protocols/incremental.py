"""The class-incremental protocol (FACIL-style template method): single-label class-incremental,
few-shot and online (Si-Blurry) scenarios.

The protocol owns the scenario, the exemplar memory and evaluation; the shared runner
(``classlab.protocols.runner``) owns the loop over tasks, checkpoints and outputs; the learner
interface (``begin_task``, ``training_indices``, ``training_step``, ``end_task``, ``predict``)
is documented in ``classlab.methods.learner``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from classlab.data.prepare import load_prepared
from classlab.data.scenarios import ClassIncrementalScenario, ScenarioError
from classlab.engine.fingerprint import file_digest
from classlab.methods.learner import IncrementalLearner, TaskContext  # noqa: F401  (the learner interface)
from classlab.models import build_classifier
from classlab.protocols.memory import ExemplarMemory
from classlab.protocols.runner import ProtocolRun, describe_init


def validate_run(scenario: ClassIncrementalScenario, learner_cls, hparams: dict) -> None:
    """Reject what does not fit before anything is written."""
    if scenario.kind not in learner_cls.scenario_kinds:
        raise ScenarioError(f"scenario.kind: {learner_cls.name} runs on {list(learner_cls.scenario_kinds)}, "
                            f"not {scenario.kind!r}")
    budget = int(hparams.get("memory_size", 0))
    if learner_cls.uses_memory and budget < scenario.num_classes:
        raise ScenarioError(f"memory_size: {budget} exemplars is below one per class for {scenario.num_classes} "
                            f"classes; use at least {scenario.num_classes}")


class IncrementalRun(ProtocolRun):
    """Single-label class-incremental, few-shot and online (Si-Blurry) scenarios.

    Online (``si_blurry``): one pass over the stream in its order, every task through one
    optimizer and one learning-rate schedule over the whole stream (``online_iter`` steps per
    incoming batch). Anytime accuracy is measured on the scenario's grid of stream positions
    (``eval_period`` samples, the same for every method of a comparison): after the first step
    that reaches a grid position, on the test samples of the classes exposed so far, with the
    logits of unexposed classes masked, as the Si-Blurry/MVP reference code evaluates.
    """

    def __init__(self, method, data_dir, scenario_path: Path, backbone, seed, ckpt_dir, eval_dir, **kwargs):
        super().__init__(method, data_dir, backbone, seed, ckpt_dir, eval_dir, **kwargs)
        self.scenario_path = Path(scenario_path)
        self.scenario = ClassIncrementalScenario.load(self.scenario_path)
        self.kind = self.scenario.kind

    @property
    def num_tasks(self) -> int:
        return self.scenario.num_tasks

    def fingerprint_parts(self) -> dict:
        return {"scenario": file_digest(self.scenario_path)}

    def setup(self) -> None:
        validate_run(self.scenario, self.learner_cls, self.hparams)
        self.data = load_prepared(self.data_dir)
        self.manifest = self.data.manifest
        self.mean, self.std = self.manifest["channel_mean"], self.manifest["channel_std"]
        model = build_classifier(self.backbone, int(self.manifest["shape"][0]), self.scenario.num_classes,
                                 img_size=int(self.manifest["shape"][1]), backbone_kwargs=self.backbone_kwargs)
        if self.init is not None:
            from classlab.train import load_model

            source, self.init_meta = load_model(self.init)
            model.backbone.load_state_dict(source.backbone.state_dict())
        self.learner = self.learner_cls(model, self.hparams, self.scenario.num_classes).to(self.device)
        self.learner.scenario_kind = self.scenario.kind
        if self.learner_cls.uses_memory:
            self.memory = ExemplarMemory(int(self.hparams.get("memory_size", 0)),
                                         self.hparams.get("memory_strategy", "herding"), self.seed)
        self.task_indices = [torch.tensor(task.train_indices, dtype=torch.long) for task in self.scenario.tasks]
        if self.scenario.kind == "si_blurry":
            self.optimizer = self.learner.configure_optimizer()
            batch, repeat = int(self.hparams["batch_size"]), max(int(self.hparams.get("online_iter", 1)), 1)
            steps = [-(-len(idx) // batch) * repeat for idx in self.task_indices]
            self.stream_offsets = np.concatenate([[0], np.cumsum(steps)]).astype(int).tolist()
            self.sample_offsets = np.concatenate([[0], np.cumsum([len(i) for i in self.task_indices])]).astype(int).tolist()
            self.eval_period = int(self.scenario.params.get("eval_period", 1000))  # MVP's 1000 unless the scenario says

    def task_hparams(self, t: int) -> dict:
        hp = super().task_hparams(t)
        if self.scenario.kind == "si_blurry":
            # online: one pass over the stream; `online_iter` sets the steps per incoming batch
            hp["epochs"] = 1
        return hp

    def begin_task(self, t: int) -> None:
        task = self.scenario.tasks[t]
        self.learner.begin_task(t, task.classes, task.test_classes)

    def train_loader(self, t: int, trainer):
        seen = torch.cat(self.task_indices[:t + 1])
        mem = self.memory.indices if self.memory is not None else torch.zeros(0, dtype=torch.long)
        train_idx = self.learner.training_indices(self.task_indices[t], seen, mem)
        self.task_train_samples, self.task_step_log = len(train_idx), []
        if not len(train_idx):
            return None
        if self.scenario.kind == "si_blurry":  # the stream in its order, every sample once
            return trainer.make_loader(self.data.train.x, self.data.train.y, self.mean, self.std, train_idx,
                                       shuffle=False, drop_last=False)
        return trainer.make_loader(self.data.train.x, self.data.train.y, self.mean, self.std, train_idx)

    def fit_task(self, t: int, trainer, loader) -> None:
        if self.scenario.kind != "si_blurry":
            trainer.fit(loader)
            return
        start_sample, period = self.sample_offsets[t], self.eval_period

        def anytime(steps: int, samples: int) -> None:
            # evaluate at each grid position this step reached (positions are stream samples)
            done = start_sample + samples
            last = trainer.step_log[-1][0] if trainer.step_log else start_sample
            position = (last // period + 1) * period
            if position <= done:
                while position + period <= done:
                    position += period
                trainer.step_log.append([position, done, self.exposed_accuracy()])
                self.learner.train()

        trainer.fit(loader, self.optimizer, step_offset=self.stream_offsets[t], total_steps=self.stream_offsets[-1],
                    on_step=anytime)
        self.task_step_log = list(trainer.step_log)  # rows (grid position, samples seen, accuracy)

    def exposed_accuracy(self) -> float:
        """Accuracy on the test samples of the classes exposed so far (logits of the others masked)."""
        exposed = torch.nonzero(self.learner.seen_mask.cpu()).flatten().tolist()
        mask = self.scenario.test_mask(self.data.test.y, exposed)
        if not bool(mask.any()):
            return float("nan")
        logits = self.predict_masked(self.data.test.x[mask], self.mean, self.std)
        return float((logits.argmax(1) == self.data.test.y[mask]).float().mean())

    def context(self, t: int) -> TaskContext:
        task = self.scenario.tasks[t]
        x = self.data.train.x
        return TaskContext(t, task.classes, task.test_classes, x, self.data.train.y, self.task_indices[t], self.memory,
                           self.embed_fn(x, self.mean, self.std, self.learner.features),
                           self.embed_fn(x, self.mean, self.std, self.learner.predict), self.device,
                           self.mean, self.std)

    def before_end_task(self, t: int, context: TaskContext) -> None:
        if self.memory is not None:  # before end_task, so that it sees this task's exemplars
            idx, y = self.task_indices[t], self.data.train.y
            self.memory.update({c: idx[y[idx] == c] for c in self.scenario.tasks[t].classes}, context.embed)

    def evaluate_task(self, t: int) -> dict:
        task = self.scenario.tasks[t]
        test_y = self.data.test.y
        if self.scenario.kind == "si_blurry":  # the classes exposed by the stream so far
            classes = torch.nonzero(self.learner.seen_mask.cpu()).flatten().tolist()
        else:
            classes = task.test_classes
        mask = self.scenario.test_mask(test_y, classes)
        logits = self.predict_masked(self.data.test.x[mask], self.mean, self.std)
        self.outputs[f"logits_task{t}"] = logits.numpy().astype(np.float32)
        self.outputs[f"labels_task{t}"] = test_y[mask].numpy()
        if t == self.scenario.num_tasks - 1 and len(self.data.val):
            # the validation split (held out from train by prepare) on the classes seen at the end:
            # where a method's options are chosen, so the test split only reports
            val_mask = torch.isin(self.data.val.y, torch.tensor(classes, dtype=self.data.val.y.dtype))
            val_logits = self.predict_masked(self.data.val.x[val_mask], self.mean, self.std)
            self.outputs["val_logits_last"] = val_logits.numpy().astype(np.float32)
            self.outputs["val_labels_last"] = self.data.val.y[val_mask].numpy()
        if self.scenario.kind == "si_blurry":
            rows = [[r[0], r[2]] for r in getattr(self, "task_step_log", [])]
            self.outputs[f"anytime_task{t}"] = np.array(rows, dtype=np.float64).reshape(-1, 2)
        return {"classes": task.classes, "memory": int(len(self.memory)) if self.memory is not None else 0}

    def meta(self) -> dict:
        return {"method": self.method, "family": "incremental", "seed": self.seed, "backbone": self.backbone,
                "dataset": self.scenario.dataset, "scenario": self.scenario.params.get("name", self.scenario.kind),
                "scenario_kind": self.scenario.kind, "hparams": json.dumps(self.hparams, sort_keys=True),
                "init": str(self.init) if self.init else "", "init_kind": describe_init(self.init_meta),
                "class_order": self.scenario.class_order, "class_order_seed": self.scenario.class_order_seed}


def run_incremental(method: str, data_dir: Path, scenario_path: Path, backbone: str, seed: int, ckpt_dir: Path,
                    eval_dir: Path, overrides: dict | None = None, init: Path | None = None,
                    backbone_kwargs: dict | None = None, threads: int | None = None, device: str | None = None,
                    progress: bool = True) -> dict:
    """Train ``method`` through the scenario; after each task save test predictions on the seen classes.

    Writes ``ckpt_dir/task<t>.pt`` after each task (resume points), ``ckpt_dir/model.pt`` at the
    end, and ``eval_dir/predictions.npz`` (per task: logits and labels of the seen classes' test
    samples; for online scenarios also the anytime accuracy curve: rows of (stream position, accuracy)).
    """
    return IncrementalRun(method, data_dir, scenario_path, backbone, seed, ckpt_dir, eval_dir, overrides=overrides,
                          init=init, backbone_kwargs=backbone_kwargs, threads=threads, device=device,
                          progress=progress).run()
