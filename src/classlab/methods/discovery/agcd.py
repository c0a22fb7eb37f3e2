"""AGCD: active generalized category discovery, on SimGCD.

Ma, Zhu, Zhong, Zhang and Liu, "Active Generalized Category Discovery", CVPR 2024
(official code: github.com/mashijie1028/ActiveGCD).

The model and its training are SimGCD's (``classlab.methods.discovery.simgcd``); the queried samples
join the labelled set with the label index ``map_revealed`` gives their class, so SimGCD's supervised
terms (cross-entropy on the head, supervised contrastive loss) train on them. What AGCD adds sits
between the rounds.

Query strategy, "Adaptive-Novel" (``query_strategy: adaptive_novel``). With p = softmax(s / tau_s)
the head's distribution over the K clusters of an unlabelled sample (tau_s SimGCD's student
temperature) and k the number of known classes (head indices 0..k-1; k..K-1 are the novel clusters):

- novelty: only samples predicted into a novel cluster, argmax_j p_j >= k, are candidates;
- informativeness: the margin m(x) = p_(1) - p_(2) between the two largest probabilities (a small
  margin is an uncertain sample). Adaptive: in the early rounds (round r < ``adaptive_round``) the
  novel clusters are still poor and their most uncertain samples are mostly noise, so the most
  confident samples (largest margin) are taken first; from round ``adaptive_round`` on, the most
  uncertain ones (smallest margin);
- diversity: the budget B is spread evenly over the predicted novel clusters, B / (K - k) from each
  (their best by the adaptive order), so one dense region cannot fill the budget with near-duplicates.

Stable label mapping (``map_revealed``): the clusters of the novel classes are found without labels,
so their head indices carry no order; giving a newly revealed class the next free index would make
the cross-entropy pull its samples into a cluster that another class occupies, reshuffling the novel
clusters at every round. Instead each revealed class takes the head index its queried samples
already fall in: the Hungarian matching of the queried samples' predicted clusters against their
revealed classes,

    pi* = argmax_pi sum_i 1[argmax_j p_j(x_i) = pi(y_i)]

over the one-to-one maps pi from the revealed classes to the head indices no class holds yet.

Where this differs from the official code, and why:
- the official code recomputes the whole mapping (old classes included) with an EMA model at every
  epoch of a round; the protocol here asks once per round, for the newly revealed classes only, and
  keeps earlier choices fixed (the label indices of the known classes are the head's by
  construction). No EMA model is kept, as only the mapping used it;
- the official code trains on the queried set in a separate pass after each epoch's GCD pass, with
  weight lambda; here the queried samples join the labelled half of each batch (the protocol's
  loader), where the same lambda-weighted supervised terms apply;
- diversity: where a novel cluster has fewer candidates than its share, the official code fills the
  rest from the remaining novel candidates by the adaptive order alone; here the spread continues
  round-robin over the clusters that still have candidates (the same selection whenever every
  cluster has its share), and only when no novel candidate is left does the fill take samples
  predicted into known clusters (the official code stops with an error there);
- the mapping's ties (a revealed class none of whose queried samples falls into a free cluster)
  are broken by the queried samples' total probability of each free cluster, not left arbitrary.

``query_strategy: random`` (the ``agcd_random`` baseline) draws the queries uniformly at random
from the pool, with the same model, training and stable mapping.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from classlab.methods.discovery.simgcd import SimGCD
from classlab.methods.discovery_learner import DiscoveryContext, DiscoveryTask
from classlab.methods.registry import register_method

QUERY_STRATEGIES = ("adaptive_novel", "random")


def top2_margin(probs: torch.Tensor) -> torch.Tensor:
    """Informativeness: m = p_(1) - p_(2), the gap between the two largest probabilities of each row."""
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"top2_margin: probs must be [N, K] with K >= 2, got shape {tuple(probs.shape)}")
    top = probs.topk(2, dim=1).values
    return top[:, 0] - top[:, 1]  # m(x) = p_(1)(x) - p_(2)(x)


def novelty_mask(probs: torch.Tensor, num_known: int) -> torch.Tensor:
    """Novelty: True where the predicted cluster argmax_j p_j is a novel one (index >= num_known)."""
    return probs.argmax(1) >= num_known


def adaptive_order(margin: torch.Tensor, round_index: int, adaptive_round: int) -> torch.Tensor:
    """Positions sorted by the round's preference: largest margin first (confident) while
    ``round_index < adaptive_round``, smallest first (uncertain) from then on. Ties keep position order."""
    key = -margin if round_index < adaptive_round else margin
    return torch.from_numpy(np.argsort(key.cpu().numpy(), kind="stable")).long()


def adaptive_novel_selection(probs: torch.Tensor, num_known: int, budget: int, round_index: int,
                             adaptive_round: int) -> torch.Tensor:
    """Adaptive-Novel: ``budget`` row positions of ``probs`` ([N, K] over the head's clusters).

    Candidates are the rows predicted into a novel cluster (novelty); inside each predicted cluster
    they are ranked by the adaptive margin order (informativeness); the budget is dealt out over the
    clusters in turns, each cluster giving its next best candidate per turn (diversity: B / (K - k)
    from each when every cluster has that many); within a turn, clusters whose candidate ranks better
    in the adaptive order go first. If the novel candidates run out, the rest of the rows follow in
    the adaptive order."""
    n = probs.shape[0]
    if budget < 0:
        raise ValueError(f"adaptive_novel_selection: budget must be >= 0, got {budget}")
    order = adaptive_order(top2_margin(probs), round_index, adaptive_round)
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(n)  # rank[i]: place of row i in the adaptive order
    pred = probs.argmax(1)
    novel = novelty_mask(probs, num_known)
    turn = torch.full((n,), -1, dtype=torch.long)  # which turn of its cluster a candidate is dealt in
    for cluster in torch.unique(pred[novel]).tolist():
        members = torch.nonzero(pred == cluster).flatten()
        members = members[torch.argsort(rank[members])]
        turn[members] = torch.arange(len(members))
    novel_rows = torch.nonzero(novel).flatten()
    # diversity: B / (K - k) per novel cluster = the first B candidates by (turn in its cluster, adaptive rank)
    keys = sorted(novel_rows.tolist(), key=lambda i: (int(turn[i]), int(rank[i])))
    chosen = keys[:budget]
    if len(chosen) < budget:  # fewer novel candidates than the budget: the rest by the adaptive order
        taken = set(chosen)
        chosen += [int(i) for i in order.tolist() if int(i) not in taken][:budget - len(chosen)]
    return torch.tensor(chosen, dtype=torch.long)


def stable_label_mapping(probs: torch.Tensor, queried_classes: torch.Tensor, revealed: list[int],
                         taken: set[int]) -> dict[int, int]:
    """The head index of each class in ``revealed``: Hungarian matching of the queried samples'
    predicted clusters (rows of ``probs``, [n, K]) against their classes (``queried_classes``), over
    the head indices not in ``taken``:

        pi* = argmax_pi sum_i 1[argmax_j p_j(x_i) = pi(y_i)]

    Ties are broken by sum_i p_pi(y_i)(x_i) (scaled below one count, so it never overrides one)."""
    revealed = sorted(int(c) for c in revealed)
    if not revealed:
        return {}
    num_clusters = probs.shape[1]
    free = [j for j in range(num_clusters) if j not in taken]
    if len(free) < len(revealed):
        raise ValueError(f"stable label mapping: {len(revealed)} newly revealed classes but only {len(free)} free "
                         f"head indices of num_clusters = {num_clusters}; raise num_clusters")
    queried_classes = torch.as_tensor(queried_classes).long().cpu()
    probs = probs.float().cpu()
    pred = probs.argmax(1)
    counts = np.zeros((len(revealed), len(free)))
    soft = np.zeros((len(revealed), len(free)))
    for r, c in enumerate(revealed):
        rows = queried_classes == c
        if not bool(rows.any()):
            raise ValueError(f"stable label mapping: revealed class {c} has no queried sample in queried_classes")
        for f, j in enumerate(free):
            counts[r, f] = float((pred[rows] == j).sum())
            soft[r, f] = float(probs[rows, j].sum())
    # the tie-break term sums to less than 1 over any assignment, so a count difference always wins
    weight = counts + soft / (len(queried_classes) + 1.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)  # pi* = argmax_pi sum_i 1[pred_i = pi(y_i)]
    return {revealed[r]: free[f] for r, f in zip(rows, cols)}


@register_method("discovery", "agcd")
class AGCD(SimGCD):
    def __init__(self, model, hparams, num_classes):
        super().__init__(model, hparams, num_classes)
        strategy = str(self.hparams.get("query_strategy", "adaptive_novel"))
        if strategy not in QUERY_STRATEGIES:
            raise ValueError(f"agcd: query_strategy must be one of {list(QUERY_STRATEGIES)}, got {strategy!r}")
        if int(self.hparams.get("adaptive_round", 2)) < 1:
            raise ValueError(f"agcd: adaptive_round must be >= 1, got {self.hparams.get('adaptive_round')}")
        # label indices 0..k-1 are the known classes (set at task 0; a buffer, so a resumed run keeps it)
        self.register_buffer("num_known", torch.tensor(-1, dtype=torch.long))

    def begin_task(self, task_id: int, info: DiscoveryTask) -> None:
        super().begin_task(task_id, info)
        if task_id == 0:
            self.num_known.fill_(int(info.num_label_indices))

    def _known(self) -> int:
        if int(self.num_known) < 0:
            raise ValueError("agcd: the number of known classes is set by begin_task(0); call it before querying")
        return int(self.num_known)

    def query_probs(self, context: DiscoveryContext, positions: torch.Tensor) -> torch.Tensor:
        """p = softmax(s / tau_s) over the head's clusters, as the student sees it (the official code's temperature)."""
        return F.softmax(context.scores(positions).float().cpu() / self.tau_s, dim=1)

    def select_queries(self, context: DiscoveryContext, budget: int) -> torch.Tensor:
        strategy = str(self.hparams.get("query_strategy", "adaptive_novel"))
        if strategy == "random":
            return super().select_queries(context, budget)
        pool = context.unlabelled[context.visible_labels[context.unlabelled] < 0]
        if len(pool) == 0 or budget <= 0:
            return pool[:0]
        probs = self.query_probs(context, pool)
        round_index = int(context.task_id) + 1  # queried after task t-1 for round t = 1..rounds
        rows = adaptive_novel_selection(probs, self._known(), min(int(budget), len(pool)), round_index,
                                        int(self.hparams.get("adaptive_round", 2)))
        return pool[rows]

    def map_revealed(self, classes: list[int], first_index: int, context: DiscoveryContext | None,
                     queried: torch.Tensor | None = None, queried_classes: torch.Tensor | None = None) -> dict[int, int]:
        if not classes:
            return {}
        if context is None or queried is None or queried_classes is None:
            raise ValueError("agcd: map_revealed needs the context, the queried positions and their classes")
        vis = context.visible_labels
        # held: the known classes' indices and every index a class revealed earlier took
        taken = set(range(self._known())) | set(int(v) for v in torch.unique(vis[vis >= 0]).tolist())
        return stable_label_mapping(self.query_probs(context, queried), queried_classes, classes, taken)
