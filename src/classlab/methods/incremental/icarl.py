"""iCaRL: exemplars by herding, sigmoid distillation, nearest-mean-of-exemplars classification.

Rebuffi, Kolesnikov, Sperl, Lampert, "iCaRL: Incremental Classifier and Representation
Learning", CVPR 2017.

Representation learning (Alg. 3): the training set is the new task's samples plus the
exemplar memory (the protocol's memory, herding selection, Alg. 4/5); with g_y(x) =
sigmoid(f_y(x)) and q_y(x) = sigmoid(f^old_y(x)) of the model frozen before the task, the loss
is a binary cross-entropy over the classes seen so far, with one-hot targets for the new
classes and the old model's outputs as targets for the old classes (distillation):

    l(x, y) = - sum_{c in new} [ d_{c=y} log g_c(x) + (1 - d_{c=y}) log(1 - g_c(x)) ]
              - sum_{c in old} [ q_c(x) log g_c(x) + (1 - q_c(x)) log(1 - g_c(x)) ],

summed over classes and averaged over the batch (the paper's code averages over all outputs
too, with lr 2.0; here the per-class sum keeps the gradient scale of the cross-entropy
baselines, so they share a learning rate).

Classification (Alg. 1): nearest mean of exemplars. With phi(x) L2-normalised features,
mu_y = normalise((1/|P_y|) sum_{p in P_y} phi(p)) over class y's exemplars, recomputed in
``end_task`` for every seen class (the protocol has already updated the memory), and

    y* = argmin_y || phi(x) - mu_y ||,  predict(x) = -|| phi(x) - mu_y ||  (logits).

Not implemented: the paper averages features of each image and its horizontal flip for the
class means. The old model is a frozen submodule created in ``begin_task`` (replayed on resume).
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner, TaskContext


def icarl_targets(y: torch.Tensor, old_logits: torch.Tensor | None, old_mask: torch.Tensor) -> torch.Tensor:
    """BCE targets over all classes: one-hot of y, with the old classes' columns replaced by
    the old model's sigmoid outputs q = sigmoid(f_old(x))."""
    target = F.one_hot(y, old_mask.numel()).float()
    if old_logits is not None and bool(old_mask.any()):
        target[:, old_mask] = torch.sigmoid(old_logits[:, old_mask].float())
    return target


def icarl_loss(logits: torch.Tensor, target: torch.Tensor, seen_mask: torch.Tensor) -> torch.Tensor:
    """sum over seen classes of BCE(sigmoid(logits), target), mean over the batch."""
    bce = F.binary_cross_entropy_with_logits(logits[:, seen_mask], target[:, seen_mask], reduction="none")
    return bce.sum(1).mean()


def nme_logits(features: torch.Tensor, class_means: torch.Tensor) -> torch.Tensor:
    """-|| phi(x) - mu_y || with phi(x) the L2-normalised features."""
    return -torch.cdist(F.normalize(features.float(), dim=1), class_means.float())


@register_method("incremental", "icarl")
class ICaRL(IncrementalLearner):
    uses_memory = True

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.old_model = None
        self.register_buffer("class_means", torch.zeros(num_classes, self.model.num_features))
        self.register_buffer("has_mean", torch.zeros(num_classes, dtype=torch.bool))

    def begin_task(self, task_id, new_classes, seen_classes):
        if task_id > 0:  # freeze a copy of the model as it is after task t-1
            self.snapshot_old_model()
        super().begin_task(task_id, new_classes, seen_classes)

    def training_step(self, batch):
        x, y = batch["x"], batch["y"]
        logits = self.model(x)
        old_mask = self.seen_mask & ~self.new_mask
        old_logits = None
        if self.old_model is not None and bool(old_mask.any()):
            with torch.no_grad():
                old_logits = self.old_model(x)
        # targets: one-hot for new classes, q = sigmoid(f_old(x)) for old classes; BCE over seen
        target = icarl_targets(y, old_logits, old_mask)
        loss = icarl_loss(logits, target, self.seen_mask)
        return loss, {"logits": self.mask_unseen(logits).detach()}

    @torch.no_grad()
    def end_task(self, task_id: int, context: TaskContext) -> None:
        memory = context.memory
        for c, idx in memory.per_class.items():
            if len(idx) == 0:
                continue
            # mu_c = normalise(mean_p phi(p)), phi = L2-normalised features of c's exemplars
            phi = F.normalize(context.embed(idx).float(), dim=1)
            self.class_means[c] = F.normalize(phi.mean(0), dim=0).to(self.class_means.device)
            self.has_mean[c] = True

    def predict(self, x):
        if not bool(self.has_mean.any()):  # before the first task ends: the sigmoid head
            return self.model(x)
        logits = nme_logits(self.model.features(x), self.class_means)
        return logits.masked_fill(~self.has_mean, float("-inf"))
