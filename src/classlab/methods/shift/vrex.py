"""V-REx: ERM + the variance of the per-domain risks.

Krueger, Caballero, Jacobsen, Zhang, Binas, Zhang, Le Priol and Courville, "Out-of-Distribution
Generalization via Risk Extrapolation (REx)", ICML 2021; as implemented in DomainBed.

With R_e domain e's mean cross-entropy and E training domains,
    L = 1/E sum_e R_e + lambda(t) * 1/E sum_e (R_e - 1/E sum_e' R_e')^2
(the biased variance, as DomainBed), lambda(t) = 1 before ``penalty_anneal_iters`` steps and
``vrex_lambda`` after, with Adam reset at the switch (see ``AnnealedPenaltyERM``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.shift.erm import AnnealedPenaltyERM


def vrex_penalty(risks: torch.Tensor) -> torch.Tensor:
    """1/E sum_e (R_e - mean R)^2."""
    return (risks - risks.mean()).pow(2).mean()


@register_method("shift", "vrex")
class VREx(AnnealedPenaltyERM):
    lambda_key = "vrex_lambda"
    warmup_weight = 1.0

    def penalty(self, batch):
        logits = self.model(batch["x"])
        risks = torch.stack([F.cross_entropy(z, y) for z, y in self.split_by_domain(batch, logits, batch["y"])])
        return risks.mean(), vrex_penalty(risks), logits, {"domain_risks": risks.detach()}
