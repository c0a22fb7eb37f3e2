"""ProtoGCD: unified prototypes with dual-level adaptive pseudo-labelling and two regularisers.

Ma, Zhu, Zhang and Liu, "ProtoGCD: Unified and Unbiased Prototype Learning for Generalized Category
Discovery", IEEE TPAMI 2025 (official code: github.com/mashijie1028/ProtoGCD).

One set of K learnable prototypes mu_k (unit vectors, ``CosinePrototypes``) models the old and the new
classes alike; p(x) = softmax(<mu_k, h / |h|> / tau), tau = 0.1. On top of SimGCD's structure
(``classlab.methods.discovery.simgcd``: supervised cross-entropy on the labelled samples, cross-view
self-distillation on all of them, GCD's representation losses), ProtoGCD changes the pseudo-labels
and adds a second regulariser:

- Dual-level adaptive pseudo-labelling (DAPL). The teacher is the same head, detached, sharpened at
  a fixed tau_t = 0.05: q = softmax(s / tau_t). Each sample's confidence is the ratio of its two largest
  teacher probabilities, c_i = q_(1) / q_(2). The top r% of each view's samples by c_i get the one-hot
  pseudo-label of argmax q (hard level), the others keep q (soft level), and r ramps up linearly with
  the epochs (0 -> 100% over the first half of training in the paper), as the model becomes more
  reliable. The loss is the cross-view cross-entropy 1/2 sum_{v != v'} mean_i H(q~_{i,v'}, p_{i,v}).
- Entropy regularisation: log K - H(mean_i p_i) (SimGCD's mean-entropy term, weight eps = 2), which
  keeps every prototype in use.
- Inter-class separation of the prototypes:
      L_sep = 1/K sum_i log( 1/(K-1) sum_{j != i} exp(<mu_i, mu_j> / tau) )
  (weight 0.1 on CIFAR-100, 0.05 on CUB in the official scripts).

      L = (1 - lambda)(L_DAPL + eps L_ent + w_sep L_sep) + lambda L_ce + L_rep,   lambda = 0.35

Class-number estimation (``estimate_k``, the paper's Sec. 4, "prototype score"): for each candidate k,
a model with k prototypes is scored by the sum of (i) an accuracy score: the clustering accuracy of the
labelled samples under the model's own predictions (Hungarian matching), which falls when k is too
large and the known classes split; and (ii) a centroid score: the mean cosine similarity between each
known class's centroid of labelled features and the centroid of the unlabelled features predicted into
that class's prototype, which falls when k is too small and novel samples are absorbed into known
classes. The k with the highest score is kept (ties: the smaller k).

The paper trains one ProtoGCD model per candidate k: a sweep of whole runs, out of reach inside one
run on a CPU. Here the k prototypes of each candidate are fitted on the trained backbone's features by
semi-supervised spherical k-means (the known classes' prototypes start at their labelled means and
hold their labelled samples, as the supervised loss does in training), and the score is computed on
those prototypes. The released code has no estimation; the authors' snippet in
github.com/mashijie1028/ProtoGCD/issues/3 names the two parts (accuracy and centroid scores) and builds
the known classes' labelled centroids and the prototypes' pseudo-labelled centroids of the unlabelled
data. Comparing the two by their cosine similarity, class by class, is this file's reading of it (the
rest of the snippet could not be read here). The estimate is reported (``estimated_k``); training keeps
the head of ``num_clusters`` prototypes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from classlab.methods.discovery.simgcd import SimGCD, mean_entropy_penalty
from classlab.methods.discovery_learner import as_numpy, semi_supervised_kmeans, squared_distances
from classlab.methods.registry import register_method


def hard_label_ratio(epoch: int, ramp_epochs: int, start: float = 0.0, end: float = 1.0, wait_epochs: int = 0) -> float:
    """DAPL's share r of hard pseudo-labels at ``epoch`` (0-based): 0 for ``wait_epochs`` epochs, then
    ``ramp_epochs`` values evenly spaced from ``start`` to ``end`` (both included, as numpy's linspace
    in the official schedule), then ``end``."""
    if epoch < wait_epochs:
        return 0.0
    e = epoch - wait_epochs
    if ramp_epochs <= 0 or e >= ramp_epochs:
        return float(end)
    if ramp_epochs == 1:
        return float(start)
    return float(start + (end - start) * e / (ramp_epochs - 1))


def dapl_targets(teacher_logits: torch.Tensor, temperature: float, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DAPL's pseudo-labels for one view: q = softmax(s / tau_t) (no gradient); the floor(ratio * B)
    samples with the largest q_(1) / q_(2) get one_hot(argmax q), the others keep q.
    Returns (targets [B, K], hard [B] bool)."""
    q = F.softmax(teacher_logits.detach().float() / temperature, dim=1)
    hard = torch.zeros(len(q), dtype=torch.bool, device=q.device)
    n_hard = min(int(len(q) * ratio), len(q))
    if n_hard <= 0:
        return q, hard
    if q.shape[1] < 2:
        hard[:] = True
        return torch.ones_like(q), hard
    top2 = q.topk(2, dim=1).values
    confidence = top2[:, 0] / (top2[:, 1] + 1e-6)  # c_i = q_(1) / q_(2)
    hard[confidence.topk(n_hard).indices] = True
    targets = torch.where(hard[:, None], F.one_hot(q.argmax(1), q.shape[1]).to(q), q)
    return targets, hard


def dapl_distillation(logits: list[torch.Tensor], teacher_temperature: float, student_temperature: float,
                      ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """L_DAPL = mean over ordered view pairs (v != v') of mean_i H(q~_{i,v'}, softmax(s_{i,v} / tau_s)).
    Returns (loss, the number of hard pseudo-labels over the views)."""
    targets = [dapl_targets(s, teacher_temperature, ratio) for s in logits]
    total, terms = 0.0, 0
    for t, (q, _) in enumerate(targets):
        for v, s in enumerate(logits):
            if v == t:
                continue
            total = total + (-q * F.log_softmax(s.float() / student_temperature, dim=1)).sum(1).mean()
            terms += 1
    return total / max(terms, 1), sum(hard.sum() for _, hard in targets)


def prototype_separation(prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_sep over the rows of ``prototypes`` [K, d] (normalised here): the mean over prototypes of the
    log of the mean of exp(cosine / tau) to the other prototypes; lower when they spread apart."""
    mu = F.normalize(prototypes.float(), dim=1)
    k = len(mu)
    if k < 2:
        return prototypes.sum() * 0.0
    sim = mu @ mu.T / temperature
    sim = sim.masked_fill(torch.eye(k, dtype=torch.bool, device=sim.device), float("-inf"))
    # L_sep = 1/K sum_i log( 1/(K-1) sum_{j != i} exp(<mu_i, mu_j> / tau) )
    return (torch.logsumexp(sim, dim=1) - math.log(k - 1)).mean()


def prototype_score(features: np.ndarray, labels: np.ndarray, k: int, seed: int, iters: int = 100,
                    restarts: int = 3) -> dict:
    """ProtoGCD's prototype score of ``k`` prototypes fitted on ``features`` (rows L2-normalised here;
    ``labels`` a label index or -1): accuracy score + centroid score (see the module docstring)."""
    from classlab.metrics.discovery import cluster_accuracy

    f = np.asarray(features, dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    lab = labels >= 0
    if not lab.any():
        raise ValueError("protogcd: the prototype score needs labelled samples (labels >= 0)")
    _, centres, _ = semi_supervised_kmeans(f, labels, k, seed, iters, restarts)
    pred = squared_distances(f, centres).argmin(1)  # every sample, labelled ones too, by its nearest prototype
    accuracy = float(cluster_accuracy(labels[lab], pred[lab]))
    sims = []
    for c in range(int(labels[lab].max()) + 1):
        members = f[~lab & (pred == c)]
        if not (labels == c).any() or not len(members):
            sims.append(0.0)  # a known class whose prototype takes no unlabelled sample is not found at all
            continue
        a, b = f[labels == c].mean(0), members.mean(0)
        sims.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12)))
    centroid = float(np.mean(sims))
    return {"score": accuracy + centroid, "accuracy": accuracy, "centroid": centroid}


def estimate_num_classes_by_prototype_score(features: np.ndarray, labels: np.ndarray, k_min: int, k_max: int,
                                            seed: int, iters: int = 100, restarts: int = 3) -> tuple[int, dict]:
    """argmax_k of the prototype score over k_min..k_max (ties, to 1e-9: the smaller k). Returns (k, {k: score})."""
    known = int(np.asarray(labels)[np.asarray(labels) >= 0].max()) + 1 if (np.asarray(labels) >= 0).any() else 0
    if k_min < max(known, 1) or k_max < k_min:
        raise ValueError(f"protogcd: the k search needs {max(known, 1)} <= k_min <= k_max (the labelled classes "
                         f"have {known} prototypes), got k_min={k_min}, k_max={k_max}")
    scores = {k: prototype_score(features, labels, k, seed, iters, restarts)["score"] for k in range(k_min, k_max + 1)}
    best = max(scores.values())
    return min(k for k, s in scores.items() if s >= best - 1e-9), scores


@register_method("discovery", "protogcd")
class ProtoGCD(SimGCD):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        hp = self.hparams
        self.separation_weight = float(hp.get("separation_weight", 0.1))
        self.separation_temperature = float(hp.get("separation_temperature", hp.get("student_temperature", 0.1)))
        self.ramp_epochs = int(hp.get("dapl_ramp_epochs", 100))
        self.wait_epochs = int(hp.get("dapl_wait_epochs", 0))
        self.ratio_start = float(hp.get("dapl_ratio_start", 0.0))
        self.ratio_end = float(hp.get("dapl_ratio_end", 1.0))
        for name, value in (("dapl_ratio_start", self.ratio_start), ("dapl_ratio_end", self.ratio_end)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"discovery/protogcd: {name} must be in [0, 1], got {value}")
        if self.separation_weight < 0:
            raise ValueError(f"discovery/protogcd: separation_weight must be >= 0, got {self.separation_weight}")
        if self.separation_temperature <= 0:
            raise ValueError(f"discovery/protogcd: separation_temperature must be > 0, got "
                             f"{self.separation_temperature}")
        if self.ramp_epochs < 0 or self.wait_epochs < 0:
            raise ValueError(f"discovery/protogcd: dapl_ramp_epochs and dapl_wait_epochs must be >= 0, got "
                             f"{self.ramp_epochs} and {self.wait_epochs}")

    def tau_t(self) -> float:
        # the paper's teacher: fixed at 0.05 (no warm-up unless teacher_warmup_epochs asks for one)
        hp = self.hparams
        if int(hp.get("teacher_warmup_epochs", 0)) > 0:
            return super().tau_t()
        return float(hp.get("teacher_temperature", 0.05))

    def hard_ratio(self) -> float:
        return hard_label_ratio(self.epoch, self.ramp_epochs, self.ratio_start, self.ratio_end, self.wait_epochs)

    def cluster_loss(self, logits, batch):
        """L_DAPL + eps L_ent + w_sep L_sep (weighted by 1 - lambda in ``training_step``)."""
        distill, n_hard = dapl_distillation(logits, self.tau_t(), self.tau_s, self.hard_ratio())
        entropy = mean_entropy_penalty(torch.cat(logits), self.tau_s)
        separation = prototype_separation(self.prototypes.weight[:int(self.task_info.num_clusters)],
                                          self.separation_temperature)
        loss = distill + float(self.hparams.get("memax_weight", 2.0)) * entropy + self.separation_weight * separation
        return loss, {"dapl": distill.detach(), "memax": entropy.detach(), "separation": separation.detach(),
                      "hard_labels": torch.as_tensor(n_hard).detach()}

    def end_task(self, task_id, context):
        if not self.hparams.get("estimate_k", True):
            return
        pool = torch.cat([context.labelled, context.unlabelled]).unique()
        features = as_numpy(F.normalize(context.embed(pool).float(), dim=1)).astype(np.float64)
        labels = as_numpy(context.visible_labels[pool])
        known = int(labels.max()) + 1 if (labels >= 0).any() else 0
        if known == 0:
            return  # no labelled class to score against
        k_min = max(int(self.hparams.get("k_min") or known), known, 1)
        k_max = int(self.hparams.get("k_max") or 2 * self.num_classes)
        k, _ = estimate_num_classes_by_prototype_score(features, labels, k_min, max(k_max, k_min), context.seed,
                                                       int(self.hparams.get("kmeans_iters", 100)),
                                                       int(self.hparams.get("n_init", 3)))
        self.estimated_k.fill_(k)
