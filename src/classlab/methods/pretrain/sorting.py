"""GroCo: self-supervised pretraining by sorting, with group ordering constraints, no labels.

Shvetsova, Petersen, Kukleva, Schiele and Kuehne, "Learning by Sorting: Self-supervised Learning
with Group Ordering Constraints", ICCV 2023 (official code: github.com/ninatu/learning_by_sorting).

The views, the augmentation and the projection head are SimCLR's (``simclr.augmented_views``,
``simclr.ProjectionHead``), so a comparison with SimCLR at the same budget differs only in the loss
(and, with ``output_bn``, the paper's parameter-free standardisation of the head's output, below).
Each image gives V views (``views``, paper: 2; 4 in its multi-view runs); z = g(f(x)) as in SimCLR
and s(u, v) = u.v / (|u| |v|) the cosine similarity.

The loss. Every view z^v_i of image i is an anchor. Its m = V - 1 positives are the other views of
image i; its negatives are the other images of the batch in the anchor's own view, of which only the
k = ``topk_neg`` most similar (the hardest) are kept (paper: k = 10). The anchor's similarities are
pre-ordered group-wise into the ground-truth ascending order: the k negative similarities sorted
ascending, then the m positive ones sorted ascending,

    s = [s_(n_1) <= ... <= s_(n_k),  s_(p_1) <= ... <= s_(p_m)]          (n = k + m entries)

so the constraint "every positive ranks above every negative" says that the last m of the n sorted
positions hold exactly the positives. A differentiable sorting network (Petersen et al., ICML 2021 /
ICLR 2022) sorts s and returns a doubly-stochastic relaxed permutation matrix P (P_ij: the
probability that entry i ends at sorted position j, ascending). It is the odd-even transposition
network of n layers whose conditional swaps are relaxed with the Cauchy CDF of steepness beta:
a comparator on wires (a, b) keeps a below b with probability

    alpha = arctan(beta (s_b - s_a)) / pi + 1/2,
    min' = alpha s_a + (1 - alpha) s_b,   max' = (1 - alpha) s_a + alpha s_b,

and mixes the columns of P the same way. The probability that entry i lands in the positive group
(the top m positions) and its ground truth are

    q_i = sum_{j > k} P_ij,      y_i = 1[i is a positive],

and the GroCo loss is the binary cross-entropy between them (the official code averages it with the
same BCE on the negative group, q'_i = sum_{j <= k} P_ij = 1 - q_i, which is equal):

    L = 1/(V N) sum_{v, i} 1/n sum_{e=1..n} BCE(q_e, y_e),   BCE(q, y) = -y log q - (1 - y) log(1 - q).

As in the official code the positives' and negatives' embeddings are detached (``stop_grad``): the
gradient reaches each embedding through its role as an anchor. The paper's steepness is beta = 1.
The official projector ends in a parameter-free BatchNorm1d(affine=False), applied to each view's
batch; ``output_bn`` (default true) applies that standardisation to SimCLR's head output here, the
only difference from SimCLR's head. It matters: without it the similarities of a fresh network all
lie near 0.9-1, where a steepness-1 network is flat, and the loss settles at its all-equal
(collapsed) value; with it they spread around 0, where beta = 1 is the paper's scale.

``relaxation: soft_rank`` replaces the sorting network by the soft ranks of Blondel et al.
(ICML 2020, "Fast Differentiable Sorting and Ranking": projection onto the permutahedron by
isotonic regression, ``torchsort.soft_rank`` with l2 regularization of strength eps). Soft ranks
give no permutation matrix, so that variant counts what the paper's abstract names, the positive
pairs ordered below negative pairs: with r the soft ranks of s (1 = lowest),

    L_rank = [ sum_{j=k+1..n} j  -  sum_{e positive} r_e ] / (m k),

which for hard ranks is exactly the fraction of (positive, negative) pairs in the wrong order, is
>= 0 on the whole permutahedron, and is 0 once every positive beats every negative by a margin
(larger than about eps). It is not the paper's loss and not the default: the paper's BCE needs the
relaxed permutation matrix (each entry's probability of landing in the positive group), which a
sorting network gives and soft ranks do not, and the paper sorts with a sorting network. torchsort
(a compiled extension) is imported only when ``soft_rank`` is chosen.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from classlab.methods.base import Method
from classlab.methods.pretrain.simclr import ProjectionHead, augmented_views
from classlab.methods.registry import register_method

RELAXATIONS = ("sorting_network", "soft_rank")


# --- differentiable sorting ----------------------------------------------------------------------
def odd_even_layers(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The comparators of the odd-even transposition sorting network on n wires: n layers, layer l
    comparing wires (i, i + 1) for i = l mod 2, l mod 2 + 2, ...; wires outside a comparator pass."""
    layers = []
    for layer in range(n):
        lo = torch.arange(layer % 2, n - 1, 2)
        if len(lo):
            layers.append((lo, lo + 1))
    return layers


def sorting_network_permutation(x: torch.Tensor, steepness: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The relaxed odd-even sorting network with Cauchy swaps on the rows of ``x`` (B, n): returns
    the softly sorted rows (ascending) and the relaxed permutation P (B, n, n), P[b, i, j] the
    probability that entry i of row b ends at position j (rows and columns of P sum to 1)."""
    b, n = x.shape
    perm = torch.eye(n, dtype=x.dtype, device=x.device).expand(b, n, n)
    for lo, hi in odd_even_layers(n):
        lo, hi = lo.to(x.device), hi.to(x.device)
        a, c = x[:, lo], x[:, hi]
        # alpha = arctan(beta (s_b - s_a)) / pi + 1/2: the probability that the pair is already in order
        alpha = torch.atan(steepness * (c - a)) / math.pi + 0.5
        # min' = alpha s_a + (1 - alpha) s_b on the lower wire, max' = (1 - alpha) s_a + alpha s_b on the upper
        x = x.clone()
        x[:, lo] = alpha * a + (1 - alpha) * c
        x[:, hi] = (1 - alpha) * a + alpha * c
        # the same convex mix of the columns of P (where each entry currently sits)
        w = alpha.unsqueeze(1)
        pa, pc = perm[:, :, lo], perm[:, :, hi]
        perm = perm.clone()
        perm[:, :, lo] = w * pa + (1 - w) * pc
        perm[:, :, hi] = (1 - w) * pa + w * pc
    return x, perm


def _torchsort():
    try:
        import torchsort
    except ImportError as err:  # an optional compiled extension
        raise ImportError("sorting: relaxation 'soft_rank' needs torchsort (pip install --no-build-isolation "
                          "torchsort==0.1.10); the default relaxation 'sorting_network' does not") from err
    return torchsort


def blondel_soft_rank(x: torch.Tensor, regularization_strength: float) -> torch.Tensor:
    """Blondel et al.'s l2 soft ranks of the rows of ``x`` (1 = lowest), by torchsort. torchsort's
    CUDA extension is built only with a CUDA toolkit, so other devices go through the CPU."""
    torchsort = _torchsort()
    dev = x.device
    xc = x.double().cpu()  # isotonic regression in float64: soft ranks are exact at small eps
    r = torchsort.soft_rank(xc, regularization="l2", regularization_strength=float(regularization_strength))
    return r.to(device=dev, dtype=x.dtype)


def soft_ranks(x: torch.Tensor, relaxation: str = "sorting_network", steepness: float = 1.0,
               regularization_strength: float = 0.1) -> torch.Tensor:
    """Soft ascending ranks (1 = lowest) of the rows of ``x`` under either relaxation; the hard ranks
    as steepness -> inf (sorting network: rank_i = sum_j P_ij j) or eps -> 0 (soft_rank)."""
    if relaxation == "sorting_network":
        _, perm = sorting_network_permutation(x, steepness)
        positions = torch.arange(1, x.shape[1] + 1, dtype=x.dtype, device=x.device)
        return perm @ positions
    if relaxation == "soft_rank":
        return blondel_soft_rank(x, regularization_strength)
    raise ValueError(f"sorting: relaxation must be one of {RELAXATIONS}, got {relaxation!r}")


# --- the group ordering constraint ----------------------------------------------------------------
def group_ordering_loss(scores: torch.Tensor, num_pos: int, relaxation: str = "sorting_network",
                        steepness: float = 1.0, regularization_strength: float = 0.1) -> torch.Tensor:
    """The loss of pre-ordered rows ``scores`` (B, k + m): the k negatives' similarities first, the
    m = ``num_pos`` positives' last, each group ascending. Mean over the rows."""
    n = scores.shape[1]
    k = n - num_pos
    if num_pos < 1 or k < 1:
        raise ValueError(f"sorting: a row needs at least one positive and one negative, got {num_pos} of {n}")
    if relaxation == "sorting_network":
        _, perm = sorting_network_permutation(scores, steepness)
        # q_e = sum_{j > k} P_ej: the probability that entry e lands in the top-m (positive) group;
        # q'_e = sum_{j <= k} P_ej for the negative group (clipped to [0, 1] against rounding)
        q_pos = perm[:, :, k:].sum(dim=2).clamp(0, 1)
        q_neg = perm[:, :, :k].sum(dim=2).clamp(0, 1)
        y_pos = torch.zeros_like(q_pos)
        y_pos[:, k:] = 1.0  # the ground truth: entries k..n-1 are the positives
        # L = mean_e BCE(q_e, y_e), averaged with the negative group's BCE as in the official code
        return 0.5 * (F.binary_cross_entropy(q_pos, y_pos) + F.binary_cross_entropy(q_neg, 1.0 - y_pos))
    if relaxation == "soft_rank":
        r = blondel_soft_rank(scores, regularization_strength)
        best = float(sum(range(k + 1, n + 1)))  # sum_{j=k+1..n} j: the positives hold the top m ranks
        # L_rank = (sum_{j>k} j - sum_{e positive} r_e) / (m k): the fraction of mis-ordered (pos, neg) pairs
        return ((best - r[:, k:].sum(dim=1)) / (num_pos * k)).mean()
    raise ValueError(f"sorting: relaxation must be one of {RELAXATIONS}, got {relaxation!r}")


def preordered_scores(anchor: torch.Tensor, positives: list[torch.Tensor], topk_neg: int,
                      stop_grad: bool = True) -> tuple[torch.Tensor, int]:
    """Each anchor's row s = [k hardest negatives ascending, its m positives ascending] (see the
    module docstring). ``anchor`` (N, d) is one view; ``positives`` the other views of the same
    images (row i of each is image i); the negatives are the anchor view's other rows. Returns the
    rows (N, k + m) and k = min(topk_neg, N - 1)."""
    n = len(anchor)
    if n < 2:
        raise ValueError("sorting: a batch needs at least two images (an anchor and a negative)")
    a = F.normalize(anchor, dim=1)
    others = a.detach() if stop_grad else a
    pos = [F.normalize(p, dim=1) for p in positives]
    # s(z_i^v, z_i^u) for the other views u of image i (detached with stop_grad, as in the paper)
    pos_sims = torch.stack([(a * (p.detach() if stop_grad else p)).sum(dim=1) for p in pos], dim=1)
    neg_sims = a @ others.T  # s(z_i^v, z_j^v), j != i: the other images in the anchor's view
    neg_sims = neg_sims.masked_fill(torch.eye(n, dtype=torch.bool, device=a.device), float("-inf"))
    k = min(int(topk_neg), n - 1)
    hardest, _ = torch.topk(neg_sims, k, dim=1)  # descending: the k most similar negatives
    # the group-wise ground-truth order: negatives ascending, then positives ascending
    return torch.cat([hardest.flip(1), torch.sort(pos_sims, dim=1).values], dim=1), k


def groco_loss(views: list[torch.Tensor], topk_neg: int = 10, relaxation: str = "sorting_network",
               steepness: float = 1.0, regularization_strength: float = 0.1,
               stop_grad: bool = True) -> tuple[torch.Tensor, dict]:
    """The GroCo loss of the projected views (each (N, d), row i = image i), averaged over the views
    as anchors, and detached diagnostics (the mean gap between the weakest positive and the hardest
    negative, and the fraction of rows whose positives all beat all negatives)."""
    if len(views) < 2:
        raise ValueError(f"sorting: the group ordering loss needs at least two views, got {len(views)}")
    losses, gaps, ordered = [], [], []
    m = len(views) - 1
    # in full precision, outside autocast (bf16 would blur the similarities; CUDA autocast refuses BCE)
    with torch.autocast(device_type=views[0].device.type, enabled=False):
        views = [z if z.dtype == torch.float64 else z.float() for z in views]
        for v, anchor in enumerate(views):
            rows, k = preordered_scores(anchor, [z for u, z in enumerate(views) if u != v], topk_neg, stop_grad)
            losses.append(group_ordering_loss(rows, m, relaxation, steepness, regularization_strength))
            gap = (rows[:, k] - rows[:, k - 1]).detach()  # weakest positive minus hardest negative
            gaps.append(gap.mean())
            ordered.append((gap > 0).float().mean())
        loss = torch.stack(losses).mean()
    return loss, {"groco": loss.detach(), "pos_neg_gap": torch.stack(gaps).mean(),
                  "ordered_frac": torch.stack(ordered).mean()}


@register_method("pretrain", "sorting")
class Sorting(Method):
    """GroCo (group ordering constraints by differentiable sorting) on SimCLR's views and projection
    head, the head held by the method (dropped after pretraining)."""

    head_trained = False

    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        hp = self.hparams
        self.steepness = float(hp.get("steepness", 1.0))
        self.regularization_strength = float(hp.get("regularization_strength", 0.1))
        self.topk_neg = int(hp.get("topk_neg", 10))
        self.relaxation = str(hp.get("relaxation", "sorting_network"))
        self.stop_grad = bool(hp.get("stop_grad", True))
        self.num_views = int(hp.get("views", 2))  # the loader makes this many views of each image
        self.output_bn = bool(hp.get("output_bn", True))
        if not self.steepness > 0:
            raise ValueError(f"pretrain/sorting: steepness must be > 0, got {self.steepness}")
        if not self.regularization_strength > 0:
            raise ValueError("pretrain/sorting: regularization_strength must be > 0, "
                             f"got {self.regularization_strength}")
        if self.topk_neg < 1:
            raise ValueError(f"pretrain/sorting: topk_neg must be >= 1, got {self.topk_neg}")
        if self.num_views < 2:
            raise ValueError(f"pretrain/sorting: views must be >= 2, got {self.num_views}")
        if self.relaxation not in RELAXATIONS:
            raise ValueError(f"pretrain/sorting: relaxation must be one of {RELAXATIONS}, got {self.relaxation!r}")
        if self.relaxation == "soft_rank":
            _torchsort()  # fail at construction, not at the first step
        self.projector = ProjectionHead(model.num_features, int(hp.get("proj_dim", 128)),
                                        int(hp.get("proj_hidden", 0)))

    def param_groups(self):
        # the backbone and the projection head; the classification head is not used (no labels)
        return [{"params": [p for p in self.model.backbone.parameters() if p.requires_grad]
                 + list(self.projector.parameters())}]

    def training_step(self, batch):
        views = augmented_views(self, batch)[: self.num_views]
        n = len(views[0])
        z = self.projector(self.model.features(torch.cat(views)))  # one pass: BatchNorm sees every view
        z = list(z.split(n))
        if self.output_bn:
            # the official projector's last layer, BatchNorm1d(affine=False), per view: each output
            # dimension standardised over the batch (parameter-free; batch statistics, no buffers)
            z = [F.batch_norm(zv.float(), None, None, training=True, eps=1e-5) for zv in z]
        loss, logs = groco_loss(z, self.topk_neg, self.relaxation, self.steepness,
                                self.regularization_strength, self.stop_grad)
        return loss, logs
