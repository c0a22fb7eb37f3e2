"""k-means on backbone features, no training: the floor of the GCD and NCD comparisons.

The baseline of Vaze, Han, Vedaldi and Zisserman, "Generalized Category Discovery", CVPR 2022
(their Table 2 "k-means" row): k-means with k clusters on the L2-normalised features of every
training sample of the task (labelled and unlabelled; labels are not used), then each sample goes
to its nearest centre. On an NCD split (the unlabelled pool holds the novel classes only) it clusters
that pool into as many clusters as there are novel classes: NCD k-means without the known classes'
labels. Lloyd's algorithm with k-means++ seeding is scikit-learn's ``KMeans``:

    min_{c_1..c_k} sum_i min_j |f(x_i) / |f(x_i)| - c_j|^2
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.discovery_learner import DiscoveryLearner, as_numpy
from classlab.methods.registry import register_method


def nearest_centre_scores(f: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """-|f - c_j|^2 per centre: the argmax is the nearest centre."""
    return -torch.cdist(f.float(), centres.float()).pow(2)


@register_method("discovery", "kmeans")
class KMeansDiscovery(DiscoveryLearner):
    trains = False
    num_views = 1

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.register_buffer("centres", torch.zeros(num_classes, model.num_features))
        self.register_buffer("num_centres", torch.tensor(num_classes, dtype=torch.long))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.features(x)
        return F.normalize(f, dim=1) if self.hparams.get("normalize", True) else f

    def end_task(self, task_id, context):
        from sklearn.cluster import KMeans

        info = self.task_info
        if info.kind == "ncd":
            # NCD: the unlabelled pool holds the novel classes only; cluster it into that many clusters
            pool, k = context.unlabelled, int(info.num_clusters - info.num_label_indices)
        else:
            pool, k = torch.cat([context.labelled, context.unlabelled]).unique(), int(info.num_clusters)
        f = context.embed(pool)
        if self.hparams.get("normalize", True):
            f = F.normalize(f, dim=1)
        km = KMeans(n_clusters=k, n_init=int(self.hparams.get("n_init", 10)), random_state=context.seed)
        km.fit(as_numpy(f))
        self.centres.zero_()
        self.centres[:k] = torch.from_numpy(km.cluster_centers_).to(self.centres)
        self.num_centres.fill_(k)

    def predict(self, x):
        return nearest_centre_scores(self.embed(x), self.centres[:int(self.num_centres)])
