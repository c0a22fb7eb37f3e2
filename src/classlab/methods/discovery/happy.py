"""Happy: continual generalized category discovery without replaying old data.

Ma, Zhu, Zhong, Liu, Zhang and Liu, "Happy: A Debiased Learning Framework for Continual
Generalized Category Discovery", NeurIPS 2024 (official code: mashijie1028/Happy-CGCD).

Stage 0 trains SimGCD on the labelled known classes (``SimGCDContinual``, which this class
extends; the baseline is that class alone). Each later stage s trains on stage s's unlabelled pool
(new classes plus recurring old ones) with K_s = K_old + K_new clusters, and adds three parts:

1. Clustering-guided initialisation (against the prediction bias toward old classes): before the
   stage trains, k-means with K_s clusters on the normalised features of the stage's pool (the
   model as the previous stage left it); the K_new centroids least similar to every old
   prototype, i.e. with the lowest max_k cos(c_j, w_k) over the old rows of the head, become the
   new classes' prototypes.
2. Soft entropy regularisation: with p_bar = mean_i softmax(s_i / tau_s) over the batch's views,
   P_old = sum_{k old} p_bar_k and P_new = 1 - P_old,

       L_soft = a (log 2 - H(P_old, P_new)) + b (log K_old - H(p_bar_old / P_old))
                + c (log K_new - H(p_bar_new / P_new)),

   which keeps the new classes' total share of the predictions away from zero and each group's
   clusters in use, without asking every cluster for the same share as SimGCD's mean entropy does.
3. Hardness-aware prototype sampling (against forgetting, the old classes' data being gone): each
   old class k keeps a prototype mu_k (the normalised mean feature of its samples: the labelled
   ones for the known classes, the ones predicted as k for a stage's new classes) and a hardness
   h_k = mean_{j != k} cos(mu_k, mu_j), its mean similarity to the other prototypes. A step
   samples old classes k ~ softmax(h / tau_h) (the harder, the more often), features
   mu_k + r * eps, eps ~ N(0, I), with r = sqrt(mean_k tr(Sigma_k) / d) measured on the known
   classes at stage 0, and replays them through the head:

       L_hap = CE(s(mu_k + r eps) / tau_s, k).

The official code also distils the features of the previous stage's model into the current one,
L_kd = mean_i |f(x_i)/|f(x_i)| - f_prev(x_i)/|f_prev(x_i)||^2, and uses only the unsupervised
contrastive term L_u at the unlabelled stages. A stage's loss (official: weights 1 each) is

    L = (1 - lambda) (L_distill + L_soft + L_u + w_hap L_hap + w_kd L_kd),

scaled by (1 - lambda) as SimGCD's unlabelled terms are, so that Happy and ``simgcd_continual``
train at the same step size and differ only in Happy's parts; the relative weights are the
paper's. After a stage, the new classes' prototypes join the old ones and every hardness is
recomputed.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from classlab.methods.discovery.simgcd import cross_view_distillation
from classlab.methods.discovery.simgcd_continual import SimGCDContinual
from classlab.methods.discovery_learner import DiscoveryContext, as_numpy, two_views
from classlab.methods.pretrain.simclr import view_generator
from classlab.methods.registry import register_method

_SAMPLING_SALT = 57  # keeps the prototype draws apart from the view augmentation's at the same step


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-12))).sum()


def soft_entropy_regulariser(logits: torch.Tensor, num_old: int, temperature: float, old_new_weight: float = 1.0,
                             old_weight: float = 1.0, new_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Happy's soft entropy regularisation over the clusters in use (``num_old`` old ones first):
    a (log 2 - H(P_old, P_new)) + b (log K_old - H(p_old / P_old)) + c (log K_new - H(p_new / P_new)),
    p = mean_i softmax(logits_i / temperature). Each bracket is 0 when its distribution is uniform."""
    p = F.softmax(logits.float() / temperature, dim=1).mean(0)
    p_old, p_new = p[:num_old], p[num_old:]
    mass_old, mass_new = p_old.sum(), p_new.sum()
    # the old/new balance: log 2 - H(P_old, P_new)
    old_vs_new = math.log(2) - _entropy(torch.stack([mass_old, mass_new]))
    # within each group, normalised to a distribution: log K - H(p_group / P_group)
    within_old = math.log(len(p_old)) - _entropy(p_old / mass_old.clamp_min(1e-12)) if len(p_old) else p.sum() * 0
    within_new = math.log(len(p_new)) - _entropy(p_new / mass_new.clamp_min(1e-12)) if len(p_new) else p.sum() * 0
    loss = old_new_weight * old_vs_new + old_weight * within_old + new_weight * within_new
    return loss, {"soft_old_new": old_vs_new.detach(), "soft_old": within_old.detach(),
                  "soft_new": within_new.detach()}


def class_prototypes_and_radius(features: torch.Tensor, labels: torch.Tensor,
                                num_classes: int) -> tuple[torch.Tensor, float]:
    """Per class k < ``num_classes``: the normalised mean mu_k of its (normalised) features, and the
    shared radius r = sqrt(mean_k tr(Sigma_k) / d) (population covariance; classes without a sample
    are left out of the mean and get a zero prototype)."""
    f = F.normalize(features.float(), dim=1)
    protos = torch.zeros(num_classes, f.shape[1], dtype=f.dtype, device=f.device)
    spreads = []
    for k in range(num_classes):
        members = f[labels == k]
        if len(members) == 0:
            continue
        mean = members.mean(0)
        protos[k] = mean
        spreads.append(((members - mean) ** 2).sum(1).mean() / f.shape[1])  # tr(Sigma_k) / d
    radius = float(torch.stack(spreads).mean().sqrt()) if spreads else 0.0
    return F.normalize(protos, dim=1), radius


def prototype_hardness(prototypes: torch.Tensor) -> torch.Tensor:
    """h_k = mean_{j != k} cos(mu_k, mu_j): a class close to the others is hard (0 for a lone class)."""
    p = F.normalize(prototypes.float(), dim=1)
    n = len(p)
    if n < 2:
        return torch.zeros(n, device=p.device)
    sim = p @ p.T
    return (sim.sum(1) - sim.diagonal()) / (n - 1)


def hardness_sampling_probabilities(hardness: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(h / tau_h): how often each old class is replayed."""
    return F.softmax(hardness.float() / temperature, dim=0)


def hardness_aware_prototype_loss(head, prototypes: torch.Tensor, hardness: torch.Tensor, radius: float,
                                  num_samples: int, hardness_temperature: float, temperature: float,
                                  num_clusters: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """L_hap = CE(head(mu_k + r eps)[:, :num_clusters] / temperature, k), k ~ softmax(h / tau_h),
    eps ~ N(0, I), drawn from ``generator``. Returns the loss and the sampled classes."""
    probs = hardness_sampling_probabilities(hardness, hardness_temperature)
    classes = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    noise = torch.randn(num_samples, prototypes.shape[1], generator=generator, device=prototypes.device,
                        dtype=prototypes.dtype)
    samples = prototypes[classes] + radius * noise
    logits = head(samples)[:, :num_clusters]
    return F.cross_entropy(logits.float() / temperature, classes), classes


def feature_distillation(h: torch.Tensor, h_previous: torch.Tensor) -> torch.Tensor:
    """mean_i |h_i/|h_i| - h'_i/|h'_i||^2 (the previous stage's features h' carry no gradient)."""
    return (F.normalize(h.float(), dim=1) - F.normalize(h_previous.detach().float(), dim=1)).pow(2).sum(1).mean()


def clustering_guided_prototypes(features: torch.Tensor, old_prototypes: torch.Tensor, num_clusters: int,
                                 num_new: int, seed: int, n_init: int = 3) -> torch.Tensor:
    """k-means with ``num_clusters`` centres on the normalised features; the ``num_new`` normalised
    centroids whose highest cosine to an old prototype is lowest (ties: the lower centroid index).
    Fewer rows come back where the pool has fewer samples than that."""
    from sklearn.cluster import KMeans

    x = F.normalize(features.float(), dim=1)
    k = min(int(num_clusters), len(x))
    take = min(int(num_new), k)
    if take <= 0:
        return x.new_zeros(0, x.shape[1])
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(as_numpy(x).astype("float64"))
    centroids = F.normalize(torch.from_numpy(km.cluster_centers_).to(x), dim=1)
    if len(old_prototypes):
        # how close each centroid is to a class the head already has
        closeness = (centroids @ F.normalize(old_prototypes.float().to(x.device), dim=1).T).max(1).values
    else:
        closeness = torch.zeros(k, device=x.device)
    order = sorted(range(k), key=lambda j: (float(closeness[j]), j))
    return centroids[sorted(order[:take])]


@register_method("discovery", "happy")
class Happy(SimGCDContinual):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        hp = self.hparams
        for key in ("entropy_old_new_weight", "entropy_old_weight", "entropy_new_weight", "prototype_sampling_weight",
                    "feature_distill_weight", "radius_scale"):
            if float(hp.get(key, 1.0)) < 0:
                raise ValueError(f"discovery/happy: {key} must be >= 0, got {hp[key]}")
        if float(hp.get("hardness_temperature", 0.1)) <= 0:
            raise ValueError(f"discovery/happy: hardness_temperature must be > 0, got {hp['hardness_temperature']}")
        d = model.num_features
        # per-class statistics kept across stages (row k: head index k); the first num_prototypes are defined
        self.register_buffer("class_prototypes", torch.zeros(num_classes, d))
        self.register_buffer("class_hardness", torch.zeros(num_classes))
        self.register_buffer("num_prototypes", torch.tensor(0, dtype=torch.long))
        self.register_buffer("feature_radius", torch.tensor(0.0))
        # the backbone as the previous stage left it, for the feature distillation
        self.previous_backbone = copy.deepcopy(model.backbone).requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.previous_backbone.eval()  # a frozen teacher: its BatchNorm statistics stay as they were
        return self

    # --- stages ------------------------------------------------------------------------------
    def task_phases(self, task_id: int) -> list[str]:
        if task_id > 0 and self.hparams.get("clustering_init", True):
            return ["cluster_init", "train"]
        return ["train"]

    def phase_loader(self, phase: str, context, trainer):
        if phase == "cluster_init":  # nothing to train: the phase sets the new prototypes before training
            self.initialise_new_prototypes(context)
        return None

    def _split_clusters(self) -> tuple[int, int]:
        total = int(self.task_info.num_clusters)
        return total - int(self.task_info.new_clusters), total

    @torch.no_grad()
    def initialise_new_prototypes(self, context: DiscoveryContext) -> None:
        """Clustering-guided initialisation of this stage's new rows of the head."""
        num_old, total = self._split_clusters()
        if total <= num_old or len(context.unlabelled) == 0:
            return
        weight = self.prototypes.weight
        chosen = clustering_guided_prototypes(context.embed(context.unlabelled).to(weight.device), weight[:num_old],
                                              total, total - num_old, seed=context.seed * 1000 + context.task_id,
                                              n_init=int(self.hparams.get("n_init", 3)))
        # the new rows keep their scale (the cosine head ignores it, the optimiser's step size does not)
        scale = weight[num_old:total].norm(dim=1).mean()
        weight[num_old:num_old + len(chosen)] = chosen.to(weight) * scale

    @torch.no_grad()
    def end_task(self, task_id: int, context: DiscoveryContext) -> None:
        num_old, total = self._split_clusters()
        if task_id == 0:
            # the known classes' prototypes and the radius, from their labelled samples
            features = context.embed(context.labelled).to(self.class_prototypes.device)
            labels = context.visible_labels[context.labelled].to(features.device)
            protos, radius = class_prototypes_and_radius(features, labels, total)
            self.class_prototypes[:total] = protos.to(self.class_prototypes)
            self.feature_radius.fill_(radius)
        elif len(context.unlabelled):
            # the stage's new classes: the mean feature of the samples predicted as each of them
            features = F.normalize(context.embed(context.unlabelled).float(), dim=1).to(self.class_prototypes.device)
            predicted = context.scores(context.unlabelled).argmax(1).to(features.device)
            for k in range(num_old, total):
                members = features[predicted == k]
                # a class no sample was predicted as keeps the head's row as its prototype
                row = members.mean(0) if len(members) else self.prototypes.weight[k].float()
                self.class_prototypes[k] = F.normalize(row, dim=0)
        self.num_prototypes.fill_(total)
        self.class_hardness.zero_()
        self.class_hardness[:total] = prototype_hardness(self.class_prototypes[:total])
        self.previous_backbone.load_state_dict(self.model.backbone.state_dict())

    # --- one batch ---------------------------------------------------------------------------
    def prototype_replay_loss(self, batch: dict, num_samples: int, num_clusters: int) -> torch.Tensor:
        hp = self.hparams
        n = min(int(self.num_prototypes), num_clusters)
        if n == 0:
            return self.prototypes.weight.sum() * 0.0
        # seeded by the step and the batch, so a step that runs twice (SAM) or resumes draws the same samples
        gen = view_generator(batch, self.global_step, _SAMPLING_SALT)
        protos = self.class_prototypes[:n].to(gen.device)
        loss, _ = hardness_aware_prototype_loss(
            self.prototypes, protos, self.class_hardness[:n].to(gen.device),
            float(self.feature_radius) * float(hp.get("radius_scale", 1.0)), num_samples,
            float(hp.get("hardness_temperature", 0.1)), self.tau_s, num_clusters, gen)
        return loss

    def training_step(self, batch):
        if self.task_info.task_id == 0:
            return super().training_step(batch)  # stage 0: SimGCD on the labelled known classes
        hp = self.hparams
        v1, v2 = two_views(self, batch)
        n = len(v1)
        x = torch.cat([v1, v2])
        h = self.model.features(x)
        s = self.active_logits(self.prototypes(h))
        num_old, total = self._split_clusters()
        distill = cross_view_distillation([s[:n], s[n:]], [s[:n], s[n:]], self.tau_s, self.tau_t())
        soft, logs = soft_entropy_regulariser(s, num_old, self.tau_s, float(hp.get("entropy_old_new_weight", 1.0)),
                                              float(hp.get("entropy_old_weight", 1.0)),
                                              float(hp.get("entropy_new_weight", 1.0)))
        l_rep, rep_logs = self.representation(h[:n], h[n:], batch["y"])  # no label: (1 - lambda) L_u
        hap = self.prototype_replay_loss(batch, len(x), total)
        with torch.no_grad():
            h_previous = self.previous_backbone(x)
        kd = feature_distillation(h, h_previous)
        lam = float(hp.get("sup_weight", 0.35))
        # L = (1 - lambda) (L_distill + L_soft + L_u + w_hap L_hap + w_kd L_kd); l_rep is (1 - lambda) L_u
        loss = (1 - lam) * (distill + soft + float(hp.get("prototype_sampling_weight", 1.0)) * hap
                            + float(hp.get("feature_distill_weight", 1.0)) * kd) + l_rep
        logs.update(rep_logs)
        logs.update({"distill": distill.detach(), "soft_entropy": soft.detach(), "hap": hap.detach(),
                     "feature_distill": kd.detach()})
        return loss, logs
