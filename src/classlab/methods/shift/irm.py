"""IRMv1: ERM + the squared gradient of each domain's risk w.r.t. a dummy classifier scale.

Arjovsky, Bottou, Gulrajani and Lopez-Paz, "Invariant Risk Minimization", arXiv 1907.02893, 2019;
as implemented in DomainBed (Gulrajani and Lopez-Paz, ICLR 2021).

IRMv1 asks the classifier w = 1.0 on top of the logits to be optimal in every domain at once:
    penalty_e = || d/dw R_e(w * f) |_{w=1} ||^2.
DomainBed estimates the square without the bias of squaring a noisy minibatch gradient: it splits
domain e's minibatch into its even and odd rows and multiplies the two halves' gradients,
    penalty_e = d/dw R_e^{even}(w f) * d/dw R_e^{odd}(w f)   at w = 1,
    L = 1/E sum_e R_e + lambda(t) * 1/E sum_e penalty_e,
with lambda(t) = 1 before ``penalty_anneal_iters`` steps and ``irm_lambda`` after (Adam is reset
at the switch; see ``AnnealedPenaltyERM``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from classlab.methods.registry import register_method
from classlab.methods.shift.erm import AnnealedPenaltyERM


def irm_penalty(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d/dw CE(w z[::2], y[::2]) * d/dw CE(w z[1::2], y[1::2]) at w = 1 (DomainBed's unbiased
    estimate of the squared gradient), differentiable w.r.t. the logits."""
    scale = torch.ones((), device=logits.device, dtype=logits.dtype, requires_grad=True)
    loss_even = F.cross_entropy(logits[::2] * scale, y[::2])
    loss_odd = F.cross_entropy(logits[1::2] * scale, y[1::2])
    grad_even = torch.autograd.grad(loss_even, [scale], create_graph=True)[0]
    grad_odd = torch.autograd.grad(loss_odd, [scale], create_graph=True)[0]
    return grad_even * grad_odd


@register_method("shift", "irm")
class IRM(AnnealedPenaltyERM):
    lambda_key = "irm_lambda"
    warmup_weight = 1.0

    def penalty(self, batch):
        logits = self.model(batch["x"])
        parts = self.split_by_domain(batch, logits, batch["y"])
        nll = torch.stack([F.cross_entropy(z, y) for z, y in parts]).mean()
        penalty = torch.stack([irm_penalty(z, y) for z, y in parts]).mean()
        return nll, penalty, logits, {}
