"""PASS prototype augmentation: the non-exemplar baseline that NAPA-VQ improves on.

Zhu, Zhang, Wang, Yin, Liu, "Prototype Augmentation and Self-Supervision for Incremental
Learning", CVPR 2021. No exemplars are kept; each old class ``c`` is remembered by its
prototype ``p_c`` (mean feature of its training samples, taken at the end of its task), and one
radius ``r`` for all classes, from the first task's class covariances:

    r = sqrt( mean_c tr(Sigma_c) / D )                                 (first task only)

In later tasks, pseudo-features of old classes are drawn around their prototypes and the
linear head is trained on them next to the new data, while the feature extractor is held near
the previous one by feature distillation:

    p_aug = p_c + r e,  e ~ N(0, I),  c ~ U(old classes)
    L = CE(W f(x) / T, y) + w_pa CE(W p_aug / T, c) + w_kd ||f(x) - f_old(x)||_2

(``T`` the temperature, over the seen classes; ``||.||_2`` the norm of the batch's feature
difference, as in the official code). Prediction is the linear head over the seen classes.

Simplified here, as in ``napa_vq`` (which shares this baseline's loss structure): the
self-supervised label augmentation (4 rotations, 4 outputs per class) is not used, since on
digits 6 and 9 are rotations of each other; prototypes come from unaugmented images.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner, class_means


def class_radius(feats: torch.Tensor, labels: torch.Tensor) -> float:
    """r = sqrt(mean over classes of tr(Sigma_c) / D), Sigma_c the unbiased covariance of class c."""
    traces = []
    for c in labels.unique():
        f = feats[labels == c].double()
        if len(f) > 1:
            # tr(Sigma_c) = sum_d Var(f_d)
            traces.append(float(f.var(dim=0, unbiased=True).sum()) / f.shape[1])
    return float(torch.tensor(traces).mean().sqrt()) if traces else 0.0


@register_method("incremental", "pass_protoaug")
class PASSProtoAug(IncrementalLearner):
    uses_memory = False

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.register_buffer("prototypes", torch.zeros(num_classes, model.num_features))
        self.register_buffer("radius", torch.zeros(()))
        self.old_model = None

    def begin_task(self, task_id, new_classes, seen_classes):
        if task_id > 0:
            self.snapshot_old_model()
        super().begin_task(task_id, new_classes, seen_classes)

    def augmented_prototypes(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """p_aug = p_c + r e, e ~ N(0, I), c drawn uniformly from the old classes."""
        old = (self.seen_mask & ~self.new_mask).nonzero().squeeze(1)
        c = old[torch.randint(len(old), (n,), device=old.device)]
        return self.prototypes[c] + self.radius * torch.randn_like(self.prototypes[c]), c

    def training_step(self, batch):
        hp = self.hparams
        temp = float(hp.get("temperature", 0.1))
        x, y = batch["x"], batch["y"]
        feats = self.model.features(x)
        logits = self.mask_unseen(self.model.head(feats))
        loss = F.cross_entropy(logits / temp, y)  # CE(W f(x) / T, y)
        logs = {"logits": logits.detach()}
        if self.task_id > 0 and self.old_model is not None:
            with torch.no_grad():
                old_feats = self.old_model.features(x)
            l_kd = torch.dist(feats, old_feats, 2)  # ||f(x) - f_old(x)||_2
            p_aug, c = self.augmented_prototypes(int(hp.get("proto_aug_batch", 0)) or x.shape[0])
            l_pa = F.cross_entropy(self.mask_unseen(self.model.head(p_aug)) / temp, c)  # CE(W p_aug / T, c)
            loss = loss + float(hp.get("proto_aug_weight", 10.0)) * l_pa + float(hp.get("kd_weight", 10.0)) * l_kd
            logs.update(kd=l_kd.detach(), proto_aug=l_pa.detach())
        return loss, logs

    def end_task(self, task_id: int, context: TaskContext) -> None:
        feats = context.embed(context.task_indices).to(self.prototypes.device)
        labels = context.train_y[context.task_indices].to(self.prototypes.device)
        present = [c for c in context.new_classes if bool((labels == c).any())]
        if present:  # p_c = mean feature of class c
            self.prototypes[present] = class_means(feats, labels, present)
        if task_id == 0:
            self.radius.fill_(class_radius(feats, labels))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.mask_unseen(self.model(x))
