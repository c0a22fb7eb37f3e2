"""The discovery learner: what every category-discovery method builds on, without depending on a protocol.

The discovery protocol (``classlab.protocols.discovery``) owns the split (known and novel classes,
the labelled subset), the loop over its tasks (one for GCD and NCD; one per stage for continual
discovery; one per query round for active discovery), hiding labels and evaluation. A learner says
only what differs:

- ``begin_task(t, info)``: ``info`` is a :class:`DiscoveryTask` (how many label indices exist so
  far, how many clusters to find, the classes this task brings);
- ``training_step(batch)``: the loss of one batch. ``batch["y"]`` holds a *label index* for the
  labelled samples (the known classes are 0..k-1 in sorted order; classes revealed later, by
  queries, get the next indices) and -1 for every unlabelled sample, whose label the learner never
  sees; ``batch["views"]`` holds the two augmented views;
- ``end_task(t, context)``: clustering on the features (k-means, semi-supervised k-means, class-number
  estimation), prototypes;
- ``predict(x)``: scores over clusters, [B, K]; the argmax is the sample's cluster id. Evaluation
  matches cluster ids to classes (Hungarian), so a cluster id means nothing by itself, except that
  for the labelled classes a parametric head uses the label index as its output index.
- ``predict_in_domain(x, domain)`` (latent label shift): scores given each sample's domain; in a
  ``latent_shift`` split ``batch["y"]`` holds the sample's *domain* (its class is hidden);
- ``select_queries(context, budget)`` (active discovery): which unlabelled samples to label next;
  ``map_revealed(classes, context)``: which head index each newly revealed class takes.

Everything a learner keeps across tasks is a submodule or buffer sized at construction (or
resized in ``_load_from_state_dict``), so one ``state_dict`` per task checkpoints it.

Shared pieces of the GCD line of work live here too, so that GCD, SimGCD and their descendants
compute them once: the representation loss of GCD (Vaze et al., CVPR 2022), the cosine prototype
head of SimGCD (Wen et al., ICCV 2023) and semi-supervised k-means.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.base import Method
from classlab.methods.pretrain.simclr import ProjectionHead, augmented_views, nt_xent
from classlab.methods.supervised.supcon import supcon_loss


@dataclass
class DiscoveryTask:
    """What the protocol tells a learner at the start of task ``t``."""

    task_id: int
    num_label_indices: int        # label indices 0..n-1 exist (the known classes, then revealed ones)
    num_clusters: int             # clusters to find among the data seen so far (the true count unless estimated)
    new_clusters: int = 0         # continual discovery: how many classes this stage brings
    kind: str = "gcd"
    # the dataset class of each label index (known classes first; not secret: they are the labelled
    # ones; -1 at an index no class holds), for methods that read a model whose head is indexed by
    # dataset class (a supervised init)
    label_classes: list[int] = field(default_factory=list)


@dataclass
class DiscoveryContext:
    """What ``end_task`` and ``select_queries`` may use."""

    task_id: int
    labelled: torch.Tensor        # train positions with a visible label
    unlabelled: torch.Tensor      # train positions of this task's unlabelled pool
    visible_labels: torch.Tensor  # [N train] label index, -1 where hidden
    embed: Callable[[torch.Tensor], torch.Tensor]    # train positions -> backbone features (eval, no aug)
    scores: Callable[[torch.Tensor], torch.Tensor]   # train positions -> predict() scores (eval, no aug)
    device: torch.device
    seed: int = 0
    train_x: torch.Tensor | None = None  # uint8, the whole prepared train split (for a phase's loader)
    mean: list[float] | None = None      # the loader's per-channel normalisation (images / 255)
    std: list[float] | None = None
    domains: torch.Tensor | None = None  # latent_shift: [N train] domain id, -1 outside the split


class DiscoveryLearner(Method):
    """Base learner. Subclasses implement ``training_step`` (or train nothing) and ``predict``."""

    scenario_kinds: tuple[str, ...] = ()  # from the method YAML's `scenario_kinds` (set by the registry)
    scenario_kind: str | None = None      # set by the protocol
    num_views = 2
    trains = True                         # False: no training step at all (k-means on fixed features)
    phase = "train"

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        self.task_info = DiscoveryTask(0, 0, num_classes)
        self.register_buffer("estimated_k", torch.tensor(-1, dtype=torch.long))  # -1: not estimated

    # --- template hooks -----------------------------------------------------------------
    def set_init_model(self, source: nn.Module, meta: dict) -> None:
        """The model the run started from (a Classifier: backbone and head), and its metadata; the
        protocol has already copied its backbone into ``self.model``. Default: nothing more."""

    def task_phases(self, task_id: int) -> list[str]:
        return ["train"] if self.trains else []

    def phase_hparams(self, phase: str) -> dict:
        return {}

    def phase_loader(self, phase: str, context, trainer):
        return None

    def begin_task(self, task_id: int, info: DiscoveryTask) -> None:
        self.task_info = info

    def end_task(self, task_id: int, context: DiscoveryContext) -> None:
        pass

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.features(x)

    def forward(self, x):
        return self.predict(x)

    def predict_in_domain(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        """latent_shift: scores of samples drawn from ``domain`` (LLS's p_d(y|x)); default ``predict(x)``."""
        return self.predict(x)

    def select_queries(self, context: DiscoveryContext, budget: int) -> torch.Tensor:
        """Active discovery: ``budget`` unlabelled train positions to label (default: uniform at random)."""
        gen = torch.Generator().manual_seed(context.seed * 7919 + context.task_id)
        pool = context.unlabelled[context.visible_labels[context.unlabelled] < 0]
        return pool[torch.randperm(len(pool), generator=gen)[:budget]]

    def map_revealed(self, classes: list[int], first_index: int, context: DiscoveryContext | None,
                     queried: torch.Tensor | None = None, queried_classes: torch.Tensor | None = None) -> dict[int, int]:
        """The head index of each newly revealed class (default: the next free indices, in class order)."""
        return {c: first_index + k for k, c in enumerate(sorted(classes))}


# --- pieces shared by the GCD line of work -----------------------------------------------------

def labelled_mask(batch: dict) -> torch.Tensor:
    return batch["y"] >= 0


class GCDRepresentation(nn.Module):
    """GCD's representation loss (Vaze, Han, Vedaldi and Zisserman, "Generalized Category
    Discovery", CVPR 2022, Eq. 3):

        L_rep = (1 - lambda) L_u + lambda L_s

    L_u: the self-supervised contrastive loss (NT-Xent) over every sample of the batch, labelled or
    not; L_s: the supervised contrastive loss over the labelled samples only; lambda = 0.35 in the
    paper. Both on z = normalise(g(h)) through a projection head g."""

    def __init__(self, in_dim: int, proj_dim: int = 128, hidden: int = 0, sup_weight: float = 0.35,
                 unsup_temperature: float = 1.0, sup_temperature: float = 0.07):
        super().__init__()
        self.projector = ProjectionHead(in_dim, proj_dim, hidden)
        self.sup_weight, self.t_u, self.t_s = sup_weight, unsup_temperature, sup_temperature

    @classmethod
    def from_hparams(cls, in_dim: int, hp: dict) -> "GCDRepresentation":
        """The loss with a method's settings (``proj_dim``, ``proj_hidden``, ``sup_weight``, the two temperatures)."""
        return cls(in_dim, int(hp.get("proj_dim", 128)), int(hp.get("proj_hidden", 0)), float(hp.get("sup_weight", 0.35)),
                   float(hp.get("unsup_temperature", 1.0)), float(hp.get("sup_temperature", 0.07)))

    def forward(self, h1: torch.Tensor, h2: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
        z1, z2 = F.normalize(self.projector(h1), dim=1), F.normalize(self.projector(h2), dim=1)
        l_u = nt_xent(z1, z2, self.t_u)
        mask = labels >= 0
        if bool(mask.any()):
            l_s = supcon_loss(torch.cat([z1[mask], z2[mask]]), torch.cat([labels[mask], labels[mask]]), self.t_s)
        else:
            l_s = l_u * 0.0
        loss = (1 - self.sup_weight) * l_u + self.sup_weight * l_s  # L_rep = (1 - lambda) L_u + lambda L_s
        return loss, {"l_unsup": l_u.detach(), "l_sup": l_s.detach()}


class CosinePrototypes(nn.Module):
    """SimGCD's parametric classifier: logits_k = <w_k / |w_k|, h / |h|> / tau, one prototype per
    cluster (the weight-normalised last layer of its DINO head)."""

    def __init__(self, in_dim: int, num_clusters: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_clusters, in_dim) * (1.0 / in_dim ** 0.5))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(h, dim=1) @ F.normalize(self.weight, dim=1).T  # cosine similarity in [-1, 1]


def two_views(learner: Method, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    v = augmented_views(learner, batch)
    return v[0], v[1] if len(v) > 1 else v[0]


def squared_distances(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[N, K] squared Euclidean distances |x - c|^2 = |x|^2 - 2 x.c + |c|^2 (clipped at 0)."""
    return np.maximum((x ** 2).sum(1)[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None], 0.0)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator, fixed: np.ndarray | None = None) -> np.ndarray:
    """k-means++ seeding; ``fixed`` centres (the labelled classes' means) are kept and counted first."""
    centres = [c for c in fixed] if fixed is not None and len(fixed) else [x[rng.integers(len(x))]]
    while len(centres) < k:
        d2 = squared_distances(x, np.stack(centres)).min(1)
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1.0 / len(x))
        centres.append(x[rng.choice(len(x), p=p)])
    return np.stack(centres[:k])


def semi_supervised_kmeans(features: np.ndarray, labels: np.ndarray, k: int, seed: int, iters: int = 100,
                           restarts: int = 1) -> tuple[np.ndarray, np.ndarray, float]:
    """GCD's semi-supervised k-means: the labelled points (``labels >= 0``, label indices 0..k_l-1) stay
    in their class's cluster throughout; the centres of the labelled classes start at their means,
    the others by k-means++ over every point; unlabelled points go to their nearest centre.

    Returns (assignment of every point, centres [k, d], inertia). The labelled classes' clusters
    keep their label index as cluster id."""
    x = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    lab = labels >= 0
    known = int(labels[lab].max()) + 1 if lab.any() else 0
    if known > k:
        raise ValueError(f"semi-supervised k-means: {known} labelled classes but only k = {k} clusters")
    rng = np.random.default_rng(seed)
    fixed = np.stack([x[labels == c].mean(0) for c in range(known)]) if known else None
    best = None
    for _ in range(max(restarts, 1)):
        centres = kmeans_plus_plus(x, k, rng, fixed)
        assign = np.zeros(len(x), dtype=np.int64)
        for _ in range(iters):
            new = squared_distances(x, centres).argmin(1)
            new[lab] = labels[lab]  # labelled points never move
            if _ > 0 and np.array_equal(new, assign):
                break
            assign = new
            for c in range(k):
                members = x[assign == c]
                if len(members):
                    centres[c] = members.mean(0)
        inertia = float(((x - centres[assign]) ** 2).sum())
        if best is None or inertia < best[2]:
            best = (assign.copy(), centres.copy(), inertia)
    return best


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()

