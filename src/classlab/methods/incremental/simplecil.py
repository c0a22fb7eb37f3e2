"""SimpleCIL: prototypes of a frozen pre-trained backbone with a cosine classifier.

Zhou, Cai, Ye, Zhan and Liu, "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", International Journal of Computer Vision
(IJCV) 2024 (arXiv 2303.07338, 2023). The pre-trained backbone phi is frozen and nothing is
trained; after each task the classifier weight of every new class i is replaced by its prototype

    p_i = 1/K sum_j phi(x_j) 1(y_j = i)              (class mean of the task's training features)

and a test sample is classified by cosine similarity to the prototypes of the seen classes

    logits_i(x) = cos(phi(x), p_i) = <phi(x), p_i> / (||phi(x)|| ||p_i||).

Few-shot scenarios (the uncalibrated-prototype baseline of TEEN). TEEN (Wang et al., NeurIPS
2023) trains backbone and a cosine classifier (temperature s) on the base session before
freezing it,

    L_base = CE(s * cos(phi(x), W), y)   over the base classes,

and then builds prototypes exactly as above. For a clean comparison teen and simplecil must
share one backbone, so on ``few_shot`` scenarios simplecil trains the base session with this
same step and the same hyperparameters (``train_base_session: auto``): teen's prototypes then
differ from simplecil's only by its calibration. On ``class_incremental`` scenarios ``auto``
keeps the paper's protocol: the backbone stays frozen from the start (no task trains).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner, class_means


def cosine_logits(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """cos(f, p_c) for every sample and every prototype (a zero prototype gives 0)."""
    # logits_ic = <f_i, p_c> / (||f_i|| ||p_c||)
    return F.linear(F.normalize(features, dim=-1), F.normalize(prototypes, dim=-1))


@register_method("incremental", "simplecil")
class SimpleCIL(IncrementalLearner):
    """Frozen backbone, prototype classifier; trains only the few-shot base session (see module doc)."""


    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        # the classifier: one prototype per class, allocated for all classes up front
        self.register_buffer("prototypes", torch.zeros(num_classes, model.num_features))
        self._train_base = False

    # --- which tasks train -------------------------------------------------------------
    def trains_base_session(self) -> bool:
        """``train_base_session``: true, false, or auto (true on few_shot scenarios only)."""
        setting = self.hparams.get("train_base_session", "auto")
        if isinstance(setting, str) and setting.lower() == "auto":
            return self.scenario_kind == "few_shot"
        if isinstance(setting, str):
            return setting.lower() in ("true", "1", "yes")
        return bool(setting)

    def begin_task(self, task_id, new_classes, seen_classes):
        super().begin_task(task_id, new_classes, seen_classes)
        if task_id == 0:  # decided once, deterministically (replayed on resume)
            self._train_base = self.trains_base_session()

    def training_indices(self, task, seen, memory):
        if self.task_id == 0 and self._train_base:
            return task
        return task[:0]  # empty: the runner skips training, the backbone stays as it is

    def training_step(self, batch):
        # base session: L = CE(s * cos(phi(x), W), y) over the seen (base) classes (TEEN's ft_cos)
        s = float(self.hparams.get("temperature", 16.0))
        logits = self.mask_unseen(s * cosine_logits(self.model.features(batch["x"]), self.model.head.weight))
        return F.cross_entropy(logits, batch["y"]), {"logits": logits.detach()}

    def param_groups(self):
        # the head's bias is unused by the cosine classifier
        return [{"params": [p for n, p in self.model.named_parameters() if p.requires_grad and n != "head.bias"]}]

    # --- prototypes ---------------------------------------------------------------------
    @torch.no_grad()
    def end_task(self, task_id: int, context: TaskContext) -> None:
        feats = context.embed(context.task_indices)           # phi(x), eval mode, no augmentation
        labels = context.train_y[context.task_indices]
        protos = class_means(feats, labels, context.new_classes)
        self.prototypes[torch.tensor(context.new_classes, dtype=torch.long)] = protos.to(self.prototypes)

    def predict(self, x):
        # logits_c(x) = cos(phi(x), p_c)
        return cosine_logits(self.model.features(x), self.prototypes)
