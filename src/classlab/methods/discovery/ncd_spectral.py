"""NCD spectral clustering: one spectral embedding of the known and the novel samples, then NCD k-means.

Troisemaine, Reiffers-Masson, Gosselin, Lemaire and Vaton, "A Practical Approach to Novel Class
Discovery in Tabular Data", Data Mining and Knowledge Discovery, 2024 (arXiv 2311.05440, 2023),
Section 3.3.

Spectral clustering (Ng, Jordan and Weiss's normalised form) on the labelled known samples and the
unlabelled novel samples together:

    A_ij = exp(-|x_i - x_j|^2 / (2 sigma^2)),  A_ii = 0
    L = I - D^{-1/2} A D^{-1/2},  D = diag(sum_j A_ij)
    embedding: the eigenvectors of L's ``n_components`` smallest eigenvalues after the first

The kernel width is not a free number but set from the data: sigma is chosen so that the longest
edge of the minimum spanning tree of the squared distances gets affinity ``min_dist``,

    exp(-d_max^2 / (2 sigma^2)) = min_dist  =>  sigma^2 = -d_max^2 / (2 ln min_dist),

so that the graph stays connected through its weakest necessary link. Because the labelled
samples are embedded with the novel ones, ``min_dist`` and ``n_components`` can be tuned on the
known classes (the paper's premise: settings that separate the known classes in the embedding
separate related novel classes too; ``tabular_ncd.known_class_cv_score`` does the tuning), and the
known classes' means in the embedding seed NCD k-means (``ncd_kmeans``) on the novel rows.

The embedding exists only for the samples it was computed on (the unlabelled pool). A new sample
takes the cluster of its nearest pool sample in the space the embedding was computed from; on the
pool itself that returns the spectral assignment.

As a method (``ncd_spectral``, no training): input space by default (raw tabular features), or
the backbone's features (``space: backbone``).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from classlab.methods.discovery.ncd_kmeans import FixedSpaceNCD, class_means, ncd_kmeans
from classlab.methods.discovery_learner import as_numpy, squared_distances
from classlab.methods.registry import register_method


def mst_sigma(sq_dist: np.ndarray, min_dist: float) -> float:
    """The RBF width that gives the longest edge of the minimum spanning tree affinity ``min_dist``."""
    from scipy.sparse.csgraph import minimum_spanning_tree

    if not 0.0 < min_dist < 1.0:
        raise ValueError(f"ncd_spectral: min_dist must lie in (0, 1), got {min_dist}")
    # csgraph reads a zero entry as "no edge": coincident samples are joined by a tiny positive weight
    graph = np.where(sq_dist > 0, sq_dist, 1e-12)
    np.fill_diagonal(graph, 0.0)
    longest = float(minimum_spanning_tree(graph).max())
    if longest <= 1e-12:  # every sample at one point: any width does
        return 1.0
    return math.sqrt(-longest / (2.0 * math.log(min_dist)))  # sigma^2 = -d_max^2 / (2 ln min_dist)


def spectral_embedding(x: np.ndarray, n_components: int, min_dist: float) -> np.ndarray:
    """[N, n_components]: the eigenvectors of the normalised Laplacian's smallest eigenvalues,
    the first (trivial) one dropped."""
    from scipy.linalg import eigh

    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not 1 <= n_components <= n - 1:
        raise ValueError(f"ncd_spectral: n_components must lie in [1, {n - 1}] for {n} samples, got {n_components}")
    affinity = squared_distances(x, x)
    sigma = mst_sigma(affinity, min_dist)
    # in place: N x N float64 arrays are the memory of this method (N = known + novel samples)
    np.exp(affinity * (-1.0 / (2.0 * sigma ** 2)), out=affinity)  # A_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))
    np.fill_diagonal(affinity, 0.0)
    degree = affinity.sum(1)
    inv_sqrt = 1.0 / np.sqrt(np.where(degree > 0, degree, 1.0))  # an isolated sample keeps degree 1
    affinity *= inv_sqrt[:, None]
    affinity *= inv_sqrt[None, :]  # D^{-1/2} A D^{-1/2} = I - L
    # the smallest eigenvalues of L are the largest of I - L: only those n_components + 1 are computed
    _, vectors = eigh(affinity, subset_by_index=[n - n_components - 1, n - 1], overwrite_a=True)
    return vectors[:, ::-1][:, 1:]  # descending in I - L (ascending in L), the trivial first one dropped


def ncd_spectral_clustering(x_known: np.ndarray, y_known: np.ndarray, x_unlab: np.ndarray, k_novel: int,
                            seed: int, min_dist: float = 0.5, n_components: int = 0,
                            n_init: int = 10) -> np.ndarray:
    """The cluster (0..k_novel-1) of every unlabelled sample. ``y_known``: label indices 0..C-1 of
    ``x_known`` (may be empty: plain spectral clustering of the unlabelled samples).
    ``n_components`` 0: C + k_novel, the number of classes in the embedded data."""
    y_known = np.asarray(y_known)
    num_known = int(y_known.max()) + 1 if len(y_known) else 0
    data = np.concatenate([np.asarray(x_known, dtype=np.float64).reshape(len(y_known), -1),
                           np.asarray(x_unlab, dtype=np.float64)]) if num_known else np.asarray(x_unlab, np.float64)
    m = int(n_components) or num_known + k_novel
    emb = spectral_embedding(data, min(m, len(data) - 1), min_dist)
    known = class_means(emb[:len(y_known)], y_known) if num_known else None
    assign, _, _ = ncd_kmeans(emb[len(y_known) if num_known else 0:], known, k_novel, seed, n_init)
    return assign


def nearest_member_scores(f: torch.Tensor, members: torch.Tensor, member_cluster: torch.Tensor,
                          k: int) -> torch.Tensor:
    """[B, k]: score_c(x) = -min over pool samples i of cluster c of |f(x) - f_i|^2 (-inf for an empty
    cluster); the argmax is the cluster of the nearest pool sample."""
    d2 = torch.cdist(f.float(), members.float()).pow(2)
    scores = torch.full((len(f), k), float("-inf"), device=f.device, dtype=d2.dtype)
    index = member_cluster.to(f.device).long().unsqueeze(0).expand(len(f), -1)
    return scores.scatter_reduce(1, index, -d2, reduce="amax")


class PoolNeighbours(torch.nn.Module):
    """The clustered pool, kept for ``nearest_member_scores``: features and cluster ids as buffers
    sized by ``store`` (and by a loaded state dict, so a task checkpoint restores them)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("features", torch.zeros(0, 0))
        self.register_buffer("cluster", torch.zeros(0, dtype=torch.long))
        self.register_buffer("num_clusters", torch.tensor(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("features", "cluster"):
            saved = state_dict.get(prefix + name)
            if saved is not None:
                setattr(self, name, torch.zeros_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def store(self, features: torch.Tensor, cluster: np.ndarray, k: int) -> None:
        device = self.num_clusters.device
        self.features = features.detach().float().to(device)
        self.cluster = torch.as_tensor(np.asarray(cluster), dtype=torch.long, device=device)
        self.num_clusters.fill_(int(k))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return nearest_member_scores(f, self.features, self.cluster, int(self.num_clusters))


@register_method("discovery", "ncd_spectral")
class NCDSpectral(FixedSpaceNCD):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.pool = PoolNeighbours()

    def end_task(self, task_id, context):
        k_novel = self.novel_cluster_count()
        unlab = context.embed(context.unlabelled)
        assign = ncd_spectral_clustering(as_numpy(context.embed(context.labelled)),
                                         as_numpy(context.visible_labels[context.labelled]), as_numpy(unlab), k_novel,
                                         context.seed, float(self.hparams.get("min_dist", 0.5)),
                                         int(self.hparams.get("n_components", 0)), int(self.hparams.get("n_init", 10)))
        self.pool.store(unlab, assign, k_novel)

    def predict(self, x):
        return self.pool(self.features(x))
