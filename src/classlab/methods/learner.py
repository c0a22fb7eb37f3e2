"""The incremental learner: what every continual method builds on, without depending on a protocol.

A protocol (``classlab.protocols``) owns the scenario, the loop over tasks, the exemplar memory
and evaluation; a learner says only what differs:

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
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from classlab.methods.base import Method


@dataclass
class TaskContext:
    """What ``end_task`` may use: the task's data, the memory, and the current model's features."""

    task_id: int
    new_classes: list[int]
    seen_classes: list[int]
    train_x: torch.Tensor        # uint8, the whole prepared train split
    train_y: torch.Tensor
    task_indices: torch.Tensor   # this task's training samples
    memory: Any  # classlab.protocols.memory.ExemplarMemory or None
    embed: Callable[[torch.Tensor], torch.Tensor]   # train indices -> features (eval mode, no aug)
    logits: Callable[[torch.Tensor], torch.Tensor]  # train indices -> logits (eval mode, no aug)
    device: torch.device
    mean: list[float] | None = None  # the loader's per-channel normalisation (images / 255)
    std: list[float] | None = None


def class_means(features: torch.Tensor, labels: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """[len(classes), D]: the prototype p_c = mean of the features whose label is c."""
    out = []
    for c in classes:
        rows = features[labels == c]
        if len(rows) == 0:
            raise ValueError(f"class {c} has no training sample in this task; cannot build its prototype")
        out.append(rows.mean(0))  # p_c = 1/K sum_j phi(x_j) 1(y_j = c)
    return torch.stack(out)


class IncrementalLearner(Method):
    """Base learner: sequential fine-tuning with cross-entropy over the classes seen so far."""

    uses_memory = False
    scenario_kinds: tuple[str, ...] = ()  # from the method YAML's `scenario_kinds` (set by the registry)
    scenario_kind: str | None = None  # set by the protocol before the first task

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.register_buffer("seen_mask", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("new_mask", torch.zeros(num_classes, dtype=torch.bool))
        self.task_id = -1

    phase = "train"  # the task phase the protocol is running (see ``task_phases``)

    # --- template hooks -----------------------------------------------------------------
    def task_phases(self, task_id: int) -> list[str]:
        """The phases of a task, each run through the engine and checkpointed by the protocol:
        ``["train"]``, or e.g. ``["train", "align"]`` for a classifier alignment on sampled features."""
        return ["train"]

    def phase_hparams(self, phase: str) -> dict:
        """Training settings of a phase after "train" (epochs, lr, batch_size), over the task's."""
        return {}

    def phase_loader(self, phase: str, context: "TaskContext", trainer):
        """The loader of a phase after "train" (``trainer.make_loader`` over images or float
        features); None when the phase trains nothing."""
        return None

    def begin_task(self, task_id: int, new_classes: list[int], seen_classes: list[int]) -> None:
        self.task_id = task_id
        self.new_mask.zero_()
        self.new_mask[torch.tensor(new_classes, dtype=torch.long)] = True
        if not self.online:  # an online stream exposes its classes sample by sample (on_before_step)
            self.seen_mask[torch.tensor(seen_classes, dtype=torch.long)] = True

    @property
    def online(self) -> bool:
        return self.scenario_kind == "si_blurry"

    def on_before_step(self, batch: dict) -> None:
        # Si-Blurry: a class is exposed when its first sample arrives, before the step trains on
        # it (the reference code adds unseen labels to its exposed classes as samples stream in)
        if self.online and self.training:
            self.seen_mask[batch["y"]] = True

    def training_indices(self, task: torch.Tensor, seen: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        return torch.cat([task, memory]) if self.uses_memory and len(memory) else task

    def end_task(self, task_id: int, context: TaskContext) -> None:
        pass

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def snapshot_old_model(self) -> None:
        """Freeze a copy of the model as it is now: the teacher of distillation methods (LwF,
        iCaRL), a submodule so that task checkpoints carry it."""
        self.old_model = copy.deepcopy(self.model).eval().requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "old_model", None) is not None:
            self.old_model.eval()  # a teacher's BatchNorm statistics never move
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The representation used for exemplar selection and prototypes."""
        return self.model.features(x)

    # --- helpers ------------------------------------------------------------------------
    def mask_unseen(self, logits: torch.Tensor) -> torch.Tensor:
        """Classes not seen yet get -inf: the incremental head of the seen classes."""
        return logits.masked_fill(~self.seen_mask, float("-inf"))

    def training_step(self, batch):
        logits = self.mask_unseen(self.model(batch["x"]))
        # L = CE over the classes seen so far
        return F.cross_entropy(logits, batch["y"]), {"logits": logits.detach()}

    def forward(self, x):
        return self.predict(x)
