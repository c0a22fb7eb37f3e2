"""PRD: prototype-sample relation distillation (replay-free continual learning).

Asadi, Davari, Mudur, Aljundi, Belilovsky, "Prototype-Sample Relation Distillation: Towards
Replay-Free Continual Learning", ICML 2023 (arXiv 2303.14771). Official pre-release code:
github.com/naderAsadi/Probing-Continual-Learning (methods/repe.py), whose defaults
``config/methods/incremental/prd.yaml`` follows.

Three losses, no stored samples:

- Supervised contrastive learning (Khosla et al. 2020) of the representation, on two augmented
  views of each image through a projection head g, z = g(F(x)) / ||g(F(x))||, over the 2B anchors:
      L_SC = -(tau / tau_b) mean_i 1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau)
                                                          / sum_{a != i} exp(z_i.z_a / tau) )
  with P(i) the other samples of i's class (its other view included).
- Prototype learning: class prototypes p_c live in the feature space of F; the current task's
  prototypes are pulled towards their samples without moving the representation:
      L_p = mean_i ( 1 - cos(sg(F(x_i)), p_{y_i}) )
- Relation distillation: for every current sample, the softmax over the OLD classes of its
  similarity to their prototypes must stay what the previous model and prototypes gave:
      s_c(x) = <F(x), p_c> / ||p_c||,  q = softmax_{c in old}(s^{t-1}_c(x) / T),
      r = softmax_{c in old}(s^t_c(x) / T),  L_d = mean_x KL(q || r)
  The gradient moves both the representation and the old prototypes (they keep evolving with it).

  L = L_SC + w_p L_p + [t > 0] w_d L_d

Prediction: nearest prototype by cosine, logits = cos(F(x), p_c).

Simplified here (stated plainly):
- The augmentations are the engine's (random translation, horizontal flip) instead of SimCLR's
  crop/colour-jitter/greyscale; images are 8x8 greyscale.
- The pre-release code applies the distillation softmax per old task and sums over tasks; here,
  as the paper writes it, one softmax over all old classes. KL is used instead of the code's
  cross-entropy (same gradient; KL is zero when the relations match).
- The engine's learning-rate schedule (cosine) instead of the code's step decay.

State (fixed size, allocated up front): ``prototypes`` [C, D] (parameter), ``old_prototypes``
[C, D] (buffer), ``projector`` (submodule), ``old_model`` (frozen copy of the network).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1,
                base_temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss over the anchors ``z`` (L2-normalised rows, all views stacked)."""
    n = z.shape[0]
    logits = z @ z.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(n, dtype=torch.bool, device=z.device)
    positives = (labels[:, None] == labels[None, :]) & not_self
    # log( exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau) )
    log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    mean_log_prob_pos = (log_prob * positives).sum(1) / positives.sum(1).clamp_min(1)
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()


def relation_scores(feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """s_c(x) = <F(x), p_c> / ||p_c||."""
    return feats @ F.normalize(prototypes, dim=1).T


def relation_distillation(new_scores: torch.Tensor, old_scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """L_d = mean_x KL( softmax(s^{t-1}(x) / T) || softmax(s^t(x) / T) ) over the old classes."""
    log_r = F.log_softmax(new_scores / temperature, dim=1)
    log_q = F.log_softmax(old_scores / temperature, dim=1)
    return (log_q.exp() * (log_q - log_r)).sum(1).mean()


def prototype_loss(feats: torch.Tensor, prototypes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_p = mean_i (1 - cos(sg(F(x_i)), p_{y_i})): the representation gets no gradient."""
    return (1.0 - F.cosine_similarity(feats.detach(), prototypes[labels], dim=1)).mean()


@register_method("incremental", "prd")
class PRD(IncrementalLearner):
    uses_memory = False
    num_views = 2

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        dim = model.num_features
        hidden, out = int(hparams.get("projection_hidden", 512)), int(hparams.get("projection_dim", 128))
        self.projector = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out))
        proto = nn.Linear(dim, num_classes, bias=False)  # the usual init of a bias-free linear layer
        self.prototypes = nn.Parameter(proto.weight.detach().clone())
        self.register_buffer("old_prototypes", torch.zeros(num_classes, dim))
        self.old_model = copy.deepcopy(model)
        for p in self.old_model.parameters():
            p.requires_grad_(False)

    def param_groups(self):
        net = [p for p in self.model.backbone.parameters() if p.requires_grad] + list(self.projector.parameters())
        return [{"params": net},
                {"params": [self.prototypes], "lr": float(self.hparams.get("prototypes_lr", 0.01)),
                 "momentum": 0.0, "weight_decay": 0.0}]

    def training_step(self, batch):
        hp = self.hparams
        views = batch.get("views") or [batch["x"], batch["x"]]
        x = torch.cat(views)
        y = batch["y"].repeat(len(views))
        feats = self.model.features(x)
        z = F.normalize(self.projector(feats), dim=1)
        l_sc = supcon_loss(z, y, float(hp.get("supcon_temperature", 0.1)),
                           float(hp.get("supcon_base_temperature", 0.07)))
        l_p = prototype_loss(feats, self.prototypes, y)
        loss = l_sc + float(hp.get("prototypes_coef", 2.0)) * l_p
        logs = {"supcon": l_sc.detach(), "proto": l_p.detach()}
        old = self.seen_mask & ~self.new_mask
        if self.task_id > 0 and old.any():
            # the previous network sees the batch the way the current one does (as in the
            # official code, where the copied model stays in training mode)
            self.old_model.train(self.training)
            with torch.no_grad():
                old_scores = relation_scores(self.old_model.features(x), self.old_prototypes[old])
            new_scores = relation_scores(feats, self.prototypes[old])
            l_d = relation_distillation(new_scores, old_scores, float(hp.get("distill_temp", 1.0)))
            loss = loss + float(hp.get("distill_coef", 4.0)) * l_d  # L = L_SC + w_p L_p + w_d L_d
            logs["distill"] = l_d.detach()
        n = batch["y"].shape[0]
        logs["logits"] = self.mask_unseen(self._cosine(feats[:n].detach()))
        return loss, logs

    def _cosine(self, feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(feats, dim=1) @ F.normalize(self.prototypes, dim=1).T

    def end_task(self, task_id, context) -> None:
        self.old_model.load_state_dict(self.model.state_dict())
        self.old_prototypes.copy_(self.prototypes.detach())

    def predict(self, x):
        return self._cosine(self.model.features(x))  # nearest prototype by cosine
