"""Proxy Anchor loss: one learnable proxy per training class, each proxy an anchor over the batch.

Kim, Kim, Cho and Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020.

With P the proxies, P+ those with a positive in the batch, X_p+ the batch's embeddings of proxy p's class
and X_p- the others, s the cosine similarity (paper, Eq. 4):

    L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
      + 1/|P|  sum_{p in P}  log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta)))

alpha = 32 and delta = 0.1 as in the paper; pytorch-metric-learning's ``ProxyAnchorLoss`` computes it
(proxies initialised by Kaiming normal, fan-out, as in the official code). The proxies train with their
own learning rate, ``proxy_lr_mult`` = 100 times the network's, as in the paper. Not done here: the paper's
first-epoch warm-up of the new layers only (every method of the family gets the same schedule).
"""
from __future__ import annotations

from classlab.methods.registry import register_method
from classlab.methods.metric_learner import MetricLearner


@register_method("metric", "proxy_anchor")
class ProxyAnchor(MetricLearner):
    is_base_loss = True
    loss_keys = ("pa_alpha", "pa_delta", "proxy_lr_mult")

    @classmethod
    def make_loss(cls, loss_hparams: dict, num_classes: int, embedding_size: int):
        from pytorch_metric_learning.losses import ProxyAnchorLoss

        # L of the module docstring (paper Eq. 4); the proxies are the loss's parameters
        loss = ProxyAnchorLoss(num_classes=int(num_classes), embedding_size=int(embedding_size),
                               margin=float(loss_hparams["pa_delta"]), alpha=float(loss_hparams["pa_alpha"]))
        return loss, None
