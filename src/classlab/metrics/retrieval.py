"""Retrieval metrics over saved embeddings: Recall@K, NMI and MAP@R.

The zero-shot retrieval protocol of deep metric learning (Oh Song et al., CVPR 2016; as re-examined by
Musgrave, Belongie and Lim, "A Metric Learning Reality Check", ECCV 2020): every embedding of the
evaluation set is a query, and the rest of the set (the query itself excluded) is the gallery.

- **Recall@K** (the "recall" of the DML literature, not the IR one): the fraction of queries of which at
  least one of the K nearest gallery neighbours shares the query's class. Recall@1 is precision@1.
- **MAP@R** (Reality Check, Sec. 3.2): for a query with R other samples of its class, the mean over
  i = 1..R of P(i) * rel(i), P(i) the precision among the first i neighbours and rel(i) = 1 where the
  i-th neighbour is of the query's class: MAP@R = 1/R sum_{i<=R} P(i) rel(i), averaged over queries.
- **NMI**: normalised mutual information between the classes and a k-means clustering of the
  embeddings with k = the number of classes (scikit-learn's k-means, seeded).

Neighbours are by Euclidean distance on the embeddings as given (the metric family passes L2-normalised
embeddings, for which this ranks as cosine similarity does). Computed by pytorch-metric-learning's
``AccuracyCalculator`` (its ``precision_at_1``, ``mean_average_precision_at_r`` and ``NMI``, with a
torch ``CustomKNN`` and a scikit-learn k-means, since faiss is not a dependency) plus Recall@K for K > 1,
added here as a calculator method over the same neighbour lists. As in pml, a query whose class has no
other sample in the set ("lone" query) is left out of the neighbour metrics; ``n_queries`` counts the
queries that were scored.

API (shared by the metric family's protocols):

- ``RECALL_KS``: the K of Recall@K reported by default, (1, 2, 4, 8);
- ``retrieval_metrics(embeddings, labels, ks=RECALL_KS, seed=0) -> dict``: ``recall_at_<K>`` for each K,
  ``map_at_r``, ``nmi`` and ``n_queries``, plain floats and ints;
- ``kmeans_labels(embeddings, k, seed=0)``: the k-means cluster of each row (what NMI is computed on).
"""
from __future__ import annotations

import numpy as np
import torch

RECALL_KS = (1, 2, 4, 8)


def kmeans_labels(embeddings, k: int, seed: int = 0) -> torch.Tensor:
    """scikit-learn k-means (10 restarts, seeded) of the rows of ``embeddings`` into ``k`` clusters."""
    from sklearn.cluster import KMeans

    x = embeddings.detach().cpu().double().numpy() if isinstance(embeddings, torch.Tensor) else np.asarray(
        embeddings, dtype=np.float64)
    k = int(min(k, len(x)))
    labels = KMeans(n_clusters=k, n_init=10, random_state=int(seed)).fit_predict(x)
    return torch.as_tensor(labels, dtype=torch.long)


def _recall_at(knn_labels: torch.Tensor, query_labels: torch.Tensor, k: int) -> float:
    """Fraction of rows whose first ``k`` neighbour labels contain the row's label."""
    hits = (knn_labels[:, :k] == query_labels[:, None]).any(dim=1)
    return float(hits.double().mean())


def _calculator(ks: tuple[int, ...], k_neighbours: int, seed: int):
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    class RetrievalCalculator(AccuracyCalculator):
        """pml's calculator plus ``recall_at_k`` (one ``calculate_`` method reading every K)."""

        def calculate_recall_at_k(self, knn_labels, query_labels, not_lone_query_mask, **kwargs):
            knn = knn_labels[not_lone_query_mask]
            queries = query_labels[not_lone_query_mask]
            if len(queries) == 0:
                return {k: float("nan") for k in ks}
            return {k: _recall_at(knn, queries, k) for k in ks}

        def requires_knn(self):
            return super().requires_knn() + ["recall_at_k"]

    return RetrievalCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "NMI", "recall_at_k"),
        k=k_neighbours, device=torch.device("cpu"),
        knn_func=CustomKNN(LpDistance(normalize_embeddings=False, p=2, power=1)),
        kmeans_func=lambda x, n: kmeans_labels(x, n, seed))


def retrieval_metrics(embeddings, labels, ks=RECALL_KS, seed: int = 0) -> dict:
    """Recall@K (each K of ``ks``), MAP@R and NMI of ``embeddings`` (N, D) with class ``labels`` (N,),
    every row a query against all the others (see the module docstring). ``seed`` seeds the k-means."""
    x = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64 if np.asarray(embeddings).dtype == np.float64
                        else torch.float32)
    y = torch.as_tensor(np.asarray(labels)).long()
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"retrieval_metrics needs embeddings (N, D) and labels (N,), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if len(x) < 2:
        raise ValueError(f"retrieval needs at least 2 embeddings (a query and a gallery), got {len(x)}")
    ks = tuple(int(k) for k in ks)
    counts = torch.unique(y, return_counts=True)[1]
    # neighbours needed: R = (class size - 1) for MAP@R, max(ks) for Recall@K; never more than N - 1
    k_neighbours = int(min(len(x) - 1, max(int(counts.max()), max(ks))))
    scores = _calculator(ks, k_neighbours, seed).get_accuracy(x, y)
    not_lone = int((counts[torch.searchsorted(torch.unique(y), y)] > 1).sum())
    out = {f"recall_at_{k}": float(v) for k, v in scores["recall_at_k"].items()}
    if 1 in ks:  # pml's own precision@1 (the same neighbour lists, the same number)
        out["recall_at_1"] = float(scores["precision_at_1"])
    out.update(map_at_r=float(scores["mean_average_precision_at_r"]), nmi=float(scores["NMI"]),
               n_queries=not_lone)
    return out
