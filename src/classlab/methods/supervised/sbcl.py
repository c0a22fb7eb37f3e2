"""SBCL: subclass-balancing contrastive learning for long-tailed recognition.

Hou, Zhang, Wang and Zhou, "Subclass-balancing Contrastive Learning for Long-tailed
Recognition", ICCV 2023 (official code: github.com/JackHck/SBCL, SimCLR/main.py and loss.py for
CIFAR-LT, whose rules and defaults are followed where the text leaves a choice).

Subclasses. Let M = max(n_tail, 10), n_tail the size of the smallest class of the (long-tailed)
training set. Class c is clustered into k_c = max(floor(n_c / M), 1) subclasses of similar size
(tail-sized): k-means on the L2-normalised projections z of its samples (cosine distance), with a
balanced assignment (each cluster gets floor(n_c/k_c) or one more sample) so that the subclasses
are as equal in size as the paper asks (``balanced_clusters: false`` gives plain k-means, as the
official CIFAR script's ``kmeans`` call does). A tail class is its own single subclass. The
clustering runs on the model in training, every ``recluster_every`` epochs after
``warmup_epochs`` epochs of plain SupCon (official: 10 and 10 of 1000); the subclass of each
training sample is a buffer indexed by its train-split position, so checkpoints and resumes keep it.

Loss (bi-granularity SupCon over the 2N views; i' is the other view of anchor i, s the subclass,
y the class):

    subclass level (tau1): positives S(i) = same subclass (i' included), denominator all a != i
        L_sub(i) = -1/|S(i)| sum_{p in S(i)} log exp(z_i.z_p/tau1) / sum_{a != i} exp(z_i.z_a/tau1)
    class level (tau2): positives C(i) = {i'} + same class in another subclass,
        denominator D(i) = {i'} + every view of another subclass (the own subclass is left out)
        L_cls(i) = -1/|C(i)| sum_{p in C(i)} log exp(z_i.z_p/tau2) / sum_{a in D(i)} exp(z_i.z_a/tau2)
    L = mean_i L_sub(i) + beta mean_i L_cls(i)

So the first term makes each subclass compact (subclass balance: a head class contributes many
tail-sized subclasses instead of one huge one), the second keeps a class's subclasses closer to
each other than to other classes' subclasses. When every class is a single subclass, L_sub is
exactly SupCon at tau1 and L_cls pulls each view towards its own other view against the other
classes only. tau2 is per class (``adaptive_tau2``, official ``Ranking`` rule after Prototypical
Contrastive Learning's concentration): phi_c = mean_i ||z_i - mu_c|| / log(n_c + 10), clipped to
its 10th..90th percentile over classes, tau2_c = tau2 phi_c / mean(phi); a single-subclass class
keeps tau2. Defaults from the official CIFAR code: tau1 = tau2 = 0.1, beta = 0.25 (its loss also
multiplies L_sub by tau1/0.07, a SupCon-code artefact not in the paper's equation, left out here).

Classifier: the paper trains a second stage (LDAM-DRW or class-balanced linear classifier) on
the frozen representation; here, as for ``supcon``, a linear head is trained jointly with
cross-entropy on detached features (``classlab.methods.supervised.supcon``), so that SBCL,
``supcon_lt`` and ``ce_lt`` differ only in the representation loss. The long-tailed subset
(``imbalance_ratio: 100``) is cut by the engine (``classlab.train.long_tailed_subset``).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from classlab.data.loader import mix_seed
from classlab.methods.pretrain.simclr import gram
from classlab.methods.registry import register_method
from classlab.methods.supervised.supcon import SupCon, supcon_loss, supcon_per_anchor


def subclass_counts(class_counts: torch.Tensor, min_size: int = 10) -> tuple[torch.Tensor, int]:
    """k_c = max(floor(n_c / M), 1) with M = max(smallest non-empty class, ``min_size``); returns
    (k per class (0 for an empty class), M)."""
    counts = torch.as_tensor(class_counts, dtype=torch.long)
    present = counts[counts > 0]
    m = max(int(present.min()) if len(present) else 1, int(min_size), 1)
    k = torch.where(counts > 0, (counts // m).clamp_min(1), torch.zeros_like(counts))
    return k, m


def balanced_assign(sim: torch.Tensor) -> torch.Tensor:
    """Assign n points to k clusters maximising similarity greedily, with sizes floor(n/k) or
    floor(n/k) + 1: in rounds, every unassigned point proposes its best cluster that still has room
    and each cluster accepts its most similar proposers up to its room."""
    n, k = sim.shape
    base, extra = divmod(n, k)
    assign = torch.full((n,), -1, dtype=torch.long, device=sim.device)
    for room in (torch.full((k,), base, device=sim.device), torch.ones(k, dtype=torch.long, device=sim.device)):
        room = room.long()
        while bool((assign < 0).any()) and int(room.sum()) > 0:
            free = torch.nonzero(assign < 0).flatten()
            score, best = sim[free].masked_fill(room[None, :] <= 0, float("-inf")).max(dim=1)
            by_score = torch.argsort(score, descending=True)
            order = by_score[torch.argsort(best[by_score], stable=True)]  # grouped by cluster, best first
            cluster = best[order]
            sizes = torch.bincount(cluster, minlength=k)
            rank = torch.arange(len(order), device=sim.device) - (torch.cumsum(sizes, 0) - sizes)[cluster]
            take = rank < room[cluster]
            assign[free[order[take]]] = cluster[take]
            room = room - torch.bincount(cluster[take], minlength=k)
        if extra == 0:
            break
    return assign


def spherical_kmeans(z: torch.Tensor, k: int, gen: torch.Generator, iters: int = 20,
                     balanced: bool = True) -> torch.Tensor:
    """Cluster ids of the L2-normalised rows of ``z`` into ``k`` clusters (cosine similarity)."""
    n = len(z)
    if k <= 1 or n <= 1:
        return torch.zeros(n, dtype=torch.long, device=z.device)
    k = min(k, n)
    centres = z[torch.randperm(n, generator=gen)[:k].to(z.device)].clone()
    assign = None
    for _ in range(iters):
        sim = z @ centres.T
        new = balanced_assign(sim) if balanced else sim.argmax(dim=1)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, z)
        filled = torch.bincount(assign, minlength=k) > 0
        centres = torch.where(filled[:, None], F.normalize(sums, dim=1), centres)  # an empty cluster keeps its centre
    return assign


def split_subclasses(z: torch.Tensor, y: torch.Tensor, num_classes: int, min_size: int, gen: torch.Generator,
                     balanced: bool = True, iters: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Global subclass ids (class c's subclasses numbered after those of classes < c) and k per class."""
    z = F.normalize(z.float(), dim=1)
    k_per_class, _ = subclass_counts(torch.bincount(y, minlength=num_classes), min_size)
    ids = torch.full((len(y),), -1, dtype=torch.long, device=z.device)
    offset = 0
    for c in range(num_classes):
        members = torch.nonzero(y == c).flatten()
        if len(members) == 0:
            continue
        ids[members] = offset + spherical_kmeans(z[members], int(k_per_class[c]), gen, iters, balanced)
        offset += int(k_per_class[c])
    return ids, k_per_class


def class_temperatures(z: torch.Tensor, y: torch.Tensor, k_per_class: torch.Tensor, tau2: float) -> torch.Tensor:
    """Per-class tau2 from each class's concentration phi_c = mean ||z - mu_c|| / log(n_c + 10)."""
    num_classes = len(k_per_class)
    phi = torch.zeros(num_classes, dtype=torch.float64)
    present = torch.zeros(num_classes, dtype=torch.bool)
    for c in range(num_classes):
        zc = z[y == c].double()
        if len(zc):
            phi[c] = (zc - zc.mean(0)).norm(dim=1).mean().cpu() / np.log(len(zc) + 10)
            present[c] = True
    out = torch.full((num_classes,), float(tau2), dtype=torch.float64)
    if int(present.sum()) >= 2:
        vals = phi[present].numpy()
        clipped = np.clip(vals, np.percentile(vals, 10), np.percentile(vals, 90))
        scaled = torch.as_tensor(tau2 * clipped / max(clipped.mean(), 1e-12))
        out[present] = scaled.clamp_min(1e-3)
    out[k_per_class.cpu() <= 1] = float(tau2)  # a class of one subclass keeps the base temperature
    return out.float()


def sbcl_loss(z: torch.Tensor, y: torch.Tensor, s: torch.Tensor, tau1: float, tau2: torch.Tensor | float,
              beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two-level loss over 2N views stacked view after view (row i and row i + N are the two
    views of one image). Returns (L, mean L_sub, mean L_cls)."""
    m = len(z)
    half = m // 2
    # subclass level: SupCon with subclass labels at tau1 (positives include the other view)
    l_sub, _ = supcon_per_anchor(z, s, tau1)
    # class level at tau2: C(i) = {i'} + same class, other subclass; D(i) = {i'} + other subclasses
    idx = torch.arange(m, device=z.device)
    own = torch.zeros(m, m, dtype=torch.bool, device=z.device)
    own[idx, (idx + half) % m] = True
    other_sub = s[:, None] != s[None, :]
    denom = other_sub | own
    pos = ((y[:, None] == y[None, :]) & other_sub) | own
    t2 = tau2[:, None] if torch.is_tensor(tau2) else tau2
    logits = (gram(z) / t2).masked_fill(~denom, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    l_cls = -log_prob.masked_fill(~pos, 0.0).sum(1) / pos.sum(1)
    return l_sub.mean() + beta * l_cls.mean(), l_sub.mean(), l_cls.mean()


@register_method("supervised", "sbcl")
class SBCL(SupCon):
    """SupCon on subclasses of head classes (tau1) plus a class-level term over subclasses (tau2, beta)."""

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.tau1 = self.temperature  # ``temperature``: the subclass-level tau1
        self.tau2 = float(hparams.get("tau2", 0.1))
        if self.tau2 <= 0:
            raise ValueError(f"supervised/{self.name}: tau2 must be > 0, got {self.tau2}")
        self.beta = float(hparams.get("beta", 0.25))
        self.min_subclass_size = int(hparams.get("min_subclass_size", 10))
        self.warmup_epochs = int(hparams.get("warmup_epochs", 0))
        self.recluster_every = max(int(hparams.get("recluster_every", 1)), 1)
        self.balanced = bool(hparams.get("balanced_clusters", True))
        self.adaptive_tau2 = bool(hparams.get("adaptive_tau2", True))
        self.kmeans_iters = int(hparams.get("kmeans_iters", 20))
        self._loader = None
        # subclass of each train-split position (-1: not clustered yet); sized at on_train_start
        self.register_buffer("subclass_of", torch.zeros(0, dtype=torch.long))
        self.register_buffer("subclasses_per_class", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("tau2_class", torch.full((num_classes,), self.tau2))
        self.register_buffer("clustered_epoch", torch.tensor(-1, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "subclass_of"
        if key in state_dict:
            self.subclass_of = torch.empty_like(state_dict[key], device=self.subclass_of.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def on_train_start(self, loader) -> None:
        if not hasattr(loader, "x") or not hasattr(loader, "source_index"):
            raise TypeError(f"supervised/{self.name} clusters the training set: it needs a TensorLoader")
        self._loader = loader
        self.subclass_of = torch.full((int(loader.num_train_samples),), -1, dtype=torch.long,
                                      device=self.subclass_of.device)
        self.clustered_epoch.fill_(-1)

    def on_epoch_start(self, epoch: int) -> None:
        due = epoch >= self.warmup_epochs and (epoch - self.warmup_epochs) % self.recluster_every == 0
        if self._loader is not None and due and int(self.clustered_epoch) != epoch:  # a resumed epoch keeps its split
            self.recluster(epoch)

    @torch.no_grad()
    def recluster(self, epoch: int) -> None:
        """Cluster every class of the training set into tail-sized subclasses on the current projections."""
        loader = self._loader
        was = self.training
        self.eval()
        try:
            z = torch.cat([F.normalize(self.projector(self.model.features(loader.normalize(loader.x[i:i + 1024]))), dim=1)
                           for i in range(0, len(loader.y), 1024)])
        finally:
            self.train(was)
        y = loader.y.long()
        gen = torch.Generator().manual_seed(mix_seed(int(getattr(loader, "seed", 0)), epoch, 0x5BC1))
        ids, k_per_class = split_subclasses(z, y, self.num_classes, self.min_subclass_size, gen, self.balanced,
                                            self.kmeans_iters)
        self.subclass_of.fill_(-1)
        self.subclass_of[loader.source_index.to(self.subclass_of.device)] = ids.to(self.subclass_of.device)
        self.subclasses_per_class.copy_(k_per_class)
        tau = class_temperatures(z, y, k_per_class, self.tau2) if self.adaptive_tau2 \
            else torch.full((self.num_classes,), self.tau2)
        self.tau2_class.copy_(tau)
        self.clustered_epoch.fill_(epoch)

    def contrastive_loss(self, z, batch):
        reps = len(z) // len(batch["y"])
        y = batch["y"].repeat(reps)
        s = self.subclass_of[batch["index"]].repeat(reps) if len(self.subclass_of) else None
        if s is None or bool((s < 0).any()):  # warm-up (not clustered yet): plain SupCon, as the official code
            return supcon_loss(z, y, self.tau1), {}
        loss, l_sub, l_cls = sbcl_loss(z, y, s, self.tau1, self.tau2_class[y], self.beta)
        return loss, {"l_subclass": l_sub.detach(), "l_class": l_cls.detach()}
