"""Contrastive loss: pull same-class pairs together, push different-class pairs beyond a margin.

Hadsell, Chopra and LeCun, "Dimensionality Reduction by Learning an Invariant Mapping", CVPR 2006.

On L2-normalised embeddings f with Euclidean distance D_ij = ||f_i - f_j||, every pair of the batch
contributes (pytorch-metric-learning's ``ContrastiveLoss``, the form "A Metric Learning Reality Check"
benchmarks):

    positive pair (y_i = y_j):  [D_ij - m_pos]_+          negative pair (y_i != y_j):  [m_neg - D_ij]_+

each part averaged over its pairs with a non-zero loss, the two parts summed. Hadsell et al. write the
same hinges squared (1/2 D^2 and 1/2 [m - D]^2) with m_pos = 0; pml's unsquared hinges keep its margins
in distance units. Margins: m_pos = 0 (the paper's), m_neg = 1 (pml's default; on the unit sphere, where
D lies in [0, 2], negatives are pushed past cosine 0.5). No miner: all pairs of the batch.
"""
from __future__ import annotations

from classlab.methods.registry import register_method
from classlab.methods.metric_learner import MetricLearner


@register_method("metric", "contrastive")
class Contrastive(MetricLearner):
    is_base_loss = True
    loss_keys = ("pos_margin", "neg_margin")

    @classmethod
    def make_loss(cls, loss_hparams: dict, num_classes: int, embedding_size: int):
        from pytorch_metric_learning.distances import LpDistance
        from pytorch_metric_learning.losses import ContrastiveLoss

        # [D - m_pos]_+ on positive pairs + [m_neg - D]_+ on negative pairs (module docstring)
        loss = ContrastiveLoss(pos_margin=float(loss_hparams["pos_margin"]),
                               neg_margin=float(loss_hparams["neg_margin"]),
                               distance=LpDistance(normalize_embeddings=True, p=2, power=1))
        return loss, None
