"""NCD k-means: k-means on the novel samples, seeded away from the known classes.

Troisemaine, Reiffers-Masson, Gosselin, Lemaire and Vaton, "A Practical Approach to Novel Class
Discovery in Tabular Data", Data Mining and Knowledge Discovery, 2024 (arXiv 2311.05440, 2023),
Section 3.2.

The known classes' centroids are the means of their labelled samples. The novel centroids are
drawn one by one from the unlabelled (novel) samples as in k-means++, except that the distance of
a sample counts from its nearest centroid among the known ones *and* the novel ones drawn so far:

    P(x_i is the next novel centroid) = D(x_i)^2 / sum_j D(x_j)^2,
    D(x) = min over {known centroids} U {novel centroids drawn} of |x - c|

so that no novel centroid starts inside a known class. Lloyd's iterations then move the novel
centroids only, over the unlabelled samples only (the known centroids steer the seeding; in NCD
the unlabelled set holds novel classes alone). The seeding and convergence are repeated ``n_init``
times and the run of least inertia sum_i min_j |x_i - c_j|^2 is kept. The paper uses the
Euclidean distance throughout, as k-means does.

As a method (``ncd_kmeans``, no training): the clustering runs in the input space by default (the
paper's setting: raw tabular features, here the flattened normalised input), or on the backbone's
features (``space: backbone``, for a pretrained image backbone). A sample's scores are minus its
squared distances to the novel centroids (argmax: the nearest one).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from classlab.methods.discovery.kmeans import nearest_centre_scores
from classlab.methods.discovery_learner import DiscoveryLearner, as_numpy, squared_distances
from classlab.methods.registry import register_method

SPACES = ("input", "backbone")


def ncd_kmeans_seeds(x_unlab: np.ndarray, known_centres: np.ndarray | None, k_novel: int,
                     rng: np.random.Generator) -> np.ndarray:
    """The novel centroids' starting points: k-means++ over ``x_unlab`` with the known centroids
    counted as already chosen (``known_centres`` may be None or empty: then plain k-means++)."""
    x = np.asarray(x_unlab, dtype=np.float64)
    chosen: list[np.ndarray] = []
    known = np.zeros((0, x.shape[1])) if known_centres is None else np.asarray(known_centres, dtype=np.float64)
    if len(known) == 0:  # nothing to keep away from: the first centroid uniformly at random
        chosen.append(x[rng.integers(len(x))])
    while len(chosen) < k_novel:
        # P(x_i) = D(x_i)^2 / sum_j D(x_j)^2, D = distance to the nearest known or already drawn centroid
        d2 = squared_distances(x, np.concatenate([known, np.stack(chosen)]) if chosen else known).min(1)
        total = d2.sum()
        p = d2 / total if total > 0 else np.full(len(x), 1.0 / len(x))
        chosen.append(x[rng.choice(len(x), p=p)])
    return np.stack(chosen)


def ncd_kmeans(x_unlab: np.ndarray, known_centres: np.ndarray | None, k_novel: int, seed: int, n_init: int = 10,
               iters: int = 300, tol: float = 1e-8) -> tuple[np.ndarray, np.ndarray, float]:
    """NCD k-means of the unlabelled samples into ``k_novel`` clusters.

    Returns (cluster id in 0..k_novel-1 of every unlabelled sample, novel centroids [k_novel, d],
    inertia). Lloyd's iterations stop when no sample changes cluster or the centroids move less
    than ``tol`` in total squared shift; a centroid left without samples stays where it is."""
    x = np.asarray(x_unlab, dtype=np.float64)
    if k_novel < 1:
        raise ValueError(f"ncd_kmeans: k_novel must be >= 1, got {k_novel}")
    if len(x) < k_novel:
        raise ValueError(f"ncd_kmeans: {len(x)} unlabelled samples cannot make {k_novel} clusters")
    rng = np.random.default_rng(seed)
    best: tuple[np.ndarray, np.ndarray, float] | None = None
    for _ in range(max(int(n_init), 1)):
        centres = ncd_kmeans_seeds(x, known_centres, k_novel, rng)
        assign = np.full(len(x), -1, dtype=np.int64)
        for _ in range(iters):
            new = squared_distances(x, centres).argmin(1)
            moved = centres.copy()
            for c in range(k_novel):
                members = x[new == c]
                if len(members):
                    moved[c] = members.mean(0)
            shift = float(((moved - centres) ** 2).sum())
            stable = np.array_equal(new, assign)
            assign, centres = new, moved
            if stable or shift < tol:
                break
        d2 = squared_distances(x, centres)
        assign = d2.argmin(1)  # every sample at its nearest final centroid
        inertia = float(d2[np.arange(len(x)), assign].sum())
        if best is None or inertia < best[2]:
            best = (assign.copy(), centres.copy(), inertia)
    return best


def class_means(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[C, d] mean of each label index 0..C-1 (the known classes' centroids)."""
    labels = np.asarray(labels)
    return np.stack([np.asarray(features)[labels == c].mean(0) for c in range(int(labels.max()) + 1)])


class FixedSpaceNCD(DiscoveryLearner):
    """The untrained NCD learners' common part: they cluster in the input space or the backbone's
    feature space (``space``), optionally L2-normalised, into the novel clusters left beside the
    known classes."""
    trains = False
    num_views = 1
    augment = False

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.space = str(self.hparams.get("space", "input"))
        if self.space not in SPACES:
            raise ValueError(f"{self.name}: space must be one of {list(SPACES)}, got {self.space!r}")

    def features(self, x):
        f = x.flatten(1).float() if self.space == "input" else self.model.features(x)
        return F.normalize(f, dim=1) if self.hparams.get("normalize", False) else f

    def novel_cluster_count(self) -> int:
        k_novel = int(self.task_info.num_clusters) - int(self.task_info.num_label_indices)
        if k_novel < 1:
            raise ValueError(f"{self.name}: num_clusters {self.task_info.num_clusters} leaves no novel cluster beside "
                             f"{self.task_info.num_label_indices} known classes")
        return k_novel


@register_method("discovery", "ncd_kmeans")
class NCDKMeans(FixedSpaceNCD):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.register_buffer("centres", torch.zeros(0))  # [k_novel, d], sized by end_task (and on load)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "centres")
        if saved is not None:
            self.centres = torch.zeros_like(saved, device=self.centres.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def end_task(self, task_id, context):
        k_novel = self.novel_cluster_count()
        labels = as_numpy(context.visible_labels[context.labelled])
        known = class_means(as_numpy(context.embed(context.labelled)), labels) if len(labels) else None
        unlab = as_numpy(context.embed(context.unlabelled))
        _, centres, _ = ncd_kmeans(unlab, known, k_novel, context.seed, int(self.hparams.get("n_init", 10)),
                                   int(self.hparams.get("kmeans_iters", 300)))
        self.centres = torch.from_numpy(centres).float().to(self.estimated_k.device)

    def predict(self, x):
        return nearest_centre_scores(self.features(x), self.centres)
