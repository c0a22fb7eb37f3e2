"""INS: an instance classifier trained on progressively updated instance pseudo-labels (the mil protocol).

Qu, Ma, Luo, Guo, Wang and Song, "Rethinking Multiple Instance Learning for Whole Slide Image
Classification: A Good Instance Classifier is All You Need", IEEE TCSVT 2024 (arXiv 2307.02249, 2023;
official code github.com/miccaiif/INS, ``model.py``, ``utils/utils_loss.py``, ``train_withbag_cifar.py``,
read for the equations and defaults below; the framework is built on PiCO's partial-label learning).

MIL as partial-label learning: every instance i of a training bag gets a candidate label set Y_i from
its bag's label alone: Y_i = {0} (negative) for an instance of a negative bag, Y_i = {0, 1} for an
instance of a positive bag. A pseudo-label vector s_i (``confidence``, a buffer over the training
instances) starts uniform over Y_i: [1, 0] or [1/2, 1/2]. With h = f(x) the backbone features, the
instance classifier's logits g(h) (2 classes) and a unit-norm embedding q = normalize(MLP(h)):

1. Instance classifier loss (``partial_loss``): L_cls = -sum_j s_ij log softmax(g(h_i))_j.
2. Classifier pseudo-label (restricted to the candidates): y^_i = argmax_{j in Y_i} softmax(g(h_i))_j.
3. Prototypes (PPLG): after each step, for each instance in batch order, mu_{y^_i} <- gamma mu_{y^_i} +
   (1 - gamma) q_i, then every mu_c is renormalised (gamma = ``proto_m``).
4. The pseudo-label update, the paper's key equation (prototype-based pseudo-label generation, applied
   from epoch ``prot_start``; ``pseudo_label_update``):
       z_i = onehot(argmax_{j in Y_i} softmax(q_i . mu)_j),    s_i <- phi s_i + (1 - phi) z_i,
   and an instance of a negative bag keeps s_i = [1, 0]. phi runs linearly from ``conf_ema_start``
   (0.95) at epoch 0 to ``conf_ema_end`` (0.8) at the last epoch (``set_conf_ema_m``), so the
   labels move slowly at first and faster once the prototypes are reliable.
5. Instance-level weakly supervised contrastive learning (IWSCL): a momentum copy of the backbone and
   projection (theta_k <- m theta_k + (1 - m) theta_q after each step, m = ``moco_m``) embeds a second
   augmented view into a key k_i; a queue keeps the last ``moco_queue`` keys with their y^. Before
   ``prot_start`` the loss is MoCo's, CE([q_i . k_i, q_i . Q] / T, 0); from then on SupCon whose
   positives for anchor q_i are every other embedding (keys and queue) with the same pseudo-label y^.
6. L = L_cls + ``loss_weight`` * L_cont.

At test time an instance's score is softmax(g(h))_1 (the instance classifier's probability of the
target class) and a bag's score pools its instances' scores (``bag_pooling``: ``mean``, the official
code's first bag read-out, or ``max``). Instance labels are never read in training: the loader's
labels are the instances' bag labels.

Left out (CPU scale): the distributed shuffled BatchNorm of the key encoder, the RandAugment-style
strong view (both views here come from the engine's translation/flip augmentation), the official
code's extra first epoch on naive labels (bag label copied to every instance) and its late bag-level
mean-pooling loss (the paper's method is the instance classifier; the claim compares it alone).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.base import Method
from classlab.methods.registry import register_method


def candidate_sets(bag_labels: torch.Tensor) -> torch.Tensor:
    """(N, 2) candidate masks Y_i from the instances' bag labels: [1, 0] (negative bag), [1, 1] (positive)."""
    positive = bag_labels.long().clamp(0, 1)
    return torch.stack([torch.ones_like(positive), positive], dim=1).float()


def pseudo_label_update(confidence: torch.Tensor, candidates: torch.Tensor, prototype_scores: torch.Tensor,
                        phi: float) -> torch.Tensor:
    """The paper's pseudo-label rule (point 4 of the module docstring): the new s_i of each row."""
    # z_i = onehot(argmax_{j in Y_i} softmax(q_i . mu)_j);  s_i <- phi s_i + (1 - phi) z_i
    z = F.one_hot((prototype_scores * candidates).argmax(1), candidates.shape[1]).to(confidence.dtype)
    new = phi * confidence + (1.0 - phi) * z
    negative = candidates[:, 1] == 0  # instances of negative bags: always [1, 0]
    new[negative] = F.one_hot(torch.zeros(int(negative.sum()), dtype=torch.long, device=new.device),
                              candidates.shape[1]).to(new.dtype)
    return new


def momentum_prototypes(prototypes: torch.Tensor, q: torch.Tensor, labels: torch.Tensor, gamma: float) -> torch.Tensor:
    """mu_c <- gamma mu_c + (1 - gamma) q_i for each row i with label c, in row order, then every mu_c
    renormalised (point 3): m sequential updates of class c in closed form, gamma^m mu_c + (1 - gamma)
    sum_t gamma^(m - 1 - t) q_t."""
    out = prototypes.clone()
    for c in range(prototypes.shape[0]):
        rows = q[labels == c]
        m = rows.shape[0]
        if m == 0:
            continue
        weights = (1.0 - gamma) * gamma ** torch.arange(m - 1, -1, -1, device=q.device, dtype=q.dtype)
        out[c] = gamma ** m * prototypes[c] + (weights[:, None] * rows).sum(0)
    return F.normalize(out, dim=1)


def supcon_loss(q: torch.Tensor, features: torch.Tensor, anchor_labels: torch.Tensor, labels: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """SupCon with the anchors q (the first len(q) rows of ``features``): positives share the pseudo-label."""
    b = q.shape[0]
    logits = q @ features.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = torch.ones_like(logits)
    not_self[torch.arange(b), torch.arange(b)] = 0.0
    positive = (anchor_labels[:, None] == labels[None, :]).float() * not_self
    log_prob = logits - torch.log((torch.exp(logits) * not_self).sum(1, keepdim=True) + 1e-12)
    return -((positive * log_prob).sum(1) / positive.sum(1).clamp_min(1.0)).mean()


def moco_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: the key of the same instance against the queue."""
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


@register_method("single_paper", "mil")
class InstanceMIL(Method):
    trains_on = "instances"   # the protocol's loader yields training instances labelled with their bag's label
    num_views = 2             # the query view and the key encoder's view
    instance_score_name = "classifier_probability"

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        hp = self.hparams
        features, low = int(model.num_features), int(hp.get("low_dim", 128))
        self.projection = nn.Sequential(nn.Linear(features, features), nn.ReLU(inplace=True), nn.Linear(features, low))
        self.key_backbone = copy.deepcopy(model.backbone).requires_grad_(False)
        self.key_projection = copy.deepcopy(self.projection).requires_grad_(False)
        size = int(hp.get("moco_queue", 8192))
        self.register_buffer("prototypes", torch.zeros(num_classes, low))
        self.register_buffer("queue", torch.zeros(size, low))
        self.register_buffer("queue_labels", torch.zeros(size, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("confidence", torch.zeros(0, num_classes))   # s_i of every training instance
        self.register_buffer("candidates", torch.zeros(0, num_classes))   # Y_i of every training instance
        self.epoch = 0

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    # --- schedule ------------------------------------------------------------------------------
    def conf_ema_m(self, epoch: int) -> float:
        """phi of ``epoch``: linear from conf_ema_start (epoch 0) towards conf_ema_end (PiCO's set_conf_ema_m)."""
        hp = self.hparams
        start, end = float(hp.get("conf_ema_start", 0.95)), float(hp.get("conf_ema_end", 0.8))
        return start + (end - start) * epoch / max(int(hp.get("epochs", 1)), 1)

    def _prototypes_on(self) -> bool:
        return self.epoch >= int(self.hparams.get("prot_start", 0))

    def on_train_start(self, loader) -> None:
        """s_i and Y_i of every training instance, from the loader's labels (the instances' bag labels)."""
        bag_labels = loader.y[torch.argsort(loader.source_index)] if len(loader.y) else loader.y
        if len(bag_labels) != int(getattr(loader, "num_train_samples", len(bag_labels))):
            raise ValueError("mil: the loader must run over every training instance (no index subset)")
        candidates = candidate_sets(bag_labels).to(self.prototypes.device)
        self.candidates = candidates
        self.confidence = candidates / candidates.sum(1, keepdim=True)

    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # --- one step ------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(classifier logits g(h), q = normalize(MLP(h)))."""
        h = self.model.features(x)
        return self.model.head(h), F.normalize(self.projection(h), dim=1)

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_projection(self.key_backbone(x)), dim=1)

    def training_step(self, batch: dict):
        hp = self.hparams
        views, index = batch["views"], batch["index"]
        logits, q = self.embed(views[0])
        k = self.keys(views[1])
        cand, conf = self.candidates[index], self.confidence[index]
        with torch.no_grad():
            pseudo = (logits.detach().float().softmax(1) * cand).argmax(1)          # point 2
            prototype_scores = (q.detach().float() @ self.prototypes.T).softmax(1)  # softmax(q . mu)
        # point 1: L_cls = -sum_j s_ij log softmax(g(h_i))_j
        loss_cls = -(conf * F.log_softmax(logits.float(), dim=1)).sum(1).mean()
        n, temperature = int(self.queue_count), float(hp.get("temperature", 0.07))
        q32, k32 = q.float(), k.float()
        if self._prototypes_on():  # point 5, after the warm-up: SupCon over pseudo-label positives
            features = torch.cat([q32, k32, self.queue[:n]])
            labels = torch.cat([pseudo, pseudo, self.queue_labels[:n]])
            loss_cont = supcon_loss(q32, features, pseudo, labels, temperature)
        else:                      # warm-up: MoCo
            loss_cont = moco_loss(q32, k32, self.queue[:n], temperature)
        loss = loss_cls + float(hp.get("loss_weight", 0.5)) * loss_cont
        logs = {"q": q.detach(), "k": k.detach(), "pseudo": pseudo, "prototype_scores": prototype_scores,
                "index": index, "loss_cls": float(loss_cls.detach()), "loss_cont": float(loss_cont.detach())}
        return loss, logs

    @torch.no_grad()
    def on_after_step(self, batch: dict, logs: dict) -> None:
        hp = self.hparams
        index = logs["index"]
        if self._prototypes_on():  # point 4, with the prototypes of before this step's update
            self.confidence[index] = pseudo_label_update(self.confidence[index], self.candidates[index],
                                                         logs["prototype_scores"], self.conf_ema_m(self.epoch))
        self.prototypes.copy_(momentum_prototypes(self.prototypes, logs["q"].float(), logs["pseudo"],
                                                  float(hp.get("proto_m", 0.9))))   # point 3
        m = float(hp.get("moco_m", 0.999))
        for online, key in ((self.model.backbone, self.key_backbone), (self.projection, self.key_projection)):
            for p_q, p_k in zip(online.parameters(), key.parameters()):
                p_k.mul_(m).add_(p_q.detach(), alpha=1.0 - m)
        size = self.queue.shape[0]
        k, labels = logs["k"].float()[-size:], logs["pseudo"][-size:]
        slots = (int(self.queue_ptr) + torch.arange(len(k), device=k.device)) % size
        self.queue[slots] = k
        self.queue_labels[slots] = labels
        self.queue_ptr.fill_((int(self.queue_ptr) + len(k)) % size)
        self.queue_count.fill_(min(int(self.queue_count) + len(k), size))

    # --- evaluation (the protocol's bag scoring) -----------------------------------------------
    def instance_outputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.model(x)}

    @torch.no_grad()
    def bag_scores(self, outputs: dict[str, torch.Tensor], owner: torch.Tensor,
                   n_bags: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(bag scores, {"instance": the classifier's target-class probabilities}); a bag pools its
        instances' probabilities by ``bag_pooling`` (mean or max)."""
        p = outputs["logits"].float().softmax(1)[:, 1].cpu()
        owner = owner.cpu()
        if self.hparams.get("bag_pooling", "mean") == "max":
            bag = torch.zeros(n_bags).scatter_reduce(0, owner, p, reduce="amax", include_self=False)
        else:
            bag = torch.zeros(n_bags).index_add(0, owner, p) / torch.bincount(owner, minlength=n_bags).clamp_min(1)
        return bag, {"instance": p}
