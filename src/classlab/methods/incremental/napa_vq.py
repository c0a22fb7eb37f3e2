"""NAPA-VQ: neighbourhood-aware prototype augmentation with vector quantisation (non-exemplar CIL).

Malepathirana, Senanayake, Halgamuge, "NAPA-VQ: Neighborhood Aware Prototype Augmentation with
Vector Quantization for Continual Learning", ICCV 2023 (arXiv 2308.09297). The equations below
follow the paper's description and its official implementation (github.com/TamashaM/NAPA-VQ),
from which the defaults in ``config/methods/incremental/napa_vq.yaml`` are taken.

A codebook of code vectors (CVs) ``w_c``, one per class, lives in the feature space and is the
classifier. A neural-gas style competitive Hebbian rule learns a graph over the codes: the
classes whose regions touch (the ones most likely to be confused) become neighbours ``N(c)``.

- Distance-based cross-entropy (DCE) over the seen classes, temperature ``T``:
      L_DCE = -log softmax_c(-||f(x) - w_c|| / T)[y]
- Neighbourhood-aware VQ loss: pull ``f(x)`` to its own code, push it from the codes of the
  neighbouring classes, weighted by a soft-min over those neighbours:
      L_NA = mean_i ReLU( d_iy - sum_{j in N(y)} a_ij d_ij ),  d_ij = ||f(x_i) - w_j||^2,
      a_ij = softmax_{j in N(y)}(-lambda d_ij)   (no gradient through a)
- Graph (competitive Hebbian learning with edge ageing), per batch: the winner ``s = argmin_j
  d_ij`` is linked (edge strength 1) to the ``k`` codes nearest to ``x_i``; every other edge of
  the winner decays by ``eps`` per visit; edges below ``e_min`` are cut; E <- (E + E^T) / 2.
- Neighbourhood-aware prototype augmentation (NA-PA), tasks t > 0: draw an old class ``c`` and
  a neighbour ``n`` of ``c`` (``c`` itself included, it is its own neighbour), then
      p_aug = gamma * p_c + (1 - gamma) * p_n,  gamma ~ U(gamma_min, 1),  label c,
  and train on it with ``L_DCE`` and ``L_NA`` (so the decision boundary between ``c`` and its
  neighbours is drawn by pseudo-features lying between them).
- Feature distillation from the frozen previous model: L_KD = ||F(x) - F_old(x)||_2 (the norm of
  the batch's feature difference).

  L = L_DCE + L_NA(x) + [t > 0] (L_NA(p_aug) + w_pa L_DCE(p_aug) + w_kd L_KD)

Codes of old classes are frozen in later tasks; the codes are trained by plain SGD with their own
learning rate (``code_lr``, ``code_lr_incremental``), the network by the configured optimizer.
Prediction: nearest code after L2-normalising features and codes, logits = -||f^ - w^_c||.

Simplified here (stated plainly):
- The PASS-style self-supervised label augmentation (4 rotations, 4 codes per class) that the
  official code inherits from PASS is not used: on digits, 6 and 9 are 180-degree rotations of
  each other, so rotation labels would conflict; one code per class.
- The per-task learning-rate schedule is the engine's (cosine) rather than StepLR, and the codes'
  SGD step follows the same schedule factor as the network.
- Prototypes of a task's classes are the mean features of its (unaugmented) training samples,
  taken at the end of the task; the new classes' prototypes, needed as neighbours of old classes,
  are taken at the start of the task with the previous model (as in the official code).
- Edge update and NA loss use the graph after this batch's update (symmetrised at once). The
  update is computed in ``training_step`` without storing it (a two-step optimizer calls it
  twice) and stored once per optimizer step in ``on_after_step``.
- ``code_init: prototype`` (our default for the embedded data) starts a new class's code at its
  prototype instead of at a random N(0, I) vector (``code_init: random``, the paper's): the
  official runs take thousands of code updates per task, our tiny runs a few dozen.

State (fixed size, allocated up front): ``codes`` [C, D] (parameter), ``edges`` [C, C],
``prototypes`` [C, D], ``old_model`` (frozen copy of the network, a submodule).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.learner import IncrementalLearner, class_means


def sq_dists(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """d_ij = ||x_i - w_j||^2 (exact; no sqrt, so no NaN gradient at zero distance)."""
    return (x[:, None, :] - codes[None, :, :]).pow(2).sum(-1)


def update_edges(edges: torch.Tensor, d2: torch.Tensor, valid: torch.Tensor, k: int, decay: float,
                 e_min: float) -> torch.Tensor:
    """Competitive Hebbian learning with edge ageing over one batch (the official batched rule).

    For each sample the winner s (nearest valid code) gets edge strength 1 to each of the k nearest
    valid codes (itself included); the winner's other edges decay by ``decay`` once per visit of s
    that did not refresh them; edges below ``e_min`` are removed; the graph is symmetrised.
    """
    d2 = d2.masked_fill(~valid[None, :], float("inf"))
    k = max(1, min(k, int(valid.sum())))
    nearest = d2.topk(k, dim=1, largest=False).indices            # (B, k), column 0 = winner
    winner = nearest[:, 0]
    c = edges.shape[0]
    visits = torch.bincount(winner, minlength=c).to(edges.dtype)  # visits[s]
    hits = torch.zeros_like(edges)
    hits.index_put_((winner[:, None].expand_as(nearest).reshape(-1), nearest.reshape(-1)),
                    torch.ones(nearest.numel(), dtype=edges.dtype, device=edges.device), accumulate=True)
    # E_sj <- 1 where s's sample had j among its k nearest codes
    edges = torch.maximum(edges, (hits > 0).to(edges.dtype))
    # E_sj <- E_sj * eps^(visits_s - hits_sj): ageing of the winner's edges that were not refreshed
    edges = edges * decay ** (visits[:, None] - hits).clamp_min(0)
    edges = edges * (edges >= e_min)
    return (edges + edges.T) / 2


def na_loss(d2: torch.Tensor, y: torch.Tensor, edges: torch.Tensor, valid: torch.Tensor,
            softmin: float) -> torch.Tensor:
    """L_NA = mean_i ReLU(d_iy - sum_{j in N(y_i)} a_ij d_ij), a_ij = softmax_{N(y_i)}(-lambda d_ij)."""
    eye = torch.eye(edges.shape[0], dtype=torch.bool, device=edges.device)
    neighbours = (edges > 0) & ~eye & valid[None, :]            # N(c), self excluded
    nb = neighbours[y]                                            # (B, C)
    d_pos = d2.gather(1, y[:, None]).squeeze(1)
    weights = torch.softmax((-softmin * d2.detach()).masked_fill(~nb, float("-inf")), dim=1)
    weights = torch.nan_to_num(weights, nan=0.0)                  # no neighbours: no push term
    d_neg = (weights * d2.masked_fill(~nb, 0.0)).sum(1)
    return F.relu(d_pos - d_neg).mean()


def dce_logits(d2: torch.Tensor, valid: torch.Tensor, temperature: float) -> torch.Tensor:
    """-||x - w_c|| / T over the valid codes (the DCE classifier), from squared distances."""
    return (-(d2 + 1e-12).sqrt() / temperature).masked_fill(~valid[None, :], float("-inf"))


@register_method("incremental", "napa_vq")
class NapaVQ(IncrementalLearner):
    uses_memory = False

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        dim = model.num_features
        self.codes = torch.nn.Parameter(torch.randn(num_classes, dim))
        self.register_buffer("edges", torch.eye(num_classes))
        self.register_buffer("prototypes", torch.zeros(num_classes, dim))
        self.old_model = copy.deepcopy(model)
        for p in self.old_model.parameters():
            p.requires_grad_(False)
        self.old_model.eval()

    # --- what is trained ----------------------------------------------------------------
    def param_groups(self):
        # the network's backbone; the codes take their own SGD step (optimizer_step)
        return [{"params": [p for p in self.model.backbone.parameters() if p.requires_grad]}]

    def train(self, mode: bool = True):
        super().train(mode)
        self.old_model.eval()  # the teacher keeps its BN statistics
        return self

    def optimizer_step(self, loss, optimizer, closure):
        self.codes.grad = None
        super().optimizer_step(loss, optimizer, closure)
        group = optimizer.param_groups[0]
        factor = group["lr"] / group["base_lr"] if group.get("base_lr") else 1.0  # the engine's schedule
        lr = self.hparams.get("code_lr", 5.0) if self.task_id == 0 else \
            self.hparams.get("code_lr_incremental", 0.5)
        if self.codes.grad is not None:
            with torch.no_grad():
                trainable = self.new_mask if self.task_id > 0 else self.seen_mask  # old codes frozen
                # w_c <- w_c - lr * dL/dw_c (plain SGD, no state)
                self.codes -= lr * factor * self.codes.grad * trainable[:, None].to(self.codes.dtype)
            self.codes.grad = None

    # --- hooks --------------------------------------------------------------------------
    def on_train_start(self, loader) -> None:
        # prototypes of the new classes under the model as it starts the task (the previous
        # model): old classes may pick them as neighbours in NA-PA
        was_training = self.training
        self.model.eval()
        sums = torch.zeros_like(self.prototypes)
        counts = torch.zeros(self.num_classes, device=self.prototypes.device)
        with torch.no_grad():
            for batch in loader:
                f = self.model.features(batch["x"]).float()
                sums.index_add_(0, batch["y"], f)
                counts.index_add_(0, batch["y"], torch.ones_like(batch["y"], dtype=counts.dtype))
        new = self.new_mask & (counts > 0)
        self.prototypes[new] = sums[new] / counts[new, None]
        if self.hparams.get("code_init", "random") == "prototype":
            with torch.no_grad():
                self.codes[new] = self.prototypes[new]  # w_c <- p_c for the task's new classes
        self.train(was_training)

    def _losses(self, feats: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """L_DCE, L_NA and the DCE logits of ``feats`` against the stored graph (nothing is stored)."""
        return self._losses_and_graph(feats, y, self.edges)[:3]

    def _losses_and_graph(self, feats: torch.Tensor, y: torch.Tensor, edges: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """L_DCE, L_NA and the DCE logits of ``feats``, and the graph after this batch's Hebbian
        update of ``edges`` (returned, not stored: the step's graph is kept in ``on_after_step``)."""
        hp = self.hparams
        valid = self.seen_mask
        d2 = sq_dists(feats, self.codes)
        with torch.no_grad():
            edges = update_edges(edges, d2.detach(), valid, int(hp.get("na_k", 15)),
                                 float(hp.get("edge_decay", 0.9)), float(hp.get("edge_min", 0.9 ** 10)))
        l_na = na_loss(d2, y, edges, valid, float(hp.get("na_softmin", 1e-3)))
        logits = dce_logits(d2, valid, float(hp.get("temperature", 0.1)))
        # L_DCE = CE(-||f - w_c|| / T, y)
        return F.cross_entropy(logits, y), l_na, logits, edges

    def augmented_prototypes(self, n: int, edges: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """NA-PA: p_aug = gamma p_c + (1 - gamma) p_n, c an old class, n in N(c) u {c}, gamma ~ U(gamma_min, 1).
        ``edges``: the neighbour graph to draw n from (default: the stored one)."""
        edges = self.edges if edges is None else edges
        old = (self.seen_mask & ~self.new_mask).nonzero().squeeze(1)
        c = old[torch.randint(len(old), (n,), device=old.device)]
        rows = (edges[c] > 0) & self.seen_mask[None, :]
        rows[torch.arange(n, device=c.device), c] = True
        nbr = torch.multinomial(rows.float(), 1).squeeze(1)
        g_min = float(self.hparams.get("gamma_min", 0.5))
        gamma = g_min + (1.0 - g_min) * torch.rand(n, 1, device=c.device)
        return gamma * self.prototypes[c] + (1.0 - gamma) * self.prototypes[nbr], c

    def training_step(self, batch):
        # pure: the graph update of this step travels in logs["edges"] and is stored once, in on_after_step
        hp = self.hparams
        x, y = batch["x"], batch["y"]
        feats = self.model.features(x)
        l_dce, l_na, logits, edges = self._losses_and_graph(feats, y, self.edges)
        loss = l_dce + l_na
        logs = {"logits": logits.detach(), "dce": l_dce.detach(), "na": l_na.detach()}
        if self.task_id > 0:
            with torch.no_grad():
                old_feats = self.old_model.features(x)
            # L_KD = ||F(x) - F_old(x)||_2
            l_kd = torch.dist(feats, old_feats, 2)
            n = int(hp.get("proto_aug_batch", 0)) or x.shape[0]
            p_aug, c = self.augmented_prototypes(n, edges)
            l_pa_dce, l_pa_na, _, edges = self._losses_and_graph(p_aug, c, edges)
            # L = L_DCE + L_NA(x) + L_NA(p_aug) + w_pa L_DCE(p_aug) + w_kd L_KD
            loss = loss + l_pa_na + float(hp.get("proto_aug_weight", 10.0)) * l_pa_dce \
                + float(hp.get("kd_weight", 10.0)) * l_kd
            logs.update(kd=l_kd.detach(), proto_aug=l_pa_dce.detach())
        logs["edges"] = edges.detach()
        return loss, logs

    def on_after_step(self, batch, logs) -> None:
        # the neighbour graph after this step's batch (and augmented prototypes), once per optimizer step
        self.edges.copy_(logs["edges"])

    def end_task(self, task_id, context) -> None:
        feats = context.embed(context.task_indices).to(self.prototypes.device)
        labels = context.train_y[context.task_indices].to(self.prototypes.device)
        present = [c for c in context.new_classes if bool((labels == c).any())]
        if present:  # p_c = mean feature of class c
            self.prototypes[present] = class_means(feats, labels, present)
        self.old_model.load_state_dict(self.model.state_dict())
        self.old_model.eval()

    def predict(self, x):
        f = F.normalize(self.model.features(x), dim=1)
        w = F.normalize(self.codes, dim=1)
        return -(sq_dists(f, w) + 1e-12).sqrt()  # nearest normalised code
