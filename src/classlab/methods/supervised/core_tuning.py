"""Core-tuning: contrast-regularized fine-tuning of a contrastively pretrained backbone.

Zhang, Hooi, Hu, Liang and Feng, "Unleashing the Power of Contrastive Self-Supervised Visual
Models via Contrast-Regularized Fine-Tuning", NeurIPS 2021 (official code:
github.com/Vanint/Core-tuning, Core-tuning.py; its CIFAR-10 settings are the defaults here).

Fine-tuning loss:  L = L_ce + eta L_fcon  (eta = 0.1, the official CIFAR-10 command).

- Focal contrastive loss on z = normalise(c(h)), c a 2-layer MLP "contrastor" head held by the
  method, over the batch with P(i) the samples of i's class (i excluded):

      p_ij = exp(z_i.z_j / tau) / sum_{k != i} exp(z_i.z_k / tau)
      L_fcon = mean_i  -1/|P(i)| sum_{j in P(i)} (1 - p_ij)^gamma log p_ij

  (tau = 0.07; the official code's weight is (1 - p_ij), gamma = 1). gamma = 0 gives the plain
  supervised contrastive term; gamma > 0 down-weights the positives already pulled close and
  focuses on the hard ones. The official code divides each anchor's sum by the batch size instead
  of |P(i)|; the paper's 1/|P(i)| is used here.
- Hard pair mining and a mixup-smoothed decision boundary, in feature space (h = f(x), one view),
  as the official ``feature_mixup``: the batch B is extended with 2B mixed features and their
  mixed one-hot targets,
    * hard negatives: h~_i = (1 - lam) h_i + lam h_pi(i) for a random partner pi(i), lam ~ Beta(a, a)
      raised to at least 0.8 (the partner dominates, the anchor leaves a trace);
    * hard positives: h~_i = lam h_p(i) + (1 - lam) h_n(i) with p(i) the anchor's hardest positive
      (least cosine-similar sample of its class; itself if it has none) and n(i) its hardest
      negative (most similar sample of another class), lam ~ Beta(a, a), a = 1.
  The classifier is trained on all 3B features with the mixed targets (soft-target CE: the
  "mixup-smoothed decision boundary"), and L_fcon runs over all 3B contrastor features. Which
  mixed samples count as positives: the official code keys contrastive labels by the exact mixed
  target vector, so a mixed sample is a positive of nothing and acts as a negative only; here a
  mixed sample takes its dominant class, so that a mined hard positive is a positive of the class
  that dominates it and a hard negative one of its partner's class (an interpretation of the
  paper's "hard positive / hard negative" naming; flagged). The official code also feeds the
  B un-mixed features to both losses as detached leaves (only the mixed ones reach the backbone);
  here every term backpropagates into the backbone.

Backbone: Core-tuning fine-tunes a contrastively self-supervised backbone (MoCo-v2 in the paper);
the DAG gives it the ``simclr`` pretraining node when there is one and the supervised node
otherwise (the run's ``init``; the report says which). The classification head starts fresh on a
SimCLR backbone (its head is untrained) and from the pretraining head otherwise (``head_init``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from classlab.methods.base import Method
from classlab.methods.pretrain.simclr import ProjectionHead, gram, view_generator
from classlab.methods.registry import register_method


def focal_contrastive_per_anchor(z: torch.Tensor, labels: torch.Tensor, temperature: float,
                                 gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each anchor's -1/|P(i)| sum_j (1 - p_ij)^gamma log p_ij and whether it has a positive."""
    m = len(z)
    self_mask = torch.eye(m, dtype=torch.bool, device=z.device)
    logits = (gram(z) / temperature).masked_fill(self_mask, float("-inf"))
    # log p_ij over k != i; the diagonal (-inf) is zeroed so that no -inf x 0 reaches the backward pass
    log_p = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).masked_fill(self_mask, 0.0)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    weight = (1.0 - log_p.exp()).clamp_min(0.0) ** gamma if gamma != 0 else torch.ones_like(log_p)
    n_pos = pos.sum(1)
    term = -(weight * log_p).masked_fill(~pos, 0.0).sum(1) / n_pos.clamp_min(1)
    return term, n_pos > 0


def focal_contrastive_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float, gamma: float) -> torch.Tensor:
    term, has = focal_contrastive_per_anchor(z, labels, temperature, gamma)
    return term[has].mean() if bool(has.any()) else z.sum() * 0.0


def _beta(gen: torch.Generator, a: float, n: int, device) -> torch.Tensor:
    """n draws of Beta(a, a) from ``gen`` (through a numpy generator it seeds: torch's Beta takes no generator)."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device))
    return torch.as_tensor(np.random.default_rng(seed).beta(a, a, size=n), dtype=torch.float32, device=device)


def core_mixup(h: torch.Tensor, targets: torch.Tensor, y: torch.Tensor, gen: torch.Generator, alpha: float = 1.0,
               negative_lambda_min: float = 0.8) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's features and targets followed by B hard-negative and B hard-positive mixes."""
    b = len(h)
    with torch.no_grad():
        hn = F.normalize(h.float(), dim=1)
        sim = hn @ hn.T
        same = y[:, None] == y[None, :]
        eye = torch.eye(b, dtype=torch.bool, device=h.device)
        idx = torch.arange(b, device=h.device)
        # hardest positive: the least similar sample of the same class (the anchor itself if alone)
        pos_sim = sim.masked_fill(~same | eye, float("inf"))
        hard_pos = torch.where((same & ~eye).any(1), pos_sim.argmin(1), idx)
        # hardest negative: the most similar sample of another class (the anchor itself if none)
        neg_sim = sim.masked_fill(same, float("-inf"))
        hard_neg = torch.where((~same).any(1), neg_sim.argmax(1), idx)
        partner = torch.randperm(b, generator=gen, device=gen.device).to(h.device)
    lam_n = _beta(gen, alpha, b, h.device).clamp_min(negative_lambda_min)[:, None].to(h.dtype)
    f_neg = (1 - lam_n) * h + lam_n * h[partner]
    t_neg = (1 - lam_n) * targets + lam_n * targets[partner]
    lam_p = _beta(gen, alpha, b, h.device)[:, None].to(h.dtype)
    f_pos = lam_p * h[hard_pos] + (1 - lam_p) * h[hard_neg]
    t_pos = lam_p * targets[hard_pos] + (1 - lam_p) * targets[hard_neg]
    return torch.cat([h, f_neg, f_pos]), torch.cat([targets, t_neg, t_pos])


@register_method("supervised", "core_tuning")
class CoreTuning(Method):
    """CE on original + mixed features (soft targets) plus eta x the focal contrastive loss."""

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.temperature = float(hparams.get("temperature", 0.07))
        if self.temperature <= 0:
            raise ValueError(f"supervised/{self.name}: temperature must be > 0, got {self.temperature}")
        self.eta = float(hparams.get("eta", 0.1))
        self.gamma = float(hparams.get("focal_gamma", 1.0))
        self.alpha = float(hparams.get("mixup_alpha", 1.0))
        self.negative_lambda_min = float(hparams.get("negative_lambda_min", 0.8))
        self.contrastor = ProjectionHead(model.num_features, int(hparams.get("contrast_dim", 256)),
                                         int(hparams.get("contrast_hidden", 0)))

    def param_groups(self):
        return [{"params": [p for p in self.model.parameters() if p.requires_grad] + list(self.contrastor.parameters())}]

    def training_step(self, batch):
        y = batch["y"]
        h = self.model.features(batch["x"])
        targets = F.one_hot(y, self.num_classes).to(h.dtype)
        gen = view_generator(batch, self.global_step, salt=0xC07E)
        feats, soft = core_mixup(h, targets, y, gen, self.alpha, self.negative_lambda_min)
        logits = self.model.head(feats)
        # mixup-smoothed boundary: CE with the mixed targets on original + mixed features
        ce = -(soft.float() * F.log_softmax(logits.float(), dim=1)).sum(1).mean()
        z = F.normalize(self.contrastor(feats), dim=1)
        fcon = focal_contrastive_loss(z, soft.argmax(1), self.temperature, self.gamma)
        loss = ce + self.eta * fcon  # L = L_ce + eta L_fcon
        n = len(y)
        return loss, {"logits": logits[:n].detach(), "ce": ce.detach(), "focal_contrastive": fcon.detach()}
