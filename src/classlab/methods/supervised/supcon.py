"""SupCon: supervised contrastive learning on two views, with a jointly trained linear head.

Khosla, Teterwak, Wang, Sarna, Tian, Isola, Maschinot, Liu and Krishnan, "Supervised Contrastive
Learning", NeurIPS 2020.

Each image gives two views; z = normalise(g(f(x))) through a 2-layer MLP projection head g held
by the method. Over the 2N views of a batch (anchor i, A(i) = every view but i, P(i) = the views
of the same label as i, i excluded), the paper's L_out (its Eq. 2, the variant it recommends):

    L_out = sum_i  -1/|P(i)| sum_{p in P(i)} log  exp(z_i.z_p / tau) / sum_{a in A(i)} exp(z_i.z_a / tau)

averaged here over the anchors (every anchor has a positive: its own other view).
pytorch-metric-learning's ``SupConLoss`` computes the same L_out (log-softmax over all non-self
pairs, mean over each anchor's positives, then the mean over anchors that have a positive); it
is not a dependency of this project, so the loss is written out below and tested against a
direct formula.

Classifier. The paper trains the representation first and then a linear classifier on the frozen
features (a second stage). Here the linear head (the model's own ``head``) is trained in the same
steps with cross-entropy on detached features, h.detach(), so no classification gradient reaches
the backbone: the representation is shaped by L_out alone, as in the paper's two stages, and the
head tracks it (the simplest faithful option; ``ce_weight`` scales only the head's loss). The
head reads the backbone's pooled features h, not the projection z (the projection head is
dropped, as in the paper).

Augmentation: as SimCLR's here (``classlab.methods.pretrain.simclr``): the loader's translation
and flip per view, then a random resized crop and brightness/contrast jitter in the method (the
paper uses AutoAugment / SimAugment crops and colour distortion).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.base import Method
from classlab.methods.pretrain.simclr import ProjectionHead, augmented_views, gram
from classlab.methods.registry import register_method


def supcon_per_anchor(z: torch.Tensor, labels: torch.Tensor, temperature: float | torch.Tensor,
                      positives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each anchor's L_out term and whether it has a positive. ``z`` (M, d) is L2-normalised;
    ``positives`` (M, M, bool) replaces the same-label mask where given."""
    m = len(z)
    self_mask = torch.eye(m, dtype=torch.bool, device=z.device)
    if torch.is_tensor(temperature) and temperature.dim() == 1:
        temperature = temperature[:, None]  # one temperature per anchor
    logits = (gram(z) / temperature).masked_fill(self_mask, float("-inf"))  # a in A(i) = all but i
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) if positives is None else positives
    pos = pos & ~self_mask
    n_pos = pos.sum(1)
    # -1/|P(i)| sum_{p in P(i)} log softmax_i(p)
    term = -log_prob.masked_fill(~pos, 0.0).sum(1) / n_pos.clamp_min(1)
    return term, n_pos > 0


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_out averaged over the anchors that have at least one positive."""
    term, has = supcon_per_anchor(z, labels, temperature)
    return term[has].mean() if bool(has.any()) else z.sum() * 0.0


@register_method("supervised", "supcon")
class SupCon(Method):
    """L_out on projected, normalised features of two views, plus CE on a linear head over
    detached features."""

    num_views = 2

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.temperature = float(hparams.get("temperature", 0.1))
        if self.temperature <= 0:
            raise ValueError(f"supervised/{self.name}: temperature must be > 0, got {self.temperature}")
        self.ce_weight = float(hparams.get("ce_weight", 1.0))
        self.projector = ProjectionHead(model.num_features, int(hparams.get("proj_dim", 128)),
                                        int(hparams.get("proj_hidden", 0)))

    def param_groups(self):
        return [{"params": [p for p in self.model.parameters() if p.requires_grad] + list(self.projector.parameters())}]

    def embed(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features h and normalised projections z of the batch's augmented views, stacked
        view after view (2N rows: view 1 of every image, then view 2)."""
        views = augmented_views(self, batch)
        h = self.model.features(torch.cat(views))
        return h, F.normalize(self.projector(h), dim=1)

    def contrastive_loss(self, z: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        labels = batch["y"].repeat(len(z) // len(batch["y"]))
        return supcon_loss(z, labels, self.temperature), {}

    def training_step(self, batch):
        h, z = self.embed(batch)
        con, logs = self.contrastive_loss(z, batch)
        logits = self.model.head(h.detach())  # the linear head on detached features: no CE gradient in f
        n = len(batch["y"])
        ce = F.cross_entropy(logits, batch["y"].repeat(len(h) // n))
        loss = con + self.ce_weight * ce
        return loss, {"logits": logits[:n].detach(), "contrastive": con.detach(), "ce": ce.detach(), **logs}
