"""SimGCD: a parametric classifier trained by self-distillation, with GCD's representation losses.

Wen, Zhao and Qi, "Parametric Classification for Generalized Category Discovery: A Baseline
Study", ICCV 2023.

A cosine classifier over K clusters (one prototype per cluster, ``CosinePrototypes``) on the
backbone feature h gives s(x) = <w_k / |w_k|, h / |h|>; the student distribution is
p = softmax(s / tau_s), tau_s = 0.1, and the teacher is the same head, detached, sharpened:
q = softmax(s / tau_t), tau_t warmed up from 0.07 to 0.04 over the first epochs. Per batch of two
views v, v' (the paper's Eqs. 3-6, and the official code's loss):

    L_cls_s = CE(p(x_v), y)                                 (labelled samples, both views)
    L_cls_u = 1/2 sum_{v != v'} mean_i  H(q(x_{i,v'}), p(x_{i,v}))  -  eps H(mean_i p(x_i))   (all samples)
    L = (1 - lambda) (L_cls_u + L_u) + lambda (L_cls_s + L_s),   lambda = 0.35, eps = 2

with H(q, p) = -sum_k q_k log p_k the cross-view self-distillation, H(mean p) the entropy of the
batch's mean prediction (the mean-entropy regulariser, which keeps every cluster in use; the code
adds log K so the term is non-negative), and L_u, L_s GCD's contrastive losses
(``GCDRepresentation``). The prediction is argmax_k s(x).

LegoGCD and ProtoGCD extend this class (``cluster_loss`` and ``extra_loss`` are their hooks).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from classlab.methods.discovery_learner import CosinePrototypes, DiscoveryLearner, GCDRepresentation, two_views
from classlab.methods.registry import register_method


def teacher_temperature(epoch: int, start: float, end: float, warmup_epochs: int) -> float:
    """SimGCD's schedule: linear from ``start`` to ``end`` over ``warmup_epochs`` epochs, then ``end``."""
    if warmup_epochs <= 0 or epoch >= warmup_epochs:
        return end
    return start + (end - start) * epoch / warmup_epochs


def cross_view_distillation(student_logits: list[torch.Tensor], teacher_logits: list[torch.Tensor],
                            student_t: float, teacher_t: float) -> torch.Tensor:
    """mean over ordered view pairs (v != v') of mean_i H(q_{v'}, p_v), q = softmax(teacher / tau_t) (no
    gradient), p = softmax(student / tau_s)."""
    total, terms = 0.0, 0
    for iq, t in enumerate(teacher_logits):
        q = F.softmax(t.detach().float() / teacher_t, dim=1)
        for v, s in enumerate(student_logits):
            if v == iq:
                continue
            total = total + (-q * F.log_softmax(s.float() / student_t, dim=1)).sum(1).mean()
            terms += 1
    return total / max(terms, 1)


def mean_entropy_penalty(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log K - H(mean_i softmax(s_i / tau)): zero when the batch uses every cluster equally."""
    p = F.softmax(logits.float() / temperature, dim=1).mean(0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return math.log(p.numel()) - entropy


@register_method("discovery", "simgcd")
class SimGCD(DiscoveryLearner):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.representation = GCDRepresentation.from_hparams(model.num_features, self.hparams)
        self.prototypes = CosinePrototypes(model.num_features, num_classes)
        self.epoch = 0

    def param_groups(self):
        return [{"params": [p for p in self.model.backbone.parameters() if p.requires_grad]
                 + list(self.representation.parameters()) + list(self.prototypes.parameters())}]

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def tau_s(self) -> float:
        return float(self.hparams.get("student_temperature", 0.1))

    def tau_t(self) -> float:
        hp = self.hparams
        return teacher_temperature(self.epoch, float(hp.get("teacher_temperature_start", 0.07)),
                                   float(hp.get("teacher_temperature", 0.04)), int(hp.get("teacher_warmup_epochs", 30)))

    def active_logits(self, s: torch.Tensor) -> torch.Tensor:
        """The clusters in use (continual discovery grows them stage by stage)."""
        return s[:, :int(self.task_info.num_clusters)]

    def cluster_loss(self, logits: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict]:
        """L_cls_u: cross-view self-distillation minus eps times the mean entropy."""
        distill = cross_view_distillation(logits, logits, self.tau_s, self.tau_t())
        memax = mean_entropy_penalty(torch.cat(logits), self.tau_s)
        return distill + float(self.hparams.get("memax_weight", 2.0)) * memax, \
            {"distill": distill.detach(), "memax": memax.detach()}

    def extra_loss(self, logits: list[torch.Tensor], h: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        """Terms a descendant adds (LegoGCD's local entropy and dual-view KL)."""
        return logits[0].sum() * 0.0, {}

    def training_step(self, batch):
        v1, v2 = two_views(self, batch)
        n = len(v1)
        h = self.model.features(torch.cat([v1, v2]))
        s = self.active_logits(self.prototypes(h))
        logits = [s[:n], s[n:]]
        y = batch["y"]
        lab = y >= 0
        lam = float(self.hparams.get("sup_weight", 0.35))
        if bool(lab.any()):
            l_cls_s = F.cross_entropy(torch.cat([logits[0][lab], logits[1][lab]]).float() / self.tau_s,
                                      torch.cat([y[lab], y[lab]]))
        else:
            l_cls_s = s.sum() * 0.0
        l_cls_u, logs = self.cluster_loss(logits, batch)
        l_rep, rep_logs = self.representation(h[:n], h[n:], y)
        # L = (1 - lambda) L_cls_u + lambda L_cls_s + L_rep, L_rep = (1 - lambda) L_u + lambda L_s
        loss = (1 - lam) * l_cls_u + lam * l_cls_s + l_rep
        extra, extra_logs = self.extra_loss(logits, h, batch)
        loss = loss + extra
        logs.update(rep_logs)
        logs.update(extra_logs)
        logs["l_cls_s"] = l_cls_s.detach()
        return loss, logs

    def predict(self, x):
        return self.active_logits(self.prototypes(self.model.features(x)))
