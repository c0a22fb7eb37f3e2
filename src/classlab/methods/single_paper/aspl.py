"""ASPL: Active Self-Paced Learning.

Lin, Wang, Meng, Zuo and Zhang, "Active Self-Paced Learning for Cost-Effective and Progressive Face
Identification", IEEE Transactions on Pattern Analysis and Machine Intelligence (TPAMI) 40(1), 2018
(arXiv 1701.03555).

A classifier starts from a few labelled samples per class and grows in rounds. Each round the current
model ranks the unlabelled pool by its prediction confidence: the LOW-confidence samples go to the oracle
(active learning, the "instructor"), the HIGH-confidence ones are pseudo-labelled by the model itself
(self-paced learning, the "student"); the model is then retrained on both. Pseudo-labels are not queries:
they cost no annotation and are recomputed every round.

Key equation (the ASPL objective, written for one softmax network instead of the paper's one-vs-all SVMs
on CNN features; L the oracle-labelled set, U the unlabelled pool):

    min_{w, y_U, v in [0,1]^|U|}  sum_{i in L} l(x_i, y_i; w) + sum_{i in U} v_i l(x_i, y_i; w) + f(v; lambda),
    s.t. v in Psi_lambda (the curriculum constraint), one positive label per sample,

solved by alternating search. With w fixed:

- pseudo-label step: y_i = argmin_y l(x_i, y; w) = argmax_k p_k(x_i), so l_i = -log max_k p_k(x_i);
- the self-paced regulariser f(v; lambda) = -lambda sum_i v_i (hard, the paper's) has the closed form

      v_i* = 1  if l_i < lambda,   v_i* = 0  otherwise,

  i.e. a sample is pseudo-labelled iff its confidence max_k p_k(x_i) > exp(-lambda). The linear variant
  f(v; lambda) = lambda sum_i (v_i^2 / 2 - v_i) gives v_i* = max(0, 1 - l_i / lambda) (soft weights);
- the curriculum constraint Psi_lambda keeps every oracle-labelled sample in (v_i = 1 for i in L, with its
  true label), so a queried sample is never pseudo-labelled;
- the pace lambda grows each round, lambda_t = spl_lambda + (t - 1) * spl_lambda_step (t = 1, 2, ...),
  so ever less confident samples join as the model matures;
- the paper keeps one pace lambda^j per class (one classifier each). Here lambda^j_t = min(lambda_t, the loss
  of the c_t-th most confident sample pseudo-labelled j), c_t = ceil(pseudo_per_labelled * |L_t| / K): at
  most c_t pseudo-labels per class, so the self-paced set grows with the labelled one and stays class
  balanced (0 turns the cap off). A small network trained on a few labels is so overconfident that the
  cap, not lambda_t, is what binds on Fashion-MNIST at the YAML defaults.

With (v, y) fixed, w minimises the v-weighted cross-entropy (``training_step``). The oracle is queried on
the ``queries_per_round`` least-confident pool samples (``query_strategy``: least_confidence, the paper's
ranking by confidence; margin and entropy are the other usual uncertainty criteria; random for the
baseline). The paper's occasional expert re-certification of pseudo-labels is not modelled.

Variants (YAML only): ``active_only`` (uncertainty queries, no pseudo-labels) and ``random_queries``
(random queries, no pseudo-labels). The protocol (``classlab.protocols.aspl``) owns the pool, the budget,
the rounds and the learning curve; this module says how a round's queries, pseudo-labels and loss are made.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from classlab.methods.base import Method
from classlab.methods.registry import register_method

QUERY_STRATEGIES = ("least_confidence", "margin", "entropy", "random")
REGULARIZERS = ("hard", "linear")


def spl_weights(losses: torch.Tensor, lam: float, regularizer: str = "hard") -> torch.Tensor:
    """The closed-form minimiser v* of sum_i v_i l_i + f(v; lambda) over v in [0, 1]^n."""
    if regularizer == "hard":
        # f = -lambda sum v_i  =>  v_i* = 1 iff l_i < lambda (the paper's hard SPL weights)
        return (losses < lam).to(losses.dtype)
    if regularizer == "linear":
        # f = lambda sum (v_i^2 / 2 - v_i)  =>  v_i* = max(0, 1 - l_i / lambda)
        return (1.0 - losses / lam).clamp(min=0.0)
    raise ValueError(f"spl_regularizer: {regularizer!r}; use one of {list(REGULARIZERS)}")


def pace(round_index: int, lam0: float, step: float) -> float:
    """lambda_t = lambda_0 + (t - 1) * step for round t >= 1: the pace grows each round."""
    return float(lam0) + max(int(round_index) - 1, 0) * float(step)


def pseudo_labels(probs: torch.Tensor, lam: float, regularizer: str = "hard",
                  exclude: torch.Tensor | None = None, cap_per_class: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, weights) for the rows of ``probs`` (pool samples): the y-step y_i = argmax_k p_ik with
    l_i = -log p_{i y_i}, then the v-step v_i* = spl_weights(l_i, lambda). Rows in ``exclude`` (a
    boolean mask: the samples queried this round) get v_i = 0: Psi_lambda keeps them oracle-labelled.

    ``cap_per_class`` (None: no cap) admits at most that many samples per pseudo-class, the lowest-loss
    ones: a per-class pace lambda^j = min(lambda, the loss of class j's cap-th most confident sample), as
    the paper keeps one lambda^j per class classifier."""
    conf, labels = probs.max(dim=1)
    losses = -torch.log(conf.clamp_min(1e-12))  # l_i of the pseudo-label, the loss the y-step minimises
    if exclude is not None:
        losses = torch.where(exclude, torch.full_like(losses, float("inf")), losses)
    if cap_per_class is not None:
        kept = torch.full_like(losses, float("inf"))
        for c in labels.unique().tolist():
            rows = torch.nonzero(labels == c).flatten()
            order = torch.sort(losses[rows], stable=True).indices[:max(int(cap_per_class), 0)]
            kept[rows[order]] = losses[rows[order]]
        losses = kept  # beyond the cap a class's samples get loss inf, i.e. lambda^j sits below them
    weights = spl_weights(losses, lam, regularizer)
    return labels, weights


def uncertainty(probs: torch.Tensor, strategy: str) -> torch.Tensor:
    """Per-row uncertainty, higher = less confident: 1 - max_k p_k (least_confidence), -(p_(1) - p_(2))
    (margin) or -sum_k p_k log p_k (entropy)."""
    if strategy == "least_confidence":
        return 1.0 - probs.max(dim=1).values
    if strategy == "margin":
        top2 = probs.topk(2, dim=1).values
        return -(top2[:, 0] - top2[:, 1])
    if strategy == "entropy":
        return -(probs * torch.log(probs.clamp_min(1e-12))).sum(dim=1)
    raise ValueError(f"query_strategy: {strategy!r}; use one of {list(QUERY_STRATEGIES)}")


def select_queries(probs: torch.Tensor, k: int, strategy: str, generator: torch.Generator) -> torch.Tensor:
    """Row indices of the ``k`` pool samples sent to the oracle: the ``k`` most uncertain (ties broken by
    row order, so the choice is deterministic), or a ``generator``-seeded random subset for ``random``."""
    n = probs.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"cannot query {k} of {n} pool samples")
    if strategy == "random":
        return torch.randperm(n, generator=generator)[:k].sort().values
    scores = uncertainty(probs, strategy)
    order = torch.sort(-scores, stable=True).indices  # descending uncertainty, stable on ties
    return order[:k].sort().values


@register_method("single_paper", "aspl")
class ASPL(Method):
    """ASPL's learner: a classifier trained on the v-weighted cross-entropy of its current training set
    (oracle labels with v = 1, pseudo-labels with their SPL weights); see the module docstring."""

    augment = True

    def __init__(self, model, hparams: dict, num_classes: int):
        super().__init__(model, hparams, num_classes)
        # v over the train split's positions (batch["index"]); set by the protocol each round
        self.register_buffer("sample_weight", torch.zeros(0))

    # --- what the protocol asks each round -------------------------------------------------------
    def set_sample_weights(self, weights: torch.Tensor) -> None:
        self.sample_weight = weights.detach().to(self.sample_weight.device, torch.float32).clone()

    def queries(self, probs: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        return select_queries(probs, k, str(self.hparams["query_strategy"]), generator)

    def pseudo_labels(self, probs: torch.Tensor, round_index: int, num_labelled: int,
                      exclude: torch.Tensor | None = None):
        """(labels, weights, lambda_t) for the pool rows, or None where the method pseudo-labels nothing;
        ``num_labelled`` (oracle labels so far) sets the per-class cap ``pseudo_per_labelled * |L| / K``."""
        if not self.hparams.get("pseudo_label", True):
            return None
        lam = pace(round_index, self.hparams["spl_lambda"], self.hparams["spl_lambda_step"])
        ratio = float(self.hparams.get("pseudo_per_labelled", 0) or 0)
        cap = math.ceil(ratio * num_labelled / self.num_classes) if ratio > 0 else None
        labels, weights = pseudo_labels(probs, lam, str(self.hparams["spl_regularizer"]), exclude, cap)
        return labels, weights, lam

    # --- one batch -------------------------------------------------------------------------------
    def training_step(self, batch):
        logits = self.model(batch["x"])
        losses = F.cross_entropy(logits, batch["y"], reduction="none")
        v = self.sample_weight[batch["index"]] if self.sample_weight.numel() else torch.ones_like(losses)
        # the w-step: sum_i v_i l(x_i, y_i; w), averaged over the batch (v_i = 1 for oracle labels)
        loss = (v * losses).mean()
        return loss, {"logits": logits.detach()}
