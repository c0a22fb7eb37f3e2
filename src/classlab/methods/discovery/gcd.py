"""GCD: contrastive representation learning, then semi-supervised k-means.

Vaze, Han, Vedaldi and Zisserman, "Generalized Category Discovery", CVPR 2022.

Training (their Eq. 3): on two views of every batch, through a projection head g,

    L_rep = (1 - lambda) L_u + lambda L_s,   lambda = 0.35

L_u the self-supervised contrastive loss over all samples (temperature 1.0 in the official code),
L_s the supervised contrastive loss over the labelled samples (temperature 0.07)
(``classlab.methods.discovery_learner.GCDRepresentation``).

Label assignment: semi-supervised k-means on the backbone features of every sample of the task
(labelled and unlabelled): the labelled samples stay in their class's cluster, the known classes'
centres start at their means, the others by k-means++
(``classlab.methods.discovery_learner.semi_supervised_kmeans``).

Number of classes (``estimate_k: true``): the paper's search over k. For each candidate k, plain
k-means on all features; the score is the clustering accuracy of the labelled subset under that
clustering (Hungarian matching); the k with the best score is kept. The paper runs Brent's method
on this score to save k-means runs; with at most a few dozen candidates here the search is exhaustive
over ``k_min``..``k_max``, which finds the same or a better maximiser.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from classlab.methods.discovery.kmeans import nearest_centre_scores
from classlab.methods.discovery_learner import (DiscoveryLearner, GCDRepresentation, as_numpy,
                                               semi_supervised_kmeans, two_views)
from classlab.methods.registry import register_method


def estimate_num_classes(features: np.ndarray, labels: np.ndarray, k_min: int, k_max: int, seed: int) -> tuple[int, dict]:
    """GCD's class-number search: argmax_k of the labelled subset's clustering accuracy under k-means
    with k clusters on all features. Returns (k, {k: score})."""
    from sklearn.cluster import KMeans

    from classlab.metrics.discovery import cluster_accuracy

    lab = labels >= 0
    scores = {}
    for k in range(k_min, k_max + 1):
        assign = KMeans(n_clusters=k, n_init=3, random_state=seed).fit_predict(features)
        scores[k] = float(cluster_accuracy(labels[lab], assign[lab]))
    best = max(scores, key=lambda k: (scores[k], -k))  # ties: the smaller k
    return best, scores


@register_method("discovery", "gcd")
class GCD(DiscoveryLearner):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.representation = GCDRepresentation.from_hparams(model.num_features, self.hparams)
        self.register_buffer("centres", torch.zeros(num_classes, model.num_features))
        self.register_buffer("num_centres", torch.tensor(num_classes, dtype=torch.long))

    def param_groups(self):
        return [{"params": [p for p in self.model.backbone.parameters() if p.requires_grad]
                 + list(self.representation.parameters())}]

    def training_step(self, batch):
        v1, v2 = two_views(self, batch)
        h = self.model.features(torch.cat([v1, v2]))
        n = len(v1)
        loss, logs = self.representation(h[:n], h[n:], batch["y"])
        return loss, logs

    def embed(self, x):
        return F.normalize(self.model.features(x), dim=1)

    def end_task(self, task_id, context):
        pool = torch.cat([context.labelled, context.unlabelled]).unique()
        f = as_numpy(F.normalize(context.embed(pool), dim=1)).astype(np.float64)
        labels = as_numpy(context.visible_labels[pool])
        k = int(self.task_info.num_clusters)
        if self.hparams.get("estimate_k", False):
            known = int(labels.max()) + 1 if (labels >= 0).any() else 1
            k_max = min(int(self.hparams.get("k_max") or 2 * self.num_classes), self.num_classes)
            k, _ = estimate_num_classes(f, labels, max(known, int(self.hparams.get("k_min") or known)), k_max,
                                        context.seed)
            self.estimated_k.fill_(k)
        assign, centres, _ = semi_supervised_kmeans(f, labels, k, context.seed, int(self.hparams.get("kmeans_iters", 100)))
        self.centres.zero_()
        self.centres[:k] = torch.from_numpy(centres).to(self.centres)
        self.num_centres.fill_(k)

    def predict(self, x):
        return nearest_centre_scores(self.embed(x), self.centres[:int(self.num_centres)])
