"""Multi-Similarity loss with its pair miner.

Wang, Han, Huang, Dong and Scott, "Multi-Similarity Loss with General Pair Weighting for Deep Metric
Learning", CVPR 2019.

With S_ik the cosine similarity of L2-normalised embeddings, the loss of anchor i over its mined positive
set P_i and negative set N_i is (paper, Eq. 13)

    L_i = 1/alpha log(1 + sum_{k in P_i} exp(-alpha (S_ik - lambda)))
        + 1/beta  log(1 + sum_{k in N_i} exp( beta (S_ik - lambda)))

averaged over the anchors of the batch. Mining (paper, Eqs. 10-11): a negative k is kept when
S_ik > min_{y_j = y_i} S_ij - epsilon, a positive when S_ik < max_{y_j != y_i} S_ij + epsilon.
pytorch-metric-learning's ``MultiSimilarityLoss`` (alpha, beta, base = lambda) and ``MultiSimilarityMiner``
(epsilon) compute exactly these. Values: alpha = 2, beta = 50, epsilon = 0.1 as in the paper; lambda =
0.5, the official code's threshold (and pml's default; the paper's text gives lambda = 1).
"""
from __future__ import annotations

from classlab.methods.registry import register_method
from classlab.methods.metric_learner import MetricLearner


@register_method("metric", "multi_similarity")
class MultiSimilarity(MetricLearner):
    is_base_loss = True
    loss_keys = ("ms_alpha", "ms_beta", "ms_base", "ms_epsilon")

    @classmethod
    def make_loss(cls, loss_hparams: dict, num_classes: int, embedding_size: int):
        from pytorch_metric_learning.losses import MultiSimilarityLoss
        from pytorch_metric_learning.miners import MultiSimilarityMiner

        # L_i of the module docstring (paper Eq. 13) over the pairs kept by the miner (Eqs. 10-11)
        loss = MultiSimilarityLoss(alpha=float(loss_hparams["ms_alpha"]), beta=float(loss_hparams["ms_beta"]),
                                   base=float(loss_hparams["ms_base"]))
        return loss, MultiSimilarityMiner(epsilon=float(loss_hparams["ms_epsilon"]))
