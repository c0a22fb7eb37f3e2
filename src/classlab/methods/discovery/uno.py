"""UNO: one cross-entropy over the known and the novel classes, with Sinkhorn-Knopp pseudo-labels.

Fini, Sangineto, Lathuilière, Zhong, Nabi and Ricci, "A Unified Objective for Novel Class
Discovery", ICCV 2021.

Novel class discovery (``ncd`` splits): the labelled samples come from the known classes, the
unlabelled pool from novel classes only. The backbone starts from a supervised model of the known
classes (the NCD protocol's first stage, ``init: supervised_known``). On the L2-normalised backbone
feature f = h / |h| sit two heads of cosine prototypes (logits in [-1, 1]):

- the labelled head, l(x) = <w_k / |w_k|, f>, one prototype per known class (label index order),
  read from f directly as in the official code;
- the unlabelled head, u(x) = <m_j / |m_j|, z / |z|>, one prototype per novel class, on a
  projection z = g(f) (Linear, BatchNorm, ReLU, Linear).

Per batch of two views v, v' of each image, with the logits of both heads concatenated,
s(x) = [l(x), u(x)], and tau = 0.1:

    y_v(x) = [onehot(y), 0]                 labelled x (ground truth on the known columns)
    y_v(x) = [0, SK(u_v(x))]                unlabelled x (Sinkhorn-Knopp on the novel columns)
    L = 1/2 sum_{v != v'} mean_x  H(y_v(x), softmax(s_{v'}(x) / tau))

the swapped prediction: the targets computed on one view are the labels of the other view's
prediction (no gradient through the targets). SK (``sinkhorn_knopp``) turns the batch's unlabelled
scores into soft assignments whose rows sum to 1 and whose clusters share the batch equally (the
equipartition constraint of SwAV, Caron et al. 2020): Q = diag(a) exp(U / eps) diag(b), eps = 0.05,
3 alternating normalisations.

Multi-head and over-clustering (kept, as in the paper): ``num_heads`` unlabelled heads, each with
its own projection, trained side by side, each with the same labelled head; with
``overcluster_factor`` r > 0 each head has a twin of r * n_novel prototypes trained by the same
loss (targets from its own SK), and L = mean over heads of (L_cluster + L_overcluster).
Prediction uses the head whose L_cluster summed over the last epoch is lowest (the paper's best
head); the over-clustering heads are never used for prediction.

Prediction (task-aware NCD evaluation, as in UNO's papers): ``predict`` returns the unlabelled
head's scores, one column per novel cluster (ids 0..n_novel-1), matched to the novel classes by the
evaluation. The known head (and the ground-truth columns) serve training only.

``set_init_model`` (called by the protocol with the init checkpoint's Classifier): the known
prototypes start from the init head's rows of the known classes (``init_known_head``), as UNO's
discovery stage loads its pretrained labelled head. ``extra_loss`` is the hook CRKD extends.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.discovery_learner import CosinePrototypes, DiscoveryLearner, DiscoveryTask, two_views
from classlab.methods.registry import register_method


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, epsilon: float = 0.05, iters: int = 3) -> torch.Tensor:
    """[B, K] scores -> [B, K] soft assignments: each row sums to 1, each column to about B / K.

    Q = exp(scores / eps), scaled alternately so that each cluster holds 1/K of the total mass and
    each sample 1/B of it; times B at the end, each sample's row is a distribution."""
    if logits.dim() != 2 or logits.shape[1] < 1:
        raise ValueError(f"sinkhorn_knopp: logits must be [samples, clusters], got {tuple(logits.shape)}")
    if epsilon <= 0 or iters < 1:
        raise ValueError(f"sinkhorn_knopp: sk_epsilon must be > 0 and sk_iters >= 1, got {epsilon}, {iters}")
    b, k = logits.shape
    if b == 0:
        return logits.new_zeros((0, k), dtype=torch.float32)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        scores = logits.float() / epsilon
        q = torch.exp(scores - scores.max())  # shifted by the max: exp never overflows, the scaling absorbs it
        q = q / q.sum()
        for _ in range(iters):
            q = q / q.sum(0, keepdim=True) / k  # every cluster holds 1/K of the mass (equipartition)
            q = q / q.sum(1, keepdim=True) / b  # every sample holds 1/B of it
        return q * b  # rows sum to 1: one assignment distribution per sample


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """mean_x H(t(x), softmax(s(x) / tau)) = mean_x -sum_k t_k(x) log softmax(s(x) / tau)_k."""
    return -(targets * F.log_softmax(logits.float() / temperature, dim=1)).sum(1).mean()


def swapped_prediction(logits: list[torch.Tensor], targets: list[torch.Tensor], temperature: float) -> torch.Tensor:
    """UNO's swapped prediction: the mean over ordered view pairs (v, v' != v) of H(targets_v, p_{v'})
    (the targets of view v label the prediction on every other view v')."""
    if len(logits) != len(targets) or len(logits) < 2:
        raise ValueError(f"swapped_prediction: needs the logits and targets of >= 2 views, got "
                         f"{len(logits)} and {len(targets)}")
    total, pairs = 0.0, 0
    for v, target in enumerate(targets):
        for other, view_logits in enumerate(logits):
            if other == v:
                continue
            total = total + soft_cross_entropy(view_logits, target, temperature)
            pairs += 1
    return total / pairs


def uno_targets(novel_logits: torch.Tensor, labels: torch.Tensor, num_known: int, epsilon: float = 0.05,
                iters: int = 3) -> torch.Tensor:
    """One view's targets over [known | novel] columns: a one-hot label index for the labelled rows
    (``labels >= 0``), the Sinkhorn-Knopp assignment of the unlabelled rows' novel scores on the novel
    columns (zero on the known ones)."""
    b, num_novel = novel_logits.shape
    if labels.shape != (b,):
        raise ValueError(f"uno_targets: labels must be [{b}], got {tuple(labels.shape)}")
    lab = labels >= 0
    if bool(lab.any()) and int(labels[lab].max()) >= num_known:
        raise ValueError(f"uno_targets: label index {int(labels[lab].max())} outside the {num_known} known classes")
    targets = torch.zeros(b, num_known + num_novel, device=novel_logits.device, dtype=torch.float32)
    targets[lab] = F.one_hot(labels[lab], num_known + num_novel).float()
    if bool((~lab).any()):
        targets[~lab, num_known:] = sinkhorn_knopp(novel_logits[~lab].detach(), epsilon, iters)
    return targets


class ProjectedPrototypes(nn.Module):
    """One unlabelled head of UNO: z = W2 ReLU(BN(W1 f)), then cosine prototypes on z / |z|."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_prototypes: int):
        super().__init__()
        self.projector = nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                       nn.Linear(hidden, out_dim))
        self.prototypes = CosinePrototypes(out_dim, num_prototypes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.prototypes(self.projector(f))


@register_method("discovery", "uno")
class UNO(DiscoveryLearner):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        hp = self.hparams
        dim = int(model.num_features)
        self.num_heads = int(hp.get("num_heads", 4))
        self.overcluster_factor = int(hp.get("overcluster_factor", 3))
        if self.num_heads < 1:
            raise ValueError(f"discovery/uno: num_heads must be >= 1, got {self.num_heads}")
        if self.overcluster_factor < 0:
            raise ValueError(f"discovery/uno: overcluster_factor must be >= 0, got {self.overcluster_factor}")
        for key, default in (("temperature", 0.1), ("sk_epsilon", 0.05)):
            if float(hp.get(key, default)) <= 0:
                raise ValueError(f"discovery/uno: {key} must be > 0, got {hp.get(key)}")
        hidden, out = int(hp.get("proj_hidden", 0)) or dim, int(hp.get("proj_dim", 128))
        # heads sized for the most clusters a split can ask (num_classes); the task uses the first rows
        self.known_head = CosinePrototypes(dim, num_classes)
        self.novel_heads = nn.ModuleList([ProjectedPrototypes(dim, hidden, out, num_classes)
                                          for _ in range(self.num_heads)])
        self.over_heads = nn.ModuleList([ProjectedPrototypes(dim, hidden, out, num_classes * self.overcluster_factor)
                                         for _ in range(self.num_heads if self.overcluster_factor else 0)])
        # the best-head tracker: L_cluster of each head summed over the epoch ``head_loss_epoch``
        self.register_buffer("head_loss", torch.zeros(self.num_heads))
        self.register_buffer("head_loss_epoch", torch.tensor(-1, dtype=torch.long))
        self.epoch = 0
        self.num_known = 0
        self.num_novel = 0
        self.init_head_weight: torch.Tensor | None = None  # the init Classifier's head, from set_init_model
        self.init_meta: dict = {}

    # --- the init model ------------------------------------------------------------------------
    def set_init_model(self, source: nn.Module, meta: dict) -> None:
        """The run's init checkpoint as a Classifier (backbone and head indexed by dataset class).
        The backbone is already the model's; a supervised head is kept to start the known prototypes."""
        self.init_meta = dict(meta or {})
        head = getattr(source, "head", None)
        if self.init_trained_head() and isinstance(head, nn.Linear):
            self.init_head_weight = head.weight.detach().float().cpu().clone()

    def init_trained_head(self) -> bool:
        """Whether the init's head was trained with labels (a SimCLR init leaves it random)."""
        return bool(self.init_meta) and bool(self.init_meta.get("head_trained", True)) \
            and self.init_meta.get("method") != "simclr"

    def init_classes(self) -> list[int]:
        """The dataset classes whose labels trained the init's head (all of them when unrestricted)."""
        classes = json.loads(self.init_meta.get("hparams", "{}") or "{}").get("classes") or []
        return [int(c) for c in classes]

    # --- tasks ------------------------------------------------------------------------------------
    def begin_task(self, task_id: int, info: DiscoveryTask) -> None:
        super().begin_task(task_id, info)
        known, novel = int(info.num_label_indices), int(info.num_clusters) - int(info.num_label_indices)
        if known < 1:
            raise ValueError(f"discovery/{self.name}: num_label_indices is {known}: NCD needs labelled known classes")
        if novel < 1:
            raise ValueError(f"discovery/{self.name}: num_clusters ({info.num_clusters}) must exceed the "
                             f"{known} known classes: there is no novel class to discover")
        if known > self.num_classes or novel > self.num_classes:
            raise ValueError(f"discovery/{self.name}: {known} known and {novel} novel classes do not fit heads "
                             f"built for {self.num_classes} clusters")
        self.num_known, self.num_novel = known, novel
        if task_id == 0 and self.init_head_weight is not None and bool(self.hparams.get("init_known_head", True)):
            self.load_known_prototypes(info.label_classes)

    @torch.no_grad()
    def load_known_prototypes(self, label_classes: list[int]) -> None:
        """Known prototype k <- the init head's row of the dataset class of label index k (UNO's
        discovery starts its labelled head from the pretrained one)."""
        if len(label_classes) < self.num_known:
            raise ValueError(f"discovery/{self.name}: label_classes gives {len(label_classes)} classes for "
                             f"{self.num_known} label indices")
        classes = [int(c) for c in label_classes[:self.num_known]]
        if max(classes) >= len(self.init_head_weight):
            raise ValueError(f"discovery/{self.name}: the init's head has {len(self.init_head_weight)} classes; "
                             f"label_classes names class {max(classes)}")
        weight = self.known_head.weight
        for k, c in enumerate(classes):
            if c >= 0:  # -1: an index no class holds; its prototype keeps its random start
                weight[k] = self.init_head_weight[c].to(device=weight.device, dtype=weight.dtype)

    def param_groups(self):
        # the backbone and the heads; the Classifier's own linear head is not used
        return [{"params": [p for p in self.model.backbone.parameters() if p.requires_grad]
                 + list(self.known_head.parameters()) + list(self.novel_heads.parameters())
                 + list(self.over_heads.parameters())}]

    # --- heads ------------------------------------------------------------------------------------
    def head_outputs(self, h: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Cosine logits of the task's clusters: ``known`` [B, n_known]; ``novel`` [heads, B, n_novel];
        ``over`` [heads, B, r n_novel] or None. Every head reads f = h / |h| (UNO's normalised feature)."""
        if self.num_novel < 1:
            raise RuntimeError(f"discovery/{self.name}: begin_task has not set the known and novel classes")
        f = F.normalize(h, dim=1)
        out = {"known": self.known_head(f)[:, :self.num_known],
               "novel": torch.stack([head(f)[:, :self.num_novel] for head in self.novel_heads]),
               "over": None}
        if len(self.over_heads):
            width = self.num_novel * self.overcluster_factor
            out["over"] = torch.stack([head(f)[:, :width] for head in self.over_heads])
        return out

    def best_head(self) -> int:
        """The head with the lowest L_cluster over the last epoch tracked (head 0 before any)."""
        if int(self.head_loss_epoch) < 0:
            return 0
        return int(torch.argmin(self.head_loss))

    # --- the loss ---------------------------------------------------------------------------------
    @property
    def temperature(self) -> float:
        return float(self.hparams.get("temperature", 0.1))

    def unified_loss(self, known: torch.Tensor, novel: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
        """One head's L over the two views stacked in ``known``/``novel`` (rows 0..n-1: view 1)."""
        eps, iters = float(self.hparams.get("sk_epsilon", 0.05)), int(self.hparams.get("sk_iters", 3))
        logits = torch.cat([known, novel], dim=1)  # s = [l, u]
        # y_v: ground truth on the known columns (labelled), SK(u_v) on the novel ones (unlabelled)
        targets = [uno_targets(novel[:n], labels, self.num_known, eps, iters),
                   uno_targets(novel[n:], labels, self.num_known, eps, iters)]
        # L = 1/2 sum_{v != v'} mean_x H(y_v(x), softmax(s_{v'}(x) / tau))
        return swapped_prediction([logits[:n], logits[n:]], targets, self.temperature)

    def extra_loss(self, out: dict, views: list[torch.Tensor], batch: dict) -> tuple[torch.Tensor, dict]:
        """Terms a descendant adds to UNO's objective (CRKD's class-relation distillation)."""
        return out["known"].sum() * 0.0, {}

    def training_step(self, batch):
        v1, v2 = two_views(self, batch)
        n = len(v1)
        h = self.model.features(torch.cat([v1, v2]))  # one pass: BatchNorm sees both views together
        out = self.head_outputs(h)
        y = batch["y"]
        cluster = torch.stack([self.unified_loss(out["known"], out["novel"][k], y, n) for k in range(self.num_heads)])
        logs = {"l_cluster": cluster.mean().detach(), "head_losses": cluster.detach()}
        per_head = cluster
        if out["over"] is not None:
            over = torch.stack([self.unified_loss(out["known"], out["over"][k], y, n) for k in range(self.num_heads)])
            per_head = cluster + over  # L = mean over heads of (L_cluster + L_overcluster)
            logs["l_overcluster"] = over.mean().detach()
        loss = per_head.mean()
        extra, extra_logs = self.extra_loss(out, [v1, v2], batch)
        logs.update(extra_logs)
        return loss + extra, logs

    # --- state changes, once per step -------------------------------------------------------------
    def on_epoch_start(self, epoch: int) -> None:
        self.epoch = epoch

    @torch.no_grad()
    def on_after_step(self, batch: dict, logs: dict) -> None:
        if int(self.head_loss_epoch) != self.epoch:  # a new epoch: the tracker restarts (a resumed one goes on)
            self.head_loss.zero_()
            self.head_loss_epoch.fill_(self.epoch)
        self.head_loss += logs["head_losses"].to(self.head_loss)

    # --- evaluation -------------------------------------------------------------------------------
    def predict(self, x):
        """The best unlabelled head's cosine scores: novel cluster ids 0..n_novel-1 (task-aware NCD)."""
        if self.num_novel < 1:
            raise RuntimeError(f"discovery/{self.name}: begin_task has not set the novel classes")
        f = F.normalize(self.model.features(x), dim=1)
        return self.novel_heads[self.best_head()](f)[:, :self.num_novel]
