"""ND-KD (KD++): KD plus a loss on the student feature's norm and direction.

Wang, Cheng, Duan, Wang, Feng, Kong, "Improving Knowledge Distillation via Regularizing Feature Norm
and Direction", arXiv:2305.17007, 2023 ("KD++"; ECCV 2024 as "... Feature Direction and Norm"). The student's penultimate feature s (projected to the
teacher's width by a small head where the widths differ) is pulled towards the direction of the
teacher's class centre c_y, the mean teacher feature of class y over the training set, and pushed
to a norm at least the teacher's:

    L_nd = 1 - <s, c_y / |c_y|> / max(|s|, |t|),

with t the teacher's feature of the same image. L_nd >= 0, and it is 0 exactly when s points along
c_y with |s| >= |t|: a larger-norm student feature aligned with its class centre costs nothing. The
whole loss is the official code's (KD++ on CIFAR-100)

    L = w_ce CE(s_logits, y) + w_kd(step) T^2 KL(p_t || p_s) + w_nd L_nd,

with w_ce = 1, w_kd = 1, T = 4 and w_nd = 2 (ResNet-56 -> ResNet-20), the KD weight ramped up
linearly over the first 20 of 240 epochs (``kd_warmup_frac`` 1/12, per step here). The class
centres are computed once, before training, by running the frozen teacher over the unaugmented
training images (the official code reads them from a file made the same way); they are a buffer,
so a resumed run restores them. The projector (only where the widths differ) is the official
code's: BatchNorm1d, dropout 0.5, linear; it is trained with the student and discarded at test
time (the student's own head makes the predictions).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.distill.kd import KD
from classlab.methods.registry import register_method


def nd_loss(student_features: torch.Tensor, teacher_features: torch.Tensor, centres: torch.Tensor,
            y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean over the batch of 1 - <s, c_y/|c_y|> / max(|s|, |t|)."""
    s = student_features.float()
    unit_centre = F.normalize(centres[y].float(), dim=1, eps=eps)  # e_y = c_y / |c_y|
    # L_nd = 1 - <s, e_y> / max(|s|, |t|)
    scale = torch.maximum(s.norm(dim=1), teacher_features.float().norm(dim=1)).clamp_min(eps)
    return (1.0 - (s * unit_centre).sum(dim=1) / scale).mean()


@torch.no_grad()
def teacher_class_centres(teacher: nn.Module, loader, num_classes: int, chunk: int = 512) -> torch.Tensor:
    """(K, D) mean teacher feature of each class over the loader's training samples (unaugmented
    where the loader exposes its images; a class with no sample gets a zero centre)."""
    sums, counts = None, None
    if hasattr(loader, "x") and hasattr(loader, "normalize"):
        batches = ((loader.normalize(loader.x[i:i + chunk]), loader.y[i:i + chunk]) for i in range(0, len(loader.y), chunk))
    else:
        batches = ((batch["x"], batch["y"]) for batch in loader)
    for x, y in batches:
        features = teacher.features(x).float()
        if sums is None:
            sums = torch.zeros(num_classes, features.shape[1], device=features.device)
            counts = torch.zeros(num_classes, device=features.device)
        # c_k = (1 / n_k) sum_{i: y_i = k} t(x_i)
        sums.index_add_(0, y, features)
        counts.index_add_(0, y, torch.ones_like(y, dtype=torch.float32))
    return sums / counts.clamp_min(1).unsqueeze(1)


@register_method("distill", "nd_kd")
class NDKD(KD):
    resizable_buffers = ("class_centres",)

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        self.register_buffer("class_centres", torch.zeros(0))
        self.register_module("projector", None)

    def set_teacher(self, teacher: nn.Module, meta: dict) -> None:
        super().set_teacher(teacher, meta)
        student_dim, teacher_dim = int(self.model.head.in_features), int(teacher.head.in_features)
        if student_dim != teacher_dim:
            projector = nn.Sequential(nn.BatchNorm1d(student_dim),
                                      nn.Dropout(float(self.hparams.get("projector_dropout", 0.5))),
                                      nn.Linear(student_dim, teacher_dim))
            nn.init.zeros_(projector[2].bias)
            self.projector = projector.to(next(self.model.parameters()).device)

    def param_groups(self) -> list[dict]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.projector is not None:
            params += list(self.projector.parameters())
        return [{"params": params}]

    def on_train_start(self, loader) -> None:
        super().on_train_start(loader)
        self.class_centres = teacher_class_centres(self.teacher, loader, self.num_classes)

    def training_step(self, batch):
        x, y = batch["x"], batch["y"]
        features = self.model.features(x)
        logits = self.model.head(features)
        logs = {"logits": logits.detach()}
        teacher_features, teacher_logits = self.teacher_outputs(x)
        # L = w_ce CE + w_kd T^2 KL(p_t || p_s) + w_nd (1 - <s, c_y/|c_y|> / max(|s|, |t|))
        loss = self.ce_and_kd(logits, y, teacher_logits, logs)
        projected = self.projector(features) if self.projector is not None else features
        nd = nd_loss(projected, teacher_features, self.class_centres, y)
        loss = loss + float(self.hparams.get("nd_weight", 2.0)) * nd
        logs["nd"] = nd.detach()
        logs["feature_norm"] = features.detach().float().norm(dim=1).mean()
        return loss, logs
