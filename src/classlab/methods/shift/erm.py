"""ERM for domain generalisation: the mean cross-entropy over every training domain's samples.

Vapnik, "Statistical Learning Theory", 1998; the baseline of Gulrajani and Lopez-Paz, "In Search
of Lost Domain Generalization", ICLR 2021 (DomainBed), which every method of this family extends.

Each batch holds one equal-size minibatch per training domain (``batch["source"]`` is the
domain index), so the mean over the whole batch is also the mean of the per-domain risks:
    L_ERM = 1/N sum_i CE(f(x_i), y_i) = 1/E sum_e R_e,   R_e = mean_{i in e} CE(f(x_i), y_i).

The penalised methods (IRM, V-REx, Fishr) share DomainBed's schedule, kept here in
``AnnealedPenaltyERM``: the penalty weight is ``warmup_weight`` before ``penalty_anneal_iters``
optimizer steps and the method's lambda from then on; at exactly that step the optimizer's
state (Adam's moments) is cleared, because the jump in gradient magnitude would otherwise be
normalised by moments accumulated under the small weight. With ``rescale_loss`` the loss is
divided by the weight whenever it exceeds 1 (Arjovsky et al.'s reference IRM code; DomainBed's
own IRM, V-REx and Fishr do not divide), which keeps the gradient in the range the learning
rate was chosen for; Adam is nearly invariant to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.shift_learner import DomainGeneralizationMethod


@register_method("shift", "erm")
class ERM(DomainGeneralizationMethod):
    def split_by_domain(self, batch: dict, *tensors: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Per training domain d (in order), the rows of each tensor whose ``source`` is d: the
        outputs of one forward pass over the whole batch, split the way ``domain_batches`` splits
        the inputs (one forward keeps BatchNorm's statistics those of the mixed batch, as ERM's)."""
        src = batch["source"]
        return [tuple(t[src == d] for t in tensors) for d in range(self.num_domains)]

    def training_step(self, batch):
        logits = self.model(batch["x"])
        # L = 1/N sum_i CE(f(x_i), y_i) over all domains' samples
        loss = F.cross_entropy(logits, batch["y"])
        return loss, {"logits": logits.detach(), "nll": loss.detach()}


class AnnealedPenaltyERM(ERM):
    """ERM + w(t) * penalty, with DomainBed's anneal and optimizer reset (IRM, V-REx, Fishr).

    w(t) = ``warmup_weight`` for t < ``penalty_anneal_iters``, else the method's lambda
    (``lambda_key``); t is ``global_step``. Subclasses compute ``penalty(batch)`` -> (nll,
    penalty, logits, extra logs)."""

    lambda_key: str = ""
    warmup_weight: float = 1.0  # IRM and V-REx: 1; Fishr: 0 (DomainBed's)

    def anneal_iters(self) -> int:
        return int(self.hparams.get("penalty_anneal_iters", 0))

    def penalty_weight(self) -> float:
        if self.global_step >= self.anneal_iters():
            return float(self.hparams[self.lambda_key])
        return float(self.warmup_weight)

    def penalty(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
        raise NotImplementedError

    def training_step(self, batch):
        nll, penalty, logits, extra = self.penalty(batch)
        weight = self.penalty_weight()
        loss = nll + weight * penalty
        if self.hparams.get("rescale_loss", False) and weight > 1.0:
            loss = loss / weight  # keep the gradient's scale after the switch to lambda
        logs = {"logits": logits.detach(), "nll": nll.detach(), "penalty": penalty.detach(),
                "penalty_weight": torch.tensor(weight)}
        logs.update(extra)
        return loss, logs

    def optimizer_step(self, loss, optimizer, closure):
        if self.global_step == self.anneal_iters():
            # DomainBed builds a new Adam here: the moments collected under the warm-up weight
            # do not fit the gradients of the full penalty
            optimizer.state.clear()
        super().optimizer_step(loss, optimizer, closure)
