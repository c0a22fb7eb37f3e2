"""Pairwise metric learning (a siamese contrastive loss): the baseline of the hyperspherical embedding.

The pairwise metric learning that Pereira, Joly, Valduriez and Porto, "Hyperspherical embedding for
novel class classification", arXiv:2102.03243, 2021, compare against: a siamese network trained
with the contrastive loss of Hadsell, Chopra and LeCun, "Dimensionality Reduction by Learning an
Invariant Mapping", CVPR 2006. For a pair of embeddings at distance D = |e_i - e_j|, Y = 0 for a
pair of the same class and Y = 1 otherwise, with margin m:

    L(Y, D) = (1 - Y) 1/2 D^2 + Y 1/2 max(0, m - D)^2

Same-class pairs are pulled together; different-class pairs are pushed apart until they are m
apart, and cost nothing beyond. The pairs are every pair of labelled samples in the batch; the two
kinds are averaged separately and added, since a siamese network is trained on pairs drawn half
similar, half dissimilar (with 5 known classes, only about a fifth of a batch's pairs are similar).
By default D is measured between unit embeddings (``normalize_embedding``), so that the embedding
lives on the same sphere as the hyperspherical method's and m is on the scale of its chord
distances (0..2); ``normalize_embedding: false`` is Hadsell's raw Euclidean embedding.

Everything else is the hyperspherical method's (``NovelPrototypeLearner``): the linear embedding
layer, training on the labelled known classes only, spherical k-means of the unlabelled pool into
novel prototypes and nearest-prototype prediction; the two methods differ in the training loss only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.discovery.hyperspherical import NovelPrototypeLearner
from classlab.methods.registry import register_method


def contrastive_pair_loss(embedding: torch.Tensor, labels: torch.Tensor, margin: float) -> tuple[torch.Tensor, dict]:
    """Hadsell et al.'s contrastive loss over every pair i < j of the batch: the mean of 1/2 D^2 over
    same-label pairs plus the mean of 1/2 max(0, m - D)^2 over different-label pairs (a kind with no
    pair contributes 0). Returns (loss, {"positive": ..., "negative": ...})."""
    i, j = torch.triu_indices(len(embedding), len(embedding), offset=1, device=embedding.device)
    e = embedding.float()
    d2 = (e[i] - e[j]).pow(2).sum(1)
    distance = d2.clamp_min(1e-12).sqrt()  # the clamp keeps the gradient of sqrt finite for identical points
    same = labels[i] == labels[j]
    # L(Y, D) = (1 - Y) 1/2 D^2 + Y 1/2 max(0, m - D)^2
    positive = 0.5 * d2[same]
    negative = 0.5 * F.relu(margin - distance[~same]).pow(2)
    zero = e.sum() * 0.0  # keeps the graph when a kind has no pair
    pos = positive.mean() if len(positive) else zero
    neg = negative.mean() if len(negative) else zero
    return pos + neg, {"positive": pos.detach(), "negative": neg.detach()}


@register_method("discovery", "pairwise")
class PairwiseMetric(NovelPrototypeLearner):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.margin = float(self.hparams.get("margin", 1.0))
        if self.margin <= 0:
            raise ValueError(f"discovery/pairwise: margin must be > 0, got {self.margin}")
        self.normalize_embedding = bool(self.hparams.get("normalize_embedding", True))

    def embedding_loss(self, embedding, labels):
        if self.normalize_embedding:
            embedding = F.normalize(embedding, dim=1)
        return contrastive_pair_loss(embedding, labels, self.margin)
