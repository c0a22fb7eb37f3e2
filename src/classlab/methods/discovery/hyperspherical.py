"""Hyperspherical embedding: normalised-softmax training on the known classes, nearest prototype for the novel ones.

Rafael S. Pereira, Alexis Joly, Patrick Valduriez and Fabio Porto, "Hyperspherical embedding for
novel class classification", arXiv:2102.03243, 2021 (v2 2022); the authors' package ``pyopenset``
shows the layers.

Training, on the labelled known classes only (the paper has no loss on unlabelled data): the
backbone feature h goes through a linear embedding layer, e = W_e h; the embedding is projected
onto the sphere of radius s and classified by unit-norm class weights without bias (the normalised
softmax loss the paper builds on, Zhai and Wu, BMVC 2019):

    logit_k = s <e / |e|, w_k / |w_k|> = s cos(e, w_k),    L = CE(softmax(logit), y)

so every logit lies in [-s, s] and depends on the direction of e only: the latent space is the unit
hypersphere, and a class is a direction on it. No pair of samples is ever compared.

Novel classes: the paper adds a class to the trained model by appending the unit-norm mean of its
samples' embeddings as a new weight vector, p = normalise(mean_i e_i / |e_i|), and classifies by the
largest cosine (nearest prototype on the sphere). Here the novel samples are unlabelled (NCD), so
which samples share a class is found by spherical k-means on the unit embeddings of the unlabelled
pool, whose centres are exactly that prototype rule applied to each cluster (assign each point to
its largest cosine; each prototype becomes the normalised mean of its members) and whose fixed
point is a clustering that the nearest-prototype classifier reproduces. The number of novel
clusters is ``num_clusters - num_label_indices``. ``predict`` scores the novel prototypes only,
s cos(e, p_j): the paper's disjoint scenario (unseen classes are told apart from each other, not
from the known ones), which is what an NCD evaluation scores.

``pairwise`` (``classlab.methods.discovery.pairwise``) is the same learner with the loss replaced
by a pairwise contrastive loss: the paper's comparison.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.discovery_learner import DiscoveryLearner, as_numpy, kmeans_plus_plus
from classlab.methods.registry import register_method


def normalized_softmax_logits(embedding: torch.Tensor, class_weights: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, K] logits s cos(e_i, w_k): invariant to the norm of e_i and of w_k, bounded by s in absolute value."""
    # logit_k = s <e / |e|, w_k / |w_k|>
    return scale * F.normalize(embedding, dim=1) @ F.normalize(class_weights, dim=1).T


def nearest_prototype_scores(embedding: torch.Tensor, prototypes: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """[B, K] s cos(e_i, p_j): the argmax is the nearest prototype on the sphere."""
    return normalized_softmax_logits(embedding.float(), prototypes.float(), scale)


def spherical_kmeans(features: np.ndarray, k: int, seed: int, n_init: int = 10,
                     iters: int = 100) -> tuple[np.ndarray, np.ndarray, float]:
    """Spherical k-means (cosine similarity) on the L2-normalised rows of ``features``.

    Each point goes to the prototype of largest cosine; each prototype is the normalised mean of its
    members (the paper's new-class prototype). k-means++ seeding on the unit vectors (squared
    Euclidean distance on the sphere is 2 - 2 cos); ``n_init`` restarts, the best objective
    sum_i max_j cos(x_i, p_j) kept. A cluster left empty restarts at a point the current prototypes
    fit worst (a different point for each empty cluster). Returns (assignment [N], unit prototypes
    [k, d], objective)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"spherical_kmeans: features must be a non-empty [N, d] array, got shape {x.shape}")
    if not 1 <= k <= len(x):
        raise ValueError(f"spherical_kmeans: k = {k} clusters for {len(x)} points; need 1 <= k <= N")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(max(int(n_init), 1)):
        protos = kmeans_plus_plus(x, k, rng).copy()
        assign = np.full(len(x), -1, dtype=np.int64)
        for _ in range(max(int(iters), 1)):
            cos = x @ protos.T
            new = cos.argmax(1)
            if np.array_equal(new, assign):
                break
            assign = new
            # an empty cluster restarts at a badly fitted point, the worst first
            worst_first = np.argsort(cos[np.arange(len(x)), assign])
            restarts = 0
            for j in range(k):
                members = x[assign == j]
                if len(members):
                    total = members.sum(0)
                else:
                    total = x[worst_first[restarts]]
                    restarts += 1
                protos[j] = total / max(np.linalg.norm(total), 1e-12)  # p_j = normalise(sum of members)
        objective = float((x @ protos.T).max(1).sum())
        if best is None or objective > best[2]:
            best = (assign.copy(), protos.copy(), objective)
    return best


class NovelPrototypeLearner(DiscoveryLearner):
    """What the hyperspherical method and its pairwise baseline share: a linear embedding layer on the
    backbone, training on the labelled samples only, then spherical k-means of the unlabelled pool's
    embeddings into novel prototypes and nearest-prototype prediction. Subclasses give the loss."""

    num_views = 1

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        hp = self.hparams
        embed_dim = int(hp.get("embed_dim", 64))
        if embed_dim < 0:
            raise ValueError(f"discovery/{self.name}: embed_dim must be >= 0 (0: the backbone feature), "
                             f"got {embed_dim}")
        # the paper's embedding layer (a dense layer, no activation); 0 keeps the backbone feature itself
        self.embedding = nn.Linear(model.num_features, embed_dim) if embed_dim else nn.Identity()
        self.embed_dim = embed_dim or model.num_features
        self.score_scale = float(hp.get("scale", 1.0))
        self.register_buffer("prototypes", torch.zeros(num_classes, self.embed_dim))
        self.register_buffer("num_prototypes", torch.tensor(0, dtype=torch.long))

    def param_groups(self):
        return [{"params": [p for p in self.model.backbone.parameters() if p.requires_grad]
                 + list(self.embedding.parameters()) + self.loss_parameters()}]

    def loss_parameters(self) -> list[nn.Parameter]:
        return []

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding e (before normalisation): the space the prototypes live in."""
        return self.embedding(self.model.features(x))

    def num_novel(self) -> int:
        info = self.task_info
        k = int(info.num_clusters) - int(info.num_label_indices)
        if k < 1:
            raise ValueError(f"discovery/{self.name}: num_clusters ({info.num_clusters}) - num_label_indices "
                             f"({info.num_label_indices}) = {k} novel classes; need at least one")
        return k

    def embedding_loss(self, embedding: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def training_step(self, batch):
        labelled = batch["y"] >= 0
        if not bool(labelled.any()):
            raise ValueError(f"discovery/{self.name}: a batch without labelled samples (batch['y'] all -1); "
                             f"the loss uses the labelled known classes only")
        # the unlabelled half of the batch carries no loss in the paper: it is not even forwarded
        e = self.features(batch["x"][labelled])
        return self.embedding_loss(e, batch["y"][labelled])

    def end_task(self, task_id, context):
        k = self.num_novel()
        pool = context.unlabelled[context.visible_labels[context.unlabelled] < 0]
        if len(pool) < k:
            raise ValueError(f"discovery/{self.name}: {len(pool)} unlabelled samples for {k} novel clusters")
        e = as_numpy(context.embed(pool)).astype(np.float64)
        _, protos, _ = spherical_kmeans(e, k, context.seed, int(self.hparams.get("n_init", 10)),
                                        int(self.hparams.get("kmeans_iters", 100)))
        self.prototypes.zero_()
        self.prototypes[:k] = torch.from_numpy(protos).to(self.prototypes)
        self.num_prototypes.fill_(k)

    def predict(self, x):
        k = int(self.num_prototypes)
        e = self.features(x)
        if k == 0:  # before end_task: no prototype yet, every cluster scores 0
            return e.new_zeros(len(e), self.num_novel())
        return nearest_prototype_scores(e, self.prototypes[:k], self.score_scale)


@register_method("discovery", "hyperspherical")
class HypersphericalEmbedding(NovelPrototypeLearner):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        if self.score_scale <= 0:
            raise ValueError(f"discovery/hyperspherical: scale must be > 0, got {self.score_scale}")
        # unit-norm class weights of the known classes (one row per possible label index)
        self.class_weights = nn.Parameter(torch.randn(num_classes, self.embed_dim) / self.embed_dim ** 0.5)

    def loss_parameters(self):
        return [self.class_weights]

    def embedding_loss(self, embedding, labels):
        known = int(self.task_info.num_label_indices)  # label indices 0..known-1 (no device sync per step)
        logits = normalized_softmax_logits(embedding.float(), self.class_weights[:known].float(), self.score_scale)
        loss = F.cross_entropy(logits, labels)  # L = CE(softmax(s cos(e, w)), y)
        acc = (logits.argmax(1) == labels).float().mean()
        return loss, {"known_acc": acc.detach()}
