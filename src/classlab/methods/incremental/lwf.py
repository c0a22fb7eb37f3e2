"""LwF: learning without forgetting, by distilling the previous model's outputs on old classes.

Li & Hoiem, "Learning without Forgetting", ECCV 2016 / IEEE TPAMI 2017. Before task t the
model is copied and frozen (theta_o); on the new task's images, the cross-entropy of the new
classes is combined with a knowledge-distillation term that keeps the old-class outputs
close to the frozen copy's, at temperature T:

    L = CE(f(x)|_{new classes}, y) + lambda * KD_T(f(x)|_{old}, f_old(x)|_{old}),
    KD_T(z, z_o) = sum_c softmax(z_o / T)_c * (log softmax(z_o / T)_c - log softmax(z / T)_c).

KD is written as the KL divergence, which differs from the paper's cross-entropy
-sum_c y'_o,c log y'_c only by the old outputs' entropy (a constant in theta): the gradient
is the paper's, and the term is zero when the model equals the old model. T = 2 and
lambda = 1 are the paper's defaults (PyCIL's class-incremental LwF uses lambda = 3). The
class-incremental form is the one of the survey baselines (one head over all classes; the
new-task CE over the new classes' logits, ``ce_scope: new``; ``seen`` uses all seen classes).
The paper's warm-up step (training the new head alone first) is not implemented.

The old model is a frozen submodule created in ``begin_task`` of the second task (replayed on
resume, then loaded from the checkpoint); it is kept in eval mode.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner


def kd_loss(logits: torch.Tensor, old_logits: torch.Tensor, T: float) -> torch.Tensor:
    """KL(softmax(old/T) || softmax(new/T)), summed over classes, mean over the batch."""
    # KD_T = sum_c p_o,c (log p_o,c - log p_c), p = softmax(z / T)
    return F.kl_div(F.log_softmax(logits / T, dim=1), F.log_softmax(old_logits / T, dim=1), reduction="batchmean",
                    log_target=True)


@register_method("incremental", "lwf")
class LwF(IncrementalLearner):

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.old_model = None

    def begin_task(self, task_id, new_classes, seen_classes):
        if task_id > 0:  # freeze a copy of the model as it is after task t-1
            self.snapshot_old_model()
        super().begin_task(task_id, new_classes, seen_classes)

    @property
    def old_mask(self) -> torch.Tensor:
        return self.seen_mask & ~self.new_mask

    def training_step(self, batch):
        x, y = batch["x"], batch["y"]
        logits = self.model(x)
        scope = self.new_mask if self.hparams.get("ce_scope", "new") == "new" else self.seen_mask
        loss = F.cross_entropy(logits.masked_fill(~scope, float("-inf")), y)
        old = self.old_mask
        if self.old_model is not None and bool(old.any()):
            with torch.no_grad():
                old_logits = self.old_model(x)[:, old]
            # L = CE(new) + lambda * KD_T(old-class logits)
            loss = loss + float(self.hparams.get("lamb", 1.0)) * kd_loss(logits[:, old], old_logits,
                                                                         float(self.hparams.get("T", 2.0)))
        return loss, {"logits": self.mask_unseen(logits).detach()}
