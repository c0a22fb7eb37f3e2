"""CFCD: Zhu, Gao, Ke, Qiao and Sun, "Coarse-to-Fine: Learning Compact Discriminative Representation for
Single-Stage Image Retrieval", ICCV 2023.

One network gives both descriptors: the backbone's last feature map ``F`` (B, C, H, W) holds the local
descriptors (one C-vector per location), and the global descriptor is ``g = BN(W_r GeM_p(F))`` (GeM pooling,
p = 3, then a linear reduction and batch norm), L2-normalised for retrieval. Retrieval is single-stage: only
``g`` is compared at test time; the local descriptors shape ``g`` during training.

**Coarse stage: MadaCos** (Sec. 3.2; the equations as in the authors' release, ``core/model/madacos.py``).
A cosine softmax over class centres ``w_j`` (unit norm), ``cos_ij = <g_i/|g_i|, w_j>``, with a margin on the
target logit whose scale ``s`` and margin ``m`` are set from the mini-batch at every step::

    L = -1/N sum_i log( e^{s (cos_iy - m)} / ( e^{s (cos_iy - m)} + sum_{j != y} e^{s cos_ij} ) )
    med = median_i cos_iy   (the lower median; i* the sample that holds it)
    s   = max( log(K (1 - rho) / rho) / (1 - med),  s_floor )
    m   = max( med - log( B_i* rho / (1 - rho) ) / s,  0 ),   B_i* = sum_{j != y} e^{s cos_i*j}

so that the median sample's target probability is exactly ``rho`` (``madacos_rho``; the paper's 0.02):
as training pulls the target cosines up, ``s`` and ``m`` grow and the supervision tightens (intra-class
compactness). ``K`` (``madacos_k``) is the release's constant 9,999,999 and ``s_floor`` its lower bound 32.
``s`` and ``m`` are constants for the gradient (the release's backward passes ``grad * s``). With the
adaptation frozen (``madacos_adaptive: false``) the loss is the fixed-margin cosine softmax (CosFace) with
``cosface_scale`` and ``cosface_margin``; with it on, the loss equals CosFace at the adapted ``(s, m)``.

**Fine stage: attentive local descriptors** (Sec. 3.3; the release's ``SuperfeatureTripletLoss``). After the
coarse stage (``epochs``) a second stage (``fine_epochs``, the release's stage 2: new optimizer and
schedule, no warm-up) adds a triplet loss on local descriptors. The attention map is the L1 norm of each
location's descriptor, ``a(u) = sum_c |F_c(u)|``; the ``local_top_k`` locations of highest attention are
selected (``attentive_topk``) and L2-normalised. Tuples (anchor, positive, negatives) come from the batch:
an anchor, another image of its class, and the ``tuple_negatives`` images of other classes whose global
descriptors are nearest to the anchor's (hard negatives at a global scale). Anchor and positive descriptors
are matched by mutual nearest neighbours that pass Lowe's ratio test (``lowe_ratio``, 0.9); each matched
anchor descriptor gets, in every negative, its nearest selected descriptor. The loss::

    L_local = sum_matches sum_negatives [ |l_a - l_p|^2 - |l_a - l_n|^2 + margin ]_+

(``local_margin`` 0.1), averaged over the batch's tuples, is added with weight ``local_weight``
(the paper's lambda = 0.05): total ``L = L_MadaCos + lambda L_local``. Since ``g`` is pooled from the same
map, the fine-grained relations of the matched descriptors flow into the global descriptor.

``cfcd_global`` (config/methods/metric/cfcd_global.yaml) is the same network, loss and schedule with
``local_weight: 0``: the global descriptor trained by MadaCos alone.

Deviations for CPU-scale scenes: the release mines hard tuples from its stage-1 classifier's confusions
over the whole training set (a tuple sampler); here the tuples are mined inside each batch by global
similarity, and only the ``local_top_k`` most attended locations of every image (not all of the query's)
take part in the matching. The release sums the triplet loss over the tuples of a GPU (2); here it is
averaged over the batch's tuples.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from classlab.methods.base import Method
from classlab.methods.registry import register_method


# --- the global descriptor ------------------------------------------------------------------------

def gem_pool(fmap: torch.Tensor, p: float, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean pooling (Radenovic et al.): (mean_u F(u)^p)^(1/p) per channel, (B, C, H, W) -> (B, C)."""
    return fmap.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class CFCDNet(nn.Module):
    """Backbone map -> (global descriptor before normalisation, the map itself, its attention)."""

    def __init__(self, backbone: nn.Module, embedding_size: int, gem_p: float):
        super().__init__()
        self.backbone = backbone
        self.gem_p = float(gem_p)
        self.reduce = nn.Linear(int(backbone.num_features), int(embedding_size))
        self.bn = nn.BatchNorm1d(int(embedding_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fmap = self.backbone.forward_features(x)
        if fmap.ndim != 4:
            raise ValueError(f"CFCD needs a spatial feature map (B, C, H, W) from the backbone, got {tuple(fmap.shape)}")
        # g = BN(W_r GeM_p(F)): the release's global branch
        g = self.bn(self.reduce(gem_pool(fmap, self.gem_p)))
        attention = fmap.abs().sum(dim=1)  # a(u) = sum_c |F_c(u)|: the release's attention map
        return g, fmap, attention


# --- MadaCos ----------------------------------------------------------------------------------------

@torch.no_grad()
def madacos_scale_margin(cos: torch.Tensor, labels: torch.Tensor, rho: float, scale_floor: float = 32.0,
                         k: float = 9999999.0) -> dict[str, torch.Tensor]:
    """MadaCos's adaptive scale and margin of one batch of cosine logits ``cos`` (N, C).

    Returns ``scale`` s, ``margin`` m, ``median`` (of the target cosines), ``index`` (the sample holding
    it) and ``log_b`` (log of that sample's non-target sum at scale s); all detached.
    """
    cos = cos.float()
    target = cos.gather(1, labels.view(-1, 1)).squeeze(1)
    median, index = torch.median(target, dim=0)  # the lower median, as torch.median (and the release)
    # s = max(log(K (1 - rho) / rho) / (1 - med), s_floor); the gap is kept off 0 for a batch at cos = 1
    gap = (1.0 - median).clamp(min=1e-6)
    scale = torch.clamp(math.log(k * (1.0 - rho) / rho) / gap, min=scale_floor)
    # B_i* = sum_{j != y} exp(s cos_i*j), in the log domain (s cos reaches the hundreds)
    row = cos[index] * scale
    others = torch.ones_like(row, dtype=torch.bool)
    others[labels[index]] = False
    log_b = torch.logsumexp(row[others], dim=0) if bool(others.any()) else torch.tensor(float("-inf"))
    # m = max(med - log(B_i* rho / (1 - rho)) / s, 0): the median sample's target probability is rho
    margin = torch.clamp(median - (log_b + math.log(rho / (1.0 - rho))) / scale, min=0.0)
    return {"scale": scale, "margin": margin, "median": median, "index": index, "log_b": log_b}


def cosine_margin_softmax(cos: torch.Tensor, labels: torch.Tensor, scale, margin) -> torch.Tensor:
    """The fixed-margin cosine softmax (CosFace):
    -mean_i log(e^{s(cos_iy - m)} / (e^{s(cos_iy - m)} + sum_{j != y} e^{s cos_ij}))."""
    onehot = F.one_hot(labels, cos.shape[1]).to(cos.dtype)
    return F.cross_entropy(scale * (cos - margin * onehot), labels)


def madacos_loss(cos: torch.Tensor, labels: torch.Tensor, rho: float, scale_floor: float = 32.0,
                 k: float = 9999999.0, adaptive: bool = True, fixed_scale: float = 32.0,
                 fixed_margin: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MadaCos (the module docstring's L with the batch's s and m), or, with ``adaptive`` False, the
    fixed-margin cosine softmax at (``fixed_scale``, ``fixed_margin``). Returns (loss, {scale, margin, median})."""
    cos = cos.float()
    if adaptive:
        stats = madacos_scale_margin(cos, labels, rho, scale_floor, k)
        scale, margin, median = stats["scale"], stats["margin"], stats["median"]
    else:
        scale = torch.tensor(float(fixed_scale))
        margin = torch.tensor(float(fixed_margin))
        median = cos.detach().gather(1, labels.view(-1, 1)).median()
    # L = CE(s (cos - m onehot)): s and m are constants for the gradient
    return cosine_margin_softmax(cos, labels, scale, margin), {"scale": scale, "margin": margin, "median": median}


# --- attentive local descriptors ---------------------------------------------------------------

def attentive_topk(fmap: torch.Tensor, attention: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` locations of highest attention per image: (descriptors (B, k, C), flat locations (B, k)),
    in decreasing attention."""
    b, c, h, w = fmap.shape
    if not 1 <= k <= h * w:
        raise ValueError(f"local_top_k: {k} locations asked of a {h}x{w} feature map ({h * w} locations)")
    top = attention.reshape(b, h * w).topk(k, dim=1).indices
    flat = fmap.reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
    return flat.gather(1, top.unsqueeze(-1).expand(b, k, c)), top


def mutual_matches(query: torch.Tensor, positive: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (q, p) of mutual nearest neighbours between two sets of descriptors whose distance
    is at most ``ratio`` times the positive's second-nearest query descriptor's (Lowe's test)."""
    dist = torch.cdist(query.detach(), positive.detach())  # (Kq, Kp)
    best_p = dist.argmin(dim=1)  # each query descriptor's nearest positive
    best_q = dist.argmin(dim=0)  # each positive descriptor's nearest query
    cols = torch.arange(dist.shape[1], device=dist.device)
    mutual = best_p[best_q] == cols
    if dist.shape[0] > 1:
        two = dist.topk(2, dim=0, largest=False).values  # (2, Kp): nearest and second nearest
        lowe = two[0] <= ratio * two[1]
    else:
        lowe = torch.ones_like(mutual)
    keep = torch.nonzero(mutual & lowe).squeeze(1)
    return best_q[keep], keep


def local_triplet_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: list[torch.Tensor],
                       margin: float, ratio: float) -> tuple[torch.Tensor, int]:
    """One tuple's loss over its selected local descriptors (each (k, C), L2-normalised here):
    sum over matches and negatives of [|a - p|^2 - |a - n|^2 + margin]_+, n the nearest descriptor of
    each negative image to the matched anchor descriptor. Returns (loss, number of matches)."""
    anchor, positive = F.normalize(anchor, dim=1), F.normalize(positive, dim=1)
    qi, pi = mutual_matches(anchor, positive, ratio)
    if len(qi) == 0 or not negatives:
        return anchor.sum() * 0.0, 0  # no match: a zero that keeps the graph
    a, p = anchor[qi], positive[pi]
    d_pos = (a - p).pow(2).sum(1)
    loss = anchor.new_zeros(())
    for neg in negatives:
        neg = F.normalize(neg, dim=1)
        nearest = torch.cdist(a.detach(), neg.detach()).argmin(dim=1)
        d_neg = (a - neg[nearest]).pow(2).sum(1)
        # [|l_a - l_p|^2 - |l_a - l_n|^2 + margin]_+
        loss = loss + torch.clamp(d_pos - d_neg + margin, min=0.0).sum()
    return loss, int(len(qi))


def batch_tuples(labels: torch.Tensor, global_desc: torch.Tensor, max_tuples: int, negatives: int
                 ) -> list[tuple[int, int, list[int]]]:
    """(anchor, positive, hard negatives) from a batch: anchors in batch order that have another image of
    their class (the first such is the positive), negatives the ``negatives`` images of other classes whose
    global descriptors are most similar to the anchor's."""
    g = F.normalize(global_desc.detach().float(), dim=1)
    sim = g @ g.t()
    out = []
    labels = labels.view(-1)
    for i in range(len(labels)):
        if len(out) >= max_tuples:
            break
        same = torch.nonzero(labels == labels[i]).squeeze(1)
        same = same[same != i]
        other = torch.nonzero(labels != labels[i]).squeeze(1)
        if len(same) == 0 or len(other) == 0:
            continue
        hard = other[sim[i, other].topk(min(negatives, len(other))).indices]
        out.append((i, int(same[0]), hard.tolist()))
    return out


def cfcd_objective(cos: torch.Tensor, labels: torch.Tensor, global_desc: torch.Tensor, fmap: torch.Tensor,
                   attention: torch.Tensor, hp: dict, fine: bool) -> tuple[torch.Tensor, dict]:
    """The training loss of one batch: MadaCos on the cosine logits, plus (in the fine stage, where
    ``local_weight`` > 0) lambda times the attentive local triplet loss. The local term is not computed
    at all when it is off, so the loss then does not depend on ``fmap`` or ``attention``."""
    loss, stats = madacos_loss(cos, labels, float(hp["madacos_rho"]), float(hp["madacos_scale_floor"]),
                               float(hp["madacos_k"]), bool(hp["madacos_adaptive"]), float(hp["cosface_scale"]),
                               float(hp["cosface_margin"]))
    logs = {"madacos_scale": stats["scale"].detach(), "madacos_margin": stats["margin"].detach(),
            "median_cos": stats["median"].detach()}
    weight = float(hp["local_weight"])
    if fine and weight > 0:
        desc, _ = attentive_topk(fmap.float(), attention.float(), int(hp["local_top_k"]))
        tuples = batch_tuples(labels, global_desc, int(hp["tuples_per_batch"]), int(hp["tuple_negatives"]))
        local, matches = desc.new_zeros(()), 0
        for a, p, negs in tuples:
            term, n = local_triplet_loss(desc[a], desc[p], [desc[j] for j in negs], float(hp["local_margin"]),
                                         float(hp["lowe_ratio"]))
            local, matches = local + term, matches + n
        local = local / max(len(tuples), 1)
        # L = L_MadaCos + lambda L_local
        loss = loss + weight * local
        logs.update(local_loss=local.detach(), local_matches=torch.tensor(matches / max(len(tuples), 1)))
    return loss, logs


@register_method("metric", "cfcd")
class CFCD(Method):
    """The CFCD learner. ``model`` is the backbone (its ``forward_features`` gives the local map); the method
    wraps it with the global branch and holds the MadaCos class centres. ``stage`` ("coarse" / "fine") is
    set by the protocol before each stage's fit."""

    augment = True

    def __init__(self, model: nn.Module, hparams: dict, num_classes: int):
        net = CFCDNet(model, int(hparams["embedding_size"]), float(hparams["gem_p"]))
        super().__init__(net, hparams, num_classes)
        centres = torch.empty(num_classes, int(hparams["embedding_size"]))
        bound = 1.0 / math.sqrt(centres.shape[1])
        self.centres = nn.Parameter(centres.uniform_(-bound, bound))  # the release's initialisation
        self.stage = "coarse"
        self.trace: list[dict] = []  # per epoch: mean scale, margin, median cosine (and local loss, matches)
        self._sums: dict[str, float] = {}
        self._count = 0

    def param_groups(self) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def cosine(self, global_desc: torch.Tensor) -> torch.Tensor:
        return F.normalize(global_desc.float(), dim=1) @ F.normalize(self.centres.float(), dim=1).t()

    def training_step(self, batch: dict) -> tuple[torch.Tensor, dict]:
        g, fmap, attention = self.model(batch["x"])
        cos = self.cosine(g)
        loss, logs = cfcd_objective(cos, batch["y"], g, fmap, attention, self.hparams, fine=self.stage == "fine")
        logs["logits"] = cos.detach()
        return loss, logs

    def on_after_step(self, batch: dict, logs: dict) -> None:
        for key in ("madacos_scale", "madacos_margin", "median_cos", "local_loss", "local_matches"):
            if key in logs:
                self._sums[key] = self._sums.get(key, 0.0) + float(logs[key])
        self._count += 1

    def on_epoch_end(self, epoch: int) -> None:
        if self._count:
            self.trace.append({"stage": self.stage, "epoch": epoch + 1,
                               **{k: v / self._count for k, v in self._sums.items()}})
        self._sums, self._count = {}, 0

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The retrieval descriptor: the L2-normalised global descriptor (single-stage retrieval)."""
        g, _, _ = self.model(x)
        return {"embedding": F.normalize(g.float(), dim=1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, _, _ = self.model(x)
        return self.cosine(g)
