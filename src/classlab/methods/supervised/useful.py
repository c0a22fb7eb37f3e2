"""USEFUL (UpSample Early For Uniform Learning): retrain on a training set where the examples the
network learns slowly are upsampled once.

Nguyen, Haddad, Gan, Mirzasoleiman, "Changing the Training Data Distribution to Reduce Simplicity
Bias Improves In-distribution Generalization", NeurIPS 2024.

Two engine stages (``training_stages``):
1. ``probe``: train briefly (``probe_epochs``; the paper separates at epoch 8 of 200 for ResNet18
   on CIFAR-10), with the loss of ``erm``.
2. ``end_stage("probe")``: for every class c, k-means with k = 2 on the network's output vectors
   (logits) of c's training examples splits them into two clusters; the cluster with the higher
   mean cross-entropy loss holds the examples with slow-learnable features. The next training set
   is every example once plus the slow cluster ``upsample_factor - 1`` more times (the paper
   upsamples once: factor 2), so class c contributes |c| + (factor - 1) |slow_c| positions:
       D' = D  +  (factor - 1) x  U_c argmax_{C in kmeans_2(f(x) : y = c)} mean_{x in C} CE(f(x), c).
   The engine writes these positions to ``stage_probe_indices.json`` in the run's outputs.
3. ``retrain``: ``reinit`` restarts the model and the optimizer from the run's initial weights,
   and trains ``epochs`` epochs on the resampled set.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.supervised.erm import ERM


def slow_cluster_mask(outputs: np.ndarray, losses: np.ndarray, seed: int) -> np.ndarray:
    """Boolean mask over one class's examples: the k = 2 k-means cluster of ``outputs`` whose mean
    ``losses`` is higher. Fewer than two distinct output vectors: nothing is slow."""
    from sklearn.cluster import KMeans

    n = len(outputs)
    if n < 2 or len(np.unique(outputs, axis=0)) < 2:
        return np.zeros(n, dtype=bool)
    labels = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(outputs)
    means = [losses[labels == k].mean() if (labels == k).any() else -np.inf for k in (0, 1)]
    return labels == int(np.argmax(means))


def upsample_slow_clusters(outputs: torch.Tensor, losses: torch.Tensor, labels: torch.Tensor,
                           positions: torch.Tensor, factor: int = 2, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The next stage's training positions: all of ``positions`` once, then each class's slow cluster
    ``factor - 1`` more times. Returns them and per-class counts ({class: (size, slow size)})."""
    outputs_np, losses_np = outputs.float().cpu().numpy(), losses.float().cpu().numpy()
    labels, positions = labels.cpu(), positions.cpu()
    extra, counts = [], {}
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        slow = slow_cluster_mask(outputs_np[members.numpy()], losses_np[members.numpy()], seed)
        chosen = positions[members[torch.from_numpy(slow)]]
        extra.append(chosen.repeat(max(int(factor), 1) - 1))
        counts[int(c)] = (int(len(members)), int(slow.sum()))
    return torch.cat([positions] + extra).long(), counts


@register_method("supervised", "useful")
class USEFUL(ERM):
    def training_stages(self) -> list[dict]:
        return [{"name": "probe", "epochs": int(self.hparams["probe_epochs"])},
                {"name": "retrain", "reinit": True}]

    @torch.no_grad()
    def end_stage(self, name: str, loader) -> torch.Tensor | None:
        if name != "probe":
            return None
        outputs, losses, labels, positions = [], [], [], []
        for batch in loader:  # the probe's training samples in order, unaugmented; the model in eval mode
            logits = self.model(batch["x"]).float()
            outputs.append(logits.cpu())
            losses.append(F.cross_entropy(logits, batch["y"], reduction="none").cpu())
            labels.append(batch["y"].cpu())
            positions.append(batch["index"].cpu())
        resampled, counts = upsample_slow_clusters(torch.cat(outputs), torch.cat(losses), torch.cat(labels),
                                                   torch.cat(positions), int(self.hparams["upsample_factor"]),
                                                   int(self.hparams["kmeans_seed"]))
        slow = sum(s for _, s in counts.values())
        total = sum(n for n, _ in counts.values())
        print(f"useful: slow-learnable clusters hold {slow}/{total} examples "
              f"({', '.join(f'class {c}: {s}/{n}' for c, (n, s) in counts.items())}); "
              f"retraining on {len(resampled)}", file=sys.stderr, flush=True)
        return resampled
